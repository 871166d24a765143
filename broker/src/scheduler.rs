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
use crate::journal::{DirDisk, Journal, SEGMENT_BYTES};
use crate::store::{Command, Event, Store};

/// Figures the scheduler thread shares with the I/O loop (for
/// heartbeats, `cluster_info` and `stats`); written only by the scheduler.
#[derive(Debug, Default)]
pub struct Figures {
    pub tasks: std::sync::atomic::AtomicU64,
    pub re_replicated: std::sync::atomic::AtomicU64,
    /// The journal: its size, and how long each batch's commit (write and
    /// `fdatasync`) took; `None` in memory.
    journal: std::sync::Mutex<Option<(u64, protocol::Histogram)>>,
}

impl Figures {
    pub fn journal_bytes(&self) -> Option<u64> {
        self.journal.lock().ok()?.as_ref().map(|(b, _)| *b)
    }

    pub fn journal_sync(&self) -> Option<protocol::Histogram> {
        self.journal.lock().ok()?.as_ref().map(|(_, h)| h.clone())
    }

    fn journal_committed(&self, bytes: u64, took: Option<Duration>) {
        if let Ok(mut j) = self.journal.lock() {
            let (b, h) =
                j.get_or_insert_with(|| (0, protocol::Histogram::new(protocol::LATENCY_BUCKETS)));
            *b = bytes;
            if let Some(t) = took {
                h.observe(t.as_secs_f64());
            }
        }
    }
}

/// Runs `store` on its own thread until [`Command::Shutdown`] or until
/// every sender is gone. Events go to `events`, with `bell` rung after each
/// batch. With a journal (the store then records its changes), each batch's
/// records are committed before its events go out: a reply, an
/// acknowledgement to a peer or a delivery leaves only once the change it
/// reports is on disk.
pub fn spawn(
    store: Store,
    journal: Option<(Journal<DirDisk>, DiskWatch)>,
    commands: Receiver<Command>,
    events: Sender<Event>,
    bell: Bell,
    figures: std::sync::Arc<Figures>,
) -> std::io::Result<thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let mut store = store;
            let mut disk = journal.map(|(j, w)| Durable::new(j, w));
            if let Some(d) = &disk {
                figures.journal_committed(d.journal.total_bytes(), None);
            }
            let mut out = Vec::new();
            loop {
                client::logging::test_fault_point("scheduler");
                let now = now_micros();
                store.fire_due(now, &mut out);
                if let Some(d) = &mut disk {
                    d.commit(&mut store, &figures);
                }
                flush(&mut out, &events, &bell);
                figures.tasks.store(store.len() as u64, Ordering::Relaxed);
                figures
                    .re_replicated
                    .store(store.stats.re_replicated, Ordering::Relaxed);
                let mut wait = store
                    .next_deadline()
                    .map(|d| Duration::from_micros(d.saturating_sub(now)))
                    .unwrap_or(Duration::from_secs(3600));
                if store.sweeping() {
                    // The sweep goes on between batches, however idle.
                    wait = wait.min(Duration::from_millis(1));
                }
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
                if let Some(d) = &mut disk {
                    d.commit(&mut store, &figures);
                }
                flush(&mut out, &events, &bell);
                if stop {
                    break;
                }
            }
            tracing::debug!(stats = ?store.stats, "scheduler stopped");
        })
}

/// The journal as the scheduler drives it: a commit per batch, the
/// sweeps that let old segments go, and the end of the process when the
/// disk fails.
struct Durable {
    journal: Journal<DirDisk>,
    watch: DiskWatch,
    /// When the free space was last looked at.
    watched: Option<std::time::Instant>,
    records: Vec<Vec<u8>>,
    /// The first segment of the sweep under way.
    sweep_from: Option<u64>,
}

/// Things a sweep writes again per batch, at least (it writes as many as
/// the batch wrote, when more, so it keeps pace with any load).
const SWEEP_STEP: usize = 512;

impl Durable {
    fn new(journal: Journal<DirDisk>, watch: DiskWatch) -> Durable {
        Durable {
            journal,
            watch,
            watched: None,
            records: Vec::new(),
            sweep_from: None,
        }
    }

    /// Appends and commits every change `store` made since the last call.
    /// A failure to write or sync ends the process: what the kernel holds
    /// is unknown after a failed `fdatasync` (`STORAGE.md`), and the
    /// replies of this batch must not go out.
    fn commit(&mut self, store: &mut Store, figures: &Figures) {
        self.watch_space(store);
        store.take_records(&mut self.records);
        if self.sweep_from.is_none() {
            let total = self.journal.total_bytes();
            let live = store.live_bytes_estimate();
            if total > (2 * live).max(live + 2 * SEGMENT_BYTES) {
                let from = self.journal.roll();
                tracing::info!(
                    journal_bytes = total,
                    live_estimate = live,
                    from_segment = from,
                    "sweeping the journal"
                );
                self.sweep_from = Some(from);
                store.start_sweep();
            }
        }
        let mut swept = false;
        if self.sweep_from.is_some() {
            let step = SWEEP_STEP.max(self.records.len());
            swept = store.sweep_step(step, &mut self.records);
        }
        if self.records.is_empty() && !swept {
            return;
        }
        for r in self.records.drain(..) {
            self.journal.append(&r);
        }
        let started = std::time::Instant::now();
        if let Err(err) = self.journal.commit() {
            fail(&err);
        }
        figures.journal_committed(self.journal.total_bytes(), Some(started.elapsed()));
        if swept {
            if let Some(from) = self.sweep_from.take() {
                // With `--fsync never` nothing synced the records written
                // again: they must be on disk before the old ones go.
                if self.journal.options().fsync == crate::journal::Fsync::Never {
                    if let Err(err) = self.journal.sync_current() {
                        fail(&err);
                    }
                }
                match self.journal.remove_below(from) {
                    Ok(freed) => tracing::info!(
                        freed_bytes = freed,
                        journal_bytes = self.journal.total_bytes(),
                        "journal swept"
                    ),
                    Err(err) => fail(&err),
                }
            }
        }
    }
}

/// Where the journal's disk space is watched, and the free space below
/// which new tasks are refused (`--min-free-disk`).
#[derive(Debug, Clone)]
pub struct DiskWatch {
    pub dir: std::path::PathBuf,
    pub min_free: u64,
}

/// How often the free space is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);

impl Durable {
    /// Below `min_free`, the store refuses new tasks (`busy`, naming the
    /// flag) and goes on delivering and recording what finishes, which
    /// the space kept free holds. A write that fails anyway (the disk
    /// filled faster than it was watched) ends the process.
    fn watch_space(&mut self, store: &mut Store) {
        let now = std::time::Instant::now();
        if self
            .watched
            .is_some_and(|t| now.duration_since(t) < WATCH_EVERY)
        {
            return;
        }
        self.watched = Some(now);
        match fs4::available_space(&self.watch.dir) {
            Ok(free) if free < self.watch.min_free => store.set_disk_low(Some(format!(
                "the data directory's disk has {} MiB free, less than --min-free-disk ({} MiB); nothing was stored: retry later",
                free >> 20,
                self.watch.min_free >> 20
            ))),
            Ok(_) => store.set_disk_low(None),
            Err(err) => tracing::warn!(error = %err, "cannot read the data directory's free space"),
        }
    }
}

/// Ends the process after a failed write or sync of the journal.
fn fail(err: &std::io::Error) -> ! {
    tracing::error!(error = %err, "cannot write the journal; stopping (a restart recovers what was committed)");
    eprintln!("miyamoto: cannot write the journal: {err}; stopping");
    std::process::exit(74) // EX_IOERR
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
