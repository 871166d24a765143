//! The ZeroMQ interface: producers, pulling workers (including one killed
//! mid-task and a broker restart), and malformed frames.

use std::time::{Duration, Instant};

use client::{Producer, Worker};
use protocol::{
    ClientCommand, ClientReply, ClientRequest, ReplyBody, TaskInfo, TaskSpec, TaskState,
};

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(60);

fn zmq_task(pool: &str, params: &[(&str, &str)]) -> TaskSpec {
    TaskSpec {
        url: format!("zmq://{pool}"),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn producer_enqueues_inspects_and_cancels_over_zmq() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let mut p = Producer::connect(&node.client_endpoint()).unwrap();
        assert_eq!(p.ping().unwrap(), format!("node-{}", node.base));
        let spec = TaskSpec {
            url: rx.url("/from-zmq"),
            params: vec![("k".into(), "v".into())],
            name: Some("zmq-named".into()),
            ..Default::default()
        };
        let (id, _) = p.enqueue("zq", spec).unwrap();
        let seen = rx.expect(Duration::from_secs(10));
        assert_eq!(seen.header("x-task-id"), id);
        assert_eq!(seen.header("x-task-queue"), "zq");
        assert_eq!(seen.header("x-task-name"), "zmq-named");
        assert_eq!(&seen.body[..], b"k=v");

        let (later, _) = p
            .enqueue(
                "zq",
                TaskSpec {
                    url: rx.url("/later"),
                    countdown: Some(60.0),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(p.get("zq", &later).unwrap().state, TaskState::Scheduled);
        p.cancel("zq", &later).unwrap();
        assert_eq!(p.get("zq", &later).unwrap().state, TaskState::Cancelled);
        assert!(p.get("other", &later).unwrap_err().is_not_found());
        let bad = p.enqueue(
            "zq",
            TaskSpec {
                url: "ftp://x".into(),
                ..Default::default()
            },
        );
        assert!(matches!(
            bad,
            Err(client::ClientError::Rejected {
                code: protocol::ErrorCode::BadRequest,
                ..
            })
        ));
    });
}

#[test]
fn resent_request_is_acted_on_once() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(10_000).unwrap();
        s.connect(&node.client_endpoint()).unwrap();
        let req = ClientRequest {
            request_id: "resend-1".into(),
            command: ClientCommand::Enqueue {
                queue: "default".into(),
                task: TaskSpec {
                    url: "http://127.0.0.1:9/".into(),
                    countdown: Some(600.0),
                    ..Default::default()
                },
                wait: None,
            },
        };
        let frames = protocol::encode(&req);
        let mut ids = Vec::new();
        for _ in 0..2 {
            s.send_multipart(&frames, 0).unwrap();
            let reply: ClientReply = protocol::decode(&s.recv_multipart(0).unwrap()).unwrap();
            assert_eq!(reply.request_id, "resend-1");
            match reply.body {
                ReplyBody::Enqueued { id, .. } => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(ids[0], ids[1], "the resent enqueue created a second task");
    });
}

#[test]
fn pull_worker_killed_mid_task_hands_it_to_another() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let we = node.worker_endpoint();
        let (a, a_out) =
            h.spawn_piped(&["worker", "--broker", &we, "--pool", "jobs", "--hold", "60"]);
        let mut p = Producer::connect(&node.client_endpoint()).unwrap();
        let (id, _) = p
            .enqueue("default", zmq_task("jobs", &[("n", "1")]))
            .unwrap();
        let line = a_out
            .recv_timeout(Duration::from_secs(10))
            .expect("worker A got nothing");
        let got: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(got["id"], id.as_str());
        assert_eq!(got["params"][0], serde_json::json!(["n", "1"]));
        assert_eq!(got["retry_count"], 0);
        assert_eq!(p.get("default", &id).unwrap().state, TaskState::Running);
        let (_b, b_out) = h.spawn_piped(&["worker", "--broker", &we, "--pool", "jobs"]);
        h.kill(a);
        // The broker notices A's silence (5 s) and retries on B.
        let line = b_out
            .recv_timeout(Duration::from_secs(20))
            .expect("worker B got nothing");
        let got: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(got["id"], id.as_str());
        assert_eq!(got["retry_count"], 1);
        let t = reach(&mut p, "default", &id, TaskState::Succeeded, "the retry");
        assert_eq!(t.attempts, 2);
        assert!(t.last_error.is_none());
    });
}

/// Polls the task until it is in `state` (10 s at most); `what` names the
/// wait in the failure.
fn reach(p: &mut Producer, queue: &str, id: &str, state: TaskState, what: &str) -> TaskInfo {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = p.get(queue, id).unwrap();
        if t.state == state {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {id} stuck in {:?}",
            t.state
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_reregister_after_a_broker_restart() {
    run(LIMIT, |h| {
        let base = free_base();
        let pid = h.broker(base);
        let client = format!("tcp://127.0.0.1:{base}");
        let mut p = Producer::connect(&client).unwrap();
        p.attempt_timeout = Duration::from_secs(5);
        p.ping().unwrap();
        let mut w =
            Worker::connect(&format!("tcp://127.0.0.1:{}", base + 1), &["restart"], 4).unwrap();
        p.enqueue("default", zmq_task("restart", &[])).unwrap();
        let job = w
            .next(Duration::from_secs(10))
            .unwrap()
            .expect("first task");
        w.report(&job, protocol::Outcome::Success, None).unwrap();
        // Recorded as done before the kill (the restarted broker recovers
        // its data directory and would deliver it again otherwise).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while p.get("default", &job.task.id).unwrap().state != protocol::TaskState::Succeeded {
            assert!(
                std::time::Instant::now() < deadline,
                "never recorded as succeeded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        h.kill(pid);
        h.broker(base);
        p.ping().unwrap();
        let (id, _) = p.enqueue("default", zmq_task("restart", &[])).unwrap();
        // The worker's next heartbeat meets an unknown-worker DISCONNECT
        // (or its silence timer fires) and it registers again.
        let job = w
            .next(Duration::from_secs(15))
            .unwrap()
            .expect("task after restart");
        assert_eq!(job.task.id, id);
        assert!(w.reconnects >= 1);
        w.report(&job, protocol::Outcome::Success, None).unwrap();
    });
}

#[test]
fn burst_of_malformed_frames_leaves_the_broker_serving() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let ctx = zmq::Context::new();
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let client = ctx.socket(zmq::DEALER).unwrap();
        client.set_linger(0).unwrap();
        client.connect(&node.client_endpoint()).unwrap();
        let worker = ctx.socket(zmq::DEALER).unwrap();
        worker.set_linger(0).unwrap();
        worker.connect(&node.worker_endpoint()).unwrap();
        let header = protocol::frames::header().to_vec();
        let mut sent = 0;
        for i in 0..2000u64 {
            let junk: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            let frames: Vec<Vec<u8>> = match i % 6 {
                0 => vec![junk],
                1 => vec![vec![], header.clone(), junk],
                2 => vec![vec![], b"MYM\x09".to_vec(), junk],
                3 => vec![vec![], header.clone(), junk.clone(), junk],
                4 => vec![vec![], vec![], vec![], vec![], vec![]],
                _ => vec![b"x".to_vec(), header.clone(), rmp_like_map()],
            };
            let s = if i % 2 == 0 { &client } else { &worker };
            s.send_multipart(&frames, 0).unwrap();
            sent += 1;
        }
        // Every client-port message gets an error reply.
        client.set_rcvtimeo(10_000).unwrap();
        for _ in 0..(sent / 2) {
            let parts = client.recv_multipart(0).expect("error reply");
            let reply: ClientReply = protocol::decode(&parts).unwrap();
            assert!(matches!(reply.body, ReplyBody::Error { .. }), "{reply:?}");
        }
        // Still serving: enqueue over HTTP and over ZeroMQ, deliver to a worker.
        let rx = Receiver::start();
        let (status, _) = post_form(&node.url("/queue"), &format!("task.url={}", rx.url("/ok")));
        assert_eq!(status, 200);
        rx.expect(Duration::from_secs(10));
        let mut p = Producer::connect(&node.client_endpoint()).unwrap();
        let mut w = Worker::connect(&node.worker_endpoint(), &["after-junk"], 1).unwrap();
        let (id, _) = p.enqueue("default", zmq_task("after-junk", &[])).unwrap();
        let job = w.next(Duration::from_secs(10)).unwrap().expect("task");
        assert_eq!(job.task.id, id);
    });
}

/// A well-formed MessagePack map that is not a valid message.
fn rmp_like_map() -> Vec<u8> {
    // {"type": "enqueue"} without its fields.
    let mut v = vec![0x81, 0xa4];
    v.extend_from_slice(b"type");
    v.push(0xa7);
    v.extend_from_slice(b"enqueue");
    v
}

/// The next message from the broker other than a heartbeat.
fn next_from_broker(s: &zmq::Socket) -> protocol::BrokerMessage {
    loop {
        let parts = s.recv_multipart(0).expect("a message from the broker");
        let msg: protocol::BrokerMessage = protocol::decode(&parts).unwrap();
        if msg != protocol::BrokerMessage::Heartbeat {
            return msg;
        }
    }
}

fn send_worker(s: &zmq::Socket, msg: &protocol::WorkerMessage) {
    s.send_multipart(protocol::encode(msg), 0).unwrap();
}

/// Enqueues `n` tasks for pool `pool` in queue `queue` and waits until all
/// of them wait in the pool (due, `running`, no worker yet); their ids.
fn enqueue_waiting(p: &mut Producer, queue: &str, pool: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n)
        .map(|i| {
            let n = i.to_string();
            p.enqueue(queue, zmq_task(pool, &[("n", &n)])).unwrap().0
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ids
        .iter()
        .all(|id| p.get(queue, id).unwrap().state == TaskState::Running)
    {
        assert!(Instant::now() < deadline, "tasks never became due");
        std::thread::sleep(Duration::from_millis(20));
    }
    ids
}

#[test]
fn a_batching_worker_gets_tasks_and_answers_several_at_once() {
    use protocol::{BrokerMessage, DeliveryResult, Outcome, WorkerMessage};
    run(LIMIT, |h| {
        let node = h.standalone();
        let mut p = Producer::connect(&node.client_endpoint()).unwrap();
        // With no worker yet, all of them wait in the pool, running.
        let ids = enqueue_waiting(&mut p, "batched", "batch", 20);
        let ctx = zmq::Context::new();
        let w = ctx.socket(zmq::DEALER).unwrap();
        w.set_linger(0).unwrap();
        w.set_rcvtimeo(10_000).unwrap();
        w.connect(&node.worker_endpoint()).unwrap();
        send_worker(
            &w,
            &WorkerMessage::Ready {
                pools: vec!["batch".into()],
                credit: 15,
                name: Some("raw-batcher".into()),
                batch: true,
            },
        );
        // The whole credit's worth arrives as one `tasks` message.
        let BrokerMessage::Tasks { tasks: first } = next_from_broker(&w) else {
            panic!("expected a tasks message");
        };
        assert_eq!(first.len(), 15);
        let result = |d: &protocol::Dispatched, outcome| DeliveryResult {
            delivery: d.delivery,
            task_id: d.task.id.clone(),
            outcome,
            status: None,
            reason: Some("no".into()),
            retry_after: None,
            responded: true,
            body: None,
            no_retry: true,
        };
        // One failure (not to be retried) among fourteen successes, in one
        // message: the five left are then sent together.
        let mut results: Vec<DeliveryResult> =
            first.iter().map(|d| result(d, Outcome::Success)).collect();
        results[3].outcome = Outcome::Failure;
        let failed = first[3].task.id.clone();
        send_worker(&w, &WorkerMessage::Results { results });
        let BrokerMessage::Tasks { tasks: rest } = next_from_broker(&w) else {
            panic!("expected a tasks message");
        };
        assert_eq!(rest.len(), 5);
        let mut seen: Vec<String> = first
            .iter()
            .chain(&rest)
            .map(|d| d.task.id.clone())
            .collect();
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want);
        // A malformed `results` is refused whole, even its valid first
        // entry, and the worker stays registered: that delivery is still
        // out, and the last five results settle their tasks.
        let mut junk = protocol::encode(&result(&rest[0], Outcome::Success));
        junk[2] = {
            let mut v = vec![0x82, 0xa4];
            v.extend_from_slice(b"type");
            v.push(0xa7);
            v.extend_from_slice(b"results");
            v.push(0xa7);
            v.extend_from_slice(b"results");
            v.push(0x92);
            v.extend_from_slice(&junk[2]);
            // {"delivery": "x"}: a wrongly typed second entry.
            v.extend_from_slice(&[0x81, 0xa8]);
            v.extend_from_slice(b"delivery");
            v.extend_from_slice(&[0xa1, b'x']);
            v
        };
        w.send_multipart(junk, 0).unwrap();
        assert!(matches!(
            next_from_broker(&w),
            BrokerMessage::Error {
                code: protocol::ErrorCode::Malformed,
                ..
            }
        ));
        assert_eq!(
            p.get("batched", &rest[0].task.id).unwrap().state,
            TaskState::Running
        );
        let results = rest.iter().map(|d| result(d, Outcome::Success)).collect();
        send_worker(&w, &WorkerMessage::Results { results });
        for id in &ids {
            let want = if *id == failed {
                TaskState::Failed
            } else {
                TaskState::Succeeded
            };
            let t = reach(&mut p, "batched", id, want, "a batched result");
            assert_eq!(t.attempts, 1);
        }
    });
}

#[test]
fn the_batched_client_worker_serves_a_crowd_of_tasks() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let mut p = Producer::connect(&node.client_endpoint()).unwrap();
        let n = 600;
        let ids: Vec<String> = (0..n)
            .map(|i| {
                let n = i.to_string();
                p.enqueue("crowd", zmq_task("crowd", &[("n", &n)]))
                    .unwrap()
                    .0
            })
            .collect();
        // Connected after the enqueues: the tasks waiting in the pool come
        // a credit's worth at a time.
        let mut w = Worker::connect_batched(&node.worker_endpoint(), &["crowd"], 64).unwrap();
        let mut got = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} tasks arrived",
                got.len()
            );
            let Some(job) = w.next(Duration::from_millis(200)).unwrap() else {
                continue;
            };
            assert!(got.insert(job.task.id.clone()), "{} twice", job.task.id);
            w.report(&job, protocol::Outcome::Success, None).unwrap();
        }
        // The last results leave with the next call that runs out of jobs.
        assert!(w.next(Duration::from_millis(50)).unwrap().is_none());
        for id in &ids {
            reach(&mut p, "crowd", id, TaskState::Succeeded, "the crowd");
        }
        assert_eq!(w.reconnects, 0);
        // Fewer messages than tasks went each way.
        assert!(
            (1..n as u64 / 2).contains(&w.tasks_messages()),
            "{} tasks messages",
            w.tasks_messages()
        );
        assert!(w.results_messages >= 1);
    });
}

/// A batched worker keeps results only while its jobs are quick: after a
/// slow job the result goes out before the next job is handed over.
#[test]
fn a_batched_worker_does_not_sit_on_the_result_of_a_slow_job() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let mut p = Producer::connect(&node.client_endpoint()).unwrap();
        enqueue_waiting(&mut p, "slow", "slow", 2);
        // Both arrive in one message (credit 8, so not the half-credit rule).
        let mut w = Worker::connect_batched(&node.worker_endpoint(), &["slow"], 8).unwrap();
        let first = w.next(Duration::from_secs(10)).unwrap().expect("first job");
        assert_eq!(w.tasks_messages(), 1);
        // The job's own work, longer than the 5 ms hold.
        std::thread::sleep(Duration::from_millis(50));
        w.report(&first, protocol::Outcome::Success, None).unwrap();
        let second = w
            .next(Duration::from_secs(10))
            .unwrap()
            .expect("second job");
        // The second job is in hand and unanswered; the first is settled.
        let first_id = &first.task.id;
        reach(
            &mut p,
            "slow",
            first_id,
            TaskState::Succeeded,
            "the first result was kept",
        );
        assert_eq!(
            p.get("slow", &second.task.id).unwrap().state,
            TaskState::Running
        );
        // Dropping the worker sends what it keeps.
        w.report(&second, protocol::Outcome::Success, None).unwrap();
        drop(w);
        let lost = "the kept result was lost on drop";
        reach(&mut p, "slow", &second.task.id, TaskState::Succeeded, lost);
    });
}

/// A pull worker answers 503 with `retry_after` 1e20 (and another 429
/// with 1e308): the node holds the queue back for at most its longest
/// slow-down and goes on serving. This once panicked the scheduler
/// thread (issue 13).
#[test]
fn a_worker_retry_after_past_any_duration_does_not_stop_the_node() {
    use protocol::{BrokerMessage, DeliveryResult, Outcome, WorkerMessage};
    run(LIMIT, |h| {
        let node = h.standalone();
        let mut p = Producer::connect(&node.client_endpoint()).unwrap();
        let ctx = zmq::Context::new();
        let raw = ctx.socket(zmq::DEALER).unwrap();
        raw.set_linger(0).unwrap();
        raw.set_rcvtimeo(10_000).unwrap();
        raw.connect(&node.worker_endpoint()).unwrap();
        let ready = WorkerMessage::Ready {
            pools: vec!["hostile".into()],
            credit: 2,
            name: Some("hostile".into()),
            batch: false,
        };
        raw.send_multipart(protocol::encode(&ready), 0).unwrap();
        // Two queues: the first answer holds its queue back (60 s at most).
        for (queue, status, retry_after) in [("hostile", 503, 1e20), ("hostile2", 429, 1e308)] {
            let (id, _) = p.enqueue(queue, zmq_task("hostile", &[])).unwrap();
            let (delivery, task) = loop {
                let parts = raw.recv_multipart(0).expect("a task for the raw worker");
                match protocol::decode::<BrokerMessage, _>(&parts).unwrap() {
                    BrokerMessage::Task { delivery, task } => break (delivery, task),
                    _ => continue,
                }
            };
            assert_eq!(task.id, id);
            let result = WorkerMessage::Result(DeliveryResult {
                delivery,
                task_id: id.clone(),
                outcome: Outcome::Failure,
                status: Some(status),
                reason: Some("slow down".into()),
                retry_after: Some(retry_after),
                responded: true,
                body: None,
                no_retry: false,
            });
            raw.send_multipart(protocol::encode(&result), 0).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let t = p.get(queue, &id).expect("the node still answers");
                if t.state == TaskState::Retrying {
                    assert_eq!(t.last_status, Some(status));
                    break;
                }
                assert!(Instant::now() < deadline, "stuck in {:?}", t.state);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The node still delivers: another pool's task to a real worker.
        let mut w = Worker::connect(&node.worker_endpoint(), &["fine"], 1).unwrap();
        let (id, _) = p.enqueue("fine", zmq_task("fine", &[])).unwrap();
        let job = w
            .next(Duration::from_secs(10))
            .unwrap()
            .expect("the node still delivers");
        assert_eq!(job.task.id, id);
        w.report(&job, Outcome::Success, None).unwrap();
        assert_eq!(p.ping().unwrap(), format!("node-{}", node.base));
    });
}
