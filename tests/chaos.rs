//! Chaos on real processes (issue 14): three brokers and a gateway under a
//! steady load, half over HTTP through the gateway and half over ZeroMQ
//! straight to the brokers, while a random broker is killed with `kill -9`
//! every 8 s and restarted 3 s later on the same ports under the same
//! `--node-id` (a new member: a fresh id, no data).
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
// TODO(issue 14): turn these into assertions at the end of `chaos`.
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
    let mut untagged = 0usize;
    let mut record = |seen: Seen, missing: &mut HashSet<&str>| {
        let body = String::from_utf8_lossy(&seen.body).into_owned();
        let tag = body
            .split('&')
            .find_map(|kv| kv.strip_prefix("c="))
            .map(str::to_string);
        match tag {
            Some(tag) => {
                missing.remove(tag.as_str());
                delivered
                    .entry(tag)
                    .or_default()
                    .push(seen.header("x-task-id").to_string());
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
    let summary = report.summary();
    println!("{summary}");
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
    // TODO(issue 14): assert TARGET_MAX_DUPLICATE_PCT,
    // TARGET_MAX_LEADER_AFTER_RESTART and TARGET_MAX_LATENCY_OUTSIDE_KILLS
    // here (the summary already says whether each one is met).
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
