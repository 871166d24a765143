//! The task store, its queues and its timers: every change to a task's
//! state happens here, in [`Store::apply`] and [`Store::fire_due`].
//!
//! [`Store`] is sans-IO (commands and a clock in, events out) so it can be
//! tested without sockets; [`spawn`] runs it on its own thread, fed by a
//! crossbeam channel from the I/O loop and answering through another
//! channel plus a doorbell. No other thread touches task state, which is
//! what lets a journal record every change later without touching the rest.
//!
//! Task timers are a min-heap of (fire time µs, id) with lazy deletion
//! (O(1) on average to set, O(log n) to fire); the few other timers (queue
//! wake-ups, waits, tombstones, peer requests) are a `BTreeMap`. Tasks are
//! kept compact (`validate::ValidTask`, [`table`]), so a million pending
//! tasks take under 300 bytes each (`BENCHMARKS.md`).
//! A task whose timer fires joins its queue's ready line; the queue hands
//! it to the dispatcher when its token bucket, concurrency cap, pause and
//! 429/503 slow-down allow.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use protocol::{
    AttemptResult, ClientCommand, ClientReply, ClientRequest, DeliveredTask, DeliveryResult,
    ErrorCode, Outcome, QueueConfig, QueueConfigPatch, QueueInfo, ReplyBody, TaskDetail, TaskInfo,
    TaskSpec, TaskState, HTTP_POOL,
};
use serde_bytes::ByteBuf;
use uuid::Uuid;

use crate::clock::{micros_to_secs, now_micros, secs_to_micros};
use crate::queues::{self, DedupEntry, KeyKind, Queue};
use crate::validate::{validate_known, ValidTask};
use client::sockets::Bell;
use cluster::{new_record, placement_key};
use protocol::limits::{
    MAX_BATCH_TASKS as MAX_BATCH, MAX_REQUEST_ID_BYTES, MAX_RESPONSE_BYTES, MAX_WAIT_SECS,
};
use protocol::{EventBody, PeerMessage, ReplicaRecord, StoreOutcome};

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
pub struct SchedulerConfig {
    pub node_id: String,
    /// Settings of queues created on first use.
    pub queue_defaults: QueueConfig,
    /// Queues configured at start (from the config file).
    pub queues: Vec<(String, QueueConfig)>,
    /// Seconds between replicas' fire times (replica i fires at eta + i × offset).
    pub replica_offset: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            node_id: "node".into(),
            queue_defaults: QueueConfig::default(),
            queues: Vec::new(),
            replica_offset: Duration::from_secs(5),
        }
    }
}

/// Figures the scheduler thread shares with the I/O loop (for
/// heartbeats and `cluster_info`); written only by the scheduler.
#[derive(Debug, Default)]
pub struct Figures {
    pub tasks: std::sync::atomic::AtomicU64,
    pub re_replicated: std::sync::atomic::AtomicU64,
}

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

    fn set_last_error(&mut self, error: Option<String>) {
        let clear = error.is_none();
        self.update_run(clear, |r| r.error = error);
    }

    fn set_last_response(&mut self, response: Option<Vec<u8>>) {
        let clear = response.is_none();
        self.update_run(clear, |r| r.response = response);
    }

    fn set_first_attempt_us(&mut self, at: Option<u64>) {
        self.update_run(at.is_none(), |r| r.first_attempt_us = at);
    }

    fn set_delivery(&mut self, delivery: Option<u64>) {
        self.update_run(delivery.is_none(), |r| r.delivery = delivery);
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

enum Timer {
    /// A queue waiting for a token or for its 429/503 slow-down to end.
    Wake(String),
    /// An enqueue's `wait` ran out.
    Wait(Uuid),
    /// A name or idempotency key's tombstone may have expired (boxed: rare,
    /// and it would make every timer entry larger).
    Tombstone(Box<(String, KeyKind, String)>),
    /// A request to peers ran out of time.
    Pending(u64),
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
    config: SchedulerConfig,
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
    cluster: cluster::ClusterView,
    pending: HashMap<u64, cluster::Pending>,
    /// The request ids of the enqueues and batches in `pending`.
    pending_ids: HashSet<String>,
    /// Events produced by helpers that have no `out` at hand; appended to
    /// `out` at the end of every `apply` and `fire_due`.
    outbox: Vec<Event>,
    next_req: u64,
    /// Queue names and URLs shared by the tasks that use them. Every URL
    /// here passed validation, in its normalized form.
    queue_names: Interner,
    urls: Interner,
    pub stats: Stats,
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

impl Store {
    pub fn new(config: SchedulerConfig) -> Self {
        let mut queues = HashMap::new();
        for (name, c) in &config.queues {
            queues.insert(name.clone(), Queue::new(c.clone(), now_micros()));
        }
        Store {
            config,
            tasks: table::TaskTable::default(),
            queues,
            task_timers: BinaryHeap::new(),
            timers: BTreeMap::new(),
            seq: 0,
            next_delivery: 1,
            recent: recent::Recent::default(),
            waiters: HashMap::new(),
            cluster: cluster::ClusterView::default(),
            pending: HashMap::new(),
            pending_ids: HashSet::new(),
            outbox: Vec::new(),
            next_req: 1,
            queue_names: Interner::default(),
            urls: Interner::default(),
            stats: Stats::default(),
        }
    }

    /// Tasks held, finished ones included.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// When the earliest timer fires, in unix µs.
    pub fn next_deadline(&self) -> Option<u64> {
        let task = self.task_timers.peek().map(|Reverse((at, _))| *at);
        let other = self.timers.keys().next().map(|k| k.0);
        match (task, other) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
            Command::Peer(msg) => self.on_peer(msg, now_us, out),
            Command::PeerEvent(ev) => self.on_event(ev, now_us, out),
            Command::Shutdown => {}
        }
        out.append(&mut self.outbox);
    }

    /// Fires every timer due at `now_us`.
    pub fn fire_due(&mut self, now_us: u64, out: &mut Vec<Event>) {
        let mut touched: BTreeSet<String> = BTreeSet::new();
        loop {
            let task_at = self.task_timers.peek().map(|Reverse((at, _))| *at);
            let other_at = self.timers.keys().next().map(|k| k.0);
            if let Some(at) = task_at.filter(|&a| a <= now_us && other_at.is_none_or(|o| a <= o)) {
                let Some(Reverse((_, id))) = self.task_timers.pop() else {
                    break;
                };
                let Some(task) = self.tasks.get_mut(&id) else {
                    continue;
                };
                if !task.timed || task.fire_at_us != at {
                    continue; // stale: cleared or moved since
                }
                task.timed = false;
                if task.state.is_final() {
                    if task.state != TaskState::Failed {
                        self.remove_task(id);
                    }
                    continue;
                }
                // Scheduled or Retrying: due. Join the ready line.
                task.in_ready = true;
                let queue = task.spec.queue.to_string();
                if let Some(q) = self.queues.get_mut(&queue) {
                    q.ready.push_back(id);
                }
                touched.insert(queue);
                continue;
            }
            if other_at.is_none_or(|o| o > now_us) {
                break;
            }
            let Some((key, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Wake(queue) => {
                    if let Some(q) = self.queues.get_mut(&queue) {
                        if q.wake == Some(key) {
                            q.wake = None;
                        }
                    }
                    touched.insert(queue);
                }
                Timer::Wait(id) => {
                    if let Some(list) = self.waiters.get_mut(&id) {
                        if let Some(pos) = list.iter().position(|w| w.timer == key) {
                            let w = list.remove(pos);
                            out.push(waiter_reply(w, id, None));
                        }
                        if list.is_empty() {
                            self.waiters.remove(&id);
                        }
                    }
                }
                Timer::Pending(req) => self.pending_expired(req, now_us, out),
                Timer::Tombstone(t) => {
                    let (queue, kind, name) = *t;
                    if let Some(q) = self.queues.get_mut(&queue) {
                        let k = (kind, name);
                        let expired = q.keys.get(&k).is_some_and(|e| {
                            // A re-run dead letter is live again: keep its name.
                            let live = self.tasks.get(&e.id).is_some_and(|t| !t.state.is_final());
                            !live && e.tombstone_until.is_some_and(|until| until <= now_us)
                        });
                        if expired {
                            q.keys.remove(&k);
                        }
                    }
                }
            }
        }
        for queue in touched {
            self.pump(&queue, now_us, out);
        }
        self.expire_requests(now_us);
        out.append(&mut self.outbox);
    }

    fn request(
        &mut self,
        identity: &[u8],
        mut req: ClientRequest,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> Option<ClientReply> {
        let request_id = req.request_id;
        if !(1..=MAX_REQUEST_ID_BYTES).contains(&request_id.len()) {
            return Some(ClientReply {
                request_id,
                body: error(
                    ErrorCode::BadRequest,
                    format!("request_id must be 1 to {MAX_REQUEST_ID_BYTES} bytes"),
                ),
            });
        }
        let mutating = !matches!(
            req.command,
            ClientCommand::Get { .. }
                | ClientCommand::Ping
                | ClientCommand::ListTasks { .. }
                | ClientCommand::GetQueue { .. }
                | ClientCommand::ListQueues
        );
        if mutating {
            let queue = command_queue(&req.command).unwrap_or("");
            if let Some(body) = self.recent.get(&request_id, queue) {
                self.stats.duplicate_requests += 1;
                return Some(ClientReply { request_id, body });
            }
        }
        if let Some(queue) = command_queue(&req.command) {
            if let Err(rule) = protocol::limits::check_queue_name(queue) {
                return Some(ClientReply {
                    request_id,
                    body: error(ErrorCode::BadRequest, rule),
                });
            }
        }
        let mut deferred = false;
        if self.cluster.is_clustered() {
            let stores = match &req.command {
                ClientCommand::Enqueue { .. } => true,
                ClientCommand::EnqueueBatch { tasks, .. } => tasks.len() <= MAX_BATCH,
                _ => false,
            };
            // A resend while the first copies still wait for their holders:
            // the first one's answer will do.
            if stores && self.store_pending_for(&request_id) {
                self.stats.duplicate_requests += 1;
                return None;
            }
            match req.command {
                ClientCommand::Enqueue { queue, task, wait } => {
                    let r = self.enqueue_replicated(
                        identity,
                        &request_id,
                        &queue,
                        task,
                        wait,
                        None,
                        now_us,
                    );
                    return r.map(|body| ClientReply { request_id, body });
                }
                ClientCommand::EnqueueBatch { queue, tasks } if tasks.len() <= MAX_BATCH => {
                    self.enqueue_batch_replicated(identity, &request_id, &queue, tasks, now_us);
                    return None;
                }
                command => req.command = command,
            }
            match &req.command {
                ClientCommand::Get { queue, id }
                | ClientCommand::Cancel { queue, id }
                | ClientCommand::Run { queue, id }
                    if self.find(queue, id).is_none() =>
                {
                    self.forward(identity, &request_id, req.command.clone(), now_us);
                    return None;
                }
                ClientCommand::ConfigureQueue { .. }
                | ClientCommand::PauseQueue { .. }
                | ClientCommand::ResumeQueue { .. }
                | ClientCommand::PurgeQueue { .. } => self.broadcast(req.command.clone()),
                _ => {}
            }
        }
        let body = match req.command {
            ClientCommand::Enqueue { queue, task, wait } => {
                let body = self.enqueue(&queue, task, false, now_us);
                if let (Some(wait), ReplyBody::Enqueued { id, eta, .. }) = (wait, &body) {
                    if wait.is_finite() && wait > 0.0 {
                        if let Ok(uid) = Uuid::parse_str(id) {
                            let until = now_us + secs_to_micros(wait.min(MAX_WAIT_SECS));
                            let timer = self.add_timer(until, Timer::Wait(uid));
                            self.waiters.entry(uid).or_default().push(Waiter {
                                identity: identity.to_vec(),
                                request_id: request_id.clone(),
                                queue: queue.clone(),
                                eta: *eta,
                                replicas: 1,
                                timer,
                            });
                            deferred = true;
                        }
                    }
                }
                body
            }
            ClientCommand::EnqueueBatch { queue, tasks } => {
                if tasks.len() > MAX_BATCH {
                    error(
                        ErrorCode::BadRequest,
                        format!("a batch holds at most {MAX_BATCH} tasks"),
                    )
                } else {
                    let results = tasks
                        .into_iter()
                        .map(|t| self.enqueue(&queue, t, false, now_us))
                        .collect();
                    ReplyBody::Batch { results }
                }
            }
            ClientCommand::Cancel { queue, id } => self.cancel(&queue, &id, now_us, out),
            ClientCommand::Get { queue, id } => match self.find(&queue, &id) {
                Some(uid) => ReplyBody::Task {
                    task: self.info(uid, true),
                },
                None => not_found(&queue, &id),
            },
            ClientCommand::Run { queue, id } => self.run(&queue, &id, now_us, out),
            ClientCommand::ListTasks {
                queue,
                state,
                limit,
                cursor,
                full,
            } => self.list_tasks(&queue, state, limit, cursor, full),
            ClientCommand::GetQueue { queue } => ReplyBody::Queue {
                queue: self.queue_info(&queue, now_us),
            },
            ClientCommand::ListQueues => {
                let mut names: Vec<String> = self.queues.keys().cloned().collect();
                names.sort();
                ReplyBody::Queues {
                    queues: names.iter().map(|n| self.queue_info(n, now_us)).collect(),
                }
            }
            cmd @ (ClientCommand::ConfigureQueue { .. }
            | ClientCommand::PauseQueue { .. }
            | ClientCommand::ResumeQueue { .. }
            | ClientCommand::PurgeQueue { .. }) => self.queue_command(cmd, now_us, out),
            ClientCommand::ClusterInfo => error(
                ErrorCode::Internal,
                "cluster_info is answered by the I/O loop",
            ),
            ClientCommand::Ping => ReplyBody::Pong {
                node: self.config.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        };
        let reply = ClientReply { request_id, body };
        if mutating {
            self.recent.insert(
                &reply.request_id,
                &reply.body,
                now_us + REQUEST_DEDUP.as_micros() as u64,
                REQUEST_DEDUP_MAX,
            );
        }
        (!deferred).then_some(reply)
    }

    /// Configure, pause, resume and purge: from a client or a peer alike.
    fn queue_command(
        &mut self,
        command: ClientCommand,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        match command {
            ClientCommand::ConfigureQueue { queue, config } => {
                self.configure(&queue, config, now_us, out)
            }
            ClientCommand::PauseQueue { queue } => {
                self.queue_mut(&queue, now_us).paused = true;
                ReplyBody::Queue {
                    queue: self.queue_info(&queue, now_us),
                }
            }
            ClientCommand::ResumeQueue { queue } => {
                self.queue_mut(&queue, now_us).paused = false;
                self.pump(&queue, now_us, out);
                ReplyBody::Queue {
                    queue: self.queue_info(&queue, now_us),
                }
            }
            ClientCommand::PurgeQueue { queue } => {
                let removed = self.purge(&queue, now_us, out);
                ReplyBody::Purged { queue, removed }
            }
            _ => error(ErrorCode::BadRequest, "not a queue command"),
        }
    }

    fn expire_requests(&mut self, now_us: u64) {
        self.recent.expire(now_us);
    }

    /// The queue, created with the defaults on first use.
    fn queue_mut(&mut self, name: &str, now_us: u64) -> &mut Queue {
        let defaults = &self.config.queue_defaults;
        let share = self.cluster.members.len().max(1) as u32;
        self.queues.entry(name.to_string()).or_insert_with(|| {
            let mut q = Queue::new(defaults.clone(), now_us);
            q.share = share;
            q
        })
    }

    /// Validates a task for `queue`, with the queue's default timeout.
    #[allow(clippy::result_large_err)] // the error is the reply itself, sent at once
    fn check(&mut self, queue: &str, spec: TaskSpec, now_us: u64) -> Result<ValidTask, ReplyBody> {
        let default_timeout = self.queue_mut(queue, now_us).config.timeout;
        let urls = &self.urls;
        let mut t = validate_known(queue, spec, micros_to_secs(now_us), default_timeout, |u| {
            urls.contains(u)
        })
        .map_err(|reason| error(ErrorCode::BadRequest, reason))?;
        self.intern(&mut t);
        Ok(t)
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

    /// The answer to a task whose name or idempotency key is taken.
    fn duplicate_of(&self, spec: &ValidTask, now_us: u64) -> Option<ReplyBody> {
        for key in &task_keys(spec) {
            let Some(e) = self.queues.get(&*spec.queue).and_then(|q| q.keys.get(key)) else {
                continue;
            };
            let live = self.tasks.get(&e.id).is_some_and(|t| !t.state.is_final());
            if live {
                return Some(ReplyBody::Duplicate {
                    id: e.id.to_string(),
                    tombstoned: false,
                });
            }
            if e.tombstone_until.is_some_and(|u| u > now_us) {
                return Some(ReplyBody::Duplicate {
                    id: e.id.to_string(),
                    tombstoned: true,
                });
            }
        }
        None
    }

    /// Enqueues on this node alone (no replication): callbacks, batches'
    /// local copy, and every enqueue of a single-node cluster.
    fn enqueue(
        &mut self,
        queue: &str,
        spec: TaskSpec,
        is_callback: bool,
        now_us: u64,
    ) -> ReplyBody {
        let spec = match self.check(queue, spec, now_us) {
            Ok(t) => t,
            Err(reply) => return reply,
        };
        if let Some(dup) = self.duplicate_of(&spec, now_us) {
            return dup;
        }
        let id = Uuid::new_v4();
        let reply = ReplyBody::Enqueued {
            id: id.to_string(),
            queue: spec.queue.to_string(),
            eta: spec.eta,
            result: None,
            replicas: 1,
        };
        let holders = self.cluster.holders_for(&placement_key(&spec, id));
        // Copies for the other holders, acknowledged later (asynchronously);
        // a single node builds no record at all.
        if !holders.is_empty() {
            let store = PeerMessage::Store {
                req: 0,
                from: self.cluster.me,
                record: new_record(id, &spec, is_callback, now_us, holders.clone()),
                check: true,
            };
            self.send_to_others(&holders, store);
        }
        self.insert_task(id, spec, is_callback, now_us, holders);
        reply
    }

    /// Adds a task to this node's store and sets its timer.
    fn insert_task(
        &mut self,
        id: Uuid,
        spec: ValidTask,
        is_callback: bool,
        now_us: u64,
        holders: Vec<u64>,
    ) {
        let due = secs_to_micros(spec.eta);
        let q = self.queue_mut(&spec.queue, now_us);
        for key in task_keys(&spec) {
            q.keys.insert(
                key,
                DedupEntry {
                    id,
                    tombstone_until: None,
                },
            );
        }
        q.index.insert((now_us, id));
        q.count(None, Some(TaskState::Scheduled));
        let replica = self.cluster.replica_index(&holders);
        let fire_at = due + replica as u64 * self.config.replica_offset.as_micros() as u64;
        self.tasks.insert(Box::new(Task {
            id,
            spec,
            created_us: now_us,
            replica,
            state: TaskState::Scheduled,
            fire_at_us: fire_at,
            timed: false,
            attempts: 0,
            executions: 0,
            last_status: None,
            run: None,
            in_ready: false,
            is_callback,
            due_us: due,
            holders: holders.into_boxed_slice(),
        }));
        self.set_task_timer(id, fire_at);
        self.stats.enqueued += 1;
    }

    fn find(&self, queue: &str, id: &str) -> Option<Uuid> {
        let id = Uuid::parse_str(id).ok()?;
        let t = self.tasks.get(&id)?;
        (*t.spec.queue == *queue).then_some(id)
    }

    /// Moves a task to `to`, keeping its queue's counters right.
    fn transition(&mut self, id: Uuid, to: TaskState) {
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        let from = t.state;
        t.state = to;
        if let Some(q) = self.queues.get_mut(&*t.spec.queue) {
            q.count(Some(from), Some(to));
        }
    }

    /// Hands ready tasks of `queue` to the dispatcher while its limits allow.
    fn pump(&mut self, queue: &str, now_us: u64, out: &mut Vec<Event>) {
        loop {
            let Some(q) = self.queues.get_mut(queue) else {
                return;
            };
            if q.paused {
                return;
            }
            let Some(&id) = q.ready.front() else { return };
            if !self.tasks.get(&id).is_some_and(|t| t.in_ready) {
                q.ready.pop_front();
                continue;
            }
            if now_us < q.slow_until_us {
                let at = q.slow_until_us;
                self.set_wake(queue, at);
                return;
            }
            if !q.has_slot() {
                // A settling delivery frees a slot and pumps again.
                return;
            }
            if let Err(at) = q.take_token(now_us) {
                self.set_wake(queue, at);
                return;
            }
            q.ready.pop_front();
            self.dispatch(id, now_us, out);
        }
    }

    fn set_wake(&mut self, queue: &str, at_us: u64) {
        let current = self.queues.get(queue).and_then(|q| q.wake);
        if current.is_some_and(|k| k.0 <= at_us) {
            return;
        }
        if let Some(k) = current {
            self.timers.remove(&k);
        }
        let key = self.add_timer(at_us, Timer::Wake(queue.to_string()));
        if let Some(q) = self.queues.get_mut(queue) {
            q.wake = Some(key);
        }
    }

    /// Starts an attempt now.
    fn dispatch(&mut self, id: Uuid, now_us: u64, out: &mut Vec<Event>) {
        self.clear_timer(id);
        self.transition(id, TaskState::Running);
        let delivery = self.next_delivery;
        self.next_delivery += 1;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.in_ready = false;
        task.set_delivery(Some(delivery));
        if task.first_attempt_us().is_none() {
            task.set_first_attempt_us(Some(now_us));
        }
        let retry_count = task.attempts;
        task.attempts += 1;
        self.stats.dispatched += 1;
        let s = &task.spec;
        let mut signing_secrets = Vec::new();
        if let Some(q) = self.queues.get_mut(&*s.queue) {
            q.running += 1;
            q.record_dispatch(now_us);
            if s.pool() == HTTP_POOL {
                signing_secrets = q.config.signing_secrets.clone();
            }
        }
        let deadline_us =
            now_us + secs_to_micros(s.timeout()) + cluster::CLAIM_GRACE.as_micros() as u64;
        out.push(Event::Dispatch {
            pool: s.pool().to_string(),
            delivery,
            timeout: s.timeout(),
            task: DeliveredTask {
                id: id.to_string(),
                queue: s.queue.to_string(),
                name: s.rare().name.clone(),
                url: s.url.to_string(),
                method: s.method.as_str().to_string(),
                params: s.params(),
                body: s.body().map(|b| ByteBuf::from(b.to_vec())),
                content_type: s.rare().content_type.clone(),
                headers: s.rare().headers.clone(),
                eta: s.eta,
                timeout: s.timeout(),
                retry_count,
                execution_count: task.executions,
                signing_secrets,
            },
        });
        self.publish_for(id, |_| EventBody::Claimed {
            id: id.to_string(),
            deadline_us,
        });
    }

    fn cancel(
        &mut self,
        queue: &str,
        id_str: &str,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        let Some(id) = self.find(queue, id_str) else {
            return not_found(queue, id_str);
        };
        let Some(task) = self.tasks.get_mut(&id) else {
            return not_found(queue, id_str);
        };
        match task.state {
            TaskState::Succeeded => {
                return error(
                    ErrorCode::NotFound,
                    format!("task {id_str} already succeeded"),
                )
            }
            TaskState::Cancelled => {
                return ReplyBody::Cancelled {
                    id: id_str.to_string(),
                }
            }
            _ => {}
        }
        let was_running = task.state == TaskState::Running;
        if let (true, Some(delivery)) = (was_running, task.delivery()) {
            out.push(Event::Revoke { delivery });
        }
        task.set_delivery(None);
        task.in_ready = false;
        if was_running {
            if let Some(q) = self.queues.get_mut(queue) {
                q.running = q.running.saturating_sub(1);
            }
        }
        self.transition(id, TaskState::Cancelled);
        self.stats.cancelled += 1;
        self.finish(id, now_us, out);
        self.publish_finished(id);
        self.answer_waiters(id, None, out);
        if was_running {
            self.pump(queue, now_us, out);
        }
        ReplyBody::Cancelled {
            id: id_str.to_string(),
        }
    }

    fn run(&mut self, queue: &str, id_str: &str, now_us: u64, out: &mut Vec<Event>) -> ReplyBody {
        let Some(id) = self.find(queue, id_str) else {
            return not_found(queue, id_str);
        };
        let state = self.tasks.get(&id).map(|t| t.state);
        match state {
            Some(TaskState::Scheduled | TaskState::Retrying | TaskState::Failed) => {
                self.dispatch(id, now_us, out);
                ReplyBody::Task {
                    task: self.info(id, false),
                }
            }
            Some(s) => error(
                ErrorCode::Conflict,
                format!("task {id_str} is {} and cannot be run", s.as_str()),
            ),
            None => not_found(queue, id_str),
        }
    }

    fn settle(
        &mut self,
        task_id: &str,
        delivery: u64,
        v: Verdict,
        now_us: u64,
        out: &mut Vec<Event>,
    ) {
        let Some(id) = Uuid::parse_str(task_id).ok() else {
            self.stats.stale_results += 1;
            return;
        };
        let Some(task) = self.tasks.get_mut(&id) else {
            self.stats.stale_results += 1;
            return;
        };
        if task.state != TaskState::Running || task.delivery() != Some(delivery) {
            self.stats.stale_results += 1;
            return;
        }
        task.set_delivery(None);
        task.last_status = v.status;
        task.set_last_response(v.body.clone().map(|mut b| {
            b.truncate(MAX_RESPONSE_BYTES);
            b
        }));
        if v.responded {
            task.executions += 1;
        }
        let queue = task.spec.queue.to_string();
        let attempts = task.attempts;
        let age =
            Duration::from_micros(now_us.saturating_sub(task.first_attempt_us().unwrap_or(now_us)));
        let attempt = AttemptResult {
            outcome: v.outcome,
            status: v.status,
            body: task.last_response().map(ByteBuf::from),
            error: if v.outcome == Outcome::Failure {
                Some(v.reason.clone().unwrap_or_else(|| failure_text(v.status)))
            } else {
                None
            },
        };
        let Some(q) = self.queues.get_mut(&queue) else {
            return;
        };
        q.running = q.running.saturating_sub(1);
        let policy = q.policy.clone();
        match v.outcome {
            Outcome::Success => {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.set_last_error(None);
                }
                self.transition(id, TaskState::Succeeded);
                self.stats.succeeded += 1;
                self.finish(id, now_us, out);
                self.publish_finished(id);
                self.callback(id, true, now_us);
            }
            Outcome::Failure => {
                if matches!(v.status, Some(429) | Some(503)) {
                    let hold = v
                        .retry_after
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .map(Duration::from_secs_f64)
                        .unwrap_or(Duration::from_secs(1))
                        .min(MAX_QUEUE_SLOWDOWN);
                    q.slow_until_us = q.slow_until_us.max(now_us + hold.as_micros() as u64);
                }
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.set_last_error(attempt.error.clone());
                }
                if !v.no_retry && policy.allows_another(attempts, age) {
                    let delay = policy.next_delay(attempts, v.retry_after);
                    let at = now_us + delay.as_micros() as u64;
                    self.transition(id, TaskState::Retrying);
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.due_us = at;
                    }
                    self.stats.retried += 1;
                    self.retime(id);
                    self.publish_for(id, |t| EventBody::Retry {
                        id: id.to_string(),
                        attempts: t.attempts,
                        executions: t.executions,
                        due_us: at,
                        last_status: t.last_status,
                        last_error: t.last_error(),
                        response: t.last_response().map(ByteBuf::from),
                    });
                } else {
                    self.transition(id, TaskState::Failed);
                    self.stats.failed += 1;
                    self.finish(id, now_us, out);
                    self.publish_finished(id);
                    self.callback(id, false, now_us);
                }
            }
        }
        self.answer_waiters(id, Some(attempt), out);
        self.pump(&queue, now_us, out);
    }

    /// A task became final: retention timer (not for dead letters, which
    /// are kept) and tombstones for its name and idempotency key.
    fn finish(&mut self, id: Uuid, now_us: u64, _out: &mut Vec<Event>) {
        let Some(t) = self.tasks.get(&id) else { return };
        let state = t.state;
        let queue = t.spec.queue.to_string();
        let keys = task_keys(&t.spec);
        let (retention, dedup) = match self.queues.get(&queue) {
            Some(q) => (q.config.retention, q.config.dedup_window),
            None => (3600.0, 3600.0),
        };
        if state == TaskState::Failed {
            self.clear_timer(id);
        } else {
            self.set_task_timer(id, now_us + secs_to_micros(retention));
        }
        let until = now_us + secs_to_micros(dedup);
        for key in keys {
            let owned = self
                .queues
                .get(&queue)
                .and_then(|q| q.keys.get(&key))
                .is_some_and(|e| e.id == id);
            if !owned {
                continue;
            }
            if dedup <= 0.0 {
                if let Some(q) = self.queues.get_mut(&queue) {
                    q.keys.remove(&key);
                }
                continue;
            }
            if let Some(e) = self
                .queues
                .get_mut(&queue)
                .and_then(|q| q.keys.get_mut(&key))
            {
                e.tombstone_until = Some(until);
            }
            self.add_timer(
                until,
                Timer::Tombstone(Box::new((queue.clone(), key.0, key.1))),
            );
        }
    }

    /// Enqueues the JSON report of a finished task to its callback URL.
    fn callback(&mut self, id: Uuid, succeeded: bool, now_us: u64) {
        let Some(t) = self.tasks.get(&id) else { return };
        if t.is_callback {
            return;
        }
        let url = if succeeded {
            t.spec.rare().callback_url.clone()
        } else {
            t.spec.rare().failure_callback_url.clone()
        };
        let Some(url) = url else { return };
        let report = serde_json::json!({
            "task_id": id.to_string(),
            "queue": &*t.spec.queue,
            "name": t.spec.name(),
            "url": &*t.spec.url,
            "status": if succeeded { "succeeded" } else { "failed" },
            "attempts": t.attempts,
            "last_status": t.last_status,
            "last_error": t.last_error(),
            "response_body": t.last_response_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
        });
        let queue = t.spec.queue.to_string();
        let spec = TaskSpec {
            url,
            body: Some(ByteBuf::from(report.to_string().into_bytes())),
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        if let ReplyBody::Error { reason, .. } = self.enqueue(&queue, spec, true, now_us) {
            tracing::warn!(task = %id, %reason, "callback could not be enqueued");
        }
    }

    fn answer_waiters(&mut self, id: Uuid, result: Option<AttemptResult>, out: &mut Vec<Event>) {
        if let Some(list) = self.waiters.remove(&id) {
            for w in list {
                self.timers.remove(&w.timer);
                out.push(waiter_reply(w, id, result.clone()));
            }
        }
    }

    /// Forgets a task entirely (retention over, or purged).
    fn remove_task(&mut self, id: Uuid) {
        self.clear_timer(id);
        let Some(t) = self.tasks.remove(&id) else {
            return;
        };
        self.sweep_task_timers();
        if let Some(q) = self.queues.get_mut(&*t.spec.queue) {
            q.index.removed();
            q.count(Some(t.state), None);
            if q.index.needs_sweep() {
                let (tasks, queue) = (&self.tasks, &t.spec.queue);
                q.index.sweep(|(created, id)| {
                    tasks
                        .get(id)
                        .is_some_and(|t| t.created_us == *created && t.spec.queue == *queue)
                });
            }
        }
    }

    fn purge(&mut self, queue: &str, now_us: u64, out: &mut Vec<Event>) -> u64 {
        let Some(q) = self.queues.get(queue) else {
            return 0;
        };
        let ids: Vec<Uuid> = q
            .index
            .after(None)
            .take_while(|(created, _)| *created <= now_us)
            .map(|(_, id)| id)
            .collect();
        let mut removed = 0;
        for id in ids {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if let (TaskState::Running, Some(delivery)) = (t.state, t.delivery()) {
                out.push(Event::Revoke { delivery });
                if let Some(q) = self.queues.get_mut(queue) {
                    q.running = q.running.saturating_sub(1);
                }
            }
            // No tombstones: the names are free again at once.
            let keys = task_keys(&t.spec);
            if let Some(q) = self.queues.get_mut(queue) {
                for key in keys {
                    if q.keys.get(&key).is_some_and(|e| e.id == id) {
                        q.keys.remove(&key);
                    }
                }
            }
            self.answer_waiters(id, None, out);
            self.remove_task(id);
            removed += 1;
        }
        self.pump(queue, now_us, out);
        removed
    }

    fn configure(
        &mut self,
        queue: &str,
        patch: QueueConfigPatch,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        let q = self.queue_mut(queue, now_us);
        let mut config = q.config.clone();
        if let Err(reason) = queues::apply_patch(&mut config, patch) {
            return error(ErrorCode::BadRequest, reason);
        }
        q.set_config(config);
        self.pump(queue, now_us, out);
        ReplyBody::Queue {
            queue: self.queue_info(queue, now_us),
        }
    }

    fn queue_info(&self, name: &str, now_us: u64) -> QueueInfo {
        let fresh;
        let q = match self.queues.get(name) {
            Some(q) => q,
            None => {
                fresh = Queue::new(self.config.queue_defaults.clone(), now_us);
                &fresh
            }
        };
        let oldest = q
            .ready
            .iter()
            .find(|id| self.tasks.get(id).is_some_and(|t| t.in_ready))
            .and_then(|id| self.tasks.get(id))
            .map(|t| t.fire_at_us);
        let lag = oldest
            .map(|at| micros_to_secs(now_us.saturating_sub(at)))
            .unwrap_or(0.0);
        QueueInfo {
            name: name.to_string(),
            config: queues::redacted(&q.config),
            paused: q.paused,
            stats: q.stats(now_us, lag),
        }
    }

    fn list_tasks(
        &self,
        queue: &str,
        state: Option<TaskState>,
        limit: Option<u32>,
        cursor: Option<String>,
        full: bool,
    ) -> ReplyBody {
        let limit = limit
            .unwrap_or(protocol::limits::DEFAULT_LIST_LIMIT)
            .clamp(1, protocol::limits::MAX_LIST_LIMIT) as usize;
        let start = match cursor.as_deref() {
            None | Some("") => None,
            Some(c) => match parse_cursor(c) {
                Some(k) => Some(k),
                None => return error(ErrorCode::BadRequest, "invalid cursor"),
            },
        };
        let Some(q) = self.queues.get(queue) else {
            return ReplyBody::Tasks {
                tasks: Vec::new(),
                next_cursor: None,
            };
        };
        let range = q.index.after(start);
        let mut tasks = Vec::new();
        let mut last = None;
        let mut next_cursor = None;
        for (created, id) in range {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if t.created_us != created || *t.spec.queue != *queue {
                continue; // stale entry
            }
            if state.is_some_and(|s| s != t.state) {
                continue;
            }
            if tasks.len() == limit {
                // More match: the next page starts after the last one returned.
                next_cursor = last.map(|(c, i)| make_cursor(c, i));
                break;
            }
            tasks.push(self.info(id, full));
            last = Some((created, id));
        }
        ReplyBody::Tasks { tasks, next_cursor }
    }

    /// Clears a task's timer (its heap entry goes stale).
    fn clear_timer(&mut self, id: Uuid) {
        if let Some(t) = self.tasks.get_mut(&id) {
            t.timed = false;
        }
    }

    fn add_timer(&mut self, at_us: u64, timer: Timer) -> (u64, u64) {
        self.seq += 1;
        let key = (at_us, self.seq);
        self.timers.insert(key, timer);
        key
    }

    /// Sets a task's timer to `at_us`, which becomes its `fire_at_us`.
    fn set_task_timer(&mut self, id: Uuid, at_us: u64) {
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        t.fire_at_us = at_us;
        t.timed = true;
        self.task_timers.push(Reverse((at_us, id)));
        self.sweep_task_timers();
    }

    /// Drops stale heap entries once they outnumber the tasks (after many
    /// moves, or a purge).
    fn sweep_task_timers(&mut self) {
        if self.task_timers.len() > 2 * self.tasks.len() + 1024 {
            let tasks = &self.tasks;
            self.task_timers.retain(|Reverse((at, id))| {
                tasks
                    .get(id)
                    .is_some_and(|t| t.timed && t.fire_at_us == *at)
            });
        }
    }

    fn info(&self, id: Uuid, full: bool) -> TaskInfo {
        let Some(t) = self.tasks.get(&id) else {
            return TaskInfo {
                id: id.to_string(),
                queue: String::new(),
                name: None,
                url: String::new(),
                method: String::new(),
                state: TaskState::Cancelled,
                eta: 0.0,
                attempts: 0,
                executions: 0,
                last_status: None,
                last_error: None,
                created: 0.0,
                replica: 0,
                replica_offset: 0.0,
                first_attempt: None,
                detail: None,
            };
        };
        let s = &t.spec;
        TaskInfo {
            id: id.to_string(),
            queue: s.queue.to_string(),
            name: s.rare().name.clone(),
            url: s.url.to_string(),
            method: s.method.as_str().to_string(),
            state: t.state,
            eta: if t.state.is_final() {
                s.eta
            } else {
                micros_to_secs(t.fire_at_us)
            },
            attempts: t.attempts,
            executions: t.executions,
            last_status: t.last_status,
            last_error: t.last_error(),
            created: micros_to_secs(t.created_us),
            replica: t.replica,
            replica_offset: self.config.replica_offset.as_secs_f64(),
            first_attempt: t.first_attempt_us().map(micros_to_secs),
            detail: full.then(|| TaskDetail {
                params: s.params(),
                body: s.body().map(|b| ByteBuf::from(b.to_vec())),
                content_type: s.rare().content_type.clone(),
                headers: s.rare().headers.clone(),
                timeout: s.timeout(),
                callback_url: s.rare().callback_url.clone(),
                failure_callback_url: s.rare().failure_callback_url.clone(),
                last_response: t.last_response().map(ByteBuf::from),
            }),
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
        | ClientCommand::GetQueue { queue }
        | ClientCommand::PauseQueue { queue }
        | ClientCommand::ResumeQueue { queue }
        | ClientCommand::PurgeQueue { queue } => Some(queue),
        ClientCommand::ListQueues | ClientCommand::Ping | ClientCommand::ClusterInfo => None,
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

fn make_cursor(created_us: u64, id: Uuid) -> String {
    format!("{created_us}.{}", id.simple())
}

fn parse_cursor(c: &str) -> Option<(u64, Uuid)> {
    let (a, b) = c.split_once('.')?;
    Some((a.parse().ok()?, Uuid::parse_str(b).ok()?))
}

fn waiter_reply(w: Waiter, id: Uuid, result: Option<AttemptResult>) -> Event {
    Event::Reply {
        identity: w.identity,
        reply: ClientReply {
            request_id: w.request_id,
            body: ReplyBody::Enqueued {
                id: id.to_string(),
                queue: w.queue,
                eta: w.eta,
                result,
                replicas: w.replicas,
            },
        },
    }
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

/// Runs a [`Store`] on its own thread until [`Command::Shutdown`] or until
/// every sender is gone. Events go to `events`, with `bell` rung after each
/// batch.
pub fn spawn(
    config: SchedulerConfig,
    commands: Receiver<Command>,
    events: Sender<Event>,
    bell: Bell,
    figures: std::sync::Arc<Figures>,
) -> std::io::Result<thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let mut store = Store::new(config);
            let mut out = Vec::new();
            loop {
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

mod cluster;
mod recent;
mod table;
#[cfg(test)]
mod tests;
