//! The cluster simulation (`broker::sim`) over many seeds: every run must
//! keep every invariant. A failing seed prints its report and the one
//! command that replays it exactly; seeds that once failed stay below as
//! regression tests.
//!
//! The default suite runs `SIM_SEEDS` seeds (300) of a shorter span than
//! the soak's, on both cores, with every fault; `SIM_SEEDS=5000 cargo
//! test --release -p miyamoto-broker --test simulation` soaks, as does the
//! `simulate` example. Clusters of five, where a second crash may strike
//! before the first is healed, run `SIM_SEEDS_5` seeds (16). Nodes that
//! keep a data directory and restart from it run `SIM_SEEDS_DURABLE`
//! seeds (60).

use std::time::Duration;

use broker::sim::{run, Faults, Report, Sabotage, SimConfig};

/// A run of the default suite: 20 s of faults and 15 s of calm.
fn short(seed: u64) -> SimConfig {
    let mut c = SimConfig::new(seed);
    c.faulty = Duration::from_secs(20);
    c.calm = Duration::from_secs(15);
    c
}

/// A run of the default suite whose nodes keep a data directory: crashes
/// keep only what was synced, and most crashed nodes restart from it as
/// themselves (issue 15).
fn short_durable(seed: u64) -> SimConfig {
    let mut c = short(seed);
    c.faults = Faults::DURABLE;
    c
}

/// A run of the default suite in a cluster of five.
fn short_of_five(seed: u64) -> SimConfig {
    let mut c = short(seed);
    c.nodes = 5;
    c
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

/// Runs `seeds` seeds from `from` of `config`, even seeds on one core
/// and odd on the other.
fn run_seeds(from: u64, seeds: u64, config: fn(u64) -> SimConfig) -> Vec<Report> {
    let half = |parity: u64| {
        std::thread::spawn(move || {
            (from..from + seeds)
                .filter(|s| s % 2 == parity)
                .map(|s| run(config(s)))
                .collect::<Vec<Report>>()
        })
    };
    let (a, b) = (half(0), half(1));
    let mut reports = a.join().expect("a simulation thread");
    reports.extend(b.join().expect("a simulation thread"));
    assert_eq!(reports.len() as u64, seeds);
    reports.sort_by_key(|r| r.seed);
    reports
}

/// Fails with every failed seed's report and replay command.
fn assert_all_ok(reports: &[Report]) {
    let failed: Vec<String> = reports.iter().filter(|r| !r.ok()).map(describe).collect();
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed:\n{}",
        failed.len(),
        reports.len(),
        failed.join("\n")
    );
}

fn sum(reports: &[Report], f: fn(&Report) -> u64) -> u64 {
    reports.iter().map(f).sum()
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Nodes that restart from their data directory keep every invariant:
/// no acknowledged task lost, leaders within their bound, no delivery of
/// a task its node recorded as cancelled.
#[test]
fn durable_nodes_restarted_from_their_disks_keep_every_invariant() {
    let seeds = env("SIM_SEEDS_DURABLE", 60);
    let reports = run_seeds(env("SIM_FROM", 0), seeds, short_durable);
    println!(
        "{seeds} seeds with data directories: {} tasks acknowledged, {} deliveries, {} duplicates, \
         {} lost with all their holders; {} crashes, {} restarts from disk",
        sum(&reports, |r| r.acknowledged as u64),
        sum(&reports, |r| r.deliveries),
        sum(&reports, |r| r.duplicates),
        sum(&reports, |r| r.lost_with_holders as u64),
        sum(&reports, |r| r.crashes),
        sum(&reports, |r| r.restarts_from_disk),
    );
    assert_all_ok(&reports);
    assert!(sum(&reports, |r| r.restarts_from_disk) >= seeds / 2);
    // A task counts as lost only when every node that held it crashed and
    // none came back from its disk (three in ten restarts come back as new
    // nodes, as if their disk had died); a copy on the disk of a node that
    // restarts from it is not lost meanwhile, and comes back with it.
}

#[test]
fn many_seeds_keep_every_invariant() {
    let seeds = env("SIM_SEEDS", 300);
    let from = env("SIM_FROM", 0);
    let reports = run_seeds(from, seeds, short);
    let acknowledged = sum(&reports, |r| r.acknowledged as u64);
    let lost = sum(&reports, |r| r.lost_with_holders as u64);
    let lost_replicated = sum(&reports, |r| r.lost_replicated as u64);
    let one_at_a_time = sum(&reports, |r| r.lost_replicated_one_at_a_time as u64);
    let longest = reports
        .iter()
        .map(|r| r.longest_leaderless)
        .max()
        .unwrap_or_default();
    println!(
        "{seeds} seeds: {acknowledged} tasks acknowledged, {} deliveries, {} duplicates, \
         {lost} lost with all their holders ({lost_replicated} of them acknowledged with two \
         copies or more, {one_at_a_time} of those while nodes died one at a time); \
         {} crashes ({} during enqueues, {} during deliveries), {} restarts at the same \
         address, {} peer messages readdressed to a successor; raft: {} misdirected, {} stale, \
         {} forged heartbeats, {} refused; longest leaderless {longest:.1?}",
        sum(&reports, |r| r.deliveries),
        sum(&reports, |r| r.duplicates),
        sum(&reports, |r| r.crashes),
        sum(&reports, |r| r.crashes_during_enqueue),
        sum(&reports, |r| r.crashes_during_delivery),
        sum(&reports, |r| r.restarts_same_address),
        sum(&reports, |r| r.readdressed),
        sum(&reports, |r| r.misdirected),
        sum(&reports, |r| r.stale_replays),
        sum(&reports, |r| r.forged_heartbeats),
        sum(&reports, |r| r.raft_refused),
    );
    assert_all_ok(&reports);
    // The runs did something: tasks flowed and every fault happened.
    assert!(acknowledged > seeds * 100, "too little traffic");
    if seeds >= 100 {
        for (what, n) in [
            ("crashes", sum(&reports, |r| r.crashes)),
            (
                "crashes during enqueues",
                sum(&reports, |r| r.crashes_during_enqueue),
            ),
            (
                "crashes during deliveries",
                sum(&reports, |r| r.crashes_during_delivery),
            ),
            (
                "restarts at the same address",
                sum(&reports, |r| r.restarts_same_address),
            ),
            ("messages to a successor", sum(&reports, |r| r.readdressed)),
            (
                "misdirected Raft messages",
                sum(&reports, |r| r.misdirected),
            ),
            ("stale Raft messages", sum(&reports, |r| r.stale_replays)),
            ("forged heartbeats", sum(&reports, |r| r.forged_heartbeats)),
            ("Raft messages refused", sum(&reports, |r| r.raft_refused)),
        ] {
            assert!(n > 0, "no {what} in {seeds} seeds");
        }
    }
}

/// In clusters of five, a second node may crash before the first is
/// healed (within `remove_after`, before re-replication), while a
/// majority lives: the cluster must keep a leader, shed both dead members
/// and keep every task that has a live holder. Replicated tasks lost with
/// both their holders are expected here, and counted.
#[test]
fn five_nodes_survive_crashes_in_a_row() {
    let seeds = env("SIM_SEEDS_5", 16);
    let from = env("SIM_FROM", 0);
    let reports = run_seeds(from, seeds, short_of_five);
    println!(
        "{seeds} seeds of five nodes: {} crashes, {} in a row; {} tasks lost with all their \
         holders, {} of them acknowledged with two copies or more ({} while nodes died one at \
         a time)",
        sum(&reports, |r| r.crashes),
        sum(&reports, |r| r.crashes_in_a_row),
        sum(&reports, |r| r.lost_with_holders as u64),
        sum(&reports, |r| r.lost_replicated as u64),
        sum(&reports, |r| r.lost_replicated_one_at_a_time as u64),
    );
    assert_all_ok(&reports);
    if seeds >= 10 {
        assert!(
            sum(&reports, |r| r.crashes_in_a_row) > 0,
            "no crash in a row"
        );
    }
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

/// Without the faults of issue 14 none of them strikes (their choices
/// come from a generator of their own, so such a run replays as it did
/// before they existed).
#[test]
fn classic_runs_draw_none_of_the_new_faults() {
    let mut c = short(12345);
    c.faults = Faults::CLASSIC;
    let r = run(c);
    assert!(r.ok(), "{}", describe(&r));
    assert_eq!(
        (
            r.restarts_same_address,
            r.misdirected + r.stale_replays + r.forged_heartbeats
        ),
        (0, 0)
    );
    assert_eq!(
        r.crashes_during_enqueue + r.crashes_during_delivery + r.crashes_in_a_row,
        0
    );
}

/// Seeds that once failed, and what they found.
#[test]
fn seeds_that_once_failed() {
    // A copy stored for a coordinator that then discarded it (the name
    // was taken elsewhere) answered a resend of its request as if it
    // were still there: the acknowledged task was held nowhere.
    // Fixed: such a copy answers only while it is held.
    // These ran before the faults of issue 14: they replay with the
    // faults they had.
    let classic = |mut c: SimConfig| {
        c.faults = Faults::CLASSIC;
        c
    };
    let r = run(classic(short(168)));
    assert!(r.ok(), "{}", describe(&r));
    // Two failures before the roster healed left no majority alive (the
    // restarted nodes are new members): no leader ever came back, the
    // survivor kept a quarter share of the limited queue's rate, and
    // tasks were undelivered at the end. Nodes without a data directory
    // cannot recover from that by themselves (issues 14 and 15); the
    // simulation's faults now wait for the cluster to heal.
    for seed in [5343, 5594] {
        let r = run(classic(SimConfig::new(seed)));
        assert!(r.ok(), "{}", describe(&r));
    }
    // raft-rs panicked inside the election: on a forged heartbeat
    // committing past the log (seed 1, at 4.7 s: "to_commit 9 is out of
    // range [last_index 4]"), and on a heartbeat for a node's previous
    // incarnation that reached its successor at the same address (seed
    // 18, at 11.1 s: "to_commit 4 is out of range [last_index 0]").
    // Fixed: the election steps only Raft messages for this member whose
    // indexes fit its log, and counts the others.
    for (seed, readdressed) in [(1, false), (18, true)] {
        let r = run(short(seed));
        assert!(r.ok(), "{}", describe(&r));
        assert!(r.raft_refused > 0, "{}", r.summary());
        assert!(!readdressed || r.readdressed > 0, "{}", r.summary());
    }
    // A lost `MsgSnapshot` left the leader waiting for it forever (the
    // election never reported snapshots): the new member never caught up,
    // no removal could commit, and a dead member stayed in the roster
    // (seeds 60, and 84 and 205 with the classic faults: "node 2, dead for 17.2 s, is still in the
    // roster"). Fixed: a snapshot sent is reported, so a lost one is sent
    // again when the follower refuses the next probe. (Other fixes have
    // since moved these runs off that path; the election's unit test
    // `a_lost_snapshot_is_sent_again` keeps the case itself.)
    // A hinted handoff sent `discard` to the silent holder at once; when
    // that holder had stored the copy and only its answer was lost, and
    // the new holder refused or did not answer, the task was acknowledged
    // with one copy and died with its coordinator (seeds 16, 52, 241:
    // "acknowledged task … is held nowhere, though node 4, which held it,
    // is alive"). Fixed: the silent holder is told to discard only once
    // the copies known to be stored reach the replication factor; else it
    // keeps its place, or stays as an extra holder.
    for seed in [16, 52, 60, 241] {
        let r = run(short(seed));
        assert!(r.ok(), "{}", describe(&r));
    }
    for seed in [84, 205] {
        let r = run(classic(short(seed)));
        assert!(r.ok(), "{}", describe(&r));
    }
}

/// The checks bite: tasks that vanish while their holders live are
/// reported.
#[test]
fn lost_tasks_are_caught() {
    let mut c = short(3);
    c.faults = Faults::CLASSIC;
    c.sabotage = Some(Sabotage::WipeStore(Duration::from_secs(10)));
    let r = run(c);
    assert!(
        r.violations.iter().any(|v| v.contains("is held nowhere")),
        "{}",
        describe(&r)
    );
}

/// The checks bite: a cluster whose majority lives but has no leader, or
/// keeps a dead member, is reported.
#[test]
fn a_cluster_without_a_leader_is_caught() {
    let mut c = short(3);
    c.faults = Faults::CLASSIC;
    c.sabotage = Some(Sabotage::SilenceRaft(Duration::from_secs(5)));
    let r = run(c);
    assert!(
        r.violations.iter().any(|v| v.contains("no leader since")),
        "{}",
        describe(&r)
    );
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("is still in the roster")),
        "{}",
        describe(&r)
    );
}
