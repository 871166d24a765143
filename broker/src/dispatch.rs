//! Pulling workers and the tasks waiting for them: registry, credit,
//! round-robin assignment, heartbeats and deadlines.
//!
//! Sans-IO and owned by the I/O thread: it is told what arrived and what
//! time it is, and answers with [`Out`] actions that the loop carries out.
//! It never changes task state itself; lost or timed-out deliveries become
//! [`Command::Lost`] for the scheduler.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{BrokerMessage, DeliveredTask, ErrorCode, WorkerMessage};

use crate::scheduler::Command;

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
    /// Send to the worker with this identity. For a `Task`, report a failed
    /// send with [`Dispatcher::unsent`].
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
    deadline: Instant,
    timeout: f64,
}

struct Worker {
    name: String,
    pools: Vec<String>,
    /// Deliveries allowed out at once.
    window: u32,
    in_flight: HashMap<u64, InFlight>,
    last_heard: Instant,
    last_sent: Instant,
}

struct Pool {
    name: Arc<str>,
    waiting: VecDeque<Waiting>,
    /// Identities of the workers serving the pool, for round robin.
    members: Vec<Vec<u8>>,
    next: usize,
}

impl Pool {
    fn new(name: &str) -> Pool {
        Pool {
            name: name.into(),
            waiting: VecDeque::new(),
            members: Vec::new(),
            next: 0,
        }
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
    workers: HashMap<Vec<u8>, Worker>,
    pools: HashMap<String, Pool>,
    pub stats: DispatchStats,
}

impl Dispatcher {
    pub fn new(config: DispatchConfig) -> Self {
        Dispatcher {
            config,
            workers: HashMap::new(),
            pools: HashMap::new(),
            stats: DispatchStats::default(),
        }
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Tasks waiting for a worker with credit, over all pools.
    pub fn waiting(&self) -> usize {
        self.pools.values().map(|p| p.waiting.len()).sum()
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
        } = msg
        {
            self.register(identity, pools, credit, name, now, out);
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
            WorkerMessage::Result(r) => match w.in_flight.remove(&r.delivery) {
                Some(f) if f.task_id == r.task_id => {
                    let pool = f.pool;
                    out.push(Out::Schedule(Command::Result(r)));
                    self.assign(&pool, now, out);
                }
                Some(f) => {
                    // Wrong task id for the delivery: keep the delivery.
                    w.in_flight.insert(r.delivery, f);
                    self.stats.unknown_results += 1;
                    out.push(Out::Send(
                        identity.to_vec(),
                        BrokerMessage::Error {
                            code: ErrorCode::BadRequest,
                            reason: format!("delivery {} is not task {}", r.delivery, r.task_id),
                        },
                    ));
                }
                None => self.stats.unknown_results += 1,
            },
            WorkerMessage::Disconnect => self.remove(identity, "worker disconnected", out),
        }
    }

    fn register(
        &mut self,
        identity: &[u8],
        pools: Vec<String>,
        credit: u32,
        name: Option<String>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let name = name.unwrap_or_else(|| hex(identity));
        let in_flight = match self.workers.remove(identity) {
            Some(old) => {
                self.leave_pools(identity, &old.pools);
                old.in_flight
            }
            None => {
                self.stats.workers_registered += 1;
                HashMap::new()
            }
        };
        tracing::info!(worker = %name, ?pools, credit, "worker ready");
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
            },
        );
        self.assign_pools(&pools, now, out);
    }

    fn leave_pools(&mut self, identity: &[u8], pools: &[String]) {
        for p in pools {
            if let Some(pool) = self.pools.get_mut(p) {
                pool.members.retain(|m| m != identity);
            }
        }
    }

    /// Forgets a worker; its deliveries become failed attempts.
    fn remove(&mut self, identity: &[u8], reason: &str, out: &mut Vec<Out>) {
        let Some(w) = self.workers.remove(identity) else {
            return;
        };
        tracing::warn!(worker = %w.name, in_flight = w.in_flight.len(), reason, "worker gone");
        self.leave_pools(identity, &w.pools);
        for (delivery, f) in w.in_flight {
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
            Some(p) => p.waiting.push_back(waiting),
            None => {
                let mut p = Pool::new(&pool);
                p.waiting.push_back(waiting);
                self.pools.insert(pool.clone(), p);
            }
        }
        self.assign(&pool, now, out);
    }

    /// A cancelled task: drop it if it still waits for a worker.
    pub fn on_revoke(&mut self, delivery: u64) {
        for p in self.pools.values_mut() {
            p.waiting.retain(|w| w.delivery != delivery);
        }
    }

    /// A `Task` message could not be sent: put it back in front of its
    /// pool. An unreachable worker is forgotten.
    pub fn unsent(
        &mut self,
        identity: &[u8],
        delivery: u64,
        task: DeliveredTask,
        unreachable: bool,
        out: &mut Vec<Out>,
    ) {
        if let Some(w) = self.workers.get_mut(identity) {
            if let Some(f) = w.in_flight.remove(&delivery) {
                self.pools
                    .entry(f.pool.to_string())
                    .or_insert_with(|| Pool::new(&f.pool))
                    .waiting
                    .push_front(Waiting {
                        delivery,
                        timeout: f.timeout,
                        task,
                    });
            }
            if unreachable {
                self.remove(identity, "unreachable", out);
            } else {
                // Its pipe is full: send it nothing more until it answers.
                w.window = w.in_flight.len() as u32;
            }
        }
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
        while !pool.waiting.is_empty() && !pool.members.is_empty() {
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
            pool.next = (idx + 1) % n;
            let identity = pool.members[idx].clone();
            let Some(waiting) = pool.waiting.pop_front() else {
                break;
            };
            let Some(w) = self.workers.get_mut(&identity) else {
                break;
            };
            let deadline = now
                + Duration::from_secs_f64(waiting.timeout.clamp(0.0, 86400.0))
                + self.config.result_grace;
            w.in_flight.insert(
                waiting.delivery,
                InFlight {
                    task_id: waiting.task.id.clone(),
                    pool: pool.name.clone(),
                    deadline,
                    timeout: waiting.timeout,
                },
            );
            // The task itself travels in the message; a failed send hands
            // it back through `unsent`.
            let msg = BrokerMessage::Task {
                delivery: waiting.delivery,
                task: waiting.task,
            };
            self.stats.deliveries_sent += 1;
            out.push(Out::Send(identity, msg));
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
            self.remove(&id, "silent past the heartbeat expiry", out);
        }
        let pools: Vec<String> = self.pools.keys().cloned().collect();
        self.assign_pools(&pools, now, out);
    }
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
            d.on_message(
                w,
                Ok(WorkerMessage::Ready {
                    pools: vec!["p".into()],
                    credit: 1,
                    name: None,
                }),
                now,
                &mut out,
            );
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
        d.on_message(
            &who,
            Ok(WorkerMessage::Result(DeliveryResult {
                delivery,
                task_id: format!("t{delivery}"),
                outcome: Outcome::Success,
                status: None,
                reason: None,
                retry_after: None,
                responded: true,
                body: None,
                no_retry: false,
            })),
            now,
            &mut out,
        );
        assert!(matches!(out[0], Out::Schedule(Command::Result(_))));
        assert_eq!(sent_tasks(&out), vec![(who, 2)]);
    }

    #[test]
    fn silent_worker_loses_its_deliveries_and_unknown_gets_disconnect() {
        let mut d = Dispatcher::new(DispatchConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        d.on_message(
            b"w",
            Ok(WorkerMessage::Ready {
                pools: vec!["p".into()],
                credit: 5,
                name: None,
            }),
            now,
            &mut out,
        );
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
}
