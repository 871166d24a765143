//! Miyamoto's broker: the core node. It speaks only ZeroMQ.
//!
//! Layout:
//! * [`node`] — binds the sockets and runs the I/O loop (the one thread
//!   that owns sockets); start a node with [`Node::start`].
//! * [`store`] — the task store, sans-IO: every change of a task's state
//!   happens there (requests, lifecycle, timers, replication, views).
//! * [`scheduler`] — the thread that owns the store and feeds it commands
//!   and the clock.
//! * [`election`] — leader election and the roster on Raft, sans-IO, and
//!   the thread that runs it.
//! * [`membership`] — the roster as this node acts on it, sans-IO: peers
//!   to connect and drop, liveness, cluster events' sequence numbers.
//! * [`dispatch`] — pulling workers (and gateways): registry, credit,
//!   heartbeats, deadlines; owned by the I/O thread.
//! * [`queues`] — per-queue settings, token bucket, tombstones, figures.
//! * [`validate`] — enqueue rules; [`retry`] — the backoff policy.
//! * [`sim`] — the whole cluster in one seeded, single-threaded
//!   simulation, with its invariants.
//! * [`cli`] — the `miyamoto-broker` command line.
//!
//! Sockets are made by `client::sockets`, shared with the gateway and the
//! Rust clients.

pub mod cli;
pub mod clock;
pub mod dispatch;
pub mod durable;
pub mod election;
pub mod fair;
pub mod journal;
pub mod membership;
pub mod node;
pub mod placement;
pub mod queues;
pub mod retry;
pub mod scheduler;
pub mod sim;
pub mod store;
pub mod validate;
pub mod zap;

pub use node::{Node, NodeConfig, StartError};
