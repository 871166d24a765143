//! A broker node: binds the sockets, starts the scheduler and election
//! threads, and runs the I/O loop that owns every socket.
//!
//! Threads: the caller's thread binds the sockets (so bind errors reach
//! it) and moves them once into the `io` thread. The `scheduler` thread
//! owns task state; it talks to the I/O loop over two crossbeam channels
//! and rings a doorbell (polled next to the sockets) when it has events.
//! The `election` thread runs Raft and talks to the I/O loop over an inproc
//! PAIR socket.
//!
//! Ports: base (clients, ROUTER), base + 1 (workers, ROUTER), base + 2
//! (peers, ROUTER; each node connects a DEALER with identity `peer-<id>`
//! to every other member: the Harmony pattern), base + 3 (cluster events,
//! PUB; every node subscribes to every other member's).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use protocol::{
    ClientCommand, ClientReply, ClientRequest, ClusterEvent, ClusterInfo, EventBody, Member,
    NodeInfo, PeerMessage, ReplyBody, WorkerMessage,
};

use crate::dispatch::{DispatchConfig, Dispatcher, Out};
use crate::election::{self, ElectionConfig, FromElection, ToElection};
use crate::scheduler::{self, Figures};
use crate::store::{Command, Event, StoreConfig};
use client::sockets::{self, Bell, Doorbell};

/// Port offsets from the base port.
pub const CLIENT_PORT_OFFSET: u16 = 0;
pub const WORKER_PORT_OFFSET: u16 = 1;
pub const PEER_PORT_OFFSET: u16 = 2;
pub const EVENTS_PORT_OFFSET: u16 = 3;

/// How often a node publishes its heartbeat and reports liveness to Raft.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A member not heard from this long is shown as not alive.
const ALIVE_WITHIN: Duration = Duration::from_secs(3);
/// How often a joining node repeats its request.
const JOIN_EVERY: Duration = Duration::from_secs(1);

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to bind, e.g. `127.0.0.1` or `0.0.0.0`.
    pub bind: String,
    /// Host other nodes and gateways use to reach this one (default: the
    /// bind address, or 127.0.0.1 when binding every interface).
    pub advertise: Option<String>,
    /// Base port: clients on `base_port`, workers on +1, peers on +2,
    /// events on +3.
    pub base_port: u16,
    /// Any member's base endpoint (`tcp://HOST:PORT`) to join its cluster;
    /// `None` starts a new cluster.
    pub join: Option<String>,
    /// Nodes holding each task.
    pub replicas: u32,
    /// The leader removes a member unreachable this long.
    pub remove_after: Duration,
    pub scheduler: StoreConfig,
    pub dispatch: DispatchConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            bind: "127.0.0.1".into(),
            advertise: None,
            base_port: 7000,
            join: None,
            replicas: 2,
            remove_after: Duration::from_secs(10),
            scheduler: StoreConfig::default(),
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
    #[error("invalid --join endpoint {0:?}: expected tcp://HOST:PORT")]
    Join(String),
}

/// Counters shared with the handle; written only by the I/O thread.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Client frames that could not be decoded (each got an error reply).
    pub malformed_requests: AtomicU64,
    /// Replies or messages that could not be sent (peer gone or full).
    pub dropped_sends: AtomicU64,
    /// Peer frames that could not be decoded (dropped).
    pub malformed_peer_messages: AtomicU64,
    /// Cluster events missed (sequence gaps).
    pub missed_events: AtomicU64,
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    pub id: u64,
    pub client_endpoint: String,
    pub worker_endpoint: String,
    pub counters: Arc<NodeCounters>,
    stop: Arc<AtomicBool>,
    bell: Bell,
    io: Option<thread::JoinHandle<()>>,
}

fn endpoint(host: &str, port: u16) -> String {
    format!("tcp://{host}:{port}")
}

fn bind(s: &zmq::Socket, ep: &str) -> Result<(), StartError> {
    s.bind(ep).map_err(|source| StartError::Bind {
        endpoint: ep.to_string(),
        source,
    })
}

/// The in-process client and worker endpoints of a node started with
/// [`Node::start_in`] and `inproc` set to `name`.
pub fn inproc_endpoints(name: &str) -> (String, String) {
    (
        format!("inproc://{name}-clients"),
        format!("inproc://{name}-workers"),
    )
}

/// `tcp://HOST:PORT` → `tcp://HOST:PORT+offset`.
fn shifted(ep: &str, offset: u16) -> Option<String> {
    let (head, port) = ep.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if !head.starts_with("tcp://") {
        return None;
    }
    Some(format!("{head}:{}", port.checked_add(offset)?))
}

impl Node {
    /// Binds the node's sockets and starts its threads.
    pub fn start(config: NodeConfig) -> Result<Node, StartError> {
        Node::start_in(config, zmq::Context::new(), None)
    }

    /// Like [`Node::start`], in the given ZeroMQ context. With `inproc`
    /// set, the client and worker ROUTERs also bind
    /// [`inproc_endpoints`]`(inproc)`, so a gateway in the same process and
    /// context reaches them without TCP or ZeroMQ's I/O threads.
    pub fn start_in(
        config: NodeConfig,
        ctx: zmq::Context,
        inproc: Option<&str>,
    ) -> Result<Node, StartError> {
        let port = |off: u16| config.base_port.saturating_add(off);
        let host = config
            .advertise
            .clone()
            .unwrap_or_else(|| match config.bind.as_str() {
                "0.0.0.0" | "*" => "127.0.0.1".to_string(),
                b => b.to_string(),
            });
        let id = loop {
            let v = uuid::Uuid::new_v4().as_u64_pair().0 >> 1;
            if v != 0 {
                break v;
            }
        };
        let me = Member {
            id,
            name: config.scheduler.node_id.clone(),
            client: endpoint(&host, port(CLIENT_PORT_OFFSET)),
            worker: endpoint(&host, port(WORKER_PORT_OFFSET)),
            peer: endpoint(&host, port(PEER_PORT_OFFSET)),
            events: endpoint(&host, port(EVENTS_PORT_OFFSET)),
        };
        let join_peer = match &config.join {
            Some(j) => {
                Some(shifted(j, PEER_PORT_OFFSET).ok_or_else(|| StartError::Join(j.clone()))?)
            }
            None => None,
        };

        let clients = sockets::router(&ctx)?;
        bind(&clients, &endpoint(&config.bind, port(CLIENT_PORT_OFFSET)))?;
        let workers = sockets::router(&ctx)?;
        bind(&workers, &endpoint(&config.bind, port(WORKER_PORT_OFFSET)))?;
        if let Some(name) = inproc {
            let (client_ep, worker_ep) = inproc_endpoints(name);
            bind(&clients, &client_ep)?;
            bind(&workers, &worker_ep)?;
        }
        let peers = sockets::router(&ctx)?;
        bind(&peers, &endpoint(&config.bind, port(PEER_PORT_OFFSET)))?;
        let publisher = sockets::publisher(&ctx)?;
        bind(
            &publisher,
            &endpoint(&config.bind, port(EVENTS_PORT_OFFSET)),
        )?;
        let subscriber = sockets::subscriber(&ctx)?;
        let pair = ctx.socket(zmq::PAIR)?;
        pair.set_linger(0)?;
        let pair_endpoint = format!("inproc://election-{id}");
        pair.bind(&pair_endpoint)?;

        let (bell, doorbell) = sockets::doorbell()?;
        let (cmd_tx, cmd_rx) = unbounded();
        let (ev_tx, ev_rx) = unbounded();
        let figures = Arc::new(Figures::default());
        let scheduler = scheduler::spawn(
            config.scheduler.clone(),
            cmd_rx,
            ev_tx,
            bell.clone(),
            figures.clone(),
        )?;
        let election = {
            let ctx = ctx.clone();
            let ec = ElectionConfig {
                me: me.clone(),
                bootstrap: config.join.is_none(),
                remove_after: config.remove_after,
            };
            thread::Builder::new()
                .name("election".into())
                .spawn(move || {
                    // The PAIR is made here, in the thread that owns it.
                    let Ok(pair) = ctx.socket(zmq::PAIR) else {
                        return;
                    };
                    let _ = pair.set_linger(0);
                    if pair.connect(&pair_endpoint).is_err() {
                        return;
                    }
                    election::run(ec, pair);
                })?
        };
        let join_dealer = match &join_peer {
            Some(ep) => {
                let d = sockets::dealer(&ctx, false)?;
                d.set_identity(format!("peer-{id}").as_bytes())?;
                d.connect(ep)?;
                Some(d)
            }
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(NodeCounters::default());
        let client_endpoint = me.client.clone();
        let worker_endpoint = me.worker.clone();
        let io = {
            let stop = stop.clone();
            let counters = counters.clone();
            let node_name = config.scheduler.node_id.clone();
            thread::Builder::new().name("io".into()).spawn(move || {
                let span = tracing::info_span!("node", node = %node_name);
                let _enter = span.enter();
                let now = Instant::now();
                let mut io = IoLoop {
                    ctx: ctx.clone(),
                    clients,
                    workers,
                    peers,
                    publisher,
                    subscriber,
                    pair,
                    join_dealer,
                    doorbell,
                    commands: cmd_tx,
                    events: ev_rx,
                    dispatcher: Dispatcher::new(config.dispatch.clone()),
                    counters,
                    figures,
                    tick_every: (config.dispatch.heartbeat_interval / 4)
                        .max(Duration::from_millis(10)),
                    me,
                    replicas: config.replicas.max(1),
                    replica_offset: config.scheduler.replica_offset,
                    members: Vec::new(),
                    dealers: HashMap::new(),
                    leader: None,
                    term: 0,
                    epoch: 0,
                    heard: HashMap::new(),
                    started: now,
                    tasks_by_node: HashMap::new(),
                    seq: 0,
                    last_seq: HashMap::new(),
                    last_beat: now,
                    last_join: now - JOIN_EVERY,
                };
                io.run(&stop);
                let _ = io.commands.send(Command::Shutdown);
                let _ = io
                    .pair
                    .send_multipart(protocol::encode(&ToElection::Stop), zmq::DONTWAIT);
                drop(io);
                let _ = scheduler.join();
                let _ = election.join();
                drop(ctx);
            })?
        };
        tracing::info!(%client_endpoint, %worker_endpoint, node = id, "broker listening");
        Ok(Node {
            id,
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

    /// Blocks until the node's I/O loop ends (for `main`).
    pub fn wait(mut self) {
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

struct IoLoop {
    ctx: zmq::Context,
    clients: zmq::Socket,
    workers: zmq::Socket,
    peers: zmq::Socket,
    publisher: zmq::Socket,
    subscriber: zmq::Socket,
    pair: zmq::Socket,
    /// Connected to the `--join` target until this node is a member.
    join_dealer: Option<zmq::Socket>,
    doorbell: Doorbell,
    commands: Sender<Command>,
    events: Receiver<Event>,
    dispatcher: Dispatcher,
    counters: Arc<NodeCounters>,
    figures: Arc<Figures>,
    tick_every: Duration,
    me: Member,
    replicas: u32,
    replica_offset: Duration,
    /// The roster as the election thread last reported it.
    members: Vec<Member>,
    /// DEALERs to every other member's peer port.
    dealers: HashMap<u64, zmq::Socket>,
    leader: Option<u64>,
    term: u64,
    epoch: u64,
    /// When each peer was last heard from (any message or event).
    heard: HashMap<u64, Instant>,
    started: Instant,
    tasks_by_node: HashMap<u64, u64>,
    /// Sequence of this node's published events.
    seq: u64,
    last_seq: HashMap<u64, u64>,
    last_beat: Instant,
    last_join: Instant,
}

/// Messages taken from one socket per wakeup, so no socket starves another.
const BATCH: usize = 1000;
/// Passes over the busy sockets between two polls, while they yield,
/// and the time they may take.
const REREADS: usize = 16;
const REREAD_BUDGET: Duration = Duration::from_millis(2);

impl IoLoop {
    fn run(&mut self, stop: &AtomicBool) {
        let mut next_tick = Instant::now() + self.tick_every;
        let mut out = Vec::new();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            // Peers answer through their ROUTER, which reaches our DEALERs:
            // those are polled too.
            let dealer_ids: Vec<u64> = self.dealers.keys().copied().collect();
            let (ready, dealers_ready) = {
                let mut items = vec![
                    self.clients.as_poll_item(zmq::POLLIN),
                    self.workers.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(self.doorbell.fd(), zmq::POLLIN),
                    self.peers.as_poll_item(zmq::POLLIN),
                    self.subscriber.as_poll_item(zmq::POLLIN),
                    self.pair.as_poll_item(zmq::POLLIN),
                ];
                if let Some(j) = &self.join_dealer {
                    items.push(j.as_poll_item(zmq::POLLIN));
                }
                for id in &dealer_ids {
                    if let Some(d) = self.dealers.get(id) {
                        items.push(d.as_poll_item(zmq::POLLIN));
                    }
                }
                if let Err(e) = zmq::poll(&mut items, wait.as_millis().max(1) as i64) {
                    if e != zmq::Error::EINTR {
                        tracing::error!(error = %e, "poll failed; stopping the node");
                        return;
                    }
                }
                let r: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
                let fixed = [r[0], r[1], r[2], r[3], r[4], r[5]];
                (fixed, r.iter().skip(6).any(|x| *x))
            };
            if stop.load(Ordering::Acquire) {
                return;
            }
            if ready[0] {
                self.read_clients();
            }
            let now = Instant::now();
            if ready[1] {
                self.read_workers(now, &mut out);
            }
            if ready[3] {
                self.read_peers(now);
            }
            if dealers_ready {
                self.read_dealers(now);
            }
            if ready[4] {
                self.read_events(now);
            }
            if ready[5] {
                self.read_election();
            }
            if ready[2] {
                self.doorbell.clear();
            }
            // Drain events even without a ring: cheap, and covers a ring
            // that raced with the previous drain.
            self.read_events_channel(now, &mut out);
            // Under load, more has arrived by now: read the busy sockets and
            // the channel again before polling, which costs a syscall and a
            // check of every socket. A read that finds nothing is cheap.
            // A time budget keeps the other sockets (peers, election) and
            // the tick from waiting on a busy stream.
            let until = now + REREAD_BUDGET;
            for _ in 0..REREADS {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                let n = self.read_clients()
                    + self.read_workers(now, &mut out)
                    + self.read_events_channel(now, &mut out);
                if n == 0 {
                    break;
                }
            }
            if now >= next_tick {
                self.dispatcher.tick(now, &mut out);
                self.carry_out(&mut out, now);
                next_tick = now + self.tick_every;
            }
            if now.duration_since(self.last_beat) >= HEARTBEAT_EVERY {
                self.last_beat = now;
                self.beat(now);
            }
        }
    }

    /// Workers' messages waiting on the worker port (up to a batch).
    fn read_workers(&mut self, now: Instant, out: &mut Vec<Out>) -> usize {
        let mut n = 0;
        while n < BATCH {
            let Some(frames) = sockets::try_recv(&self.workers) else {
                break;
            };
            n += 1;
            let Some((identity, rest)) = frames.split_first() else {
                continue;
            };
            let msg = protocol::decode_hot::<WorkerMessage, _>(rest);
            self.dispatcher.on_message(identity, msg, now, out);
        }
        // Once for the whole read: the tasks freed by these results go out
        // together to workers that take batches.
        if n > 0 {
            self.carry_out(out, now);
        }
        n
    }

    /// What the scheduler and election handed over since the last look.
    fn read_events_channel(&mut self, now: Instant, out: &mut Vec<Out>) -> usize {
        let mut n = 0;
        while let Ok(ev) = self.events.try_recv() {
            n += 1;
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
                        .on_dispatch(pool, delivery, timeout, task, now, out);
                    // A long burst of due tasks starts leaving before the
                    // whole of it is read.
                    if n % BATCH == 0 {
                        self.carry_out(out, now);
                    }
                }
                Event::Revoke { delivery } => self.dispatcher.on_revoke(delivery),
                Event::ToPeer { to, msg } => self.send_peer(to, &msg),
                Event::Publish(body) => self.publish(body),
            }
        }
        if n > 0 {
            self.carry_out(out, now);
        }
        n
    }

    fn is_member(&self) -> bool {
        self.members.iter().any(|m| m.id == self.me.id)
    }

    /// Heartbeat, liveness report to Raft, and join retries.
    fn beat(&mut self, now: Instant) {
        let tasks = self.figures.tasks.load(Ordering::Relaxed);
        self.publish(EventBody::Heartbeat {
            tasks,
            epoch: self.epoch,
        });
        let liveness: Vec<(u64, u64)> = self
            .members
            .iter()
            .filter(|m| m.id != self.me.id)
            .map(|m| {
                let since = self.heard.get(&m.id).copied().unwrap_or(self.started);
                (m.id, now.duration_since(since).as_millis() as u64)
            })
            .collect();
        self.to_election(&ToElection::Liveness(liveness));
        if self.is_member() {
            self.join_dealer = None;
        } else if let Some(d) = &self.join_dealer {
            if now.duration_since(self.last_join) >= JOIN_EVERY {
                self.last_join = now;
                let msg = PeerMessage::Join {
                    member: self.me.clone(),
                };
                let _ = sockets::send_parts(d, &protocol::encode(&msg));
            }
        }
    }

    fn to_election(&self, msg: &ToElection) {
        let _ = self
            .pair
            .send_multipart(protocol::encode(msg), zmq::DONTWAIT);
    }

    fn read_election(&mut self) {
        for _ in 0..BATCH {
            let Some(parts) = sockets::try_recv(&self.pair) else {
                break;
            };
            match protocol::decode::<FromElection, _>(&parts) {
                Ok(FromElection::Send { to, message }) => {
                    let msg = PeerMessage::Raft {
                        from: self.me.id,
                        message,
                    };
                    self.send_peer(to, &msg);
                }
                Ok(FromElection::ForwardJoin { leader, member }) => {
                    self.send_peer(leader, &PeerMessage::Join { member });
                }
                Ok(FromElection::State {
                    epoch,
                    members,
                    leader,
                    term,
                }) => self.on_state(epoch, members, leader, term),
                Err(e) => tracing::warn!(error = %e, "bad message from the election thread"),
            }
        }
    }

    /// A new view from Raft: connect to new members, drop gone ones, and
    /// tell the scheduler.
    fn on_state(&mut self, epoch: u64, members: Vec<Member>, leader: Option<u64>, term: u64) {
        if leader != self.leader {
            tracing::info!(?leader, term, "leader changed");
        }
        self.leader = leader;
        self.term = term;
        let changed = epoch != self.epoch || members != self.members;
        self.epoch = epoch;
        if !changed {
            return;
        }
        let me = self.me.id;
        for m in &members {
            if m.id == me || self.dealers.contains_key(&m.id) {
                continue;
            }
            match sockets::dealer(&self.ctx, false) {
                Ok(d) => {
                    let _ = d.set_identity(format!("peer-{me}").as_bytes());
                    let _ = d.connect(&m.peer);
                    self.dealers.insert(m.id, d);
                    let _ = self.subscriber.connect(&m.events);
                    self.heard.entry(m.id).or_insert_with(Instant::now);
                }
                Err(e) => tracing::warn!(error = %e, "cannot make a peer socket"),
            }
        }
        let gone: Vec<u64> = self
            .dealers
            .keys()
            .copied()
            .filter(|id| !members.iter().any(|m| m.id == *id))
            .collect();
        for id in gone {
            self.dealers.remove(&id);
            if let Some(m) = self.members.iter().find(|m| m.id == id) {
                let _ = self.subscriber.disconnect(&m.events);
            }
            self.heard.remove(&id);
        }
        self.members = members;
        tracing::info!(epoch, members = self.members.len(), "roster changed");
        let ids: Vec<u64> = if self.is_member() {
            self.members.iter().map(|m| m.id).collect()
        } else {
            Vec::new()
        };
        let _ = self.commands.send(Command::Roster {
            me,
            members: ids,
            replicas: self.replicas,
        });
    }

    fn send_peer(&self, to: u64, msg: &PeerMessage) {
        let frames = protocol::encode(msg);
        let sent = match self.dealers.get(&to) {
            Some(d) => sockets::send_parts(d, &frames).is_ok(),
            // Not (yet) in our roster: answer through the connection it
            // made to us, if any.
            None => {
                sockets::send_routed(&self.peers, format!("peer-{to}").as_bytes(), &frames).is_ok()
            }
        };
        if !sent {
            tracing::debug!(
                peer = to,
                known = self.dealers.contains_key(&to),
                "peer message dropped"
            );
            self.counters.dropped_sends.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn publish(&mut self, body: EventBody) {
        self.seq += 1;
        let ev = ClusterEvent {
            from: self.me.id,
            seq: self.seq,
            body,
        };
        if sockets::send_parts(&self.publisher, &protocol::encode(&ev)).is_err() {
            self.counters.dropped_sends.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read_peers(&mut self, now: Instant) {
        for _ in 0..BATCH {
            let Some(frames) = sockets::try_recv(&self.peers) else {
                break;
            };
            let Some((_, rest)) = frames.split_first() else {
                continue;
            };
            self.on_peer_frames(rest, now);
        }
    }

    /// Answers that peers routed back to our DEALERs.
    fn read_dealers(&mut self, now: Instant) {
        let mut batch = Vec::new();
        let sockets = self.dealers.values().chain(self.join_dealer.iter());
        for d in sockets {
            for _ in 0..BATCH {
                match sockets::try_recv(d) {
                    Some(f) => batch.push(f),
                    None => break,
                }
            }
        }
        for frames in batch {
            self.on_peer_frames(&frames, now);
        }
    }

    fn on_peer_frames(&mut self, rest: &[Vec<u8>], now: Instant) {
        {
            let msg = match protocol::decode::<PeerMessage, _>(rest) {
                Ok(m) => m,
                Err(e) => {
                    self.counters
                        .malformed_peer_messages
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "malformed peer message dropped");
                    return;
                }
            };
            match msg {
                PeerMessage::Raft { from, message } => {
                    self.heard.insert(from, now);
                    self.to_election(&ToElection::Raft(message));
                }
                PeerMessage::Join { member } => self.to_election(&ToElection::Join(member)),
                other => {
                    let from = match &other {
                        PeerMessage::Store { from, .. }
                        | PeerMessage::StoreResult { from, .. }
                        | PeerMessage::Request { from, .. }
                        | PeerMessage::Reply { from, .. } => Some(*from),
                        _ => None,
                    };
                    if let Some(f) = from {
                        self.heard.insert(f, now);
                    }
                    let _ = self.commands.send(Command::Peer(other));
                }
            }
        }
    }

    fn read_events(&mut self, now: Instant) {
        for _ in 0..BATCH {
            let Some(frames) = sockets::try_recv(&self.subscriber) else {
                break;
            };
            let Ok(ev) = protocol::decode::<ClusterEvent, _>(&frames) else {
                self.counters
                    .malformed_peer_messages
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if ev.from == self.me.id {
                continue;
            }
            self.heard.insert(ev.from, now);
            let last = self.last_seq.insert(ev.from, ev.seq);
            if let Some(l) = last {
                if ev.seq > l + 1 {
                    self.counters
                        .missed_events
                        .fetch_add(ev.seq - l - 1, Ordering::Relaxed);
                }
            }
            match ev.body {
                EventBody::Heartbeat { tasks, .. } => {
                    self.tasks_by_node.insert(ev.from, tasks);
                }
                body => {
                    let _ = self.commands.send(Command::PeerEvent(body));
                }
            }
        }
    }

    fn cluster_info(&self) -> ClusterInfo {
        let now = Instant::now();
        let nodes = self
            .members
            .iter()
            .map(|m| NodeInfo {
                id: m.id,
                name: m.name.clone(),
                client: m.client.clone(),
                worker: m.worker.clone(),
                alive: m.id == self.me.id
                    || self
                        .heard
                        .get(&m.id)
                        .is_some_and(|t| now.duration_since(*t) < ALIVE_WITHIN),
                leader: Some(m.id) == self.leader,
                tasks: if m.id == self.me.id {
                    self.figures.tasks.load(Ordering::Relaxed)
                } else {
                    self.tasks_by_node.get(&m.id).copied().unwrap_or(0)
                },
            })
            .collect();
        ClusterInfo {
            node: self.me.id,
            leader: self.leader,
            term: self.term,
            epoch: self.epoch,
            replicas: self.replicas,
            replica_offset: self.replica_offset.as_secs_f64(),
            nodes,
            re_replicated: self.figures.re_replicated.load(Ordering::Relaxed),
        }
    }

    fn read_clients(&mut self) -> usize {
        let mut n = 0;
        while n < BATCH {
            let Some(frames) = sockets::try_recv(&self.clients) else {
                break;
            };
            n += 1;
            let Some((identity, rest)) = frames.split_first() else {
                continue;
            };
            match protocol::decode_hot::<ClientRequest, _>(rest) {
                Ok(ClientRequest {
                    request_id,
                    command: ClientCommand::ClusterInfo,
                }) => {
                    let reply = ClientReply {
                        request_id,
                        body: ReplyBody::Cluster {
                            cluster: self.cluster_info(),
                        },
                    };
                    self.send_client(identity, &reply);
                }
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
        n
    }

    fn send_client(&self, identity: &[u8], reply: &ClientReply) {
        if sockets::send_routed(&self.clients, identity, &protocol::encode(reply)).is_err() {
            self.counters.dropped_sends.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn carry_out(&mut self, out: &mut Vec<Out>, now: Instant) {
        let mut i = 0;
        loop {
            // Outboxes first; `unsent` may assign more, so again until done.
            self.dispatcher.flush(out);
            if i == out.len() {
                break;
            }
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
                        let sent =
                            sockets::send_routed(&self.workers, &identity, &protocol::encode(&msg));
                        match sent {
                            Ok(()) => self.dispatcher.sent(&identity, now),
                            Err(e) => {
                                self.counters.dropped_sends.fetch_add(1, Ordering::Relaxed);
                                let tasks = match msg {
                                    protocol::BrokerMessage::Task { delivery, task } => {
                                        vec![protocol::Dispatched { delivery, task }]
                                    }
                                    protocol::BrokerMessage::Tasks { tasks } => tasks,
                                    _ => Vec::new(),
                                };
                                if !tasks.is_empty() {
                                    let unreachable = e == zmq::Error::EHOSTUNREACH;
                                    self.dispatcher
                                        .unsent(&identity, tasks, unreachable, now, out);
                                }
                            }
                        }
                    }
                }
            }
        }
        out.clear();
    }
}
