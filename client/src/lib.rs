//! Miyamoto's ZeroMQ clients, shared by the broker, the gateway and any
//! Rust program that talks to a broker. No HTTP, no Raft.
//!
//! Layout:
//! * [`sockets`] — the one place libzmq sockets are made (LINGER, HWM,
//!   ROUTER options), the non-blocking send and receive helpers, and the
//!   doorbell that wakes a socket thread from other threads.
//! * [`producer`] — a blocking [`Producer`] for the request port: enqueue,
//!   cancel, get, with resends under one request id.
//! * [`session`] — the worker side of the worker dialogue as a sans-IO
//!   state machine ([`WorkerSession`]): registration, credit, heartbeats,
//!   the broker's silence, and the results kept for a `results` message.
//!   Both the blocking [`Worker`] and the gateway's broker link drive it.
//! * [`worker`] — the blocking [`Worker`] for the worker port.
//! * [`curve`] — CURVE key files (czmq/pyzmq format) and the client
//!   and server settings of a socket.
//! * [`logging`] — the log format every Miyamoto process starts with.

pub mod curve;
pub mod logging;
pub mod producer;
pub mod session;
pub mod sockets;
pub mod worker;

pub use producer::{ClientError, Producer};
pub use session::{Job, KeptResults, SessionConfig, Tick, WorkerSession};
pub use worker::Worker;
