//! The task store: every task of this node, its queues and its timers.
//! Every change to a task's state happens here, in [`Store::apply`] and
//! [`Store::fire_due`].
//!
//! [`Store`] is sans-IO: commands, the time and a source of task ids in,
//! events out. It reads no clock and draws no random number of its own,
//! so a run can be replayed exactly from its inputs (the tests and the
//! cluster simulation do). The thread that feeds it from the I/O loop is
//! [`crate::scheduler`]; no other thread touches task state.
//!
//! Layout, one concern a file:
//! * [`admit`] — admitting and routing requests: request ids and their
//!   deduplication, queue names, validation, where a request goes.
//! * [`lifecycle`] — the task lifecycle; [`Store::transition`] is the only
//!   writer of a task's state and of the per-queue counters (where the
//!   journal will attach).
//! * [`timers`] — task timers (a min-heap with lazy deletion) and the
//!   other timers; [`Store::fire_due`].
//! * [`replication`] — placement over the roster, copies to the other
//!   holders, the events that keep replicas in step, re-replication.
//! * [`views`] — every conversion of a task or queue into a reply.
//! * [`recent`] — replies remembered to deduplicate resent requests.
//! * [`table`] — the compact task table.
//!
//! Tasks are kept compact (`validate::ValidTask`, [`table`]), so a million
//! pending tasks take under 300 bytes each (`BENCHMARKS.md`). A task whose
//! timer fires joins its queue's ready line; the queue hands it to the
//! dispatcher when its token bucket, concurrency cap, pause and 429/503
//! slow-down allow.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use protocol::{
    AttemptResult, ClientCommand, ClientReply, ClientRequest, DeliveredTask, DeliveryResult,
    ErrorCode, Outcome, QueueConfig, QueueConfigPatch, QueueInfo, ReplyBody, TaskDetail, TaskInfo,
    TaskSpec, TaskState, HTTP_POOL,
};
use serde_bytes::ByteBuf;
use uuid::Uuid;

use crate::clock::{micros_to_secs, secs_to_micros};
use crate::queues::{self, DedupEntry, KeyKind, Queue};
use crate::validate::{validate_known, ValidTask};
use protocol::limits::{
    MAX_BATCH_TASKS as MAX_BATCH, MAX_REQUEST_ID_BYTES, MAX_RESPONSE_BYTES, MAX_WAIT_SECS,
};
use protocol::{EventBody, PeerMessage, ReplicaRecord, StoreOutcome};
use timers::Timer;
use views::waiter_reply;

/// How long a request id is remembered for deduplication.
pub const REQUEST_DEDUP: Duration = Duration::from_secs(600);
/// At most this many request ids are remembered.
const REQUEST_DEDUP_MAX: usize = 1_000_000;
/// Longest slow-down a 429/503 imposes on its queue.
const MAX_QUEUE_SLOWDOWN: Duration = Duration::from_secs(60);

/// What the I/O loop asks of the scheduler.
#[derive(Debug)]
// Commands are moved through a channel once; boxing would add an
// allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// A client request; the reply goes back to `identity`.
    Request {
        identity: Vec<u8>,
        request: ClientRequest,
    },
    /// A worker's verdict on a delivery the dispatcher knew.
    Result(DeliveryResult),
    /// A delivery that will get no verdict (worker lost, deadline passed).
    Lost {
        delivery: u64,
        task_id: String,
        reason: String,
    },
    /// The roster changed: this node's id, every member, the replication
    /// factor.
    Roster {
        me: u64,
        members: Vec<u64>,
        replicas: u32,
    },
    /// This node's member id, before any roster names it: a copy a peer
    /// sends before this node has applied the roster that admits it is
    /// answered under this id.
    Identity(u64),
    /// This node was started to join a cluster and is not a member yet
    /// (true), or is one now (false): until then it refuses client
    /// requests with `unavailable`, so they go to a member instead of
    /// being stored here alone.
    Joining(bool),
    /// Members not heard from lately ([`crate::membership::SUSPECT_AFTER`]):
    /// new tasks are placed on the next members in their place.
    Suspects(Vec<u64>),
    /// A peer's message (store, discard, request, their answers).
    Peer(protocol::PeerMessage),
    /// A cluster event published by a peer.
    PeerEvent(protocol::EventBody),
    Shutdown,
}

/// What the scheduler tells the I/O loop.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Reply {
        identity: Vec<u8>,
        reply: ClientReply,
    },
    /// Hand `task` to a worker of `pool`.
    Dispatch {
        pool: String,
        delivery: u64,
        timeout: f64,
        task: DeliveredTask,
    },
    /// The delivery's task was cancelled; drop it if not sent yet.
    Revoke { delivery: u64 },
    /// Send to a peer over the peer mesh.
    ToPeer { to: u64, msg: protocol::PeerMessage },
    /// Publish to every peer on the events port.
    Publish(protocol::EventBody),
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub node_id: String,
    /// Settings of queues created on first use.
    pub queue_defaults: QueueConfig,
    /// Queues configured at start (from the config file).
    pub queues: Vec<(String, QueueConfig)>,
    /// Seconds between replicas' fire times (replica i fires at eta + i × offset).
    pub replica_offset: Duration,
    /// What the node may hold (see `LIMITS.md`).
    pub limits: StoreLimits,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            node_id: "node".into(),
            queue_defaults: QueueConfig::default(),
            queues: Vec::new(),
            replica_offset: Duration::from_secs(5),
            limits: StoreLimits::default(),
        }
    }
}

/// The bounds of what a node holds. Past one, a client's enqueue (and
/// its first use of a queue) is answered `busy`; what is held already
/// is kept and delivered. Copies from peers are always taken: they were
/// acknowledged, or are about to be, by another node's admission.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreLimits {
    /// Memory for tasks, by [`Store::task_bytes`]'s count, in bytes.
    pub max_task_bytes: u64,
    /// Tasks held, in every state.
    pub max_tasks: usize,
    /// Queues known.
    pub max_queues: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_task_bytes: default_task_bytes(),
            max_tasks: 10_000_000,
            max_queues: 10_000,
        }
    }
}

/// A quarter of the machine's memory, or 1 GiB when it cannot be read.
pub fn default_task_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb.saturating_mul(1024));
    total.map_or(1 << 30, |b| b / 4)
}

/// What a task costs beyond its own fields' heap bytes: the task itself,
/// its slot in the table, its timer and its place in its queue's index,
/// rounded up (`BENCHMARKS.md` measures under 300 bytes for a pending
/// task).
const TASK_OVERHEAD_BYTES: u64 = 320;

/// How often queues left with nothing are looked for.
const QUEUE_SWEEP_EVERY_US: u64 = 60_000_000;

/// Counters for operators and tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub enqueued: u64,
    pub dispatched: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub cancelled: u64,
    pub duplicate_requests: u64,
    pub stale_results: u64,
    /// Task copies sent to restore the replication factor.
    pub re_replicated: u64,
    /// Copies handed to the next member because a holder was silent.
    pub handed_off: u64,
    /// Enqueues answered `busy` (a limit reached).
    pub busy: u64,
}

struct Task {
    id: Uuid,
    spec: ValidTask,
    created_us: u64,
    replica: u32,
    state: TaskState,
    /// This replica's next fire time, or when a finished task expires.
    fire_at_us: u64,
    /// A timer is set for `fire_at_us` (an entry in `task_timers`).
    timed: bool,
    attempts: u32,
    executions: u32,
    last_status: Option<u16>,
    /// Attempts' state: error, response, first attempt, delivery.
    run: Option<Box<Run>>,
    /// In its queue's ready line (due, waiting for a token or a slot).
    in_ready: bool,
    /// A callback report: gets no callbacks of its own.
    is_callback: bool,
    /// When replica 0 fires next (unix µs); this replica adds its offset.
    due_us: u64,
    /// The nodes holding the task, in replica order (empty: this node only).
    holders: Box<[u64]>,
}

/// What a task gathers once attempts start (boxed: a pending task has
/// none of it, and a million pending tasks should not pay for it).
#[derive(Default)]
struct Run {
    error: Option<String>,
    response: Option<Vec<u8>>,
    first_attempt_us: Option<u64>,
    /// The delivery under way while `Running`.
    delivery: Option<u64>,
}

impl Task {
    fn last_error(&self) -> Option<String> {
        self.run.as_ref().and_then(|r| r.error.clone())
    }

    /// What the task counts against the memory budget: fixed for its
    /// life but for the answer it keeps, whose changes the callers of
    /// [`Task::set_last_response`] add to `Store::task_bytes`.
    fn footprint(&self) -> u64 {
        TASK_OVERHEAD_BYTES
            + self.spec.heap_bytes() as u64
            + protocol::limits::MAX_ERROR_BYTES as u64
            + self.last_response_ref().map_or(0, |r| r.len() as u64)
    }

    fn last_response(&self) -> Option<Vec<u8>> {
        self.last_response_ref().cloned()
    }

    fn last_response_ref(&self) -> Option<&Vec<u8>> {
        self.run.as_ref().and_then(|r| r.response.as_ref())
    }

    fn first_attempt_us(&self) -> Option<u64> {
        self.run.as_ref().and_then(|r| r.first_attempt_us)
    }

    fn delivery(&self) -> Option<u64> {
        self.run.as_ref().and_then(|r| r.delivery)
    }

    fn set_last_error(&mut self, mut error: Option<String>) {
        if let Some(e) = &mut error {
            protocol::limits::truncate_utf8(e, protocol::limits::MAX_ERROR_BYTES);
        }
        let clear = error.is_none();
        self.update_run(clear, |r| r.error = error);
    }

    /// Keeps `response`; returns the change in bytes kept, for the
    /// memory budget.
    fn set_last_response(&mut self, response: Option<Vec<u8>>) -> i64 {
        let before = self.last_response_ref().map_or(0, |r| r.len() as i64);
        let after = response.as_ref().map_or(0, |r| r.len() as i64);
        let clear = response.is_none();
        self.update_run(clear, |r| r.response = response);
        after - before
    }

    fn set_first_attempt_us(&mut self, at: Option<u64>) {
        self.update_run(at.is_none(), |r| r.first_attempt_us = at);
    }

    fn set_delivery(&mut self, delivery: Option<u64>) {
        self.update_run(delivery.is_none(), |r| r.delivery = delivery);
    }

    /// Takes a record's progress: due time, attempt counts, last answer,
    /// first attempt (a peer's copy being stored, or a journal record).
    fn load_progress(&mut self, r: &ReplicaRecord) {
        self.due_us = r.due_us;
        self.attempts = r.attempts;
        self.executions = r.executions;
        self.last_status = r.last_status;
        self.set_last_error(r.last_error.clone());
        self.set_first_attempt_us(r.first_attempt_us);
    }

    /// Takes a peer's attempt counts (the larger ones) and last answer.
    fn merge_attempts(
        &mut self,
        attempts: u32,
        executions: u32,
        last_status: Option<u16>,
        last_error: Option<String>,
    ) {
        self.attempts = self.attempts.max(attempts);
        self.executions = self.executions.max(executions);
        self.last_status = last_status;
        self.set_last_error(last_error);
    }

    /// Changes the run state, dropping its box when it becomes empty; a
    /// field cleared (`clear`) on a task without one allocates nothing.
    fn update_run(&mut self, clear: bool, f: impl FnOnce(&mut Run)) {
        if clear && self.run.is_none() {
            return;
        }
        let run = self.run.get_or_insert_with(Box::default);
        f(run);
        if run.error.is_none()
            && run.response.is_none()
            && run.first_attempt_us.is_none()
            && run.delivery.is_none()
        {
            self.run = None;
        }
    }
}

/// An enqueue holding its reply until the first attempt finishes.
struct Waiter {
    identity: Vec<u8>,
    request_id: String,
    queue: String,
    eta: f64,
    /// Copies stored, repeated in the held reply.
    replicas: u32,
    timer: (u64, u64),
}

/// The outcome of one settled attempt, as `settle` receives it.
struct Verdict {
    outcome: Outcome,
    status: Option<u16>,
    reason: Option<String>,
    retry_after: Option<f64>,
    responded: bool,
    body: Option<Vec<u8>>,
    no_retry: bool,
}

/// Every task of this node, its queues and its timers.
pub struct Store {
    config: StoreConfig,
    /// Where new task ids come from (an input, so runs replay).
    ids: TaskIds,
    /// Every change of a task's state since the last
    /// [`Store::take_changes`], when observed (the simulation's view; the
    /// journal will attach at the same place).
    changes: Option<Vec<TaskChange>>,
    tasks: table::TaskTable,
    queues: HashMap<String, Queue>,
    /// Task timers (fire a pending task, or forget a finished one): a
    /// min-heap of (fire time µs, task). An entry is live while its task
    /// is `timed` for that time; moved or cleared timers leave stale
    /// entries that are skipped when they come up, and swept when they
    /// outnumber the tasks. A heap stores 24 bytes per timer in one array,
    /// and inserting a random time costs O(1) on average.
    task_timers: BinaryHeap<Reverse<(u64, Uuid)>>,
    /// Every other timer, keyed by (fire time µs, sequence).
    timers: BTreeMap<(u64, u64), Timer>,
    seq: u64,
    next_delivery: u64,
    recent: recent::Recent,
    waiters: HashMap<Uuid, Vec<Waiter>>,
    cluster: replication::ClusterView,
    pending: HashMap<u64, replication::Pending>,
    /// The request ids of the enqueues and batches in `pending`.
    pending_ids: HashSet<String>,
    /// Refusing client requests until admitted ([`Command::Joining`]).
    joining: bool,
    /// Events produced by helpers that have no `out` at hand; appended to
    /// `out` at the end of every `apply` and `fire_due`.
    outbox: Vec<Event>,
    next_req: u64,
    /// Queue names and URLs shared by the tasks that use them. Every URL
    /// here passed validation, in its normalized form.
    queue_names: Interner,
    urls: Interner,
    /// Σ footprint of the tasks held (see [`StoreLimits`]).
    task_bytes: u64,
    /// When queues left with nothing are next looked for (unix µs).
    queue_sweep_at_us: u64,
    /// What the journal still has to be given ([`Store::record_changes`]).
    persist: Option<persist::Persist>,
    /// Tasks recovered from the journal that other nodes hold too: asked
    /// about once this node is in a roster (`persist::confirm_recovered`).
    unconfirmed: Vec<Uuid>,
    /// Recovered tasks whose other holders are being asked: they fire
    /// only once answered (or after [`PEER_TIMEOUT`]).
    awaiting: HashSet<Uuid>,
    /// Why the data directory's disk takes no new tasks, when it is low
    /// ([`Store::set_disk_low`]).
    disk_low: Option<String>,
    /// Journal records replayed by [`Store::restore_one`].
    restored_records: u64,
    pub stats: Stats,
    /// From a task's fire time to the start of its delivery (`stats`).
    lateness: protocol::Histogram,
}

/// Shared strings: the first task with a queue name or URL allocates it,
/// the next ones share it. Strings no task uses any more are dropped when
/// the set has doubled since the last sweep.
#[derive(Default)]
struct Interner {
    set: std::collections::HashSet<std::sync::Arc<String>>,
    sweep_at: usize,
}

impl Interner {
    fn contains(&self, s: &String) -> bool {
        self.set.contains(s)
    }

    fn intern(&mut self, s: &std::sync::Arc<String>) -> std::sync::Arc<String> {
        if let Some(shared) = self.set.get(&**s) {
            return shared.clone();
        }
        if self.set.len() >= self.sweep_at {
            self.set.retain(|s| std::sync::Arc::strong_count(s) > 1);
            self.sweep_at = (self.set.len() * 2).max(1024);
        }
        self.set.insert(s.clone());
        s.clone()
    }
}

/// One change of a task's state, as [`Store::change`] made it: `None` when
/// the task left the store.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskChange {
    pub id: Uuid,
    pub queue: Arc<String>,
    pub state: Option<TaskState>,
}

/// Where a store's task ids come from. Production draws random (v4) ids;
/// tests and the simulation draw them from a seed, so a run replays
/// exactly. Seeded ids are v4-shaped too (random bits from SplitMix64),
/// so nothing downstream can tell them apart.
#[derive(Debug, Clone)]
pub enum TaskIds {
    Random,
    Seeded(u64),
}

impl TaskIds {
    pub fn seeded(seed: u64) -> TaskIds {
        TaskIds::Seeded(seed)
    }

    /// The next task id.
    pub fn next_id(&mut self) -> Uuid {
        match self {
            TaskIds::Random => Uuid::new_v4(),
            TaskIds::Seeded(state) => {
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&splitmix64(state).to_le_bytes());
                bytes[8..].copy_from_slice(&splitmix64(state).to_le_bytes());
                uuid::Builder::from_random_bytes(bytes).into_uuid()
            }
        }
    }
}

/// One step of SplitMix64 (Steele, Lea and Flood): a fast generator
/// whose every state gives a well-mixed output; enough for ids that only
/// need to be distinct and spread over the hash table.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Store {
    /// A store starting at `now_us` (unix µs), drawing task ids from `ids`.
    pub fn new(config: StoreConfig, now_us: u64, ids: TaskIds) -> Self {
        let mut queues = HashMap::new();
        for (name, c) in &config.queues {
            queues.insert(name.clone(), Queue::new(c.clone(), now_us));
        }
        Store {
            config,
            ids,
            changes: None,
            tasks: table::TaskTable::default(),
            queues,
            task_timers: BinaryHeap::new(),
            timers: BTreeMap::new(),
            seq: 0,
            next_delivery: 1,
            recent: recent::Recent::default(),
            waiters: HashMap::new(),
            cluster: replication::ClusterView::default(),
            pending: HashMap::new(),
            pending_ids: HashSet::new(),
            joining: false,
            outbox: Vec::new(),
            next_req: 1,
            queue_names: Interner::default(),
            urls: Interner::default(),
            task_bytes: 0,
            queue_sweep_at_us: now_us + QUEUE_SWEEP_EVERY_US,
            persist: None,
            unconfirmed: Vec::new(),
            awaiting: HashSet::new(),
            disk_low: None,
            restored_records: 0,
            stats: Stats::default(),
            lateness: protocol::Histogram::new(protocol::LATENCY_BUCKETS),
        }
    }

    /// What the tasks held count against the memory budget, in bytes.
    pub fn task_bytes(&self) -> u64 {
        self.task_bytes
    }

    /// The data directory's disk is low (`Some(reason)`): clients'
    /// enqueues are answered `busy` with the reason, while what is held
    /// goes on being delivered and recorded; or it has room again.
    pub fn set_disk_low(&mut self, reason: Option<String>) {
        if reason.is_some() != self.disk_low.is_some() {
            match &reason {
                Some(r) => tracing::warn!(reason = %r, "refusing new tasks"),
                None => {
                    tracing::info!("the data directory's disk has room again: taking new tasks")
                }
            }
        }
        self.disk_low = reason;
    }

    /// Queues known.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Why a client's enqueue of `new_tasks` tasks to `queue` cannot be
    /// taken now (a `busy` answer), or `None`.
    pub(super) fn over_limits(&self, queue: &str, new_tasks: usize) -> Option<ReplyBody> {
        let l = &self.config.limits;
        let reason = if let Some(why) = &self.disk_low {
            why.clone()
        } else if self.task_bytes >= l.max_task_bytes {
            format!(
                "this node's memory budget for tasks is spent ({} of {} bytes, --max-pending-bytes); nothing was stored: retry later",
                self.task_bytes, l.max_task_bytes
            )
        } else if self.tasks.len().saturating_add(new_tasks) > l.max_tasks {
            format!(
                "this node holds {} tasks, and may hold {} (--max-tasks); nothing was stored: retry later",
                self.tasks.len(),
                l.max_tasks
            )
        } else if !self.queues.contains_key(queue) && self.queues.len() >= l.max_queues {
            format!(
                "this node has {} queues, the most it may have (--max-queues); queues left empty are forgotten after a minute or two: retry later",
                self.queues.len()
            )
        } else {
            return None;
        };
        Some(error(ErrorCode::Busy, reason))
    }

    /// Forgets the queues left with nothing: no task, no name or key
    /// remembered, not paused, the default settings, and not configured
    /// at start. Runs every [`QUEUE_SWEEP_EVERY_US`].
    pub(super) fn sweep_queues(&mut self, now_us: u64) {
        if now_us < self.queue_sweep_at_us {
            return;
        }
        self.queue_sweep_at_us = now_us + QUEUE_SWEEP_EVERY_US;
        let (defaults, configured) = (&self.config.queue_defaults, &self.config.queues);
        self.queues.retain(|name, q| {
            !q.is_unused(defaults, now_us) || configured.iter().any(|(n, _)| n == name)
        });
    }

    /// Records every change of a task's state from now on, for
    /// [`Store::take_changes`].
    pub fn observe_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    /// The changes recorded since the last call (see
    /// [`Store::observe_changes`]).
    pub fn take_changes(&mut self) -> Vec<TaskChange> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// A task's state, if this node holds it.
    pub fn task_state(&self, id: &Uuid) -> Option<TaskState> {
        self.tasks.get(id).map(|t| t.state)
    }

    /// A task's state and timers in one line, for diagnostics (the
    /// simulation's reports).
    pub fn describe_task(&self, id: &Uuid) -> Option<String> {
        let t = self.tasks.get(id)?;
        Some(format!(
            "{:?} in {}, replica {} of holders {:?}, due {} µs, fires at {} µs (timer set: {}, ready: {}), {} attempts, delivery {:?}",
            t.state,
            t.spec.queue,
            t.replica,
            t.holders,
            t.due_us,
            t.fire_at_us,
            t.timed,
            t.in_ready,
            t.attempts,
            t.delivery()
        ))
    }

    /// Deliveries of `queue` under way from this node.
    pub fn running(&self, queue: &str) -> u32 {
        self.queues.get(queue).map_or(0, |q| q.running)
    }

    /// Tasks held, finished ones included.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Applies one command at time `now_us`, pushing resulting events.
    pub fn apply(&mut self, cmd: Command, now_us: u64, out: &mut Vec<Event>) {
        match cmd {
            Command::Request { identity, request } => {
                if let Some(reply) = self.request(&identity, request, now_us, out) {
                    out.push(Event::Reply { identity, reply });
                }
            }
            Command::Result(r) => {
                let verdict = Verdict {
                    responded: r.responded || r.outcome == Outcome::Success,
                    outcome: r.outcome,
                    status: r.status,
                    reason: r.reason,
                    retry_after: r.retry_after,
                    body: r.body.map(|b| b.into_vec()),
                    no_retry: r.no_retry,
                };
                self.settle(&r.task_id, r.delivery, verdict, now_us, out);
            }
            Command::Lost {
                delivery,
                task_id,
                reason,
            } => {
                let verdict = Verdict {
                    outcome: Outcome::Failure,
                    status: None,
                    reason: Some(reason),
                    retry_after: None,
                    responded: false,
                    body: None,
                    no_retry: false,
                };
                self.settle(&task_id, delivery, verdict, now_us, out);
            }
            Command::Roster {
                me,
                members,
                replicas,
            } => self.on_roster(me, members, replicas, now_us, out),
            Command::Joining(joining) => self.joining = joining,
            Command::Identity(id) => {
                if self.cluster.me == 0 {
                    self.cluster.me = id;
                }
            }
            Command::Suspects(mut ids) => {
                ids.sort_unstable();
                ids.dedup();
                self.cluster.suspects = ids;
            }
            Command::Peer(msg) => self.on_peer(msg, now_us, out),
            Command::PeerEvent(ev) => self.on_event(ev, now_us, out),
            Command::Shutdown => {}
        }
        out.append(&mut self.outbox);
    }

    /// Makes `t`, which passed validation here, share its queue and URL
    /// strings with the tasks before it.
    pub(crate) fn intern(&mut self, t: &mut ValidTask) {
        t.queue = self.queue_names.intern(&t.queue);
        t.url = self.urls.intern(&t.url);
    }

    /// Like [`Store::intern`] for a peer's copy, which was validated where
    /// it was enqueued: its URL joins the known ones only if this node's
    /// validation accepts it as it is.
    pub(crate) fn intern_peer(&mut self, t: &mut ValidTask) {
        t.queue = self.queue_names.intern(&t.queue);
        if self.urls.contains(&t.url)
            || crate::validate::normalize_url(&t.url).is_ok_and(|n| n == *t.url)
        {
            t.url = self.urls.intern(&t.url);
        }
    }
}

fn command_queue(c: &ClientCommand) -> Option<&str> {
    match c {
        ClientCommand::Enqueue { queue, .. }
        | ClientCommand::EnqueueBatch { queue, .. }
        | ClientCommand::Cancel { queue, .. }
        | ClientCommand::Get { queue, .. }
        | ClientCommand::Run { queue, .. }
        | ClientCommand::ListTasks { queue, .. }
        | ClientCommand::ConfigureQueue { queue, .. }
        | ClientCommand::GetQueue { queue, .. }
        | ClientCommand::PauseQueue { queue }
        | ClientCommand::ResumeQueue { queue }
        | ClientCommand::PurgeQueue { queue } => Some(queue),
        ClientCommand::ListQueues { .. }
        | ClientCommand::Ping
        | ClientCommand::ClusterInfo
        | ClientCommand::Stats => None,
    }
}

/// The dedup keys a task holds in its queue.
fn task_keys(spec: &ValidTask) -> Vec<(KeyKind, String)> {
    let mut keys = Vec::new();
    if let Some(n) = spec.name() {
        keys.push((KeyKind::Name, n.to_string()));
    }
    if let Some(k) = spec.idempotency_key() {
        keys.push((KeyKind::Idempotency, k.to_string()));
    }
    keys
}

fn failure_text(status: Option<u16>) -> String {
    match status {
        Some(s) => format!("HTTP {s}"),
        None => "failed".into(),
    }
}

fn not_found(queue: &str, id: &str) -> ReplyBody {
    error(
        ErrorCode::NotFound,
        format!("no task {id} in queue {queue}"),
    )
}

fn error(code: ErrorCode, reason: impl Into<String>) -> ReplyBody {
    ReplyBody::Error {
        code,
        reason: reason.into(),
    }
}

mod admit;
mod lifecycle;
mod persist;
mod recent;
mod replication;
mod table;
#[cfg(test)]
mod tests;
mod timers;
mod views;

pub use persist::Restored;
pub use replication::{CLAIM_GRACE, HANDOFF_AFTER, PEER_TIMEOUT};
