//! The task store and its timers: every change to a task's state happens
//! here, in [`Store::apply`] and [`Store::fire_due`].
//!
//! [`Store`] is sans-IO (commands and a clock in, events out) so it can be
//! tested without sockets; [`spawn`] runs it on its own thread, fed by a
//! crossbeam channel from the I/O loop and answering through another
//! channel plus a doorbell. No other thread touches task state, which is
//! what lets a journal record every change later without touching the rest.
//!
//! Timers are a `BTreeMap` keyed by (fire time µs, sequence): enqueue,
//! cancel and firing are O(log n), so a million pending tasks stay cheap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use protocol::{
    ClientCommand, ClientReply, ClientRequest, DeliveredTask, DeliveryResult, ErrorCode, Outcome,
    ReplyBody, TaskInfo, TaskState,
};
use uuid::Uuid;

use crate::clock::{micros_to_secs, now_micros, secs_to_micros};
use crate::retry::RetryPolicy;
use crate::sockets::Bell;
use crate::validate::{validate, ValidTask};

/// How long a request id is remembered for deduplication.
pub const REQUEST_DEDUP: Duration = Duration::from_secs(600);
/// Longest accepted request id.
pub const MAX_REQUEST_ID_BYTES: usize = 100;
/// At most this many request ids are remembered.
const REQUEST_DEDUP_MAX: usize = 1_000_000;

/// What the I/O loop asks of the scheduler.
#[derive(Debug)]
// Commands are moved through a channel once; boxing would add an
// allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// A client request; the reply goes back to `identity`.
    Request {
        identity: Vec<u8>,
        request: ClientRequest,
    },
    /// A worker's verdict on a delivery the dispatcher knew.
    Result(DeliveryResult),
    /// A delivery that will get no verdict (worker lost, deadline passed).
    Lost {
        delivery: u64,
        task_id: String,
        reason: String,
    },
    Shutdown,
}

/// What the scheduler tells the I/O loop.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Reply {
        identity: Vec<u8>,
        reply: ClientReply,
    },
    /// Hand `task` to a worker of `pool`.
    Dispatch {
        pool: String,
        delivery: u64,
        timeout: f64,
        task: DeliveredTask,
    },
    /// The delivery's task was cancelled; drop it if not sent yet.
    Revoke { delivery: u64 },
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub node_id: String,
    pub retry: RetryPolicy,
    /// How long succeeded and cancelled tasks stay inspectable.
    pub retention: Duration,
    /// Seconds between replicas' fire times (replica i fires at eta + i × offset).
    pub replica_offset: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            node_id: "node".into(),
            retry: RetryPolicy::default(),
            retention: Duration::from_secs(3600),
            replica_offset: Duration::from_secs(5),
        }
    }
}

/// Counters for operators and tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub enqueued: u64,
    pub dispatched: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub cancelled: u64,
    pub duplicate_requests: u64,
    pub stale_results: u64,
}

struct Task {
    spec: ValidTask,
    created: f64,
    replica: u32,
    state: TaskState,
    /// This replica's next fire time, or when a finished task expires.
    fire_at_us: u64,
    timer: Option<(u64, u64)>,
    attempts: u32,
    executions: u32,
    last_status: Option<u16>,
    last_error: Option<String>,
    /// The delivery under way while `Running`.
    delivery: Option<u64>,
}

/// Every task of this node, and its timers.
pub struct Store {
    config: SchedulerConfig,
    tasks: HashMap<Uuid, Task>,
    timers: BTreeMap<(u64, u64), Uuid>,
    seq: u64,
    next_delivery: u64,
    recent_requests: HashMap<String, ClientReply>,
    recent_order: VecDeque<(u64, String)>,
    pub stats: Stats,
}

impl Store {
    pub fn new(config: SchedulerConfig) -> Self {
        Store {
            config,
            tasks: HashMap::new(),
            timers: BTreeMap::new(),
            seq: 0,
            next_delivery: 1,
            recent_requests: HashMap::new(),
            recent_order: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Tasks held, finished ones included.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// When the earliest timer fires, in unix µs.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.keys().next().map(|k| k.0)
    }

    /// Applies one command at time `now_us`, pushing resulting events.
    pub fn apply(&mut self, cmd: Command, now_us: u64, out: &mut Vec<Event>) {
        match cmd {
            Command::Request { identity, request } => {
                let reply = self.request(request, now_us, out);
                out.push(Event::Reply { identity, reply });
            }
            Command::Result(r) => {
                let responded = r.responded || r.outcome == Outcome::Success;
                self.settle(
                    &r.task_id,
                    r.delivery,
                    r.outcome,
                    r.status,
                    r.reason,
                    r.retry_after,
                    responded,
                    now_us,
                );
            }
            Command::Lost {
                delivery,
                task_id,
                reason,
            } => self.settle(
                &task_id,
                delivery,
                Outcome::Failure,
                None,
                Some(reason),
                None,
                false,
                now_us,
            ),
            Command::Shutdown => {}
        }
    }

    /// Fires every timer due at `now_us`.
    pub fn fire_due(&mut self, now_us: u64, out: &mut Vec<Event>) {
        while let Some((&key, &id)) = self.timers.iter().next() {
            if key.0 > now_us {
                break;
            }
            self.timers.remove(&key);
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            task.timer = None;
            if task.state.is_final() {
                if task.state != TaskState::Failed {
                    self.tasks.remove(&id);
                }
                continue;
            }
            // Scheduled or Retrying: start an attempt.
            let delivery = self.next_delivery;
            self.next_delivery += 1;
            task.state = TaskState::Running;
            task.delivery = Some(delivery);
            let retry_count = task.attempts;
            task.attempts += 1;
            self.stats.dispatched += 1;
            let s = &task.spec;
            out.push(Event::Dispatch {
                pool: s.pool.clone(),
                delivery,
                timeout: s.timeout,
                task: DeliveredTask {
                    id: id.to_string(),
                    queue: s.queue.clone(),
                    name: s.name.clone(),
                    url: s.url.clone(),
                    method: s.method.clone(),
                    params: s.params.clone(),
                    body: s.body.clone().map(serde_bytes::ByteBuf::from),
                    content_type: s.content_type.clone(),
                    headers: s.headers.clone(),
                    eta: s.eta,
                    timeout: s.timeout,
                    retry_count,
                    execution_count: task.executions,
                },
            });
        }
        self.expire_requests(now_us);
    }

    fn request(&mut self, req: ClientRequest, now_us: u64, out: &mut Vec<Event>) -> ClientReply {
        if !(1..=MAX_REQUEST_ID_BYTES).contains(&req.request_id.len()) {
            return ClientReply {
                request_id: req.request_id,
                body: error(
                    ErrorCode::BadRequest,
                    format!("request_id must be 1 to {MAX_REQUEST_ID_BYTES} bytes"),
                ),
            };
        }
        let mutating = matches!(
            req.command,
            ClientCommand::Enqueue { .. } | ClientCommand::Cancel { .. }
        );
        if mutating {
            if let Some(r) = self.recent_requests.get(&req.request_id) {
                self.stats.duplicate_requests += 1;
                return r.clone();
            }
        }
        let body = match req.command {
            ClientCommand::Enqueue { queue, task } => {
                match validate(&queue, task, micros_to_secs(now_us)) {
                    Ok(t) => self.enqueue(t, now_us),
                    Err(reason) => error(ErrorCode::BadRequest, reason),
                }
            }
            ClientCommand::Cancel { queue, id } => self.cancel(&queue, &id, now_us, out),
            ClientCommand::Get { queue, id } => match self.find(&queue, &id) {
                Some((id, t)) => ReplyBody::Task {
                    task: self.info(id, t),
                },
                None => error(
                    ErrorCode::NotFound,
                    format!("no task {id} in queue {queue}"),
                ),
            },
            ClientCommand::Ping => ReplyBody::Pong {
                node: self.config.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        };
        let reply = ClientReply {
            request_id: req.request_id,
            body,
        };
        if mutating {
            if self.recent_requests.len() >= REQUEST_DEDUP_MAX {
                if let Some((_, old)) = self.recent_order.pop_front() {
                    self.recent_requests.remove(&old);
                }
            }
            self.recent_requests
                .insert(reply.request_id.clone(), reply.clone());
            self.recent_order.push_back((
                now_us + REQUEST_DEDUP.as_micros() as u64,
                reply.request_id.clone(),
            ));
        }
        reply
    }

    fn expire_requests(&mut self, now_us: u64) {
        while let Some((expires, _)) = self.recent_order.front() {
            if *expires > now_us {
                break;
            }
            if let Some((_, id)) = self.recent_order.pop_front() {
                self.recent_requests.remove(&id);
            }
        }
    }

    fn enqueue(&mut self, spec: ValidTask, now_us: u64) -> ReplyBody {
        let id = Uuid::new_v4();
        let replica = 0u32;
        let fire_at = secs_to_micros(spec.eta)
            + replica as u64 * self.config.replica_offset.as_micros() as u64;
        let reply = ReplyBody::Enqueued {
            id: id.to_string(),
            queue: spec.queue.clone(),
            eta: spec.eta,
        };
        let task = Task {
            spec,
            created: micros_to_secs(now_us),
            replica,
            state: TaskState::Scheduled,
            fire_at_us: fire_at,
            timer: None,
            attempts: 0,
            executions: 0,
            last_status: None,
            last_error: None,
            delivery: None,
        };
        self.tasks.insert(id, task);
        self.set_timer(id, fire_at);
        self.stats.enqueued += 1;
        reply
    }

    fn find(&self, queue: &str, id: &str) -> Option<(Uuid, &Task)> {
        let id = Uuid::parse_str(id).ok()?;
        let t = self.tasks.get(&id)?;
        (t.spec.queue == queue).then_some((id, t))
    }

    fn cancel(
        &mut self,
        queue: &str,
        id_str: &str,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        let Some((id, task)) = self.find(queue, id_str) else {
            return error(
                ErrorCode::NotFound,
                format!("no task {id_str} in queue {queue}"),
            );
        };
        match task.state {
            TaskState::Succeeded => {
                return error(
                    ErrorCode::NotFound,
                    format!("task {id_str} already succeeded"),
                )
            }
            TaskState::Cancelled => {
                return ReplyBody::Cancelled {
                    id: id_str.to_string(),
                }
            }
            _ => {}
        }
        if let Some(task) = self.tasks.get_mut(&id) {
            if let (TaskState::Running, Some(delivery)) = (task.state, task.delivery) {
                out.push(Event::Revoke { delivery });
            }
            task.delivery = None;
            task.state = TaskState::Cancelled;
        }
        self.stats.cancelled += 1;
        self.finish(id, now_us);
        ReplyBody::Cancelled {
            id: id_str.to_string(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        task_id: &str,
        delivery: u64,
        outcome: Outcome,
        status: Option<u16>,
        reason: Option<String>,
        retry_after: Option<f64>,
        responded: bool,
        now_us: u64,
    ) {
        let Some(id) = Uuid::parse_str(task_id).ok() else {
            self.stats.stale_results += 1;
            return;
        };
        let policy = self.config.retry.clone();
        let Some(task) = self.tasks.get_mut(&id) else {
            self.stats.stale_results += 1;
            return;
        };
        if task.state != TaskState::Running || task.delivery != Some(delivery) {
            self.stats.stale_results += 1;
            return;
        }
        task.delivery = None;
        task.last_status = status;
        if responded {
            task.executions += 1;
        }
        match outcome {
            Outcome::Success => {
                task.state = TaskState::Succeeded;
                task.last_error = None;
                self.stats.succeeded += 1;
                self.finish(id, now_us);
            }
            Outcome::Failure => {
                task.last_error = Some(reason.unwrap_or_else(|| match status {
                    Some(s) => format!("HTTP {s}"),
                    None => "failed".into(),
                }));
                if policy.allows_another(task.attempts) {
                    task.state = TaskState::Retrying;
                    let delay = policy.next_delay(task.attempts, retry_after);
                    let at = now_us + delay.as_micros() as u64;
                    task.fire_at_us = at;
                    self.stats.retried += 1;
                    self.set_timer(id, at);
                } else {
                    task.state = TaskState::Failed;
                    self.stats.failed += 1;
                    self.clear_timer(id);
                }
            }
        }
    }

    /// Moves a finished task onto its retention timer.
    fn finish(&mut self, id: Uuid, now_us: u64) {
        let at = now_us + self.config.retention.as_micros() as u64;
        if let Some(t) = self.tasks.get_mut(&id) {
            t.fire_at_us = at;
        }
        self.set_timer(id, at);
    }

    fn clear_timer(&mut self, id: Uuid) {
        if let Some(t) = self.tasks.get_mut(&id) {
            if let Some(key) = t.timer.take() {
                self.timers.remove(&key);
            }
        }
    }

    fn set_timer(&mut self, id: Uuid, at_us: u64) {
        self.clear_timer(id);
        self.seq += 1;
        let key = (at_us, self.seq);
        self.timers.insert(key, id);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.timer = Some(key);
        }
    }

    fn info(&self, id: Uuid, t: &Task) -> TaskInfo {
        TaskInfo {
            id: id.to_string(),
            queue: t.spec.queue.clone(),
            name: t.spec.name.clone(),
            url: t.spec.url.clone(),
            method: t.spec.method.clone(),
            state: t.state,
            eta: if t.state.is_final() {
                t.spec.eta
            } else {
                micros_to_secs(t.fire_at_us)
            },
            attempts: t.attempts,
            executions: t.executions,
            last_status: t.last_status,
            last_error: t.last_error.clone(),
            created: t.created,
            replica: t.replica,
            replica_offset: self.config.replica_offset.as_secs_f64(),
        }
    }
}

fn error(code: ErrorCode, reason: impl Into<String>) -> ReplyBody {
    ReplyBody::Error {
        code,
        reason: reason.into(),
    }
}

/// Runs a [`Store`] on its own thread until [`Command::Shutdown`] or until
/// every sender is gone. Events go to `events`, with `bell` rung after each
/// batch.
pub fn spawn(
    config: SchedulerConfig,
    commands: Receiver<Command>,
    events: Sender<Event>,
    bell: Bell,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let mut store = Store::new(config);
            let mut out = Vec::new();
            loop {
                let now = now_micros();
                store.fire_due(now, &mut out);
                flush(&mut out, &events, &bell);
                let wait = store
                    .next_deadline()
                    .map(|d| Duration::from_micros(d.saturating_sub(now)))
                    .unwrap_or(Duration::from_secs(3600));
                let first = match commands.recv_timeout(wait) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                // Take whatever else is queued so one doorbell covers a burst.
                let mut stop = false;
                let mut next = Some(first);
                let mut n = 0;
                while let Some(cmd) = next {
                    if matches!(cmd, Command::Shutdown) {
                        stop = true;
                        break;
                    }
                    store.apply(cmd, now_micros(), &mut out);
                    n += 1;
                    next = if n < 1024 {
                        commands.try_recv().ok()
                    } else {
                        None
                    };
                }
                flush(&mut out, &events, &bell);
                if stop {
                    break;
                }
            }
            tracing::debug!(stats = ?store.stats, "scheduler stopped");
        })
}

fn flush(out: &mut Vec<Event>, events: &Sender<Event>, bell: &Bell) {
    if out.is_empty() {
        return;
    }
    for e in out.drain(..) {
        if events.send(e).is_err() {
            return;
        }
    }
    bell.ring();
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::TaskSpec;

    fn enqueue(store: &mut Store, rid: &str, spec: TaskSpec, now: u64) -> ReplyBody {
        let mut out = Vec::new();
        store.apply(
            Command::Request {
                identity: b"c".to_vec(),
                request: ClientRequest {
                    request_id: rid.into(),
                    command: ClientCommand::Enqueue {
                        queue: "default".into(),
                        task: spec,
                    },
                },
            },
            now,
            &mut out,
        );
        match out.pop() {
            Some(Event::Reply { reply, .. }) => reply.body,
            other => panic!("{other:?}"),
        }
    }

    fn spec(countdown: f64) -> TaskSpec {
        TaskSpec {
            url: "http://localhost/w".into(),
            countdown: Some(countdown),
            ..Default::default()
        }
    }

    fn dispatches(out: &[Event]) -> Vec<(u64, DeliveredTask)> {
        out.iter()
            .filter_map(|e| match e {
                Event::Dispatch { delivery, task, .. } => Some((*delivery, task.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fires_at_eta_and_retries_with_backoff() {
        let mut s = Store::new(SchedulerConfig::default());
        let t0 = 1_000_000_000;
        let ReplyBody::Enqueued { id, .. } = enqueue(&mut s, "r1", spec(5.0), t0) else {
            panic!()
        };
        let mut out = Vec::new();
        s.fire_due(t0 + 4_999_999, &mut out);
        assert!(out.is_empty());
        s.fire_due(t0 + 5_000_000, &mut out);
        let d = dispatches(&out);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].1.retry_count, 0);
        let fail = |delivery| {
            Command::Result(DeliveryResult {
                delivery,
                task_id: id.clone(),
                outcome: Outcome::Failure,
                status: Some(500),
                reason: None,
                retry_after: None,
                responded: true,
            })
        };
        s.apply(fail(d[0].0), t0 + 5_000_000, &mut out);
        // A duplicate verdict is ignored.
        s.apply(fail(d[0].0), t0 + 5_000_000, &mut out);
        assert_eq!(s.stats.stale_results, 1);
        out.clear();
        s.fire_due(t0 + 5_099_999, &mut out);
        assert!(out.is_empty(), "retry must wait min_backoff");
        s.fire_due(t0 + 5_100_000, &mut out);
        let d = dispatches(&out);
        assert_eq!((d[0].1.retry_count, d[0].1.execution_count), (1, 1));
    }

    #[test]
    fn resent_request_is_not_enqueued_twice() {
        let mut s = Store::new(SchedulerConfig::default());
        let a = enqueue(&mut s, "same", spec(1.0), 10);
        let b = enqueue(&mut s, "same", spec(1.0), 20);
        assert_eq!(a, b);
        assert_eq!(s.len(), 1);
        enqueue(&mut s, "other", spec(1.0), 20);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn cancel_revokes_a_running_delivery_and_expires_after_retention() {
        let mut s = Store::new(SchedulerConfig {
            retention: Duration::from_secs(10),
            ..Default::default()
        });
        let ReplyBody::Enqueued { id, .. } = enqueue(&mut s, "r", spec(0.0), 0) else {
            panic!()
        };
        let mut out = Vec::new();
        s.fire_due(0, &mut out);
        let d = dispatches(&out)[0].0;
        out.clear();
        s.apply(
            Command::Request {
                identity: vec![],
                request: ClientRequest {
                    request_id: "c".into(),
                    command: ClientCommand::Cancel {
                        queue: "default".into(),
                        id: id.clone(),
                    },
                },
            },
            1,
            &mut out,
        );
        assert!(out.contains(&Event::Revoke { delivery: d }));
        s.fire_due(9_000_000, &mut out);
        assert_eq!(s.len(), 1);
        s.fire_due(10_000_001, &mut out);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn exhausted_task_is_kept_as_failed() {
        let mut s = Store::new(SchedulerConfig {
            retry: RetryPolicy {
                max_attempts: Some(2),
                ..Default::default()
            },
            retention: Duration::from_secs(1),
            ..Default::default()
        });
        let ReplyBody::Enqueued { id, .. } = enqueue(&mut s, "r", spec(0.0), 0) else {
            panic!()
        };
        let mut now = 0;
        for _ in 0..2 {
            let mut out = Vec::new();
            s.fire_due(now, &mut out);
            let d = dispatches(&out)[0].0;
            s.apply(
                Command::Lost {
                    delivery: d,
                    task_id: id.clone(),
                    reason: "worker lost".into(),
                },
                now,
                &mut out,
            );
            now += 10_000_000;
        }
        let mut out = Vec::new();
        s.fire_due(now + 100_000_000, &mut out);
        assert!(out.is_empty());
        let (uid, t) = s.find("default", &id).unwrap();
        let info = s.info(uid, t);
        assert_eq!(info.state, TaskState::Failed);
        assert_eq!(info.attempts, 2);
        assert_eq!(info.executions, 0);
        assert_eq!(info.last_error.as_deref(), Some("worker lost"));
    }
}
