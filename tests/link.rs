//! The gateway's broker link against a real broker on real sockets.

use std::collections::HashSet;
use std::time::Duration;

use broker::node::NodeConfig;
use gateway::broker_link::{BrokerLink, LinkConfig};
use protocol::{ClientCommand, ErrorCode, ReplyBody, TaskSpec};

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(60);

fn task(i: usize) -> TaskSpec {
    TaskSpec {
        // Every tenth task is bad: the broker rejects it on its own.
        url: if i % 10 == 7 {
            "ftp://example.com/".into()
        } else {
            "http://127.0.0.1:9/w".into()
        },
        name: Some(format!("t{i}")),
        countdown: Some(600.0),
        ..Default::default()
    }
}

/// Enqueues issued together share batches on the way to the broker, and
/// each still gets its own answer: its id, its duplicate, its error.
#[test]
fn enqueues_issued_together_share_batches_and_keep_their_own_answers() {
    run(LIMIT, |_h| {
        let base = free_base();
        let config = NodeConfig {
            base_port: base,
            ..Default::default()
        };
        let node = broker::Node::start_in(config, zmq::Context::new(), None).expect("broker");
        let endpoint = format!("tcp://127.0.0.1:{base}");
        let (link, _jobs) =
            BrokerLink::start(LinkConfig::for_broker(&endpoint, 1).expect("config")).expect("link");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let n = 400;
        // Two queues, interleaved: a batch holds one queue's tasks only.
        let round = |link: &BrokerLink| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let link = link.clone();
                    rt.spawn(async move {
                        let queue = if i % 3 == 0 { "left" } else { "right" };
                        link.request(ClientCommand::Enqueue {
                            queue: queue.into(),
                            task: task(i),
                            wait: None,
                        })
                        .await
                    })
                })
                .collect();
            rt.block_on(async {
                let mut out = Vec::new();
                for h in handles {
                    out.push(h.await.expect("join").expect("answer"));
                }
                out
            })
        };
        // The broker is reachable once a ping is answered.
        rt.block_on(async {
            for _ in 0..100 {
                if link.request(ClientCommand::Ping).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the broker never answered");
        });
        let first = round(&link);
        let mut ids = Vec::new();
        for (i, answer) in first.iter().enumerate() {
            match answer {
                ReplyBody::Error {
                    code: ErrorCode::BadRequest,
                    ..
                } if i % 10 == 7 => ids.push(None),
                ReplyBody::Enqueued { id, .. } if i % 10 != 7 => ids.push(Some(id.clone())),
                other => panic!("task {i}: {other:?}"),
            }
        }
        let distinct: HashSet<_> = ids.iter().flatten().collect();
        assert_eq!(distinct.len(), n - n / 10);
        // Each task is stored under its own name: the id answered is that
        // task's.
        rt.block_on(async {
            for (i, id) in ids.iter().enumerate().step_by(37) {
                let Some(id) = id else { continue };
                let queue = if i % 3 == 0 { "left" } else { "right" };
                match link
                    .request(ClientCommand::Get {
                        queue: queue.into(),
                        id: id.clone(),
                    })
                    .await
                {
                    Ok(ReplyBody::Task { task }) => {
                        assert_eq!(task.name.as_deref(), Some(format!("t{i}").as_str()))
                    }
                    other => panic!("get {id}: {other:?}"),
                }
            }
        });
        // Again: every good task is now a duplicate of itself.
        let second = round(&link);
        for (i, answer) in second.iter().enumerate() {
            match (answer, &ids[i]) {
                (ReplyBody::Duplicate { id, .. }, Some(first)) => assert_eq!(id, first),
                (ReplyBody::Error { .. }, None) => {}
                (other, _) => panic!("task {i} again: {other:?}"),
            }
        }
        assert!(
            link.coalesced() > 0,
            "no enqueue shared a batch, so this test proved nothing"
        );
        eprintln!("{} of {} enqueues shared a batch", link.coalesced(), 2 * n);
        link.stop();
        node.shutdown();
    });
}

/// The link against a stand-in broker (bare ROUTER sockets): it asks for
/// batches, answers a `tasks` message's deliveries together when they
/// finish together, and stops sending `results` once the broker sends a
/// plain `task` or a `disconnect` (an older broker on the same endpoint).
#[test]
fn the_link_sends_results_together_only_to_a_broker_that_batches() {
    use protocol::{
        BrokerMessage, DeliveredTask, DeliveryResult, Dispatched, Outcome, WorkerMessage,
    };
    run(LIMIT, |_h| {
        let base = free_base();
        let ctx = zmq::Context::new();
        // The client port only takes the link's roster requests.
        let clients = ctx.socket(zmq::ROUTER).unwrap();
        clients.set_linger(0).unwrap();
        clients.bind(&format!("tcp://127.0.0.1:{base}")).unwrap();
        let workers = ctx.socket(zmq::ROUTER).unwrap();
        workers.set_linger(0).unwrap();
        workers.set_rcvtimeo(10_000).unwrap();
        workers
            .bind(&format!("tcp://127.0.0.1:{}", base + 1))
            .unwrap();
        let config = LinkConfig::for_broker(&format!("tcp://127.0.0.1:{base}"), 8).unwrap();
        let (link, mut jobs) = BrokerLink::start(config).expect("link");

        // What the link sends on the worker port, heartbeats left out.
        let next = || loop {
            let mut parts = workers.recv_multipart(0).expect("a message from the link");
            let identity = parts.remove(0);
            let msg: WorkerMessage = protocol::decode(&parts).unwrap();
            if msg != WorkerMessage::Heartbeat {
                return (identity, msg);
            }
        };
        let (who, ready) = next();
        assert!(
            matches!(
                &ready,
                WorkerMessage::Ready {
                    batch: true,
                    credit: 8,
                    ..
                }
            ),
            "{ready:?}"
        );
        let send = |msg: &BrokerMessage| {
            let mut frames = vec![who.clone()];
            frames.extend(protocol::encode(msg));
            workers.send_multipart(frames, 0).unwrap();
        };
        let task = |id: &str| DeliveredTask {
            id: id.into(),
            queue: "q".into(),
            name: None,
            url: "http://127.0.0.1:9/".into(),
            method: "POST".into(),
            params: vec![],
            body: None,
            content_type: None,
            headers: vec![],
            eta: 1.0,
            timeout: 30.0,
            retry_count: 0,
            execution_count: 0,
            signing_secrets: vec![],
        };
        let success = |delivery: u64, task_id: String| DeliveryResult {
            delivery,
            task_id,
            outcome: Outcome::Success,
            status: Some(200),
            reason: None,
            retry_after: None,
            responded: true,
            body: None,
            no_retry: false,
        };
        // Takes the deliveries the link hands to tokio and reports each one
        // at once, as webhooks finishing together would; returns the
        // delivery numbers of each message that came back.
        let mut settle = |n: usize| -> Vec<Vec<u64>> {
            let mut handed = Vec::new();
            for _ in 0..n {
                handed.push(jobs.blocking_recv().expect("a delivery"));
            }
            for d in handed {
                link.report(d.broker, success(d.delivery, d.task.id));
            }
            let mut messages = Vec::new();
            let mut answered = 0;
            while answered < n {
                match next().1 {
                    WorkerMessage::Result(r) => messages.push(vec![r.delivery]),
                    WorkerMessage::Results { results } => {
                        messages.push(results.iter().map(|r| r.delivery).collect())
                    }
                    other => panic!("unexpected {other:?}"),
                }
                answered = messages.iter().map(Vec::len).sum();
            }
            messages
        };
        // A broker that batches: the results of deliveries finishing
        // together come back together (the link gathers what it finds
        // waiting, so give it a few tries).
        let mut gathered = false;
        for round in 0..20u64 {
            let tasks = (0..4)
                .map(|i| Dispatched {
                    delivery: round * 10 + i,
                    task: task(&format!("t{round}-{i}")),
                })
                .collect();
            send(&BrokerMessage::Tasks { tasks });
            let messages = settle(4);
            let mut all: Vec<u64> = messages.concat();
            all.sort();
            assert_eq!(all, (round * 10..round * 10 + 4).collect::<Vec<u64>>());
            if messages.iter().any(|m| m.len() > 1) {
                gathered = true;
                break;
            }
        }
        assert!(gathered, "no results were ever sent together");
        // The same endpoint now answers like a broker without batches: a
        // plain `task`, then results one by one, however they finish.
        send(&BrokerMessage::Task {
            delivery: 500,
            task: task("plain-a"),
        });
        send(&BrokerMessage::Task {
            delivery: 501,
            task: task("plain-b"),
        });
        let messages = settle(2);
        assert!(messages.iter().all(|m| m.len() == 1), "{messages:?}");
        // A `disconnect` too: deliveries handed out in a `tasks` message
        // before it are answered one by one after it.
        send(&BrokerMessage::Tasks {
            tasks: vec![
                Dispatched {
                    delivery: 600,
                    task: task("batched-a"),
                },
                Dispatched {
                    delivery: 601,
                    task: task("batched-b"),
                },
            ],
        });
        let mut handed = Vec::new();
        for _ in 0..2 {
            handed.push(jobs.blocking_recv().expect("a delivery"));
        }
        send(&BrokerMessage::Disconnect {
            reason: "unknown worker".into(),
        });
        assert!(matches!(next().1, WorkerMessage::Ready { batch: true, .. }));
        for d in handed {
            link.report(d.broker, success(d.delivery, d.task.id));
        }
        for want in [600, 601] {
            match next().1 {
                WorkerMessage::Result(r) => assert_eq!(r.delivery, want),
                other => panic!("expected a single result, got {other:?}"),
            }
        }
        link.stop();
    });
}

/// A stand-in broker's client port: a bare ROUTER on `base`.
fn stand_in(ctx: &zmq::Context, base: u16) -> zmq::Socket {
    let s = ctx.socket(zmq::ROUTER).unwrap();
    s.set_linger(0).unwrap();
    s.set_rcvtimeo(10_000).unwrap();
    s.bind(&format!("tcp://127.0.0.1:{base}")).unwrap();
    s
}

/// The next request a stand-in receives, roster requests left out, with
/// the identity to answer.
fn next_request(s: &zmq::Socket) -> (Vec<u8>, protocol::ClientRequest) {
    loop {
        let mut parts = s.recv_multipart(0).expect("a request from the link");
        let identity = parts.remove(0);
        let req: protocol::ClientRequest = protocol::decode(&parts).unwrap();
        if req.request_id != "roster" {
            return (identity, req);
        }
    }
}

fn answer(s: &zmq::Socket, identity: Vec<u8>, request_id: String) {
    let reply = protocol::ClientReply {
        request_id,
        body: ReplyBody::Pong {
            node: "stand-in".into(),
            version: "0".into(),
        },
    };
    let mut frames = vec![identity];
    frames.extend(protocol::encode(&reply));
    s.send_multipart(frames, 0).unwrap();
}

/// A runtime whose spawned calls run while the test's thread plays the
/// broker.
fn calls_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A ping through `link`, sent again while no broker is connected yet.
async fn ping(link: BrokerLink) -> Result<ReplyBody, gateway::broker_link::LinkError> {
    loop {
        match link.request(ClientCommand::Ping).await {
            Err(gateway::broker_link::LinkError::NotConnected) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
}

fn link_to(bases: &[u16]) -> BrokerLink {
    let endpoints: Vec<String> = bases
        .iter()
        .map(|b| format!("tcp://127.0.0.1:{b}"))
        .collect();
    let mut config = LinkConfig::for_brokers(&endpoints, 1).unwrap();
    config.resend_after = Duration::from_millis(300);
    BrokerLink::start(config).expect("link").0
}

/// An unanswered request is sent again under the same request id, and
/// the answer to the resend reaches the caller; a `wait` is not resent.
#[test]
fn an_unanswered_request_is_resent_under_its_request_id() {
    run(LIMIT, |_h| {
        let base = free_base();
        let ctx = zmq::Context::new();
        let broker = stand_in(&ctx, base);
        let link = link_to(&[base]);
        let rt = calls_runtime();
        let call = rt.spawn(ping(link.clone()));
        // The first copy goes unanswered; the resend is answered.
        let (_, first) = next_request(&broker);
        let (who, again) = next_request(&broker);
        assert_eq!(first.request_id, again.request_id);
        answer(&broker, who, again.request_id);
        let got = rt.block_on(call).unwrap();
        assert!(matches!(got, Ok(ReplyBody::Pong { .. })), "{got:?}");
        // An enqueue that waits for its first attempt goes once, and so do
        // `run` and `purge_queue` (a resend may reach another broker, which
        // would act on them again).
        let wait = ClientCommand::Enqueue {
            queue: "q".into(),
            task: task(1),
            wait: Some(1.0),
        };
        let purge = ClientCommand::PurgeQueue { queue: "q".into() };
        let run_now = ClientCommand::Run {
            queue: "q".into(),
            id: "00000000-0000-4000-8000-000000000000".into(),
        };
        for (command, extra) in [
            (wait, Duration::from_secs(1)),
            (purge, Duration::ZERO),
            (run_now, Duration::ZERO),
        ] {
            let what = format!("{command:?}");
            let call = {
                let link = link.clone();
                rt.spawn(async move { link.request_with(command, extra).await })
            };
            let (who, first) = next_request(&broker);
            // Four resend intervals of silence: nothing comes again.
            broker.set_rcvtimeo(1200).unwrap();
            let again = loop {
                match broker.recv_multipart(0) {
                    Ok(mut parts) => {
                        parts.remove(0);
                        let r: protocol::ClientRequest = protocol::decode(&parts).unwrap();
                        if r.request_id != "roster" {
                            break Some(r.request_id);
                        }
                    }
                    Err(_) => break None,
                }
            };
            broker.set_rcvtimeo(10_000).unwrap();
            assert_eq!(again, None, "resent: {what}");
            answer(&broker, who, first.request_id);
            let got = rt.block_on(call).unwrap();
            assert!(got.is_ok(), "{got:?}");
        }
        link.stop();
    });
}

/// The broker a request went to is gone: the resend reaches another one,
/// under the same request id, and its answer is the caller's.
#[test]
fn a_request_to_a_broker_that_is_gone_is_resent_to_another() {
    run(LIMIT, |_h| {
        let (a_base, b_base) = (free_base(), free_base());
        let ctx = zmq::Context::new();
        // Only A is up: the first send can only go there.
        let a = stand_in(&ctx, a_base);
        let link = link_to(&[a_base, b_base]);
        let rt = calls_runtime();
        let call = rt.spawn(ping(link.clone()));
        let (_, first) = next_request(&a);
        // A dies without answering; B comes up.
        drop(a);
        let b = stand_in(&ctx, b_base);
        let (who, again) = next_request(&b);
        assert_eq!(first.request_id, again.request_id);
        answer(&b, who, again.request_id);
        let got = rt.block_on(call).unwrap();
        assert!(matches!(got, Ok(ReplyBody::Pong { .. })), "{got:?}");
        link.stop();
    });
}

/// A roster that names an endpoint libzmq refuses does not stop the link:
/// it goes on answering through the brokers it has (issue 13: this ended
/// the link thread, and the gateway answered 503 for good).
#[test]
fn a_roster_naming_a_bad_endpoint_does_not_stop_the_link() {
    use protocol::{ClusterInfo, NodeInfo};
    run(LIMIT, |_h| {
        let base = free_base();
        let ctx = zmq::Context::new();
        let bad = "tcp://*:7000";
        // libzmq refuses it (so the test shows the case it claims to).
        let probe = ctx.socket(zmq::DEALER).unwrap();
        assert!(probe.connect(bad).is_err(), "{bad} was accepted");
        let broker = stand_in(&ctx, base);
        let link = link_to(&[base]);
        let rt = calls_runtime();
        // Answer roster requests with the bad endpoint; hold the ping
        // until the link has had a roster, then answer it.
        let call = rt.spawn(ping(link.clone()));
        let mut rosters = 0;
        let mut held = None;
        let first = loop {
            let mut parts = broker.recv_multipart(0).expect("a request from the link");
            let identity = parts.remove(0);
            let req: protocol::ClientRequest = protocol::decode(&parts).unwrap();
            if req.request_id != "roster" {
                held = Some((identity, req.request_id));
            } else {
                let node = |id: u64, client: &str| NodeInfo {
                    id,
                    name: format!("n{id}"),
                    client: client.into(),
                    worker: client.into(),
                    alive: true,
                    leader: id == 1,
                    tasks: 0,
                };
                let cluster = ClusterInfo {
                    node: 1,
                    leader: Some(1),
                    term: 1,
                    epoch: 1,
                    replicas: 2,
                    replica_offset: 5.0,
                    nodes: vec![node(1, &format!("tcp://127.0.0.1:{base}")), node(2, bad)],
                    re_replicated: 0,
                    dropped_peer_messages: 0,
                };
                let reply = protocol::ClientReply {
                    request_id: req.request_id,
                    body: ReplyBody::Cluster { cluster },
                };
                let mut frames = vec![identity];
                frames.extend(protocol::encode(&reply));
                broker.send_multipart(frames, 0).unwrap();
                rosters += 1;
            }
            if rosters > 0 {
                if let Some((who, id)) = held.take() {
                    // Time for the link to read the roster first.
                    std::thread::sleep(Duration::from_millis(200));
                    answer(&broker, who, id.clone());
                    break id;
                }
            }
        };
        let got = rt.block_on(call).unwrap();
        assert!(matches!(got, Ok(ReplyBody::Pong { .. })), "{got:?}");
        // And again, well after the bad roster was read (resends of the
        // first ping may still be on the way: they are not this one).
        let again = rt.spawn(ping(link.clone()));
        let (who, req) = loop {
            let (who, req) = next_request(&broker);
            if req.request_id != first {
                break (who, req);
            }
        };
        answer(&broker, who, req.request_id);
        let got = rt.block_on(again).unwrap();
        assert!(matches!(got, Ok(ReplyBody::Pong { .. })), "{got:?}");
        link.stop();
    });
}
