//! Pulling workers and the tasks waiting for them: registry, credit,
//! round-robin assignment, heartbeats and deadlines.
//!
//! Sans-IO and owned by the I/O thread: it is told what arrived and what
//! time it is, and answers with [`Out`] actions that the loop carries out.
//! It never changes task state itself; lost or timed-out deliveries become
//! [`Command::Lost`] for the scheduler.
//!
//! A worker that registered with `batch` gets its deliveries in `tasks`
//! messages: what is assigned to it waits in its outbox until
//! [`Dispatcher::flush`], which the loop calls before carrying out the
//! actions of a whole pass, so the tasks freed by a pass's results travel
//! together.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{
    BrokerMessage, DeliveredTask, DeliveryResult, Dispatched, ErrorCode, WorkerMessage,
};

use crate::fair::{host_of, FairLines, Flow};
use crate::store::Command;

/// Heartbeat and liveness settings of the worker dialogue.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Send a heartbeat after this long without sending anything else.
    pub heartbeat_interval: Duration,
    /// Forget a worker silent for this long.
    pub worker_expiry: Duration,
    /// Extra time past a task's timeout before a missing result counts as
    /// a failed attempt.
    pub result_grace: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            heartbeat_interval: Duration::from_secs(1),
            worker_expiry: Duration::from_secs(5),
            result_grace: Duration::from_secs(10),
        }
    }
}

/// An action for the I/O loop.
#[derive(Debug)]
pub enum Out {
    /// Send to the worker with this identity. For a `Task` or `Tasks`,
    /// report a failed send with [`Dispatcher::unsent`].
    Send(Vec<u8>, BrokerMessage),
    Schedule(Command),
}

struct Waiting {
    delivery: u64,
    timeout: f64,
    task: DeliveredTask,
}

struct InFlight {
    task_id: String,
    pool: Arc<str>,
    /// Its queue and host, as the pool's fair lines count it.
    flow: Flow,
    deadline: Instant,
    timeout: f64,
}

struct Worker {
    name: String,
    pools: Vec<String>,
    /// Deliveries allowed out at once.
    window: u32,
    /// By delivery id (ordered, like the maps below, so that what a tick
    /// does comes out in the same order every run).
    in_flight: BTreeMap<u64, InFlight>,
    last_heard: Instant,
    last_sent: Instant,
    /// Takes `tasks` messages.
    batch: bool,
    /// Assigned (and counted in flight), not yet handed to the loop.
    outbox: Vec<Dispatched>,
}

struct Pool {
    name: Arc<str>,
    /// Tasks waiting for a worker, and deliveries out, by queue and host
    /// (see [`crate::fair`]).
    lines: FairLines<Waiting>,
    /// Identities of the workers serving the pool, for round robin.
    members: Vec<Vec<u8>>,
    next: usize,
}

impl Pool {
    fn new(name: &str) -> Pool {
        Pool {
            name: name.into(),
            lines: FairLines::default(),
            members: Vec::new(),
            next: 0,
        }
    }

    /// Nothing waits, nothing is out, no worker serves it: forgotten.
    fn is_unused(&self) -> bool {
        self.lines.is_idle() && self.members.is_empty()
    }
}

impl Waiting {
    fn push_to(self, lines: &mut FairLines<Waiting>, front: bool) {
        lines.push_keyed(self, front, |w| (&w.task.queue, host_of(&w.task.url)));
    }
}

/// Counters for operators and tests.
#[derive(Debug, Default, Clone)]
pub struct DispatchStats {
    pub workers_registered: u64,
    pub workers_expired: u64,
    pub deliveries_sent: u64,
    pub unknown_results: u64,
    pub malformed: u64,
}

/// See the module docs.
pub struct Dispatcher {
    config: DispatchConfig,
    /// By identity; a `BTreeMap`, as identities are the peers' choice.
    workers: BTreeMap<Vec<u8>, Worker>,
    pools: BTreeMap<String, Pool>,
    /// Workers whose outbox is not empty.
    filled: Vec<Vec<u8>>,
    pub stats: DispatchStats,
}

impl Dispatcher {
    pub fn new(config: DispatchConfig) -> Self {
        Dispatcher {
            config,
            workers: BTreeMap::new(),
            pools: BTreeMap::new(),
            filled: Vec::new(),
            stats: DispatchStats::default(),
        }
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Workers and their free credit, by pool, in name order (at most
    /// `limit` pools: the `stats` answer's bound).
    pub fn pool_figures(&self, limit: usize) -> Vec<protocol::PoolFigures> {
        self.pools
            .values()
            .take(limit)
            .map(|p| {
                let credit = p
                    .members
                    .iter()
                    .filter_map(|id| self.workers.get(id))
                    .map(|w| u64::from(w.window).saturating_sub(w.in_flight.len() as u64))
                    .sum();
                protocol::PoolFigures {
                    pool: p.name.to_string(),
                    workers: p.members.len() as u64,
                    credit,
                }
            })
            .collect()
    }

    /// Tasks waiting for a worker with credit, over all pools.
    pub fn waiting(&self) -> usize {
        self.pools.values().map(|p| p.lines.waiting()).sum()
    }

    /// A message from a worker, or `Err` with why it could not be decoded.
    pub fn on_message(
        &mut self,
        identity: &[u8],
        msg: Result<WorkerMessage, protocol::Error>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                if let Some(w) = self.workers.get_mut(identity) {
                    w.last_heard = now;
                }
                out.push(Out::Send(
                    identity.to_vec(),
                    BrokerMessage::Error {
                        code: e.code(),
                        reason: e.to_string(),
                    },
                ));
                return;
            }
        };
        if let WorkerMessage::Ready {
            pools,
            credit,
            name,
            batch,
        } = msg
        {
            let ready = Ready {
                pools,
                credit,
                name,
                batch,
            };
            self.register(identity, ready, now, out);
            return;
        }
        let Some(w) = self.workers.get_mut(identity) else {
            if !matches!(msg, WorkerMessage::Disconnect) {
                out.push(Out::Send(
                    identity.to_vec(),
                    BrokerMessage::Disconnect {
                        reason: "unknown worker: send ready".into(),
                    },
                ));
            }
            return;
        };
        w.last_heard = now;
        match msg {
            WorkerMessage::Ready { .. } | WorkerMessage::Heartbeat => {}
            WorkerMessage::Credit { credit } => {
                w.window = w.window.saturating_add(credit);
                let pools = w.pools.clone();
                self.assign_pools(&pools, now, out);
            }
            WorkerMessage::Result(r) => match self.settle(identity, r, out) {
                Settled::Freed(pool) => self.assign(&pool, now, out),
                Settled::WrongTask(reason) => out.push(wrong_task(identity, reason)),
                Settled::Unknown => {}
            },
            WorkerMessage::Results { results } => self.settle_all(identity, results, now, out),
            WorkerMessage::Disconnect => self.remove(identity, "worker disconnected", now, out),
        }
    }

    /// A result from a registered worker, settling its delivery when it
    /// names it rightly.
    /// A `results` message: each entry settled as a `result` would be,
    /// one error for the whole message however many entries name the
    /// wrong task, and the freed pools offered their waiting tasks once.
    fn settle_all(
        &mut self,
        identity: &[u8],
        results: Vec<DeliveryResult>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let mut freed: Vec<Arc<str>> = Vec::new();
        let (mut wrong, mut first) = (0, String::new());
        for r in results {
            match self.settle(identity, r, out) {
                Settled::Freed(pool) => {
                    if !freed.contains(&pool) {
                        freed.push(pool);
                    }
                }
                Settled::WrongTask(reason) => {
                    wrong += 1;
                    if first.is_empty() {
                        first = reason;
                    }
                }
                Settled::Unknown => {}
            }
        }
        if wrong == 1 {
            out.push(wrong_task(identity, first));
        } else if wrong > 1 {
            let reason = format!("{wrong} results name the wrong task; the first: {first}");
            out.push(wrong_task(identity, reason));
        }
        for pool in freed {
            self.assign(&pool, now, out);
        }
    }

    fn settle(&mut self, identity: &[u8], r: DeliveryResult, out: &mut Vec<Out>) -> Settled {
        let Some(w) = self.workers.get_mut(identity) else {
            return Settled::Unknown;
        };
        match w.in_flight.remove(&r.delivery) {
            Some(f) if f.task_id == r.task_id => {
                out.push(Out::Schedule(Command::Result(r)));
                release(&mut self.pools, &f);
                Settled::Freed(f.pool)
            }
            Some(f) => {
                // Wrong task id for the delivery: keep the delivery.
                w.in_flight.insert(r.delivery, f);
                self.stats.unknown_results += 1;
                Settled::WrongTask(format!("delivery {} is not task {}", r.delivery, r.task_id))
            }
            None => {
                self.stats.unknown_results += 1;
                Settled::Unknown
            }
        }
    }

    /// A worker's `ready`: a new registration, or a renewed one (its
    /// pools, credit and batching replaced; what was in flight stays).
    fn register(&mut self, identity: &[u8], ready: Ready, now: Instant, out: &mut Vec<Out>) {
        let Ready {
            pools,
            credit,
            name,
            batch,
        } = ready;
        if let Some((code, reason)) = self.refuse_pools(&pools) {
            out.push(Out::Send(
                identity.to_vec(),
                BrokerMessage::Error { code, reason },
            ));
            return;
        }
        let name = name.unwrap_or_else(|| hex(identity));
        let (in_flight, outbox) = match self.workers.remove(identity) {
            Some(old) => {
                self.leave_pools(identity, &old.pools);
                (old.in_flight, old.outbox)
            }
            None => {
                self.stats.workers_registered += 1;
                (BTreeMap::new(), Vec::new())
            }
        };
        // Assigned before the new `ready` but not sent yet: it goes out in
        // whichever form the worker now asked for.
        let outbox = if batch {
            outbox
        } else {
            for d in outbox {
                out.push(Out::Send(
                    identity.to_vec(),
                    BrokerMessage::Task {
                        delivery: d.delivery,
                        task: d.task,
                    },
                ));
            }
            Vec::new()
        };
        tracing::info!(worker = %name, ?pools, credit, batch, "worker ready");
        for p in &pools {
            self.pools
                .entry(p.clone())
                .or_insert_with(|| Pool::new(p))
                .members
                .push(identity.to_vec());
        }
        self.workers.insert(
            identity.to_vec(),
            Worker {
                name,
                pools: pools.clone(),
                window: credit,
                in_flight,
                last_heard: now,
                last_sent: now,
                batch,
                outbox,
            },
        );
        self.assign_pools(&pools, now, out);
    }

    /// Why a `ready` naming `pools` is refused: more than
    /// [`protocol::limits::MAX_POOLS_PER_WORKER`], or new pools past
    /// [`protocol::limits::MAX_POOLS`].
    fn refuse_pools(&self, pools: &[String]) -> Option<(ErrorCode, String)> {
        use protocol::limits::{MAX_POOLS, MAX_POOLS_PER_WORKER};
        if pools.len() > MAX_POOLS_PER_WORKER {
            let reason = format!("a worker serves at most {MAX_POOLS_PER_WORKER} pools");
            return Some((ErrorCode::BadRequest, reason));
        }
        let new = pools
            .iter()
            .filter(|p| !self.pools.contains_key(*p))
            .count();
        if new > 0 && self.pools.len() + new > MAX_POOLS {
            let reason = format!(
                "this broker knows {} pools, the most it may ({MAX_POOLS}); retry later",
                self.pools.len()
            );
            return Some((ErrorCode::Busy, reason));
        }
        None
    }

    /// Pools known (served, or with tasks waiting or out).
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    fn leave_pools(&mut self, identity: &[u8], pools: &[String]) {
        for p in pools {
            if let Some(pool) = self.pools.get_mut(p) {
                pool.members.retain(|m| m != identity);
                if pool.is_unused() {
                    self.pools.remove(p);
                }
            }
        }
    }

    /// Forgets a worker; its deliveries become failed attempts.
    fn remove(&mut self, identity: &[u8], reason: &str, now: Instant, out: &mut Vec<Out>) {
        let Some(mut w) = self.workers.remove(identity) else {
            return;
        };
        tracing::warn!(worker = %w.name, in_flight = w.in_flight.len(), reason, "worker gone");
        self.leave_pools(identity, &w.pools);
        // What never left the outbox goes to another worker.
        let back = take_in_flight(&mut w.in_flight, std::mem::take(&mut w.outbox));
        self.give_back(back, now, out);
        for (delivery, f) in w.in_flight {
            release(&mut self.pools, &f);
            out.push(Out::Schedule(Command::Lost {
                delivery,
                task_id: f.task_id,
                reason: format!("worker lost ({reason})"),
            }));
        }
    }

    /// A due task from the scheduler.
    pub fn on_dispatch(
        &mut self,
        pool: String,
        delivery: u64,
        timeout: f64,
        task: DeliveredTask,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let waiting = Waiting {
            delivery,
            timeout,
            task,
        };
        match self.pools.get_mut(&pool) {
            Some(p) => waiting.push_to(&mut p.lines, false),
            None => {
                let mut p = Pool::new(&pool);
                waiting.push_to(&mut p.lines, false);
                self.pools.insert(pool.clone(), p);
            }
        }
        self.assign(&pool, now, out);
    }

    /// A cancelled task: drop it if it still waits for a worker.
    pub fn on_revoke(&mut self, delivery: u64) {
        let mut emptied = false;
        for p in self.pools.values_mut() {
            if p.lines.remove_where(|w| w.delivery == delivery) > 0 {
                emptied |= p.is_unused();
            }
        }
        if emptied {
            self.pools.retain(|_, p| !p.is_unused());
        }
    }

    /// Puts deliveries that never reached their worker back in front of
    /// their pools, in their order, and offers them to the workers there.
    fn give_back(&mut self, back: Vec<(InFlight, Dispatched)>, now: Instant, out: &mut Vec<Out>) {
        let mut pools: Vec<Arc<str>> = Vec::new();
        for (f, d) in back.into_iter().rev() {
            if !pools.contains(&f.pool) {
                pools.push(f.pool.clone());
            }
            release(&mut self.pools, &f);
            let waiting = Waiting {
                delivery: d.delivery,
                timeout: f.timeout,
                task: d.task,
            };
            let pool = self
                .pools
                .entry(f.pool.to_string())
                .or_insert_with(|| Pool::new(&f.pool));
            waiting.push_to(&mut pool.lines, true);
        }
        for pool in pools {
            self.assign(&pool, now, out);
        }
    }

    /// A `Task` or `Tasks` message could not be sent: put its tasks back in
    /// front of their pools, in their order, and offer them to the other
    /// workers. An unreachable worker is forgotten.
    pub fn unsent(
        &mut self,
        identity: &[u8],
        tasks: Vec<Dispatched>,
        unreachable: bool,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let Some(w) = self.workers.get_mut(identity) else {
            return;
        };
        let back = take_in_flight(&mut w.in_flight, tasks);
        if unreachable {
            self.remove(identity, "unreachable", now, out);
        } else {
            // Its pipe is full: send it nothing more until it answers.
            w.window = w.in_flight.len() as u32;
        }
        self.give_back(back, now, out);
    }

    /// The loop sent something to `identity`.
    pub fn sent(&mut self, identity: &[u8], now: Instant) {
        if let Some(w) = self.workers.get_mut(identity) {
            w.last_sent = now;
        }
    }

    fn assign_pools(&mut self, pools: &[String], now: Instant, out: &mut Vec<Out>) {
        for p in pools {
            self.assign(p, now, out);
        }
    }

    /// Hands waiting tasks of `pool` to its workers with free credit,
    /// round robin.
    fn assign(&mut self, pool_name: &str, now: Instant, out: &mut Vec<Out>) {
        let Some(pool) = self.pools.get_mut(pool_name) else {
            return;
        };
        // The webhook pool keeps a reserve of its capacity, the credit of
        // its workers (the gateways); the others only take turns.
        let reserve = &*pool.name == protocol::HTTP_POOL;
        let capacity = if reserve {
            pool.members
                .iter()
                .filter_map(|m| self.workers.get(m))
                .fold(0u32, |c, w| c.saturating_add(w.window))
        } else {
            u32::MAX
        };
        while pool.lines.waiting() > 0 && !pool.members.is_empty() {
            let n = pool.members.len();
            let mut chosen = None;
            for i in 0..n {
                let idx = (pool.next + i) % n;
                if let Some(w) = self.workers.get(&pool.members[idx]) {
                    if (w.in_flight.len() as u32) < w.window {
                        chosen = Some(idx);
                        break;
                    }
                }
            }
            let Some(idx) = chosen else { break };
            // The fair lines choose which task (or none, when the queues
            // waiting have their share).
            let Some((flow, waiting)) = pool.lines.pop(capacity, reserve) else {
                break;
            };
            pool.next = (idx + 1) % n;
            let identity = pool.members[idx].clone();
            let Some(w) = self.workers.get_mut(&identity) else {
                pool.lines.release(&flow);
                waiting.push_to(&mut pool.lines, true);
                break;
            };
            let deadline = now
                + protocol::limits::clamp_secs(waiting.timeout, Duration::from_secs(86400))
                + self.config.result_grace;
            w.in_flight.insert(
                waiting.delivery,
                InFlight {
                    task_id: waiting.task.id.clone(),
                    pool: pool.name.clone(),
                    flow,
                    deadline,
                    timeout: waiting.timeout,
                },
            );
            // The task itself travels in the message; a failed send hands
            // it back through `unsent`.
            self.stats.deliveries_sent += 1;
            if w.batch {
                if w.outbox.is_empty() {
                    self.filled.push(identity);
                }
                w.outbox.push(Dispatched {
                    delivery: waiting.delivery,
                    task: waiting.task,
                });
            } else {
                let msg = BrokerMessage::Task {
                    delivery: waiting.delivery,
                    task: waiting.task,
                };
                out.push(Out::Send(identity, msg));
            }
        }
    }

    /// Hands the loop what waits in outboxes, as `tasks` messages within
    /// the limits of [`protocol::batch_has_room`].
    pub fn flush(&mut self, out: &mut Vec<Out>) {
        for identity in self.filled.drain(..) {
            let Some(w) = self.workers.get_mut(&identity) else {
                continue;
            };
            let mut tasks = Vec::new();
            let mut bytes = 0;
            for d in w.outbox.drain(..) {
                let size = d.encoded_size_bound();
                if !protocol::batch_has_room(tasks.len(), bytes, size) {
                    out.push(Out::Send(
                        identity.clone(),
                        BrokerMessage::Tasks {
                            tasks: std::mem::take(&mut tasks),
                        },
                    ));
                    bytes = 0;
                }
                bytes += size;
                tasks.push(d);
            }
            if !tasks.is_empty() {
                out.push(Out::Send(identity, BrokerMessage::Tasks { tasks }));
            }
        }
    }

    /// Heartbeats, silent workers and overdue deliveries.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Out>) {
        let mut expired = Vec::new();
        for (id, w) in self.workers.iter_mut() {
            if now.duration_since(w.last_heard) >= self.config.worker_expiry {
                expired.push(id.clone());
                continue;
            }
            if now.duration_since(w.last_sent) >= self.config.heartbeat_interval {
                out.push(Out::Send(id.clone(), BrokerMessage::Heartbeat));
            }
            let overdue: Vec<u64> = w
                .in_flight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(d, _)| *d)
                .collect();
            for d in overdue {
                if let Some(f) = w.in_flight.remove(&d) {
                    release(&mut self.pools, &f);
                    out.push(Out::Schedule(Command::Lost {
                        delivery: d,
                        task_id: f.task_id,
                        reason: "no result from worker before the deadline".into(),
                    }));
                }
            }
        }
        for id in expired {
            self.stats.workers_expired += 1;
            self.remove(&id, "silent past the heartbeat expiry", now, out);
        }
        let pools: Vec<String> = self.pools.keys().cloned().collect();
        self.assign_pools(&pools, now, out);
    }
}

/// Carries out `out` in order, with the actions that doing so adds (a
/// failed send gives its tasks back, which may go to other workers), and
/// has the dispatcher's outboxes flushed (`flush`) before each pass, until
/// nothing is left. The I/O loop and the simulation both carry out the
/// dispatcher's actions through it; `act` is theirs.
pub fn carry_out<C>(
    ctx: &mut C,
    out: &mut Vec<Out>,
    mut flush: impl FnMut(&mut C, &mut Vec<Out>),
    mut act: impl FnMut(&mut C, Out, &mut Vec<Out>),
) {
    let mut i = 0;
    loop {
        flush(ctx, out);
        if i == out.len() {
            break;
        }
        while i < out.len() {
            // `act` may push more actions: they are handled in order.
            let action = std::mem::replace(&mut out[i], Out::Schedule(Command::Shutdown));
            i += 1;
            if !matches!(action, Out::Schedule(Command::Shutdown)) {
                act(ctx, action, out);
            }
        }
    }
    out.clear();
}

/// A delivery out ended: its pool's fair lines count it no more, and a
/// pool left unused is forgotten.
fn release(pools: &mut BTreeMap<String, Pool>, f: &InFlight) {
    if let Some(pool) = pools.get_mut(&*f.pool) {
        pool.lines.release(&f.flow);
        if pool.is_unused() {
            pools.remove(&*f.pool);
        }
    }
}

/// The deliveries among `tasks` still counted in flight, taken out of it.
fn take_in_flight(
    in_flight: &mut BTreeMap<u64, InFlight>,
    tasks: Vec<Dispatched>,
) -> Vec<(InFlight, Dispatched)> {
    tasks
        .into_iter()
        .filter_map(|d| in_flight.remove(&d.delivery).map(|f| (f, d)))
        .collect()
}

/// What a worker's `ready` asks for.
struct Ready {
    pools: Vec<String>,
    credit: u32,
    name: Option<String>,
    batch: bool,
}

/// What a result did.
enum Settled {
    /// It settled a delivery of this pool.
    Freed(Arc<str>),
    /// It named a delivery out to the worker, but another task.
    WrongTask(String),
    /// It matched no delivery out (§8.6 rule 4): ignored.
    Unknown,
}

fn wrong_task(identity: &[u8], reason: String) -> Out {
    Out::Send(
        identity.to_vec(),
        BrokerMessage::Error {
            code: ErrorCode::BadRequest,
            reason,
        },
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{DeliveryResult, Outcome};

    fn task(id: &str) -> DeliveredTask {
        DeliveredTask {
            id: id.into(),
            queue: "q".into(),
            name: None,
            url: "zmq://p".into(),
            method: "POST".into(),
            params: vec![],
            body: None,
            content_type: None,
            headers: vec![],
            eta: 0.0,
            timeout: 1.0,
            retry_count: 0,
            execution_count: 0,
            signing_secrets: vec![],
        }
    }

    fn sent_tasks(out: &[Out]) -> Vec<(Vec<u8>, u64)> {
        out.iter()
            .filter_map(|o| match o {
                Out::Send(id, BrokerMessage::Task { delivery, .. }) => {
                    Some((id.clone(), *delivery))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn credit_bounds_deliveries_and_round_robin() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        for w in [b"a", b"b"] {
            ready(&mut d, w, 1, false, &mut out);
        }
        for i in 0..3 {
            d.on_dispatch("p".into(), i, 1.0, task(&format!("t{i}")), now, &mut out);
        }
        let sent = sent_tasks(&out);
        assert_eq!(sent.len(), 2);
        assert_ne!(sent[0].0, sent[1].0);
        assert_eq!(d.waiting(), 1);
        out.clear();
        let (who, delivery) = sent[0].clone();
        let result = success(delivery, &format!("t{delivery}"));
        d.on_message(&who, Ok(WorkerMessage::Result(result)), now, &mut out);
        assert!(matches!(out[0], Out::Schedule(Command::Result(_))));
        assert_eq!(sent_tasks(&out), vec![(who, 2)]);
    }

    #[test]
    fn silent_worker_loses_its_deliveries_and_unknown_gets_disconnect() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        ready(&mut d, b"w", 5, false, &mut out);
        d.on_dispatch("p".into(), 7, 60.0, task("t"), now, &mut out);
        out.clear();
        d.tick(now + Duration::from_secs(6), &mut out);
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Schedule(Command::Lost { delivery: 7, .. }))));
        assert_eq!(d.worker_count(), 0);
        out.clear();
        d.on_message(b"w", Ok(WorkerMessage::Heartbeat), now, &mut out);
        assert!(matches!(
            out[0],
            Out::Send(_, BrokerMessage::Disconnect { .. })
        ));
    }

    fn ready(d: &mut Dispatcher, who: &[u8], credit: u32, batch: bool, out: &mut Vec<Out>) {
        let msg = WorkerMessage::Ready {
            pools: vec!["p".into()],
            credit,
            name: None,
            batch,
        };
        d.on_message(who, Ok(msg), Instant::now(), out);
    }

    fn success(delivery: u64, task_id: &str) -> DeliveryResult {
        DeliveryResult {
            delivery,
            task_id: task_id.into(),
            outcome: Outcome::Success,
            status: None,
            reason: None,
            retry_after: None,
            responded: true,
            body: None,
            no_retry: false,
        }
    }

    /// The deliveries of each `tasks` message in `out`, by message.
    fn batches(out: &[Out]) -> Vec<Vec<u64>> {
        out.iter()
            .filter_map(|o| match o {
                Out::Send(_, BrokerMessage::Tasks { tasks }) => {
                    Some(tasks.iter().map(|d| d.delivery).collect())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_batching_worker_gets_a_pass_worth_of_tasks_in_one_message() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        ready(&mut d, b"w", 3, true, &mut out);
        for i in 0..5 {
            d.on_dispatch("p".into(), i, 1.0, task(&format!("t{i}")), now, &mut out);
        }
        // Nothing leaves before the flush; the credit still holds.
        assert!(out.is_empty());
        assert_eq!(d.waiting(), 2);
        d.flush(&mut out);
        assert_eq!(batches(&out), vec![vec![0, 1, 2]]);
        out.clear();
        // Two results in one message free two credits: one message again.
        let results = vec![success(0, "t0"), success(2, "t2")];
        d.on_message(b"w", Ok(WorkerMessage::Results { results }), now, &mut out);
        let settled: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Out::Schedule(Command::Result(r)) => Some(r.delivery),
                _ => None,
            })
            .collect();
        assert_eq!(settled, vec![0, 2]);
        out.clear();
        d.flush(&mut out);
        assert_eq!(batches(&out), vec![vec![3, 4]]);
        // A worker without `batch` still gets one `task` per delivery.
        out.clear();
        ready(&mut d, b"v", 2, false, &mut out);
        d.on_dispatch("p".into(), 9, 1.0, task("t9"), now, &mut out);
        d.flush(&mut out);
        assert_eq!(sent_tasks(&out), vec![(b"v".to_vec(), 9)]);
        assert!(batches(&out).is_empty());
    }

    #[test]
    fn a_result_in_a_batch_for_the_wrong_task_is_refused_alone() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        ready(&mut d, b"w", 2, true, &mut out);
        d.on_dispatch("p".into(), 1, 1.0, task("t1"), now, &mut out);
        d.on_dispatch("p".into(), 2, 1.0, task("t2"), now, &mut out);
        d.flush(&mut out);
        out.clear();
        let results = vec![
            success(1, "other"),
            success(2, "t2"),
            success(77, "t77"),
            success(1, "another"),
        ];
        d.on_message(b"w", Ok(WorkerMessage::Results { results }), now, &mut out);
        assert!(matches!(&out[0], Out::Schedule(Command::Result(r)) if r.delivery == 2));
        // One error for the message, counting the wrong entries.
        let want = "2 results name the wrong task; the first: delivery 1 is not task other";
        assert!(
            matches!(
                &out[1],
                Out::Send(_, BrokerMessage::Error { code: ErrorCode::BadRequest, reason })
                    if reason == want
            ),
            "{out:?}"
        );
        assert_eq!(out.len(), 2);
        assert_eq!(d.stats.unknown_results, 3);
        // Delivery 1 is still out: its right result settles it.
        out.clear();
        d.on_message(
            b"w",
            Ok(WorkerMessage::Result(success(1, "t1"))),
            now,
            &mut out,
        );
        assert!(matches!(&out[0], Out::Schedule(Command::Result(r)) if r.delivery == 1));
    }

    #[test]
    fn batches_are_cut_by_count_and_by_size() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        ready(&mut d, b"w", 10_000, true, &mut out);
        let n = protocol::MAX_BATCHED as u64 + 44;
        for i in 0..n {
            d.on_dispatch("p".into(), i, 1.0, task(&format!("t{i}")), now, &mut out);
        }
        d.flush(&mut out);
        let sizes: Vec<usize> = batches(&out).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![protocol::MAX_BATCHED, 44]);
        let all: Vec<u64> = batches(&out).concat();
        assert_eq!(all, (0..n).collect::<Vec<u64>>());
        // Tasks with the largest bodies: every message stays under the
        // message limit, and a broker-side decoder takes it.
        out.clear();
        for i in 0..5 {
            let mut t = task(&format!("big{i}"));
            t.body = Some(serde_bytes::ByteBuf::from(
                vec![b'x'; protocol::MAX_TASK_BODY_BYTES],
            ));
            d.on_dispatch("p".into(), 1000 + i, 1.0, t, now, &mut out);
        }
        d.flush(&mut out);
        assert_eq!(batches(&out).concat(), (1000..1005).collect::<Vec<u64>>());
        for o in &out {
            if let Out::Send(_, m) = o {
                let frames = protocol::encode(m);
                assert!(frames[2].len() <= protocol::frames::MAX_BODY_BYTES);
                let back: BrokerMessage = protocol::decode_hot(&frames).unwrap();
                assert_eq!(&back, m);
            }
        }
    }

    #[test]
    fn tasks_given_back_go_at_once_to_another_worker() {
        let now = Instant::now();
        let mut out = Vec::new();
        // Unsent: the pipe to `w` was full.
        let mut d = Dispatcher::new(DispatchConfig::default());
        ready(&mut d, b"w", 2, true, &mut out);
        for i in 0..2 {
            d.on_dispatch("p".into(), i, 1.0, task(&format!("t{i}")), now, &mut out);
        }
        d.flush(&mut out);
        let Some(Out::Send(who, BrokerMessage::Tasks { tasks })) = out.pop() else {
            panic!("no tasks message: {out:?}");
        };
        ready(&mut d, b"v", 5, true, &mut out);
        d.unsent(&who, tasks, false, now, &mut out);
        d.flush(&mut out);
        assert!(matches!(&out[0], Out::Send(id, _) if id == b"v"), "{out:?}");
        assert_eq!(batches(&out), vec![vec![0, 1]]);
        // Removed with a full outbox: `w` leaves before the flush.
        out.clear();
        let mut d = Dispatcher::new(DispatchConfig::default());
        ready(&mut d, b"w", 2, true, &mut out);
        for i in 0..2 {
            d.on_dispatch("p".into(), i, 1.0, task(&format!("t{i}")), now, &mut out);
        }
        ready(&mut d, b"v", 5, true, &mut out);
        d.on_message(b"w", Ok(WorkerMessage::Disconnect), now, &mut out);
        d.flush(&mut out);
        assert!(matches!(&out[0], Out::Send(id, _) if id == b"v"), "{out:?}");
        assert_eq!(batches(&out), vec![vec![0, 1]]);
        assert_eq!(d.waiting(), 0);
    }

    #[test]
    fn unsent_and_unflushed_tasks_go_back_in_order() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        ready(&mut d, b"w", 3, true, &mut out);
        for i in 0..4 {
            d.on_dispatch("p".into(), i, 1.0, task(&format!("t{i}")), now, &mut out);
        }
        d.flush(&mut out);
        let Some(Out::Send(who, BrokerMessage::Tasks { tasks })) = out.pop() else {
            panic!("no tasks message: {out:?}");
        };
        // The pipe was full: all three come back before the fourth, and the
        // worker gets nothing more until it answers.
        d.unsent(&who, tasks, false, now, &mut out);
        assert_eq!(d.waiting(), 4);
        ready(&mut d, b"v", 10, true, &mut out);
        d.flush(&mut out);
        assert_eq!(batches(&out), vec![vec![0, 1, 2, 3]]);
        // A worker that leaves with tasks still in its outbox: they wait for
        // another worker, as failed attempts of nobody.
        out.clear();
        let mut d = Dispatcher::new(DispatchConfig::default());
        ready(&mut d, b"w", 3, true, &mut out);
        for i in 0..2 {
            d.on_dispatch("p".into(), i, 1.0, task(&format!("t{i}")), now, &mut out);
        }
        d.on_message(b"w", Ok(WorkerMessage::Disconnect), now, &mut out);
        assert!(!out
            .iter()
            .any(|o| matches!(o, Out::Schedule(Command::Lost { .. }))));
        assert_eq!(d.waiting(), 2);
        d.flush(&mut out);
        assert!(batches(&out).is_empty());
        // The same worker asking again without `batch` gets them one by one.
        ready(&mut d, b"w", 3, false, &mut out);
        assert_eq!(
            sent_tasks(&out),
            vec![(b"w".to_vec(), 0), (b"w".to_vec(), 1)]
        );
        // A registered worker that drops `batch` before its outbox is
        // flushed gets what was in it as single tasks.
        out.clear();
        let mut d = Dispatcher::new(DispatchConfig::default());
        ready(&mut d, b"u", 3, true, &mut out);
        d.on_dispatch("p".into(), 5, 1.0, task("t5"), now, &mut out);
        ready(&mut d, b"u", 3, false, &mut out);
        d.flush(&mut out);
        assert_eq!(sent_tasks(&out), vec![(b"u".to_vec(), 5)]);
        assert!(batches(&out).is_empty());
    }

    #[test]
    fn pools_of_workers_that_left_are_forgotten_and_capped() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        for round in 0..3 {
            for w in 0..50u8 {
                let pools = (0..20).map(|p| format!("r{round}-w{w}-p{p}")).collect();
                let ready = WorkerMessage::Ready {
                    pools,
                    credit: 1,
                    name: None,
                    batch: false,
                };
                d.on_message(&[w], Ok(ready), now, &mut out);
            }
            assert_eq!(d.pool_count(), 1000);
            for w in 0..50u8 {
                d.on_message(&[w], Ok(WorkerMessage::Disconnect), now, &mut out);
            }
            assert_eq!(d.pool_count(), 0, "round {round}");
        }
        out.clear();
        let ready = WorkerMessage::Ready {
            pools: (0..101).map(|p| format!("p{p}")).collect(),
            credit: 1,
            name: None,
            batch: false,
        };
        d.on_message(b"x", Ok(ready), now, &mut out);
        assert!(matches!(
            &out[..],
            [Out::Send(
                _,
                BrokerMessage::Error {
                    code: ErrorCode::BadRequest,
                    ..
                }
            )]
        ));
        assert_eq!(d.worker_count(), 0);
    }
}
