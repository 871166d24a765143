//! The ZeroMQ interface: producers, pulling workers (including one killed
//! mid-task and a broker restart), and malformed frames.

use std::time::{Duration, Instant};

use broker::client::{Producer, Worker};
use protocol::{ClientCommand, ClientReply, ClientRequest, ReplyBody, TaskSpec, TaskState};

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
            Err(broker::client::ClientError::Rejected {
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
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = p.get("default", &id).unwrap();
            if t.state == TaskState::Succeeded {
                assert_eq!(t.attempts, 2);
                assert!(t.last_error.is_none());
                break;
            }
            assert!(Instant::now() < deadline, "task stuck in {:?}", t.state);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
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
