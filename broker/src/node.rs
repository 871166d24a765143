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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use protocol::{
    BrokerMessage, ClientCommand, ClientReply, ClientRequest, ClusterEvent, Member, PeerMessage,
    ReplyBody, WorkerMessage,
};

use crate::dispatch::{self, DispatchConfig, Dispatcher, Out};
use crate::durable;
use crate::election::{self, ElectionConfig, FromElection, SavedRaft, ToElection};
use crate::journal::{self, DirDisk, Journal};
use crate::membership::{Decision, Membership};
use crate::scheduler::{self, Figures};
use crate::store::{Command, Event, Store, StoreConfig, TaskIds};
use client::sockets::{self, Bell, Doorbell};

/// Port offsets from the base port.
pub const CLIENT_PORT_OFFSET: u16 = 0;
pub const WORKER_PORT_OFFSET: u16 = 1;
pub const PEER_PORT_OFFSET: u16 = 2;
pub const EVENTS_PORT_OFFSET: u16 = 3;

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
    /// Where the node keeps its state; `None` keeps it in memory only.
    pub data: Option<DataConfig>,
    /// CURVE on every port (`--curve-dir`); `None` leaves them open.
    pub curve: Option<crate::zap::BrokerCurve>,
}

/// A node's data directory (`STORAGE.md`).
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// This node's own directory (`--data-dir` joined with its node id).
    pub dir: std::path::PathBuf,
    pub fsync: crate::journal::Fsync,
    /// Start from the last good record past damage (`--salvage-journal`).
    pub salvage: bool,
    /// Below this many free bytes on the directory's disk, new tasks are
    /// refused (`--min-free-disk`).
    pub min_free: u64,
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
            data: None,
            curve: None,
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
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Curve(String),
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    pub id: u64,
    pub client_endpoint: String,
    pub worker_endpoint: String,
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

/// This node's identity: its id (saved in its data directory, else a
/// fresh random one, so a restarted node without one joins as a new
/// member and never votes twice in a term) and the endpoints others reach
/// it at.
fn identity(config: &NodeConfig, id: u64) -> Member {
    let port = |off: u16| config.base_port.saturating_add(off);
    let host = config
        .advertise
        .clone()
        .unwrap_or_else(|| match config.bind.as_str() {
            "0.0.0.0" | "*" => "127.0.0.1".to_string(),
            b => b.to_string(),
        });
    Member {
        id,
        name: config.scheduler.node_id.clone(),
        client: endpoint(&host, port(CLIENT_PORT_OFFSET)),
        worker: endpoint(&host, port(WORKER_PORT_OFFSET)),
        peer: endpoint(&host, port(PEER_PORT_OFFSET)),
        events: endpoint(&host, port(EVENTS_PORT_OFFSET)),
    }
}

/// The sockets the I/O loop owns, bound in the caller's thread so bind
/// errors reach it, then moved once into the I/O thread.
struct Sockets {
    clients: zmq::Socket,
    workers: zmq::Socket,
    peers: zmq::Socket,
    publisher: zmq::Socket,
    subscriber: zmq::Socket,
    /// The I/O loop's end of the inproc PAIR to the election thread.
    pair: zmq::Socket,
}

impl Sockets {
    fn bind(
        ctx: &zmq::Context,
        config: &NodeConfig,
        inproc: Option<&str>,
        id: u64,
    ) -> Result<Sockets, StartError> {
        let at = |off: u16| endpoint(&config.bind, config.base_port.saturating_add(off));
        // With CURVE, each port serves the cluster's key pair and the ZAP
        // handler (already bound) admits the port's own keys.
        let serve = |s: &zmq::Socket, domain: &str| match &config.curve {
            Some(c) => client::curve::serve(s, &c.server, domain),
            None => Ok(()),
        };
        let clients = sockets::router(ctx)?;
        serve(&clients, crate::zap::PRODUCERS)?;
        bind(&clients, &at(CLIENT_PORT_OFFSET))?;
        let workers = sockets::router(ctx)?;
        serve(&workers, crate::zap::WORKERS)?;
        bind(&workers, &at(WORKER_PORT_OFFSET))?;
        if let Some(name) = inproc {
            let (client_ep, worker_ep) = inproc_endpoints(name);
            bind(&clients, &client_ep)?;
            bind(&workers, &worker_ep)?;
        }
        let peers = sockets::router(ctx)?;
        serve(&peers, crate::zap::PEERS)?;
        bind(&peers, &at(PEER_PORT_OFFSET))?;
        let publisher = sockets::publisher(ctx)?;
        serve(&publisher, crate::zap::PEERS)?;
        bind(&publisher, &at(EVENTS_PORT_OFFSET))?;
        let subscriber = sockets::subscriber(ctx, config.curve.as_ref().map(|c| &c.peer))?;
        let pair = ctx.socket(zmq::PAIR)?;
        pair.set_linger(0)?;
        pair.bind(&election_endpoint(id))?;
        Ok(Sockets {
            clients,
            workers,
            peers,
            publisher,
            subscriber,
            pair,
        })
    }
}

fn election_endpoint(id: u64) -> String {
    format!("inproc://election-{id}")
}

/// Starts the election thread; it makes its end of the PAIR itself, in
/// the thread that owns it.
fn spawn_election(
    ctx: &zmq::Context,
    config: &NodeConfig,
    me: &Member,
    saved: Option<SavedRaft>,
    raft_dir: Option<std::path::PathBuf>,
) -> std::io::Result<thread::JoinHandle<()>> {
    let ctx = ctx.clone();
    let restarted = saved.as_ref().is_some_and(SavedRaft::has_state);
    let ec = ElectionConfig {
        me: me.clone(),
        // A member restarted from its directory neither starts a cluster
        // nor waits to be added as a new node.
        bootstrap: config.join.is_none() && !restarted,
        remove_after: config.remove_after,
        saved,
        persist: raft_dir.is_some(),
    };
    let file = raft_dir.map(|d| d.join(durable::RAFT_FILE));
    thread::Builder::new()
        .name("election".into())
        .spawn(move || {
            let Ok(pair) = ctx.socket(zmq::PAIR) else {
                return;
            };
            let _ = pair.set_linger(0);
            if pair.connect(&election_endpoint(ec.me.id)).is_err() {
                return;
            }
            election::run(ec, pair, file);
        })
}

fn random_id() -> u64 {
    loop {
        let v = uuid::Uuid::new_v4().as_u64_pair().0 >> 1;
        if v != 0 {
            return v;
        }
    }
}

/// What a node starts from: its store (empty in memory, or recovered
/// from its data directory, whose journal it then writes to), its member
/// id and its saved Raft state.
struct Opened {
    store: Store,
    journal: Option<(Journal<DirDisk>, scheduler::DiskWatch)>,
    id: u64,
    saved: Option<SavedRaft>,
    /// Where the election saves the Raft state.
    raft_dir: Option<std::path::PathBuf>,
}

fn open_data(config: &NodeConfig) -> Result<Opened, StartError> {
    let now = crate::clock::now_micros();
    let mut store = Store::new(config.scheduler.clone(), now, TaskIds::Random);
    let Some(data) = &config.data else {
        return Ok(Opened {
            store,
            journal: None,
            id: random_id(),
            saved: None,
            raft_dir: None,
        });
    };
    let started = Instant::now();
    let disk = DirDisk::open(&data.dir).map_err(|e| StartError::Data(e.to_string()))?;
    let saved = match durable::read_raft(&data.dir) {
        Ok(s) => s,
        Err(e) if data.salvage => {
            // A Raft log cut short must not vote: the node joins afresh,
            // under a new id, and keeps its tasks.
            let aside = durable::set_aside(&data.dir)
                .map_err(|err| StartError::Data(format!("{e}; cannot set it aside: {err}")))?;
            tracing::warn!(error = %e, set_aside = %aside.display(), "--salvage-journal: the Raft state is damaged; joining as a new member");
            if config.join.is_none() {
                return Err(StartError::Data(format!(
                    "{e}: set aside as {}; this node must join as a new member: give it --join",
                    aside.display()
                )));
            }
            None
        }
        Err(e) => {
            return Err(StartError::Data(format!(
                "{e}; to start anyway as a new member (its tasks kept, the damaged state set aside), use --salvage-journal with --join"
            )))
        }
    };
    let saved = match saved {
        Some(s) => s,
        None => {
            let fresh = SavedRaft::fresh(random_id());
            durable::write_raft(&data.dir, &fresh).map_err(|e| {
                StartError::Data(format!("{}: cannot write: {e}", data.dir.display()))
            })?;
            fresh
        }
    };
    let id = saved.id;
    let options = journal::Options {
        fsync: data.fsync,
        salvage: data.salvage,
        ..Default::default()
    };
    // The store learns its member id first: recovered copies know which
    // replica they are. Records are replayed as the journal reads them.
    store.apply(Command::Identity(id), now, &mut Vec::new());
    store.record_changes();
    let (journal, recovered) = Journal::open_with(disk, options, |r| store.restore_one(r, now))
        .map_err(|e| StartError::Data(format!("{}: {e}", data.dir.display())))?;
    if recovered.torn_bytes > 0 {
        tracing::warn!(bytes = recovered.torn_bytes, dir = %data.dir.display(), "dropped a record cut short at the end of the journal (a crash in mid-write)");
    }
    if let Some((segment, offset, aside)) = &recovered.salvaged {
        tracing::warn!(%segment, offset, set_aside = ?aside, "--salvage-journal: started from the last good record before the damage; the damaged part was renamed, not deleted");
    }
    let found = store.finish_restore();
    tracing::info!(
        dir = %data.dir.display(),
        records = recovered.count,
        tasks = found.tasks,
        pending = found.pending,
        names = found.keys,
        replies = found.replies,
        queues = found.queues,
        journal_bytes = journal.total_bytes(),
        ms = started.elapsed().as_millis() as u64,
        member = id,
        "recovered the data directory"
    );
    let watch = scheduler::DiskWatch {
        dir: data.dir.clone(),
        min_free: data.min_free,
    };
    Ok(Opened {
        store,
        journal: Some((journal, watch)),
        id,
        saved: Some(saved),
        raft_dir: Some(data.dir.clone()),
    })
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
        // The data directory first: a second process on it is told so,
        // whatever its ports.
        let Opened {
            store,
            journal,
            id,
            saved,
            raft_dir,
        } = open_data(&config)?;
        let me = identity(&config, id);
        let restarted = saved.as_ref().is_some_and(SavedRaft::has_state);
        // Where join requests go: `--join`, or for a member restarted
        // from its directory, every other member it knew (a DEALER
        // spreads the requests over them).
        let mut join_peers = match &config.join {
            Some(j) => {
                vec![shifted(j, PEER_PORT_OFFSET).ok_or_else(|| StartError::Join(j.clone()))?]
            }
            None => Vec::new(),
        };
        if restarted && join_peers.is_empty() {
            if let Some(s) = &saved {
                join_peers = s
                    .members
                    .iter()
                    .filter(|m| m.id != id)
                    .map(|m| m.peer.clone())
                    .collect();
            }
        }
        if restarted {
            tracing::info!(
                member = id,
                "restarting as the member saved in the data directory"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        // The ZAP handler is bound before any CURVE port is.
        let zap = match &config.curve {
            Some(c) => Some(
                crate::zap::spawn(&ctx, c.admitted.clone(), stop.clone())
                    .map_err(StartError::Curve)?,
            ),
            None => None,
        };
        let peer_keys = config.curve.as_ref().map(|c| c.peer.clone());
        let sockets = Sockets::bind(&ctx, &config, inproc, me.id)?;
        let (bell, doorbell) = sockets::doorbell()?;
        let (cmd_tx, cmd_rx) = unbounded();
        let (ev_tx, ev_rx) = unbounded();
        let figures = Arc::new(Figures::default());
        let scheduler =
            scheduler::spawn(store, journal, cmd_rx, ev_tx, bell.clone(), figures.clone())?;
        let election = spawn_election(&ctx, &config, &me, saved, raft_dir)?;
        let join_dealer = if join_peers.is_empty() {
            None
        } else {
            let d = sockets::dealer(&ctx, false, peer_keys.as_ref())?;
            // A new node is answered through this connection (the leader
            // routes to `peer-ID` before it has a connection of its own);
            // a restarted member is answered on the mesh, and must not
            // take `peer-ID` from its mesh connections (a ROUTER hands an
            // identity over to its newest connection).
            let identity = if restarted { "rejoin" } else { "peer" };
            d.set_identity(format!("{identity}-{}", me.id).as_bytes())?;
            for ep in &join_peers {
                d.connect(ep)?;
            }
            Some(d)
        };
        let (id, client_endpoint, worker_endpoint) = (me.id, me.client.clone(), me.worker.clone());
        let io = {
            let stop = stop.clone();
            let node_name = config.scheduler.node_id.clone();
            thread::Builder::new().name("io".into()).spawn(move || {
                let span = tracing::info_span!("node", node = %node_name);
                let _enter = span.enter();
                let now = Instant::now();
                let mut io = IoLoop {
                    ctx: ctx.clone(),
                    s: sockets,
                    join_dealer,
                    doorbell,
                    commands: cmd_tx,
                    events: ev_rx,
                    dispatcher: Dispatcher::new(config.dispatch.clone()),
                    figures,
                    tick_every: (config.dispatch.heartbeat_interval / 4)
                        .max(Duration::from_millis(10)),
                    membership: {
                        let mut m = Membership::new(
                            me,
                            config.replicas,
                            config.scheduler.replica_offset,
                            config.join.is_some() && !restarted,
                            now,
                        );
                        if restarted {
                            m.rejoin();
                        }
                        m
                    },
                    dealers: HashMap::new(),
                    peer_keys,
                    decisions: Vec::new(),
                };
                io.run(&stop);
                let _ = io.commands.send(Command::Shutdown);
                let _ =
                    io.s.pair
                        .send_multipart(protocol::encode(&ToElection::Stop), zmq::DONTWAIT);
                drop(io);
                let _ = scheduler.join();
                let _ = election.join();
                stop.store(true, Ordering::Release);
                if let Some(zap) = zap {
                    let _ = zap.join();
                }
                drop(ctx);
            })?
        };
        tracing::info!(%client_endpoint, %worker_endpoint, node = id, "broker listening");
        Ok(Node {
            id,
            client_endpoint,
            worker_endpoint,
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
    s: Sockets,
    /// This node's CURVE keys for its peers' ports (`--curve-dir`).
    peer_keys: Option<client::curve::ClientKeys>,
    /// Connected to the `--join` target until this node is a member.
    join_dealer: Option<zmq::Socket>,
    doorbell: Doorbell,
    commands: Sender<Command>,
    events: Receiver<Event>,
    dispatcher: Dispatcher,
    figures: Arc<Figures>,
    tick_every: Duration,
    /// The roster, liveness and event sequences (sans-IO); this loop
    /// carries out its decisions.
    membership: Membership,
    /// DEALERs to every other member's peer port.
    dealers: HashMap<u64, zmq::Socket>,
    /// Decisions of the membership not yet carried out, reused.
    decisions: Vec<Decision>,
}

/// Messages taken from one socket per wakeup, so no socket starves another.
const BATCH: usize = 1000;
/// Passes over the busy sockets between two polls, while they yield,
/// and the time they may take.
const REREADS: usize = 16;
const REREAD_BUDGET: Duration = Duration::from_millis(2);

/// Which of the fixed sockets a poll found readable.
struct Readable {
    clients: bool,
    workers: bool,
    doorbell: bool,
    peers: bool,
    events: bool,
    election: bool,
    /// Any DEALER to a peer (or the join target).
    dealers: bool,
}

impl IoLoop {
    fn run(&mut self, stop: &AtomicBool) {
        let mut next_tick = Instant::now() + self.tick_every;
        let mut out = Vec::new();
        let mut first = Vec::new();
        self.membership.start(&mut first);
        self.decide(&mut first);
        loop {
            client::logging::test_fault_point("io");
            let wait = next_tick.saturating_duration_since(Instant::now());
            let Some(ready) = self.poll(wait) else {
                return;
            };
            if stop.load(Ordering::Acquire) {
                return;
            }
            if ready.clients {
                self.read_clients();
            }
            let now = Instant::now();
            if ready.workers {
                self.read_workers(now, &mut out);
            }
            if ready.peers {
                self.read_peers(now);
            }
            if ready.dealers {
                self.read_dealers(now);
            }
            if ready.events {
                self.read_events(now);
            }
            if ready.election {
                self.read_election(now);
            }
            if ready.doorbell {
                self.doorbell.clear();
            }
            // Drain events even without a ring: cheap, and covers a ring
            // that raced with the previous drain.
            self.read_events_channel(now, &mut out);
            self.reread(now, &mut out);
            if now >= next_tick {
                self.dispatcher.tick(now, &mut out);
                self.carry_out(&mut out, now);
                next_tick = now + self.tick_every;
            }
            let tasks = self.figures.tasks.load(Ordering::Relaxed);
            let mut decisions = std::mem::take(&mut self.decisions);
            self.membership.tick(now, tasks, &mut decisions);
            self.decide(&mut decisions);
            self.decisions = decisions;
        }
    }

    /// Waits up to `wait` for a socket; `None` when polling failed.
    fn poll(&self, wait: Duration) -> Option<Readable> {
        // Peers answer through their ROUTER, which reaches our DEALERs:
        // those are polled too.
        let s = &self.s;
        let mut items = vec![
            s.clients.as_poll_item(zmq::POLLIN),
            s.workers.as_poll_item(zmq::POLLIN),
            zmq::PollItem::from_fd(self.doorbell.fd(), zmq::POLLIN),
            s.peers.as_poll_item(zmq::POLLIN),
            s.subscriber.as_poll_item(zmq::POLLIN),
            s.pair.as_poll_item(zmq::POLLIN),
        ];
        items.extend(self.join_dealer.iter().map(|j| j.as_poll_item(zmq::POLLIN)));
        items.extend(self.dealers.values().map(|d| d.as_poll_item(zmq::POLLIN)));
        if let Err(e) = zmq::poll(&mut items, wait.as_millis().max(1) as i64) {
            if e != zmq::Error::EINTR {
                tracing::error!(error = %e, "poll failed; stopping the node");
                return None;
            }
        }
        let r = |i: usize| items[i].is_readable();
        Some(Readable {
            clients: r(0),
            workers: r(1),
            doorbell: r(2),
            peers: r(3),
            events: r(4),
            election: r(5),
            dealers: items[6..].iter().any(|i| i.is_readable()),
        })
    }

    /// Under load, more has arrived by now: read the busy sockets and the
    /// channel again before polling, which costs a syscall and a check of
    /// every socket. A read that finds nothing is cheap. A time budget
    /// keeps the other sockets (peers, election) and the tick from waiting
    /// on a busy stream.
    fn reread(&mut self, since: Instant, out: &mut Vec<Out>) {
        let until = since + REREAD_BUDGET;
        for _ in 0..REREADS {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let n = self.read_clients()
                + self.read_workers(now, out)
                + self.read_events_channel(now, out);
            if n == 0 {
                break;
            }
        }
    }

    /// Workers' messages waiting on the worker port (up to a batch).
    fn read_workers(&mut self, now: Instant, out: &mut Vec<Out>) -> usize {
        let mut n = 0;
        while n < BATCH {
            let Some(frames) = sockets::try_recv(&self.s.workers) else {
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

    /// What the scheduler handed over since the last look.
    fn read_events_channel(&mut self, now: Instant, out: &mut Vec<Out>) -> usize {
        let mut n = 0;
        while let Ok(ev) = self.events.try_recv() {
            n += 1;
            match ev {
                Event::Reply {
                    identity,
                    mut reply,
                } => {
                    if let ReplyBody::Stats { stats } = &mut reply.body {
                        self.add_io_stats(stats, now);
                    }
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
                Event::Publish(body) => {
                    let ev = self.membership.publish(body);
                    self.publish(&ev);
                }
            }
        }
        if n > 0 {
            self.carry_out(out, now);
        }
        n
    }

    /// Carries out the membership's decisions.
    fn decide(&mut self, decisions: &mut Vec<Decision>) {
        for d in decisions.drain(..) {
            match d {
                Decision::Connect(m) => self.connect_peer(&m),
                Decision::Disconnect(m) => {
                    self.dealers.remove(&m.id);
                    let _ = self.s.subscriber.disconnect(&m.events);
                }
                Decision::SendPeer { to, msg } => self.send_peer(to, &msg),
                Decision::Publish(ev) => self.publish(&ev),
                Decision::Store(cmd) => {
                    let _ = self.commands.send(cmd);
                }
                Decision::Election(msg) => {
                    let _ = self
                        .s
                        .pair
                        .send_multipart(protocol::encode(&msg), zmq::DONTWAIT);
                }
                Decision::Join(msg) => {
                    if let Some(d) = &self.join_dealer {
                        let _ = sockets::send_parts(d, &protocol::encode(&msg));
                    }
                }
                Decision::Joined => self.join_dealer = None,
            }
        }
    }

    /// A DEALER with identity `peer-<our id>` to a member's peer port, and
    /// a subscription to its events. It queues messages only on a live
    /// connection: a member that restarts (as itself, from its data
    /// directory) must not be handed, on reconnection, the copies and
    /// requests sent while it was down, which its peers have long settled
    /// without it (a copy adopted that late fires a task already delivered).
    fn connect_peer(&mut self, m: &Member) {
        match sockets::dealer(&self.ctx, true, self.peer_keys.as_ref()) {
            Ok(d) => {
                let _ = d.set_identity(format!("peer-{}", self.membership.me().id).as_bytes());
                let _ = d.connect(&m.peer);
                self.dealers.insert(m.id, d);
                let _ = self.s.subscriber.connect(&m.events);
            }
            Err(e) => tracing::warn!(error = %e, "cannot make a peer socket"),
        }
    }

    fn read_election(&mut self, now: Instant) {
        let mut decisions = std::mem::take(&mut self.decisions);
        for _ in 0..BATCH {
            let Some(parts) = sockets::try_recv(&self.s.pair) else {
                break;
            };
            match protocol::decode::<FromElection, _>(&parts) {
                Ok(msg) => self.membership.from_election(msg, now, &mut decisions),
                Err(e) => tracing::warn!(error = %e, "bad message from the election thread"),
            }
        }
        self.decide(&mut decisions);
        self.decisions = decisions;
    }

    fn send_peer(&self, to: u64, msg: &PeerMessage) {
        let frames = protocol::encode(msg);
        let sent = match self.dealers.get(&to) {
            Some(d) => sockets::send_parts(d, &frames).is_ok(),
            // Not (yet) in our roster: answer through the connection it
            // made to us, if any.
            None => sockets::send_routed(&self.s.peers, format!("peer-{to}").as_bytes(), &frames)
                .is_ok(),
        };
        if !sent {
            tracing::debug!(
                peer = to,
                known = self.dealers.contains_key(&to),
                "peer message dropped"
            );
        }
    }

    fn publish(&self, ev: &ClusterEvent) {
        // PUB drops at the high-water mark; subscribers count the gap.
        let _ = sockets::send_parts(&self.s.publisher, &protocol::encode(ev));
    }

    fn read_peers(&mut self, now: Instant) {
        for _ in 0..BATCH {
            let Some(frames) = sockets::try_recv(&self.s.peers) else {
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
        let msg = match protocol::decode::<PeerMessage, _>(rest) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "malformed peer message dropped");
                return;
            }
        };
        let mut decisions = std::mem::take(&mut self.decisions);
        self.membership.on_peer(msg, now, &mut decisions);
        self.decide(&mut decisions);
        self.decisions = decisions;
    }

    fn read_events(&mut self, now: Instant) {
        let mut decisions = std::mem::take(&mut self.decisions);
        for _ in 0..BATCH {
            let Some(frames) = sockets::try_recv(&self.s.subscriber) else {
                break;
            };
            match protocol::decode::<ClusterEvent, _>(&frames) {
                Ok(ev) => self.membership.on_event(ev, now, &mut decisions),
                Err(e) => tracing::debug!(error = %e, "malformed cluster event dropped"),
            }
        }
        self.decide(&mut decisions);
        self.decisions = decisions;
    }

    fn read_clients(&mut self) -> usize {
        let mut n = 0;
        while n < BATCH {
            let Some(frames) = sockets::try_recv(&self.s.clients) else {
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
                    let cluster = self.membership.cluster_info(
                        Instant::now(),
                        self.figures.tasks.load(Ordering::Relaxed),
                        self.figures.re_replicated.load(Ordering::Relaxed),
                    );
                    let reply = ClientReply {
                        request_id,
                        body: ReplyBody::Cluster { cluster },
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

    /// The parts of a `stats` answer the scheduler does not know: the
    /// workers, the cluster, the journal.
    fn add_io_stats(&self, stats: &mut protocol::NodeStats, now: Instant) {
        stats.pools = self
            .dispatcher
            .pool_figures(protocol::limits::MAX_STATS_QUEUES);
        stats.cluster = self
            .membership
            .figures(now, self.figures.re_replicated.load(Ordering::Relaxed));
        stats.journal_bytes = self.figures.journal_bytes();
        stats.journal_sync = self.figures.journal_sync();
    }

    fn send_client(&self, identity: &[u8], reply: &ClientReply) {
        if sockets::send_routed(&self.s.clients, identity, &protocol::encode(reply)).is_err() {
            tracing::debug!("reply dropped: the client is gone or full");
        }
    }

    /// Carries out the dispatcher's actions: commands to the store, and
    /// messages to workers (what cannot be sent goes back to it).
    fn carry_out(&mut self, out: &mut Vec<Out>, now: Instant) {
        dispatch::carry_out(
            self,
            out,
            |io, out| io.dispatcher.flush(out),
            |io, action, out| match action {
                Out::Schedule(cmd) => {
                    let _ = io.commands.send(cmd);
                }
                Out::Send(identity, msg) => io.send_worker(identity, msg, now, out),
            },
        );
    }

    fn send_worker(
        &mut self,
        identity: Vec<u8>,
        msg: BrokerMessage,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let Err(e) = sockets::send_routed(&self.s.workers, &identity, &protocol::encode(&msg))
        else {
            self.dispatcher.sent(&identity, now);
            return;
        };
        let tasks = match msg {
            BrokerMessage::Task { delivery, task } => vec![protocol::Dispatched { delivery, task }],
            BrokerMessage::Tasks { tasks } => tasks,
            _ => Vec::new(),
        };
        if !tasks.is_empty() {
            let unreachable = e == zmq::Error::EHOSTUNREACH;
            self.dispatcher
                .unsent(&identity, tasks, unreachable, now, out);
        }
    }
}
