//! A broker node: binds the sockets, starts the scheduler thread, and runs
//! the I/O loop that owns every socket.
//!
//! Threads: the caller's thread binds the sockets (so bind errors reach
//! it) and moves them once into the `io` thread; the `scheduler` thread
//! owns task state. They talk over two crossbeam channels; the scheduler
//! rings a doorbell (polled next to the sockets) when it has events.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use protocol::{ClientReply, ClientRequest, ErrorCode, ReplyBody, WorkerMessage};

use crate::dispatch::{DispatchConfig, Dispatcher, Out};
use crate::scheduler::{self, Command, Event, SchedulerConfig};
use crate::sockets::{self, Bell, Doorbell};

/// Port offsets from the base port.
pub const CLIENT_PORT_OFFSET: u16 = 0;
pub const WORKER_PORT_OFFSET: u16 = 1;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to bind, e.g. `127.0.0.1` or `0.0.0.0`.
    pub bind: String,
    /// Base port: clients on `base_port`, workers on `base_port + 1`.
    pub base_port: u16,
    pub scheduler: SchedulerConfig,
    pub dispatch: DispatchConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            bind: "127.0.0.1".into(),
            base_port: 7000,
            scheduler: SchedulerConfig::default(),
            dispatch: DispatchConfig::default(),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("cannot create a socket: {0}")]
    Socket(#[from] zmq::Error),
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Counters shared with the handle; written only by the I/O thread.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Client frames that could not be decoded (each got an error reply).
    pub malformed_requests: AtomicU64,
    /// Replies or messages that could not be sent (peer gone or full).
    pub dropped_sends: AtomicU64,
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    pub client_endpoint: String,
    pub worker_endpoint: String,
    pub counters: Arc<NodeCounters>,
    stop: Arc<AtomicBool>,
    bell: Bell,
    io: Option<thread::JoinHandle<()>>,
}

impl Node {
    /// Binds the node's sockets and starts its threads.
    pub fn start(config: NodeConfig) -> Result<Node, StartError> {
        let ctx = zmq::Context::new();
        let client_endpoint = format!(
            "tcp://{}:{}",
            config.bind,
            config.base_port + CLIENT_PORT_OFFSET
        );
        let worker_endpoint = format!(
            "tcp://{}:{}",
            config.bind,
            config.base_port + WORKER_PORT_OFFSET
        );
        let clients = sockets::router(&ctx)?;
        clients
            .bind(&client_endpoint)
            .map_err(|source| StartError::Bind {
                endpoint: client_endpoint.clone(),
                source,
            })?;
        let workers = sockets::router(&ctx)?;
        workers
            .bind(&worker_endpoint)
            .map_err(|source| StartError::Bind {
                endpoint: worker_endpoint.clone(),
                source,
            })?;

        let (bell, doorbell) = sockets::doorbell()?;
        let (cmd_tx, cmd_rx) = unbounded();
        let (ev_tx, ev_rx) = unbounded();
        let scheduler = scheduler::spawn(config.scheduler.clone(), cmd_rx, ev_tx, bell.clone())?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(NodeCounters::default());
        let io = {
            let stop = stop.clone();
            let counters = counters.clone();
            let node_id = config.scheduler.node_id.clone();
            thread::Builder::new().name("io".into()).spawn(move || {
                let span = tracing::info_span!("node", node = %node_id);
                let _enter = span.enter();
                let mut io = IoLoop {
                    clients,
                    workers,
                    doorbell,
                    commands: cmd_tx,
                    events: ev_rx,
                    dispatcher: Dispatcher::new(config.dispatch.clone()),
                    counters,
                    tick_every: (config.dispatch.heartbeat_interval / 4)
                        .max(Duration::from_millis(10)),
                };
                io.run(&stop);
                let _ = io.commands.send(Command::Shutdown);
                drop(io);
                let _ = scheduler.join();
                drop(ctx);
            })?
        };
        tracing::info!(%client_endpoint, %worker_endpoint, "broker listening");
        Ok(Node {
            client_endpoint,
            worker_endpoint,
            counters,
            stop,
            bell,
            io: Some(io),
        })
    }

    /// Stops the node and waits for its threads.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        self.bell.ring();
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }

    /// Blocks until the node stops (it only stops through [`Node::shutdown`]
    /// from another handle, so this is for `main`).
    pub fn wait(mut self) {
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

struct IoLoop {
    clients: zmq::Socket,
    workers: zmq::Socket,
    doorbell: Doorbell,
    commands: Sender<Command>,
    events: Receiver<Event>,
    dispatcher: Dispatcher,
    counters: Arc<NodeCounters>,
    tick_every: Duration,
}

/// Messages taken from one socket per wakeup, so no socket starves another.
const BATCH: usize = 1000;

impl IoLoop {
    fn run(&mut self, stop: &AtomicBool) {
        let mut next_tick = Instant::now() + self.tick_every;
        let mut out = Vec::new();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let (c, w, d) = {
                let mut items = [
                    self.clients.as_poll_item(zmq::POLLIN),
                    self.workers.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(self.doorbell.fd(), zmq::POLLIN),
                ];
                if let Err(e) = zmq::poll(&mut items, wait.as_millis().max(1) as i64) {
                    if e != zmq::Error::EINTR {
                        tracing::error!(error = %e, "poll failed; stopping the node");
                        return;
                    }
                }
                (
                    items[0].is_readable(),
                    items[1].is_readable(),
                    items[2].is_readable(),
                )
            };
            if stop.load(Ordering::Acquire) {
                return;
            }
            if c {
                self.read_clients();
            }
            let now = Instant::now();
            if w {
                for _ in 0..BATCH {
                    let Some(frames) = sockets::try_recv(&self.workers) else {
                        break;
                    };
                    let Some((identity, rest)) = frames.split_first() else {
                        continue;
                    };
                    let msg = protocol::decode::<WorkerMessage, _>(rest);
                    self.dispatcher.on_message(identity, msg, now, &mut out);
                    self.carry_out(&mut out, now);
                }
            }
            if d {
                self.doorbell.clear();
            }
            // Drain events even without a ring: cheap, and covers a ring
            // that raced with the previous drain.
            while let Ok(ev) = self.events.try_recv() {
                match ev {
                    Event::Reply { identity, reply } => {
                        self.send_client(&identity, &reply);
                    }
                    Event::Dispatch {
                        pool,
                        delivery,
                        timeout,
                        task,
                    } => {
                        self.dispatcher
                            .on_dispatch(pool, delivery, timeout, task, now, &mut out);
                        self.carry_out(&mut out, now);
                    }
                    Event::Revoke { delivery } => self.dispatcher.on_revoke(delivery),
                }
            }
            if now >= next_tick {
                self.dispatcher.tick(now, &mut out);
                self.carry_out(&mut out, now);
                next_tick = now + self.tick_every;
            }
        }
    }

    fn read_clients(&mut self) {
        for _ in 0..BATCH {
            let Some(frames) = sockets::try_recv(&self.clients) else {
                break;
            };
            let Some((identity, rest)) = frames.split_first() else {
                continue;
            };
            match protocol::decode::<ClientRequest, _>(rest) {
                Ok(request) => {
                    let _ = self.commands.send(Command::Request {
                        identity: identity.clone(),
                        request,
                    });
                }
                Err(e) => {
                    self.counters
                        .malformed_requests
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "malformed client request");
                    let reply = ClientReply {
                        request_id: protocol::frames::peek_request_id(rest).unwrap_or_default(),
                        body: ReplyBody::Error {
                            code: e.code(),
                            reason: e.to_string(),
                        },
                    };
                    self.send_client(identity, &reply);
                }
            }
        }
    }

    fn send_client(&self, identity: &[u8], reply: &ClientReply) {
        if sockets::send_routed(&self.clients, identity, &protocol::encode(reply)).is_err() {
            self.counters.dropped_sends.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn carry_out(&mut self, out: &mut Vec<Out>, now: Instant) {
        let mut i = 0;
        while i < out.len() {
            // `unsent` may push more actions; handle them in order.
            let action = std::mem::replace(&mut out[i], Out::Schedule(Command::Shutdown));
            i += 1;
            match action {
                Out::Schedule(Command::Shutdown) => {}
                Out::Schedule(cmd) => {
                    let _ = self.commands.send(cmd);
                }
                Out::Send(identity, msg) => {
                    let delivery = match &msg {
                        protocol::BrokerMessage::Task { delivery, .. } => Some(*delivery),
                        _ => None,
                    };
                    match sockets::send_routed(&self.workers, &identity, &protocol::encode(&msg)) {
                        Ok(()) => self.dispatcher.sent(&identity, now),
                        Err(e) => {
                            self.counters.dropped_sends.fetch_add(1, Ordering::Relaxed);
                            if let Some(d) = delivery {
                                let unreachable = e == zmq::Error::EHOSTUNREACH;
                                let mut more = Vec::new();
                                self.dispatcher.unsent(&identity, d, unreachable, &mut more);
                                out.extend(more);
                            }
                        }
                    }
                }
            }
        }
        out.clear();
    }
}

/// An error reply, for callers building their own.
pub fn error_reply(request_id: String, code: ErrorCode, reason: String) -> ClientReply {
    ClientReply {
        request_id,
        body: ReplyBody::Error { code, reason },
    }
}
