//! What the store writes to the journal, and how it starts again from
//! it (`STORAGE.md`, "What the store records").
//!
//! The store stays sans-IO: it turns its changes into record payloads
//! ([`Store::take_records`]) and takes records back ([`Store::restore`]);
//! the scheduler thread appends them to the journal and commits before it
//! lets the batch's replies out. A record is a state, not an operation: a
//! task's whole state after a batch changed it (`T`), its removal (`G`),
//! a name or key outliving its task (`K`), a remembered reply (`R`), a
//! queue's settings and pause (`Q`). Replaying them in order, the last
//! record of each thing wins, so replaying any suffix of the journal that
//! starts at a sweep's first segment gives the same state (the sweep
//! wrote every live thing again at or after it), which is what lets old
//! segments go.
//!
//! Which tasks changed is found by the task table: every mutable access
//! marks the task ([`table::TaskTable::get_mut`]), except the timer
//! bookkeeping's, which only moves what the record derives. So no change
//! can be missed by a path that forgets to mark it.

use serde::{Deserialize, Serialize};

use super::recent::SavedReply;
use super::*;

/// A task's whole state, as a `T` record holds it (MessagePack, fields in
/// order: compact, since every enqueue writes one).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(super) struct SavedTask {
    pub record: ReplicaRecord,
    /// When a finished task is forgotten (unix µs).
    pub fire_at_us: u64,
    pub response: Option<ByteBuf>,
    /// Until when its name and idempotency key stay taken after it
    /// finished.
    pub tombstone_until: Option<u64>,
}

/// A name or idempotency key that outlives its task.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct SavedKey {
    queue: String,
    idempotency: bool,
    key: String,
    id: u128,
    until_us: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct SavedQueue {
    name: String,
    config: QueueConfig,
    paused: bool,
}

const TASK: u8 = b'T';
const GONE: u8 = b'G';
const KEY: u8 = b'K';
const REPLY: u8 = b'R';
const QUEUE: u8 = b'Q';

/// A task that left: its id, queue and keys.
type Removed = (Uuid, Arc<String>, Vec<(KeyKind, String)>);

/// What the store keeps for the journal between two
/// [`Store::take_records`].
#[derive(Default)]
pub(super) struct Persist {
    /// Tasks removed, with their queue and keys (a key still taken by a
    /// tombstone is recorded on its own).
    removed: Vec<Removed>,
    /// Queues whose settings or pause changed.
    queues: Vec<String>,
    /// Queues changed through the API since their creation (restored
    /// ones included): only those have records, so a queue the API never
    /// touched follows the configuration file at every start.
    recorded_queues: HashSet<String>,
    /// Records made as changes happened (replies).
    records: Vec<Vec<u8>>,
    /// A sweep under way: what is still to be written again.
    sweep: Option<Sweep>,
    /// Mean bytes of a task record and of a reply record (for the live
    /// size's estimate).
    task_record_bytes: f64,
}

/// A pass writing every live thing again, so that the segments before
/// it started can go.
struct Sweep {
    tasks: Vec<Uuid>,
    keys: Vec<(String, KeyKind, String)>,
    queues: Vec<String>,
    /// Reply positions still to write: next, and end (exclusive).
    replies: (u32, u32),
}

/// What [`Store::restore`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Restored {
    pub tasks: usize,
    pub pending: usize,
    pub keys: usize,
    pub replies: usize,
    pub queues: usize,
}

fn encode<T: Serialize>(kind: u8, value: &T, named: bool) -> Vec<u8> {
    let mut out = vec![kind];
    let r = if named {
        rmp_serde::encode::write_named(&mut out, value)
    } else {
        rmp_serde::encode::write(&mut out, value)
    };
    if let Err(err) = r {
        // Only a type serde cannot express fails here; none of ours.
        tracing::error!(error = %err, "cannot encode a journal record");
    }
    out
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| format!("a {what} record cannot be read: {e}"))
}

impl Store {
    /// Records every change from now on, for [`Store::take_records`].
    pub fn record_changes(&mut self) {
        self.tasks.track_changes();
        self.persist.get_or_insert_with(Persist::default);
    }

    /// The journal records of every change since the last call, in the
    /// order they must be replayed, appended to `out`. Every change the
    /// store made is covered: the caller commits them before it lets the
    /// replies and messages of those changes out.
    pub fn take_records(&mut self, out: &mut Vec<Vec<u8>>) {
        let Some(p) = &mut self.persist else { return };
        out.append(&mut p.records);
        for name in std::mem::take(&mut p.queues) {
            if let Some(q) = self.queues.get(&name) {
                out.push(queue_record(&name, q));
            }
        }
        let mut changed = self.tasks.take_changed();
        changed.sort_unstable();
        changed.dedup();
        let removed = std::mem::take(&mut p.removed);
        for id in changed {
            match self.tasks.get(&id) {
                Some(t) => {
                    let rec = self.task_record(t);
                    if let Some(p) = &mut self.persist {
                        p.task_record_bytes = p.task_record_bytes * 0.99 + rec.len() as f64 * 0.01;
                    }
                    out.push(rec);
                }
                None => {
                    let mut r = vec![GONE];
                    r.extend_from_slice(&id.as_u128().to_le_bytes());
                    out.push(r);
                }
            }
        }
        for (id, queue, keys) in removed {
            for (kind, key) in keys {
                if let Some(r) = self.key_record(&queue, kind, &key, Some(id)) {
                    out.push(r);
                }
            }
        }
    }

    /// A task's `T` record.
    fn task_record(&self, t: &Task) -> Vec<u8> {
        let r = replication::record_of_task(t);
        let tombstone_until = t
            .state
            .is_final()
            .then(|| {
                let q = self.queues.get(&*t.spec.queue)?;
                task_keys(&t.spec)
                    .iter()
                    .filter_map(|k| q.keys.get(k).filter(|e| e.id == t.id))
                    .filter_map(|e| e.tombstone_until)
                    .max()
            })
            .flatten();
        let saved = SavedTask {
            record: r,
            fire_at_us: t.fire_at_us,
            response: t.last_response().map(ByteBuf::from),
            tombstone_until,
        };
        encode(TASK, &saved, false)
    }

    /// The `K` record of a key that a tombstone keeps after its task left
    /// (of task `of`, when given), if it does.
    fn key_record(
        &self,
        queue: &str,
        kind: KeyKind,
        key: &str,
        of: Option<Uuid>,
    ) -> Option<Vec<u8>> {
        let k = (kind, key.to_string());
        let e = self.queues.get(queue)?.keys.get(&k)?;
        if of.is_some_and(|id| id != e.id) || self.tasks.get(&e.id).is_some() {
            return None;
        }
        let saved = SavedKey {
            queue: queue.to_string(),
            idempotency: kind == KeyKind::Idempotency,
            key: key.to_string(),
            id: e.id.as_u128(),
            until_us: e.tombstone_until?,
        };
        Some(encode(KEY, &saved, true))
    }

    /// Notes a task leaving, for its tombstones' records.
    pub(super) fn persist_removed(&mut self, t: &Task) {
        if let Some(p) = &mut self.persist {
            let keys = task_keys(&t.spec);
            if !keys.is_empty() {
                p.removed.push((t.id, t.spec.queue.clone(), keys));
            }
        }
    }

    /// Notes a queue's settings or pause changing.
    pub(super) fn persist_queue(&mut self, name: &str) {
        if let Some(p) = &mut self.persist {
            p.queues.push(name.to_string());
            p.recorded_queues.insert(name.to_string());
        }
    }

    /// Records the reply remembered under key `k` (just inserted or
    /// changed).
    pub(super) fn persist_reply(&mut self, k: u64) {
        if self.persist.is_none() {
            return;
        }
        if let Some(saved) = self.recent.export_key(k) {
            let r = encode(REPLY, &saved, true);
            if let Some(p) = &mut self.persist {
                p.records.push(r);
            }
        }
    }

    /// A rough count of the bytes a sweep would write now: what the
    /// journal must hold at least.
    pub fn live_bytes_estimate(&self) -> u64 {
        let per_task = self
            .persist
            .as_ref()
            .map_or(0.0, |p| p.task_record_bytes)
            .max(200.0);
        (self.tasks.len() as f64 * per_task) as u64 + self.recent.len() as u64 * 60
    }

    /// Starts a sweep: every live task, key, reply and queue is written
    /// again by the next [`Store::sweep_step`]s.
    pub fn start_sweep(&mut self) {
        if self.persist.is_none() {
            return;
        }
        let tasks: Vec<Uuid> = self.tasks.iter().map(|(id, _)| id).collect();
        let mut keys = Vec::new();
        let mut queues = Vec::new();
        let recorded = self.persist.as_ref().map(|p| &p.recorded_queues);
        for (name, q) in &self.queues {
            if recorded.is_some_and(|r| r.contains(name)) {
                queues.push(name.clone());
            }
            for ((kind, key), e) in &q.keys {
                if e.tombstone_until.is_some() && self.tasks.get(&e.id).is_none() {
                    keys.push((name.clone(), *kind, key.clone()));
                }
            }
        }
        let (head, len) = self.recent.positions();
        if let Some(p) = &mut self.persist {
            p.sweep = Some(Sweep {
                tasks,
                keys,
                queues,
                replies: (head, head.wrapping_add(len)),
            });
        }
    }

    pub fn sweeping(&self) -> bool {
        self.persist.as_ref().is_some_and(|p| p.sweep.is_some())
    }

    /// Writes up to `max` live things again (into `out`); true once the
    /// sweep is over (its records then only need committing).
    pub fn sweep_step(&mut self, max: usize, out: &mut Vec<Vec<u8>>) -> bool {
        let Some(mut sweep) = self.persist.as_mut().and_then(|p| p.sweep.take()) else {
            return true;
        };
        let mut n = 0;
        while n < max {
            if let Some(name) = sweep.queues.pop() {
                if let Some(q) = self.queues.get(&name) {
                    out.push(queue_record(&name, q));
                    n += 1;
                }
            } else if let Some((queue, kind, key)) = sweep.keys.pop() {
                if let Some(r) = self.key_record(&queue, kind, &key, None) {
                    out.push(r);
                    n += 1;
                }
            } else if sweep.replies.0 != sweep.replies.1 {
                let pos = sweep.replies.0;
                sweep.replies.0 = pos.wrapping_add(1);
                if let Some(saved) = self.recent.export_at(pos) {
                    out.push(encode(REPLY, &saved, true));
                    n += 1;
                }
            } else if let Some(id) = sweep.tasks.pop() {
                if let Some(t) = self.tasks.get(&id) {
                    out.push(self.task_record(t));
                    n += 1;
                }
            } else {
                return true;
            }
        }
        if let Some(p) = &mut self.persist {
            p.sweep = Some(sweep);
        }
        false
    }

    /// Starts the store again from a journal's records, replayed in
    /// order: the last record of each task, key, reply and queue wins.
    /// Pending tasks fire at their times (at once when passed); a task
    /// that was being delivered is tried again, its attempt counted;
    /// finished tasks stay for their retention and dead letters for good;
    /// names stay taken for their tombstones; replies answer resends for
    /// their window. Call before any command, after
    /// [`Command::Identity`] when the node has one.
    pub fn restore<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a [u8]>,
        now_us: u64,
    ) -> Result<Restored, String> {
        for rec in records {
            self.restore_one(rec, now_us)?;
        }
        Ok(self.finish_restore())
    }

    /// Replays one record (see [`Store::restore`]); the journal hands them
    /// over one at a time, so a start holds one segment, never the whole
    /// journal, beside the store. Each record is applied as it comes: a
    /// later one of the same task replaces the task.
    pub fn restore_one(&mut self, rec: &[u8], now_us: u64) -> Result<(), String> {
        self.restored_records += 1;
        let at = |e: String| format!("journal record {}: {e}", self.restored_records);
        let (&kind, body) = rec
            .split_first()
            .ok_or_else(|| at("an empty record".into()))?;
        match kind {
            TASK => {
                let t: SavedTask = decode(body, "task").map_err(at)?;
                let id = Uuid::parse_str(&t.record.id)
                    .map_err(|e| at(format!("a task id cannot be read: {e}")))?;
                if self.tasks.get(&id).is_some() {
                    self.forget_restored(id);
                }
                self.restore_task(t, now_us);
            }
            GONE => {
                let id: [u8; 16] = body
                    .try_into()
                    .map_err(|_| at("a removal record of the wrong size".into()))?;
                let id = Uuid::from_u128(u128::from_le_bytes(id));
                if self.tasks.get(&id).is_some() {
                    self.forget_restored(id);
                }
            }
            KEY => {
                let k: SavedKey = decode(body, "name").map_err(at)?;
                if k.until_us > now_us {
                    let kind = if k.idempotency {
                        KeyKind::Idempotency
                    } else {
                        KeyKind::Name
                    };
                    self.queue_mut(&k.queue, now_us).keys.insert(
                        (kind, k.key.clone()),
                        DedupEntry {
                            id: Uuid::from_u128(k.id),
                            tombstone_until: Some(k.until_us),
                        },
                    );
                    self.add_timer(
                        k.until_us,
                        Timer::Tombstone(Box::new((k.queue, kind, k.key))),
                    );
                }
            }
            REPLY => {
                let r: SavedReply = decode(body, "reply").map_err(at)?;
                if r.expires_us > now_us {
                    self.recent.import(r, REQUEST_DEDUP_MAX);
                }
            }
            QUEUE => {
                let q: SavedQueue = decode(body, "queue").map_err(at)?;
                let queue = self.queue_mut(&q.name, now_us);
                queue.set_config(q.config);
                queue.paused = q.paused;
                if let Some(p) = &mut self.persist {
                    p.recorded_queues.insert(q.name);
                }
            }
            other => {
                return Err(at(format!(
                    "unknown record kind {other:#04x} (written by a newer Miyamoto?)"
                )))
            }
        }
        Ok(())
    }

    /// A task replayed earlier that a later record replaces or removes:
    /// gone without a trace (its names are freed; a later `K` record
    /// takes them again).
    fn forget_restored(&mut self, id: Uuid) {
        self.free_keys(id);
        self.remove_task(id, &mut Vec::new());
        self.awaiting.remove(&id);
    }

    /// Ends a replay: what it found. Nothing replayed is a change to
    /// record again.
    pub fn finish_restore(&mut self) -> Restored {
        self.tasks.take_changed();
        if let Some(p) = &mut self.persist {
            p.queues.clear();
            p.removed.clear();
        }
        let awaiting = &self.awaiting;
        self.unconfirmed.retain(|id| awaiting.contains(id));
        self.unconfirmed.sort_unstable();
        self.unconfirmed.dedup();
        let pending = self
            .tasks
            .iter()
            .filter(|(_, t)| !t.state.is_final())
            .count();
        let keys = self
            .queues
            .values()
            .map(|q| {
                q.keys
                    .values()
                    .filter(|e| e.tombstone_until.is_some())
                    .count()
            })
            .sum();
        // Due tasks fire from their timers at the first `fire_due`.
        Restored {
            tasks: self.tasks.len(),
            pending,
            keys,
            replies: self.recent.len(),
            queues: self.persist.as_ref().map_or(0, |p| p.recorded_queues.len()),
        }
    }

    fn restore_task(&mut self, saved: SavedTask, now_us: u64) {
        let SavedTask {
            record: r,
            fire_at_us,
            response,
            tombstone_until,
        } = saved;
        let Ok(id) = Uuid::parse_str(&r.id) else {
            return;
        };
        let mut spec = replication::spec_of(&r);
        self.intern_peer(&mut spec);
        let keys = task_keys(&spec);
        self.insert_task(id, spec, r.is_callback, r.created_us, r.holders.clone());
        self.stats.enqueued -= 1;
        if let Some(t) = self.tasks.get_mut(&id) {
            t.load_progress(&r);
            let grown = t.set_last_response(response.map(|b| b.into_vec()));
            self.task_bytes = self.task_bytes.saturating_add_signed(grown);
        }
        let mut out = Vec::new();
        // A copy other nodes hold too may have been delivered, cancelled
        // or moved while this node was down: it waits for their word.
        let shared = r.holders.iter().any(|h| *h != self.cluster.me) && !r.state.is_final();
        if shared {
            self.unconfirmed.push(id);
            self.awaiting.insert(id);
        }
        match r.state {
            TaskState::Scheduled => self.retime(id),
            // A delivery under way when the node stopped: its outcome is
            // unknown, so it is tried again (at least once), counted.
            TaskState::Retrying | TaskState::Running => {
                self.transition(id, TaskState::Retrying, &mut out);
                self.retime(id);
            }
            state => {
                self.transition(id, state, &mut out);
                if state == TaskState::Failed {
                    self.clear_timer(id);
                } else {
                    self.set_task_timer(id, fire_at_us);
                }
                if let Some(until) = tombstone_until.filter(|u| *u > now_us) {
                    let queue = r.queue.clone();
                    for key in keys {
                        if let Some(e) = self
                            .queues
                            .get_mut(&queue)
                            .and_then(|q| q.keys.get_mut(&key))
                            .filter(|e| e.id == id)
                        {
                            e.tombstone_until = Some(until);
                            self.add_timer(
                                until,
                                Timer::Tombstone(Box::new((queue.clone(), key.0, key.1))),
                            );
                        }
                    }
                }
            }
        }
        if shared {
            // The timer `insert_task` set waits too.
            self.clear_timer(id);
        }
    }
}

impl Store {
    /// Asks the other live holders of every recovered task what became of
    /// it (a `get`), once this node is in a roster. Until all answered or
    /// [`PEER_TIMEOUT`] passed, the task does not fire; a holder that has
    /// it finished finishes it here too, one delivering it pushes its time
    /// past that delivery's deadline.
    pub(super) fn confirm_recovered(&mut self, now_us: u64) {
        for id in std::mem::take(&mut self.unconfirmed) {
            self.ask_holders(id, 1, now_us);
        }
    }

    /// Sends the `sends`-th question about recovered task `id` to its other
    /// live holders (or confirms it when there are none).
    pub(super) fn ask_holders(&mut self, id: Uuid, sends: u32, now_us: u64) {
        let me = self.cluster.me;
        let Some(t) = self.tasks.get(&id) else {
            self.awaiting.remove(&id);
            return;
        };
        let others: Vec<u64> = t
            .holders
            .iter()
            .copied()
            .filter(|h| *h != me && self.cluster.members.binary_search(h).is_ok())
            .collect();
        let command = ClientCommand::Get {
            queue: t.spec.queue.to_string(),
            id: id.to_string(),
        };
        if others.is_empty() {
            self.confirmed(id, now_us);
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        let msg = PeerMessage::Request {
            req,
            from: me,
            command,
        };
        let outstanding = self.send_to_others(&others, msg);
        let timer = self.add_timer(
            now_us + PEER_TIMEOUT.as_micros() as u64,
            Timer::Pending(req),
        );
        self.pending.insert(
            req,
            replication::Pending::Confirm(replication::PendingConfirm {
                id,
                outstanding,
                answered: false,
                sends,
                timer,
            }),
        );
    }

    /// What another holder says of a recovered task.
    pub(super) fn holder_says(
        &mut self,
        id: Uuid,
        body: ReplyBody,
        now_us: u64,
        out: &mut Vec<Event>,
    ) {
        let ReplyBody::Task { task } = body else {
            return; // not found there: nothing to learn
        };
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        if t.state.is_final() {
            return;
        }
        if task.state.is_final() {
            tracing::debug!(task = %id, state = ?task.state, "a recovered task finished elsewhere meanwhile");
            let queue = t.spec.queue.to_string();
            t.merge_attempts(
                task.attempts,
                task.executions,
                task.last_status,
                task.last_error,
            );
            let response = task
                .detail
                .and_then(|d| d.last_response)
                .map(|b| b.into_vec());
            let kept = t.set_last_response(response);
            self.task_bytes = self.task_bytes.saturating_add_signed(kept);
            self.awaiting.remove(&id);
            self.transition(id, task.state, out);
            self.finish(id, now_us, out);
            self.pump(&queue, now_us, out);
        } else if !task.holders.is_empty() && !task.holders.contains(&self.cluster.me) {
            // This node was removed while it was down and the task moved
            // on: its current holders have it, so this copy goes.
            tracing::debug!(task = %id, holders = ?task.holders, "a recovered task has other holders now; dropping this copy");
            self.awaiting.remove(&id);
            self.drop_copy(id, now_us, out);
        } else if task.state == TaskState::Running {
            let deadline =
                now_us + secs_to_micros(t.spec.timeout()) + CLAIM_GRACE.as_micros() as u64;
            t.due_us = t.due_us.max(deadline);
        } else {
            // The holder has it pending, and was up while this node was
            // down: this copy goes after it (replica i now fires
            // `holders` offsets from now, plus its own), so the holder's
            // `claimed` reaches this node first. Its subscribers may not
            // have reconnected to this node yet to hear this copy's.
            t.attempts = t.attempts.max(task.attempts);
            let offset = self.config.replica_offset.as_micros() as u64;
            let behind = now_us + t.holders.len() as u64 * offset;
            t.due_us = t.due_us.max(behind);
        }
    }

    /// A recovered task's holders answered (or did not in time): it fires
    /// at its time from now on. A time that passed while the node was down
    /// becomes now, so the replicas keep their order (replica i fires
    /// i × offset after replica 0, whose `claimed` it hears first) instead
    /// of all firing at once.
    pub(super) fn confirmed(&mut self, id: Uuid, now_us: u64) {
        if self.awaiting.remove(&id) {
            if let Some(t) = self.tasks.get_mut(&id) {
                t.due_us = t.due_us.max(now_us);
            }
            self.retime(id);
        }
    }
}

fn queue_record(name: &str, q: &Queue) -> Vec<u8> {
    let saved = SavedQueue {
        name: name.to_string(),
        config: q.config.clone(),
        paused: q.paused,
    };
    encode(QUEUE, &saved, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, MemDisk, Options};

    const T0: u64 = 1_800_000_000_000_000;
    const S: u64 = 1_000_000;

    /// A store that records its changes into a journal on a memory disk,
    /// committing after every command, as the scheduler does.
    struct Node {
        store: Store,
        journal: Journal<MemDisk>,
        out: Vec<Event>,
        n: u64,
    }

    fn config() -> StoreConfig {
        StoreConfig {
            queue_defaults: QueueConfig {
                min_backoff: 5.0,
                retention: 600.0,
                dedup_window: 3600.0,
                ..QueueConfig::default()
            },
            ..Default::default()
        }
    }

    impl Node {
        fn start(disk: MemDisk, now: u64) -> (Node, Restored) {
            let options = Options {
                segment_bytes: 4096,
                ..Options::default()
            };
            let (journal, rec) = Journal::open(disk, options).expect("open");
            let mut store = Store::new(config(), now, TaskIds::seeded(now));
            store.record_changes();
            let found = store
                .restore(rec.records.iter().map(|r| r.as_slice()), now)
                .expect("restore");
            let node = Node {
                store,
                journal,
                out: Vec::new(),
                n: 0,
            };
            (node, found)
        }

        fn commit(&mut self) {
            let mut recs = Vec::new();
            self.store.take_records(&mut recs);
            for r in &recs {
                self.journal.append(r);
            }
            self.journal.commit().expect("commit");
        }

        fn request(&mut self, request_id: &str, command: ClientCommand, now: u64) -> ReplyBody {
            self.out.clear();
            self.store.apply(
                Command::Request {
                    identity: b"c".to_vec(),
                    request: ClientRequest {
                        request_id: request_id.into(),
                        command,
                    },
                },
                now,
                &mut self.out,
            );
            self.commit();
            self.out
                .iter()
                .find_map(|e| match e {
                    Event::Reply { reply, .. } => Some(reply.body.clone()),
                    _ => None,
                })
                .expect("a reply")
        }

        fn enqueue(&mut self, request_id: &str, spec: TaskSpec, now: u64) -> ReplyBody {
            self.n += 1;
            self.request(
                request_id,
                ClientCommand::Enqueue {
                    queue: "q".into(),
                    task: spec,
                    wait: None,
                },
                now,
            )
        }

        fn fire(&mut self, now: u64) -> Vec<(u64, String)> {
            self.out.clear();
            self.store.fire_due(now, &mut self.out);
            self.commit();
            self.out
                .iter()
                .filter_map(|e| match e {
                    Event::Dispatch { delivery, task, .. } => Some((*delivery, task.id.clone())),
                    _ => None,
                })
                .collect()
        }

        fn settle(&mut self, delivery: u64, id: &str, outcome: Outcome, now: u64) {
            self.out.clear();
            self.store.apply(
                Command::Result(DeliveryResult {
                    delivery,
                    task_id: id.into(),
                    outcome,
                    status: Some(if outcome == Outcome::Success {
                        200
                    } else {
                        500
                    }),
                    reason: None,
                    retry_after: None,
                    responded: true,
                    body: Some(ByteBuf::from(b"the answer".to_vec())),
                    no_retry: false,
                }),
                now,
                &mut self.out,
            );
            self.commit();
        }

        /// Every task's view, by id.
        fn tasks(&self) -> BTreeMap<String, TaskInfo> {
            self.store
                .tasks
                .iter()
                .map(|(id, _)| (id.to_string(), self.store.info(id, true)))
                .collect()
        }
    }

    fn task(countdown: f64, name: Option<&str>) -> TaskSpec {
        TaskSpec {
            url: "http://localhost/w".into(),
            countdown: Some(countdown),
            name: name.map(str::to_string),
            body: Some(ByteBuf::from(b"payload".to_vec())),
            ..Default::default()
        }
    }

    fn id_of(r: &ReplyBody) -> String {
        match r {
            ReplyBody::Enqueued { id, .. } => id.clone(),
            other => panic!("{other:?}"),
        }
    }

    /// A node with one task of each kind: pending, named and succeeded,
    /// retrying after a failure, running, and a paused, configured queue.
    fn busy_node() -> (Node, [String; 4]) {
        let (mut n, _) = Node::start(MemDisk::default(), T0);
        let pending = id_of(&n.enqueue("r-pending", task(100.0, None), T0));
        let done = id_of(&n.enqueue("r-done", task(0.0, Some("once")), T0));
        let failing = id_of(&n.enqueue("r-fail", task(1.0, None), T0));
        let running = id_of(&n.enqueue("r-run", task(2.0, None), T0));
        let fired = n.fire(T0);
        assert_eq!(fired.len(), 1);
        n.settle(fired[0].0, &done, Outcome::Success, T0 + 1000);
        let fired = n.fire(T0 + S);
        assert_eq!(fired[0].1, failing);
        n.settle(fired[0].0, &failing, Outcome::Failure, T0 + S + 1000);
        let fired = n.fire(T0 + 2 * S);
        assert_eq!(fired[0].1, running);
        let patch = QueueConfigPatch {
            rate: Some(7.0),
            ..Default::default()
        };
        n.request(
            "r-conf",
            ClientCommand::ConfigureQueue {
                queue: "q".into(),
                config: patch,
            },
            T0 + 2 * S,
        );
        (n, [pending, done, failing, running])
    }

    #[test]
    fn a_restarted_store_has_every_task_name_reply_and_setting() {
        let (n, [pending, done, failing, running]) = busy_node();
        let before = n.tasks();
        let mut disk = n.journal.into_disk();
        disk.crash();
        let later = T0 + 3 * S;
        let (mut m, found) = Node::start(disk, later);
        assert_eq!((found.tasks, found.pending), (4, 3));
        let after = m.tasks();
        for id in [&pending, &done, &failing] {
            assert_eq!(after[id], before[id], "task {id}");
        }
        // The delivery under way is tried again, its attempt counted.
        assert_eq!(after[&running].state, TaskState::Retrying);
        assert_eq!(after[&running].attempts, 1);
        assert_eq!(
            after[&done]
                .detail
                .as_ref()
                .and_then(|d| d.last_response.clone()),
            Some(ByteBuf::from(b"the answer".to_vec()))
        );
        // A resend of an answered request gets its first answer.
        let again = m.enqueue("r-pending", task(100.0, None), later);
        assert_eq!(id_of(&again), pending);
        // The finished task's name stays taken.
        match m.enqueue("r-new", task(0.0, Some("once")), later) {
            ReplyBody::Duplicate { id, .. } => assert_eq!(id, done),
            other => panic!("{other:?}"),
        }
        assert_eq!(m.store.queue_info("q", later).config.rate, 7.0);
        // The running task fires at once, the retry at its time.
        let fired: Vec<String> = m.fire(later).into_iter().map(|f| f.1).collect();
        assert_eq!(fired, vec![running.clone()]);
        let retry_at = (after[&failing].eta * 1e6) as u64;
        assert!(m.fire(retry_at - 1).is_empty());
        let fired: Vec<String> = m.fire(retry_at).into_iter().map(|f| f.1).collect();
        assert_eq!(fired, vec![failing]);
    }

    #[test]
    fn removals_and_tombstones_survive_a_restart() {
        let (mut n, [_, done, ..]) = busy_node();
        // Retention (ten minutes) passes, the task goes; its name's
        // tombstone (the dedup window, an hour, from its end) holds it.
        n.fire(T0 + 601 * S);
        assert!(n
            .store
            .task_state(&Uuid::parse_str(&done).unwrap())
            .is_none());
        let later = T0 + 602 * S;
        let (mut m, found) = Node::start(n.journal.into_disk(), later);
        assert_eq!(found.keys, 1);
        assert!(m
            .store
            .task_state(&Uuid::parse_str(&done).unwrap())
            .is_none());
        match m.enqueue("r-new", task(0.0, Some("once")), later) {
            ReplyBody::Duplicate { id, tombstoned, .. } => {
                assert_eq!(id, done);
                assert!(tombstoned);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_sweep_lets_the_old_segments_go_and_loses_nothing() {
        let (mut n, _) = busy_node();
        for i in 0..50 {
            n.enqueue(&format!("more-{i}"), task(50.0, None), T0 + 2 * S);
        }
        let before = n.tasks();
        let first = n.journal.roll();
        n.store.start_sweep();
        let mut recs = Vec::new();
        let mut steps = 0;
        while !n.store.sweep_step(7, &mut recs) {
            steps += 1;
            // Changes go on between the steps.
            for r in recs.drain(..) {
                n.journal.append(&r);
            }
            n.commit();
        }
        assert!(steps > 5, "{steps}");
        for r in recs.drain(..) {
            n.journal.append(&r);
        }
        n.commit();
        // A crash at every step of the removal (none, some, all of the
        // old segments gone, oldest first) recovers the same state.
        let disk = n.journal.disk().clone();
        let mut old: Vec<String> = crate::journal::Disk::list(&disk)
            .expect("list")
            .into_iter()
            .filter(|f| f.ends_with(".journal"))
            .filter(|f| u64::from_str_radix(&f[..16], 16).is_ok_and(|k| k < first))
            .collect();
        old.sort();
        assert!(old.len() >= 2, "{old:?}");
        for k in 0..=old.len() {
            let mut d = disk.clone();
            for f in &old[..k] {
                crate::journal::Disk::remove(&mut d, f).expect("remove");
            }
            d.crash();
            let (m, found) = Node::start(d, T0 + 3 * S);
            assert_eq!(found.tasks, before.len(), "after removing {k} old segments");
            let after = m.tasks();
            for (id, info) in &before {
                if info.state != TaskState::Running {
                    assert_eq!(&after[id], info, "after removing {k} old segments");
                }
            }
            assert_eq!(m.store.queue_info("q", T0 + 3 * S).config.rate, 7.0);
            assert!(found.replies >= 50);
        }
        assert!(n.journal.remove_below(first).expect("remove") > 0);
    }
}
