//! A worker that connects out to a broker (it can sit behind a NAT) and
//! pulls tasks whose URL is `zmq://POOL`.
//!
//! ```text
//! miyamoto standalone &
//! cargo run --example pull_worker -- tcp://127.0.0.1:7001 example
//! miyamoto enqueue zmq://example foo=bar
//! ```

use std::time::Duration;

use client::Worker;
use protocol::Outcome;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args.next().unwrap_or_else(|| "tcp://127.0.0.1:7001".into());
    let pool = args.next().unwrap_or_else(|| "example".into());

    // Up to 4 tasks in flight; heartbeats and re-registration are handled
    // inside `next`, which must be called at least once a second.
    let mut worker = Worker::connect(&broker, &[&pool], 4)?;
    println!("serving pool {pool} from {broker}");
    loop {
        let Some(job) = worker.next(Duration::from_secs(1))? else {
            continue;
        };
        let t = &job.task;
        println!(
            "task {} (attempt {}), params {:?}",
            t.id,
            t.retry_count + 1,
            t.params
        );
        // Deduplicate by t.id if side effects must happen once: delivery
        // is at-least-once.
        let outcome = if t.params.iter().any(|(k, _)| k == "fail") {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        worker.report(&job, outcome, None)?;
    }
}
