//! A cluster of real broker processes under real faults: `kill -9` of a
//! follower or of the leader while thousands of tasks are pending, two
//! losses in a row, restarts and joins through a non-leader. Each test
//! runs under a timeout; the heavy ones take a lock so that two clusters
//! never share this 2-core machine.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use broker::client::Producer;
use protocol::TaskSpec;
use serde_json::Value;

use crate::util::*;

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Cluster {
    bases: Vec<u16>,
    pids: Vec<u32>,
    gateway: Node,
}

impl Cluster {
    /// `n` brokers (each joining through the previous one) and a gateway
    /// that knows only the first.
    fn start(h: &Harness, n: usize, extra: &[&str]) -> Cluster {
        let mut bases = Vec::new();
        let mut pids = Vec::new();
        for i in 0..n {
            let base = free_base();
            let name = format!("n{i}");
            let base_s = base.to_string();
            let mut args = vec!["broker", "--port", &base_s, "--node-id", &name];
            let join;
            if i > 0 {
                join = format!("tcp://127.0.0.1:{}", bases[i - 1]);
                args.extend_from_slice(&["--join", &join]);
            }
            args.extend_from_slice(extra);
            pids.push(h.spawn(&args));
            bases.push(base);
            if i == 0 {
                // The first node must lead before the others join it.
                let mut p = Producer::connect(&format!("tcp://127.0.0.1:{base}")).unwrap();
                p.ping().unwrap();
            }
        }
        let http_port = free_port();
        h.spawn(&[
            "gateway",
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--broker",
            &format!("tcp://127.0.0.1:{}", bases[0]),
        ]);
        let gateway = Node {
            base: bases[0],
            http: http_port,
        };
        gateway.wait_ready();
        let c = Cluster {
            bases,
            pids,
            gateway,
        };
        c.wait_for(Duration::from_secs(30), |v| {
            v["leader"].is_u64()
                && v["nodes"]
                    .as_array()
                    .is_some_and(|a| a.len() == n && a.iter().all(|x| x["alive"] == true))
        });
        c
    }

    fn info(&self) -> Value {
        http("GET", &self.gateway.url("/cluster"), &[], "").1
    }

    /// Polls `GET /cluster` until `pred` holds.
    fn wait_for(&self, wait: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + wait;
        loop {
            let v = self.info();
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never got there; last view: {v}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the node named `nI` that leads (or does not).
    fn pick(&self, leader: bool) -> usize {
        let v = self.info();
        let leader_id = v["leader"].as_u64().expect("a leader");
        let nodes = v["nodes"].as_array().unwrap();
        let node = nodes
            .iter()
            .find(|n| (n["id"].as_u64() == Some(leader_id)) == leader)
            .expect("a node");
        node["name"].as_str().unwrap()[1..].parse().unwrap()
    }
}

/// Enqueues `n` tasks through the gateway (4 client threads) and `n` over
/// ZeroMQ to `zmq_base`; returns every task id.
fn enqueue_both_ways(
    c: &Cluster,
    rx: &Receiver,
    n: usize,
    countdown: f64,
    zmq_base: u16,
) -> HashSet<String> {
    let url = c.gateway.url("/queue");
    let target = rx.url("/cluster");
    let http_threads: Vec<_> = (0..4)
        .map(|t| {
            let (url, target) = (url.clone(), target.clone());
            thread::spawn(move || {
                (0..n / 4)
                    .map(|i| {
                        let (s, v) = post_form(
                            &url,
                            &format!("task.url={target}&task.countdown={countdown}&i={t}-{i}"),
                        );
                        assert_eq!(s, 200, "{v}");
                        v["id"].as_str().unwrap().to_string()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let zmq_thread = {
        let target = target.clone();
        thread::spawn(move || {
            let mut p = Producer::connect(&format!("tcp://127.0.0.1:{zmq_base}")).unwrap();
            p.attempt_timeout = Duration::from_secs(5);
            (0..n)
                .map(|i| {
                    let spec = TaskSpec {
                        url: target.clone(),
                        countdown: Some(countdown),
                        params: vec![("z".into(), i.to_string())],
                        ..Default::default()
                    };
                    p.enqueue("default", spec).unwrap().0
                })
                .collect::<Vec<_>>()
        })
    };
    let mut ids = HashSet::new();
    for t in http_threads {
        ids.extend(t.join().unwrap());
    }
    ids.extend(zmq_thread.join().unwrap());
    assert_eq!(ids.len(), 2 * n, "duplicate ids handed out");
    ids
}

/// Collects webhooks until every id in `expected` arrived; returns the
/// number of duplicate deliveries. Fails on loss.
fn await_all(rx: &Receiver, expected: &HashSet<String>, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    let mut seen: HashMap<String, usize> = HashMap::new();
    while expected.iter().any(|id| !seen.contains_key(id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.next(left.min(Duration::from_secs(1))) {
            Some(s) => *seen.entry(s.header("x-task-id").to_string()).or_default() += 1,
            None if Instant::now() >= deadline => {
                let missing = expected.iter().filter(|id| !seen.contains_key(*id)).count();
                panic!("{missing} of {} tasks were never delivered", expected.len());
            }
            None => {}
        }
    }
    // Late duplicates still in flight.
    while let Some(s) = rx.next(Duration::from_millis(500)) {
        *seen.entry(s.header("x-task-id").to_string()).or_default() += 1;
    }
    seen.values().map(|n| n - 1).sum()
}

fn kill_scenario(kill_leader: bool) {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    run(Duration::from_secs(240), move |h| {
        let c = Cluster::start(h, 3, &[]);
        let rx = Receiver::start();
        let ids = enqueue_both_ways(&c, &rx, 2000, 3.0, c.bases[1]);
        thread::sleep(Duration::from_secs(1));
        let old_leader = c.info()["leader"].as_u64().unwrap();
        let victim = c.pick(kill_leader);
        h.kill(c.pids[victim]);
        let duplicates = await_all(&rx, &ids, Duration::from_secs(120));
        println!("{} tasks delivered; {duplicates} delivered twice (killed node n{victim}, leader: {kill_leader})", ids.len());
        if kill_leader {
            let v = c.wait_for(Duration::from_secs(30), |v| {
                v["leader"].as_u64().is_some_and(|l| l != old_leader)
            });
            println!("new leader {} in term {}", v["leader"], v["term"]);
        }
        // The dead node leaves the roster.
        c.wait_for(Duration::from_secs(30), |v| {
            v["nodes"].as_array().is_some_and(|a| a.len() == 2)
        });
    });
}

#[test]
fn cluster_loses_no_task_when_a_follower_is_killed() {
    kill_scenario(false);
}

#[test]
fn cluster_loses_no_task_and_elects_a_new_leader_when_the_leader_is_killed() {
    kill_scenario(true);
}

#[test]
fn cluster_survives_two_losses_in_a_row() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    run(Duration::from_secs(240), |h| {
        let c = Cluster::start(h, 3, &["--remove-after", "3"]);
        let rx = Receiver::start();
        let ids = enqueue_both_ways(&c, &rx, 200, 25.0, c.bases[2]);
        let first = c.pick(false);
        h.kill(c.pids[first]);
        // Removed after 3 s; the survivors copy what it held.
        let v = c.wait_for(Duration::from_secs(30), |v| {
            v["nodes"].as_array().is_some_and(|a| a.len() == 2)
        });
        let survivors: Vec<usize> = (0..3).filter(|i| *i != first).collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = c.info();
            let held: Vec<u64> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["tasks"].as_u64().unwrap())
                .collect();
            // Every pending task on both survivors again.
            if held.iter().all(|t| *t >= ids.len() as u64) {
                println!("after the first loss each survivor holds {held:?} tasks");
                break;
            }
            assert!(Instant::now() < deadline, "not re-replicated: {v}");
            thread::sleep(Duration::from_millis(200));
        }
        let _ = v;
        // Kill one of the two survivors (the gateway keeps the other).
        h.kill(c.pids[survivors[0]]);
        let duplicates = await_all(&rx, &ids, Duration::from_secs(90));
        println!(
            "{} tasks delivered after two losses; {duplicates} twice",
            ids.len()
        );
    });
}

#[test]
fn restarted_node_rejoins_and_a_fourth_joins_through_a_follower() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    run(Duration::from_secs(180), |h| {
        let c = Cluster::start(h, 3, &["--remove-after", "3"]);
        let victim = c.pick(false);
        let follower = (0..3).find(|i| *i != victim && *i != c.pick(true)).unwrap();
        h.kill(c.pids[victim]);
        c.wait_for(Duration::from_secs(30), |v| {
            v["nodes"].as_array().is_some_and(|a| a.len() == 2)
        });
        // Same port, no durable state: it comes back as a new member.
        let base = c.bases[victim].to_string();
        let join = format!("tcp://127.0.0.1:{}", c.bases[follower]);
        h.spawn(&[
            "broker",
            "--port",
            &base,
            "--node-id",
            "reborn",
            "--join",
            &join,
        ]);
        c.wait_for(Duration::from_secs(30), |v| {
            v["nodes"]
                .as_array()
                .is_some_and(|a| a.len() == 3 && a.iter().any(|n| n["name"] == "reborn"))
        });
        let fourth = free_base().to_string();
        h.spawn(&[
            "broker",
            "--port",
            &fourth,
            "--node-id",
            "fourth",
            "--join",
            &join,
        ]);
        let v = c.wait_for(Duration::from_secs(30), |v| {
            v["nodes"]
                .as_array()
                .is_some_and(|a| a.len() == 4 && a.iter().all(|n| n["alive"] == true))
        });
        assert!(v["leader"].is_u64());
        // The grown cluster still takes and delivers tasks.
        let rx = Receiver::start();
        let (s, r) = post_form(
            &c.gateway.url("/queue"),
            &format!("task.url={}", rx.url("/after-growth")),
        );
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["replicas"], 2);
        rx.expect(Duration::from_secs(10));
    });
}
