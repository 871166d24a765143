//! Node-to-node messages: the peer dialogue (each node binds a ROUTER on
//! base port + 2 and connects a DEALER to every peer's, identity
//! `peer-<id>`) and the cluster events each node publishes on base port + 3.
//! Same framing as the client dialogues (see `PROTOCOL.md`, "Cluster").

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::{ClientCommand, ReplyBody, TaskState};

/// A cluster member as the roster records it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// Random at every start of a node without durable state, so a
    /// restarted node joins as a new member and never votes twice.
    pub id: u64,
    /// For operators (`--node-id`).
    pub name: String,
    /// Client port endpoint (base).
    pub client: String,
    /// Worker port endpoint (base + 1).
    pub worker: String,
    /// Peer ROUTER endpoint (base + 2).
    pub peer: String,
    /// Event PUB endpoint (base + 3).
    pub events: String,
}

/// What a node sends another on the peer port.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum PeerMessage {
    /// A Raft message (protobuf-encoded `eraftpb::Message`).
    Raft { from: u64, message: ByteBuf },
    /// Asks to be added to the roster; a non-leader forwards it to the leader.
    Join { member: Member },
    /// Stores a replica. `check`: a fresh enqueue, refused if its name or
    /// idempotency key is taken; otherwise an adoption (re-replication).
    Store {
        req: u64,
        from: u64,
        record: ReplicaRecord,
        check: bool,
    },
    /// The answer to a `Store`.
    StoreResult {
        req: u64,
        from: u64,
        outcome: StoreOutcome,
    },
    /// Drops a replica stored by a `Store` that another holder refused.
    Discard { id: String },
    /// A client command to apply to this node's own tasks only.
    Request {
        req: u64,
        from: u64,
        command: ClientCommand,
    },
    /// The answer to a `Request`.
    Reply {
        req: u64,
        from: u64,
        body: ReplyBody,
    },
}

/// A holder's answer to a `Store`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum StoreOutcome {
    Stored,
    Duplicate {
        id: String,
        tombstoned: bool,
    },
    Rejected {
        reason: String,
    },
    /// The record's `request` was stored here already, as task `id`: a
    /// producer's resend reached another coordinator. The coordinator
    /// answers with `id` and drops its own copies.
    Resent {
        id: String,
        /// Task `id` was enqueued long enough ago (over 3 s, past any
        /// coordinator's decision) that its coordinator has answered: it
        /// wins whatever the ids' order (§16.8).
        #[serde(default)]
        decided: bool,
    },
}

/// A task as it travels between its holders.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReplicaRecord {
    pub id: String,
    pub queue: String,
    pub name: Option<String>,
    pub url: String,
    pub pool: String,
    pub method: String,
    pub params: Vec<(String, String)>,
    pub body: Option<ByteBuf>,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub eta: f64,
    pub timeout: f64,
    pub callback_url: Option<String>,
    pub failure_callback_url: Option<String>,
    pub idempotency_key: Option<String>,
    pub is_callback: bool,
    pub created_us: u64,
    pub state: TaskState,
    /// When replica 0 fires next (unix µs); replica i adds i × offset.
    pub due_us: u64,
    pub attempts: u32,
    pub executions: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub first_attempt_us: Option<u64>,
    /// The nodes holding the task, in replica order.
    pub holders: Vec<u64>,
    /// The request that enqueued it, with the task's place in a batch
    /// (`REQUEST_ID` or `REQUEST_ID#i`), on a fresh enqueue's copy: a
    /// holder remembers it for the deduplication window, so a resend of
    /// the request to another node finds the task instead of making a
    /// second one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// A message published on the events port: `[""] [header] [body]`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ClusterEvent {
    pub from: u64,
    /// Per-publisher sequence; a gap means events were lost (counted; the
    /// replicas' own timers cover for them).
    pub seq: u64,
    pub body: EventBody,
}

/// What happened.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// Sent every 500 ms: liveness and load.
    Heartbeat { tasks: u64, epoch: u64 },
    /// A holder started a delivery; the others push their timers past
    /// `deadline_us` (plus their replica offset).
    Claimed { id: String, deadline_us: u64 },
    /// The delivery failed and will be retried at `due_us`.
    Retry {
        id: String,
        attempts: u32,
        executions: u32,
        due_us: u64,
        last_status: Option<u16>,
        last_error: Option<String>,
        /// The first 64 KiB of the answer (for `wait`ing enqueues).
        response: Option<ByteBuf>,
    },
    /// The task reached a final state (succeeded, failed or cancelled).
    Finished {
        id: String,
        state: TaskState,
        attempts: u32,
        executions: u32,
        last_status: Option<u16>,
        last_error: Option<String>,
        response: Option<ByteBuf>,
    },
}

/// The cluster as one node sees it (`cluster_info`, `GET /cluster`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ClusterInfo {
    /// The answering node.
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// Roster version: bumped by every membership change.
    pub epoch: u64,
    pub replicas: u32,
    pub replica_offset: f64,
    pub nodes: Vec<NodeInfo>,
    /// Task copies this node made to restore the replication factor after
    /// members left.
    pub re_replicated: u64,
    /// Raft messages this node dropped since it started rather than act on
    /// them: addressed to another member id, from a node outside the
    /// roster, or with indexes its log cannot have (§16.4).
    #[serde(default)]
    pub dropped_peer_messages: u64,
}

/// One member in a [`ClusterInfo`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub id: u64,
    pub name: String,
    pub client: String,
    pub worker: String,
    /// Heard from within the last few seconds.
    pub alive: bool,
    pub leader: bool,
    /// Tasks held (finished ones within retention included).
    pub tasks: u64,
}
