//! A deterministic simulation of a whole cluster, in the manner of
//! FoundationDB's simulator and TigerBeetle's VOPR.
//!
//! N nodes — each its real [`Store`], [`Dispatcher`], [`Election`] and
//! [`Membership`], the same code the broker runs — share one thread, a
//! virtual clock and a virtual network that delays, drops, duplicates and
//! reorders messages, cuts nodes off and crashes them. Producers enqueue
//! and cancel, pull workers (each a real [`WorkerSession`]) answer, fail
//! or hang. Everything random comes from one seed, so a run replays
//! exactly: `cargo run -p miyamoto-broker --example simulate -- --seed N`.
//!
//! What stands in for the I/O loop here is the glue of [`crate::node`]:
//! store events to the dispatcher and the network, dispatcher actions to
//! the store and the workers, membership decisions carried out. A crashed
//! node loses its memory, as a broker without a data directory does, and
//! comes back as a new member joining through a live one.
//!
//! After every step the run checks its invariants ([`Sim::check`]):
//! * every acknowledged task is delivered, or still held by a live node,
//!   while one of the nodes that held it survives (a task whose every
//!   holder died is counted as lost with them, not as a violation);
//! * at most one leader per term;
//! * no node's roster epoch goes backwards;
//! * a node that has recorded a task as cancelled never starts a delivery
//!   of it (a cancel acknowledged before every holder heard of it may
//!   still race with a delivery: such deliveries are counted);
//! * while the roster is stable, a queue's concurrency and rate limits
//!   hold cluster-wide (deliveries running on all nodes together, and
//!   deliveries started in any second).
//!
//! At the end of a calm spell without faults, every acknowledged task that
//! still has a copy must have been delivered or dead-lettered. Duplicate
//! deliveries are counted and reported, not hidden.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use client::{Job, SessionConfig, Tick, WorkerSession};
use protocol::{
    BrokerMessage, ClientCommand, ClientReply, ClientRequest, ClusterEvent, DeliveryResult, Member,
    Outcome, PeerMessage, QueueConfig, ReplyBody, TaskSpec, TaskState, WorkerMessage,
};
use uuid::Uuid;

use crate::dispatch::{DispatchConfig, Dispatcher, Out};
use crate::election::{Election, ElectionConfig, FromElection, TICK};
use crate::membership::{Decision, Membership};
use crate::store::{splitmix64, Command, Event, Store, StoreConfig, TaskIds};

/// The queue whose rate and concurrency limits are checked.
pub const LIMITED: &str = "limited";
/// Its limits: per second, burst, at once.
const LIMITED_RATE: f64 = 6.0;
const LIMITED_BURST: u32 = 6;
const LIMITED_CONCURRENCY: u32 = 6;
/// A stable roster this long before the limits are checked: longer than
/// a delivery may last (its timeout plus the result grace), so no
/// delivery started under an older share is still counted.
const LIMITS_SETTLE: Duration = Duration::from_secs(5);
/// Unix µs at the start of every run.
const T0_US: u64 = 1_800_000_000_000_000;
/// Pool the simulated workers serve.
const POOL: &str = "sim";
/// A producer resends a request unanswered this long, at most twice.
const RESEND_AFTER: Duration = Duration::from_millis(2500);
const SENDS: u32 = 3;
/// How often a node's dispatcher ticks, as the I/O loop's tick does.
const DISPATCH_TICK: Duration = Duration::from_millis(250);
/// How often a worker looks at its clock.
const WORKER_TICK: Duration = Duration::from_millis(100);

/// What a run is made of.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Members at the start.
    pub nodes: usize,
    pub workers: usize,
    pub producers: usize,
    /// Virtual time with faults.
    pub faulty: Duration,
    /// Virtual time without faults at the end.
    pub calm: Duration,
    /// Record the faults and the producers' requests and replies (for a
    /// replay).
    pub trace: bool,
    /// With `trace`: also every state change of the tasks whose id starts
    /// with this, and every peer message but Raft's.
    pub watch: Option<String>,
    /// A fault the product must not survive, to prove the checks bite.
    pub sabotage: Option<Sabotage>,
}

/// Faults outside the model, for the tests of the checks themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sabotage {
    /// At this virtual time, a live node forgets every task (its store
    /// starts afresh) without crashing: acknowledged tasks vanish while
    /// their holder lives.
    WipeStore(Duration),
}

impl SimConfig {
    /// The default run of `seed`: 3 nodes, 3 workers, 2 producers, a
    /// minute with faults and half a minute of calm.
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            nodes: 3,
            workers: 3,
            producers: 2,
            faulty: Duration::from_secs(60),
            calm: Duration::from_secs(30),
            trace: false,
            watch: None,
            sabotage: None,
        }
    }
}

/// What a run saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    /// Enqueues acknowledged as `enqueued`.
    pub acknowledged: usize,
    /// Acknowledged tasks delivered at least once with success.
    pub delivered: usize,
    /// Deliveries a worker received, in all.
    pub deliveries: u64,
    /// Deliveries of a task that had already succeeded once.
    pub duplicates: u64,
    /// Acknowledged tasks lost because every node holding them died.
    pub lost_with_holders: usize,
    /// Of those, the ones acknowledged with `replicas` 1.
    pub lost_with_one_copy: usize,
    /// Resent requests stored as a second task while the first was still
    /// held by a node the resend's coordinator could not reach.
    pub stored_twice: u64,
    /// Resent requests stored again because every node that held their
    /// first task had died.
    pub stored_again_after_loss: u64,
    /// Acknowledged tasks dead-lettered (attempts exhausted).
    pub dead_lettered: usize,
    pub cancels_acknowledged: usize,
    /// Deliveries started after the cancel was acknowledged, by a node
    /// that had not heard of it yet.
    pub delivered_after_cancel: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Highest Raft term reached.
    pub terms: u64,
    pub violations: Vec<String>,
    /// With [`SimConfig::trace`]: one line per step.
    pub trace: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this run exactly.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run -p miyamoto-broker --example simulate -- --seed {}",
            self.seed
        )
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} steps, {} acknowledged, {} delivered, {} deliveries ({} duplicates), \
             {} lost with all holders ({} acknowledged with one copy), {} resends stored twice, {} stored again after loss, {} dead-lettered, {} cancels ({} deliveries after), \
             {} crashes, {} partitions, {} messages ({} dropped, {} duplicated), term {}, {} violations",
            self.seed,
            self.steps,
            self.acknowledged,
            self.delivered,
            self.deliveries,
            self.duplicates,
            self.lost_with_holders,
            self.lost_with_one_copy,
            self.stored_twice,
            self.stored_again_after_loss,
            self.dead_lettered,
            self.cancels_acknowledged,
            self.delivered_after_cancel,
            self.crashes,
            self.partitions,
            self.messages,
            self.dropped,
            self.duplicated,
            self.terms,
            self.violations.len()
        )
    }
}

/// Runs one simulation.
pub fn run(config: SimConfig) -> Report {
    let mut sim = Sim::new(config);
    sim.run();
    sim.report
}

/// The seeded generator of every random choice (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// `0..n` (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(self.below(span + 1))
    }
}

/// A message on the virtual network.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Msg {
    Peer {
        to: u64,
        msg: PeerMessage,
    },
    Event {
        to: u64,
        ev: ClusterEvent,
    },
    Request {
        to: u64,
        producer: usize,
        req: ClientRequest,
    },
    Reply {
        producer: usize,
        reply: ClientReply,
    },
    ToBroker {
        to: u64,
        worker: usize,
        identity: Vec<u8>,
        msg: WorkerMessage,
    },
    ToWorker {
        worker: usize,
        identity: Vec<u8>,
        msg: BrokerMessage,
    },
}

impl Msg {
    /// (from, to) nodes for partitions; `None` for a party that is no node.
    fn ends(&self, from: Option<u64>) -> (Option<u64>, Option<u64>) {
        match self {
            Msg::Peer { to, .. } | Msg::Event { to, .. } => (from, Some(*to)),
            Msg::Request { to, .. } | Msg::ToBroker { to, .. } => (None, Some(*to)),
            Msg::Reply { .. } | Msg::ToWorker { .. } => (from, None),
        }
    }
}

/// What the virtual clock wakes.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Wake {
    Deliver {
        from: Option<u64>,
        msg: Msg,
    },
    Node(u64),
    Worker(usize),
    JobDone {
        worker: usize,
        identity: Vec<u8>,
        delivery: u64,
        task_id: String,
        outcome: Outcome,
    },
    Producer(usize),
    Crash,
    Restart,
    Partition,
    Heal,
    Sabotage,
}

struct SimNode {
    alive: bool,
    store: Store,
    dispatcher: Dispatcher,
    election: Election,
    membership: Membership,
    /// Members whose events it subscribes to.
    subs: BTreeSet<u64>,
    /// The member its `--join` goes to, until it is in.
    join_via: Option<u64>,
    next_raft_tick: Instant,
    next_dispatch_tick: Instant,
    /// When the node is woken next (at most one wake-up is queued).
    wake_at: Option<Instant>,
}

/// A pull worker registered with every live node, as the gateway is
/// (each broker hands out only the tasks it holds).
struct SimWorker {
    batch: bool,
    links: BTreeMap<u64, Link>,
}

/// One worker's registration with one node.
struct Link {
    session: WorkerSession,
    /// Its identity on the current connection.
    identity: Vec<u8>,
    generation: u32,
}

#[derive(Debug, Clone)]
struct Outstanding {
    req: ClientRequest,
    node: u64,
    sends: u32,
    sent_at: Instant,
}

struct Producer {
    outstanding: BTreeMap<String, Outstanding>,
    next_req: u64,
}

/// What the run knows of each task, for the invariants.
#[derive(Default)]
struct Ledger {
    /// Live copies: node → state.
    copies: HashMap<Uuid, BTreeMap<u64, TaskState>>,
    /// Every node that ever held a copy.
    ever_held: HashMap<Uuid, BTreeSet<u64>>,
    /// Tasks each node holds (for crashes).
    held_by: HashMap<u64, HashSet<Uuid>>,
    acknowledged: BTreeSet<Uuid>,
    /// The queue of each acknowledged task.
    queues: HashMap<Uuid, String>,
    /// Tasks a worker answered with success, and how many times.
    succeeded: HashMap<Uuid, u64>,
    cancel_acked: BTreeSet<Uuid>,
    /// The tasks delivered for each producer request.
    by_request: HashMap<String, BTreeSet<Uuid>>,
    /// Acknowledged with `replicas` 1.
    one_copy: HashSet<Uuid>,
    /// (node, task) pairs the node recorded as cancelled.
    known_cancelled: HashSet<(u64, Uuid)>,
    lost: BTreeSet<Uuid>,
    /// Acknowledged tasks whose copies changed this step.
    touched: BTreeSet<Uuid>,
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    /// Virtual time: `base` + the run's offset.
    base: Instant,
    now: Instant,
    queue: BTreeMap<(Instant, u64), Wake>,
    seq: u64,
    nodes: BTreeMap<u64, SimNode>,
    workers: Vec<SimWorker>,
    producers: Vec<Producer>,
    /// Pairs of nodes that cannot reach each other.
    cut: BTreeSet<(u64, u64)>,
    ledger: Ledger,
    /// Each node's roster epoch, as last seen.
    epochs: BTreeMap<u64, u64>,
    leaders: BTreeMap<u64, u64>,
    /// Since when the roster has been the live nodes, on every live node.
    stable_since: Option<Instant>,
    /// Deliveries of the limited queue started, by time.
    limited_starts: VecDeque<Instant>,
    next_node_id: u64,
    /// Violations seen, by kind.
    kinds: BTreeMap<&'static str, u64>,
    report: Report,
}

fn member(id: u64) -> Member {
    Member {
        id,
        name: format!("node{id}"),
        client: format!("sim://{id}/client"),
        worker: format!("sim://{id}/worker"),
        peer: format!("sim://{id}/peer"),
        events: format!("sim://{id}/events"),
    }
}

fn store_config(id: u64) -> StoreConfig {
    let defaults = QueueConfig {
        timeout: 1.0,
        min_backoff: 0.1,
        max_backoff: 2.0,
        max_attempts: 20,
        ..QueueConfig::default()
    };
    let limited = QueueConfig {
        rate: LIMITED_RATE,
        burst: LIMITED_BURST,
        max_concurrent: LIMITED_CONCURRENCY,
        ..defaults.clone()
    };
    StoreConfig {
        node_id: format!("node{id}"),
        queue_defaults: defaults,
        queues: vec![(LIMITED.to_string(), limited)],
        replica_offset: Duration::from_secs(2),
        limits: crate::store::StoreLimits {
            max_task_bytes: u64::MAX,
            max_tasks: usize::MAX,
            max_queues: usize::MAX,
        },
    }
}

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let base = Instant::now();
        let mut sim = Sim {
            rng: Rng(config.seed ^ 0x5EED_5EED_5EED_5EED),
            report: Report {
                seed: config.seed,
                ..Report::default()
            },
            config,
            base,
            now: base,
            queue: BTreeMap::new(),
            seq: 0,
            nodes: BTreeMap::new(),
            workers: Vec::new(),
            producers: Vec::new(),
            cut: BTreeSet::new(),
            ledger: Ledger::default(),
            epochs: BTreeMap::new(),
            leaders: BTreeMap::new(),
            stable_since: None,
            limited_starts: VecDeque::new(),
            next_node_id: 1,
            kinds: BTreeMap::new(),
        };
        let first = sim.add_node(None);
        for _ in 1..sim.config.nodes {
            sim.add_node(Some(first));
        }
        for w in 0..sim.config.workers {
            sim.workers.push(SimWorker {
                batch: w % 2 == 0,
                links: BTreeMap::new(),
            });
            let first = base + sim.rng.between(Duration::ZERO, WORKER_TICK);
            sim.at(first, Wake::Worker(w));
        }
        for p in 0..sim.config.producers {
            sim.producers.push(Producer {
                outstanding: BTreeMap::new(),
                next_req: 0,
            });
            // Producers start once a leader can have formed the cluster.
            let start = base + Duration::from_secs(3) + sim.rng.between(Duration::ZERO, TICK);
            sim.at(start, Wake::Producer(p));
        }
        if let Some(Sabotage::WipeStore(at)) = sim.config.sabotage {
            sim.at(base + at, Wake::Sabotage);
        }
        let first_fault = base + Duration::from_secs(8);
        sim.at(first_fault, Wake::Crash);
        let first_cut = base
            + sim
                .rng
                .between(Duration::from_secs(10), Duration::from_secs(20));
        sim.at(first_cut, Wake::Partition);
        sim
    }

    fn faults_on(&self) -> bool {
        self.now < self.base + self.config.faulty
    }

    fn end(&self) -> Instant {
        self.base + self.config.faulty + self.config.calm
    }

    fn now_us(&self) -> u64 {
        T0_US + self.now.duration_since(self.base).as_micros() as u64
    }

    fn at(&mut self, when: Instant, wake: Wake) {
        self.seq += 1;
        self.queue.insert((when, self.seq), wake);
    }

    /// A new node: the first bootstraps a cluster, the others join
    /// through `via`.
    fn add_node(&mut self, via: Option<u64>) -> u64 {
        let id = self.next_node_id;
        self.next_node_id += 1;
        let m = member(id);
        let mut store = Store::new(
            store_config(id),
            self.now_us(),
            TaskIds::seeded(self.rng.next()),
        );
        store.observe_changes();
        let election = match Election::new(
            &ElectionConfig {
                me: m.clone(),
                bootstrap: via.is_none(),
                remove_after: Duration::from_secs(4),
            },
            self.rng.next(),
        ) {
            Ok(e) => e,
            Err(e) => {
                self.violation("raft", format!("node {id}: Raft would not start: {e}"));
                return id;
            }
        };
        let dispatch = DispatchConfig {
            result_grace: Duration::from_secs(2),
            ..DispatchConfig::default()
        };
        let node = SimNode {
            membership: Membership::new(m, 2, Duration::from_secs(2), via.is_some(), self.now),
            alive: true,
            store,
            dispatcher: Dispatcher::new(dispatch),
            election,
            subs: BTreeSet::new(),
            join_via: via,
            next_raft_tick: self.now + TICK,
            next_dispatch_tick: self.now + DISPATCH_TICK,
            wake_at: None,
        };
        self.nodes.insert(id, node);
        self.wake_node(id, self.now);
        // A bootstrapped node's first view comes from its election.
        if via.is_none() {
            self.election_input(id, None);
        }
        id
    }

    fn live_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.alive)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Records a broken invariant: the first three of each kind in full,
    /// the rest counted.
    fn violation(&mut self, kind: &'static str, what: String) {
        let seen = self.kinds.entry(kind).or_default();
        *seen += 1;
        if *seen <= 3 {
            let at = self.now.duration_since(self.base);
            self.report.violations.push(format!("at {at:?}: {what}"));
        } else if *seen == 4 {
            self.report
                .violations
                .push(format!("(more of the kind \"{kind}\" follow, not shown)"));
        }
    }

    fn trace(&mut self, line: impl FnOnce() -> String) {
        if self.config.trace {
            let at = self.now.duration_since(self.base).as_micros();
            let l = line();
            self.report.trace.push(format!("{at:>10} {l}"));
        }
    }

    fn run(&mut self) {
        let end = self.end();
        while let Some(((when, _), wake)) = self.queue.pop_first() {
            if when > end {
                break;
            }
            self.now = when;
            self.report.steps += 1;
            self.step(wake);
            self.check();
        }
        self.now = end;
        self.final_check();
    }

    fn step(&mut self, wake: Wake) {
        match wake {
            Wake::Deliver { from, msg } => self.deliver(from, msg),
            Wake::Node(id) => self.node_wake(id),
            Wake::Worker(w) => self.worker_tick(w),
            Wake::JobDone {
                worker,
                identity,
                delivery,
                task_id,
                outcome,
            } => self.job_done(worker, identity, delivery, task_id, outcome),
            Wake::Producer(p) => self.producer_tick(p),
            Wake::Crash => self.crash(),
            Wake::Restart => {
                let via = self.live_ids();
                if !via.is_empty() {
                    let v = via[self.rng.below(via.len() as u64) as usize];
                    let id = self.add_node(Some(v));
                    self.trace(|| format!("node {id} starts, joining through {v}"));
                }
            }
            Wake::Partition => self.partition(),
            Wake::Heal => {
                self.cut.clear();
                self.trace(|| "partition healed".into());
            }
            Wake::Sabotage => self.sabotage(),
        }
    }

    // ---- the network ----

    /// Sends `msg` from node `from` (or a client): delayed, perhaps
    /// dropped, duplicated or held back, while faults are on.
    fn send(&mut self, from: Option<u64>, msg: Msg) {
        self.report.messages += 1;
        let faults = self.faults_on();
        if faults && self.rng.chance(0.01) {
            self.report.dropped += 1;
            return;
        }
        let copies = if faults && self.rng.chance(0.01) {
            self.report.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if faults && self.rng.chance(0.02) {
                self.rng
                    .between(Duration::from_millis(50), Duration::from_millis(500))
            } else {
                self.rng
                    .between(Duration::from_micros(100), Duration::from_millis(3))
            };
            self.at(
                self.now + delay,
                Wake::Deliver {
                    from,
                    msg: msg.clone(),
                },
            );
        }
    }

    fn reachable(&self, from: Option<u64>, to: Option<u64>) -> bool {
        match (from, to) {
            (Some(a), Some(b)) => !self.cut.contains(&(a.min(b), a.max(b))),
            _ => true,
        }
    }

    fn deliver(&mut self, from: Option<u64>, msg: Msg) {
        let (a, b) = msg.ends(from);
        if !self.reachable(a, b) {
            self.report.dropped += 1;
            return;
        }
        match msg {
            Msg::Peer { to, msg } => {
                if self.config.trace && self.config.watch.is_some() {
                    let line = match &msg {
                        PeerMessage::Raft { .. } => None,
                        m => Some(format!("peer message from {from:?} to {to}: {m:?}")),
                    };
                    if let Some(l) = line {
                        let at = self.now.duration_since(self.base).as_micros();
                        let l: String = l.chars().take(300).collect();
                        self.report.trace.push(format!("{at:>10} {l}"));
                    }
                }
                if self.alive(to) {
                    let mut d = Vec::new();
                    let now = self.now;
                    if let Some(n) = self.nodes.get_mut(&to) {
                        n.membership.on_peer(msg, now, &mut d);
                    }
                    self.decide(to, d);
                }
            }
            Msg::Event { to, ev } => {
                if self.alive(to) {
                    let mut d = Vec::new();
                    let now = self.now;
                    if let Some(n) = self.nodes.get_mut(&to) {
                        n.membership.on_event(ev, now, &mut d);
                    }
                    self.decide(to, d);
                }
            }
            Msg::Request { to, producer, req } => {
                if self.alive(to) {
                    let identity = format!("p{producer}").into_bytes();
                    self.apply(
                        to,
                        Command::Request {
                            identity,
                            request: req,
                        },
                    );
                }
            }
            Msg::Reply { producer, reply } => self.producer_reply(producer, reply),
            Msg::ToBroker {
                to,
                worker,
                identity,
                msg,
            } => {
                if self.alive(to) {
                    let _ = worker;
                    let mut out = Vec::new();
                    let now = self.now;
                    if let Some(n) = self.nodes.get_mut(&to) {
                        n.dispatcher.on_message(&identity, Ok(msg), now, &mut out);
                    }
                    self.carry_out(to, out);
                }
            }
            Msg::ToWorker {
                worker,
                identity,
                msg,
            } => self.worker_receive(worker, identity, msg),
        }
    }

    fn alive(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.alive)
    }

    // ---- the glue of the I/O loop, per node ----

    fn wake_node(&mut self, id: u64, when: Instant) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if n.wake_at.is_some_and(|w| w <= when) {
            return;
        }
        n.wake_at = Some(when);
        self.at(when, Wake::Node(id));
    }

    /// A node's timers: the store's, the dispatcher's, the election's and
    /// the membership's.
    fn node_wake(&mut self, id: u64) {
        let now = self.now;
        let now_us = self.now_us();
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if !n.alive || n.wake_at != Some(now) {
            return; // a stale wake-up
        }
        n.wake_at = None;
        let mut events = Vec::new();
        n.store.fire_due(now_us, &mut events);
        let mut out = Vec::new();
        if now >= n.next_dispatch_tick {
            n.dispatcher.tick(now, &mut out);
            n.next_dispatch_tick = now + DISPATCH_TICK;
        }
        let raft = now >= n.next_raft_tick;
        if raft {
            n.next_raft_tick = now + TICK;
        }
        let mut d = Vec::new();
        n.membership.tick(now, n.store.len() as u64, &mut d);
        self.store_events(id, events);
        self.carry_out(id, out);
        self.decide(id, d);
        if raft {
            self.election_input(id, None);
        }
        self.reschedule(id);
    }

    /// Schedules the node's next wake-up: its earliest timer.
    fn reschedule(&mut self, id: u64) {
        let Some(n) = self.nodes.get(&id) else {
            return;
        };
        if !n.alive {
            return;
        }
        let mut next = n.next_raft_tick.min(n.next_dispatch_tick);
        if let Some(d) = n.store.next_deadline() {
            let at = self.base + Duration::from_micros(d.saturating_sub(T0_US));
            next = next.min(at.max(self.now));
        }
        self.wake_node(id, next);
    }

    fn apply(&mut self, id: u64, cmd: Command) {
        let now_us = self.now_us();
        let mut events = Vec::new();
        if let Some(n) = self.nodes.get_mut(&id) {
            n.store.apply(cmd, now_us, &mut events);
        }
        self.store_events(id, events);
        self.reschedule(id);
    }

    fn store_events(&mut self, id: u64, events: Vec<Event>) {
        self.take_changes(id);
        let now = self.now;
        let mut out = Vec::new();
        for ev in events {
            match ev {
                Event::Reply { identity, reply } => {
                    let producer = parse_index(&identity, b'p');
                    if let Some(producer) = producer {
                        self.send(Some(id), Msg::Reply { producer, reply });
                    }
                }
                Event::Dispatch {
                    pool,
                    delivery,
                    timeout,
                    task,
                } => {
                    self.on_dispatch(id, &task.id, &task.queue);
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.dispatcher
                            .on_dispatch(pool, delivery, timeout, task, now, &mut out);
                    }
                }
                Event::Revoke { delivery } => {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.dispatcher.on_revoke(delivery);
                    }
                }
                Event::ToPeer { to, msg } => self.send(Some(id), Msg::Peer { to, msg }),
                Event::Publish(body) => {
                    let Some(n) = self.nodes.get_mut(&id) else {
                        continue;
                    };
                    let ev = n.membership.publish(body);
                    self.publish(id, ev);
                }
            }
        }
        self.carry_out(id, out);
    }

    /// To every live node subscribed to `from`'s events.
    fn publish(&mut self, from: u64, ev: ClusterEvent) {
        let to: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(id, n)| **id != from && n.alive && n.subs.contains(&from))
            .map(|(id, _)| *id)
            .collect();
        for t in to {
            self.send(
                Some(from),
                Msg::Event {
                    to: t,
                    ev: ev.clone(),
                },
            );
        }
    }

    fn carry_out(&mut self, id: u64, mut out: Vec<Out>) {
        let now = self.now;
        crate::dispatch::carry_out(
            self,
            &mut out,
            |sim, out| {
                if let Some(n) = sim.nodes.get_mut(&id) {
                    n.dispatcher.flush(out);
                }
            },
            |sim, action, _| match action {
                Out::Schedule(cmd) => sim.apply(id, cmd),
                Out::Send(identity, msg) => {
                    let Some(worker) = parse_worker(&identity) else {
                        return;
                    };
                    if let Some(n) = sim.nodes.get_mut(&id) {
                        n.dispatcher.sent(&identity, now);
                    }
                    let msg = Msg::ToWorker {
                        worker,
                        identity,
                        msg,
                    };
                    sim.send(Some(id), msg);
                }
            },
        );
    }

    fn decide(&mut self, id: u64, decisions: Vec<Decision>) {
        for d in decisions {
            match d {
                Decision::Connect(m) => {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.subs.insert(m.id);
                    }
                }
                Decision::Disconnect(m) => {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.subs.remove(&m.id);
                    }
                }
                Decision::SendPeer { to, msg } => self.send(Some(id), Msg::Peer { to, msg }),
                Decision::Publish(ev) => self.publish(id, ev),
                Decision::Store(cmd) => self.apply(id, cmd),
                Decision::Election(msg) => self.election_input(id, Some(msg)),
                Decision::Join(msg) => {
                    let via = self.nodes.get(&id).and_then(|n| n.join_via);
                    if let Some(to) = via {
                        self.send(Some(id), Msg::Peer { to, msg });
                    }
                }
                Decision::Joined => {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.join_via = None;
                    }
                }
            }
        }
    }

    /// A message for the node's election (`None`: a tick).
    fn election_input(&mut self, id: u64, msg: Option<crate::election::ToElection>) {
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let out: Vec<FromElection> = match msg {
            Some(m) => n.election.handle(m),
            None => n.election.tick(),
        };
        let mut d = Vec::new();
        for m in out {
            n.membership.from_election(m, now, &mut d);
        }
        self.decide(id, d);
    }

    // ---- workers ----

    fn worker_send(&mut self, w: usize, node: u64, msg: WorkerMessage) {
        let now = self.now;
        let Some(link) = self.workers[w].links.get_mut(&node) else {
            return;
        };
        link.session.sent(now);
        let identity = link.identity.clone();
        self.send(
            None,
            Msg::ToBroker {
                to: node,
                worker: w,
                identity,
                msg,
            },
        );
    }

    /// The link of worker `w` whose connection has `identity`.
    fn link_of(&self, w: usize, identity: &[u8]) -> Option<u64> {
        self.workers[w]
            .links
            .iter()
            .find(|(_, l)| l.identity == identity)
            .map(|(node, _)| *node)
    }

    fn worker_receive(&mut self, w: usize, identity: Vec<u8>, msg: BrokerMessage) {
        let now = self.now;
        // A message for a connection it no longer has is lost with it.
        let Some(node) = self.link_of(w, &identity) else {
            return;
        };
        let mut jobs: Vec<Job> = Vec::new();
        let mut out = Vec::new();
        if let Some(link) = self.workers[w].links.get_mut(&node) {
            link.session.receive(msg, now, |j| jobs.push(j), &mut out);
        }
        for m in out {
            self.worker_send(w, node, m);
        }
        for job in jobs {
            self.report.deliveries += 1;
            self.one_task_per_request(&job);
            if let Ok(id) = Uuid::parse_str(&job.task.id) {
                if self.ledger.succeeded.contains_key(&id) {
                    self.report.duplicates += 1;
                }
            }
            // Most succeed, some fail, a few never answer (the broker's
            // deadline retries them); in the calm, all succeed.
            let roll = if self.faults_on() {
                self.rng.below(100)
            } else {
                99
            };
            let outcome = match roll {
                0..=3 => None,
                4..=13 => Some(Outcome::Failure),
                _ => Some(Outcome::Success),
            };
            if let Some(outcome) = outcome {
                let took = self
                    .rng
                    .between(Duration::from_millis(1), Duration::from_millis(300));
                self.at(
                    now + took,
                    Wake::JobDone {
                        worker: w,
                        identity: identity.clone(),
                        delivery: job.delivery,
                        task_id: job.task.id,
                        outcome,
                    },
                );
            }
        }
    }

    /// A request resent to another node must not make a second task.
    fn one_task_per_request(&mut self, job: &Job) {
        let Some((_, request)) = job.task.params.iter().find(|(k, _)| k == "request") else {
            return;
        };
        let Ok(id) = Uuid::parse_str(&job.task.id) else {
            return;
        };
        let task = job.task.id.clone();
        self.trace(|| format!("a worker gets {task} of request {request}"));
        let tasks = self.ledger.by_request.entry(request.clone()).or_default();
        if !tasks.insert(id) || tasks.len() == 1 {
            return;
        }
        let tasks = tasks.clone();
        // While a live node still holds the first task, the resend's
        // coordinator could not reach it (a partition, lost messages)
        // and kept the task rather than risk losing it: a duplicate the
        // at-least-once design allows, counted. Otherwise the first was
        // lost with every node that knew of it, and storing the resend
        // again is what keeps the request.
        let known = tasks.iter().filter(|t| **t != id).any(|t| {
            self.ledger
                .copies
                .get(t)
                .is_some_and(|c| c.keys().any(|n| self.alive(*n)))
        });
        if known {
            self.report.stored_twice += 1;
            self.trace(|| format!("request {request} stored again as {id}"));
        } else {
            self.report.stored_again_after_loss += 1;
        }
    }

    fn job_done(
        &mut self,
        w: usize,
        identity: Vec<u8>,
        delivery: u64,
        task_id: String,
        outcome: Outcome,
    ) {
        // The connection the job came on is gone: so is its result.
        let Some(node) = self.link_of(w, &identity) else {
            return;
        };
        if outcome == Outcome::Success {
            if let Ok(id) = Uuid::parse_str(&task_id) {
                *self.ledger.succeeded.entry(id).or_default() += 1;
            }
        }
        let result = DeliveryResult {
            delivery,
            task_id,
            outcome,
            status: None,
            reason: (outcome == Outcome::Failure).then(|| "simulated failure".into()),
            retry_after: None,
            responded: true,
            body: None,
            no_retry: false,
        };
        let now = self.now;
        let mut out = Vec::new();
        if let Some(link) = self.workers[w].links.get_mut(&node) {
            link.session.report(result, now, &mut out);
        }
        for m in out {
            self.worker_send(w, node, m);
        }
    }

    /// A worker's clock: registrations with nodes it has not met, kept
    /// results sent, heartbeats, and new connections to silent nodes.
    fn worker_tick(&mut self, w: usize) {
        let now = self.now;
        let live = self.live_ids();
        let batch = self.workers[w].batch;
        self.workers[w].links.retain(|node, _| live.contains(node));
        for node in &live {
            if self.workers[w].links.contains_key(node) {
                continue;
            }
            let mut config = SessionConfig::new(&[POOL], 4, &format!("w{w}"), batch);
            config.broker_expiry = Duration::from_secs(3);
            let link = Link {
                session: WorkerSession::new(config, now),
                identity: format!("w{w}.{node}.0").into_bytes(),
                generation: 0,
            };
            let ready = link.session.ready();
            self.workers[w].links.insert(*node, link);
            self.worker_send(w, *node, ready);
        }
        for node in live {
            let mut out = Vec::new();
            let Some(link) = self.workers[w].links.get_mut(&node) else {
                continue;
            };
            link.session.flush(&mut out);
            match link.session.tick(now) {
                Tick::Heartbeat => out.push(WorkerMessage::Heartbeat),
                Tick::Reconnect => {
                    link.generation += 1;
                    link.identity = format!("w{w}.{node}.{}", link.generation).into_bytes();
                    out.push(link.session.renewed(now));
                }
                Tick::Nothing => {}
            }
            for m in out {
                self.worker_send(w, node, m);
            }
        }
        self.at(now + WORKER_TICK, Wake::Worker(w));
    }

    // ---- producers ----

    fn producer_tick(&mut self, p: usize) {
        let now = self.now;
        self.producer_resends(p);
        if self.faults_on() {
            let live = self.live_ids();
            if !live.is_empty() {
                let node = live[self.rng.below(live.len() as u64) as usize];
                self.producers[p].next_req += 1;
                let request_id = format!("p{p}-{}", self.producers[p].next_req);
                let command = self.next_command(&request_id);
                let req = ClientRequest {
                    request_id,
                    command,
                };
                let producer = &mut self.producers[p];
                producer.outstanding.insert(
                    req.request_id.clone(),
                    Outstanding {
                        req: req.clone(),
                        node,
                        sends: 1,
                        sent_at: now,
                    },
                );
                let rid = req.request_id.clone();
                self.trace(|| format!("producer {p} sends {rid} to node {node}"));
                self.send(
                    None,
                    Msg::Request {
                        to: node,
                        producer: p,
                        req,
                    },
                );
            }
        }
        if now < self.end() {
            let next = self
                .rng
                .between(Duration::from_millis(10), Duration::from_millis(90));
            self.at(now + next, Wake::Producer(p));
        }
    }

    fn next_command(&mut self, request_id: &str) -> ClientCommand {
        let roll = self.rng.below(100);
        if roll < 6 && !self.ledger.acknowledged.is_empty() {
            // Cancel a task acknowledged earlier (the most recent tenth).
            let n = self.ledger.acknowledged.len() as u64;
            let k = n - 1 - self.rng.below(n.div_ceil(10));
            let id = self.ledger.acknowledged.iter().nth(k as usize).copied();
            if let Some(id) = id {
                let queue = self.queue_of(&id).unwrap_or_else(|| "default".into());
                return ClientCommand::Cancel {
                    queue,
                    id: id.to_string(),
                };
            }
        }
        // Within the limited queue's rate: it drains, so every task can be
        // delivered by the end.
        let queue = if self.rng.chance(0.1) {
            LIMITED
        } else {
            "default"
        };
        let countdown = self.rng.below(3000) as f64 / 1000.0;
        let name = self
            .rng
            .chance(0.1)
            .then(|| format!("n{}", self.rng.below(200)));
        ClientCommand::Enqueue {
            queue: queue.into(),
            task: TaskSpec {
                url: format!("zmq://{POOL}"),
                countdown: Some(countdown),
                name,
                // The request it came from, for the check that a resent
                // request is stored once.
                params: vec![("request".into(), request_id.into())],
                ..TaskSpec::default()
            },
            wait: None,
        }
    }

    fn queue_of(&self, id: &Uuid) -> Option<String> {
        self.ledger.queues.get(id).cloned()
    }

    fn producer_resends(&mut self, p: usize) {
        let now = self.now;
        let due: Vec<String> = self.producers[p]
            .outstanding
            .iter()
            .filter(|(_, o)| now.duration_since(o.sent_at) >= RESEND_AFTER)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let Some(o) = self.producers[p].outstanding.get_mut(&k) else {
                continue;
            };
            if o.sends >= SENDS {
                self.producers[p].outstanding.remove(&k);
                continue;
            }
            o.sends += 1;
            o.sent_at = now;
            let (mut node, req) = (o.node, o.req.clone());
            if !self.alive(node) {
                let live = self.live_ids();
                if live.is_empty() {
                    continue;
                }
                node = live[self.rng.below(live.len() as u64) as usize];
                if let Some(o) = self.producers[p].outstanding.get_mut(&k) {
                    o.node = node;
                }
            }
            self.trace(|| format!("producer {p} resends {k} to node {node}"));
            self.send(
                None,
                Msg::Request {
                    to: node,
                    producer: p,
                    req,
                },
            );
        }
    }

    fn producer_reply(&mut self, p: usize, reply: ClientReply) {
        self.trace(|| format!("producer {p} gets {}: {:?}", reply.request_id, reply.body));
        let was = self.producers[p].outstanding.remove(&reply.request_id);
        match reply.body {
            ReplyBody::Enqueued {
                id,
                queue,
                replicas,
                ..
            } => {
                let Ok(id) = Uuid::parse_str(&id) else {
                    self.violation(
                        "bad id",
                        format!("an enqueue answered with a bad id {id:?}"),
                    );
                    return;
                };
                if self.ledger.acknowledged.insert(id) {
                    self.ledger.queues.insert(id, queue);
                    if replicas < 2 {
                        self.ledger.one_copy.insert(id);
                    }
                    self.ledger.touched.insert(id);
                    if !self.ledger.ever_held.contains_key(&id) {
                        self.violation(
                            "never held",
                            format!("task {id} was acknowledged but no node ever held it"),
                        );
                    }
                }
            }
            ReplyBody::Cancelled { id } => {
                if let Ok(id) = Uuid::parse_str(&id) {
                    self.ledger.cancel_acked.insert(id);
                }
            }
            ReplyBody::Error { code, reason } => {
                let _ = was;
                self.trace(|| format!("producer {p}: error {code:?}: {reason}"));
            }
            _ => {}
        }
    }

    // ---- faults ----

    fn crash(&mut self) {
        let now = self.now;
        if !self.faults_on() {
            return;
        }
        let live = self.live_ids();
        // One failure at a time: a node crashes only when the cluster has
        // healed from the last one (every node back and in the roster, the
        // dead removed). Nodes without a data directory come back as new
        // members, so a second failure before that can leave no majority
        // of the roster alive, and the cluster cannot recover by itself.
        if !self.healthy() {
            self.at(now + Duration::from_secs(1), Wake::Crash);
            return;
        }
        if live.len() > 1 {
            let id = live[self.rng.below(live.len() as u64) as usize];
            self.report.crashes += 1;
            if let Some(n) = self.nodes.get_mut(&id) {
                n.alive = false;
            }
            self.trace(|| format!("node {id} crashes"));
            // Its memory is gone.
            self.forget_copies(id);
            let back = self
                .rng
                .between(Duration::from_secs(2), Duration::from_secs(6));
            self.at(now + back, Wake::Restart);
        }
        let next = self
            .rng
            .between(Duration::from_secs(6), Duration::from_secs(15));
        self.at(now + next, Wake::Crash);
    }

    fn partition(&mut self) {
        let now = self.now;
        if !self.faults_on() {
            return;
        }
        let live = self.live_ids();
        if live.len() >= 2 && self.cut.is_empty() {
            let alone = live[self.rng.below(live.len() as u64) as usize];
            for other in &live {
                if *other != alone {
                    self.cut.insert((alone.min(*other), alone.max(*other)));
                }
            }
            self.report.partitions += 1;
            self.trace(|| format!("node {alone} is cut off"));
            let heal = self
                .rng
                .between(Duration::from_millis(500), Duration::from_secs(3));
            self.at(now + heal, Wake::Heal);
        }
        let next = self
            .rng
            .between(Duration::from_secs(8), Duration::from_secs(20));
        self.at(now + next, Wake::Partition);
    }

    fn sabotage(&mut self) {
        let now_us = self.now_us();
        for id in self.live_ids() {
            let mut store = Store::new(store_config(id), now_us, TaskIds::seeded(self.rng.next()));
            store.observe_changes();
            if let Some(n) = self.nodes.get_mut(&id) {
                n.store = store;
            }
            self.forget_copies(id);
        }
        self.trace(|| "sabotage: every live node forgets its tasks".into());
    }

    /// Node `id`'s copies are gone (it crashed, or was sabotaged).
    fn forget_copies(&mut self, id: u64) {
        if let Some(held) = self.ledger.held_by.remove(&id) {
            for t in held {
                if let Some(c) = self.ledger.copies.get_mut(&t) {
                    c.remove(&id);
                }
                self.ledger.touched.insert(t);
            }
        }
    }

    // ---- invariants ----

    fn take_changes(&mut self, id: u64) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let changes = n.store.take_changes();
        if self.config.trace {
            if let Some(w) = &self.config.watch {
                for c in changes
                    .iter()
                    .filter(|c| c.id.to_string().starts_with(w.as_str()))
                {
                    let at = self.now.duration_since(self.base).as_micros();
                    self.report.trace.push(format!(
                        "{at:>10} node {id}: task {} -> {:?}",
                        c.id, c.state
                    ));
                }
            }
        }
        for c in changes {
            let l = &mut self.ledger;
            match c.state {
                Some(state) => {
                    l.copies.entry(c.id).or_default().insert(id, state);
                    l.ever_held.entry(c.id).or_default().insert(id);
                    l.held_by.entry(id).or_default().insert(c.id);
                    if state == TaskState::Cancelled {
                        l.known_cancelled.insert((id, c.id));
                    }
                }
                None => {
                    if let Some(m) = l.copies.get_mut(&c.id) {
                        m.remove(&id);
                    }
                    if let Some(h) = l.held_by.get_mut(&id) {
                        h.remove(&c.id);
                    }
                }
            }
            l.touched.insert(c.id);
        }
    }

    /// A node starts a delivery of `task` of `queue`.
    fn on_dispatch(&mut self, node: u64, task: &str, queue: &str) {
        let Ok(id) = Uuid::parse_str(task) else {
            return;
        };
        if self.ledger.cancel_acked.contains(&id) {
            if self.ledger.known_cancelled.contains(&(node, id)) {
                self.violation(
                    "cancelled",
                    format!("node {node} starts a delivery of task {id}, which it had recorded as cancelled"),
                );
            } else {
                self.report.delivered_after_cancel += 1;
            }
        }
        if queue == LIMITED {
            let now = self.now;
            self.limited_starts.push_back(now);
            while self
                .limited_starts
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                self.limited_starts.pop_front();
            }
            let stable = self
                .stable_since
                .is_some_and(|s| now.duration_since(s) >= LIMITS_SETTLE);
            let bound = LIMITED_RATE as usize + LIMITED_BURST as usize;
            if stable && self.limited_starts.len() > bound {
                let n = self.limited_starts.len();
                self.violation(
                    "rate",
                    format!("{n} deliveries of {LIMITED} started within a second (rate {LIMITED_RATE}/s, burst {LIMITED_BURST})"),
                );
            }
        }
    }

    /// The invariants, after every step.
    fn check(&mut self) {
        self.check_tasks();
        self.check_elections();
        self.check_limits();
    }

    fn check_tasks(&mut self) {
        let touched = std::mem::take(&mut self.ledger.touched);
        for id in touched {
            let l = &self.ledger;
            if !l.acknowledged.contains(&id)
                || l.succeeded.contains_key(&id)
                || l.cancel_acked.contains(&id)
                || l.lost.contains(&id)
            {
                continue;
            }
            if l.copies.get(&id).is_some_and(|c| !c.is_empty()) {
                continue;
            }
            let survivor = l
                .ever_held
                .get(&id)
                .and_then(|h| h.iter().copied().find(|n| self.alive(*n)));
            match survivor {
                Some(n) => self.violation(
                    "lost",
                    format!("acknowledged task {id} is held nowhere, though node {n}, which held it, is alive"),
                ),
                None => {
                    self.ledger.lost.insert(id);
                    self.trace(|| format!("task {id} lost with all its holders"));
                }
            }
        }
    }

    fn check_elections(&mut self) {
        let mut found = Vec::new();
        for (id, n) in &self.nodes {
            if !n.alive {
                continue;
            }
            let (_, _, leader, term) = n.election.view();
            if leader == Some(*id) {
                found.push((term, *id));
            }
            let epoch = n.membership.epoch();
            if let Some(before) = self.epochs.insert(*id, epoch) {
                if epoch < before {
                    found.push((u64::MAX, before));
                }
            }
            self.report.terms = self.report.terms.max(term);
        }
        for (term, id) in found {
            if term == u64::MAX {
                self.violation(
                    "epoch",
                    format!("a node's roster epoch went back from {id}"),
                );
                continue;
            }
            if let Some(other) = self.leaders.insert(term, id) {
                if other != id {
                    self.violation(
                        "leaders",
                        format!("two leaders in term {term}: {other} and {id}"),
                    );
                }
            }
        }
    }

    /// Every live node is in the roster, the roster holds no one else,
    /// every node agrees on it, and none is cut off.
    fn agreed(&self) -> bool {
        let live = self.live_ids();
        let want: BTreeSet<u64> = live.iter().copied().collect();
        self.cut.is_empty()
            && live.iter().all(|id| {
                self.nodes.get(id).is_some_and(|n| {
                    let ids: BTreeSet<u64> = n.membership.members().iter().map(|m| m.id).collect();
                    ids == want
                })
            })
    }

    /// Healed from every failure: all nodes up and agreeing on a roster of
    /// them all.
    fn healthy(&self) -> bool {
        self.live_ids().len() == self.config.nodes && self.agreed()
    }

    fn check_limits(&mut self) {
        let live = self.live_ids();
        if !self.agreed() {
            self.stable_since = None;
            return;
        }
        let now = self.now;
        let since = *self.stable_since.get_or_insert(now);
        if now.duration_since(since) < LIMITS_SETTLE {
            return;
        }
        let running: u32 = live
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| n.store.running(LIMITED))
            .sum();
        if running > LIMITED_CONCURRENCY {
            let each: Vec<(u64, u32, usize)> = live
                .iter()
                .filter_map(|id| {
                    self.nodes
                        .get(id)
                        .map(|n| (*id, n.store.running(LIMITED), n.membership.members().len()))
                })
                .collect();
            self.violation(
                "concurrency",
                format!("{running} deliveries of {LIMITED} under way at once (at most {LIMITED_CONCURRENCY}); (node, running, members): {each:?}"),
            );
        }
    }

    /// After the calm spell: every acknowledged task with a copy left was
    /// delivered, dead-lettered or cancelled.
    fn final_check(&mut self) {
        self.take_all_changes();
        self.check_tasks();
        let mut undelivered = Vec::new();
        let mut dead = 0;
        for id in &self.ledger.acknowledged {
            let l = &self.ledger;
            if l.succeeded.contains_key(id) || l.cancel_acked.contains(id) || l.lost.contains(id) {
                continue;
            }
            let copies = l.copies.get(id);
            if copies.is_some_and(|c| c.values().any(|s| *s == TaskState::Failed)) {
                dead += 1;
                continue;
            }
            if copies.is_some_and(|c| c.values().any(|s| *s == TaskState::Cancelled)) {
                continue; // cancelled, the acknowledgement lost on the way
            }
            undelivered.push((*id, copies.cloned().unwrap_or_default()));
        }
        self.report.dead_lettered = dead;
        for (id, copies) in undelivered.iter().take(5) {
            let detail: Vec<String> = copies
                .keys()
                .filter_map(|n| {
                    let d = self.nodes.get(n)?.store.describe_task(id)?;
                    Some(format!("node {n}: {d}"))
                })
                .collect();
            self.violation(
                "undelivered",
                format!("acknowledged task {id} was never delivered; its copies: {detail:?}"),
            );
        }
        if undelivered.len() > 5 {
            let n = undelivered.len() - 5;
            self.violation(
                "undelivered",
                format!("and {n} more acknowledged tasks never delivered"),
            );
        }
        self.report.acknowledged = self.ledger.acknowledged.len();
        self.report.delivered = self
            .ledger
            .acknowledged
            .iter()
            .filter(|id| self.ledger.succeeded.contains_key(id))
            .count();
        self.report.lost_with_holders = self.ledger.lost.len();
        self.report.lost_with_one_copy = self
            .ledger
            .lost
            .iter()
            .filter(|id| self.ledger.one_copy.contains(id))
            .count();
        self.report.cancels_acknowledged = self.ledger.cancel_acked.len();
    }

    fn take_all_changes(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.take_changes(id);
        }
    }
}

/// `p3` → 3 for prefix `p`.
fn parse_index(identity: &[u8], prefix: u8) -> Option<usize> {
    let (first, rest) = identity.split_first()?;
    if *first != prefix {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// `w3.7` → 3.
fn parse_worker(identity: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(identity).ok()?;
    let (w, _) = s.strip_prefix('w')?.split_once('.')?;
    w.parse().ok()
}
