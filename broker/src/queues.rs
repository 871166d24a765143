//! Per-queue settings and the state the scheduler keeps for each queue:
//! token bucket, concurrency, pause, name tombstones, live figures.
//! Owned by the scheduler thread, like the tasks.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use protocol::{QueueConfig, QueueConfigPatch, QueueStats, TaskState};
use uuid::Uuid;

use crate::retry::RetryPolicy;

/// Checks a patch and applies it to `config`.
/// A setting in seconds: above 0 (or 0 too, with `allow_zero`), at most
/// 30 days.
fn secs(name: &str, v: f64, allow_zero: bool) -> Result<f64, String> {
    if v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0)) && v <= 30.0 * 86400.0 {
        Ok(v)
    } else {
        Err(format!(
            "{name} must be a number of seconds{} (at most 30 days)",
            if allow_zero {
                ", 0 or more"
            } else {
                " above 0"
            }
        ))
    }
}

pub fn apply_patch(config: &mut QueueConfig, p: QueueConfigPatch) -> Result<(), String> {
    let mut c = config.clone();
    if let Some(v) = p.rate {
        if !v.is_finite() || v < 0.0 || (v > 0.0 && v < 0.001) || v > 1e9 {
            return Err(
                "rate must be 0 (unlimited) or between 0.001 and 1e9 dispatches per second".into(),
            );
        }
        c.rate = v;
    }
    if let Some(v) = p.burst {
        if v == 0 {
            return Err("burst must be at least 1".into());
        }
        c.burst = v;
    }
    if let Some(v) = p.max_concurrent {
        c.max_concurrent = v;
    }
    if let Some(v) = p.max_attempts {
        if v == 0 || v < -1 || v > u32::MAX as i64 {
            return Err("max_attempts must be -1 (unlimited) or at least 1".into());
        }
        c.max_attempts = v;
    }
    if let Some(v) = p.max_age {
        c.max_age = secs("max_age", v, true)?;
    }
    if let Some(v) = p.min_backoff {
        c.min_backoff = secs("min_backoff", v, false)?;
    }
    if let Some(v) = p.max_backoff {
        c.max_backoff = secs("max_backoff", v, false)?;
    }
    if let Some(v) = p.max_doublings {
        if v > 64 {
            return Err("max_doublings must be at most 64".into());
        }
        c.max_doublings = v;
    }
    if let Some(v) = p.timeout {
        if !(v.is_finite() && v > 0.0 && v <= crate::validate::MAX_TIMEOUT_SECS) {
            return Err(format!(
                "timeout must be above 0 and at most {} seconds",
                crate::validate::MAX_TIMEOUT_SECS
            ));
        }
        c.timeout = v;
    }
    if let Some(v) = p.dedup_window {
        c.dedup_window = secs("dedup_window", v, true)?;
    }
    if let Some(v) = p.retention {
        c.retention = secs("retention", v, true)?;
    }
    if let Some(v) = p.signing_secrets {
        for s in &v {
            if protocol::limits::decode_signing_secret(s).is_none() {
                return Err(protocol::limits::SIGNING_SECRET_RULE.into());
            }
        }
        c.signing_secrets = v;
    }
    if c.min_backoff > c.max_backoff {
        return Err("min_backoff must not exceed max_backoff".into());
    }
    *config = c;
    Ok(())
}

/// The retry policy a queue's settings describe.
pub fn retry_policy(c: &QueueConfig) -> RetryPolicy {
    RetryPolicy {
        min_backoff: Duration::from_secs_f64(c.min_backoff),
        max_backoff: Duration::from_secs_f64(c.max_backoff),
        max_doublings: c.max_doublings,
        max_attempts: u32::try_from(c.max_attempts).ok(),
        max_age: (c.max_age > 0.0).then(|| Duration::from_secs_f64(c.max_age)),
    }
}

/// A copy fit for replies: secrets replaced by `***`.
pub fn redacted(c: &QueueConfig) -> QueueConfig {
    let mut c = c.clone();
    for s in c.signing_secrets.iter_mut() {
        *s = "***".into();
    }
    c
}

/// Who holds a name (or idempotency key), and until when it stays taken
/// once that task is final.
#[derive(Debug, Clone)]
pub struct DedupEntry {
    pub id: Uuid,
    /// Set when the task became final or was deleted: unix µs.
    pub tombstone_until: Option<u64>,
}

/// Which namespace a dedup key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    Name,
    Idempotency,
}

/// Scheduler-side state of one queue.
pub struct Queue {
    pub config: QueueConfig,
    pub policy: RetryPolicy,
    pub paused: bool,
    tokens: f64,
    refilled_us: u64,
    /// Deliveries in flight (counted against `max_concurrent`).
    pub running: u32,
    /// Due tasks waiting for a token or a concurrency slot, oldest first.
    /// Entries may be stale (the task ran or went away): check on pop.
    pub ready: VecDeque<Uuid>,
    /// The wake-up timer set while tokens or slots are short.
    pub wake: Option<(u64, u64)>,
    /// A 429/503 answer holds the whole queue until then (unix µs).
    pub slow_until_us: u64,
    counts: HashMap<TaskState, u64>,
    /// Dispatches per second over the last minute: (second, count).
    dispatch_seconds: VecDeque<(u64, u32)>,
    pub keys: HashMap<(KeyKind, String), DedupEntry>,
    /// Members in the cluster: this node enforces 1/share of the queue's
    /// rate, burst and concurrency, so the limits hold for the cluster.
    pub share: u32,
    /// Creation order of the queue's tasks, for listing and purging.
    pub index: CreationIndex,
    /// What happened to the queue's tasks on this node since it was made
    /// (the `stats` answer; a queue forgotten when unused starts again
    /// from zero, which Prometheus reads as a counter reset).
    pub counters: Counters,
}

/// A queue's counters (`protocol::QueueCounters` without the gauges).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub enqueued: u64,
    pub succeeded: u64,
    pub failed_attempts: u64,
    pub dead_letters: u64,
    pub cancelled: u64,
    pub retried: u64,
}

/// A queue's tasks in creation order, as (created µs, id): a sorted vector,
/// 24 bytes a task. Tasks made here arrive in time order, so an insert is a
/// push, or a short shift among the last few entries when tasks share a
/// microsecond (a batch) and their random ids decide the order. Those that
/// arrive further out of order (copies from peers, a clock that stepped
/// back) wait in a small sorted set and are merged in when it grows past an
/// eighth of the vector, so no insert shifts the whole vector.
/// Removal only counts: stale entries (the task is gone) are skipped by
/// readers, who check the task table, and swept by the store once they
/// outnumber the live ones ([`CreationIndex::needs_sweep`]).
#[derive(Debug, Default)]
pub struct CreationIndex {
    entries: Vec<(u64, Uuid)>,
    late: BTreeSet<(u64, Uuid)>,
    stale: usize,
}

impl CreationIndex {
    /// Entries an insert may shift rather than put in the side set.
    const TAIL: usize = 1024;

    pub fn insert(&mut self, key: (u64, Uuid)) {
        match self.entries.last() {
            Some(last) if *last >= key => {
                let tail = self.entries.len().saturating_sub(Self::TAIL);
                if self.entries[tail] <= key {
                    if let Err(at) = self.entries[tail..].binary_search(&key) {
                        self.entries.insert(tail + at, key);
                    }
                } else if self.entries.binary_search(&key).is_err() {
                    self.late.insert(key);
                    if self.late.len() > 64 + self.entries.len() / 8 {
                        self.merge_late();
                    }
                }
            }
            _ => self.entries.push(key),
        }
    }

    /// Merges the side set into the vector: one linear pass over both.
    fn merge_late(&mut self) {
        if self.late.is_empty() {
            return;
        }
        let late = std::mem::take(&mut self.late);
        let mut merged = Vec::with_capacity(self.entries.len() + late.len());
        merged.extend(Merge {
            a: self.entries.iter().copied().peekable(),
            b: late.into_iter().peekable(),
        });
        merged.dedup();
        self.entries = merged;
    }

    /// Notes that a task left; its entry goes stale.
    pub fn removed(&mut self) {
        self.stale += 1;
    }

    pub fn needs_sweep(&self) -> bool {
        self.stale > 1024 && self.stale * 2 > self.entries.len() + self.late.len()
    }

    /// Keeps the entries `live` accepts.
    pub fn sweep(&mut self, mut live: impl FnMut(&(u64, Uuid)) -> bool) {
        self.merge_late();
        self.entries.retain(&mut live);
        self.stale = 0;
    }

    /// Entries after `start` (all with `None`), in order; may be stale.
    pub fn after(&self, start: Option<(u64, Uuid)>) -> impl Iterator<Item = (u64, Uuid)> + '_ {
        let (from, late) = match start {
            Some(k) => (
                self.entries.partition_point(|e| *e <= k),
                self.late
                    .range((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded)),
            ),
            None => (0, self.late.range(..)),
        };
        Merge {
            a: self.entries[from..].iter().copied().peekable(),
            b: late.copied().peekable(),
        }
    }
}

/// Two sorted sequences as one.
struct Merge<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<A, B> Iterator for Merge<A, B>
where
    A: Iterator<Item = (u64, Uuid)>,
    B: Iterator<Item = (u64, Uuid)>,
{
    type Item = (u64, Uuid);

    fn next(&mut self) -> Option<(u64, Uuid)> {
        match (self.a.peek(), self.b.peek()) {
            (Some(x), Some(y)) if y < x => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

impl Queue {
    pub fn new(config: QueueConfig, now_us: u64) -> Queue {
        Queue {
            policy: retry_policy(&config),
            tokens: config.burst as f64,
            config,
            paused: false,
            refilled_us: now_us,
            running: 0,
            ready: VecDeque::new(),
            wake: None,
            slow_until_us: 0,
            counts: HashMap::new(),
            dispatch_seconds: VecDeque::new(),
            keys: HashMap::new(),
            index: CreationIndex::default(),
            share: 1,
            counters: Counters::default(),
        }
    }

    pub fn set_config(&mut self, config: QueueConfig) {
        self.policy = retry_policy(&config);
        self.tokens = self.tokens.min(config.burst as f64);
        self.config = config;
    }

    /// Moves a task between state counters (`None` for arrival/removal).
    pub fn count(&mut self, from: Option<TaskState>, to: Option<TaskState>) {
        if let Some(f) = from {
            if let Some(n) = self.counts.get_mut(&f) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(t) = to {
            *self.counts.entry(t).or_insert(0) += 1;
        }
    }

    /// Nothing in it and nothing about it to remember: no task in any
    /// state, no name or key, not paused, no slow-down running, and the
    /// default settings. Such a queue is forgotten (and made anew, the
    /// same, by its next task).
    pub fn is_unused(&self, defaults: &QueueConfig, now_us: u64) -> bool {
        self.counts.values().all(|&n| n == 0)
            && self.running == 0
            && self.ready.is_empty()
            && self.wake.is_none()
            && self.keys.is_empty()
            && !self.paused
            && self.slow_until_us <= now_us
            && self.config == *defaults
    }

    /// Whether a concurrency slot is free.
    pub fn has_slot(&self) -> bool {
        let cap = self.config.max_concurrent;
        cap == 0 || self.running < (cap / self.share.max(1)).max(1)
    }

    /// Takes a dispatch token, or says when one will be there (unix µs).
    pub fn take_token(&mut self, now_us: u64) -> Result<(), u64> {
        if self.config.rate <= 0.0 {
            return Ok(());
        }
        let share = self.share.max(1) as f64;
        let rate = self.config.rate / share;
        let burst = (self.config.burst as f64 / share).max(1.0);
        let elapsed = now_us.saturating_sub(self.refilled_us) as f64 / 1e6;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled_us = now_us;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - self.tokens) / rate).min(86_400.0);
            Err(now_us + (wait * 1e6).ceil() as u64)
        }
    }

    /// Records one dispatch for the per-minute rate.
    pub fn record_dispatch(&mut self, now_us: u64) {
        let sec = now_us / 1_000_000;
        match self.dispatch_seconds.back_mut() {
            Some((s, n)) if *s == sec => *n += 1,
            _ => self.dispatch_seconds.push_back((sec, 1)),
        }
        while self
            .dispatch_seconds
            .front()
            .is_some_and(|(s, _)| *s + 60 <= sec)
        {
            self.dispatch_seconds.pop_front();
        }
    }

    pub fn stats(&self, now_us: u64, lag: f64) -> QueueStats {
        let sec = now_us / 1_000_000;
        let last_minute: u64 = self
            .dispatch_seconds
            .iter()
            .filter(|(s, _)| *s + 60 > sec)
            .map(|(_, n)| *n as u64)
            .sum();
        let n = |s| self.counts.get(&s).copied().unwrap_or(0);
        QueueStats {
            scheduled: n(TaskState::Scheduled),
            running: n(TaskState::Running),
            retrying: n(TaskState::Retrying),
            failed: n(TaskState::Failed),
            succeeded: n(TaskState::Succeeded),
            cancelled: n(TaskState::Cancelled),
            dispatches_per_second: last_minute as f64 / 60.0,
            lag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let mut q = Queue::new(
            QueueConfig {
                rate: 10.0,
                burst: 3,
                ..Default::default()
            },
            0,
        );
        for _ in 0..3 {
            assert!(q.take_token(0).is_ok());
        }
        let next = q.take_token(0).unwrap_err();
        assert_eq!(next, 100_000);
        assert!(q.take_token(100_000).is_ok());
        assert!(q.take_token(100_000).is_err());
    }

    #[test]
    fn patches_are_checked() {
        let mut c = QueueConfig::default();
        assert!(apply_patch(
            &mut c,
            QueueConfigPatch {
                burst: Some(0),
                ..Default::default()
            }
        )
        .is_err());
        assert!(apply_patch(
            &mut c,
            QueueConfigPatch {
                max_attempts: Some(0),
                ..Default::default()
            }
        )
        .is_err());
        assert!(apply_patch(
            &mut c,
            QueueConfigPatch {
                min_backoff: Some(10.0),
                max_backoff: Some(5.0),
                ..Default::default()
            }
        )
        .is_err());
        assert!(apply_patch(
            &mut c,
            QueueConfigPatch {
                signing_secrets: Some(vec!["whsec_!!".into()]),
                ..Default::default()
            }
        )
        .is_err());
        apply_patch(
            &mut c,
            QueueConfigPatch {
                rate: Some(20.0),
                max_attempts: Some(-1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.rate, 20.0);
        assert_eq!(retry_policy(&c).max_attempts, None);
    }

    #[test]
    fn creation_index_keeps_order_and_sweeps() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let times = |ix: &CreationIndex, start| ix.after(start).map(|e| e.0).collect::<Vec<u64>>();
        let mut ix = CreationIndex::default();
        ix.insert((10, ids[0]));
        ix.insert((30, ids[1]));
        ix.insert((20, ids[2])); // out of order: waits in the side set
        ix.insert((30, ids[1])); // already there
        ix.insert((40, ids[3]));
        ix.insert((20, ids[2])); // already there, in the side set
        assert_eq!(times(&ix, None), vec![10, 20, 30, 40]);
        assert_eq!(times(&ix, Some((20, ids[2]))), vec![30, 40]);
        assert_eq!(times(&ix, Some((10, ids[0]))), vec![20, 30, 40]);
        assert!(ix.after(Some((40, ids[3]))).next().is_none());
        ix.removed();
        assert!(!ix.needs_sweep());
        ix.sweep(|e| e.0 != 20);
        assert_eq!(times(&ix, None), vec![10, 30, 40]);
        // A batch's tasks share a microsecond: their ids order them, in
        // place, without the side set.
        let mut batch = CreationIndex::default();
        batch.insert((5, Uuid::new_v4()));
        let mut keys: Vec<(u64, Uuid)> = (0..500).map(|_| (7, Uuid::new_v4())).collect();
        for k in &keys {
            batch.insert(*k);
            batch.insert(*k); // a repeat is still one entry
        }
        assert!(batch.late.is_empty());
        keys.sort_unstable();
        let got: Vec<(u64, Uuid)> = batch.after(None).skip(1).collect();
        assert_eq!(got, keys);
        // Many late arrivals (copies from a peer, in random order) merge
        // in batches and come out sorted.
        let mut big = CreationIndex::default();
        big.insert((1_000_000, Uuid::new_v4()));
        let mut keys: Vec<(u64, Uuid)> = (0..3000u64)
            .map(|i| ((i * 7919) % 3001, Uuid::new_v4()))
            .collect();
        for k in &keys {
            big.insert(*k);
        }
        keys.push((1_000_000, Uuid::nil()));
        let got: Vec<u64> = big.after(None).map(|e| e.0).collect();
        let mut want: Vec<u64> = keys.iter().map(|k| k.0).collect();
        want.sort_unstable();
        assert_eq!(got, want);
        // Many removals make a sweep due.
        let mut big = CreationIndex::default();
        for i in 0..3000u64 {
            big.insert((i, Uuid::new_v4()));
        }
        for _ in 0..1400 {
            big.removed();
        }
        assert!(!big.needs_sweep());
        for _ in 0..200 {
            big.removed();
        }
        assert!(big.needs_sweep());
    }
}
