//! A cluster of real broker processes under real faults: `kill -9` of a
//! follower or of the leader while thousands of tasks are pending, two
//! losses in a row, restarts and joins through a non-leader. Each test
//! runs under a timeout; the heavy ones take a lock so that two clusters
//! never share this 2-core machine.

use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

use client::Producer;
use protocol::TaskSpec;
use serde_json::Value;

use crate::util::*;

pub(crate) struct Cluster {
    pub(crate) bases: Vec<u16>,
    pub(crate) pids: Vec<u32>,
    pub(crate) gateway: Node,
}

impl Cluster {
    /// `n` brokers (each joining through the previous one) and a gateway
    /// that knows only the first.
    pub(crate) fn start(h: &Harness, n: usize, extra: &[&str]) -> Cluster {
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
        let gateway_pid = h.spawn(&[
            "gateway",
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--broker",
            &format!("tcp://127.0.0.1:{}", bases[0]),
        ]);
        let gateway = Node {
            base: bases[0],
            http: http_port,
            pid: gateway_pid,
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
        // Every broker knows itself a member (a node still joining refuses
        // clients with `unavailable`).
        let deadline = Instant::now() + Duration::from_secs(30);
        for base in &c.bases {
            loop {
                let mut p = Producer::connect(&format!("tcp://127.0.0.1:{base}")).unwrap();
                p.attempts = 1;
                if let Ok(protocol::ReplyBody::Cluster { cluster }) =
                    p.request(protocol::ClientCommand::ClusterInfo)
                {
                    if cluster.nodes.len() == n && cluster.leader.is_some() {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "broker {base} never joined");
                thread::sleep(Duration::from_millis(50));
            }
        }
        c
    }

    pub(crate) fn info(&self) -> Value {
        http("GET", &self.gateway.url("/cluster"), &[], "").1
    }

    /// Polls `GET /cluster` until `pred` holds.
    pub(crate) fn wait_for(&self, wait: Duration, pred: impl Fn(&Value) -> bool) -> Value {
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
    pub(crate) fn pick(&self, leader: bool) -> usize {
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
/// ZeroMQ to `zmq_base`; returns every task id. The cluster must hold each
/// task twice (`--replicas 2`, the default).
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
                        // Stored on both holders before the answer, also
                        // when the gateway sent it inside a shared batch.
                        assert_eq!(v["replicas"], 2, "{v}");
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
    let _one = heavy();
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
    let _one = heavy();
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
    let _one = heavy();
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

/// Three test hosts in network namespaces on one bridge: real separate
/// network stacks, so a node can be cut off by taking its link down.
pub(crate) struct Hosts {
    namespaces: Vec<String>,
    host_links: Vec<String>,
    bridge: String,
    subnet: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Hosts {
    pub(crate) fn setup(n: usize) -> Result<Hosts, String> {
        // Several sets in one test process (tests run in parallel) get
        // their own names and subnets.
        static SETS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let k = SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20;
        let pid = format!("{}{k}", std::process::id() % 1_000_000);
        let subnet = format!("10.{}.{}", 231 + k, std::process::id() % 250);
        let mut h = Hosts {
            namespaces: Vec::new(),
            host_links: Vec::new(),
            bridge: format!("mybr{pid}"),
            subnet,
        };
        ip(&["link", "add", &h.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", h.subnet),
            "dev",
            &h.bridge,
        ])?;
        ip(&["link", "set", &h.bridge, "up"])?;
        for i in 1..=n {
            let ns = format!("myns{pid}-{i}");
            let (host_end, ns_end) = (format!("vh{i}_{pid}"), format!("vn{i}_{pid}"));
            ip(&["netns", "add", &ns])?;
            h.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            h.host_links.push(host_end.clone());
            ip(&["link", "set", &ns_end, "netns", &ns])?;
            ip(&[
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}.{i}/24", h.subnet),
                "dev",
                &ns_end,
            ])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", &ns_end, "up"])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
            ip(&["link", "set", &host_end, "master", &h.bridge])?;
            ip(&["link", "set", &host_end, "up"])?;
        }
        Ok(h)
    }

    pub(crate) fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// The host's own address on the test hosts' bridge.
    pub(crate) fn bridge_addr(&self) -> String {
        format!("{}.254", self.subnet)
    }

    /// Host `i`'s namespace, for `ip netns exec`.
    pub(crate) fn namespace(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Cuts host `i` off (or reconnects it).
    fn link(&self, i: usize, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_links[i],
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// `miyamoto cluster` run inside host `i`'s namespace.
fn view_from(hosts: &Hosts, i: usize) -> Value {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &hosts.namespaces[i]])
        .arg(bin())
        .args([
            "cluster",
            "--broker",
            &format!("tcp://{}:7000", hosts.addr(i)),
        ])
        .output()
        .expect("miyamoto cluster");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn wait_view(hosts: &Hosts, i: usize, wait: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + wait;
    loop {
        let v = view_from(hosts, i);
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} never got there; last view: {v}"
        );
        thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn partitioned_minority_elects_no_leader_changes_no_roster_and_heals() {
    let _one = heavy();
    run(Duration::from_secs(240), |h| {
        let hosts = Hosts::setup(3).unwrap_or_else(|e| {
            panic!("this test makes network namespaces: it needs root and iproute2 ({e})")
        });
        let exe = bin();
        let exe = exe.to_str().unwrap();
        for i in 0..3 {
            let bind = hosts.addr(i);
            let name = format!("p{i}");
            let mut args = vec![
                "netns",
                "exec",
                &hosts.namespaces[i],
                exe,
                "broker",
                "--bind",
                &bind,
                "--port",
                "7000",
                "--node-id",
                &name,
                "--remove-after",
                "120",
            ];
            let join;
            if i > 0 {
                join = format!("tcp://{}:7000", hosts.addr(i - 1));
                args.extend_from_slice(&["--join", &join]);
            }
            h.spawn_background("ip", &args);
            if i == 0 {
                wait_view(&hosts, 0, Duration::from_secs(20), |v| v["leader"].is_u64());
            }
        }
        let before = wait_view(&hosts, 0, Duration::from_secs(30), |v| {
            v["leader"].is_u64() && v["nodes"].as_array().is_some_and(|a| a.len() == 3)
        });
        let epoch = before["epoch"].as_u64().unwrap();
        // A pull worker on every host, each talking to its own node.
        let workers: Vec<_> = (0..3)
            .map(|i| {
                let we = format!("tcp://{}:7001", hosts.addr(i));
                h.spawn_program_piped(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &hosts.namespaces[i],
                        exe,
                        "worker",
                        "--broker",
                        &we,
                        "--pool",
                        "part",
                        "--credit",
                        "50",
                    ],
                )
            })
            .collect();
        let mut p = Producer::connect(&format!("tcp://{}:7000", hosts.addr(0))).unwrap();
        let mut ids = HashSet::new();
        for i in 0..300 {
            let spec = TaskSpec {
                url: "zmq://part".into(),
                countdown: Some(8.0),
                params: vec![("i".into(), i.to_string())],
                ..Default::default()
            };
            ids.insert(p.enqueue("default", spec).unwrap().0);
        }
        // Cut node 2 off before anything fires.
        hosts.link(2, false);
        let minority = wait_view(&hosts, 2, Duration::from_secs(20), |v| {
            v["leader"].is_null()
        });
        assert_eq!(
            minority["epoch"].as_u64(),
            Some(epoch),
            "the minority changed the roster: {minority}"
        );
        let majority = wait_view(&hosts, 0, Duration::from_secs(20), |v| v["leader"].is_u64());
        assert_eq!(majority["epoch"].as_u64(), Some(epoch));
        // Every task is delivered; the minority fires what it holds.
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut by_minority = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while ids.iter().any(|id| !seen.contains_key(id)) {
            assert!(
                Instant::now() < deadline,
                "{} tasks never delivered",
                ids.iter().filter(|id| !seen.contains_key(*id)).count()
            );
            for (w, rx) in workers.iter().enumerate() {
                while let Ok(line) = rx.try_recv() {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    *seen
                        .entry(v["id"].as_str().unwrap().to_string())
                        .or_default() += 1;
                    if w == 2 {
                        by_minority += 1;
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        let duplicates: usize = seen.values().map(|n| n - 1).sum();
        println!("300 tasks delivered during the partition; the minority delivered {by_minority}; {duplicates} delivered twice");
        assert!(by_minority > 0, "the isolated node fired nothing");
        // Heal: one leader and one roster again, seen from both sides.
        hosts.link(2, true);
        let healed = wait_view(&hosts, 2, Duration::from_secs(30), |v| v["leader"].is_u64());
        let view0 = wait_view(&hosts, 0, Duration::from_secs(30), |v| {
            v["leader"] == healed["leader"]
        });
        assert_eq!(view0["epoch"], healed["epoch"]);
        let names = |v: &Value| {
            let mut n: Vec<u64> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["id"].as_u64().unwrap())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&view0), names(&healed));
        assert_eq!(names(&view0).len(), 3);
    });
}

#[test]
fn queue_limits_hold_for_the_cluster_as_a_whole() {
    let _one = heavy();
    run(Duration::from_secs(180), |h| {
        let c = Cluster::start(h, 3, &[]);
        let rx = Receiver::start();
        rx.answer_all(Answer {
            delay: Duration::from_millis(200),
            ..Answer::status(200)
        });
        // Set once, through one node: every node applies it.
        let (s, q) = send_json(
            "PUT",
            &c.gateway.url("/queue/shared"),
            &serde_json::json!({"rate": 30, "burst": 3, "max_concurrent": 3}),
        );
        assert_eq!(s, 200, "{q}");
        let tasks: Vec<Value> = (0..150)
            .map(|i| serde_json::json!({"url": rx.url("/limited"), "name": format!("t{i}")}))
            .collect();
        let url = c.gateway.url("/queue/shared");
        let handles: Vec<_> = tasks
            .chunks(50)
            .map(|chunk| {
                let (url, chunk) = (url.clone(), chunk.to_vec());
                thread::spawn(move || {
                    for t in chunk {
                        assert_eq!(send_json("POST", &url, &t).0, 200);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut times: Vec<f64> = (0..150)
            .map(|_| rx.expect(Duration::from_secs(30)).at)
            .collect();
        times.sort_by(f64::total_cmp);
        let worst = (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|u| **u < times[i] + 1.0)
                    .count()
            })
            .max()
            .unwrap();
        println!("cluster-wide rate 30/s + burst 3: at most {worst} dispatches in any one second; at most {} in flight", rx.max_in_flight());
        assert!(
            worst <= 33,
            "{worst} dispatches within one second across the cluster"
        );
        assert!(
            rx.max_in_flight() <= 3,
            "{} deliveries in flight (cap 3)",
            rx.max_in_flight()
        );
    });
}
