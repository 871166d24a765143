//! Typed messages of the two dialogues (see `PROTOCOL.md`).
//!
//! Every body is a MessagePack map with a `"type"` key naming the command;
//! the other keys are the command's fields. Optional fields may be omitted
//! or nil; lists default to empty.
//!
//! * Client dialogue (DEALER → broker base port): [`ClientRequest`] →
//!   [`ClientReply`], correlated by `request_id`.
//! * Worker dialogue (DEALER → broker base port + 1): [`WorkerMessage`] and
//!   [`BrokerMessage`], asynchronous in both directions.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The queue used when a request names none.
pub const DEFAULT_QUEUE: &str = "default";

/// The pool that HTTP(S) webhook tasks are dispatched to; gateways serve
/// it. `*` cannot appear in a `zmq://POOL` name, so it never collides.
pub const HTTP_POOL: &str = "*http";

pub(crate) fn one() -> u32 {
    1
}

pub(crate) fn default_queue() -> String {
    DEFAULT_QUEUE.to_string()
}

/// A request from a producer or gateway to a broker's base port.
/// (`Serialize` is written by hand in [`crate::fast`].)
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct ClientRequest {
    /// Chosen by the client, unique per request (a UUID is a good choice).
    /// A broker that sees the same id again answers with the first reply
    /// instead of acting twice, so a client may resend after a timeout.
    pub request_id: String,
    #[serde(flatten)]
    pub command: ClientCommand,
}

/// What a client asks for.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientCommand {
    /// Store a task; answered by [`ReplyBody::Enqueued`] or
    /// [`ReplyBody::Duplicate`]. With `wait` (seconds), the reply is held
    /// until the first attempt finishes or the wait runs out, and then
    /// carries the attempt's `result`.
    Enqueue {
        #[serde(default = "default_queue")]
        queue: String,
        task: TaskSpec,
        #[serde(default)]
        wait: Option<f64>,
    },
    /// Store up to 1000 tasks; answered by [`ReplyBody::Batch`] with one
    /// result per task, in order. A bad task does not reject the others.
    EnqueueBatch {
        #[serde(default = "default_queue")]
        queue: String,
        tasks: Vec<TaskSpec>,
    },
    /// Dispatch a task now, ignoring its eta, pause and rate limits
    /// (also re-runs a failed task); answered by [`ReplyBody::Task`].
    Run {
        #[serde(default = "default_queue")]
        queue: String,
        id: String,
    },
    /// List a queue's tasks in creation order; answered by [`ReplyBody::Tasks`].
    ListTasks {
        #[serde(default = "default_queue")]
        queue: String,
        /// Only tasks in this state.
        #[serde(default)]
        state: Option<TaskState>,
        /// Page size, 1–1000 (default 100).
        #[serde(default)]
        limit: Option<u32>,
        /// `next_cursor` of the previous page.
        #[serde(default)]
        cursor: Option<String>,
        /// Include bodies, parameters, headers and the last response.
        #[serde(default)]
        full: bool,
        /// Only the tasks this node answers for in a cluster-wide view:
        /// those whose first holder still a member is this node (§7.8).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        owned: bool,
    },
    /// Change a queue's configuration (only the fields given); answered by
    /// [`ReplyBody::Queue`].
    ConfigureQueue {
        queue: String,
        config: QueueConfigPatch,
    },
    /// A queue's configuration and live figures; [`ReplyBody::Queue`].
    GetQueue {
        queue: String,
        /// Count only the tasks this node answers for (as `list_tasks`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        owned: bool,
    },
    /// Every known queue; [`ReplyBody::Queues`].
    ListQueues {
        /// At most this many queues ([`crate::limits::DEFAULT_LIST_LIMIT`]
        /// by default, [`crate::limits::MAX_LIST_LIMIT`] at most).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// The `next_cursor` of the page before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
        /// Count only the tasks this node answers for (as `list_tasks`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        owned: bool,
    },
    /// Accept tasks but dispatch none; [`ReplyBody::Queue`].
    PauseQueue { queue: String },
    /// Undo a pause; [`ReplyBody::Queue`].
    ResumeQueue { queue: String },
    /// Remove every task created before the call, leaving no tombstones;
    /// [`ReplyBody::Purged`].
    PurgeQueue { queue: String },
    /// Cancel a task that has not succeeded; answered by [`ReplyBody::Cancelled`].
    Cancel {
        #[serde(default = "default_queue")]
        queue: String,
        id: String,
    },
    /// Inspect a task; answered by [`ReplyBody::Task`].
    Get {
        #[serde(default = "default_queue")]
        queue: String,
        id: String,
    },
    /// Liveness check; answered by [`ReplyBody::Pong`].
    Ping,
    /// The roster as this node sees it; answered by [`ReplyBody::Cluster`].
    ClusterInfo,
    /// This node's own figures for monitoring (`PROTOCOL.md` §7.17);
    /// answered by [`ReplyBody::Stats`].
    Stats,
}

/// A task as a producer describes it. Only `url` is required.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct TaskSpec {
    /// `http://…`, `https://…` (a webhook) or `zmq://POOL` (pulling workers).
    /// Missing or empty is rejected with `bad_request`.
    #[serde(default)]
    pub url: String,
    /// POST (default), GET, PUT, PATCH or DELETE.
    #[serde(default)]
    pub method: Option<String>,
    /// Parameters, form-encoded into the body (or the query string for GET
    /// and DELETE). Pairs keep their order; a key may repeat.
    #[serde(default)]
    pub params: Vec<(String, String)>,
    /// A raw body, exclusive with `params`.
    #[serde(default)]
    pub body: Option<ByteBuf>,
    /// The raw body's content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Extra headers sent with the webhook.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Seconds from now (fractional allowed); exclusive with `eta`.
    #[serde(default)]
    pub countdown: Option<f64>,
    /// Unix time in seconds (fractional allowed); in the past means now.
    #[serde(default)]
    pub eta: Option<f64>,
    /// Optional task name, `[A-Za-z0-9_-]{1,500}`.
    #[serde(default)]
    pub name: Option<String>,
    /// Seconds the worker has to answer each attempt (default: the
    /// queue's `timeout`, 30 s unless configured).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Receives a JSON report when the task succeeds.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Receives a JSON report when the task fails for good.
    #[serde(default)]
    pub failure_callback_url: Option<String>,
    /// Deduplicates an unnamed enqueue like a name does (HTTP:
    /// `Idempotency-Key`), `[\x21-\x7e]{1,500}`.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl TaskSpec {
    /// At least the size of this task's MessagePack encoding, in bytes: its
    /// strings and body, plus room for every key, header and number.
    pub fn encoded_size_bound(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let pairs = |p: &[(String, String)]| -> usize {
            p.iter().map(|(k, v)| 11 + k.len() + v.len()).sum()
        };
        // 13 keys of at most 21 bytes, each with a value header or a
        // number of at most 9 bytes, and the map's header.
        let fixed = 13 * 30 + 5;
        fixed
            + self.url.len()
            + opt(&self.method)
            + pairs(&self.params)
            + self.body.as_ref().map_or(0, |b| b.len())
            + opt(&self.content_type)
            + pairs(&self.headers)
            + opt(&self.name)
            + opt(&self.callback_url)
            + opt(&self.failure_callback_url)
            + opt(&self.idempotency_key)
    }
}

/// A broker's answer to a [`ClientRequest`].
/// (`Serialize` is written by hand in [`crate::fast`].)
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct ClientReply {
    /// The request's id, or empty when the request could not be decoded.
    pub request_id: String,
    #[serde(flatten)]
    pub body: ReplyBody,
}

/// The content of a reply.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
// A task view is the largest reply; replies are built and encoded once,
// so boxing it would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum ReplyBody {
    Enqueued {
        id: String,
        queue: String,
        /// When the task first fires, unix seconds.
        eta: f64,
        /// With `wait`: the first attempt's outcome, or nil if the wait ran out.
        #[serde(default)]
        result: Option<AttemptResult>,
        /// How many nodes hold the task.
        #[serde(default = "one")]
        replicas: u32,
    },
    /// The task's name (or idempotency key) is taken: by a task that is
    /// still pending or running (`tombstoned` false), or by one that
    /// finished or was deleted within the queue's dedup window (true).
    Duplicate {
        id: String,
        tombstoned: bool,
    },
    /// One reply per task of an `enqueue_batch`, in order: `enqueued`,
    /// `duplicate` or `error`.
    Batch {
        results: Vec<ReplyBody>,
    },
    Tasks {
        tasks: Vec<TaskInfo>,
        /// Pass back as `cursor` for the next page; nil on the last page.
        next_cursor: Option<String>,
    },
    Queue {
        queue: QueueInfo,
    },
    Queues {
        queues: Vec<QueueInfo>,
        /// Pass back as `cursor` for the next page; absent on the last.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_cursor: Option<String>,
    },
    Purged {
        queue: String,
        removed: u64,
    },
    Cluster {
        cluster: crate::peer::ClusterInfo,
    },
    Task {
        task: TaskInfo,
    },
    Cancelled {
        id: String,
    },
    Pong {
        node: String,
        version: String,
    },
    Stats {
        stats: NodeStats,
    },
    Error {
        code: ErrorCode,
        reason: String,
    },
}

/// One node's figures for monitoring (the answer to `stats`): counters
/// since the node started, and gauges as they are now. Only this node's
/// share: a gateway asks every node and labels each one's.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct NodeStats {
    /// The node's name (`--node-id`).
    pub node: String,
    /// Per queue, in name order; at most [`crate::limits::MAX_STATS_QUEUES`].
    pub queues: Vec<QueueCounters>,
    /// Queues left out past that bound.
    #[serde(default)]
    pub queues_left_out: u64,
    /// Tasks held in every state, and the memory counted for them.
    pub tasks: u64,
    pub task_bytes: u64,
    /// From a task's fire time to the start of its delivery, seconds.
    pub dispatch_lateness: Histogram,
    /// The journal's `fdatasync`s, seconds; `None` in memory.
    #[serde(default)]
    pub journal_sync: Option<Histogram>,
    #[serde(default)]
    pub journal_bytes: Option<u64>,
    /// Workers connected and the credit they have free, by pool.
    pub pools: Vec<PoolFigures>,
    pub cluster: ClusterFigures,
}

/// A queue's counters and gauges on one node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct QueueCounters {
    pub name: String,
    /// Tasks this node accepted from clients (a copy from a peer is not
    /// counted: each task counts once in the cluster).
    pub enqueued: u64,
    pub succeeded: u64,
    /// Attempts that failed (a dead letter's last attempt included).
    pub failed_attempts: u64,
    pub dead_letters: u64,
    pub cancelled: u64,
    /// Failed attempts followed by another attempt.
    pub retried: u64,
    /// Tasks held by state.
    pub states: QueueStats,
}

/// Workers of a pool on one node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct PoolFigures {
    pub pool: String,
    pub workers: u64,
    pub credit: u64,
}

/// How one node sees its cluster.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ClusterFigures {
    pub members: u64,
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub term: u64,
    pub epoch: u64,
    /// Copies sent to restore the replication factor, since start.
    pub re_replicated: u64,
    /// Other members, by name: heard from lately or not.
    pub peers: Vec<(String, bool)>,
}

/// A histogram: `counts[i]` observations at most `bounds[i]` (and above
/// `bounds[i-1]`); the last count is above every bound.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending).
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Upper bounds with cumulative counts, `+Inf` last (Prometheus's view).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| {
                total += c;
                (*b, total)
            })
            .collect();
        out.push((f64::INFINITY, self.count));
        out
    }
}

/// Seconds buckets for latencies, 0.5 ms to 1 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Machine-readable error classes; `reason` is for people.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was understood but its content is invalid.
    BadRequest,
    /// No such task (or it cannot be cancelled any more).
    NotFound,
    /// The frames or body could not be decoded.
    Malformed,
    /// The header's version byte is not one this node speaks.
    UnsupportedVersion,
    /// The node cannot serve the request now; retry later.
    Unavailable,
    /// A bug on the node's side.
    Internal,
    /// The task is not in a state that allows the request (e.g. `run` on
    /// a running or succeeded task).
    Conflict,
    /// The node is at one of its limits (its memory budget for tasks, its
    /// task cap, its queue cap): nothing was stored. Retry after
    /// `limits::BUSY_RETRY_SECS` or more, with backoff; the node keeps
    /// delivering what it holds meanwhile.
    Busy,
}

/// Lifecycle of a task.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for its eta (never attempted).
    Scheduled,
    /// Handed to the dispatcher; an attempt is under way.
    Running,
    /// At least one attempt failed; waiting for the next one.
    Retrying,
    Succeeded,
    /// Ran out of attempts (dead-lettered); kept, never dropped silently.
    Failed,
    Cancelled,
}

impl TaskState {
    /// Succeeded, failed and cancelled tasks never run again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

/// A task as `get` reports it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskInfo {
    pub id: String,
    pub queue: String,
    pub name: Option<String>,
    pub url: String,
    pub method: String,
    pub state: TaskState,
    /// Next (or last) fire time of this replica, unix seconds.
    pub eta: f64,
    /// Attempts made so far.
    pub attempts: u32,
    /// Attempts that got an HTTP answer (or a worker's verdict).
    pub executions: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// Enqueue time, unix seconds.
    pub created: f64,
    /// Which replica of the task this node holds (0 fires first).
    pub replica: u32,
    /// Seconds between replicas' fire times.
    pub replica_offset: f64,
    /// First attempt's start, unix seconds.
    #[serde(default)]
    pub first_attempt: Option<f64>,
    /// Only in full views (`get`, `list_tasks` with `full`).
    #[serde(default)]
    pub detail: Option<TaskDetail>,
    /// The member ids holding the task, in replica order; absent on a
    /// single node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<u64>,
}

/// The parts of a task a listing leaves out unless asked.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct TaskDetail {
    #[serde(default)]
    pub params: Vec<(String, String)>,
    #[serde(default)]
    pub body: Option<ByteBuf>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    pub timeout: f64,
    #[serde(default)]
    pub callback_url: Option<String>,
    #[serde(default)]
    pub failure_callback_url: Option<String>,
    /// The first 64 KiB of the last answer's body.
    #[serde(default)]
    pub last_response: Option<ByteBuf>,
}

/// The outcome of one attempt, as a `wait`ing enqueue reports it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AttemptResult {
    pub outcome: Outcome,
    #[serde(default)]
    pub status: Option<u16>,
    /// The first 64 KiB of the answer's body.
    #[serde(default)]
    pub body: Option<ByteBuf>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A queue's settings. Durations are seconds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// Dispatches per second (token refill rate); 0 means unlimited.
    pub rate: f64,
    /// Token bucket size: dispatches allowed at once after a quiet spell.
    pub burst: u32,
    /// Deliveries in flight at once; 0 means unlimited.
    pub max_concurrent: u32,
    /// Attempts in all, the first included; -1 means unlimited.
    pub max_attempts: i64,
    /// Seconds since the first attempt after which no retry starts; 0
    /// means unlimited. With both limits set, retries stop only when both
    /// are exhausted.
    pub max_age: f64,
    pub min_backoff: f64,
    pub max_backoff: f64,
    pub max_doublings: u32,
    /// Default per-attempt deadline of the queue's tasks.
    pub timeout: f64,
    /// How long a finished or deleted task's name stays taken.
    pub dedup_window: f64,
    /// How long succeeded and cancelled tasks stay inspectable.
    pub retention: f64,
    /// Standard Webhooks secrets (`whsec_…`) that sign this queue's
    /// webhooks; several during a key rotation. Never echoed back: replies
    /// carry `"***"` per secret.
    #[serde(default)]
    pub signing_secrets: Vec<String>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            rate: 0.0,
            burst: 100,
            max_concurrent: 0,
            max_attempts: 100,
            max_age: 0.0,
            min_backoff: 0.1,
            max_backoff: 3600.0,
            max_doublings: 16,
            timeout: 30.0,
            dedup_window: 3600.0,
            retention: 3600.0,
            signing_secrets: Vec::new(),
        }
    }
}

/// Fields to change in a [`QueueConfig`]; absent fields stay as they are.
/// Unknown fields are rejected, so a typo is an error rather than ignored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct QueueConfigPatch {
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub max_attempts: Option<i64>,
    #[serde(default)]
    pub max_age: Option<f64>,
    #[serde(default)]
    pub min_backoff: Option<f64>,
    #[serde(default)]
    pub max_backoff: Option<f64>,
    #[serde(default)]
    pub max_doublings: Option<u32>,
    #[serde(default)]
    pub timeout: Option<f64>,
    #[serde(default)]
    pub dedup_window: Option<f64>,
    #[serde(default)]
    pub retention: Option<f64>,
    #[serde(default)]
    pub signing_secrets: Option<Vec<String>>,
}

/// A queue as `get_queue` reports it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    pub config: QueueConfig,
    pub paused: bool,
    pub stats: QueueStats,
}

/// Live figures of a queue.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct QueueStats {
    pub scheduled: u64,
    pub running: u64,
    pub retrying: u64,
    /// Dead letters.
    pub failed: u64,
    /// Succeeded tasks still within the retention window.
    pub succeeded: u64,
    pub cancelled: u64,
    /// Dispatches per second over the last minute.
    pub dispatches_per_second: f64,
    /// Seconds the oldest due-but-undispatched task is overdue (0 if none).
    pub lag: f64,
}

/// What a worker (or a gateway) sends on the worker port.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// Register: the pools served and how many tasks may be in flight at
    /// once (the credit). Must be the first message of a connection.
    Ready {
        pools: Vec<String>,
        credit: u32,
        /// A name for the operator's logs.
        #[serde(default)]
        name: Option<String>,
        /// The worker takes its deliveries in `tasks` messages, several at
        /// once (and may then answer with `results`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batch: bool,
    },
    /// Grant more credit.
    Credit { credit: u32 },
    /// Sent when the worker has sent nothing else for a heartbeat interval.
    Heartbeat,
    /// The outcome of one delivery; returns one credit.
    Result(DeliveryResult),
    /// The outcomes of several deliveries, each as a `result`. Sent only
    /// on a connection that has received [`BrokerMessage::Tasks`].
    Results { results: Vec<DeliveryResult> },
    /// The worker leaves; its in-flight tasks go back to the schedule.
    Disconnect,
}

/// A worker's verdict on one delivery.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeliveryResult {
    /// The `delivery` number of the [`BrokerMessage::Task`] answered.
    pub delivery: u64,
    pub task_id: String,
    pub outcome: Outcome,
    /// The HTTP status the webhook answered, when there was one.
    #[serde(default)]
    pub status: Option<u16>,
    /// Why the attempt failed (or a note on success).
    #[serde(default)]
    pub reason: Option<String>,
    /// Do not retry before this many seconds (from `Retry-After`).
    #[serde(default)]
    pub retry_after: Option<f64>,
    /// The target answered at all (counts as an execution). Pulling workers
    /// that send a result always count as answering.
    #[serde(default)]
    pub responded: bool,
    /// The first 64 KiB of the answer's body, kept with the task.
    #[serde(default)]
    pub body: Option<ByteBuf>,
    /// The worker asked not to retry (HTTP: `X-Task-No-Retry: true`): a
    /// failure ends the task as failed at once.
    #[serde(default)]
    pub no_retry: bool,
}

/// Success or failure of one delivery.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

/// What a broker sends on the worker port.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
// Messages live only between decode and dispatch; boxing would cost an
// allocation per task for no saving.
#[allow(clippy::large_enum_variant)]
pub enum BrokerMessage {
    /// One delivery; answer with [`WorkerMessage::Result`] quoting `delivery`.
    Task { delivery: u64, task: DeliveredTask },
    /// One or more deliveries, to a worker whose `ready` set `batch`; each
    /// is answered as a `task` is.
    Tasks { tasks: Vec<Dispatched> },
    /// Sent when the broker has sent nothing else for a heartbeat interval.
    Heartbeat,
    /// The broker does not know this worker (e.g. it restarted): send
    /// `ready` again. In-flight work was already given back.
    Disconnect { reason: String },
    /// A message could not be accepted; the connection stays up.
    Error { code: ErrorCode, reason: String },
}

/// One delivery inside [`BrokerMessage::Tasks`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Dispatched {
    pub delivery: u64,
    pub task: DeliveredTask,
}

/// A task as a worker receives it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeliveredTask {
    pub id: String,
    pub queue: String,
    #[serde(default)]
    pub name: Option<String>,
    pub url: String,
    pub method: String,
    #[serde(default)]
    pub params: Vec<(String, String)>,
    #[serde(default)]
    pub body: Option<ByteBuf>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The task's eta (unix seconds) — not this replica's offset fire time.
    pub eta: f64,
    /// Seconds this attempt may take.
    pub timeout: f64,
    /// Earlier attempts (0 on the first).
    pub retry_count: u32,
    /// Earlier attempts that got an answer.
    pub execution_count: u32,
    /// Secrets to sign the webhook with (HTTP tasks of queues that have
    /// them; gateways only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_secrets: Vec<String>,
}

impl DeliveredTask {
    /// At least the size of this task's MessagePack encoding, in bytes.
    pub fn encoded_size_bound(&self) -> usize {
        let pairs = |p: &[(String, String)]| -> usize {
            p.iter().map(|(k, v)| 11 + k.len() + v.len()).sum()
        };
        // 14 keys of at most 21 bytes, each with a value header or a
        // number of at most 9 bytes, and the map's header.
        let fixed = 14 * 30 + 5;
        fixed
            + self.id.len()
            + self.queue.len()
            + self.name.as_ref().map_or(0, String::len)
            + self.url.len()
            + self.method.len()
            + pairs(&self.params)
            + self.body.as_ref().map_or(0, |b| b.len())
            + self.content_type.as_ref().map_or(0, String::len)
            + pairs(&self.headers)
            + self
                .signing_secrets
                .iter()
                .map(|s| 5 + s.len())
                .sum::<usize>()
    }
}

impl Dispatched {
    /// At least the size of this entry's MessagePack encoding, in bytes:
    /// the task's, and its map with `delivery`.
    pub fn encoded_size_bound(&self) -> usize {
        self.task.encoded_size_bound() + 30
    }
}

impl DeliveryResult {
    /// At least the size of this result's MessagePack encoding, in bytes.
    pub fn encoded_size_bound(&self) -> usize {
        // 9 keys of at most 13 bytes, each with a value header or a number
        // of at most 9 bytes, and the map's header.
        let fixed = 9 * 22 + 5;
        fixed
            + self.task_id.len()
            + self.reason.as_ref().map_or(0, String::len)
            + self.body.as_ref().map_or(0, |b| b.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};
    use proptest::prelude::*;

    fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((".{0,8}", ".{0,8}"), 0..4)
    }

    prop_compose! {
        fn spec()(url in ".{0,30}", method in proptest::option::of("[A-Z]{1,7}"),
                  params in pairs(), body in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                  headers in pairs(), countdown in proptest::option::of(-1e9f64..1e9),
                  eta in proptest::option::of(0f64..1e10), name in proptest::option::of("[a-z_-]{1,10}"),
                  timeout in proptest::option::of(0f64..1e4)) -> TaskSpec {
            TaskSpec { url, method, params, body: body.map(ByteBuf::from), content_type: None,
                       headers, countdown, eta, name, timeout, callback_url: Some("http://cb/".into()),
                       failure_callback_url: None, idempotency_key: Some("k".into()) }
        }
    }

    /// Every field set, with strings and a body long enough for the
    /// largest MessagePack headers: a task as enqueued, as delivered, and a
    /// result.
    #[test]
    fn size_bounds_hold_for_long_fields() {
        for n in [0, 31, 32, 255, 256, 65_535, 65_536, 70_000] {
            let s = "é".repeat(n / 2) + &"x".repeat(n % 2);
            let pairs = vec![(s.clone(), s.clone()); 3];
            let task = TaskSpec {
                url: s.clone(),
                method: Some(s.clone()),
                params: pairs.clone(),
                body: Some(ByteBuf::from(vec![7u8; n])),
                content_type: Some(s.clone()),
                headers: pairs.clone(),
                countdown: Some(1.5),
                eta: Some(1.8e9),
                name: Some(s.clone()),
                timeout: Some(30.0),
                callback_url: Some(s.clone()),
                failure_callback_url: Some(s.clone()),
                idempotency_key: Some(s.clone()),
            };
            let encoded = rmp_serde::to_vec_named(&task).unwrap();
            assert!(
                task.encoded_size_bound() >= encoded.len(),
                "{n}: {} < {}",
                task.encoded_size_bound(),
                encoded.len()
            );
            let delivered = DeliveredTask {
                id: s.clone(),
                queue: s.clone(),
                name: Some(s.clone()),
                url: s.clone(),
                method: s.clone(),
                params: pairs.clone(),
                body: Some(ByteBuf::from(vec![7u8; n])),
                content_type: Some(s.clone()),
                headers: pairs,
                eta: 1.8e9,
                timeout: 30.5,
                retry_count: u32::MAX,
                execution_count: u32::MAX,
                signing_secrets: vec![s.clone(); 3],
            };
            let encoded = rmp_serde::to_vec_named(&delivered).unwrap();
            assert!(
                delivered.encoded_size_bound() >= encoded.len(),
                "{n}: {} < {}",
                delivered.encoded_size_bound(),
                encoded.len()
            );
            let result = DeliveryResult {
                delivery: u64::MAX,
                task_id: s.clone(),
                outcome: Outcome::Failure,
                status: Some(u16::MAX),
                reason: Some(s),
                retry_after: Some(1.5),
                responded: true,
                body: Some(ByteBuf::from(vec![7u8; n])),
                no_retry: true,
            };
            let encoded = rmp_serde::to_vec_named(&result).unwrap();
            assert!(
                result.encoded_size_bound() >= encoded.len(),
                "{n}: {} < {}",
                result.encoded_size_bound(),
                encoded.len()
            );
        }
    }

    proptest! {
        #[test]
        fn size_bound_holds(task in spec(), cb in proptest::option::of(".{0,40}"), key in proptest::option::of(".{0,40}")) {
            let task = TaskSpec { callback_url: cb.clone(), failure_callback_url: cb, idempotency_key: key, ..task };
            let encoded = rmp_serde::to_vec_named(&task).unwrap();
            prop_assert!(task.encoded_size_bound() >= encoded.len(), "{} < {}", task.encoded_size_bound(), encoded.len());
        }

        #[test]
        fn client_requests_round_trip(id in ".{0,40}", queue in "[a-z-]{1,10}", task in spec()) {
            for command in [
                ClientCommand::Enqueue { queue: queue.clone(), task: task.clone(), wait: Some(1.5) },
                ClientCommand::EnqueueBatch { queue: queue.clone(), tasks: vec![task.clone(), task.clone()] },
                ClientCommand::Run { queue: queue.clone(), id: id.clone() },
                ClientCommand::ListTasks { queue: queue.clone(), state: Some(TaskState::Failed), limit: Some(5), cursor: Some(id.clone()), full: true, owned: true },
                ClientCommand::ConfigureQueue { queue: queue.clone(), config: QueueConfigPatch { rate: Some(2.5), max_attempts: Some(-1), signing_secrets: Some(vec!["whsec_AA==".into()]), ..Default::default() } },
                ClientCommand::GetQueue { queue: queue.clone(), owned: false },
                ClientCommand::ListQueues {
                    limit: None,
                    cursor: None,
                    owned: true,
                },
                ClientCommand::PauseQueue { queue: queue.clone() },
                ClientCommand::ResumeQueue { queue: queue.clone() },
                ClientCommand::PurgeQueue { queue: queue.clone() },
                ClientCommand::Cancel { queue: queue.clone(), id: id.clone() },
                ClientCommand::Get { queue: queue.clone(), id: id.clone() },
                ClientCommand::Ping,
            ] {
                let req = ClientRequest { request_id: id.clone(), command };
                let back: ClientRequest = decode(&encode(&req)).unwrap();
                prop_assert_eq!(back, req);
            }
        }

        #[test]
        fn worker_messages_round_trip(delivery in any::<u64>(), status in proptest::option::of(any::<u16>()),
                                      reason in proptest::option::of(".{0,20}"), task in spec()) {
            let result = DeliveryResult { delivery, task_id: "t".into(), outcome: Outcome::Failure,
                status, reason: reason.clone(), retry_after: Some(1.5), responded: true,
                body: Some(ByteBuf::from(vec![1, 2, 3])), no_retry: true };
            let msgs = vec![
                WorkerMessage::Ready { pools: vec!["a".into(), HTTP_POOL.into()], credit: 7, name: Some("w".into()), batch: false },
                WorkerMessage::Ready { pools: vec![HTTP_POOL.into()], credit: 0, name: None, batch: true },
                WorkerMessage::Credit { credit: 3 },
                WorkerMessage::Heartbeat,
                WorkerMessage::Disconnect,
                WorkerMessage::Result(result.clone()),
                WorkerMessage::Results { results: vec![result.clone(), DeliveryResult { delivery: 1, outcome: Outcome::Success, ..result }] },
            ];
            for m in msgs {
                let back: WorkerMessage = decode(&encode(&m)).unwrap();
                prop_assert_eq!(back, m);
            }
            let t = BrokerMessage::Task { delivery, task: DeliveredTask {
                id: "i".into(), queue: "q".into(), name: task.name, url: task.url, method: "POST".into(),
                params: task.params, body: task.body, content_type: reason, headers: task.headers,
                eta: 1.0, timeout: 30.0, retry_count: 2, execution_count: 1,
                signing_secrets: vec!["whsec_AA==".into()] } };
            let back: BrokerMessage = decode(&encode(&t)).unwrap();
            prop_assert_eq!(&back, &t);
            let BrokerMessage::Task { task, .. } = t else { unreachable!() };
            let many = BrokerMessage::Tasks { tasks: vec![
                Dispatched { delivery, task: task.clone() },
                Dispatched { delivery: 3, task: DeliveredTask { signing_secrets: vec![], ..task } },
            ] };
            let back: BrokerMessage = decode(&encode(&many)).unwrap();
            prop_assert_eq!(back, many);
        }

        #[test]
        fn delivered_task_and_result_size_bounds_hold(task in spec(), delivery in any::<u64>(),
                                                      reason in proptest::option::of(".{0,40}"),
                                                      secrets in proptest::collection::vec(".{0,30}", 0..3)) {
            let t = DeliveredTask {
                id: "0b7e2c".into(), queue: "q".into(), name: task.name, url: task.url,
                method: task.method.unwrap_or_default(), params: task.params, body: task.body,
                content_type: reason.clone(), headers: task.headers, eta: 1.7e9, timeout: 30.0,
                retry_count: u32::MAX, execution_count: u32::MAX, signing_secrets: secrets,
            };
            let encoded = rmp_serde::to_vec_named(&t).unwrap();
            prop_assert!(t.encoded_size_bound() >= encoded.len(), "{} < {}", t.encoded_size_bound(), encoded.len());
            let r = DeliveryResult { delivery, task_id: t.id.clone(), outcome: Outcome::Failure,
                status: Some(u16::MAX), reason, retry_after: Some(0.1), responded: true,
                body: t.body.clone(), no_retry: true };
            let encoded = rmp_serde::to_vec_named(&r).unwrap();
            prop_assert!(r.encoded_size_bound() >= encoded.len(), "{} < {}", r.encoded_size_bound(), encoded.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..5)) {
            let _ = decode::<ClientRequest, _>(&frames);
            let _ = decode::<WorkerMessage, _>(&frames);
            let _ = decode::<BrokerMessage, _>(&frames);
            let _ = decode::<ClientReply, _>(&frames);
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let frames = vec![Vec::new(), crate::frames::header().to_vec(), body];
            let _ = decode::<ClientRequest, _>(&frames);
            let _ = decode::<WorkerMessage, _>(&frames);
        }
    }

    #[test]
    fn replies_round_trip() {
        let replies = vec![
            ReplyBody::Enqueued {
                id: "x".into(),
                queue: "q".into(),
                eta: 12.5,
                result: Some(AttemptResult {
                    outcome: Outcome::Success,
                    status: Some(200),
                    body: Some(ByteBuf::from(b"ok".to_vec())),
                    error: None,
                }),
                replicas: 2,
            },
            ReplyBody::Cluster {
                cluster: crate::ClusterInfo {
                    node: 7,
                    leader: Some(7),
                    nodes: vec![crate::NodeInfo {
                        id: 7,
                        name: "n".into(),
                        client: "tcp://a:1".into(),
                        worker: "tcp://a:2".into(),
                        alive: true,
                        leader: true,
                        tasks: 3,
                    }],
                    ..Default::default()
                },
            },
            ReplyBody::Duplicate {
                id: "x".into(),
                tombstoned: true,
            },
            ReplyBody::Batch {
                results: vec![ReplyBody::Cancelled { id: "y".into() }],
            },
            ReplyBody::Queue {
                queue: QueueInfo {
                    name: "q".into(),
                    config: QueueConfig::default(),
                    paused: true,
                    stats: QueueStats::default(),
                },
            },
            ReplyBody::Purged {
                queue: "q".into(),
                removed: 3,
            },
            ReplyBody::Cancelled { id: "x".into() },
            ReplyBody::Pong {
                node: "n".into(),
                version: "1".into(),
            },
            ReplyBody::Stats {
                stats: NodeStats {
                    node: "n".into(),
                    queues: vec![QueueCounters {
                        name: "q".into(),
                        enqueued: 3,
                        ..Default::default()
                    }],
                    dispatch_lateness: Histogram::new(LATENCY_BUCKETS),
                    journal_sync: Some(Histogram::new(&[0.001])),
                    pools: vec![PoolFigures {
                        pool: "p".into(),
                        workers: 1,
                        credit: 4,
                    }],
                    cluster: ClusterFigures {
                        peers: vec![("b".into(), true)],
                        ..Default::default()
                    },
                    ..Default::default()
                },
            },
            ReplyBody::Error {
                code: ErrorCode::BadRequest,
                reason: "no".into(),
            },
            ReplyBody::Task {
                task: TaskInfo {
                    id: "x".into(),
                    queue: "q".into(),
                    name: None,
                    url: "http://a/".into(),
                    method: "POST".into(),
                    state: TaskState::Retrying,
                    eta: 3.0,
                    attempts: 2,
                    executions: 1,
                    last_status: Some(500),
                    last_error: Some("HTTP 500".into()),
                    created: 1.0,
                    replica: 0,
                    replica_offset: 5.0,
                    first_attempt: Some(2.0),
                    detail: Some(TaskDetail::default()),
                    holders: vec![1, 2],
                },
            },
        ];
        for body in replies {
            let r = ClientReply {
                request_id: "r".into(),
                body,
            };
            let back: ClientReply = decode(&encode(&r)).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn minimal_map_from_another_language_decodes() {
        // What a hand-written client sends: only the required keys, and an
        // integer where a float is expected.
        use serde::Serialize;
        #[derive(Serialize)]
        struct T<'a> {
            url: &'a str,
            countdown: u8,
        }
        #[derive(Serialize)]
        struct R<'a> {
            request_id: &'a str,
            #[serde(rename = "type")]
            ty: &'a str,
            task: T<'a>,
        }
        let body = rmp_serde::to_vec_named(&R {
            request_id: "1",
            ty: "enqueue",
            task: T {
                url: "zmq://p",
                countdown: 5,
            },
        })
        .unwrap();
        let frames = vec![Vec::new(), crate::frames::header().to_vec(), body];
        let req: ClientRequest = decode(&frames).unwrap();
        match req.command {
            ClientCommand::Enqueue { queue, task, .. } => {
                assert_eq!(queue, DEFAULT_QUEUE);
                assert_eq!(task.countdown, Some(5.0));
                assert_eq!(task.url, "zmq://p");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 2.0, f64::NAN, -1.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![4, 1, 1]);
        assert_eq!(h.count, 6);
        assert_eq!(h.cumulative(), vec![(0.1, 4), (1.0, 5), (f64::INFINITY, 6)]);
    }
}
