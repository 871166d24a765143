//! Timer-structure benchmark: enqueue + cancel throughput of the
//! scheduler's store with an empty store (the baseline) and with a million
//! pending tasks, side by side in one run. Prints the median of several
//! rounds for each and their ratio.
//!
//! `cargo bench -p miyamoto-broker --bench store`

use std::time::{Duration, Instant};

use broker::store::{Command, Event, Store, StoreConfig, TaskIds};
use protocol::{ClientCommand, ClientRequest, ReplyBody, TaskSpec};

const PRELOAD: usize = 1_000_000;
const OPS: usize = 100_000;
const ROUNDS: usize = 5;

fn enqueue(store: &mut Store, n: u64, countdown: f64, now: u64, out: &mut Vec<Event>) -> String {
    store.apply(
        Command::Request {
            identity: Vec::new(),
            request: ClientRequest {
                request_id: format!("r{n}"),
                command: ClientCommand::Enqueue {
                    queue: "default".into(),
                    task: TaskSpec {
                        url: "http://127.0.0.1:9/w".into(),
                        countdown: Some(countdown),
                        ..Default::default()
                    },
                    wait: None,
                },
            },
        },
        now,
        out,
    );
    match out.pop() {
        Some(Event::Reply { reply, .. }) => match reply.body {
            ReplyBody::Enqueued { id, .. } => id,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// Enqueues and then cancels OPS tasks on a store holding `pending` tasks;
/// returns operations per second.
fn round(pending: usize) -> f64 {
    let now = 1_800_000_000_000_000u64;
    let mut store = Store::new(StoreConfig::default(), now, TaskIds::Random);
    let mut out = Vec::new();
    for i in 0..pending {
        // Spread over a day so the timer map is genuinely large.
        enqueue(&mut store, i as u64, (i % 86_400) as f64, now, &mut out);
    }
    let start = Instant::now();
    let mut ids = Vec::with_capacity(OPS);
    for i in 0..OPS {
        let n = (pending + i) as u64;
        ids.push(enqueue(
            &mut store,
            n,
            3600.0 + (i % 1000) as f64,
            now,
            &mut out,
        ));
    }
    for (i, id) in ids.into_iter().enumerate() {
        store.apply(
            Command::Request {
                identity: Vec::new(),
                request: ClientRequest {
                    request_id: format!("c{i}"),
                    command: ClientCommand::Cancel {
                        queue: "default".into(),
                        id,
                    },
                },
            },
            now,
            &mut out,
        );
        out.clear();
    }
    let elapsed = start.elapsed();
    assert_eq!(store.len(), pending + OPS);
    (2 * OPS) as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut empty = Vec::new();
    let mut full = Vec::new();
    // Alternate the candidates so drift affects both alike.
    for r in 0..ROUNDS {
        empty.push(round(0));
        full.push(round(PRELOAD));
        eprintln!(
            "round {}: empty {:.0} ops/s, 1M pending {:.0} ops/s",
            r + 1,
            empty[r],
            full[r]
        );
    }
    let (e, f) = (median(empty.clone()), median(full.clone()));
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.0}–{hi:.0}")
    };
    println!("store enqueue+cancel, {OPS} of each, median of {ROUNDS} rounds");
    println!(
        "  empty store       : {e:>10.0} ops/s  (range {})",
        range(&empty)
    );
    println!(
        "  {PRELOAD} pending : {f:>10.0} ops/s  (range {})",
        range(&full)
    );
    println!("  ratio (1M / empty): {:.2}", f / e);
    let _ = Duration::ZERO;
}
