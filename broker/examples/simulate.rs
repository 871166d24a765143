//! Runs the cluster simulation (`broker::sim`): one seed, to replay it,
//! or many, to soak.
//!
//! ```sh
//! cargo run -p miyamoto-broker --example simulate -- --seed 42           # replay seed 42
//! cargo run -p miyamoto-broker --example simulate -- --seed 42 --trace   # with every fault
//! cargo run -p miyamoto-broker --example simulate -- --seed 42 --trace --watch 6cbf  # and task 6cbf…
//! cargo run --release -p miyamoto-broker --example simulate -- --seeds 10000 --from 1000
//! cargo run -p miyamoto-broker --example simulate -- --seed 42 --nodes 5 --faulty-secs 20 --calm-secs 15
//! cargo run -p miyamoto-broker --example simulate -- --seed 42 --faults none  # issue 13's faults only
//! ```
//!
//! `--faults` takes `same-address`, `raft` and `kills`, comma-separated
//! (`all` by default, `none`, or `--classic`, for the network's faults,
//! partitions and random crashes only). A failing seed prints the exact
//! command that replays it, these settings included.
//!
//! Exits 1 when a seed breaks an invariant (a panic inside the run counts
//! as one), after printing its report and the command that replays it.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use broker::sim::{self, Faults, SimConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed: Option<u64> = None;
    let mut seeds: u64 = 1;
    let mut from: u64 = 0;
    let mut trace = false;
    let mut faulty: Option<u64> = None;
    let mut calm: Option<u64> = None;
    let mut watch: Option<String> = None;
    let mut faults = Faults::ALL;
    let mut nodes: Option<u64> = None;
    let mut workers: Option<u64> = None;
    let mut producers: Option<u64> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--seed" => seed = value(),
            "--seeds" => seeds = value().unwrap_or(1),
            "--from" => from = value().unwrap_or(0),
            "--faulty-secs" => faulty = value(),
            "--calm-secs" => calm = value(),
            "--trace" => trace = true,
            "--nodes" => nodes = value(),
            "--workers" => workers = value(),
            "--producers" => producers = value(),
            "--classic" => faults = Faults::CLASSIC,
            "--faults" => match it.next().and_then(|v| Faults::parse(v)) {
                Some(f) => faults = f,
                None => {
                    eprintln!("--faults takes same-address,raft,kills, all or none");
                    return ExitCode::from(2);
                }
            },
            "--watch" => watch = it.next().cloned(),
            other => {
                eprintln!(
                    "unknown argument {other:?}; use --seed N [--trace] | --seeds N [--from S] [--faulty-secs T] [--calm-secs T] [--watch TASK_ID_PREFIX] [--nodes N] [--workers N] [--producers N] [--faults LIST | --classic]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let list: Vec<u64> = match seed {
        Some(s) => vec![s],
        None => (from..from + seeds).collect(),
    };
    let started = Instant::now();
    let mut failed = 0;
    for s in &list {
        let mut config = SimConfig::new(*s);
        config.trace = trace || watch.is_some();
        config.watch = watch.clone();
        config.faults = faults;
        if let Some(n) = nodes {
            config.nodes = n as usize;
        }
        if let Some(n) = workers {
            config.workers = n as usize;
        }
        if let Some(n) = producers {
            config.producers = n as usize;
        }
        if let Some(t) = faulty {
            config.faulty = Duration::from_secs(t);
        }
        if let Some(t) = calm {
            config.calm = Duration::from_secs(t);
        }
        let report = sim::run(config);
        // A trace may be long and piped into `head`: stop quietly when the
        // reader has gone.
        let mut stdout = std::io::stdout().lock();
        for line in &report.trace {
            if writeln!(stdout, "{line}").is_err() {
                return ExitCode::SUCCESS;
            }
        }
        drop(stdout);
        if list.len() == 1 || !report.ok() {
            println!("{}", report.summary());
        }
        if !report.ok() {
            failed += 1;
            for v in &report.violations {
                println!("  violation: {v}");
            }
            println!("  replay: {}", report.replay_command());
        }
    }
    println!(
        "{} seeds, {} failed, in {:.1?}",
        list.len(),
        failed,
        started.elapsed()
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
