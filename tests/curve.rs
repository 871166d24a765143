//! CURVE on the ZeroMQ ports (issue 16), on real processes: keys made by
//! `miyamoto curve-keygen`, a cluster of three brokers and a gateway that
//! work end to end over CURVE, admitted producers and workers served, and
//! clients without a key, with an unknown key or with a key admitted on
//! another port getting nothing through; a node whose peer key is not
//! admitted cannot join; the refusals are logged with the peer's address.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use client::curve::ClientKeys;
use client::{Producer, Worker};
use protocol::TaskSpec;

use crate::util::*;

/// `miyamoto curve-keygen DIR/NAME`; the public key it printed.
pub(crate) fn keygen(h: &Harness, path: &Path) -> String {
    let out = std::process::Command::new(bin())
        .arg("curve-keygen")
        .arg(path)
        .current_dir(&h.dir)
        .output()
        .expect("miyamoto curve-keygen");
    assert!(out.status.success(), "curve-keygen: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A cluster's key directory as the README makes it: the server pair, the
/// nodes' peer pair (admitted in peers/), and the clients' pairs, each
/// admitted where `admit` says.
pub(crate) struct Keys {
    pub(crate) dir: PathBuf,
    clients: PathBuf,
    /// Clients' public keys (Z85) by name.
    public: std::collections::HashMap<String, String>,
}

impl Keys {
    pub(crate) fn make(h: &Harness, admit: &[(&str, &[&str])]) -> Keys {
        let dir = h.dir.join("keys");
        let clients = h.dir.join("clients");
        keygen(h, &dir.join("server"));
        keygen(h, &dir.join("peer"));
        for sub in ["producers", "workers", "peers"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::copy(dir.join("peer.key"), dir.join("peers/peer.key")).unwrap();
        let mut public = std::collections::HashMap::new();
        for (name, ports) in admit {
            public.insert(name.to_string(), keygen(h, &clients.join(name)));
            for port in *ports {
                std::fs::copy(
                    clients.join(format!("{name}.key")),
                    dir.join(port).join(format!("{name}.key")),
                )
                .unwrap();
            }
        }
        Keys {
            dir,
            clients,
            public,
        }
    }

    pub(crate) fn server_key(&self) -> String {
        self.dir.join("server.key").display().to_string()
    }

    pub(crate) fn secret(&self, name: &str) -> String {
        self.clients
            .join(format!("{name}.key_secret"))
            .display()
            .to_string()
    }

    fn client(&self, name: &str) -> ClientKeys {
        ClientKeys::read(&self.dir.join("server.key"), Path::new(&self.secret(name))).unwrap()
    }
}

/// A producer that tries once for `wait`.
fn producer(base: u16, keys: Option<&ClientKeys>, wait: Duration) -> Producer {
    let mut p = Producer::connect_with(&format!("tcp://127.0.0.1:{base}"), keys).unwrap();
    p.attempts = 1;
    p.attempt_timeout = wait;
    p
}

/// The security mechanism a ZeroMQ port announces in its ZMTP 3 greeting
/// (bytes 12 to 32): `CURVE` means the connection is encrypted or nothing.
fn mechanism_of(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The start of our greeting, signature and major version 3: enough
    // for libzmq to send its whole greeting (and not yet see a mechanism
    // it would refuse by closing).
    s.write_all(&[0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3])
        .unwrap();
    let mut theirs = [0u8; 64];
    s.read_exact(&mut theirs).unwrap();
    String::from_utf8_lossy(&theirs[12..32])
        .trim_end_matches('\0')
        .to_string()
}

#[test]
fn a_cluster_over_curve_serves_its_keys_and_refuses_every_other() {
    let _one = heavy();
    run(Duration::from_secs(180), |h| {
        let keys = Keys::make(
            h,
            &[
                ("gateway", &["producers", "workers"]),
                ("alice", &["producers"]),
                ("wanda", &["workers"]),
                ("mallory", &[]),
            ],
        );
        let curve_dir = keys.dir.display().to_string();
        let mut bases = Vec::new();
        for i in 0..3 {
            let base = free_base();
            let (base_s, name) = (base.to_string(), format!("n{i}"));
            let mut args = vec![
                "broker",
                "--port",
                &base_s,
                "--node-id",
                &name,
                "--in-memory",
                "--curve-dir",
                &curve_dir,
            ];
            let join;
            if i > 0 {
                join = format!("tcp://127.0.0.1:{}", bases[0]);
                args.extend_from_slice(&["--join", &join]);
            }
            h.spawn(&args);
            if i == 0 {
                producer(base, Some(&keys.client("alice")), Duration::from_secs(20))
                    .ping()
                    .expect("the first node answers an admitted producer");
            }
            bases.push(base);
        }
        let http_port = free_port();
        let (server_key, gateway_key) = (keys.server_key(), keys.secret("gateway"));
        h.spawn(&[
            "gateway",
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--broker",
            &format!("tcp://127.0.0.1:{}", bases[0]),
            "--curve-server-key",
            &server_key,
            "--curve-key",
            &gateway_key,
        ]);
        let gateway = Node {
            base: bases[0],
            http: http_port,
            pid: 0,
        };
        gateway.wait_ready();
        // The three nodes formed a cluster over CURVE: each saw the others.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = http("GET", &gateway.url("/cluster"), &[], "");
            let alive = v["nodes"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|n| n["alive"] == true).count());
            if alive == 3 && v["leader"].is_u64() {
                break;
            }
            assert!(Instant::now() < deadline, "no 3-node cluster: {v}");
            thread::sleep(Duration::from_millis(100));
        }
        // Every broker knows itself a member (one still joining refuses
        // clients with `unavailable`).
        for base in &bases {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mut p = producer(*base, Some(&keys.client("alice")), Duration::from_secs(2));
                if let Ok(protocol::ReplyBody::Cluster { cluster }) =
                    p.request(protocol::ClientCommand::ClusterInfo)
                {
                    if cluster.nodes.len() == 3 && cluster.leader.is_some() {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "broker {base} never joined");
                thread::sleep(Duration::from_millis(50));
            }
        }
        // Every port speaks CURVE only.
        for off in 0..4 {
            assert_eq!(mechanism_of(bases[1] + off), "CURVE", "port +{off}");
        }

        println!("3 nodes over CURVE");
        // A webhook task through the gateway, replicated on two nodes,
        // delivered by the gateway registered over CURVE.
        let rx = Receiver::start();
        let (status, v) = post_form(
            &gateway.url("/queue/hooks"),
            &format!("task.url={}", rx.url("/hook")),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["replicas"], 2, "copies went to a peer over CURVE: {v}");
        assert_eq!(rx.expect(Duration::from_secs(20)).target, "/hook");

        println!("webhook delivered");
        // An admitted producer enqueues on every node; an admitted worker
        // on every node takes them (each task fires on one of its holders).
        let mut workers: Vec<Worker> = bases
            .iter()
            .map(|base| {
                Worker::connect_with(
                    &format!("tcp://127.0.0.1:{}", base + 1),
                    &["curved"],
                    4,
                    false,
                    Some(keys.client("wanda")),
                )
                .unwrap()
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        for base in &bases {
            let mut alice = producer(*base, Some(&keys.client("alice")), Duration::from_secs(10));
            let spec = TaskSpec {
                url: "zmq://curved".into(),
                params: vec![("n".into(), base.to_string())],
                ..Default::default()
            };
            ids.insert(alice.enqueue("jobs", spec).expect("alice enqueues").0);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut done = std::collections::HashSet::new();
        while done.len() < ids.len() {
            assert!(
                Instant::now() < deadline,
                "delivered only {done:?} of {ids:?}"
            );
            for w in workers.iter_mut() {
                if let Some(job) = w.next(Duration::from_millis(50)).unwrap() {
                    assert!(ids.contains(&job.task.id));
                    w.report(&job, protocol::Outcome::Success, None).unwrap();
                    done.insert(job.task.id.clone());
                }
            }
        }
        let mut alice = producer(
            bases[2],
            Some(&keys.client("alice")),
            Duration::from_secs(10),
        );
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(10);
            while alice.get("jobs", id).unwrap().state != protocol::TaskState::Succeeded {
                assert!(Instant::now() < deadline, "{id} never succeeded");
                thread::sleep(Duration::from_millis(20));
            }
        }
        drop(workers);
        println!("admitted producer and worker served on every node");
        // Nothing gets through without an admitted key: no key, an
        // unknown key, a worker's key on the producer port.
        let wait = Duration::from_secs(2);
        for (who, k) in [
            ("no key", None),
            ("mallory", Some(keys.client("mallory"))),
            ("wanda as a producer", Some(keys.client("wanda"))),
        ] {
            let r = producer(bases[1], k.as_ref(), wait).ping();
            assert!(
                matches!(r, Err(client::ClientError::Timeout(_))),
                "{who}: {r:?}"
            );
        }
        println!("unadmitted producers refused");
        // A producer's key or an unknown key on the worker port: the task
        // waiting for its pool is not handed out.
        let mut alice = producer(
            bases[0],
            Some(&keys.client("alice")),
            Duration::from_secs(10),
        );
        let (id, _) = alice
            .enqueue(
                "jobs",
                TaskSpec {
                    url: "zmq://guarded".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        for who in ["alice", "mallory"] {
            let mut w = Worker::connect_with(
                &format!("tcp://127.0.0.1:{}", bases[0] + 1),
                &["guarded"],
                1,
                false,
                Some(keys.client(who)),
            )
            .unwrap();
            // Nothing comes; the worker may also be told that its
            // messages found no connection.
            let got = w.next(Duration::from_secs(3));
            assert!(
                !matches!(got, Ok(Some(_))),
                "{who} got a task on the worker port"
            );
        }
        // Due at once, the task waits for a worker of its pool (scheduled,
        // or running in the dispatcher's line: PROTOCOL.md §18); no
        // worker ever answered it.
        let info = alice.get("jobs", &id).unwrap();
        assert!(
            matches!(
                info.state,
                protocol::TaskState::Scheduled | protocol::TaskState::Running
            ) && info.executions == 0,
            "{info:?}"
        );

        println!("unadmitted workers refused");
        // A fourth node whose peer key is not admitted cannot join; nor
        // can one without CURVE.
        let stranger = h.dir.join("stranger");
        std::fs::create_dir_all(stranger.join("peers")).unwrap();
        std::fs::copy(
            keys.dir.join("server.key_secret"),
            stranger.join("server.key_secret"),
        )
        .unwrap();
        let stranger_key = keygen(h, &stranger.join("peer"));
        let join = format!("tcp://127.0.0.1:{}", bases[0]);
        let stranger_s = stranger.display().to_string();
        for extra in [vec!["--curve-dir", stranger_s.as_str()], vec![]] {
            let base = free_base().to_string();
            let mut args = vec!["broker", "--port", &base, "--in-memory", "--join", &join];
            args.extend(extra);
            h.spawn(&args);
        }
        // The refusal is logged with the peer's address...
        let deadline = Instant::now() + Duration::from_secs(20);
        let line = loop {
            let needle = format!("key={stranger_key}");
            let found = try_last_log_containing(&needle).and_then(|log| {
                log.lines()
                    .find(|l| l.contains(&needle))
                    .map(str::to_string)
            });
            if let Some(l) = found {
                break l;
            }
            assert!(Instant::now() < deadline, "no refused peer logged");
            thread::sleep(Duration::from_millis(100));
        };
        assert!(
            line.contains("refused a ZeroMQ client")
                && line.contains("port=peers")
                && line.contains("peer=127.0.0.1"),
            "{line}"
        );
        // ...and the cluster stays as it was, while both strangers keep
        // asking to join.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let (_, v) = http("GET", &gateway.url("/cluster"), &[], "");
            assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3), "{v}");
            thread::sleep(Duration::from_millis(100));
        }
        let needle = format!("key={}", keys.public["mallory"]);
        let log = last_log_containing(&needle);
        let line = log.lines().find(|l| l.contains(&needle)).unwrap();
        assert!(
            line.contains("port=producers") || line.contains("port=workers"),
            "{line}"
        );
    });
}

#[test]
fn a_broker_refuses_to_start_on_a_bad_key_directory() {
    run(Duration::from_secs(60), |h| {
        let dir = h.dir.join("empty");
        std::fs::create_dir_all(&dir).unwrap();
        let base = free_base().to_string();
        let dir_s = dir.display().to_string();
        let pid = h.spawn(&[
            "broker",
            "--port",
            &base,
            "--in-memory",
            "--curve-dir",
            &dir_s,
        ]);
        let status = h
            .wait_exit(pid, Duration::from_secs(20))
            .expect("the broker stops");
        assert!(!status.success());
        let log = last_log_containing(&format!("{dir_s}/server.key_secret"));
        assert!(log.contains("--curve-dir"), "{log}");
    });
}
