//! The cluster simulation (`broker::sim`) over many seeds: every run must
//! keep every invariant. A failing seed prints its report and the one
//! command that replays it exactly; seeds that once failed stay below as
//! regression tests.
//!
//! The default suite runs `SIM_SEEDS` seeds (300) of a shorter span than
//! the soak's, on both cores; `SIM_SEEDS=5000 cargo test --release -p
//! miyamoto-broker --test simulation` soaks, as does the `simulate`
//! example.

use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use broker::sim::{self, Report, Sabotage, SimConfig};

/// A run of the default suite: 20 s of faults and 15 s of calm.
fn short(seed: u64) -> SimConfig {
    let mut c = SimConfig::new(seed);
    c.faulty = Duration::from_secs(20);
    c.calm = Duration::from_secs(15);
    c
}

/// Runs `config`; a panic is a failure of the seed, not of the suite.
fn run(config: SimConfig) -> Report {
    let seed = config.seed;
    match panic::catch_unwind(AssertUnwindSafe(|| sim::run(config))) {
        Ok(r) => r,
        Err(e) => {
            let what = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Report {
                seed,
                violations: vec![format!("panicked: {what}")],
                ..Report::default()
            }
        }
    }
}

fn describe(r: &Report) -> String {
    let mut s = r.summary();
    for v in &r.violations {
        s.push_str("\n  violation: ");
        s.push_str(v);
    }
    s.push_str("\n  replay: ");
    s.push_str(&r.replay_command());
    s
}

#[test]
fn many_seeds_keep_every_invariant() {
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let from: u64 = std::env::var("SIM_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Both cores: even seeds on one thread, odd on the other.
    let half = |parity: u64| {
        std::thread::spawn(move || {
            (from..from + seeds)
                .filter(|s| s % 2 == parity)
                .map(|s| run(short(s)))
                .collect::<Vec<Report>>()
        })
    };
    let (a, b) = (half(0), half(1));
    let mut reports = a.join().expect("a simulation thread");
    reports.extend(b.join().expect("a simulation thread"));
    assert_eq!(reports.len() as u64, seeds);
    let failed: Vec<String> = reports.iter().filter(|r| !r.ok()).map(describe).collect();
    let acknowledged: usize = reports.iter().map(|r| r.acknowledged).sum();
    let duplicates: u64 = reports.iter().map(|r| r.duplicates).sum();
    let deliveries: u64 = reports.iter().map(|r| r.deliveries).sum();
    let lost: usize = reports.iter().map(|r| r.lost_with_holders).sum();
    println!(
        "{seeds} seeds: {acknowledged} tasks acknowledged, {deliveries} deliveries, \
         {duplicates} duplicates, {lost} lost with all their holders"
    );
    // The runs did something: tasks flowed and faults happened.
    assert!(acknowledged as u64 > seeds * 100, "too little traffic");
    assert!(reports.iter().map(|r| r.crashes).sum::<u64>() > 0);
    assert!(
        failed.is_empty(),
        "{} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn a_seed_replays_exactly() {
    let a = run(short(12345));
    let b = run(short(12345));
    assert_eq!(a.summary(), b.summary());
    assert!(a.steps > 1000 && a.acknowledged > 100, "{}", a.summary());
    let c = run(short(12346));
    assert_ne!(a.summary(), c.summary(), "another seed, another run");
}

#[test]
fn a_full_length_run_keeps_every_invariant() {
    let r = run(SimConfig::new(7));
    assert!(r.ok(), "{}", describe(&r));
    assert!(r.crashes >= 3 && r.partitions >= 1, "{}", r.summary());
}

/// Seeds that once failed, and what they found.
#[test]
fn seeds_that_once_failed() {
    // A copy stored for a coordinator that then discarded it (the name
    // was taken elsewhere) answered a resend of its request as if it
    // were still there: the acknowledged task was held nowhere.
    // Fixed: such a copy answers only while it is held.
    let r = run(short(168));
    assert!(r.ok(), "{}", describe(&r));
    // Two failures before the roster healed left no majority alive (the
    // restarted nodes are new members): no leader ever came back, the
    // survivor kept a quarter share of the limited queue's rate, and
    // tasks were undelivered at the end. Nodes without a data directory
    // cannot recover from that by themselves (issues 14 and 15); the
    // simulation's faults now wait for the cluster to heal.
    for seed in [5343, 5594] {
        let r = run(SimConfig::new(seed));
        assert!(r.ok(), "{}", describe(&r));
    }
}

/// The checks bite: tasks that vanish while their holders live are
/// reported.
#[test]
fn lost_tasks_are_caught() {
    let mut c = short(3);
    c.sabotage = Some(Sabotage::WipeStore(Duration::from_secs(10)));
    let r = run(c);
    assert!(
        r.violations.iter().any(|v| v.contains("is held nowhere")),
        "{}",
        describe(&r)
    );
}
