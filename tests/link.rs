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
