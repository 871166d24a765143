//! The scheduler thread: it owns the node's [`Store`] and feeds it, from
//! a crossbeam channel filled by the I/O loop, the commands and the wall
//! clock's time; the store's events go back through another channel and
//! a doorbell. The store itself is sans-IO ([`crate::store`]); this file
//! is its only contact with the clock and with threads.

use std::thread;
use std::time::Duration;

use client::sockets::Bell;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::clock::now_micros;
use crate::store::{Command, Event, Store, StoreConfig, TaskIds};

/// Figures the scheduler thread shares with the I/O loop (for
/// heartbeats and `cluster_info`); written only by the scheduler.
#[derive(Debug, Default)]
pub struct Figures {
    pub tasks: std::sync::atomic::AtomicU64,
    pub re_replicated: std::sync::atomic::AtomicU64,
}

/// Runs a [`Store`] on its own thread until [`Command::Shutdown`] or until
/// every sender is gone. Events go to `events`, with `bell` rung after each
/// batch.
pub fn spawn(
    config: StoreConfig,
    commands: Receiver<Command>,
    events: Sender<Event>,
    bell: Bell,
    figures: std::sync::Arc<Figures>,
) -> std::io::Result<thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let mut store = Store::new(config, now_micros(), TaskIds::Random);
            let mut out = Vec::new();
            loop {
                client::logging::test_fault_point("scheduler");
                let now = now_micros();
                store.fire_due(now, &mut out);
                flush(&mut out, &events, &bell);
                figures.tasks.store(store.len() as u64, Ordering::Relaxed);
                figures
                    .re_replicated
                    .store(store.stats.re_replicated, Ordering::Relaxed);
                let wait = store
                    .next_deadline()
                    .map(|d| Duration::from_micros(d.saturating_sub(now)))
                    .unwrap_or(Duration::from_secs(3600));
                let first = match commands.recv_timeout(wait) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                // Take whatever else is queued so one doorbell covers a burst.
                let mut stop = false;
                let mut next = Some(first);
                let mut n = 0;
                while let Some(cmd) = next {
                    if matches!(cmd, Command::Shutdown) {
                        stop = true;
                        break;
                    }
                    store.apply(cmd, now_micros(), &mut out);
                    n += 1;
                    next = if n < 1024 {
                        commands.try_recv().ok()
                    } else {
                        None
                    };
                }
                flush(&mut out, &events, &bell);
                if stop {
                    break;
                }
            }
            tracing::debug!(stats = ?store.stats, "scheduler stopped");
        })
}

fn flush(out: &mut Vec<Event>, events: &Sender<Event>, bell: &Bell) {
    if out.is_empty() {
        return;
    }
    for e in out.drain(..) {
        if events.send(e).is_err() {
            return;
        }
    }
    bell.ring();
}
