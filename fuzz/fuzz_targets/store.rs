//! The task store (`broker::store::Store`, single node, seeded ids) under
//! arbitrary sequences of requests, worker results (success, failure,
//! 429/503 with any `retry_after`, `no_retry`, stale ones), lost
//! deliveries and clock ticks (microseconds to a century), with the
//! harness playing the I/O loop and the dispatcher: it runs `fire_due`
//! after every step, as the scheduler does, and keeps the deliveries
//! handed out.
//!
//! After every step, through the public API only:
//! * every state change (`observe_changes`) is one the lifecycle allows:
//!   tasks are born `scheduled`; `succeeded` and `cancelled` only ever
//!   leave the store; a removed id never comes back; `task_state` agrees;
//! * the deliveries handed out and neither settled nor revoked are exactly
//!   the tasks in `running`: each such task is `running`, and per queue
//!   their number equals `Store::running` and the queue's `running` figure;
//! * each queue's figures equal the counts of its listing by state, and the
//!   listings of all queues together hold `Store::len` tasks;
//! * a delivery number is never handed out twice; a revoke names a
//!   delivery handed out and not settled; nothing goes to peers;
//! * after `fire_due(now)`, no timer is left due (`next_deadline > now`);
//! * a resent request (same id) gets the first answer again.
//!
//! At the end the harness resumes every queue and answers every delivery
//! with success, jumping the clock to each next deadline: every task must
//! reach a final state, no delivery may stay out, and every request must
//! have had exactly one answer (held `wait` replies included).
#![no_main]

use std::collections::{BTreeMap, HashMap};

use arbitrary::Arbitrary;
use broker::store::{Command, Event, Store, StoreConfig, TaskIds};
use libfuzzer_sys::fuzz_target;
use protocol::{
    ClientCommand, ClientRequest, DeliveryResult, Outcome, QueueConfigPatch, QueueInfo, ReplyBody,
    TaskInfo, TaskSpec, TaskState,
};
use uuid::Uuid;

const T0: u64 = 1_800_000_000_000_000;
/// How far ticks may take the clock: past 2106-02-07 too (u32 seconds
/// once ran out there in broker/src/store/recent.rs, which this target
/// found; regressions/store/y2106-request-dedup keeps the input).
fn max_now() -> u64 {
    u64::MAX / 2
}
const QUEUES: [&str; 3] = ["default", "q1", "q2"];

#[derive(Arbitrary, Debug)]
enum When {
    Now,
    /// Milliseconds from now.
    Countdown(u16),
    /// Seconds from now (refused past 30 days).
    CountdownSecs(u32),
    /// An absolute eta, unix seconds (any f64).
    Eta(f64),
    /// Seconds before now.
    Past(u16),
}

#[derive(Arbitrary, Debug)]
enum Url {
    Http,
    Https,
    Zmq,
    Empty,
    Bad,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    url: Url,
    name: Option<u8>,
    key: Option<u8>,
    when: When,
    /// Per-attempt timeout, tenths of a second.
    timeout: Option<u16>,
    callback: bool,
    failure_callback: bool,
}

#[derive(Arbitrary, Debug)]
enum Verdict {
    Success,
    Failure,
    TooMany,
    Unavailable,
    NoRetry,
    Silent,
}

#[derive(Arbitrary, Debug)]
enum RetryAfter {
    None,
    Nan,
    Inf,
    NegInf,
    Negative,
    Zero,
    Tiny,
    Secs(u16),
    E20,
    E308,
    Any(f64),
}

#[derive(Arbitrary, Debug)]
enum Setting {
    Rate(u8),
    Burst(u8),
    MaxConcurrent(u8),
    MaxAttempts(i8),
    MaxAge(u16),
    MinBackoff(u16),
    MaxBackoff(u16),
    MaxDoublings(u8),
    Timeout(u16),
    DedupWindow(u16),
    Retention(u16),
}

#[derive(Arbitrary, Debug)]
enum Tick {
    Micros(u16),
    Millis(u16),
    Secs(u32),
    NextDeadline,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Enqueue {
        queue: u8,
        spec: Spec,
        /// Seconds to hold the reply (refused past 300).
        wait: Option<u16>,
    },
    Batch {
        queue: u8,
        specs: Vec<Spec>,
    },
    Cancel(u8, u8),
    Run(u8, u8),
    Get(u8, u8),
    Purge(u8),
    Pause(u8),
    Resume(u8),
    Configure(u8, Vec<Setting>),
    /// A verdict on a delivery handed out (the n-th still out).
    Result {
        pick: u8,
        verdict: Verdict,
        status: Option<u16>,
        retry_after: RetryAfter,
        body: u8,
    },
    /// A verdict on a delivery that is not out (settled, revoked, unknown).
    StaleResult {
        delivery: u64,
        task: u8,
        success: bool,
    },
    Lost(u8),
    /// The same request again, same id (a client's resend).
    Resend,
    Tick(Tick),
}

struct Harness {
    store: Store,
    now: u64,
    out: Vec<Event>,
    n: u64,
    /// Request ids sent, with their answers so far.
    answers: HashMap<String, u32>,
    /// Immediately answered requests, for resends: (request, answer).
    last: Option<(ClientRequest, ReplyBody, u64)>,
    /// Deliveries out: delivery → (task id, queue).
    out_deliveries: BTreeMap<u64, (Uuid, String)>,
    max_delivery: u64,
    /// Last known state of every task ever seen (`None`: removed).
    states: HashMap<Uuid, Option<TaskState>>,
    /// Ids in the order they appeared (to pick from).
    ids: Vec<Uuid>,
}

fn queue(q: u8) -> String {
    QUEUES[q as usize % QUEUES.len()].to_string()
}

fn task_spec(s: &Spec, now: u64) -> TaskSpec {
    let now_secs = now as f64 / 1e6;
    let (countdown, eta) = match s.when {
        When::Now => (None, None),
        When::Countdown(ms) => (Some(f64::from(ms) / 1000.0), None),
        When::CountdownSecs(secs) => (Some(f64::from(secs)), None),
        When::Eta(e) => (None, Some(e)),
        When::Past(secs) => (None, Some(now_secs - f64::from(secs))),
    };
    TaskSpec {
        url: match s.url {
            Url::Http => "http://localhost/w".into(),
            Url::Https => "https://example.com/x?y=1".into(),
            Url::Zmq => "zmq://pool".into(),
            Url::Empty => String::new(),
            Url::Bad => "ftp://x/".into(),
        },
        name: s.name.map(|n| format!("n{}", n % 4)),
        idempotency_key: s.key.map(|k| format!("k{}", k % 3)),
        countdown,
        eta,
        timeout: s.timeout.map(|t| f64::from(t) / 10.0),
        callback_url: s.callback.then(|| "http://localhost/cb".into()),
        failure_callback_url: s.failure_callback.then(|| "http://localhost/fail".into()),
        params: vec![("a".into(), "1".into())],
        ..Default::default()
    }
}

fn setting(p: &mut QueueConfigPatch, s: &Setting) {
    match *s {
        Setting::Rate(r) => p.rate = Some([0.0, 0.001, 0.5, 1.0, 1000.0, 1e9][r as usize % 6]),
        Setting::Burst(b) => p.burst = Some(u32::from(b % 4)),
        Setting::MaxConcurrent(c) => p.max_concurrent = Some(u32::from(c % 4)),
        Setting::MaxAttempts(a) => p.max_attempts = Some(i64::from(a % 5)),
        Setting::MaxAge(s) => p.max_age = Some(f64::from(s)),
        Setting::MinBackoff(s) => p.min_backoff = Some(f64::from(s) / 100.0),
        Setting::MaxBackoff(s) => p.max_backoff = Some(f64::from(s)),
        Setting::MaxDoublings(d) => p.max_doublings = Some(u32::from(d % 70)),
        Setting::Timeout(t) => p.timeout = Some(f64::from(t) / 10.0),
        Setting::DedupWindow(s) => p.dedup_window = Some(f64::from(s)),
        Setting::Retention(s) => p.retention = Some(f64::from(s)),
    }
}

impl Harness {
    fn new() -> Harness {
        let mut store = Store::new(StoreConfig::default(), T0, TaskIds::seeded(11));
        store.observe_changes();
        Harness {
            store,
            now: T0,
            out: Vec::new(),
            n: 0,
            answers: HashMap::new(),
            last: None,
            out_deliveries: BTreeMap::new(),
            max_delivery: 0,
            states: HashMap::new(),
            ids: Vec::new(),
        }
    }

    fn pick_id(&self, k: u8) -> String {
        if self.ids.is_empty() || k == 255 {
            return "00000000-0000-0000-0000-000000000000".into();
        }
        self.ids[k as usize % self.ids.len()].to_string()
    }

    /// Sends a request; returns its immediate answer, if any.
    fn request(&mut self, command: ClientCommand) -> Option<ReplyBody> {
        self.n += 1;
        let request = ClientRequest {
            request_id: format!("r{}", self.n),
            command,
        };
        self.answers.insert(request.request_id.clone(), 0);
        self.send(request.clone());
        let answer = self.out.iter().find_map(|e| match e {
            Event::Reply { reply, .. } if reply.request_id == request.request_id => {
                Some(reply.body.clone())
            }
            _ => None,
        });
        self.after();
        if let Some(a) = &answer {
            self.last = Some((request, a.clone(), self.now));
        }
        answer
    }

    fn send(&mut self, request: ClientRequest) {
        self.store.apply(
            Command::Request {
                identity: b"c".to_vec(),
                request,
            },
            self.now,
            &mut self.out,
        );
    }

    fn apply(&mut self, cmd: Command) {
        self.store.apply(cmd, self.now, &mut self.out);
        self.after();
    }

    /// What the I/O loop does with the events, then the scheduler's
    /// `fire_due`, then the checks.
    fn after(&mut self) {
        loop {
            let events = std::mem::take(&mut self.out);
            if events.is_empty() {
                break;
            }
            for e in events {
                self.event(e);
            }
        }
        self.store.fire_due(self.now, &mut self.out);
        for e in std::mem::take(&mut self.out) {
            self.event(e);
        }
        if let Some(at) = self.store.next_deadline() {
            assert!(
                at > self.now,
                "a timer at {at} is still due at {}",
                self.now
            );
        }
        self.check();
    }

    fn event(&mut self, e: Event) {
        if trace() {
            eprintln!("    {e:?}");
        }
        match e {
            Event::Reply { reply, .. } => {
                if let Some(n) = self.answers.get_mut(&reply.request_id) {
                    *n += 1;
                }
                let mut ids = Vec::new();
                match &reply.body {
                    ReplyBody::Enqueued { id, .. } => ids.push(id.clone()),
                    ReplyBody::Batch { results } => {
                        for r in results {
                            if let ReplyBody::Enqueued { id, .. } = r {
                                ids.push(id.clone());
                            }
                        }
                    }
                    _ => {}
                }
                for id in ids {
                    let id = Uuid::parse_str(&id).expect("a task id is a uuid");
                    self.note_id(id);
                }
                assert!(
                    !fuzz_common::bytes_of(&reply).is_empty(),
                    "a reply does not encode"
                );
            }
            Event::Dispatch {
                delivery,
                timeout,
                task,
                pool,
            } => {
                assert!(
                    delivery > self.max_delivery,
                    "delivery {delivery} handed out twice"
                );
                self.max_delivery = delivery;
                assert!(timeout.is_finite() && timeout > 0.0, "timeout {timeout}");
                assert_eq!(pool == "pool", task.url == "zmq://pool");
                let id = Uuid::parse_str(&task.id).expect("a task id is a uuid");
                self.note_id(id);
                self.out_deliveries
                    .insert(delivery, (id, task.queue.clone()));
            }
            Event::Revoke { delivery } => {
                assert!(
                    self.out_deliveries.remove(&delivery).is_some(),
                    "revoked delivery {delivery} is not out"
                );
            }
            Event::ToPeer { to, msg } => panic!("a single node sent to peer {to}: {msg:?}"),
            Event::Publish(_) => {}
        }
    }

    fn note_id(&mut self, id: Uuid) {
        if !self.ids.contains(&id) {
            self.ids.push(id);
        }
    }

    fn check(&mut self) {
        use TaskState::*;
        for c in self.store.take_changes() {
            let prev = self.states.get(&c.id).copied();
            let ok = match (prev, c.state) {
                (None, Some(Scheduled)) => true,
                (None, _) => false,
                (Some(None), _) => false,
                (Some(Some(_)), None) => true,
                (Some(Some(from)), Some(to)) => match from {
                    Scheduled | Retrying | Failed => matches!(to, Running | Cancelled),
                    Running => matches!(to, Succeeded | Retrying | Failed | Cancelled),
                    Succeeded | Cancelled => false,
                },
            };
            assert!(ok, "task {}: {prev:?} -> {:?}", c.id, c.state);
            self.states.insert(c.id, c.state);
            self.note_id(c.id);
        }
        for (id, s) in &self.states {
            assert_eq!(self.store.task_state(id), *s, "task_state of {id}");
        }
        let mut out_per_queue: HashMap<String, u64> = HashMap::new();
        for (d, (id, q)) in &self.out_deliveries {
            assert_eq!(
                self.store.task_state(id),
                Some(Running),
                "delivery {d} is out but its task is not running"
            );
            *out_per_queue.entry(q.clone()).or_default() += 1;
        }
        let queues = self.queues();
        let mut held = 0;
        for info in &queues {
            let name = info.name.as_str();
            let out = out_per_queue.remove(name).unwrap_or(0);
            assert_eq!(info.stats.running, out, "queue {name}: running figure");
            assert_eq!(
                u64::from(self.store.running(name)),
                out,
                "queue {name}: running()"
            );
            let tasks = self.list(name);
            held += tasks.len();
            let count = |s: TaskState| tasks.iter().filter(|t| t.state == s).count() as u64;
            let st = &info.stats;
            assert_eq!(
                (
                    st.scheduled,
                    st.running,
                    st.retrying,
                    st.failed,
                    st.succeeded,
                    st.cancelled
                ),
                (
                    count(Scheduled),
                    count(Running),
                    count(Retrying),
                    count(Failed),
                    count(Succeeded),
                    count(Cancelled)
                ),
                "queue {name}: figures differ from the listing"
            );
        }
        assert!(
            out_per_queue.is_empty(),
            "deliveries out for unknown queues"
        );
        assert_eq!(
            held,
            self.store.len(),
            "listings hold a different number of tasks"
        );
    }

    /// A request made for the checks (its events are only looked at).
    fn peek(&mut self, command: ClientCommand) -> Option<ReplyBody> {
        let mut out = Vec::new();
        self.store.apply(
            Command::Request {
                identity: b"check".to_vec(),
                request: ClientRequest {
                    request_id: format!("check{}", self.n),
                    command,
                },
            },
            self.now,
            &mut out,
        );
        let mut reply = None;
        for e in out {
            match e {
                Event::Reply { identity, reply: r } if identity == b"check" => reply = Some(r.body),
                other => panic!("a read-only request caused {other:?}"),
            }
        }
        reply
    }

    /// Every queue, page by page.
    fn queues(&mut self) -> Vec<QueueInfo> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let Some(ReplyBody::Queues {
                queues,
                next_cursor,
            }) = self.peek(ClientCommand::ListQueues {
                limit: Some(2),
                cursor: cursor.take(),
                owned: false,
            })
            else {
                panic!("list_queues failed");
            };
            all.extend(queues);
            match next_cursor {
                Some(c) => cursor = Some(c),
                None => return all,
            }
        }
    }

    fn list(&mut self, queue: &str) -> Vec<TaskInfo> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let Some(ReplyBody::Tasks { tasks, next_cursor }) =
                self.peek(ClientCommand::ListTasks {
                    queue: queue.to_string(),
                    state: None,
                    limit: Some(1000),
                    cursor: cursor.take(),
                    full: false,
                    owned: false,
                })
            else {
                panic!("list_tasks failed");
            };
            all.extend(tasks);
            match next_cursor {
                Some(c) => cursor = Some(c),
                None => return all,
            }
        }
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Enqueue {
                queue: q,
                spec,
                wait,
            } => {
                let task = task_spec(&spec, self.now);
                self.request(ClientCommand::Enqueue {
                    queue: queue(q),
                    task,
                    wait: wait.map(f64::from),
                });
            }
            Op::Batch { queue: q, specs } => {
                let tasks = specs
                    .iter()
                    .take(8)
                    .map(|s| task_spec(s, self.now))
                    .collect();
                self.request(ClientCommand::EnqueueBatch {
                    queue: queue(q),
                    tasks,
                });
            }
            Op::Cancel(q, k) => {
                let id = self.pick_id(k);
                self.request(ClientCommand::Cancel {
                    queue: queue(q),
                    id,
                });
            }
            Op::Run(q, k) => {
                let id = self.pick_id(k);
                self.request(ClientCommand::Run {
                    queue: queue(q),
                    id,
                });
            }
            Op::Get(q, k) => {
                let id = self.pick_id(k);
                self.request(ClientCommand::Get {
                    queue: queue(q),
                    id,
                });
            }
            Op::Purge(q) => {
                self.request(ClientCommand::PurgeQueue { queue: queue(q) });
            }
            Op::Pause(q) => {
                self.request(ClientCommand::PauseQueue { queue: queue(q) });
            }
            Op::Resume(q) => {
                self.request(ClientCommand::ResumeQueue { queue: queue(q) });
            }
            Op::Configure(q, settings) => {
                let mut config = QueueConfigPatch::default();
                for s in settings.iter().take(4) {
                    setting(&mut config, s);
                }
                self.request(ClientCommand::ConfigureQueue {
                    queue: queue(q),
                    config,
                });
            }
            Op::Result {
                pick,
                verdict,
                status,
                retry_after,
                body,
            } => {
                let Some((&delivery, (id, _))) = self
                    .out_deliveries
                    .iter()
                    .nth(pick as usize % self.out_deliveries.len().max(1))
                else {
                    return;
                };
                let id = *id;
                let retry_after = match retry_after {
                    RetryAfter::None => None,
                    RetryAfter::Nan => Some(f64::NAN),
                    RetryAfter::Inf => Some(f64::INFINITY),
                    RetryAfter::NegInf => Some(f64::NEG_INFINITY),
                    RetryAfter::Negative => Some(-1.0),
                    RetryAfter::Zero => Some(0.0),
                    RetryAfter::Tiny => Some(1e-300),
                    RetryAfter::Secs(s) => Some(f64::from(s)),
                    RetryAfter::E20 => Some(1e20),
                    RetryAfter::E308 => Some(1e308),
                    RetryAfter::Any(f) => Some(f),
                };
                let (outcome, status, no_retry, responded) = match verdict {
                    Verdict::Success => (Outcome::Success, status.or(Some(200)), false, true),
                    Verdict::Failure => (Outcome::Failure, status, false, status.is_some()),
                    Verdict::TooMany => (Outcome::Failure, Some(429), false, true),
                    Verdict::Unavailable => (Outcome::Failure, Some(503), false, true),
                    Verdict::NoRetry => (Outcome::Failure, status, true, true),
                    Verdict::Silent => (Outcome::Failure, None, false, false),
                };
                self.out_deliveries.remove(&delivery);
                self.apply(Command::Result(DeliveryResult {
                    delivery,
                    task_id: id.to_string(),
                    outcome,
                    status,
                    reason: Some("fuzz".into()),
                    retry_after,
                    responded,
                    body: Some(serde_bytes::ByteBuf::from(vec![b'x'; body as usize * 300])),
                    no_retry,
                }));
            }
            Op::StaleResult {
                delivery,
                task,
                success,
            } => {
                if self.out_deliveries.contains_key(&delivery) {
                    return;
                }
                let task_id = self.pick_id(task);
                self.apply(Command::Result(DeliveryResult {
                    delivery,
                    task_id,
                    outcome: if success {
                        Outcome::Success
                    } else {
                        Outcome::Failure
                    },
                    status: None,
                    reason: None,
                    retry_after: None,
                    responded: false,
                    body: None,
                    no_retry: false,
                }));
            }
            Op::Lost(pick) => {
                let Some((&delivery, (id, _))) = self
                    .out_deliveries
                    .iter()
                    .nth(pick as usize % self.out_deliveries.len().max(1))
                else {
                    return;
                };
                let id = *id;
                self.out_deliveries.remove(&delivery);
                self.apply(Command::Lost {
                    delivery,
                    task_id: id.to_string(),
                    reason: "worker lost".into(),
                });
            }
            Op::Resend => {
                let Some((request, first, at)) = self.last.clone() else {
                    return;
                };
                // Request ids are remembered for 10 minutes, and not for
                // error answers (a resend is then answered afresh).
                if self.now - at >= 600_000_000
                    || !is_remembered(&request.command)
                    || matches!(first, ReplyBody::Error { .. })
                {
                    return;
                }
                self.send(request.clone());
                let again = self.out.iter().find_map(|e| match e {
                    Event::Reply { reply, .. } if reply.request_id == request.request_id => {
                        Some(reply.body.clone())
                    }
                    _ => None,
                });
                self.after();
                if let Some(n) = self.answers.get_mut(&request.request_id) {
                    *n = n.saturating_sub(1); // the resend's own answer
                }
                assert_eq!(
                    again.as_ref(),
                    Some(&first),
                    "a resend of {request:?} got another answer"
                );
            }
            Op::Tick(t) => {
                self.now = max_now().min(
                    self.now
                        + match t {
                            Tick::Micros(us) => u64::from(us),
                            Tick::Millis(ms) => u64::from(ms) * 1000,
                            Tick::Secs(s) => u64::from(s) * 1_000_000,
                            Tick::NextDeadline => self
                                .store
                                .next_deadline()
                                .map_or(0, |at| at.saturating_sub(self.now)),
                        },
                );
                self.after();
            }
        }
    }

    /// Every task reaches a final state once the queues run and every
    /// delivery succeeds; every request is answered once.
    fn drain(&mut self) {
        for q in QUEUES {
            self.request(ClientCommand::ResumeQueue { queue: q.into() });
        }
        for _ in 0..100_000 {
            let out: Vec<(u64, Uuid)> = self
                .out_deliveries
                .iter()
                .map(|(d, (id, _))| (*d, *id))
                .collect();
            for (delivery, id) in out {
                self.out_deliveries.remove(&delivery);
                self.apply(Command::Result(DeliveryResult {
                    delivery,
                    task_id: id.to_string(),
                    outcome: Outcome::Success,
                    status: Some(200),
                    reason: None,
                    retry_after: None,
                    responded: true,
                    body: None,
                    no_retry: false,
                }));
            }
            let pending = self.states.values().any(|s| {
                matches!(
                    s,
                    Some(TaskState::Scheduled | TaskState::Running | TaskState::Retrying)
                )
            });
            let waiting = self.answers.values().any(|&n| n == 0);
            if !pending && !waiting && self.out_deliveries.is_empty() {
                break;
            }
            if !self.out_deliveries.is_empty() {
                continue; // handed out while settling: answer them first
            }
            let Some(at) = self.store.next_deadline() else {
                break;
            };
            self.now = self.now.max(at);
            self.after();
        }
        let stuck: Vec<String> = self
            .states
            .iter()
            .filter(|(_, s)| {
                matches!(
                    s,
                    Some(TaskState::Scheduled | TaskState::Running | TaskState::Retrying)
                )
            })
            .map(|(id, _)| self.store.describe_task(id).unwrap_or_default())
            .collect();
        assert!(stuck.is_empty(), "tasks never finished: {stuck:#?}");
        assert!(self.out_deliveries.is_empty());
        for (id, n) in &self.answers {
            assert_eq!(*n, 1, "request {id} was answered {n} times");
        }
    }
}

/// Requests whose answer a resend gets back (the changes, remembered by
/// request id: broker/src/store/admit.rs `is_mutating`).
fn is_remembered(c: &ClientCommand) -> bool {
    !matches!(
        c,
        ClientCommand::Get { .. }
            | ClientCommand::Ping
            | ClientCommand::ListTasks { .. }
            | ClientCommand::GetQueue { .. }
            | ClientCommand::ListQueues { .. }
            | ClientCommand::Stats
    )
}

/// `FUZZ_TRACE=1`: print every op and event (to replay a failure).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fuzz_target!(|ops: Vec<Op>| {
    let mut h = Harness::new();
    for op in ops.into_iter().take(64) {
        if trace() {
            eprintln!("@{} op {op:?}", h.now - T0);
        }
        h.op(op);
    }
    if trace() {
        eprintln!("@{} drain", h.now - T0);
    }
    h.drain();
});
