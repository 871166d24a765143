//! Unit tests of the store: timing, retries, queues, names, waits.

use super::*;
use crate::retry::RetryPolicy;

const T0: u64 = 1_800_000_000_000_000;

struct Harness {
    store: Store,
    out: Vec<Event>,
    n: u64,
}

impl Harness {
    fn new(defaults: QueueConfig) -> Harness {
        Harness {
            store: Store::new(
                StoreConfig {
                    queue_defaults: defaults,
                    ..Default::default()
                },
                T0,
                TaskIds::seeded(7),
            ),
            out: Vec::new(),
            n: 0,
        }
    }

    fn request(&mut self, command: ClientCommand, now: u64) -> Option<ReplyBody> {
        self.n += 1;
        self.out.clear();
        self.store.apply(
            Command::Request {
                identity: b"c".to_vec(),
                request: ClientRequest {
                    request_id: format!("r{}", self.n),
                    command,
                },
            },
            now,
            &mut self.out,
        );
        self.out.iter().rev().find_map(|e| match e {
            Event::Reply { reply, .. } => Some(reply.body.clone()),
            _ => None,
        })
    }

    fn enqueue(&mut self, spec: TaskSpec, now: u64) -> ReplyBody {
        self.request(
            ClientCommand::Enqueue {
                queue: "default".into(),
                task: spec,
                wait: None,
            },
            now,
        )
        .expect("a reply")
    }

    fn enqueue_id(&mut self, spec: TaskSpec, now: u64) -> String {
        match self.enqueue(spec, now) {
            ReplyBody::Enqueued { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    fn fire(&mut self, now: u64) -> Vec<(u64, DeliveredTask)> {
        self.out.clear();
        self.store.fire_due(now, &mut self.out);
        dispatches(&self.out)
    }

    fn settle(
        &mut self,
        delivery: u64,
        id: &str,
        outcome: Outcome,
        status: Option<u16>,
        now: u64,
    ) -> Vec<(u64, DeliveredTask)> {
        self.out.clear();
        self.store.apply(
            Command::Result(DeliveryResult {
                delivery,
                task_id: id.into(),
                outcome,
                status,
                reason: None,
                retry_after: None,
                responded: status.is_some(),
                body: Some(ByteBuf::from(b"answer".to_vec())),
                no_retry: false,
            }),
            now,
            &mut self.out,
        );
        dispatches(&self.out)
    }

    fn state(&self, id: &str) -> TaskState {
        self.store.info(Uuid::parse_str(id).unwrap(), false).state
    }
}

fn spec(countdown: f64) -> TaskSpec {
    TaskSpec {
        url: "http://localhost/w".into(),
        countdown: Some(countdown),
        ..Default::default()
    }
}

fn named(name: &str) -> TaskSpec {
    TaskSpec {
        name: Some(name.into()),
        ..spec(10.0)
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
    let mut h = Harness::new(QueueConfig::default());
    let id = h.enqueue_id(spec(5.0), T0);
    assert!(h.fire(T0 + 4_999_999).is_empty());
    let d = h.fire(T0 + 5_000_000);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].1.retry_count, 0);
    h.settle(d[0].0, &id, Outcome::Failure, Some(500), T0 + 5_000_000);
    // A duplicate verdict is ignored.
    h.settle(d[0].0, &id, Outcome::Failure, Some(500), T0 + 5_000_000);
    assert_eq!(h.store.stats.stale_results, 1);
    assert!(
        h.fire(T0 + 5_099_999).is_empty(),
        "retry must wait min_backoff"
    );
    let d = h.fire(T0 + 5_100_000);
    assert_eq!((d[0].1.retry_count, d[0].1.execution_count), (1, 1));
}

#[test]
fn resent_request_is_not_enqueued_twice() {
    let mut h = Harness::new(QueueConfig::default());
    let req = |rid: &str| Command::Request {
        identity: vec![],
        request: ClientRequest {
            request_id: rid.into(),
            command: ClientCommand::Enqueue {
                queue: "default".into(),
                task: spec(1.0),
                wait: None,
            },
        },
    };
    let mut out = Vec::new();
    h.store.apply(req("same"), 10, &mut out);
    h.store.apply(req("same"), 20, &mut out);
    assert_eq!(out[0], out[1]);
    assert_eq!(h.store.len(), 1);
    h.store.apply(req("other"), 20, &mut out);
    assert_eq!(h.store.len(), 2);
    h.store.apply(req(""), 20, &mut out);
    assert!(
        matches!(&out[3], Event::Reply { reply, .. } if matches!(reply.body, ReplyBody::Error { code: ErrorCode::BadRequest, .. }))
    );
}

#[test]
fn cancel_revokes_a_running_delivery_and_expires_after_retention() {
    let mut h = Harness::new(QueueConfig {
        retention: 10.0,
        ..Default::default()
    });
    let id = h.enqueue_id(spec(0.0), T0);
    let d = h.fire(T0)[0].0;
    h.request(
        ClientCommand::Cancel {
            queue: "default".into(),
            id: id.clone(),
        },
        T0 + 1,
    );
    assert!(h.out.contains(&Event::Revoke { delivery: d }));
    h.fire(T0 + 9_000_000);
    assert_eq!(h.store.len(), 1);
    h.fire(T0 + 10_000_002);
    assert_eq!(h.store.len(), 0);
}

#[test]
fn exhausted_task_is_kept_as_failed_and_can_be_rerun() {
    let mut h = Harness::new(QueueConfig {
        max_attempts: 2,
        retention: 1.0,
        ..Default::default()
    });
    let id = h.enqueue_id(spec(0.0), T0);
    let mut now = T0;
    for _ in 0..2 {
        let d = h.fire(now)[0].0;
        h.out.clear();
        h.store.apply(
            Command::Lost {
                delivery: d,
                task_id: id.clone(),
                reason: "worker lost".into(),
            },
            now,
            &mut h.out,
        );
        now += 10_000_000;
    }
    assert!(h.fire(now + 100_000_000).is_empty());
    let info = h.store.info(Uuid::parse_str(&id).unwrap(), false);
    assert_eq!(info.state, TaskState::Failed);
    assert_eq!((info.attempts, info.executions), (2, 0));
    assert_eq!(info.last_error.as_deref(), Some("worker lost"));
    let q = h.store.queue_info("default", now);
    assert_eq!(q.stats.failed, 1);
    // `run` re-dispatches a dead letter.
    let reply = h.request(
        ClientCommand::Run {
            queue: "default".into(),
            id: id.clone(),
        },
        now,
    );
    assert!(matches!(reply, Some(ReplyBody::Task { .. })));
    let d = dispatches(&h.out);
    assert_eq!(d[0].1.retry_count, 2);
    h.settle(d[0].0, &id, Outcome::Success, Some(200), now);
    assert_eq!(h.state(&id), TaskState::Succeeded);
}

#[test]
fn rate_limit_spaces_dispatches_and_concurrency_caps_them() {
    let mut h = Harness::new(QueueConfig {
        rate: 10.0,
        burst: 2,
        max_concurrent: 3,
        ..Default::default()
    });
    let ids: Vec<String> = (0..6).map(|_| h.enqueue_id(spec(0.0), T0)).collect();
    // Burst of 2 at once, then one per 100 ms.
    assert_eq!(h.fire(T0).len(), 2);
    assert_eq!(h.fire(T0 + 99_000).len(), 0);
    let third = h.fire(T0 + 100_000);
    assert_eq!(third.len(), 1);
    // Three in flight: the cap holds even though tokens accrue.
    assert_eq!(h.fire(T0 + 1_000_000).len(), 0);
    let q = h.store.queue_info("default", T0 + 1_000_000);
    assert_eq!(q.stats.running, 3);
    assert!(q.stats.lag >= 0.99, "lag {}", q.stats.lag);
    // Settling one frees a slot, which the next ready task takes at once.
    let freed = h.settle(
        third[0].0,
        &third[0].1.id,
        Outcome::Success,
        Some(200),
        T0 + 1_000_000,
    );
    assert_eq!(freed.len(), 1);
    assert!(ids.contains(&freed[0].1.id));
}

#[test]
fn pause_resume_and_purge() {
    let mut h = Harness::new(QueueConfig::default());
    h.request(
        ClientCommand::PauseQueue {
            queue: "default".into(),
        },
        T0,
    );
    let a = h.enqueue_id(named("a"), T0);
    let _b = h.enqueue_id(spec(0.0), T0);
    assert!(
        h.fire(T0 + 20_000_000).is_empty(),
        "a paused queue dispatches nothing"
    );
    h.request(
        ClientCommand::ResumeQueue {
            queue: "default".into(),
        },
        T0 + 20_000_000,
    );
    assert_eq!(dispatches(&h.out).len(), 2);
    let _c = h.enqueue_id(spec(100.0), T0 + 20_000_000);
    let reply = h.request(
        ClientCommand::PurgeQueue {
            queue: "default".into(),
        },
        T0 + 20_000_001,
    );
    assert_eq!(
        reply,
        Some(ReplyBody::Purged {
            queue: "default".into(),
            removed: 3
        })
    );
    assert_eq!(h.store.len(), 0);
    assert!(
        h.out
            .iter()
            .filter(|e| matches!(e, Event::Revoke { .. }))
            .count()
            == 2
    );
    // No tombstone: the name is free again.
    assert!(matches!(
        h.enqueue(named("a"), T0 + 20_000_002),
        ReplyBody::Enqueued { .. }
    ));
    let _ = a;
}

#[test]
fn duplicate_and_tombstoned_names() {
    let mut h = Harness::new(QueueConfig {
        dedup_window: 100.0,
        retention: 10.0,
        ..Default::default()
    });
    let id = h.enqueue_id(named("job-1"), T0);
    assert_eq!(
        h.enqueue(named("job-1"), T0),
        ReplyBody::Duplicate {
            id: id.clone(),
            tombstoned: false
        }
    );
    h.request(
        ClientCommand::Cancel {
            queue: "default".into(),
            id: id.clone(),
        },
        T0 + 1,
    );
    assert_eq!(
        h.enqueue(named("job-1"), T0 + 2),
        ReplyBody::Duplicate {
            id: id.clone(),
            tombstoned: true
        }
    );
    // The task itself is forgotten after retention; its tombstone lasts the dedup window.
    h.fire(T0 + 50_000_000);
    assert_eq!(h.store.len(), 0);
    assert!(matches!(
        h.enqueue(named("job-1"), T0 + 50_000_001),
        ReplyBody::Duplicate {
            tombstoned: true,
            ..
        }
    ));
    h.fire(T0 + 101_000_000);
    assert!(matches!(
        h.enqueue(named("job-1"), T0 + 101_000_001),
        ReplyBody::Enqueued { .. }
    ));
    // Idempotency keys work the same, in their own namespace.
    let k = TaskSpec {
        idempotency_key: Some("k1".into()),
        ..spec(1.0)
    };
    let first = h.enqueue_id(k.clone(), T0 + 102_000_000);
    assert_eq!(
        h.enqueue(k, T0 + 102_000_000),
        ReplyBody::Duplicate {
            id: first,
            tombstoned: false
        }
    );
}

#[test]
fn wait_answers_after_the_first_attempt_or_when_it_runs_out() {
    let mut h = Harness::new(QueueConfig::default());
    let reply = h.request(
        ClientCommand::Enqueue {
            queue: "default".into(),
            task: spec(0.0),
            wait: Some(5.0),
        },
        T0,
    );
    assert!(reply.is_none(), "the reply waits");
    let d = h.fire(T0);
    h.settle(d[0].0, &d[0].1.id, Outcome::Failure, Some(500), T0 + 1000);
    let reply = h.out.iter().find_map(|e| match e {
        Event::Reply { reply, .. } => Some(reply.body.clone()),
        _ => None,
    });
    match reply {
        Some(ReplyBody::Enqueued {
            result: Some(r), ..
        }) => {
            assert_eq!(r.status, Some(500));
            assert_eq!(
                r.body.as_deref().map(|b| b.to_vec()),
                Some(b"answer".to_vec())
            );
        }
        other => panic!("{other:?}"),
    }
    // A wait that runs out answers without a result.
    let reply = h.request(
        ClientCommand::Enqueue {
            queue: "default".into(),
            task: spec(60.0),
            wait: Some(1.0),
        },
        T0,
    );
    assert!(reply.is_none());
    h.out.clear();
    h.store.fire_due(T0 + 1_000_000, &mut h.out);
    let replies: Vec<&ReplyBody> = h
        .out
        .iter()
        .filter_map(|e| match e {
            Event::Reply { reply, .. } => Some(&reply.body),
            _ => None,
        })
        .collect();
    assert!(
        matches!(replies[..], [ReplyBody::Enqueued { result: None, .. }]),
        "{replies:?}"
    );
}

#[test]
fn callbacks_report_success_and_failure() {
    let mut h = Harness::new(QueueConfig {
        max_attempts: 1,
        ..Default::default()
    });
    let ok = TaskSpec {
        callback_url: Some("http://cb/ok".into()),
        ..spec(0.0)
    };
    let bad = TaskSpec {
        failure_callback_url: Some("http://cb/bad".into()),
        ..spec(0.0)
    };
    let ok_id = h.enqueue_id(ok, T0);
    let bad_id = h.enqueue_id(bad, T0);
    let d = h.fire(T0);
    for (delivery, task) in d {
        let outcome = if task.id == ok_id {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        h.settle(
            delivery,
            &task.id,
            outcome,
            Some(if task.id == ok_id { 200 } else { 500 }),
            T0,
        );
    }
    let callbacks = h.fire(T0 + 1);
    assert_eq!(callbacks.len(), 2);
    for (_, cb) in callbacks {
        let report: serde_json::Value =
            serde_json::from_slice(cb.body.as_deref().unwrap()).unwrap();
        if cb.url == "http://cb/ok" {
            assert_eq!(report["task_id"], ok_id.as_str());
            assert_eq!(report["status"], "succeeded");
            assert_eq!(report["response_body"], "answer");
        } else {
            assert_eq!(cb.url, "http://cb/bad");
            assert_eq!(report["task_id"], bad_id.as_str());
            assert_eq!(report["status"], "failed");
            assert_eq!(report["last_status"], 500);
        }
    }
}

#[test]
fn batch_reports_each_task_and_list_pages() {
    let mut h = Harness::new(QueueConfig::default());
    let tasks = vec![
        spec(10.0),
        TaskSpec {
            url: "ftp://x".into(),
            ..Default::default()
        },
        spec(10.0),
    ];
    let Some(ReplyBody::Batch { results }) = h.request(
        ClientCommand::EnqueueBatch {
            queue: "default".into(),
            tasks,
        },
        T0,
    ) else {
        panic!()
    };
    assert!(matches!(results[0], ReplyBody::Enqueued { .. }));
    assert!(matches!(
        results[1],
        ReplyBody::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    assert!(matches!(results[2], ReplyBody::Enqueued { .. }));
    for i in 0..3 {
        h.enqueue_id(spec(10.0), T0 + 1 + i);
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let Some(ReplyBody::Tasks { tasks, next_cursor }) = h.request(
            ClientCommand::ListTasks {
                queue: "default".into(),
                state: Some(TaskState::Scheduled),
                limit: Some(2),
                cursor: cursor.clone(),
                full: false,
                owned: false,
            },
            T0 + 10,
        ) else {
            panic!()
        };
        assert!(tasks.iter().all(|t| t.detail.is_none()));
        seen.extend(tasks.into_iter().map(|t| t.id));
        match next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 5, "pages overlapped");
}

#[test]
fn no_retry_and_max_age() {
    let mut h = Harness::new(QueueConfig::default());
    let id = h.enqueue_id(spec(0.0), T0);
    let d = h.fire(T0);
    h.out.clear();
    h.store.apply(
        Command::Result(DeliveryResult {
            delivery: d[0].0,
            task_id: id.clone(),
            outcome: Outcome::Failure,
            status: Some(400),
            reason: None,
            retry_after: None,
            responded: true,
            body: None,
            no_retry: true,
        }),
        T0,
        &mut h.out,
    );
    assert_eq!(h.state(&id), TaskState::Failed);
    let _ = RetryPolicy::default();
}

/// Two stores standing for two holders of the same tasks, with the events
/// and peer messages between them carried by hand.
fn pair() -> (Store, Store) {
    let mk = |me| {
        // Each node draws its own ids, as random ones would differ.
        let mut s = Store::new(StoreConfig::default(), T0, TaskIds::seeded(me));
        let mut out = Vec::new();
        s.apply(
            Command::Roster {
                me,
                members: vec![1, 2],
                replicas: 2,
            },
            T0,
            &mut out,
        );
        s
    };
    (mk(1), mk(2))
}

fn carry(out: &mut Vec<Event>, to: &mut Store, now: u64) -> Vec<Event> {
    let mut back = Vec::new();
    for e in out.drain(..) {
        match e {
            Event::ToPeer { msg, .. } => to.apply(Command::Peer(msg), now, &mut back),
            Event::Publish(body) => to.apply(Command::PeerEvent(body), now, &mut back),
            _ => {}
        }
    }
    back
}

#[test]
fn replicas_fire_at_their_offsets_and_follow_each_other() {
    let (mut a, mut b) = pair();
    let mut out = Vec::new();
    a.apply(
        Command::Request {
            identity: b"c".to_vec(),
            request: ClientRequest {
                request_id: "r".into(),
                command: ClientCommand::Enqueue {
                    queue: "default".into(),
                    task: spec(10.0),
                    wait: None,
                },
            },
        },
        T0,
        &mut out,
    );
    // Both nodes hold the task: one as replica 0, the other as replica 1.
    let acks = carry(&mut out, &mut b, T0);
    let mut replies = Vec::new();
    for e in acks {
        if let Event::ToPeer { msg, .. } = e {
            a.apply(Command::Peer(msg), T0, &mut replies);
        }
    }
    let enqueued = replies.iter().find_map(|e| match e {
        Event::Reply { reply, .. } => Some(reply.body.clone()),
        _ => None,
    });
    let Some(ReplyBody::Enqueued { id, replicas, .. }) = enqueued else {
        panic!("{replies:?}")
    };
    assert_eq!(replicas, 2);
    let uid = Uuid::parse_str(&id).unwrap();
    let (ia, ib) = (a.tasks[&uid].replica, b.tasks[&uid].replica);
    assert_eq!(ia + ib, 1, "one replica 0 and one replica 1");
    let (first, second) = if ia == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let offset = 5_000_000;
    let eta = T0 + 10_000_000;
    assert_eq!(first.tasks[&uid].fire_at_us, eta);
    assert_eq!(second.tasks[&uid].fire_at_us, eta + offset);
    // Replica 0 fires at the eta and claims the delivery: replica 1 moves
    // its timer past the delivery's deadline (timeout 30 s + grace 10 s).
    let mut out = Vec::new();
    first.fire_due(eta, &mut out);
    let delivery = dispatches(&out)[0].0;
    carry(&mut out, second, eta);
    let deadline = eta + 40_000_000;
    assert_eq!(second.tasks[&uid].fire_at_us, deadline + offset);
    let mut nothing = Vec::new();
    second.fire_due(eta + offset, &mut nothing);
    assert!(
        dispatches(&nothing).is_empty(),
        "replica 1 fired during the delivery"
    );
    // A failure: replica 1 takes the retry's due time, plus its offset.
    first.apply(
        Command::Result(DeliveryResult {
            delivery,
            task_id: id.clone(),
            outcome: Outcome::Failure,
            status: Some(500),
            reason: None,
            retry_after: None,
            responded: true,
            body: None,
            no_retry: false,
        }),
        eta + 1000,
        &mut out,
    );
    carry(&mut out, second, eta + 1000);
    let due = eta + 1000 + 100_000;
    assert_eq!(first.tasks[&uid].fire_at_us, due);
    assert_eq!(second.tasks[&uid].fire_at_us, due + offset);
    assert_eq!(second.tasks[&uid].attempts, 1);
    assert_eq!(second.tasks[&uid].state, TaskState::Retrying);
    // Success: the other replica drops the task (it is final, not re-fired).
    first.fire_due(due, &mut out);
    let delivery = dispatches(&out)[0].0;
    out.clear();
    first.apply(
        Command::Result(DeliveryResult {
            delivery,
            task_id: id.clone(),
            outcome: Outcome::Success,
            status: Some(200),
            reason: None,
            retry_after: None,
            responded: true,
            body: None,
            no_retry: false,
        }),
        due + 1000,
        &mut out,
    );
    carry(&mut out, second, due + 1000);
    assert_eq!(second.tasks[&uid].state, TaskState::Succeeded);
    let mut late = Vec::new();
    second.fire_due(due + 3 * offset, &mut late);
    assert!(dispatches(&late).is_empty(), "a finished task fired again");
}

/// Node 2 stores a copy of task `name` on `s`, holders [1, 2].
fn copy_from_2(s: &mut Store, name: &str, out: &mut Vec<Event>) {
    let rec = replication::new_record(
        Uuid::new_v4(),
        &crate::validate::validate("default", named(name), 1.8e9).unwrap(),
        false,
        T0,
        vec![1, 2],
    );
    s.apply(
        Command::Peer(PeerMessage::Store {
            req: 0,
            from: 2,
            record: rec,
            check: true,
        }),
        T0,
        out,
    );
}

#[test]
fn a_lost_holder_is_replaced() {
    let mut s = Store::new(StoreConfig::default(), T0, TaskIds::seeded(7));
    let mut out = Vec::new();
    s.apply(
        Command::Roster {
            me: 1,
            members: vec![1, 2, 3],
            replicas: 2,
        },
        T0,
        &mut out,
    );
    // Store tasks as holder, with node 2 as the other holder.
    for i in 0..50 {
        copy_from_2(&mut s, &format!("t{i}"), &mut out);
    }
    out.clear();
    // Node 2 leaves: node 1 (first survivor) copies every task to node 3.
    s.apply(
        Command::Roster {
            me: 1,
            members: vec![1, 3],
            replicas: 2,
        },
        T0,
        &mut out,
    );
    let copies = out
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::ToPeer {
                    to: 3,
                    msg: PeerMessage::Store { check: false, .. }
                }
            )
        })
        .count();
    assert_eq!(copies, 50);
    assert_eq!(s.stats.re_replicated, 50);
}

#[test]
fn a_resend_during_replication_is_not_a_second_task() {
    let (mut a, _b) = pair();
    let req = || Command::Request {
        identity: b"c".to_vec(),
        request: ClientRequest {
            request_id: "same".into(),
            command: ClientCommand::Enqueue {
                queue: "default".into(),
                task: spec(10.0),
                wait: None,
            },
        },
    };
    let mut out = Vec::new();
    a.apply(req(), T0, &mut out);
    let stores = out
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::ToPeer {
                    msg: PeerMessage::Store { .. },
                    ..
                }
            )
        })
        .count();
    let mut again = Vec::new();
    a.apply(req(), T0 + 1000, &mut again);
    assert!(
        again.is_empty(),
        "a resend while waiting for holders was acted on: {again:?}"
    );
    assert!(stores <= 1);
    assert!(a.len() <= 1);
}

fn batch_request(id: &str) -> Command {
    Command::Request {
        identity: b"c".to_vec(),
        request: ClientRequest {
            request_id: id.into(),
            command: ClientCommand::EnqueueBatch {
                queue: "default".into(),
                tasks: vec![
                    named("x"),
                    TaskSpec {
                        url: "ftp://nope".into(),
                        ..Default::default()
                    },
                    named("x"),
                    spec(10.0),
                ],
            },
        },
    }
}

fn replies(out: &[Event]) -> Vec<ReplyBody> {
    out.iter()
        .filter_map(|e| match e {
            Event::Reply { reply, .. } => Some(reply.body.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_batch_in_a_cluster_is_answered_when_its_copies_are_stored() {
    let (mut a, mut b) = pair();
    let mut out = Vec::new();
    a.apply(batch_request("b1"), T0, &mut out);
    assert!(
        replies(&out).is_empty(),
        "answered before the copies: {out:?}"
    );
    let mut again = Vec::new();
    a.apply(batch_request("b1"), T0 + 1, &mut again);
    assert!(
        again.is_empty(),
        "a resend while pending was acted on: {again:?}"
    );
    let acks = carry(&mut out, &mut b, T0);
    let mut answered = Vec::new();
    for e in acks {
        if let Event::ToPeer { msg, .. } = e {
            a.apply(Command::Peer(msg), T0, &mut answered);
        }
    }
    let bodies = replies(&answered);
    assert_eq!(bodies.len(), 1, "{answered:?}");
    let ReplyBody::Batch { results } = &bodies[0] else {
        panic!("{bodies:?}")
    };
    assert_eq!(results.len(), 4);
    let ReplyBody::Enqueued {
        id: first,
        replicas: 2,
        ..
    } = &results[0]
    else {
        panic!("{results:?}")
    };
    assert!(matches!(
        &results[1],
        ReplyBody::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    assert!(matches!(&results[2], ReplyBody::Duplicate { id, .. } if id == first));
    assert!(matches!(
        &results[3],
        ReplyBody::Enqueued { replicas: 2, .. }
    ));
    assert_eq!((a.len(), b.len()), (2, 2), "both holders store both tasks");
    // Once answered, a resend gets the same answer and stores nothing.
    let mut again = Vec::new();
    a.apply(batch_request("b1"), T0 + 2, &mut again);
    assert_eq!(replies(&again), bodies);
    assert_eq!(a.len(), 2);
}

#[test]
fn a_batch_whose_holder_is_silent_is_answered_after_the_peer_timeout() {
    let (mut a, _b) = pair();
    let mut out = Vec::new();
    a.apply(batch_request("b2"), T0, &mut out);
    assert!(replies(&out).is_empty());
    out.clear();
    a.fire_due(T0 + PEER_TIMEOUT.as_micros() as u64, &mut out);
    let bodies = replies(&out);
    let [ReplyBody::Batch { results }] = bodies.as_slice() else {
        panic!("{out:?}")
    };
    let stored: Vec<u32> = results
        .iter()
        .filter_map(|r| match r {
            ReplyBody::Enqueued { replicas, .. } => Some(*replicas),
            _ => None,
        })
        .collect();
    assert_eq!(stored, vec![1, 1], "{results:?}");
}

/// A million pending tasks must stay small: this guards the compact layout
/// (`BENCHMARKS.md`, memory per pending task) against a field that grows it.
#[test]
fn task_stays_compact() {
    let size = std::mem::size_of::<Task>();
    eprintln!(
        "size_of::<Task>() = {size}, ValidTask = {}",
        std::mem::size_of::<ValidTask>()
    );
    assert!(size <= 152, "Task grew to {size} bytes");
}

/// A URL seen before skips parsing; any other spelling is still parsed,
/// normalized and checked, and tasks share one copy of each URL.
#[test]
fn known_urls_skip_parsing_but_nothing_else() {
    let mut h = Harness::new(QueueConfig::default());
    let url_of = |h: &Harness, id: &str| {
        let uid = Uuid::parse_str(id).unwrap();
        h.store.tasks[&uid].spec.url.clone()
    };
    let spec = |url: &str| TaskSpec {
        url: url.into(),
        ..Default::default()
    };
    let a = h.enqueue_id(spec("HTTP://Example.COM/a b"), T0);
    let b = h.enqueue_id(spec("http://example.com/a%20b"), T0);
    let c = h.enqueue_id(spec("HTTP://Example.COM/a b"), T0);
    assert_eq!(*url_of(&h, &a), "http://example.com/a%20b");
    assert!(std::sync::Arc::ptr_eq(&url_of(&h, &a), &url_of(&h, &b)));
    assert!(std::sync::Arc::ptr_eq(&url_of(&h, &a), &url_of(&h, &c)));
    // Queue names are not URLs, even when a queue is named like one.
    for bad in ["default", "ftp://example.com/", "zmq://a/b", ""] {
        assert!(
            matches!(h.enqueue(spec(bad), T0), ReplyBody::Error { .. }),
            "{bad:?} was accepted"
        );
    }
}

fn enqueue_request(request_id: &str, command: ClientCommand) -> Command {
    Command::Request {
        identity: b"c".to_vec(),
        request: ClientRequest {
            request_id: request_id.into(),
            command,
        },
    }
}

fn one(queue: &str) -> ClientCommand {
    ClientCommand::Enqueue {
        queue: queue.into(),
        task: spec(10.0),
        wait: None,
    }
}

/// A producer (or the gateway) resends an enqueue to the other holder
/// after the first coordinator stored the task and died before
/// answering: the answer names the first task, and no second one exists.
#[test]
fn a_resend_to_the_other_holder_gets_the_first_task() {
    let (mut a, mut b) = pair();
    let mut out = Vec::new();
    a.apply(enqueue_request("r", one("default")), T0, &mut out);
    let batch = ClientCommand::EnqueueBatch {
        queue: "default".into(),
        tasks: vec![spec(10.0), spec(20.0)],
    };
    a.apply(enqueue_request("rb", batch.clone()), T0, &mut out);
    // The copies reach b; a dies before its answers leave.
    carry(&mut out, &mut b, T0);
    let first: Vec<Uuid> = b.tasks.iter().map(|(id, _)| id).collect();
    assert_eq!(first.len(), 3);
    let mut out = Vec::new();
    b.apply(enqueue_request("r", one("default")), T0 + 1000, &mut out);
    b.apply(enqueue_request("rb", batch), T0 + 1000, &mut out);
    let got = replies(&out);
    let Some(ReplyBody::Enqueued { id, .. }) = got.first() else {
        panic!("{got:?}")
    };
    assert!(first.contains(&Uuid::parse_str(id).unwrap()));
    let Some(ReplyBody::Batch { results }) = got.get(1) else {
        panic!("{got:?}")
    };
    for r in results {
        let ReplyBody::Enqueued { id, .. } = r else {
            panic!("{r:?}")
        };
        assert!(first.contains(&Uuid::parse_str(id).unwrap()), "{id}");
    }
    assert_eq!(b.len(), 3, "the resends made no task");
}

/// The resend reaches a node that is no holder: it asks the holders, the
/// one that has the task says so, and the answer names it.
#[test]
fn a_resend_to_a_node_that_holds_nothing_finds_the_task_on_the_holders() {
    let mk = |me| {
        let mut s = Store::new(StoreConfig::default(), T0, TaskIds::seeded(me));
        let roster = Command::Roster {
            me,
            members: vec![1, 2, 3],
            replicas: 2,
        };
        s.apply(roster, T0, &mut Vec::new());
        s
    };
    let (mut n1, mut n2, mut n3) = (mk(1), mk(2), mk(3));
    // A request id whose task nodes 1 and 2 hold.
    let rid = (0..)
        .map(|i| format!("r{i}"))
        .find(|r| {
            let h = crate::placement::place(r, &[1, 2, 3], 2);
            h.contains(&1) && h.contains(&2)
        })
        .unwrap();
    let mut out = Vec::new();
    n1.apply(enqueue_request(&rid, one("default")), T0, &mut out);
    carry(&mut out, &mut n2, T0);
    assert_eq!((n1.len(), n2.len()), (1, 1));
    // Node 1 dies unanswered; the resend goes to node 3.
    let mut out = Vec::new();
    n3.apply(enqueue_request(&rid, one("default")), T0 + 1000, &mut out);
    let to_2: Vec<Event> = out
        .drain(..)
        .filter(|e| matches!(e, Event::ToPeer { to: 2, .. }))
        .collect();
    assert!(!to_2.is_empty(), "node 3 asks node 2");
    let mut back = to_2;
    let answers = carry(&mut back, &mut n2, T0 + 1000);
    let mut out = Vec::new();
    for e in answers {
        if let Event::ToPeer { msg, .. } = e {
            n3.apply(Command::Peer(msg), T0 + 2000, &mut out);
        }
    }
    // Node 1 never answers: the answer comes when the peers' time is up.
    n3.fire_due(T0 + 1000 + PEER_TIMEOUT.as_micros() as u64, &mut out);
    let got = replies(&out);
    let Some(ReplyBody::Enqueued { id, replicas, .. }) = got.first() else {
        panic!("{got:?}")
    };
    let first: Vec<Uuid> = n2.tasks.iter().map(|(id, _)| id).collect();
    assert_eq!(first, vec![Uuid::parse_str(id).unwrap()]);
    assert_eq!(*replicas, 1);
    assert_eq!((n2.len(), n3.len()), (1, 0), "no second task anywhere");
}

/// Two coordinators of one request (the resend crossed the first store)
/// whose copies reached the two holders in opposite orders: each holder
/// answers one coordinator `resent` with the other's task. Both must
/// settle on the same task, and it must survive.
#[test]
fn crossed_resends_keep_one_task_and_not_none() {
    let members = vec![1, 2, 3, 4];
    let mk = |me: u64| {
        let mut s = Store::new(StoreConfig::default(), T0, TaskIds::seeded(me));
        let roster = Command::Roster {
            me,
            members: members.clone(),
            replicas: 2,
        };
        s.apply(roster, T0, &mut Vec::new());
        s
    };
    let mut nodes: BTreeMap<u64, Store> = (1..=4).map(|id| (id, mk(id))).collect();
    // A request whose holders are 3 and 4; nodes 1 and 2 coordinate.
    let rid = (0..)
        .map(|i| format!("x{i}"))
        .find(|r| {
            let h = crate::placement::place(r, &members, 2);
            h.contains(&3) && h.contains(&4)
        })
        .unwrap();
    let mut from_a = Vec::new();
    let mut from_b = Vec::new();
    nodes
        .get_mut(&1)
        .unwrap()
        .apply(enqueue_request(&rid, one("default")), T0, &mut from_a);
    nodes
        .get_mut(&2)
        .unwrap()
        .apply(enqueue_request(&rid, one("default")), T0, &mut from_b);
    let peer = |events: &mut Vec<Event>, to: u64| -> Vec<PeerMessage> {
        let mut taken = Vec::new();
        events.retain(|e| match e {
            Event::ToPeer { to: t, msg } if *t == to => {
                taken.push(msg.clone());
                false
            }
            _ => true,
        });
        taken
    };
    // Node 3 hears A first, node 4 hears B first.
    let mut back: Vec<(u64, Event)> = Vec::new();
    let to_3: Vec<PeerMessage> = peer(&mut from_a, 3)
        .into_iter()
        .chain(peer(&mut from_b, 3))
        .collect();
    let to_4: Vec<PeerMessage> = peer(&mut from_b, 4)
        .into_iter()
        .chain(peer(&mut from_a, 4))
        .collect();
    for (holder, msgs) in [(3, to_3), (4, to_4)] {
        for msg in msgs {
            let mut out = Vec::new();
            nodes
                .get_mut(&holder)
                .unwrap()
                .apply(Command::Peer(msg), T0 + 10, &mut out);
            back.extend(out.into_iter().map(|e| (holder, e)));
        }
    }
    // The holders' answers go back to the coordinators, which decide and
    // send their discards; those reach the holders.
    let mut replies = Vec::new();
    let mut discards = Vec::new();
    for (_, e) in back {
        if let Event::ToPeer { to, msg } = e {
            let mut out = Vec::new();
            nodes
                .get_mut(&to)
                .unwrap()
                .apply(Command::Peer(msg), T0 + 20, &mut out);
            for e in out {
                match e {
                    Event::Reply { reply, .. } => replies.push(reply.body),
                    Event::ToPeer { to, msg } => discards.push((to, msg)),
                    _ => {}
                }
            }
        }
    }
    for (to, msg) in discards {
        nodes
            .get_mut(&to)
            .unwrap()
            .apply(Command::Peer(msg), T0 + 30, &mut Vec::new());
    }
    let ids: Vec<String> = replies
        .iter()
        .map(|r| match r {
            ReplyBody::Enqueued { id, .. } => id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 2, "{replies:?}");
    assert_eq!(ids[0], ids[1], "the coordinators answered different tasks");
    let kept = Uuid::parse_str(&ids[0]).unwrap();
    let holding: Vec<u64> = nodes
        .iter()
        .filter(|(_, s)| s.task_state(&kept).is_some())
        .map(|(id, _)| *id)
        .collect();
    assert!(!holding.is_empty(), "the answered task is held nowhere");
    let all: usize = nodes.values().map(|s| s.len()).sum();
    assert_eq!(all, holding.len(), "another task of the request is left");
}

#[test]
fn past_a_limit_enqueues_are_busy_and_nothing_is_dropped() {
    let mut h = Harness::new(QueueConfig::default());
    h.store.config.limits = StoreLimits {
        max_task_bytes: u64::MAX,
        max_tasks: 2,
        max_queues: 2,
    };
    let spec = |url: &str| TaskSpec {
        url: url.into(),
        countdown: Some(10.0),
        ..Default::default()
    };
    h.enqueue_id(spec("http://a/"), T0);
    h.enqueue_id(spec("http://a/"), T0);
    let busy = h.enqueue(spec("http://a/"), T0);
    assert!(
        matches!(&busy, ReplyBody::Error { code: ErrorCode::Busy, reason } if reason.contains("--max-tasks")),
        "{busy:?}"
    );
    assert_eq!(h.store.len(), 2);
    // The memory budget: what the tasks hold is counted, and freed.
    h.store.config.limits.max_tasks = 100;
    let held = h.store.task_bytes();
    assert!(held >= 2 * TASK_OVERHEAD_BYTES, "{held}");
    h.store.config.limits.max_task_bytes = held;
    let busy = h.enqueue(spec("http://a/"), T0);
    assert!(
        matches!(&busy, ReplyBody::Error { code: ErrorCode::Busy, reason } if reason.contains("--max-pending-bytes"))
    );
    let purged = h.request(
        ClientCommand::PurgeQueue {
            queue: "default".into(),
        },
        T0,
    );
    assert!(
        matches!(purged, Some(ReplyBody::Purged { removed: 2, .. })),
        "{purged:?}"
    );
    assert_eq!(h.store.task_bytes(), 0);
    h.enqueue_id(spec("http://a/"), T0);
}

#[test]
fn queues_are_made_by_success_only_and_forgotten_when_empty() {
    let mut h = Harness::new(QueueConfig::default());
    let bad = h.request(
        ClientCommand::Enqueue {
            queue: "fresh".into(),
            task: TaskSpec {
                url: "nope".into(),
                ..Default::default()
            },
            wait: None,
        },
        T0,
    );
    assert!(matches!(
        bad,
        Some(ReplyBody::Error {
            code: ErrorCode::BadRequest,
            ..
        })
    ));
    assert_eq!(h.store.queue_count(), 0);
    let id = h.enqueue_id(
        TaskSpec {
            url: "http://a/".into(),
            ..Default::default()
        },
        T0,
    );
    assert_eq!(h.store.queue_count(), 1);
    let cancelled = h.request(
        ClientCommand::Cancel {
            queue: "default".into(),
            id,
        },
        T0,
    );
    assert!(
        matches!(cancelled, Some(ReplyBody::Cancelled { .. })),
        "{cancelled:?}"
    );
    // Kept while the cancelled task is retained, then forgotten.
    let later = T0 + 4 * 3600 * 1_000_000;
    h.fire(later);
    h.fire(later + QUEUE_SWEEP_EVERY_US);
    assert_eq!(h.store.len(), 0);
    assert_eq!(h.store.queue_count(), 0);
}

/// A store of a three-node cluster (1, 2, 3) at replication factor 2.
fn trio_member(me: u64) -> Store {
    let mut s = Store::new(StoreConfig::default(), T0, TaskIds::seeded(me));
    let mut out = Vec::new();
    s.apply(
        Command::Roster {
            me,
            members: vec![1, 2, 3],
            replicas: 2,
        },
        T0,
        &mut out,
    );
    s
}

/// A task name whose holders over [1, 2, 3] are [1, 2].
fn name_held_by_1_and_2() -> String {
    (0..)
        .map(|i| format!("h{i}"))
        .find(|n| crate::placement::place(n, &[1, 2, 3], 2) == vec![1, 2])
        .unwrap()
}

fn named_request(request_id: &str, name: &str) -> Command {
    enqueue_request(
        request_id,
        ClientCommand::Enqueue {
            queue: "default".into(),
            task: named(name),
            wait: None,
        },
    )
}

/// Peer messages in `out` for node `to`.
fn to_peer(out: &[Event], to: u64) -> Vec<PeerMessage> {
    out.iter()
        .filter_map(|e| match e {
            Event::ToPeer { to: t, msg } if *t == to => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_silent_holder_is_passed_over_and_the_copy_handed_to_the_next_member() {
    let name = name_held_by_1_and_2();
    let (mut one, mut three) = (trio_member(1), trio_member(3));
    let mut out = Vec::new();
    one.apply(named_request("r1", &name), T0, &mut out);
    assert_eq!(to_peer(&out, 2).len(), 1, "the store for holder 2");
    assert!(replies(&out).is_empty());
    // Holder 2 never answers. Nothing changes before HANDOFF_AFTER…
    out.clear();
    let handoff = HANDOFF_AFTER.as_micros() as u64;
    one.fire_due(T0 + handoff - 1, &mut out);
    assert!(out.is_empty(), "{out:?}");
    // …then node 3, next in the placement order, gets the copy.
    one.fire_due(T0 + handoff, &mut out);
    assert!(to_peer(&out, 2).is_empty(), "{out:?}");
    let to_three = to_peer(&out, 3);
    assert!(
        matches!(to_three.as_slice(), [PeerMessage::Store { record, check: true, .. }] if record.holders == vec![1, 3]),
        "{to_three:?}"
    );
    // Node 3 stores it and answers: the enqueue is answered with two
    // copies, well before the peer timeout.
    let mut back = Vec::new();
    for msg in to_three {
        three.apply(Command::Peer(msg), T0 + handoff, &mut back);
    }
    out.clear();
    for e in back {
        if let Event::ToPeer { msg, .. } = e {
            one.apply(Command::Peer(msg), T0 + handoff, &mut out);
        }
    }
    let bodies = replies(&out);
    assert!(
        matches!(bodies.as_slice(), [ReplyBody::Enqueued { replicas: 2, .. }]),
        "{bodies:?}"
    );
    // Node 2 gets a discard once node 3 holds the copy (it may only have
    // been slow, and must not keep a copy outside the list).
    assert!(matches!(
        to_peer(&out, 2).as_slice(),
        [PeerMessage::Discard { .. }]
    ));
    let ReplyBody::Enqueued { id, .. } = &bodies[0] else {
        unreachable!()
    };
    let id = Uuid::parse_str(id).unwrap();
    for (node, s) in [(1, &one), (3, &three)] {
        let d = s.describe_task(&id).unwrap();
        assert!(d.contains("holders [1, 3]"), "node {node}: {d}");
    }
    assert_eq!(one.stats.handed_off, 1);
    // A late answer of node 2 counts for nothing.
    one.apply(
        Command::Peer(PeerMessage::StoreResult {
            req: 1,
            from: 2,
            outcome: StoreOutcome::Stored,
        }),
        T0 + handoff + 1,
        &mut out,
    );
}

#[test]
fn a_suspected_member_is_passed_over_at_once() {
    let name = name_held_by_1_and_2();
    let (mut one, mut three) = (trio_member(1), trio_member(3));
    let mut out = Vec::new();
    one.apply(Command::Suspects(vec![2]), T0, &mut out);
    one.apply(named_request("r2", &name), T0, &mut out);
    assert!(to_peer(&out, 2).is_empty(), "{out:?}");
    let to_three = to_peer(&out, 3);
    assert_eq!(to_three.len(), 1);
    let mut back = Vec::new();
    for msg in to_three {
        three.apply(Command::Peer(msg), T0 + 10, &mut back);
    }
    out.clear();
    for e in back {
        if let Event::ToPeer { msg, .. } = e {
            one.apply(Command::Peer(msg), T0 + 10, &mut out);
        }
    }
    assert!(matches!(
        replies(&out).as_slice(),
        [ReplyBody::Enqueued { replicas: 2, .. }]
    ));
}

#[test]
fn a_handoff_nobody_answers_gives_the_place_back_and_discards_nothing() {
    let name = name_held_by_1_and_2();
    let mut one = trio_member(1);
    let mut out = Vec::new();
    one.apply(named_request("r4", &name), T0, &mut out);
    one.fire_due(T0 + HANDOFF_AFTER.as_micros() as u64, &mut out);
    assert_eq!(to_peer(&out, 3).len(), 1, "the copy handed to node 3");
    // Neither node 2 nor node 3 answers: node 2 may hold the copy (its
    // answer may be what was lost), so it keeps its place and is not told
    // to discard it.
    out.clear();
    one.fire_due(T0 + PEER_TIMEOUT.as_micros() as u64, &mut out);
    assert!(
        !out.iter().any(|e| matches!(
            e,
            Event::ToPeer {
                msg: PeerMessage::Discard { .. },
                ..
            }
        )),
        "{out:?}"
    );
    let bodies = replies(&out);
    let [ReplyBody::Enqueued {
        id, replicas: 1, ..
    }] = bodies.as_slice()
    else {
        panic!("{bodies:?}")
    };
    let d = one.describe_task(&Uuid::parse_str(id).unwrap()).unwrap();
    assert!(d.contains("holders [1, 2]"), "{d}");
}

#[test]
fn a_re_replication_copy_is_sent_again_until_answered() {
    let mut s = trio_member(1);
    let mut out = Vec::new();
    copy_from_2(&mut s, "copy-me", &mut out);
    out.clear();
    // Node 2 leaves: node 3 gets a copy, which asks for an answer.
    s.apply(
        Command::Roster {
            me: 1,
            members: vec![1, 3],
            replicas: 2,
        },
        T0,
        &mut out,
    );
    let req_of = |out: &[Event]| -> Vec<u64> {
        to_peer(out, 3)
            .into_iter()
            .filter_map(|m| match m {
                PeerMessage::Store {
                    req, check: false, ..
                } => Some(req),
                _ => None,
            })
            .collect()
    };
    let first = req_of(&out);
    assert_eq!(first.len(), 1);
    assert_ne!(first[0], 0, "a copy that asks for no answer");
    // The copy is lost: it goes again after the peer timeout, and again,
    // COPY_SENDS times in all.
    let mut sends = 1;
    let mut t = T0;
    for _ in 0..5 {
        out.clear();
        t += PEER_TIMEOUT.as_micros() as u64;
        s.fire_due(t, &mut out);
        sends += req_of(&out).len();
    }
    assert_eq!(sends as u32, replication::COPY_SENDS);
    assert_eq!(s.stats.re_replicated, u64::from(replication::COPY_SENDS));
    // Node 3 leaves and comes back as node 4: its copy is answered, and
    // not sent again.
    out.clear();
    s.apply(
        Command::Roster {
            me: 1,
            members: vec![1, 4],
            replicas: 2,
        },
        t,
        &mut out,
    );
    let copy = to_peer(&out, 4)
        .into_iter()
        .find_map(|m| match m {
            PeerMessage::Store { req, .. } => Some(req),
            _ => None,
        })
        .expect("a copy for node 4");
    s.apply(
        Command::Peer(PeerMessage::StoreResult {
            req: copy,
            from: 4,
            outcome: StoreOutcome::Stored,
        }),
        t,
        &mut out,
    );
    out.clear();
    s.fire_due(t + 10 * PEER_TIMEOUT.as_micros() as u64, &mut out);
    assert!(to_peer(&out, 4).is_empty(), "{out:?}");
}

#[test]
fn a_holder_added_by_a_handoff_hears_of_a_delivery_already_under_way() {
    // Holders [2, 3]; node 1 coordinates; node 3 is dead.
    let name = (0..)
        .map(|i| format!("u{i}"))
        .find(|n| crate::placement::place(n, &[1, 2, 3], 2) == vec![2, 3])
        .unwrap();
    let (mut one, mut two) = (trio_member(1), trio_member(2));
    let mut out = Vec::new();
    let due_now = TaskSpec {
        name: Some(name),
        ..spec(0.0)
    };
    one.apply(
        enqueue_request(
            "r5",
            ClientCommand::Enqueue {
                queue: "default".into(),
                task: due_now,
                wait: None,
            },
        ),
        T0,
        &mut out,
    );
    // Node 2 stores the copy, answers, and delivers it at once (due now).
    let mut at_two = Vec::new();
    for msg in to_peer(&out, 2) {
        two.apply(Command::Peer(msg), T0 + 1, &mut at_two);
    }
    two.fire_due(T0 + 2, &mut at_two);
    assert_eq!(dispatches(&at_two).len(), 1, "node 2 delivers it");
    out.clear();
    for e in at_two.drain(..) {
        if let Event::ToPeer { msg, .. } = e {
            one.apply(Command::Peer(msg), T0 + 3, &mut out);
        }
    }
    // Node 3 is silent: at the handoff node 1 takes its place itself, and
    // the enqueue is decided with two copies.
    out.clear();
    let handoff = T0 + HANDOFF_AFTER.as_micros() as u64;
    one.fire_due(handoff, &mut out);
    assert!(matches!(
        replies(&out).as_slice(),
        [ReplyBody::Enqueued { replicas: 2, .. }]
    ));
    // Node 2 learns the new holder list and says again that the delivery
    // is under way, so node 1's copy waits past its deadline instead of
    // firing at its offset.
    let mut again = Vec::new();
    for msg in to_peer(&out, 2) {
        two.apply(Command::Peer(msg), handoff + 1, &mut again);
    }
    let claimed: Vec<EventBody> = again
        .iter()
        .filter_map(|e| match e {
            Event::Publish(b @ EventBody::Claimed { .. }) => Some(b.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(claimed.len(), 1, "{again:?}");
    let mut ignore = Vec::new();
    for b in claimed {
        one.apply(Command::PeerEvent(b), handoff + 2, &mut ignore);
    }
    let offset = StoreConfig::default().replica_offset.as_micros() as u64;
    one.fire_due(T0 + offset + 1, &mut ignore);
    assert!(
        dispatches(&ignore).is_empty(),
        "node 1 fired its copy while node 2 delivers: {ignore:?}"
    );
}
