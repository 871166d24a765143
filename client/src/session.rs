//! The worker side of the worker dialogue (`PROTOCOL.md` §8), sans-IO:
//! messages and the time in, messages to send out. It owns no socket and
//! reads no clock, so the blocking [`crate::Worker`] and the gateway's
//! broker link (which has one registration per broker, all on one thread)
//! share one implementation of the rules, and tests can drive it by hand.
//!
//! What it keeps: the registration (`ready` with pools, credit, name and
//! `batch`), when the broker was last heard from and when we last sent
//! (Paranoid Pirate heartbeats both ways), and the results kept to go to
//! the broker together ([`KeptResults`], §8.7).
//!
//! The caller's loop: send [`WorkerSession::ready`] after connecting; pass
//! each message from the broker to [`WorkerSession::receive`]; pass each
//! result to [`WorkerSession::report`]; call [`WorkerSession::tick`] at
//! least once per heartbeat interval and act on what it says; call
//! [`WorkerSession::sent`] after each successful send.

use std::time::{Duration, Instant};

use protocol::{BrokerMessage, DeliveredTask, DeliveryResult, WorkerMessage};

/// One delivery received from the broker.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery: u64,
    pub task: DeliveredTask,
}

/// How a worker registers and keeps its registration alive.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub pools: Vec<String>,
    /// Deliveries in flight at most.
    pub credit: u32,
    /// Shown by the broker in its logs.
    pub name: String,
    /// Ask for `tasks` messages (several deliveries in one message).
    pub batch: bool,
    /// Send a heartbeat after sending nothing this long.
    pub heartbeat_interval: Duration,
    /// Register again on a new connection after hearing nothing this long.
    pub broker_expiry: Duration,
}

impl SessionConfig {
    /// `pools` with `credit`, heartbeats every second and a 5 s expiry.
    pub fn new(pools: &[&str], credit: u32, name: &str, batch: bool) -> SessionConfig {
        SessionConfig {
            pools: pools.iter().map(|p| p.to_string()).collect(),
            credit,
            name: name.to_string(),
            batch,
            heartbeat_interval: Duration::from_secs(1),
            broker_expiry: Duration::from_secs(5),
        }
    }
}

/// What the time asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    Nothing,
    /// Nothing was sent for a heartbeat interval: send `heartbeat`.
    Heartbeat,
    /// The broker has been silent past its expiry: make a new connection
    /// and call [`WorkerSession::renewed`], which forgets the old
    /// registration's results and gives the `ready` to send.
    Reconnect,
}

/// What a message from the broker did to the registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Deliveries (perhaps none) went to the caller.
    Jobs(usize),
    /// The broker asked us to register again (`disconnect`): the jobs of
    /// the old registration are given back, its kept results forgotten,
    /// and the new `ready` is in the messages to send.
    Renewed,
}

/// The worker side of one connection to one broker.
#[derive(Debug)]
pub struct WorkerSession {
    config: SessionConfig,
    last_heard: Instant,
    last_sent: Instant,
    results: KeptResults,
    /// `tasks` messages received, for tests and benchmarks.
    pub tasks_messages: u64,
}

impl WorkerSession {
    pub fn new(config: SessionConfig, now: Instant) -> WorkerSession {
        WorkerSession {
            config,
            last_heard: now,
            last_sent: now,
            results: KeptResults::default(),
            tasks_messages: 0,
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The `ready` that registers this worker.
    pub fn ready(&self) -> WorkerMessage {
        WorkerMessage::Ready {
            pools: self.config.pools.clone(),
            credit: self.config.credit,
            name: Some(self.config.name.clone()),
            batch: self.config.batch,
        }
    }

    /// A message went out at `now` (heartbeats are counted from it).
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// When a heartbeat is due, from `now`.
    pub fn until_heartbeat(&self, now: Instant) -> Duration {
        self.config
            .heartbeat_interval
            .saturating_sub(now.duration_since(self.last_sent))
    }

    /// What is due at `now`.
    pub fn tick(&self, now: Instant) -> Tick {
        if now.duration_since(self.last_heard) >= self.config.broker_expiry {
            Tick::Reconnect
        } else if now.duration_since(self.last_sent) >= self.config.heartbeat_interval {
            Tick::Heartbeat
        } else {
            Tick::Nothing
        }
    }

    /// A new connection replaced a silent one: the old registration's
    /// results are forgotten (the broker ignores results of deliveries it
    /// no longer knows). Returns the `ready` to send on it.
    pub fn renewed(&mut self, now: Instant) -> WorkerMessage {
        self.results = KeptResults::default();
        self.last_heard = now;
        self.ready()
    }

    /// One message from the broker at `now`: each delivery goes to `job`,
    /// and what must be sent at once goes to `out`.
    pub fn receive(
        &mut self,
        msg: BrokerMessage,
        now: Instant,
        mut job: impl FnMut(Job),
        out: &mut Vec<WorkerMessage>,
    ) -> Received {
        self.last_heard = now;
        match msg {
            BrokerMessage::Task { delivery, task } => {
                // A broker that batches sends a batching worker `tasks`
                // only: this one (perhaps after a restart) does not.
                self.results.broker_may_not_batch();
                job(Job { delivery, task });
                Received::Jobs(1)
            }
            BrokerMessage::Tasks { tasks } => {
                self.results.broker_batches();
                self.tasks_messages += 1;
                let n = tasks.len();
                for d in tasks {
                    job(Job {
                        delivery: d.delivery,
                        task: d.task,
                    });
                }
                Received::Jobs(n)
            }
            BrokerMessage::Disconnect { reason } => {
                tracing::info!(%reason, "broker asked the worker to register again");
                // Whatever answers now may not batch.
                self.results = KeptResults::default();
                out.push(self.ready());
                Received::Renewed
            }
            BrokerMessage::Heartbeat => Received::Jobs(0),
            BrokerMessage::Error { reason, .. } => {
                tracing::warn!(%reason, "broker reported an error to the worker");
                Received::Jobs(0)
            }
        }
    }

    /// A delivery's result: sent at once (in `out`), or kept for the next
    /// `results` message when the broker takes them.
    pub fn report(&mut self, result: DeliveryResult, now: Instant, out: &mut Vec<WorkerMessage>) {
        out.extend(self.results.keep(result, now));
    }

    /// The results kept, as the messages that send them.
    pub fn flush(&mut self, out: &mut Vec<WorkerMessage>) {
        out.extend(self.results.take());
    }

    pub fn kept(&self) -> &KeptResults {
        &self.results
    }
}

/// Results kept to go to the broker together (`PROTOCOL.md` §8.7): held
/// only once the broker has sent `tasks` on the connection, and sent one
/// by one again after it sends a plain `task` (or the connection is
/// renewed).
#[derive(Debug, Default)]
pub struct KeptResults {
    /// The broker takes `results` on this connection.
    batches: bool,
    results: Vec<DeliveryResult>,
    /// A bound on their encoded size.
    bytes: usize,
    /// When the oldest of them was kept.
    since: Option<Instant>,
}

impl KeptResults {
    /// The broker sent `tasks`: it takes `results`.
    pub fn broker_batches(&mut self) {
        self.batches = true;
    }

    /// The broker sent a plain `task`: results go one by one from now on.
    pub fn broker_may_not_batch(&mut self) {
        self.batches = false;
    }

    pub fn len(&self) -> usize {
        self.results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// When the oldest result kept was kept.
    pub fn kept_since(&self) -> Option<Instant> {
        self.since
    }

    /// Keeps `result` when the broker takes batches; returns what to send
    /// now: the result itself when it does not, or what was kept before
    /// when the result would not fit beside it.
    pub fn keep(&mut self, result: DeliveryResult, now: Instant) -> Vec<WorkerMessage> {
        if !self.batches {
            return vec![WorkerMessage::Result(result)];
        }
        let size = result.encoded_size_bound();
        let before = if protocol::batch_has_room(self.results.len(), self.bytes, size) {
            Vec::new()
        } else {
            self.take()
        };
        self.since.get_or_insert(now);
        self.bytes += size;
        self.results.push(result);
        before
    }

    /// What is kept, as the messages that send it: one `results`, or one
    /// `result` each when there is only one or the broker no longer takes
    /// batches.
    pub fn take(&mut self) -> Vec<WorkerMessage> {
        self.bytes = 0;
        self.since = None;
        let results = std::mem::take(&mut self.results);
        if results.len() > 1 && self.batches {
            return vec![WorkerMessage::Results { results }];
        }
        results.into_iter().map(WorkerMessage::Result).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Dispatched, Outcome};

    fn task(id: &str) -> DeliveredTask {
        DeliveredTask {
            id: id.into(),
            queue: "q".into(),
            name: None,
            url: "zmq://p".into(),
            method: "POST".into(),
            params: Vec::new(),
            body: None,
            content_type: None,
            headers: Vec::new(),
            eta: 0.0,
            timeout: 1.0,
            retry_count: 0,
            execution_count: 0,
            signing_secrets: Vec::new(),
        }
    }

    fn result(delivery: u64) -> DeliveryResult {
        DeliveryResult {
            delivery,
            task_id: format!("t{delivery}"),
            outcome: Outcome::Success,
            status: None,
            reason: None,
            retry_after: None,
            responded: true,
            body: None,
            no_retry: false,
        }
    }

    fn session(now: Instant) -> WorkerSession {
        WorkerSession::new(SessionConfig::new(&["p"], 8, "w", true), now)
    }

    #[test]
    fn results_are_kept_only_while_the_broker_batches() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let mut out = Vec::new();
        // Before any `tasks`, a result goes at once.
        s.report(result(1), t0, &mut out);
        assert!(matches!(out.as_slice(), [WorkerMessage::Result(_)]));
        out.clear();
        let tasks = (2..4)
            .map(|d| Dispatched {
                delivery: d,
                task: task(&format!("t{d}")),
            })
            .collect();
        let mut jobs = Vec::new();
        let got = s.receive(
            BrokerMessage::Tasks { tasks },
            t0,
            |j| jobs.push(j),
            &mut out,
        );
        assert_eq!(
            (got, jobs.len(), s.tasks_messages),
            (Received::Jobs(2), 2, 1)
        );
        s.report(result(2), t0, &mut out);
        s.report(result(3), t0, &mut out);
        assert!(out.is_empty(), "kept while the broker batches");
        assert_eq!(s.kept().kept_since(), Some(t0));
        s.flush(&mut out);
        assert!(
            matches!(out.as_slice(), [WorkerMessage::Results { results }] if results.len() == 2)
        );
        out.clear();
        // A plain `task`: one by one again.
        s.receive(
            BrokerMessage::Task {
                delivery: 4,
                task: task("t4"),
            },
            t0,
            |_| {},
            &mut out,
        );
        s.report(result(4), t0, &mut out);
        assert!(matches!(out.as_slice(), [WorkerMessage::Result(_)]));
    }

    #[test]
    fn a_disconnect_forgets_kept_results_and_registers_again() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let mut out = Vec::new();
        s.receive(BrokerMessage::Tasks { tasks: vec![] }, t0, |_| {}, &mut out);
        s.report(result(1), t0, &mut out);
        assert_eq!(s.kept().len(), 1);
        let got = s.receive(
            BrokerMessage::Disconnect {
                reason: "unknown".into(),
            },
            t0,
            |_| {},
            &mut out,
        );
        assert_eq!(got, Received::Renewed);
        assert!(matches!(
            out.as_slice(),
            [WorkerMessage::Ready {
                batch: true,
                credit: 8,
                ..
            }]
        ));
        assert!(s.kept().is_empty());
        out.clear();
        // And the new registration sends results one by one until `tasks`.
        s.report(result(2), t0, &mut out);
        assert!(matches!(out.as_slice(), [WorkerMessage::Result(_)]));
    }

    #[test]
    fn heartbeats_and_expiry_follow_the_clock() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(s.tick(t0), Tick::Nothing);
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(s.tick(t1), Tick::Heartbeat);
        s.sent(t1);
        assert_eq!(s.tick(t1), Tick::Nothing);
        assert_eq!(s.until_heartbeat(t1), Duration::from_secs(1));
        // Hearing the broker keeps the registration; silence ends it.
        s.receive(BrokerMessage::Heartbeat, t1, |_| {}, &mut Vec::new());
        let t2 = t1 + Duration::from_millis(4999);
        s.sent(t2);
        assert_eq!(s.tick(t2), Tick::Nothing);
        let t3 = t1 + Duration::from_secs(5);
        assert_eq!(s.tick(t3), Tick::Reconnect);
        assert!(matches!(s.renewed(t3), WorkerMessage::Ready { .. }));
        assert_eq!(s.tick(t3), Tick::Nothing);
    }
}
