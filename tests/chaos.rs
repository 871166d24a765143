//! Chaos on real processes (issue 14): three brokers and a gateway under a
//! steady load, half over HTTP through the gateway and half over ZeroMQ
//! straight to the brokers, while a random broker is killed with `kill -9`
//! every 8 s and restarted 3 s later on the same ports under the same
//! `--node-id`, from its data directory (the same member, with its tasks:
//! issue 15).
//!
//! Every enqueue is recorded (acknowledged or not, latency, when it was sent
//! relative to the kills); every webhook is matched to its enqueue by a
//! unique parameter `c`. The test fails if an acknowledged task is never
//! delivered, or if the roster does not settle after the last restart; it
//! prints everything else in one summary block (run with `--nocapture`).
//!
//! `CHAOS_SECONDS` (default 40) sets the length of the load, `CHAOS_RATE`
//! (default 100) the enqueues per second in total, `CHAOS_SEED` replays the
//! random choices (victims, countdowns), `CHAOS_DUMP=FILE` writes every
//! enqueue to FILE as CSV.
//!
//! Duplicates are explained after the summary (see "Diagnostics of
//! duplicates" at the end of this file): a short table, and every duplicate
//! in detail in `target/tmp/logs/chaos-duplicates-<pid>.txt`. The brokers'
//! dispatch lines it needs are logged with
//! `MIYAMOTO_TEST_LOG=info,broker::store=debug`. `CHAOS_TAIL=SECS` listens
//! SECS more for late webhooks (a replica firing at a claim's deadline,
//! 40 s after a lost delivery), listed apart and not counted in the summary.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use client::{ClientError, Producer};
use protocol::{ClientCommand, ClusterInfo, ErrorCode, ReplyBody, TaskSpec};

use crate::util::*;

/// The brokers' `--remove-after`: a dead member leaves the roster after it.
const REMOVE_AFTER: f64 = 4.0;
/// Seconds into the load of the first kill, and between kills.
const FIRST_KILL: f64 = 5.0;
const KILL_EVERY: f64 = 8.0;
/// Seconds a killed broker stays down before its restart.
const DOWN_FOR: f64 = 3.0;
/// Clients in each pool: enough for the load to go on while enqueues
/// wait on a dead broker (open loop, see `Slots`).
const HTTP_WORKERS: usize = 24;
const ZMQ_WORKERS: usize = 32;
/// The roster must settle this long after the last restart (asserted).
const FINAL_SETTLE: Duration = Duration::from_secs(30);
/// The longest wait for the acknowledged tasks after the load (asserted).
const DELIVERY_WAIT: Duration = Duration::from_secs(60);
/// Largest countdown of a task, and the brokers' `--replica-offset`: a
/// late duplicate arrives at most this long after the load plus a margin.
const MAX_COUNTDOWN: f64 = 3.0;
const REPLICA_OFFSET: f64 = 2.0;

// ---------------------------------------------------------------------
// Stricter targets of issue 14. They are PRINTED (with "met"/"MISSED")
// but NOT asserted yet: assert them here once the fixes have landed.
// Issue 14's targets, asserted at the end of `chaos` (the summary says
// whether each one is met before anything is asserted).
// ---------------------------------------------------------------------
/// Deliveries beyond the first, as a percentage of the tasks delivered.
const TARGET_MAX_DUPLICATE_PCT: f64 = 0.5;
/// Seconds from every restart to a leader and a full roster.
const TARGET_MAX_LEADER_AFTER_RESTART: f64 = 5.0;
/// Seconds any enqueue sent outside a kill window may take.
const TARGET_MAX_LATENCY_OUTSIDE_KILLS: f64 = 1.0;

#[test]
fn chaos_brokers_killed_and_restarted_under_load() {
    let _one = heavy();
    let cfg = Config::from_env();
    let limit = Duration::from_secs(300).max(Duration::from_secs_f64(cfg.seconds + 200.0));
    run(limit, move |h| chaos(h, &cfg));
}

struct Config {
    /// Length of the load, seconds.
    seconds: f64,
    /// Enqueues per second, both ways together.
    rate: f64,
    seed: u64,
    /// Diagnostics: seconds to go on listening for late webhooks after the
    /// usual window (`CHAOS_TAIL`, default 0).
    tail: f64,
}

impl Config {
    fn from_env() -> Config {
        let num = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .unwrap_or(default)
        };
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        Config {
            seconds: num("CHAOS_SECONDS", 40.0),
            rate: num("CHAOS_RATE", 100.0),
            seed,
            tail: num("CHAOS_TAIL", 0.0).min(600.0),
        }
    }

    /// Kill times, seconds into the load: each restart falls within it.
    fn kills(&self) -> Vec<f64> {
        (0..)
            .map(|k| FIRST_KILL + KILL_EVERY * k as f64)
            .take_while(|t| t + DOWN_FOR <= self.seconds)
            .collect()
    }
}

/// xorshift64*: no `rand` among the dev-dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// In [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A countdown from 0 to 3 s, in tenths.
    fn countdown(&mut self) -> f64 {
        (self.unit() * MAX_COUNTDOWN * 10.0).floor() / 10.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Via {
    Http,
    Zmq,
}

/// One enqueue as the client saw it.
struct Enqueue {
    via: Via,
    /// The unique parameter `c` of the task.
    tag: String,
    /// The broker asked (ZeroMQ only).
    broker: Option<usize>,
    /// Seconds into the load when it was sent.
    sent: f64,
    /// Seconds it was sent after its slot (every worker was busy).
    late: f64,
    latency: f64,
    outcome: Outcome,
    /// The task's countdown, seconds.
    countdown: f64,
}

enum Outcome {
    Acked {
        id: String,
        replicas: u64,
    },
    /// Not acknowledged, not refused either: the task may or may not be
    /// stored (HTTP 503, a ZeroMQ timeout or `unavailable`, a dropped
    /// connection).
    Unknown(String),
    /// Any other error.
    Refused(String),
}

/// An open-loop load: slot `n` is due at `start + n × interval`; a pool of
/// workers takes the slots in turn, so a slow enqueue delays no other
/// unless every worker is busy (then the slot is sent late, and recorded
/// so).
struct Slots {
    start: Instant,
    until: Instant,
    interval: Duration,
    next: AtomicUsize,
    seed: u64,
}

impl Slots {
    fn new(start: Instant, until: Instant, rate: f64, seed: u64) -> Slots {
        Slots {
            start,
            until,
            interval: Duration::from_secs_f64(1.0 / rate),
            next: AtomicUsize::new(0),
            seed,
        }
    }

    /// The next slot (its number, when it was due, its task's countdown),
    /// once due; `None` after the load.
    fn take(&self) -> Option<(usize, Instant, f64)> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let due = self.start + self.interval.mul_f64(n as f64);
        if due >= self.until {
            return None;
        }
        sleep_until(due);
        let countdown = Rng::new(self.seed ^ n as u64).countdown();
        Some((n, due, countdown))
    }

    fn since(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }
}

/// One HTTP client of the pool: `POST /queue` through the gateway.
fn http_worker(url: &str, target: &str, slots: &Slots) -> Vec<Enqueue> {
    let mut out = Vec::new();
    while let Some((n, due, countdown)) = slots.take() {
        let tag = format!("h{n}");
        let body = format!("task.url={target}&task.countdown={countdown}&c={tag}");
        let sent = Instant::now();
        let r = try_http(
            "POST",
            url,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body,
        );
        let latency = sent.elapsed().as_secs_f64();
        let outcome = match r {
            Ok((200, v)) => match v["id"].as_str() {
                Some(id) => Outcome::Acked {
                    id: id.to_string(),
                    replicas: v["replicas"].as_u64().unwrap_or(0),
                },
                None => Outcome::Refused(format!("http 200 without an id: {v}")),
            },
            Ok((503, _)) => Outcome::Unknown("http 503".into()),
            Ok((s, v)) => Outcome::Refused(format!("http {s} {}", v["reason"])),
            Err(e) => Outcome::Unknown(format!("http transport error: {e}")),
        };
        out.push(Enqueue {
            via: Via::Http,
            tag,
            broker: None,
            sent: slots.since(sent),
            late: (sent - due).as_secs_f64(),
            latency,
            outcome,
            countdown,
        });
    }
    out
}

/// Seconds a broker that let a ZeroMQ enqueue time out is passed over.
const ZMQ_SUSPECT_FOR: Duration = Duration::from_secs(2);

/// One ZeroMQ client of the pool, with a producer per broker. Like a
/// client given every broker's endpoint: it takes them in turn, and passes
/// over for a while one that let a request time out (shared by the pool).
fn zmq_worker(
    bases: &[u16],
    target: &str,
    slots: &Slots,
    suspects: &Mutex<Vec<Instant>>,
) -> Vec<Enqueue> {
    let mut producers: Vec<Option<Producer>> = bases
        .iter()
        .map(|b| {
            Producer::connect(&format!("tcp://127.0.0.1:{b}"))
                .ok()
                .map(|mut p| {
                    // Like the gateway's link: a resend after 1 s, under
                    // the same request id (a broker acts on it once).
                    p.attempt_timeout = Duration::from_secs(1);
                    p.attempts = 2;
                    p
                })
        })
        .collect();
    let mut out = Vec::new();
    while let Some((n, due, countdown)) = slots.take() {
        let b = {
            let now = Instant::now();
            let s = suspects.lock().unwrap_or_else(|e| e.into_inner());
            (0..bases.len())
                .map(|k| (n + k) % bases.len())
                .find(|b| s[*b] <= now)
                .unwrap_or(n % bases.len())
        };
        let tag = format!("z{n}");
        let spec = TaskSpec {
            url: target.to_string(),
            countdown: Some(countdown),
            params: vec![("c".into(), tag.clone())],
            ..Default::default()
        };
        let sent = Instant::now();
        // A node still joining refuses with `unavailable` and acts on
        // nothing: the request goes to the next broker, as PROTOCOL.md
        // §7.15 tells a client.
        let mut b = b;
        let mut r = Err(ClientError::Unexpected("no producer".into()));
        for _ in 0..bases.len() {
            r = match &mut producers[b] {
                Some(p) => p.request(ClientCommand::Enqueue {
                    queue: "default".into(),
                    task: spec.clone(),
                    wait: None,
                }),
                None => Err(ClientError::Unexpected("no producer".into())),
            };
            let refused = matches!(
                r,
                Err(ClientError::Rejected {
                    code: ErrorCode::Unavailable,
                    ..
                })
            );
            if !refused {
                break;
            }
            b = (b + 1) % bases.len();
        }
        let latency = sent.elapsed().as_secs_f64();
        if matches!(r, Err(ClientError::Timeout(_))) {
            suspects.lock().unwrap_or_else(|e| e.into_inner())[b] =
                Instant::now() + ZMQ_SUSPECT_FOR;
        }
        let outcome = match r {
            Ok(ReplyBody::Enqueued { id, replicas, .. }) => Outcome::Acked {
                id,
                replicas: replicas.into(),
            },
            Ok(other) => Outcome::Refused(format!("zmq unexpected reply: {other:?}")),
            Err(ClientError::Timeout(_)) => Outcome::Unknown("zmq timeout".into()),
            Err(ClientError::Rejected {
                code: ErrorCode::Unavailable,
                ..
            }) => Outcome::Unknown("zmq unavailable".into()),
            Err(ClientError::Rejected { code, .. }) => Outcome::Refused(format!("zmq {code:?}")),
            Err(e) => Outcome::Refused(format!("zmq error: {e}")),
        };
        out.push(Enqueue {
            via: Via::Zmq,
            tag,
            broker: Some(b),
            sent: slots.since(sent),
            late: (sent - due).as_secs_f64(),
            latency,
            outcome,
            countdown,
        });
    }
    out
}

/// Each broker's own view of the cluster, asked directly over ZeroMQ.
struct Views {
    producers: Vec<Producer>,
}

impl Views {
    fn new(bases: &[u16]) -> Views {
        let producers = bases
            .iter()
            .map(|b| {
                let mut p =
                    Producer::connect(&format!("tcp://127.0.0.1:{b}")).expect("a producer socket");
                p.attempt_timeout = Duration::from_millis(500);
                p.attempts = 1;
                p
            })
            .collect();
        Views { producers }
    }

    fn one(&mut self, i: usize) -> Option<ClusterInfo> {
        ask_cluster(&mut self.producers[i])
    }

    /// All three at once, so a dead broker costs one timeout, not three.
    fn all(&mut self) -> Vec<Option<ClusterInfo>> {
        thread::scope(|s| {
            let asks: Vec<_> = self
                .producers
                .iter_mut()
                .map(|p| s.spawn(move || ask_cluster(p)))
                .collect();
            asks.into_iter().map(|a| a.join().ok().flatten()).collect()
        })
    }
}

fn ask_cluster(p: &mut Producer) -> Option<ClusterInfo> {
    match p.request(ClientCommand::ClusterInfo) {
        Ok(ReplyBody::Cluster { cluster }) => Some(cluster),
        _ => None,
    }
}

/// The leader every node names, if all answered and agree.
fn agreed_leader(views: &[Option<ClusterInfo>]) -> Option<u64> {
    let first = views.first()?.as_ref()?.leader?;
    views
        .iter()
        .all(|v| v.as_ref().is_some_and(|v| v.leader == Some(first)))
        .then_some(first)
}

/// Every node answers and lists exactly the three live nodes (by their
/// current ids: no ghost of a killed incarnation), all alive.
fn full_roster(views: &[Option<ClusterInfo>]) -> bool {
    let Some(vs) = views.iter().map(|v| v.as_ref()).collect::<Option<Vec<_>>>() else {
        return false;
    };
    let ids: HashSet<u64> = vs.iter().map(|v| v.node).collect();
    ids.len() == vs.len()
        && vs.iter().all(|v| {
            v.nodes.len() == ids.len() && v.nodes.iter().all(|n| n.alive && ids.contains(&n.id))
        })
}

/// A short line per node: `nI: leader L, [name:id alive?, ...]`.
fn describe(views: &[Option<ClusterInfo>]) -> String {
    views
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            None => format!("n{i}: no answer"),
            Some(v) => format!(
                "n{i} (id {}): leader {:?}, epoch {}, [{}]",
                v.node,
                v.leader,
                v.epoch,
                v.nodes
                    .iter()
                    .map(|n| format!("{}:{}{}", n.name, n.id, if n.alive { "" } else { " dead" }))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The gateway's `GET /cluster` shows a leader and three live members.
fn gateway_settled(gateway: &Node) -> bool {
    match try_http("GET", &gateway.url("/cluster"), &[], "") {
        Ok((200, v)) => {
            v["leader"].is_u64()
                && v["nodes"]
                    .as_array()
                    .is_some_and(|a| a.len() == 3 && a.iter().all(|n| n["alive"] == true))
        }
        _ => false,
    }
}

fn broker_args(i: usize, bases: &[u16], join: Option<usize>) -> Vec<String> {
    let mut args: Vec<String> = [
        "broker",
        "--port",
        &bases[i].to_string(),
        "--node-id",
        &format!("n{i}"),
        "--replicas",
        "2",
        "--replica-offset",
        &REPLICA_OFFSET.to_string(),
        "--remove-after",
        &REMOVE_AFTER.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(j) = join {
        args.push("--join".into());
        args.push(format!("tcp://127.0.0.1:{}", bases[j]));
    }
    args
}

fn spawn_broker(h: &Harness, i: usize, bases: &[u16], join: Option<usize>) -> u32 {
    let args = broker_args(i, bases, join);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.spawn(&args)
}

/// One kill and its restart.
struct Restart {
    victim: usize,
    was_leader: Option<bool>,
    /// Seconds into the load.
    killed_at: f64,
    /// The victim had already ended on its own (its status).
    already_dead: Option<String>,
    /// After a leader's kill: seconds until both survivors named a new one.
    new_leader_after_kill: Option<f64>,
    restarted_at: f64,
    join_via: usize,
    pid: u32,
    /// Seconds from the restart until all three named one leader.
    leader_after: Option<f64>,
    /// Seconds from the restart until the roster was full (and a leader).
    roster_after: Option<f64>,
    /// How long it was watched (until the next kill, or the final bound).
    watched: f64,
    /// The restarted process ended while watched: after how long, status.
    exited: Option<(f64, String)>,
    /// The views when the watch ended unsettled.
    last_views: Option<String>,
}

/// A process that ended without being killed by the test.
struct Exit {
    what: String,
    pid: u32,
    at: f64,
    status: String,
}

struct Watch<'a> {
    h: &'a Harness,
    start: Instant,
    reported: HashSet<u32>,
    exits: Vec<Exit>,
}

impl Watch<'_> {
    /// Records the processes in `pids` (named) that ended since last time.
    fn check(&mut self, pids: &[(String, u32)]) {
        for (what, pid) in pids {
            if self.reported.contains(pid) {
                continue;
            }
            if let Some(status) = self.h.wait_exit(*pid, Duration::ZERO) {
                self.reported.insert(*pid);
                self.exits.push(Exit {
                    what: what.clone(),
                    pid: *pid,
                    at: self.start.elapsed().as_secs_f64(),
                    status: status.to_string(),
                });
            }
        }
    }
}

fn chaos(h: &Harness, cfg: &Config) {
    let bases: Vec<u16> = (0..3).map(|_| free_base()).collect();
    let mut views = Views::new(&bases);
    // The first node leads before the others join; each joins the one before.
    let mut pids = vec![spawn_broker(h, 0, &bases, None)];
    let deadline = Instant::now() + Duration::from_secs(20);
    while views.one(0).is_none_or(|v| v.leader != Some(v.node)) {
        assert!(Instant::now() < deadline, "n0 never led");
        thread::sleep(Duration::from_millis(100));
    }
    for i in 1..3 {
        pids.push(spawn_broker(h, i, &bases, Some(i - 1)));
    }
    let http_port = free_port();
    let brokers = bases
        .iter()
        .map(|b| format!("tcp://127.0.0.1:{b}"))
        .collect::<Vec<_>>()
        .join(",");
    let gateway_pid = h.spawn(&[
        "gateway",
        "--listen",
        &format!("127.0.0.1:{http_port}"),
        "--broker",
        &brokers,
    ]);
    let gateway = Node {
        base: bases[0],
        http: http_port,
        pid: gateway_pid,
    };
    gateway.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vs = views.all();
        if agreed_leader(&vs).is_some() && full_roster(&vs) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never formed: {}",
            describe(&vs)
        );
        thread::sleep(Duration::from_millis(100));
    }

    let rx = Receiver::start();
    let target = rx.url("/chaos");
    let url = gateway.url("/queue");
    let kills = cfg.kills();
    let mut rng = Rng::new(cfg.seed);
    let start = Instant::now();
    let start_unix = now();
    let until = start + Duration::from_secs_f64(cfg.seconds);
    let mut watch = Watch {
        h,
        start,
        reported: HashSet::new(),
        exits: Vec::new(),
    };
    let mut killed: HashSet<u32> = HashSet::new();

    let http_slots = Slots::new(start, until, cfg.rate / 2.0, cfg.seed ^ 0x1111);
    let zmq_slots = Slots::new(start, until, cfg.rate / 2.0, cfg.seed ^ 0x2222);
    let suspects = Mutex::new(vec![start; bases.len()]);

    let (enqueues, restarts, final_settle) = thread::scope(|s| {
        let http: Vec<_> = (0..HTTP_WORKERS)
            .map(|_| {
                let (url, target, slots) = (&url, &target, &http_slots);
                s.spawn(move || http_worker(url, target, slots))
            })
            .collect();
        let zmq: Vec<_> = (0..ZMQ_WORKERS)
            .map(|_| {
                let (bases, target, slots, suspects) = (&bases, &target, &zmq_slots, &suspects);
                s.spawn(move || zmq_worker(bases, target, slots, suspects))
            })
            .collect();

        let since = |t: Instant| (t - start).as_secs_f64();
        let mut restarts: Vec<Restart> = Vec::new();
        // Seconds from the last restart to a settled roster as seen by
        // every broker and by the gateway.
        let mut final_settle: Option<f64> = None;
        for (k, &at) in kills.iter().enumerate() {
            sleep_until(start + Duration::from_secs_f64(at));
            let victim = rng.below(3);
            let already_dead = h
                .wait_exit(pids[victim], Duration::ZERO)
                .map(|s| s.to_string());
            let before = if already_dead.is_none() {
                views.one(victim)
            } else {
                None
            };
            let was_leader = before.as_ref().map(|v| v.leader == Some(v.node));
            let victim_id = before.as_ref().map(|v| v.node);
            h.kill(pids[victim]);
            killed.insert(pids[victim]);
            let killed_at = Instant::now();
            let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
            // Until the restart: a new leader among the survivors?
            let restart_at = start + Duration::from_secs_f64(at + DOWN_FOR);
            let mut new_leader_after_kill = None;
            while Instant::now() < restart_at {
                if was_leader == Some(true) && new_leader_after_kill.is_none() {
                    let vs: Vec<_> = survivors.iter().map(|i| views.one(*i)).collect();
                    if agreed_leader(&vs).is_some_and(|l| Some(l) != victim_id) {
                        new_leader_after_kill = Some(killed_at.elapsed().as_secs_f64());
                    }
                }
                watch.check(&named(&pids, victim, gateway_pid, &killed));
                thread::sleep(Duration::from_millis(100));
            }
            sleep_until(restart_at);
            let live: Vec<usize> = survivors
                .iter()
                .copied()
                .filter(|i| h.wait_exit(pids[*i], Duration::ZERO).is_none())
                .collect();
            let join_via = if live.is_empty() {
                survivors[rng.below(2)]
            } else {
                live[rng.below(live.len())]
            };
            let pid = spawn_broker(h, victim, &bases, Some(join_via));
            pids[victim] = pid;
            let restarted = Instant::now();
            let last = k + 1 == kills.len();
            let watch_until = if last {
                restarted + FINAL_SETTLE
            } else {
                start + Duration::from_secs_f64(kills[k + 1])
            };
            let mut r = Restart {
                victim,
                was_leader,
                killed_at: since(killed_at),
                already_dead,
                new_leader_after_kill,
                restarted_at: since(restarted),
                join_via,
                pid,
                leader_after: None,
                roster_after: None,
                watched: 0.0,
                exited: None,
                last_views: None,
            };
            loop {
                if let Some(status) = h.wait_exit(pid, Duration::ZERO) {
                    r.exited = Some((restarted.elapsed().as_secs_f64(), status.to_string()));
                    watch.reported.insert(pid);
                    watch.exits.push(Exit {
                        what: format!("restarted broker n{victim}"),
                        pid,
                        at: since(Instant::now()),
                        status: status.to_string(),
                    });
                    r.last_views = Some(describe(&views.all()));
                    break;
                }
                let vs = views.all();
                let leader = agreed_leader(&vs).is_some();
                if leader && r.leader_after.is_none() {
                    r.leader_after = Some(restarted.elapsed().as_secs_f64());
                }
                if leader && full_roster(&vs) {
                    r.roster_after = Some(restarted.elapsed().as_secs_f64());
                    break;
                }
                // Stop short of the next kill rather than delay it by a
                // poll that waits on a dead broker.
                if Instant::now() + Duration::from_millis(600) >= watch_until {
                    r.last_views = Some(describe(&vs));
                    break;
                }
                watch.check(&named(&pids, usize::MAX, gateway_pid, &killed));
                thread::sleep(Duration::from_millis(100));
            }
            if last && r.roster_after.is_some() {
                // The gateway's view must agree within the same bound.
                while Instant::now() < watch_until {
                    if gateway_settled(&gateway) {
                        final_settle = Some(restarted.elapsed().as_secs_f64());
                        break;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
            r.watched = restarted.elapsed().as_secs_f64();
            restarts.push(r);
        }
        watch.check(&named(&pids, usize::MAX, gateway_pid, &killed));
        let mut enqueues: Vec<Enqueue> = Vec::new();
        for t in http.into_iter().chain(zmq) {
            match t.join() {
                Ok(e) => enqueues.extend(e),
                Err(_) => println!("chaos: a load thread panicked"),
            }
        }
        (enqueues, restarts, final_settle)
    });
    let load_end = until;

    // Deliveries: by the tag `c`, the ids they came under.
    let acked: HashMap<&str, &Enqueue> = enqueues
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Acked { .. }))
        .map(|e| (e.tag.as_str(), e))
        .collect();
    let mut missing: HashSet<&str> = acked.keys().copied().collect();
    let mut delivered: HashMap<String, Vec<String>> = HashMap::new();
    // Diagnostics of duplicates: every webhook's arrival and headers, by tag.
    let mut arrivals: HashMap<String, Vec<Arrival>> = HashMap::new();
    let mut untagged = 0usize;
    let mut record = |seen: Seen, missing: &mut HashSet<&str>| {
        let arrival = Arrival::of(&seen, start_unix);
        let body = String::from_utf8_lossy(&seen.body).into_owned();
        let tag = body
            .split('&')
            .find_map(|kv| kv.strip_prefix("c="))
            .map(str::to_string);
        match tag {
            Some(tag) => {
                missing.remove(tag.as_str());
                delivered
                    .entry(tag.clone())
                    .or_default()
                    .push(seen.header("x-task-id").to_string());
                arrivals.entry(tag).or_default().push(arrival);
            }
            None => untagged += 1,
        }
    };
    let wait_from = Instant::now();
    let deadline = wait_from + DELIVERY_WAIT;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.next(left.min(Duration::from_secs(1))) {
            Some(seen) => record(seen, &mut missing),
            None if Instant::now() >= deadline => break,
            None => {}
        }
    }
    let all_delivered_after = missing
        .is_empty()
        .then(|| wait_from.elapsed().as_secs_f64());
    // Late duplicates: a second replica fires up to the largest countdown
    // plus the replica offset after the last enqueue.
    let quiet_from = load_end + Duration::from_secs_f64(MAX_COUNTDOWN + REPLICA_OFFSET + 2.0);
    loop {
        let wait = quiet_from
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match rx.next(wait) {
            Some(seen) => record(seen, &mut missing),
            None if Instant::now() >= quiet_from => break,
            None => {}
        }
    }
    // Diagnostics only (`CHAOS_TAIL=SECS`): webhooks that come after the
    // window above (a replica firing at a claim's deadline, timeout + 10 s
    // after a lost delivery) are listed apart, not counted in the summary.
    let mut tail: Vec<(String, Arrival)> = Vec::new();
    if cfg.tail > 0.0 {
        let tail_until = Instant::now() + Duration::from_secs_f64(cfg.tail);
        while let Some(seen) = rx.next(tail_until.saturating_duration_since(Instant::now())) {
            let tag = seen.form("c");
            tail.push((tag, Arrival::of(&seen, start_unix)));
        }
    }

    let report = Report {
        cfg,
        kills: &kills,
        enqueues: &enqueues,
        restarts: &restarts,
        final_settle,
        delivered: &delivered,
        missing: &missing,
        untagged,
        all_delivered_after,
        exits: &watch.exits,
    };
    let mut summary = report.summary();
    let diag = Diagnosis {
        report: &report,
        bases: &bases,
        arrivals: &arrivals,
        tail: &tail,
        start_unix,
    };
    let (table, detail) = diag.explain();
    summary.push_str(&table);
    println!("{summary}");
    let detail_path = format!(
        "{}/logs/chaos-duplicates-{}.txt",
        env!("CARGO_TARGET_TMPDIR"),
        std::process::id()
    );
    match std::fs::write(&detail_path, detail) {
        Ok(()) => println!("every duplicate, in detail: {detail_path}"),
        Err(e) => println!("cannot write {detail_path}: {e}"),
    }
    if let Ok(path) = std::env::var("CHAOS_DUMP") {
        match std::fs::write(&path, report.csv()) {
            Ok(()) => println!("every enqueue written to {path}"),
            Err(e) => println!("cannot write {path}: {e}"),
        }
    }

    let lost = missing.len();
    assert!(
        lost == 0,
        "{lost} acknowledged tasks were never delivered (see the summary above)"
    );
    assert!(
        final_settle.is_some(),
        "after the last restart the roster did not settle to 3 live members with a leader within {FINAL_SETTLE:?} (see the summary above)"
    );
    let missed = report.missed_targets();
    assert!(missed.is_empty(), "targets missed: {missed:#?}");
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// The processes to watch for unexpected exits: the brokers (but not
/// `skip`, nor one the test killed) and the gateway.
fn named(pids: &[u32], skip: usize, gateway: u32, killed: &HashSet<u32>) -> Vec<(String, u32)> {
    pids.iter()
        .enumerate()
        .filter(|(i, p)| *i != skip && !killed.contains(p))
        .map(|(i, p)| (format!("broker n{i}"), *p))
        .chain([("gateway".to_string(), gateway)])
        .collect()
}

struct Report<'a> {
    cfg: &'a Config,
    kills: &'a [f64],
    enqueues: &'a [Enqueue],
    restarts: &'a [Restart],
    final_settle: Option<f64>,
    delivered: &'a HashMap<String, Vec<String>>,
    missing: &'a HashSet<&'a str>,
    untagged: usize,
    all_delivered_after: Option<f64>,
    exits: &'a [Exit],
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl Report<'_> {
    fn in_kill_window(&self, sent: f64) -> bool {
        self.kills
            .iter()
            .any(|k| sent >= k - 0.5 && sent <= k + REMOVE_AFTER + 2.0)
    }

    /// Every enqueue, one line each (`CHAOS_DUMP=FILE`), after the kills.
    fn csv(&self) -> String {
        let mut o = String::new();
        for r in self.restarts {
            let _ = writeln!(
                o,
                "# kill n{} at {:.3}, restart at {:.3}",
                r.victim, r.killed_at, r.restarted_at
            );
        }
        let _ = writeln!(
            o,
            "via,tag,broker,sent,late,latency,outcome,id,replicas,deliveries,ids_delivered"
        );
        for x in self.enqueues {
            let (outcome, id, replicas) = match &x.outcome {
                Outcome::Acked { id, replicas } => ("acked", id.as_str(), replicas.to_string()),
                Outcome::Unknown(k) => (k.as_str(), "", String::new()),
                Outcome::Refused(k) => (k.as_str(), "", String::new()),
            };
            let ids = self.delivered.get(&x.tag);
            let _ = writeln!(
                o,
                "{:?},{},{},{:.4},{:.4},{:.4},{},{id},{replicas},{},{}",
                x.via,
                x.tag,
                x.broker.map(|b| format!("n{b}")).unwrap_or_default(),
                x.sent,
                x.late,
                x.latency,
                outcome.replace(',', ";"),
                ids.map_or(0, Vec::len),
                ids.map(|v| v.join(" ")).unwrap_or_default()
            );
        }
        o
    }

    /// The targets this run missed, each with its figure.
    fn missed_targets(&self) -> Vec<String> {
        let mut missed = Vec::new();
        let deliveries: usize = self.delivered.values().map(Vec::len).sum();
        let tasks = self.delivered.len();
        let dup_pct = 100.0 * (deliveries - tasks) as f64 / tasks.max(1) as f64;
        if dup_pct >= TARGET_MAX_DUPLICATE_PCT {
            missed.push(format!(
                "duplicates {dup_pct:.2} % (target < {TARGET_MAX_DUPLICATE_PCT} %)"
            ));
        }
        let max_outside = self
            .enqueues
            .iter()
            .filter(|x| !self.in_kill_window(x.sent))
            .map(|x| x.latency)
            .fold(0.0, f64::max);
        if max_outside >= TARGET_MAX_LATENCY_OUTSIDE_KILLS {
            missed.push(format!(
                "an enqueue outside the kill windows took {max_outside:.2} s (target < {TARGET_MAX_LATENCY_OUTSIDE_KILLS} s)"
            ));
        }
        for r in self.restarts {
            if !r
                .roster_after
                .is_some_and(|s| s <= TARGET_MAX_LEADER_AFTER_RESTART)
            {
                missed.push(format!(
                    "after the restart of n{} at {:.1} s: leader and full roster after {:?} s (target {TARGET_MAX_LEADER_AFTER_RESTART} s)",
                    r.victim, r.restarted_at, r.roster_after
                ));
            }
        }
        missed
    }

    fn summary(&self) -> String {
        let mut o = String::new();
        let e = self.enqueues;
        let _ = writeln!(o, "\n======== chaos summary ========");
        let _ = writeln!(
            o,
            "load {:.0} s at {:.0}/s asked, half each way (open loop; {} HTTP clients, {} ZeroMQ clients), seed {} (CHAOS_SEED), replicas 2, replica offset {REPLICA_OFFSET} s, remove-after {REMOVE_AFTER} s",
            self.cfg.seconds, self.cfg.rate, HTTP_WORKERS, ZMQ_WORKERS, self.cfg.seed
        );
        let _ = writeln!(
            o,
            "logs: {}/logs/broker-{}-*.log, gateway-{}-*.log",
            env!("CARGO_TARGET_TMPDIR"),
            std::process::id(),
            std::process::id()
        );
        for via in [Via::Http, Via::Zmq] {
            let n = e.iter().filter(|x| x.via == via).count();
            let acked = e
                .iter()
                .filter(|x| x.via == via && matches!(x.outcome, Outcome::Acked { .. }))
                .count();
            let late: Vec<f64> = e
                .iter()
                .filter(|x| x.via == via && x.late > 0.25)
                .map(|x| x.late)
                .collect();
            let _ = writeln!(
                o,
                "{via:?}: {n} enqueues sent ({:.1}/s), {acked} acknowledged; sent over 0.25 s after their slot (every client busy): {}{}",
                n as f64 / self.cfg.seconds,
                late.len(),
                if late.is_empty() {
                    String::new()
                } else {
                    format!(", at worst {:.2} s", late.iter().copied().fold(0.0, f64::max))
                }
            );
        }
        let acked_total = e
            .iter()
            .filter(|x| matches!(x.outcome, Outcome::Acked { .. }))
            .count();
        let _ = writeln!(o, "tasks acknowledged: {acked_total}");

        // Lost, by the replicas they were acknowledged with.
        let mut lost_by: BTreeMap<(Via, u64), usize> = BTreeMap::new();
        let mut lost_examples = Vec::new();
        for x in e {
            if let Outcome::Acked { id, replicas } = &x.outcome {
                if self.missing.contains(x.tag.as_str()) {
                    *lost_by.entry((x.via, *replicas)).or_default() += 1;
                    if lost_examples.len() < 10 {
                        lost_examples.push(format!(
                            "{} id {id} sent at {:.2} s{} replicas {replicas}",
                            x.tag,
                            x.sent,
                            x.broker.map(|b| format!(" to n{b}")).unwrap_or_default()
                        ));
                    }
                }
            }
        }
        let _ = writeln!(
            o,
            "LOST (acknowledged, never delivered): {}{}",
            self.missing.len(),
            if lost_by.is_empty() {
                String::new()
            } else {
                format!(
                    " — by (way, replicas acknowledged): {}",
                    lost_by
                        .iter()
                        .map(|((v, r), n)| format!("{v:?} replicas={r}: {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        for l in &lost_examples {
            let _ = writeln!(o, "    e.g. {l}");
        }
        match self.all_delivered_after {
            Some(s) => {
                let _ = writeln!(
                    o,
                    "every acknowledged task delivered {s:.1} s after the waiting began"
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "waited {DELIVERY_WAIT:?} for the acknowledged tasks: some never came"
                );
            }
        }

        // Duplicates, and enqueues stored under two ids.
        let deliveries: usize = self.delivered.values().map(Vec::len).sum();
        let tasks_delivered = self.delivered.len();
        let duplicates = deliveries - tasks_delivered;
        let dup_pct = 100.0 * duplicates as f64 / tasks_delivered.max(1) as f64;
        let mut two_ids: Vec<&String> = self
            .delivered
            .iter()
            .filter(|(_, ids)| ids.iter().collect::<HashSet<_>>().len() > 1)
            .map(|(tag, _)| tag)
            .collect();
        two_ids.sort();
        let by_tag: HashMap<&str, &Enqueue> = e.iter().map(|x| (x.tag.as_str(), x)).collect();
        let two_ids_examples: Vec<String> = two_ids
            .iter()
            .take(5)
            .map(|tag| match by_tag.get(tag.as_str()) {
                Some(x) => format!(
                    "{tag} sent at {:.2} s{} ({})",
                    x.sent,
                    x.broker.map(|b| format!(" to n{b}")).unwrap_or_default(),
                    match &x.outcome {
                        Outcome::Acked { .. } => "acknowledged",
                        Outcome::Unknown(k) | Outcome::Refused(k) => k,
                    }
                ),
                None => tag.to_string(),
            })
            .collect();
        let other_id = e
            .iter()
            .filter(|x| match &x.outcome {
                Outcome::Acked { id, .. } => self
                    .delivered
                    .get(&x.tag)
                    .is_some_and(|ids| !ids.contains(id)),
                _ => false,
            })
            .count();
        let _ = writeln!(
            o,
            "deliveries: {deliveries} of {tasks_delivered} tasks; duplicates (beyond the first): {duplicates} = {dup_pct:.2} % of tasks delivered [target < {TARGET_MAX_DUPLICATE_PCT} %: {}]",
            met(dup_pct < TARGET_MAX_DUPLICATE_PCT)
        );
        let _ = writeln!(
            o,
            "one enqueue delivered under 2+ task ids (stored twice): {}{}; acknowledged but delivered only under another id: {other_id}; webhooks without a tag: {}",
            two_ids.len(),
            if two_ids.is_empty() {
                String::new()
            } else {
                format!(" [{}]", two_ids_examples.join("; "))
            },
            self.untagged
        );

        // Replicas in the answers (in / outside the kill windows).
        for via in [Via::Http, Via::Zmq] {
            let mut by: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
            for x in e.iter().filter(|x| x.via == via) {
                if let Outcome::Acked { replicas, .. } = x.outcome {
                    let entry = by.entry(replicas).or_default();
                    entry.0 += 1;
                    if !self.in_kill_window(x.sent) {
                        entry.1 += 1;
                    }
                }
            }
            let _ = writeln!(
                o,
                "replicas in {via:?} answers: {}",
                by.iter()
                    .map(|(r, (n, outside))| format!(
                        "{r}: {n} ({outside} sent outside a kill window)"
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        // Errors by code, and how many of them were delivered anyway.
        let mut errors: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        for x in e {
            let (key, unknown) = match &x.outcome {
                Outcome::Acked { .. } => continue,
                Outcome::Unknown(k) => (k, true),
                Outcome::Refused(k) => (k, false),
            };
            let entry = errors
                .entry(format!("{key}{}", if unknown { " (unknown)" } else { "" }))
                .or_default();
            entry.0 += 1;
            if self.delivered.contains_key(&x.tag) {
                entry.1 += 1;
            }
            if !self.in_kill_window(x.sent) {
                entry.2 += 1;
            }
        }
        let _ = writeln!(
            o,
            "enqueue errors (\"unknown\": neither acknowledged nor refused): {}",
            if errors.is_empty() { "none" } else { "" }
        );
        for (k, (n, d, outside)) in &errors {
            let _ = writeln!(
                o,
                "    {k}: {n}, delivered anyway {d}, sent outside a kill window {outside}"
            );
        }
        let unknown: Vec<&Enqueue> = e
            .iter()
            .filter(|x| matches!(x.outcome, Outcome::Unknown(_)))
            .collect();
        let http503: Vec<&&Enqueue> = unknown
            .iter()
            .filter(|x| matches!(&x.outcome, Outcome::Unknown(k) if k == "http 503"))
            .collect();
        let _ = writeln!(
            o,
            "HTTP 503: {}, delivered anyway {}; all unacknowledged-unknown (503, timeouts, unavailable): {}, delivered anyway {}",
            http503.len(),
            http503
                .iter()
                .filter(|x| self.delivered.contains_key(&x.tag))
                .count(),
            unknown.len(),
            unknown
                .iter()
                .filter(|x| self.delivered.contains_key(&x.tag))
                .count()
        );

        // Latency.
        let lat = |f: &dyn Fn(&Enqueue) -> bool| {
            let mut v: Vec<f64> = e.iter().filter(|x| f(x)).map(|x| x.latency).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        for (name, v) in [
            ("all", lat(&|_| true)),
            ("HTTP", lat(&|x| x.via == Via::Http)),
            ("ZeroMQ", lat(&|x| x.via == Via::Zmq)),
        ] {
            let _ = writeln!(
                o,
                "enqueue latency {name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} enqueues)",
                1e3 * percentile(&v, 0.5),
                1e3 * percentile(&v, 0.99),
                1e3 * v.last().copied().unwrap_or(f64::NAN),
                v.len()
            );
        }
        let mut outside: Vec<&Enqueue> =
            e.iter().filter(|x| !self.in_kill_window(x.sent)).collect();
        outside.sort_by(|a, b| b.latency.total_cmp(&a.latency));
        let max_outside = outside.first().map(|x| x.latency).unwrap_or(0.0);
        let _ = writeln!(
            o,
            "max latency outside the kill windows [kill-0.5 s, kill+{} s]: {:.1} ms over {} enqueues [target < {TARGET_MAX_LATENCY_OUTSIDE_KILLS} s: {}]{}",
            REMOVE_AFTER + 2.0,
            1e3 * max_outside,
            outside.len(),
            met(max_outside < TARGET_MAX_LATENCY_OUTSIDE_KILLS),
            if !outside.is_empty() {
                format!(
                    "; slowest: {}",
                    outside
                        .iter()
                        .take(3)
                        .map(|x| format!(
                            "{} sent at {:.2} s{} took {:.2} s ({})",
                            x.tag,
                            x.sent,
                            x.broker.map(|b| format!(" to n{b}")).unwrap_or_default(),
                            x.latency,
                            match &x.outcome {
                                Outcome::Acked { .. } => "acknowledged",
                                Outcome::Unknown(k) | Outcome::Refused(k) => k,
                            }
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            } else {
                String::new()
            }
        );

        // Kills and restarts.
        let _ = writeln!(
            o,
            "kills (seconds into the load; leader/roster times from the restart) [target: leader and full roster within {TARGET_MAX_LEADER_AFTER_RESTART} s of every restart: {}]:",
            met(self.restarts.iter().all(|r| r
                .roster_after
                .is_some_and(|s| s <= TARGET_MAX_LEADER_AFTER_RESTART)))
        );
        let secs = |v: Option<f64>| v.map_or("never".to_string(), |s| format!("{s:.1} s"));
        for r in self.restarts {
            let _ = writeln!(
                o,
                "    kill n{} at {:.1} s ({}){}{}; restarted at {:.1} s as pid {} joining via n{}: leader after {}, full roster after {} (watched {:.1} s){}",
                r.victim,
                r.killed_at,
                match r.was_leader {
                    Some(true) => "leader",
                    Some(false) => "follower",
                    None => "did not answer",
                },
                r.already_dead
                    .as_ref()
                    .map(|s| format!(", had already ended: {s}"))
                    .unwrap_or_default(),
                if r.was_leader == Some(true) {
                    format!(", survivors named a new leader after {}", secs(r.new_leader_after_kill))
                } else {
                    String::new()
                },
                r.restarted_at,
                r.pid,
                r.join_via,
                secs(r.leader_after),
                secs(r.roster_after),
                r.watched,
                r.exited
                    .as_ref()
                    .map(|(t, s)| format!("; THE RESTARTED PROCESS ENDED after {t:.1} s: {s}"))
                    .unwrap_or_default()
            );
            if let Some(v) = &r.last_views {
                let _ = writeln!(o, "        views then: {v}");
            }
        }
        let _ = writeln!(
            o,
            "after the last restart, settled (every broker and the gateway: one leader, 3 live members): {}",
            secs(self.final_settle)
        );
        if self.exits.is_empty() {
            let _ = writeln!(o, "no process ended on its own");
        }
        for x in self.exits {
            let _ = writeln!(
                o,
                "PROCESS ENDED ON ITS OWN: {} pid {} noticed at {:.1} s: {}",
                x.what, x.pid, x.at, x.status
            );
        }
        let _ = writeln!(o, "===============================");
        o
    }
}

// ---------------------------------------------------------------------
// Diagnostics of duplicates (issue 14): why each task was delivered more
// than once. For every such task, its enqueue, its webhooks (arrival,
// headers) and, from the brokers' logs (run with
// `MIYAMOTO_TEST_LOG=info,broker::store=debug`), which broker process
// dispatched it when, placed among the kills and restarts, and a guess
// at the cause. A short table goes into the summary, the detail into
// `target/tmp/logs/chaos-duplicates-<pid>.txt`.
// ---------------------------------------------------------------------

/// At most this many lines of duplicates in the summary.
const DUP_TABLE_LINES: usize = 30;

/// One webhook as the receiver saw it.
struct Arrival {
    /// Seconds into the load.
    at: f64,
    id: String,
    retry: String,
    executions: String,
    eta: String,
}

impl Arrival {
    fn of(seen: &Seen, start_unix: f64) -> Arrival {
        Arrival {
            at: seen.at - start_unix,
            id: seen.header("x-task-id").to_string(),
            retry: seen.header("x-task-retry-count").to_string(),
            executions: seen.header("x-task-execution-count").to_string(),
            eta: seen.header("x-task-eta").to_string(),
        }
    }
}

/// One broker process (an incarnation of a node) and its log.
struct Incarnation {
    /// `n1#0`: n1 as first started; `n1#1`: after its first restart.
    label: String,
    id: Option<u64>,
    /// Seconds into the load of its log's first line.
    started: f64,
    /// Seconds into the load when the test killed it.
    killed: Option<f64>,
}

/// A broker's debug line about one task.
#[derive(Clone)]
struct TaskLine {
    at: f64,
    /// Index into the incarnations.
    inc: usize,
    what: TaskWhat,
}

#[derive(Clone)]
enum TaskWhat {
    Dispatch {
        replica: u32,
        holders: Vec<u64>,
        attempt: u32,
    },
    Decided {
        holders: Vec<u64>,
        answers: String,
        local: bool,
        body: String,
    },
    Handoff {
        silent: u64,
        next: u64,
    },
}

/// A broker's line about the cluster (roster, leader, workers).
struct ClusterLine {
    at: f64,
    inc: usize,
    text: String,
}

struct Logs {
    incs: Vec<Incarnation>,
    by_task: HashMap<String, Vec<TaskLine>>,
    cluster: Vec<ClusterLine>,
    files: usize,
}

/// Unix seconds of a log line's RFC 3339 UTC timestamp
/// (`2026-12-05T16:51:57.017599Z`).
fn parse_log_time(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=` in a log line: up to the next space, or a whole
/// bracketed `[..]` / braced `{..}` value.
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=");
    let at = line.find(&pat)? + pat.len();
    let rest = &line[at..];
    let close = match rest.chars().next()? {
        '[' => Some(']'),
        '{' => Some('}'),
        _ => None,
    };
    let end = match close {
        Some(c) => {
            let open = rest.chars().next()?;
            let mut depth = 0i32;
            let mut end = rest.len();
            for (i, ch) in rest.char_indices() {
                if ch == open {
                    depth += 1;
                } else if ch == c {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
            }
            end
        }
        None => rest.find(' ').unwrap_or(rest.len()),
    };
    Some(&rest[..end])
}

fn parse_ids(list: &str) -> Vec<u64> {
    list.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

impl Logs {
    /// Reads this test's broker logs, `broker-<pid>-<n>.log`, in spawn order.
    fn read(bases: &[u16], restarts: &[Restart], start_unix: f64) -> Logs {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("logs");
        let prefix = format!("broker-{}-", std::process::id());
        let mut files: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let n = name
                            .strip_prefix(&prefix)?
                            .strip_suffix(".log")?
                            .parse()
                            .ok()?;
                        Some((n, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let mut logs = Logs {
            incs: Vec::new(),
            by_task: HashMap::new(),
            cluster: Vec::new(),
            files: files.len(),
        };
        let mut per_node = vec![0usize; bases.len()];
        for (_, path) in files {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut lines = text.lines().map(strip_ansi);
            let Some(first) = lines.next() else { continue };
            // `broker listening client_endpoint=tcp://127.0.0.1:PORT ... node=ID`
            let port = log_field(&first, "client_endpoint")
                .and_then(|e| e.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            let Some(node) = port.and_then(|p| bases.iter().position(|b| *b == p)) else {
                continue;
            };
            let k = per_node[node];
            per_node[node] += 1;
            let killed = restarts
                .iter()
                .filter(|r| r.victim == node)
                .nth(k)
                .map(|r| r.killed_at);
            let inc = logs.incs.len();
            logs.incs.push(Incarnation {
                label: format!("n{node}#{k}"),
                id: log_field(&first, "node").and_then(|v| v.parse().ok()),
                started: first
                    .split(' ')
                    .next()
                    .and_then(parse_log_time)
                    .map_or(f64::NAN, |t| t - start_unix),
                killed,
            });
            for line in lines {
                let Some(at) = line
                    .split(' ')
                    .next()
                    .and_then(parse_log_time)
                    .map(|t| t - start_unix)
                else {
                    continue;
                };
                let task = log_field(&line, "task").map(str::to_string);
                let what = if line.contains(" dispatching ") {
                    Some(TaskWhat::Dispatch {
                        replica: log_field(&line, "replica")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(u32::MAX),
                        holders: log_field(&line, "holders")
                            .map(parse_ids)
                            .unwrap_or_default(),
                        attempt: log_field(&line, "attempt")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                    })
                } else if line.contains(" enqueue decided ") {
                    Some(TaskWhat::Decided {
                        holders: log_field(&line, "holders")
                            .map(parse_ids)
                            .unwrap_or_default(),
                        answers: log_field(&line, "answers").unwrap_or("").to_string(),
                        local: log_field(&line, "local") == Some("true"),
                        body: log_field(&line, "body")
                            .unwrap_or("")
                            .split([' ', '{'])
                            .next()
                            .unwrap_or("")
                            .to_string(),
                    })
                } else if line.contains(" holder silent") {
                    Some(TaskWhat::Handoff {
                        silent: log_field(&line, "silent")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                        next: log_field(&line, "next")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                    })
                } else {
                    None
                };
                match (task, what) {
                    (Some(task), Some(what)) => {
                        logs.by_task
                            .entry(task)
                            .or_default()
                            .push(TaskLine { at, inc, what });
                    }
                    _ => {
                        const CLUSTER: [&str; 8] = [
                            "roster changed",
                            "member added",
                            "member removed",
                            "leader changed",
                            "worker gone",
                            "worker ready",
                            "members not heard from lately",
                            // broker::node=debug: a message to a peer
                            // with no connection (a `store` among them).
                            "peer message dropped",
                        ];
                        if let Some(c) = CLUSTER.iter().find(|c| line.contains(*c)) {
                            let rest = line.split(c).nth(1).unwrap_or("").trim();
                            logs.cluster.push(ClusterLine {
                                at,
                                inc,
                                text: format!("{c} {rest}"),
                            });
                        }
                    }
                }
            }
        }
        for v in logs.by_task.values_mut() {
            v.sort_by(|a, b| a.at.total_cmp(&b.at));
        }
        logs.cluster.sort_by(|a, b| a.at.total_cmp(&b.at));
        logs
    }

    /// A node id as `n1#0`, or the id itself when unknown.
    fn name(&self, id: u64) -> String {
        self.incs
            .iter()
            .find(|i| i.id == Some(id))
            .map_or_else(|| format!("?{id}"), |i| i.label.clone())
    }

    fn names(&self, ids: &[u64]) -> String {
        format!(
            "[{}]",
            ids.iter()
                .map(|i| self.name(*i))
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    fn dispatches<'a>(&'a self, id: &str) -> Vec<&'a TaskLine> {
        self.by_task
            .get(id)
            .map(|v| {
                v.iter()
                    .filter(|l| matches!(l.what, TaskWhat::Dispatch { .. }))
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Diagnosis<'a> {
    report: &'a Report<'a>,
    bases: &'a [u16],
    arrivals: &'a HashMap<String, Vec<Arrival>>,
    tail: &'a [(String, Arrival)],
    start_unix: f64,
}

impl Diagnosis<'_> {
    /// `K n1+0.30` (0.30 s after n1's kill) or `R n2-1.20`: the kill or
    /// restart nearest to `t`.
    fn near(&self, t: f64) -> String {
        let mut best: Option<(f64, String)> = None;
        for r in self.report.restarts {
            for (at, what) in [(r.killed_at, "K"), (r.restarted_at, "R")] {
                let d = t - at;
                if best.as_ref().is_none_or(|(b, _)| d.abs() < b.abs()) {
                    best = Some((d, format!("{what}n{}", r.victim)));
                }
            }
        }
        match best {
            Some((d, w)) => format!("{w}{d:+.2}"),
            None => String::new(),
        }
    }

    /// A guess at why dispatch `second` happened although `first` (an
    /// earlier dispatch of the same task) was made.
    fn guess(&self, logs: &Logs, task: &str, first: &TaskLine, second: &TaskLine) -> String {
        let (
            TaskWhat::Dispatch {
                holders: h1,
                replica: r1,
                ..
            },
            TaskWhat::Dispatch {
                holders: h2,
                replica: r2,
                attempt: a2,
            },
        ) = (&first.what, &second.what)
        else {
            return "?".into();
        };
        let f = &logs.incs[first.inc];
        let s = &logs.incs[second.inc];
        let gap = second.at - first.at;
        if first.inc == second.inc {
            return format!("same-process: {} dispatched again (attempt {a2})", s.label);
        }
        let killed_after = f.killed.map(|k| k - first.at).filter(|d| *d >= -0.05);
        let listed = s.id.is_some_and(|id| h1.contains(&id));
        // The second dispatcher got its copy by a handoff (§16.8 step 5)
        // made after the first dispatch: it missed `claimed` and `finished`.
        let handoff = logs
            .by_task
            .get(task)
            .into_iter()
            .flatten()
            .find_map(|l| match l.what {
                TaskWhat::Handoff { silent, next } if Some(next) == s.id => Some((l.at, silent)),
                _ => None,
            });
        if let Some((h, silent)) = handoff.filter(|(h, _)| *h > first.at && !listed && gap < 15.0) {
            // Why the holder was silent: dead (killed, not yet suspected),
            // or just admitted (it answers before it knows the roster).
            let si = logs.incs.iter().find(|i| i.id == Some(silent));
            let why = match si {
                Some(i) if i.killed.is_some_and(|k| k <= h) => format!(
                    "e1-handoff-from-dead-holder: {} killed {:.2} s before the handoff",
                    i.label,
                    h - i.killed.unwrap_or(h)
                ),
                Some(i) if h - i.started < 5.0 => format!(
                    "e2-handoff-from-new-member: {} started {:.2} s before the handoff",
                    i.label,
                    h - i.started
                ),
                _ => format!("e3-handoff: silent holder {}", logs.name(silent)),
            };
            return format!(
                "{why}; {} got its copy by the handoff {:.2} s after {} dispatched (claimed/finished came before it held the task) and fired as replica {r2} {gap:.2} s after the first",
                s.label,
                h - first.at,
                f.label
            );
        }
        let origin = if listed {
            String::new()
        } else {
            format!(
                "; {} not among the first's holders {} (a handoff or re-replication copy)",
                s.label,
                logs.names(h1)
            )
        };
        if gap >= 15.0 {
            return format!(
                "b-claim-deadline: {} fired {gap:.1} s later, past the claim's deadline{}{origin}",
                s.label,
                killed_after
                    .map(|k| format!("; {} killed {k:.2} s after its dispatch", f.label))
                    .unwrap_or_default()
            );
        }
        if let Some(k) = killed_after.filter(|k| *k < 1.0) {
            return format!(
                "a-killed-after-dispatch: {} killed {:.0} ms after dispatching; {} (replica {r2}) fired {gap:.2} s later{origin}",
                f.label,
                k * 1e3,
                s.label
            );
        }
        let s_age = first.at - s.started;
        let f_age = first.at - f.started;
        if s_age < 5.0 {
            return format!(
                "c-new-subscriber: {} started {s_age:.1} s before the first dispatch (by {}, {f_age:.1} s old): the claim did not reach it{origin}",
                s.label, f.label
            );
        }
        if f_age < 5.0 {
            return format!(
                "c-new-publisher: the first dispatcher {} had started {f_age:.1} s before; {} not yet subscribed to it{origin}",
                f.label, s.label
            );
        }
        if h1 != h2 || r1 == r2 {
            return format!(
                "g-holders-differ: {} saw holders {} replica {r1}, {} saw {} replica {r2}; gap {gap:.2} s{origin}",
                f.label,
                logs.names(h1),
                s.label,
                logs.names(h2)
            );
        }
        format!(
            "g-claim-lost: both alive and old; {} fired {gap:.2} s after {}{origin}",
            s.label, f.label
        )
    }

    /// A guess at why one enqueue became a second task, from that task's
    /// dispatches.
    fn stored_twice(&self, logs: &Logs, x: Option<&Enqueue>, other: &[&TaskLine]) -> String {
        let Some(d) = other.first() else {
            return "g-stored-twice: the second task's dispatch is not in the logs".into();
        };
        let TaskWhat::Dispatch {
            holders, replica, ..
        } = &d.what
        else {
            return "g-stored-twice".into();
        };
        let inc = &logs.incs[d.inc];
        let sent = x.map_or(f64::NAN, |x| x.sent);
        let outcome = match x.map(|x| &x.outcome) {
            Some(Outcome::Acked { .. }) => "acknowledged",
            Some(Outcome::Unknown(k)) | Some(Outcome::Refused(k)) => k.as_str(),
            None => "?",
        };
        if holders.is_empty() {
            return format!(
                "g2-request-queued-for-dead-node: {} (started {:.2} s after the enqueue was sent, {outcome}) stored a second task alone (holders [], replica {replica}): a resend queued in the client's socket for the killed node reached its new incarnation before it refused requests as a joining node",
                inc.label,
                inc.started - sent
            );
        }
        if inc.started > sent && inc.id.is_some_and(|me| !holders.contains(&me)) {
            return format!(
                "g1-store-queued-for-dead-node: {} (started {:.2} s after the enqueue was sent) fired a copy of a second task as a non-holder (replica {replica}, holders {}): a `store` queued in a peer's socket for the killed node reached its new incarnation, and no `discard` followed",
                inc.label,
                inc.started - sent,
                logs.names(holders)
            );
        }
        format!(
            "g-stored-twice: second task dispatched by {} replica {replica} holders {}",
            inc.label,
            logs.names(holders)
        )
    }

    /// The table for the summary, and the detail for the file.
    fn explain(&self) -> (String, String) {
        let mut table = String::new();
        let mut detail = String::new();
        let logs = Logs::read(self.bases, self.report.restarts, self.start_unix);
        let by_tag: HashMap<&str, &Enqueue> = self
            .report
            .enqueues
            .iter()
            .map(|x| (x.tag.as_str(), x))
            .collect();
        let mut dups: Vec<(&String, &Vec<Arrival>)> =
            self.arrivals.iter().filter(|(_, a)| a.len() > 1).collect();
        dups.sort_by(|a, b| a.1[0].at.total_cmp(&b.1[0].at));
        let have_logs = logs.by_task.values().any(|v| {
            v.iter()
                .any(|l| matches!(l.what, TaskWhat::Dispatch { .. }))
        });

        // Tasks dispatched by two or more processes, delivered once or more.
        let multi: Vec<&String> = logs
            .by_task
            .iter()
            .filter(|(_, v)| {
                v.iter()
                    .filter(|l| matches!(l.what, TaskWhat::Dispatch { .. }))
                    .count()
                    > 1
            })
            .map(|(id, _)| id)
            .collect();
        let dup_ids: HashSet<&str> = dups
            .iter()
            .flat_map(|(_, a)| a.iter().map(|x| x.id.as_str()))
            .collect();
        let _ = writeln!(
            table,
            "-------- duplicates explained ({} tasks; broker logs: {} files, {}) --------",
            dups.len(),
            logs.files,
            if have_logs {
                "with dispatch lines"
            } else {
                "NO dispatch lines: run with MIYAMOTO_TEST_LOG=info,broker::store=debug"
            }
        );
        let _ = writeln!(
            table,
            "tasks dispatched 2+ times in the logs: {} (of them delivered 2+ times: {}); webhooks after the usual window (CHAOS_TAIL={}): {}",
            multi.len(),
            multi.iter().filter(|id| dup_ids.contains(id.as_str())).count(),
            self.report.cfg.tail,
            self.tail.len()
        );
        let _ = writeln!(
            table,
            "incarnations: {}",
            logs.incs
                .iter()
                .map(|i| format!(
                    "{} {:.1}..{}",
                    i.label,
                    i.started,
                    i.killed.map_or("end".into(), |k| format!("{k:.1}"))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            table,
            "tag: sent cd→eta via/broker replicas | arrivals (s into load, K/R = nearest kill/restart) | dispatches (process@s r=replica a=attempt) | guess"
        );

        let mut causes: BTreeMap<String, usize> = BTreeMap::new();
        for (n, (tag, arr)) in dups.iter().enumerate() {
            let x = by_tag.get(tag.as_str());
            let id = arr[0].id.as_str();
            let own = logs.dispatches(id);
            let mut disp = own.clone();
            let mut guesses = Vec::new();
            for k in 1..own.len() {
                guesses.push(self.guess(&logs, id, own[0], own[k]));
            }
            // Other ids: the request stored twice.
            let mut others: Vec<&str> = Vec::new();
            for a in arr.iter() {
                if a.id != id && !others.contains(&a.id.as_str()) {
                    others.push(&a.id);
                }
            }
            for other in others {
                let od = logs.dispatches(other);
                disp.extend(od.iter().copied());
                guesses.push(self.stored_twice(&logs, x.copied(), &od));
            }
            disp.sort_by(|a, b| a.at.total_cmp(&b.at));
            if have_logs && disp.len() < arr.len() && arr.iter().all(|a| a.id == id) {
                guesses.push(format!(
                    "f-fewer-dispatches: {} dispatches logged for {} webhooks",
                    disp.len(),
                    arr.len()
                ));
            }
            for g in &guesses {
                let key = g.split(':').next().unwrap_or(g).to_string();
                *causes.entry(key).or_default() += 1;
            }
            let enq = match x {
                Some(x) => format!(
                    "{:.2} cd{:.1}→{:.2} {:?}{} r{}",
                    x.sent,
                    x.countdown,
                    x.sent + x.countdown,
                    x.via,
                    x.broker.map(|b| format!("/n{b}")).unwrap_or_default(),
                    match &x.outcome {
                        Outcome::Acked { replicas, .. } => replicas.to_string(),
                        _ => "?".into(),
                    }
                ),
                None => "?".into(),
            };
            let arrs = arr
                .iter()
                .map(|a| format!("{:.2}({})", a.at, self.near(a.at)))
                .collect::<Vec<_>>()
                .join(" ");
            let ds = disp
                .iter()
                .map(|d| match &d.what {
                    TaskWhat::Dispatch {
                        replica, attempt, ..
                    } => format!(
                        "{}@{:.2} r{replica} a{attempt}",
                        logs.incs[d.inc].label, d.at
                    ),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
                .join(" ");
            if n < DUP_TABLE_LINES {
                let _ = writeln!(
                    table,
                    "  {tag}: {enq} | {arrs} | {ds} | {}",
                    guesses
                        .first()
                        .map(|g| g.chars().take(110).collect::<String>())
                        .unwrap_or_else(|| "no dispatch lines".into())
                );
            }

            // The detail.
            let _ = writeln!(detail, "=== {tag} task {id}");
            if let Some(x) = x {
                let _ = writeln!(
                    detail,
                    "  enqueue: {:?}{} sent {:.3} s, countdown {:.1} s, latency {:.3} s, {}",
                    x.via,
                    x.broker.map(|b| format!(" to n{b}")).unwrap_or_default(),
                    x.sent,
                    x.countdown,
                    x.latency,
                    match &x.outcome {
                        Outcome::Acked { id, replicas } =>
                            format!("acked id {id} replicas {replicas}"),
                        Outcome::Unknown(k) => format!("unknown: {k}"),
                        Outcome::Refused(k) => format!("refused: {k}"),
                    }
                );
            }
            for a in arr.iter() {
                let _ = writeln!(
                    detail,
                    "  webhook at {:.3} ({}): id {} retry-count {} execution-count {} eta {} (= {:.3} into the load)",
                    a.at,
                    self.near(a.at),
                    a.id,
                    a.retry,
                    a.executions,
                    a.eta,
                    a.eta.parse::<f64>().map_or(f64::NAN, |e| e - self.start_unix)
                );
            }
            let mut ids = vec![id];
            for a in arr.iter() {
                if !ids.contains(&a.id.as_str()) {
                    ids.push(&a.id);
                }
            }
            // The cluster lines near each of the task's events.
            let mut times: Vec<f64> = Vec::new();
            for tid in ids {
                for l in logs.by_task.get(tid).into_iter().flatten() {
                    times.push(l.at);
                    let inc = &logs.incs[l.inc];
                    let what = match &l.what {
                        TaskWhat::Dispatch {
                            replica,
                            holders,
                            attempt,
                        } => format!(
                            "dispatching replica={replica} holders={} attempt={attempt}",
                            logs.names(holders)
                        ),
                        TaskWhat::Decided {
                            holders,
                            answers,
                            local,
                            body,
                        } => {
                            let mut answers = answers.clone();
                            for i in &logs.incs {
                                if let Some(id) = i.id {
                                    answers = answers.replace(&id.to_string(), &i.label);
                                }
                            }
                            format!(
                                "enqueue decided holders={} answers={answers} local={local} body={body}",
                                logs.names(holders)
                            )
                        }
                        TaskWhat::Handoff { silent, next } => format!(
                            "holder silent: {} handed to {}",
                            logs.name(*silent),
                            logs.name(*next)
                        ),
                    };
                    let _ = writeln!(
                        detail,
                        "  {:.3} ({}) {} [{}]: {what}",
                        l.at,
                        self.near(l.at),
                        inc.label,
                        if tid == id { "" } else { tid }
                    );
                }
            }
            times.extend(arr.iter().map(|a| a.at));
            for c in logs
                .cluster
                .iter()
                .filter(|c| times.iter().any(|t| c.at >= t - 3.0 && c.at <= t + 0.5))
                .filter(|c| !c.text.starts_with("worker ready"))
            {
                let _ = writeln!(
                    detail,
                    "    cluster {:.3} {}: {}",
                    c.at, logs.incs[c.inc].label, c.text
                );
            }
            for g in &guesses {
                let _ = writeln!(detail, "  guess: {g}");
            }
        }
        if dups.len() > DUP_TABLE_LINES {
            let _ = writeln!(
                table,
                "  ... {} more in the file",
                dups.len() - DUP_TABLE_LINES
            );
        }
        let _ = writeln!(
            table,
            "guessed causes (one per extra dispatch): {}",
            causes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );

        // Tasks dispatched 2+ times but delivered once: what the window saw.
        let _ = writeln!(
            detail,
            "\n=== tasks dispatched by 2+ processes, delivered at most once"
        );
        for id in &multi {
            if dup_ids.contains(id.as_str()) {
                continue;
            }
            let ds = logs.dispatches(id);
            let _ = writeln!(
                detail,
                "  {id}: {} | {}",
                ds.iter()
                    .map(|d| format!(
                        "{}@{:.2}({})",
                        logs.incs[d.inc].label,
                        d.at,
                        self.near(d.at)
                    ))
                    .collect::<Vec<_>>()
                    .join(" "),
                self.guess(&logs, id, ds[0], ds[1])
            );
        }
        let _ = writeln!(detail, "\n=== webhooks after the usual window (CHAOS_TAIL)");
        for (tag, a) in self.tail {
            let _ = writeln!(
                detail,
                "  {tag} at {:.3} id {} retry {} exec {}; dispatches: {}",
                a.at,
                a.id,
                a.retry,
                a.executions,
                logs.dispatches(&a.id)
                    .iter()
                    .map(|d| format!("{}@{:.2}", logs.incs[d.inc].label, d.at))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        (table, detail)
    }
}
