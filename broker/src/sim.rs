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
//! comes back as a new member joining through a live one: at a new
//! address, or at the address of its previous incarnation, as a broker
//! restarted on its old ports does. The network routes by address as
//! ZeroMQ does: a member's connection to the old address (its DEALER to
//! the peer port, its subscription to the events port) reaches the new
//! process, so peer messages addressed to the old id — Raft's included,
//! with their `to` still naming it — are delivered to the new node, and
//! the new node's events reach whoever subscribed to the old address;
//! disconnecting an address drops every connection to it. (Workers and
//! producers still reach nodes by id: a worker registers anew with a
//! restarted node, a producer resends to another.)
//!
//! The faults ([`Faults`]), each drawn from the seed: messages delayed,
//! dropped, duplicated and reordered; a node cut off; a node crashed at a
//! random moment, right when it waits for holders to acknowledge an
//! enqueue (as its coordinator or as a holder), or while a delivery of it
//! is at a worker; a second crash within the election's `remove_after`
//! of the first, before re-replication, when a majority of every roster
//! survives it (in a cluster of three, only a restarted node not yet in
//! the roster can be that second victim; in one of five, any); and Raft
//! messages delivered to a member they were not addressed to, replayed
//! long after they were sent, or forged (a heartbeat whose `commit` is
//! past the receiver's log).
//!
//! After every step the run checks its invariants ([`Sim::check`]):
//! * every acknowledged task is delivered, or still held by a live node,
//!   while one of the nodes that held it survives (a task whose every
//!   holder died is counted as lost with them, not as a violation; those
//!   acknowledged with two copies or more are counted apart, and apart
//!   again those whose holders all died one crash at a time);
//! * at most one leader per term;
//! * no node's roster epoch goes backwards;
//! * a node that has recorded a task as cancelled never starts a delivery
//!   of it (a cancel acknowledged before every holder heard of it may
//!   still race with a delivery: such deliveries are counted);
//! * while the roster is stable, a queue's concurrency and rate limits
//!   hold cluster-wide (deliveries running on all nodes together, and
//!   deliveries started in any second);
//! * while a majority of the roster is alive and reachable, some live
//!   node leads within [`LEADER_BOUND`], and the roster holds no member
//!   dead for longer than `remove_after` plus that bound (no ghost).
//!
//! At the end of a calm spell without faults, every acknowledged task that
//! still has a copy must have been delivered or dead-lettered. Duplicate
//! deliveries are counted and reported, not hidden, as are the tasks
//! lost with all their holders (those acknowledged with two copies or
//! more apart).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use client::{Job, SessionConfig, Tick, WorkerSession};
use protocol::{
    BrokerMessage, ClientCommand, ClientReply, ClientRequest, ClusterEvent, DeliveryResult, Member,
    Outcome, PeerMessage, QueueConfig, ReplyBody, TaskSpec, TaskState, WorkerMessage,
};
use uuid::Uuid;

use crate::dispatch::{DispatchConfig, Dispatcher, Out};
use crate::election::{Election, ElectionConfig, FromElection, SavedRaft, TICK};
use crate::journal::{self, Journal, MemDisk};
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
/// The leader removes a member silent this long (the election's
/// `remove_after`).
const REMOVE_AFTER: Duration = Duration::from_secs(4);
/// How long a majority of the roster, alive and able to reach each other,
/// may be without a leader; and, past `remove_after`, how long a dead
/// member may stay in the roster. Election timeouts are 1–2 s
/// ([`crate::election::ELECTION_TICKS`] ticks), a leader cut from its
/// quorum steps down within one, pre-vote rounds and split votes cost a
/// few more, and the network delays messages by at most half a second:
/// ten seconds is several full elections, so a cluster that lacks a
/// leader (or keeps a ghost) that long is stuck, not slow.
pub const LEADER_BOUND: Duration = Duration::from_secs(10);
/// A kill waiting for its moment (an enqueue, a delivery) waits this long
/// at most, then strikes anyway.
const ARMED_FOR: Duration = Duration::from_secs(3);
/// Raft messages remembered for misdirection and replay.
const RAFT_HISTORY: usize = 4096;
/// A misdirected Raft message was sent within this.
const RECENT: Duration = Duration::from_secs(2);
/// A replayed Raft message was sent at least this long ago.
const STALE_AFTER: Duration = Duration::from_secs(5);

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
    /// Which faults beyond the network's and plain crashes.
    pub faults: Faults,
}

/// The faults a run may draw beyond a lossy network, partitions and
/// crashes at random moments. Their choices come from a generator of
/// their own, so a run without them ([`Faults::CLASSIC`]) replays as runs
/// did before they existed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Some crashed nodes come back at their previous address.
    pub same_address: bool,
    /// Raft messages delivered to the wrong member, replayed late, or
    /// forged heartbeats committing past the receiver's log.
    pub raft_meddling: bool,
    /// Crashes timed to an enqueue or a delivery in flight, and second
    /// crashes before the first is healed.
    pub timed_kills: bool,
    /// Nodes keep a data directory (the journal on a [`MemDisk`], the
    /// Raft state as last saved): a crash keeps only what was synced, and
    /// most crashed nodes restart from it as themselves (same id, same
    /// address, no join).
    pub disk: bool,
}

impl Faults {
    /// The faults on, as the `simulate` example's `--faults` takes them:
    /// `same-address,raft,kills`, or `none`.
    pub fn names(&self) -> String {
        let on: Vec<&str> = [
            (self.same_address, "same-address"),
            (self.raft_meddling, "raft"),
            (self.timed_kills, "kills"),
            (self.disk, "disk"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        if on.is_empty() {
            "none".into()
        } else {
            on.join(",")
        }
    }

    /// The faults named as [`Faults::names`] gives them.
    pub fn parse(names: &str) -> Option<Faults> {
        let mut f = Faults::CLASSIC;
        for name in names.split(',').filter(|n| !n.is_empty() && *n != "none") {
            match name {
                "same-address" => f.same_address = true,
                "raft" => f.raft_meddling = true,
                "kills" => f.timed_kills = true,
                "disk" => f.disk = true,
                "all" => f = Faults::ALL,
                "durable" => f = Faults::DURABLE,
                _ => return None,
            }
        }
        Some(f)
    }

    /// Every fault of nodes that keep nothing on disk (the runs of issue
    /// 14; the default, so its regression seeds replay as found).
    pub const ALL: Faults = Faults {
        same_address: true,
        raft_meddling: true,
        timed_kills: true,
        disk: false,
    };
    /// Every fault, with nodes that restart from their data directory.
    pub const DURABLE: Faults = Faults {
        same_address: true,
        raft_meddling: true,
        timed_kills: true,
        disk: true,
    };
    /// Only the network's faults, partitions and crashes at random
    /// moments, one at a time: the runs of issue 13.
    pub const CLASSIC: Faults = Faults {
        same_address: false,
        raft_meddling: false,
        timed_kills: false,
        disk: false,
    };
}

/// Faults outside the model, for the tests of the checks themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sabotage {
    /// At this virtual time, a live node forgets every task (its store
    /// starts afresh) without crashing: acknowledged tasks vanish while
    /// their holder lives.
    WipeStore(Duration),
    /// From this virtual time on, the network loses every Raft message:
    /// no leader can stay or be elected while every node lives.
    SilenceRaft(Duration),
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
            faults: Faults::ALL,
        }
    }

    /// The `simulate` example's arguments that give a run these settings
    /// but for the seed (empty for [`SimConfig::new`]'s; a sabotage has
    /// none).
    pub fn replay_args(&self) -> String {
        let d = SimConfig::new(self.seed);
        let mut a = String::new();
        if self.nodes != d.nodes {
            a += &format!(" --nodes {}", self.nodes);
        }
        if self.workers != d.workers {
            a += &format!(" --workers {}", self.workers);
        }
        if self.producers != d.producers {
            a += &format!(" --producers {}", self.producers);
        }
        if self.faulty != d.faulty {
            a += &format!(" --faulty-secs {}", self.faulty.as_secs());
        }
        if self.calm != d.calm {
            a += &format!(" --calm-secs {}", self.calm.as_secs());
        }
        if self.faults != d.faults {
            a += &format!(" --faults {}", self.faults.names());
        }
        a
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
    /// Of those, the ones acknowledged with `replicas` 2 or more.
    pub lost_replicated: usize,
    /// Of the last, the ones none of whose holders died in a second crash
    /// before the first was healed: every holder died one at a time, so
    /// re-replication had its chance. Expected 0; reported, not failed.
    pub lost_replicated_one_at_a_time: usize,
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
    /// Crashes of a node that had just sent an enqueue's copy to a holder
    /// (or, as a holder, just received one), before the answer.
    pub crashes_during_enqueue: u64,
    /// Crashes of a node while a worker was running its delivery.
    pub crashes_during_delivery: u64,
    /// Crashes within `remove_after` of the one before, while it was not
    /// healed yet.
    pub crashes_in_a_row: u64,
    /// Restarts at the address of the crashed incarnation.
    pub restarts_same_address: u64,
    /// Restarts at a new address.
    pub restarts_new_address: u64,
    /// Restarts as itself, from its data directory ([`Faults::disk`]).
    pub restarts_from_disk: u64,
    /// Peer messages addressed to a member that reached another node, its
    /// successor at its address.
    pub readdressed: u64,
    /// Raft messages delivered to a member other than the addressee.
    pub misdirected: u64,
    /// Raft messages delivered again long after they were sent.
    pub stale_replays: u64,
    /// Forged heartbeats committing past the receiver's log.
    pub forged_heartbeats: u64,
    /// Raft messages the nodes' elections refused to step (all nodes,
    /// [`Election::dropped`]).
    pub raft_refused: u64,
    /// The longest span without a leader while a majority of the roster
    /// lived and could reach each other.
    pub longest_leaderless: Duration,
    pub partitions: u64,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Highest Raft term reached.
    pub terms: u64,
    pub violations: Vec<String>,
    /// With [`SimConfig::trace`]: one line per step.
    pub trace: Vec<String>,
    /// The `simulate` example's arguments for the run's settings, after
    /// `--seed` ([`SimConfig::replay_args`]).
    pub replay_args: String,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this run exactly.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run -p miyamoto-broker --example simulate -- --seed {}{}",
            self.seed, self.replay_args
        )
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} steps, {} acknowledged, {} delivered, {} deliveries ({} duplicates), \
             {} lost with all holders ({} acknowledged with one copy, {} with two or more, {} of them one crash at a time), \
             {} resends stored twice, {} stored again after loss, {} dead-lettered, {} cancels ({} deliveries after), \
             {} crashes ({} during enqueues, {} during deliveries, {} in a row; restarts: {} at the same address, {} at a new one, {} from disk), \
             {} partitions, {} messages ({} dropped, {} duplicated, {} readdressed), \
             raft: {} misdirected, {} stale, {} forged heartbeats, {} refused, longest leaderless {:.1?}, term {}, {} violations",
            self.seed,
            self.steps,
            self.acknowledged,
            self.delivered,
            self.deliveries,
            self.duplicates,
            self.lost_with_holders,
            self.lost_with_one_copy,
            self.lost_replicated,
            self.lost_replicated_one_at_a_time,
            self.stored_twice,
            self.stored_again_after_loss,
            self.dead_lettered,
            self.cancels_acknowledged,
            self.delivered_after_cancel,
            self.crashes,
            self.crashes_during_enqueue,
            self.crashes_during_delivery,
            self.crashes_in_a_row,
            self.restarts_same_address,
            self.restarts_new_address,
            self.restarts_from_disk,
            self.partitions,
            self.messages,
            self.dropped,
            self.duplicated,
            self.readdressed,
            self.misdirected,
            self.stale_replays,
            self.forged_heartbeats,
            self.raft_refused,
            self.longest_leaderless,
            self.terms,
            self.violations.len()
        )
    }
}

/// Runs one simulation. A panic inside it (raft-rs panics on some
/// messages it should never get) fails the run: it is reported as a
/// violation, with the virtual time, the figures and the trace so far
/// (none when the cluster could not even be set up).
pub fn run(config: SimConfig) -> Report {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let (seed, replay_args) = (config.seed, config.replay_args());
    let mut sim = match catch_unwind(AssertUnwindSafe(|| Sim::new(config))) {
        Ok(sim) => sim,
        Err(e) => {
            return Report {
                seed,
                violations: vec![format!("panicked: {}", panic_text(&*e))],
                replay_args,
                ..Report::default()
            }
        }
    };
    if let Err(e) = catch_unwind(AssertUnwindSafe(|| sim.run())) {
        let at = sim.now.duration_since(sim.base);
        sim.report
            .violations
            .push(format!("at {at:?}: panicked: {}", panic_text(&*e)));
        sim.tally();
    }
    sim.report
}

/// A panic's message.
fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
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
    /// To member `to`: over the sender's connection to `addr` when it has
    /// one (it reaches whichever node is at that address by then), else
    /// routed back by identity to `to` itself.
    Peer {
        to: u64,
        addr: Option<u64>,
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
    /// A crashed node comes back: at its old address, or a new one; or,
    /// with [`Faults::disk`], as itself (`id`).
    Restart {
        addr: Option<u64>,
        id: u64,
    },
    /// A crash timed by [`Sim::armed`] or a crash in a row.
    Kill {
        id: u64,
        cause: Cause,
    },
    /// An armed kill whose moment did not come strikes anyway.
    Disarm,
    /// A second crash, before the first is healed.
    CrashInARow,
    /// A misdirected, stale or forged Raft message.
    Meddle,
    Partition,
    Heal,
    Sabotage,
}

/// Why a node crashed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cause {
    Random,
    Enqueue,
    Delivery,
    InARow,
}

/// A kill waiting for its moment.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Armed {
    /// An enqueue's copy sent to a holder: kill its coordinator right
    /// after it sent it (or the holder right after it stored it).
    Enqueue { coordinator: bool },
    /// A delivery reaching a worker: kill the node that sent it.
    Delivery,
}

struct SimNode {
    alive: bool,
    /// Its address (the endpoints in its member record): its own id, or
    /// its previous incarnation's.
    addr: u64,
    store: Store,
    dispatcher: Dispatcher,
    election: Election,
    membership: Membership,
    /// Its connections to members' peer ports: member id → address.
    dealers: BTreeMap<u64, u64>,
    /// The addresses whose events it subscribes to.
    subscribed: BTreeSet<u64>,
    /// The member its `--join` goes to (id, address), until it is in.
    join_via: Option<(u64, u64)>,
    next_raft_tick: Instant,
    next_dispatch_tick: Instant,
    /// When the node is woken next (at most one wake-up is queued).
    wake_at: Option<Instant>,
    /// With [`Faults::disk`]: its journal, committed before each batch's
    /// events go out, as the scheduler does.
    journal: Option<Journal<MemDisk>>,
    /// With [`Faults::disk`]: the Raft state it last saved (durable at
    /// once, as `raft.state` is written before what depends on it).
    raft_saved: Option<SavedRaft>,
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
    /// With [`Faults::disk`]: the copies of each dead node that are on its
    /// disk, which come back if it restarts from it (not lost meanwhile).
    dormant: HashMap<u64, HashSet<Uuid>>,
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
    /// The live node at each address.
    occupant: BTreeMap<u64, u64>,
    /// The generator of the [`Faults`]' choices.
    frng: Rng,
    /// A kill waiting for its moment, until when.
    armed: Option<(Armed, Instant)>,
    /// When each dead node died.
    died_at: BTreeMap<u64, Instant>,
    /// Nodes killed in a row, before the crash before was healed.
    killed_in_a_row: BTreeSet<u64>,
    /// Raft messages sent: (when, from, to, message).
    raft_history: VecDeque<(Instant, u64, u64, serde_bytes::ByteBuf)>,
    /// Since when a majority of the newest roster has been alive and
    /// reachable, and since when no live node has led meanwhile.
    majority_since: Option<Instant>,
    leaderless_since: Option<Instant>,
    /// The current leaderless span was reported.
    leaderless_reported: bool,
    /// Ghosts reported.
    ghosts_reported: BTreeSet<u64>,
    /// Raft messages are lost from now on ([`Sabotage::SilenceRaft`]).
    raft_silenced: bool,
    /// Violations seen, by kind.
    kinds: BTreeMap<&'static str, u64>,
    report: Report,
}

/// Node `id`'s record: its endpoints are those of address `addr`.
fn member(id: u64, addr: u64) -> Member {
    Member {
        id,
        name: format!("node{id}"),
        client: format!("sim://{addr}/client"),
        worker: format!("sim://{addr}/worker"),
        peer: format!("sim://{addr}/peer"),
        events: format!("sim://{addr}/events"),
    }
}

/// The address of an endpoint `sim://ADDR/...`.
fn address(endpoint: &str) -> Option<u64> {
    endpoint
        .strip_prefix("sim://")?
        .split('/')
        .next()?
        .parse()
        .ok()
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
            frng: Rng(config.seed ^ 0xFA17_FA17_FA17_FA17),
            report: Report {
                seed: config.seed,
                replay_args: config.replay_args(),
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
            occupant: BTreeMap::new(),
            armed: None,
            died_at: BTreeMap::new(),
            killed_in_a_row: BTreeSet::new(),
            raft_history: VecDeque::new(),
            majority_since: None,
            leaderless_since: None,
            leaderless_reported: false,
            ghosts_reported: BTreeSet::new(),
            raft_silenced: false,
            kinds: BTreeMap::new(),
        };
        let first = sim.add_node(None, None);
        for _ in 1..sim.config.nodes {
            sim.add_node(Some(first), None);
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
        match sim.config.sabotage {
            Some(Sabotage::WipeStore(at) | Sabotage::SilenceRaft(at)) => {
                sim.at(base + at, Wake::Sabotage)
            }
            None => {}
        }
        let first_fault = base + Duration::from_secs(8);
        sim.at(first_fault, Wake::Crash);
        let first_cut = base
            + sim
                .rng
                .between(Duration::from_secs(10), Duration::from_secs(20));
        sim.at(first_cut, Wake::Partition);
        if sim.config.faults.raft_meddling {
            let first = base
                + sim
                    .frng
                    .between(Duration::from_secs(4), Duration::from_secs(8));
            sim.at(first, Wake::Meddle);
        }
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
    /// through `via`; at address `addr` (a dead node's), or its own.
    fn add_node(&mut self, via: Option<u64>, addr: Option<u64>) -> u64 {
        let id = self.next_node_id;
        self.next_node_id += 1;
        let addr = addr.unwrap_or(id);
        let m = member(id, addr);
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
                remove_after: REMOVE_AFTER,
                saved: None,
                persist: self.config.faults.disk,
            },
            self.rng.next(),
        ) {
            Ok(e) => e,
            Err(e) => {
                self.violation("raft", format!("node {id}: Raft would not start: {e}"));
                return id;
            }
        };
        let join_via = via.and_then(|v| Some((v, self.nodes.get(&v)?.addr)));
        let membership = Membership::new(m, 2, Duration::from_secs(2), via.is_some(), self.now);
        let node = self.sim_node(addr, store, election, membership, join_via);
        self.nodes.insert(id, node);
        self.occupant.insert(addr, id);
        if self.config.faults.disk {
            if let Some(n) = self.nodes.get_mut(&id) {
                match Journal::open(MemDisk::default(), journal::Options::default()) {
                    Ok((j, _)) => n.journal = Some(j),
                    Err(e) => tracing::error!(error = %e, "a memory disk would not open"),
                }
                n.store.record_changes();
            }
        }
        let mut first = Vec::new();
        if let Some(n) = self.nodes.get_mut(&id) {
            n.membership.start(&mut first);
        }
        self.decide(id, first);
        self.wake_node(id, self.now);
        // A bootstrapped node's first view comes from its election.
        if via.is_none() {
            self.election_input(id, None);
        }
        id
    }

    /// A live node at `addr`, its timers starting now.
    fn sim_node(
        &self,
        addr: u64,
        store: Store,
        election: Election,
        membership: Membership,
        join_via: Option<(u64, u64)>,
    ) -> SimNode {
        let dispatch = DispatchConfig {
            result_grace: Duration::from_secs(2),
            ..DispatchConfig::default()
        };
        SimNode {
            membership,
            alive: true,
            addr,
            store,
            dispatcher: Dispatcher::new(dispatch),
            election,
            dealers: BTreeMap::new(),
            subscribed: BTreeSet::new(),
            join_via,
            next_raft_tick: self.now + TICK,
            next_dispatch_tick: self.now + DISPATCH_TICK,
            wake_at: None,
            journal: None,
            raft_saved: None,
        }
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
            Wake::Restart { addr, id } => self.restart(addr, id),
            Wake::Kill { id, cause } => {
                if self.faults_on() && self.alive(id) {
                    self.kill(id, cause);
                }
            }
            Wake::Disarm => self.disarm(),
            Wake::CrashInARow => self.crash_in_a_row(),
            Wake::Meddle => self.meddle(),
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
        if let Msg::Peer {
            to,
            msg: PeerMessage::Raft { from, message },
            ..
        } = &msg
        {
            if self.raft_silenced {
                self.report.dropped += 1;
                return;
            }
            if self.config.faults.raft_meddling {
                if self.raft_history.len() == RAFT_HISTORY {
                    self.raft_history.pop_front();
                }
                self.raft_history
                    .push_back((self.now, *from, *to, message.clone()));
            }
        }
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

    /// The live node at `addr`.
    fn at_address(&self, addr: u64) -> Option<u64> {
        self.occupant.get(&addr).copied()
    }

    /// A peer message from `from` to member `to`: over `from`'s connection
    /// to `to`'s address when it has one, else back by identity.
    fn peer_msg(&self, from: u64, to: u64, msg: PeerMessage) -> Msg {
        let addr = self
            .nodes
            .get(&from)
            .and_then(|n| n.dealers.get(&to).copied());
        Msg::Peer { to, addr, msg }
    }

    fn deliver(&mut self, from: Option<u64>, msg: Msg) {
        // The node the message reaches: a peer connection reaches the
        // address's current process; the rest go to the node named.
        let (a, b) = match &msg {
            Msg::Peer { to, addr, .. } => {
                let node = match addr {
                    Some(a) => self.at_address(*a),
                    None => None,
                };
                (from, Some(node.unwrap_or(*to)))
            }
            Msg::Event { to, .. } => (from, Some(*to)),
            Msg::Request { to, .. } | Msg::ToBroker { to, .. } => (None, Some(*to)),
            Msg::Reply { .. } | Msg::ToWorker { .. } => (from, None),
        };
        if !self.reachable(a, b) {
            self.report.dropped += 1;
            return;
        }
        match msg {
            Msg::Peer {
                to: addressee, msg, ..
            } => {
                let to = b.unwrap_or(addressee);
                if to != addressee && self.alive(to) {
                    self.report.readdressed += 1;
                }
                let fresh_copy = matches!(msg, PeerMessage::Store { check: true, .. });
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
                    if fresh_copy {
                        self.strike(Armed::Enqueue { coordinator: false }, to);
                    }
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
        // As the scheduler: the batch's records are committed before its
        // events go out.
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(j) = &mut n.journal {
                let mut records = Vec::new();
                n.store.take_records(&mut records);
                for r in &records {
                    j.append(r);
                }
                if let Err(e) = j.commit() {
                    tracing::error!(error = %e, "a memory disk failed");
                }
            }
        }
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
                Event::ToPeer { to, msg } => {
                    let fresh_copy = matches!(msg, PeerMessage::Store { check: true, .. });
                    let m = self.peer_msg(id, to, msg);
                    self.send(Some(id), m);
                    if fresh_copy {
                        self.strike(Armed::Enqueue { coordinator: true }, id);
                    }
                }
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

    /// To every live node subscribed to `from`'s address (`from` itself
    /// too, when it subscribed to its predecessor's address: membership
    /// ignores its own events).
    fn publish(&mut self, from: u64, ev: ClusterEvent) {
        let Some(addr) = self.nodes.get(&from).map(|n| n.addr) else {
            return;
        };
        let to: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive && n.subscribed.contains(&addr))
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
                // As the I/O loop does: a DEALER to the member's peer
                // port, a subscription to its events port. Disconnecting
                // an endpoint drops every connection to it, as ZeroMQ's
                // `disconnect` does, a successor's at the same address
                // included.
                Decision::Connect(m) => {
                    if let (Some(n), Some(p), Some(e)) = (
                        self.nodes.get_mut(&id),
                        address(&m.peer),
                        address(&m.events),
                    ) {
                        n.dealers.insert(m.id, p);
                        n.subscribed.insert(e);
                    }
                }
                Decision::Disconnect(m) => {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.dealers.remove(&m.id);
                        if let Some(e) = address(&m.events) {
                            n.subscribed.remove(&e);
                        }
                    }
                }
                Decision::SendPeer { to, msg } => {
                    let m = self.peer_msg(id, to, msg);
                    self.send(Some(id), m);
                }
                Decision::Publish(ev) => self.publish(id, ev),
                Decision::Store(cmd) => self.apply(id, cmd),
                Decision::Election(msg) => self.election_input(id, Some(msg)),
                Decision::Join(msg) => {
                    let via = self.nodes.get(&id).and_then(|n| n.join_via);
                    if let Some((to, addr)) = via {
                        let addr = Some(addr);
                        self.send(Some(id), Msg::Peer { to, addr, msg });
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
        let mut views = Vec::new();
        for m in out {
            if let FromElection::Persist(bytes) = &m {
                let frames = [&[][..], &protocol::frames::header()[..], &bytes[..]];
                if let Ok(saved) = protocol::decode::<SavedRaft, _>(&frames) {
                    n.raft_saved = Some(saved);
                }
                continue;
            }
            if self.config.trace {
                if let FromElection::State {
                    epoch,
                    members,
                    leader,
                    term,
                } = &m
                {
                    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
                    views.push(format!(
                        "node {id}: epoch {epoch}, members {ids:?}, leader {leader:?}, term {term}"
                    ));
                }
            }
            n.membership.from_election(m, now, &mut d);
        }
        for v in views {
            self.trace(|| v);
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
        if !jobs.is_empty() {
            self.strike(Armed::Delivery, node);
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
        // (Crashes in a row, [`Sim::crash_in_a_row`], strike only when a
        // majority survives them.)
        if !self.healthy() {
            self.at(now + Duration::from_secs(1), Wake::Crash);
            return;
        }
        if live.len() > 1 {
            // Now, or at the next enqueue or delivery in flight.
            let armed = if self.config.faults.timed_kills && self.armed.is_none() {
                match self.frng.below(10) {
                    0..=3 => None,
                    4..=6 => Some(Armed::Enqueue {
                        coordinator: self.frng.chance(0.5),
                    }),
                    _ => Some(Armed::Delivery),
                }
            } else {
                None
            };
            match armed {
                Some(a) => {
                    self.armed = Some((a, now + ARMED_FOR));
                    self.at(now + ARMED_FOR, Wake::Disarm);
                    self.trace(|| format!("a crash waits for {a:?}"));
                }
                None => {
                    let id = live[self.rng.below(live.len() as u64) as usize];
                    self.kill(id, Cause::Random);
                }
            }
        }
        let next = self
            .rng
            .between(Duration::from_secs(6), Duration::from_secs(15));
        self.at(now + next, Wake::Crash);
    }

    /// Node `id` crashes: its memory is gone. It comes back in 2–6 s, at
    /// its address or a new one; after a crash of a healthy cluster, a
    /// second may follow before it heals.
    fn kill(&mut self, id: u64, cause: Cause) {
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.alive = false;
        let addr = n.addr;
        if self.occupant.get(&addr) == Some(&id) {
            self.occupant.remove(&addr);
        }
        self.died_at.insert(id, now);
        self.report.crashes += 1;
        match cause {
            Cause::Random => self.trace(|| format!("node {id} crashes")),
            cause => {
                match cause {
                    Cause::Enqueue => self.report.crashes_during_enqueue += 1,
                    Cause::Delivery => self.report.crashes_during_delivery += 1,
                    _ => {
                        self.report.crashes_in_a_row += 1;
                        self.killed_in_a_row.insert(id);
                    }
                }
                self.trace(|| format!("node {id} crashes ({cause:?})"));
            }
        }
        if self.config.faults.disk {
            let held = self.ledger.held_by.get(&id).cloned().unwrap_or_default();
            self.ledger.dormant.insert(id, held);
        }
        self.forget_copies(id);
        let back = self
            .rng
            .between(Duration::from_secs(2), Duration::from_secs(6));
        let addr = (self.config.faults.same_address && self.frng.chance(0.5)).then_some(addr);
        self.at(now + back, Wake::Restart { addr, id });
        if self.config.faults.timed_kills && cause != Cause::InARow && self.frng.chance(0.5) {
            let margin = Duration::from_millis(300);
            let after = self.frng.between(margin, REMOVE_AFTER - margin);
            self.at(now + after, Wake::CrashInARow);
        }
    }

    /// A crashed node comes back, joining through a live one: at `addr`
    /// (its previous incarnation's, still free) or at a new address; with
    /// [`Faults::disk`], mostly as itself from its directory.
    fn restart(&mut self, addr: Option<u64>, dead: u64) {
        if self.config.faults.disk && self.frng.chance(0.7) && self.revive(dead) {
            return;
        }
        // Not from its disk: what was on it is gone for good.
        if let Some(d) = self.ledger.dormant.remove(&dead) {
            self.ledger.touched.extend(d);
        }
        let via = self.live_ids();
        if via.is_empty() {
            return;
        }
        let v = via[self.rng.below(via.len() as u64) as usize];
        let addr = addr.filter(|a| self.at_address(*a).is_none());
        if addr.is_some() {
            self.report.restarts_same_address += 1;
        } else {
            self.report.restarts_new_address += 1;
        }
        let id = self.add_node(Some(v), addr);
        match addr {
            Some(a) => {
                self.trace(|| format!("node {id} starts at address {a}, joining through {v}"))
            }
            None => self.trace(|| format!("node {id} starts, joining through {v}")),
        }
    }

    /// Node `id`, dead, starts again from its data directory: after a
    /// power cut (only what was synced is left), with its id, its address
    /// and its saved Raft state, asking its known members to add it again.
    /// False when it cannot (no directory, or its address is taken).
    fn revive(&mut self, id: u64) -> bool {
        let Some(n) = self.nodes.get_mut(&id) else {
            return false;
        };
        if n.alive || self.occupant.contains_key(&n.addr) {
            return false;
        }
        let (Some(journal), Some(saved)) = (n.journal.take(), n.raft_saved.clone()) else {
            return false;
        };
        let addr = n.addr;
        let mut disk = journal.into_disk();
        disk.crash();
        let (journal, recovered) = match Journal::open(disk, journal::Options::default()) {
            Ok(j) => j,
            Err(e) => {
                self.violation(
                    "disk",
                    format!("node {id}: its journal would not open: {e}"),
                );
                return false;
            }
        };
        let now_us = self.now_us();
        let mut store = Store::new(store_config(id), now_us, TaskIds::seeded(self.rng.next()));
        store.observe_changes();
        store.apply(Command::Identity(id), now_us, &mut Vec::new());
        store.record_changes();
        if let Err(e) = store.restore(recovered.records.iter().map(|r| r.as_slice()), now_us) {
            self.violation(
                "disk",
                format!("node {id}: its journal would not replay: {e}"),
            );
            return false;
        }
        let m = member(id, addr);
        let election = match Election::new(
            &ElectionConfig {
                me: m.clone(),
                bootstrap: false,
                remove_after: REMOVE_AFTER,
                saved: Some(saved.clone()),
                persist: true,
            },
            self.rng.next(),
        ) {
            Ok(e) => e,
            Err(e) => {
                self.violation(
                    "raft",
                    format!("node {id}: Raft would not start again: {e}"),
                );
                return false;
            }
        };
        let via = self
            .live_ids()
            .into_iter()
            .next()
            .and_then(|v| Some((v, self.nodes.get(&v)?.addr)));
        let mut membership = Membership::new(m, 2, Duration::from_secs(2), false, self.now);
        membership.rejoin();
        let mut node = self.sim_node(addr, store, election, membership, via);
        node.journal = Some(journal);
        node.raft_saved = Some(saved);
        self.nodes.insert(id, node);
        self.occupant.insert(addr, id);
        self.died_at.remove(&id);
        self.report.restarts_from_disk += 1;
        if let Some(d) = self.ledger.dormant.remove(&id) {
            self.ledger.touched.extend(d);
        }
        self.trace(|| format!("node {id} starts again from its data directory at address {addr}"));
        // Its recovered copies are in the ledger again.
        self.take_changes(id);
        let mut first = Vec::new();
        if let Some(n) = self.nodes.get_mut(&id) {
            n.membership.start(&mut first);
        }
        self.decide(id, first);
        self.election_input(id, None);
        self.wake_node(id, self.now);
        true
    }

    /// An armed kill's moment: `node` just did what `kind` waits for.
    fn strike(&mut self, kind: Armed, node: u64) {
        let Some((armed, until)) = self.armed else {
            return;
        };
        if armed != kind || self.now > until || !self.faults_on() || !self.healthy() {
            return;
        }
        self.armed = None;
        let cause = match kind {
            Armed::Enqueue { .. } => Cause::Enqueue,
            Armed::Delivery => Cause::Delivery,
        };
        // Right after this step, before any message it sent arrives.
        self.at(self.now, Wake::Kill { id: node, cause });
    }

    /// An armed kill whose moment did not come: a node crashes anyway.
    fn disarm(&mut self) {
        let Some((_, until)) = self.armed else {
            return;
        };
        if self.now < until {
            return; // armed again since
        }
        self.armed = None;
        let live = self.live_ids();
        if self.faults_on() && self.healthy() && live.len() > 1 {
            let id = live[self.frng.below(live.len() as u64) as usize];
            self.kill(id, Cause::Random);
        }
    }

    /// A second crash before the first healed (within `remove_after`, so
    /// before the dead member is removed and its tasks re-replicated),
    /// of a node whose loss leaves a majority of every roster alive and
    /// reachable: in a cluster of three, only a restarted node that is no
    /// member yet.
    fn crash_in_a_row(&mut self) {
        if !self.faults_on() || !self.cut.is_empty() {
            return;
        }
        let live = self.live_ids();
        let can: Vec<u64> = live
            .iter()
            .copied()
            .filter(|v| self.majority_survives(*v))
            .collect();
        if can.is_empty() {
            return;
        }
        let id = can[self.frng.below(can.len() as u64) as usize];
        self.kill(id, Cause::InARow);
    }

    /// Every live node's roster keeps a majority alive without `victim`.
    fn majority_survives(&self, victim: u64) -> bool {
        self.nodes.values().filter(|n| n.alive).all(|n| {
            let members = n.membership.members();
            let alive = members
                .iter()
                .filter(|m| m.id != victim && self.alive(m.id))
                .count();
            members.is_empty() || alive * 2 > members.len()
        })
    }

    /// A Raft message where it does not belong: sent to the wrong member,
    /// replayed long after, or forged.
    fn meddle(&mut self) {
        let now = self.now;
        if !self.faults_on() {
            return;
        }
        match self.frng.below(3) {
            0 => self.misdirect(),
            1 => self.replay_stale(),
            _ => self.forge_heartbeat(),
        }
        let next = self
            .frng
            .between(Duration::from_secs(1), Duration::from_secs(4));
        self.at(now + next, Wake::Meddle);
    }

    /// Delivers a Raft message to `to` as if `from` had sent it there
    /// (the network's other faults spared it).
    fn inject(&mut self, from: u64, to: u64, message: serde_bytes::ByteBuf) {
        let delay = self
            .frng
            .between(Duration::from_micros(100), Duration::from_millis(3));
        let msg = Msg::Peer {
            to,
            addr: None,
            msg: PeerMessage::Raft { from, message },
        };
        self.at(
            self.now + delay,
            Wake::Deliver {
                from: Some(from),
                msg,
            },
        );
    }

    /// A Raft message sent in the last [`RECENT`], by a node still alive,
    /// delivered to a live member it was not addressed to.
    fn misdirect(&mut self) {
        let now = self.now;
        let live = self.live_ids();
        let recent: Vec<usize> = self
            .raft_history
            .iter()
            .enumerate()
            .rev()
            .take_while(|(_, (t, ..))| now.duration_since(*t) <= RECENT)
            .filter(|(_, (_, from, to, _))| {
                self.alive(*from) && live.iter().any(|n| n != from && n != to)
            })
            .map(|(i, _)| i)
            .collect();
        if recent.is_empty() {
            return;
        }
        let i = recent[self.frng.below(recent.len() as u64) as usize];
        let (_, from, to, message) = self.raft_history[i].clone();
        let others: Vec<u64> = live
            .into_iter()
            .filter(|n| *n != from && *n != to)
            .collect();
        let r = others[self.frng.below(others.len() as u64) as usize];
        self.report.misdirected += 1;
        self.trace(|| {
            format!(
                "raft {} from {from} to {to} misdirected to {r}",
                describe_raft(&message)
            )
        });
        self.inject(from, r, message);
    }

    /// A Raft message sent at least [`STALE_AFTER`] ago, by a node still
    /// alive, delivered again: to its addressee if alive, else to another.
    fn replay_stale(&mut self) {
        let now = self.now;
        let live = self.live_ids();
        let old: Vec<usize> = self
            .raft_history
            .iter()
            .enumerate()
            .take_while(|(_, (t, ..))| now.duration_since(*t) >= STALE_AFTER)
            .filter(|(_, (_, from, ..))| self.alive(*from) && live.len() > 1)
            .map(|(i, _)| i)
            .collect();
        if old.is_empty() {
            return;
        }
        let i = old[self.frng.below(old.len() as u64) as usize];
        let (sent, from, to, message) = self.raft_history[i].clone();
        let r = if self.alive(to) {
            to
        } else {
            let others: Vec<u64> = live.into_iter().filter(|n| *n != from).collect();
            others[self.frng.below(others.len() as u64) as usize]
        };
        self.report.stale_replays += 1;
        let age = now.duration_since(sent);
        self.trace(|| {
            format!(
                "raft {} from {from} to {to}, {age:.1?} old, replayed to {r}",
                describe_raft(&message)
            )
        });
        self.inject(from, r, message);
    }

    /// A heartbeat to a live node, from a live member of its roster, in
    /// its current term, whose `commit` is past its last log index.
    fn forge_heartbeat(&mut self) {
        use protobuf::Message as _;
        use raft::prelude::{Message, MessageType};
        let live = self.live_ids();
        let pairs: Vec<(u64, u64)> = live
            .iter()
            .filter_map(|r| self.nodes.get(r).map(|n| (*r, n)))
            .flat_map(|(r, n)| {
                n.membership
                    .members()
                    .iter()
                    .filter(move |m| m.id != r)
                    .map(move |m| (r, m.id))
            })
            .filter(|(_, f)| self.alive(*f))
            .collect();
        if pairs.is_empty() {
            return;
        }
        let (r, from) = pairs[self.frng.below(pairs.len() as u64) as usize];
        let Some(term) = self.nodes.get(&r).map(|n| n.election.view().3) else {
            return;
        };
        let commit = self.raft_high() + 5;
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.to = r;
        m.from = from;
        m.term = term;
        m.commit = commit;
        let Ok(bytes) = m.write_to_bytes() else {
            return;
        };
        self.report.forged_heartbeats += 1;
        self.trace(|| format!("forged heartbeat to {r} from {from}: term {term}, commit {commit}"));
        self.inject(from, r, serde_bytes::ByteBuf::from(bytes));
    }

    /// The highest log index the latest Raft messages carry (an entry's,
    /// a commit, an append's or a vote's index, a snapshot's), or any
    /// node's roster epoch: at least any node's last index but for
    /// entries not sent lately, which the forged heartbeat's margin
    /// covers.
    fn raft_high(&self) -> u64 {
        use protobuf::Message as _;
        let mut high = self
            .nodes
            .values()
            .map(|n| n.membership.epoch())
            .max()
            .unwrap_or(0);
        for (_, _, _, bytes) in self.raft_history.iter().rev().take(1024) {
            let Ok(m) = raft::prelude::Message::parse_from_bytes(bytes) else {
                continue;
            };
            high = high.max(m.index).max(m.commit);
            if let Some(e) = m.entries.last() {
                high = high.max(e.index);
            }
            high = high.max(m.get_snapshot().get_metadata().index);
        }
        high
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
        if let Some(Sabotage::SilenceRaft(_)) = self.config.sabotage {
            self.raft_silenced = true;
            self.trace(|| "sabotage: the network loses every Raft message".into());
            return;
        }
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
        self.check_leadership();
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
            if l.dormant.values().any(|d| d.contains(&id)) {
                continue; // on the disk of a node that may come back
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

    /// While a majority of the newest roster (the highest epoch a live
    /// node knows) is alive and nothing is cut off: within
    /// [`LEADER_BOUND`] some live node leads, and within `remove_after`
    /// plus that bound every dead member has left the roster. Both
    /// clocks start no earlier than the majority did.
    fn check_leadership(&mut self) {
        let now = self.now;
        let newest = self
            .nodes
            .values()
            .filter(|n| n.alive)
            .max_by_key(|n| n.membership.epoch());
        let roster: Vec<u64> = newest
            .map(|n| n.membership.members().iter().map(|m| m.id).collect())
            .unwrap_or_default();
        let alive = roster.iter().filter(|id| self.alive(**id)).count();
        if !self.cut.is_empty() || alive * 2 <= roster.len() {
            self.majority_since = None;
            self.leaderless_since = None;
            self.leaderless_reported = false;
            return;
        }
        let since = *self.majority_since.get_or_insert(now);
        let led = self
            .nodes
            .iter()
            .any(|(id, n)| n.alive && n.membership.leader() == Some(*id));
        if led {
            self.leaderless_since = None;
            self.leaderless_reported = false;
        } else {
            let from = (*self.leaderless_since.get_or_insert(now)).max(since);
            let span = now.duration_since(from);
            self.report.longest_leaderless = self.report.longest_leaderless.max(span);
            if span > LEADER_BOUND && !self.leaderless_reported {
                self.leaderless_reported = true;
                let at = from.duration_since(self.base);
                let views: Vec<(u64, Option<u64>, u64, usize)> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.alive)
                    .map(|(id, n)| {
                        let m = &n.membership;
                        (*id, m.leader(), m.term(), m.members().len())
                    })
                    .collect();
                self.violation(
                    "no leader",
                    format!("no leader since {at:?} while {alive} of the {} members of roster {roster:?} live and reach each other; (node, leader, term, members): {views:?}", roster.len()),
                );
            }
        }
        for id in roster {
            let Some(died) = self.died_at.get(&id).copied() else {
                continue;
            };
            let from = died.max(since);
            if now.duration_since(from) > REMOVE_AFTER + LEADER_BOUND
                && self.ghosts_reported.insert(id)
            {
                let dead = now.duration_since(died);
                self.violation(
                    "ghost",
                    format!("node {id}, dead for {dead:?}, is still in the roster, though a majority lives"),
                );
            }
        }
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
        self.tally();
    }

    /// The report's figures about tasks, from the ledger, and the Raft
    /// messages refused.
    fn tally(&mut self) {
        self.report.raft_refused = self.nodes.values().map(|n| n.election.dropped()).sum();
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
        let replicated: Vec<&Uuid> = self
            .ledger
            .lost
            .iter()
            .filter(|id| !self.ledger.one_copy.contains(id))
            .collect();
        self.report.lost_replicated = replicated.len();
        self.report.lost_replicated_one_at_a_time = replicated
            .iter()
            .filter(|id| {
                self.ledger
                    .ever_held
                    .get(id)
                    .is_none_or(|h| h.is_disjoint(&self.killed_in_a_row))
            })
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

/// A Raft message's type, term and indexes, for the trace.
fn describe_raft(bytes: &[u8]) -> String {
    use protobuf::Message as _;
    match raft::prelude::Message::parse_from_bytes(bytes) {
        Ok(m) => format!(
            "{:?} (term {}, index {}, log term {}, commit {}, {} entries)",
            m.get_msg_type(),
            m.term,
            m.index,
            m.log_term,
            m.commit,
            m.entries.len()
        ),
        Err(_) => "(undecodable)".into(),
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
