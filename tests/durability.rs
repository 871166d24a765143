//! A queue that remembers (issue 15), on real processes: nodes keep their
//! state in their data directory (the default `./miyamoto-data`, here the
//! test's own directory), are killed with `kill -9` while enqueues are
//! still arriving, and are started again on the same ports. Every
//! acknowledged task must be delivered after the restart; names of tasks
//! that had finished stay taken; a producer's resend of an acknowledged
//! request id is answered with its first task, not enqueued again.
//!
//! Each webhook is matched to its enqueue by a unique parameter `c`.
//! Duplicates are counted and printed: only tasks whose delivery was under
//! way at the kill may be delivered twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use protocol::{ClientCommand, ClientReply, ClientRequest, ReplyBody, TaskSpec};

use crate::cluster::Cluster;
use crate::util::*;

/// Webhooks seen, by their `c` parameter: how many, and when the first.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, (u32, Instant)>>>);

impl Seen {
    /// Counts every webhook `rx` receives, from now on.
    fn count(rx: Arc<Receiver>) -> Seen {
        let seen = Seen::default();
        let s = seen.clone();
        thread::spawn(move || loop {
            if let Some(w) = rx.next(Duration::from_millis(200)) {
                s.0.lock()
                    .unwrap()
                    .entry(w.form("c"))
                    .or_insert((0, Instant::now()))
                    .0 += 1;
            }
        });
        seen
    }

    fn get(&self, tag: &str) -> u32 {
        self.0.lock().unwrap().get(tag).map_or(0, |e| e.0)
    }

    /// When `tag` was first delivered.
    fn first(&self, tag: &str) -> Option<Instant> {
        self.0.lock().unwrap().get(tag).map(|e| e.1)
    }

    /// Waits until every tag has been seen; the ones never seen.
    fn wait_all<'a>(
        &self,
        tags: impl Iterator<Item = &'a str> + Clone,
        wait: Duration,
    ) -> Vec<String> {
        let deadline = Instant::now() + wait;
        loop {
            let missing: Vec<String> = tags
                .clone()
                .filter(|t| self.get(t) == 0)
                .map(str::to_string)
                .collect();
            if missing.is_empty() || Instant::now() > deadline {
                return missing;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An acknowledged enqueue.
#[derive(Clone, Debug)]
struct Acked {
    tag: String,
    id: String,
    /// The ZeroMQ request id (for a resend), if sent over ZeroMQ.
    request_id: Option<String>,
}

/// Producers enqueueing until told to stop: HTTP ones to `http`, ZeroMQ
/// ones to the brokers' client ports. Countdowns of 2 to 6 s; every tenth
/// task named.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(http: &[String], zmq_endpoints: &[String], target: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (w, url) in http.iter().enumerate() {
            let (stop, acked, url, target) =
                (stop.clone(), acked.clone(), url.clone(), target.to_string());
            threads.push(thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let tag = format!("h{w}-{n}");
                    let countdown = 2 + n % 5;
                    let name = if n % 10 == 0 {
                        format!("&task.name={tag}")
                    } else {
                        String::new()
                    };
                    let body =
                        format!("task.url={target}&task.countdown={countdown}&c={tag}{name}");
                    let r = try_http(
                        "POST",
                        &url,
                        &[("Content-Type", "application/x-www-form-urlencoded")],
                        body,
                    );
                    match r {
                        Ok((200, v)) => acked.lock().unwrap().push(Acked {
                            tag,
                            id: v["id"].as_str().unwrap_or_default().to_string(),
                            request_id: None,
                        }),
                        _ => thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
        }
        for (w, ep) in zmq_endpoints.iter().enumerate() {
            let (stop, acked, ep, target) =
                (stop.clone(), acked.clone(), ep.clone(), target.to_string());
            threads.push(thread::spawn(move || {
                let ctx = zmq::Context::new();
                let mut n = 0u32;
                let mut sock = dealer(&ctx, &ep);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let tag = format!("z{w}-{n}");
                    let request_id = format!("req-{tag}");
                    let task = task_spec(&target, &tag, 2.0 + f64::from(n % 5), n % 10 == 0);
                    match zmq_enqueue(&sock, &request_id, task, Duration::from_secs(2)) {
                        Some(ReplyBody::Enqueued { id, .. }) => acked.lock().unwrap().push(Acked {
                            tag,
                            id,
                            request_id: Some(request_id),
                        }),
                        // Unanswered: a fresh connection for the next one.
                        None => sock = dealer(&ctx, &ep),
                        Some(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
        }
        Load {
            stop,
            acked,
            threads,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn stop(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

fn dealer(ctx: &zmq::Context, ep: &str) -> zmq::Socket {
    let s = ctx.socket(zmq::DEALER).unwrap();
    s.set_linger(0).unwrap();
    s.connect(ep).unwrap();
    s
}

fn task_spec(target: &str, tag: &str, countdown: f64, named: bool) -> TaskSpec {
    TaskSpec {
        url: target.to_string(),
        countdown: Some(countdown),
        params: vec![("c".into(), tag.into())],
        name: named.then(|| tag.to_string()),
        ..Default::default()
    }
}

/// One enqueue over ZeroMQ under `request_id`; its reply, or `None`
/// after `wait`.
fn zmq_enqueue(
    sock: &zmq::Socket,
    request_id: &str,
    task: TaskSpec,
    wait: Duration,
) -> Option<ReplyBody> {
    let request = ClientRequest {
        request_id: request_id.to_string(),
        command: ClientCommand::Enqueue {
            queue: "default".into(),
            task,
            wait: None,
        },
    };
    sock.send_multipart(protocol::encode(&request), 0).ok()?;
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if sock
            .poll(zmq::POLLIN, left.as_millis().max(1) as i64)
            .ok()?
            == 0
        {
            return None;
        }
        let parts = sock.recv_multipart(0).ok()?;
        if let Ok(reply) = protocol::decode::<ClientReply, _>(&parts) {
            if reply.request_id == request_id {
                return Some(reply.body);
            }
        }
    }
    None
}

/// Duplicates among `acked`: (tag, deliveries) of those delivered more
/// than once.
fn duplicates(seen: &Seen, acked: &[Acked]) -> Vec<(String, u32)> {
    acked
        .iter()
        .filter(|a| seen.get(&a.tag) > 1)
        .map(|a| (a.tag.clone(), seen.get(&a.tag)))
        .collect()
}

/// Tasks named `early0..N` that finish before the load starts: their
/// names must stay taken after the restart.
fn finish_named(url: &str, target: &str, seen: &Seen, n: usize) -> Vec<String> {
    let tags: Vec<String> = (0..n).map(|i| format!("early{i}")).collect();
    for t in &tags {
        let (status, v) = post_form(
            url,
            &format!("task.url={target}&task.countdown=0&task.name={t}&c={t}"),
        );
        assert_eq!(status, 200, "{v}");
    }
    let missing = seen.wait_all(tags.iter().map(String::as_str), Duration::from_secs(20));
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    tags
}

fn assert_tombstoned(url: &str, target: &str, tags: &[String]) {
    for t in tags {
        let (status, v) = post_form(url, &format!("task.url={target}&task.name={t}&c=again-{t}"));
        assert_eq!(
            status, 409,
            "the name {t} is free again after the restart: {v}"
        );
    }
}

#[test]
fn a_node_killed_mid_load_delivers_every_acknowledged_task_after_its_restart() {
    let _one = heavy();
    run(Duration::from_secs(180), |h| {
        let rx = Arc::new(Receiver::start());
        let target = rx.url("/w");
        let seen = Seen::count(rx.clone());
        let node = h.standalone();
        let early = finish_named(&node.url("/queue"), &target, &seen, 20);
        let load = Load::start(
            &[node.url("/queue"), node.url("/queue")],
            &[node.client_endpoint()],
            &target,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.count() < 2500 {
            assert!(
                Instant::now() < deadline,
                "only {} enqueues in 30 s",
                load.count()
            );
            thread::sleep(Duration::from_millis(20));
        }
        // Killed while the producers are still sending.
        h.kill(node.pid);
        let killed_at = Instant::now();
        let acked = load.stop();
        let restarted = h.standalone_at(node.base, node.http, &[]);
        let missing = seen.wait_all(
            acked.iter().map(|a| a.tag.as_str()),
            Duration::from_secs(40),
        );
        let dups = duplicates(&seen, &acked);
        println!(
            "durability (one node): {} acknowledged, {} lost, {} delivered twice: {:?}",
            acked.len(),
            missing.len(),
            dups.len(),
            &dups[..dups.len().min(10)]
        );
        assert!(
            missing.is_empty(),
            "{} acknowledged tasks lost: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        // Only a task whose webhook went out in the last second before the
        // kill may come again (its success may not have been recorded yet:
        // at least once).
        let unexplained: Vec<&(String, u32)> = dups
            .iter()
            .filter(|(t, _)| {
                seen.first(t)
                    .is_none_or(|at| at + Duration::from_secs(1) < killed_at || at > killed_at)
            })
            .collect();
        assert!(
            unexplained.is_empty(),
            "delivered twice though not under way at the kill: {unexplained:?}"
        );
        assert_tombstoned(&restarted.url("/queue"), &target, &early);
        // A producer resends an acknowledged request: the same task.
        let ctx = zmq::Context::new();
        let sock = dealer(&ctx, &restarted.client_endpoint());
        let sent: Vec<&Acked> = acked.iter().filter(|a| a.request_id.is_some()).collect();
        assert!(!sent.is_empty(), "no enqueue over ZeroMQ was acknowledged");
        for a in sent.iter().step_by((sent.len() / 20).max(1)) {
            let rid = a.request_id.as_deref().unwrap_or_default();
            let task = task_spec(&target, &format!("resent-{}", a.tag), 0.0, false);
            match zmq_enqueue(&sock, rid, task, Duration::from_secs(5)) {
                Some(ReplyBody::Enqueued { id, .. }) => assert_eq!(id, a.id, "resent {rid}"),
                other => panic!("resent {rid}: {other:?}"),
            }
        }
        thread::sleep(Duration::from_millis(500));
        assert_eq!(
            seen.get(&format!("resent-{}", sent[0].tag)),
            0,
            "a resend was enqueued again"
        );
    });
}

#[test]
fn a_cluster_killed_all_at_once_delivers_every_acknowledged_task() {
    let _one = heavy();
    run(Duration::from_secs(240), |h| {
        let rx = Arc::new(Receiver::start());
        let target = rx.url("/w");
        let seen = Seen::count(rx.clone());
        let extra = ["--replica-offset", "2"];
        let c = Cluster::start(h, 3, &extra);
        let url = c.gateway.url("/queue");
        let early = finish_named(&url, &target, &seen, 10);
        let endpoints: Vec<String> = c
            .bases
            .iter()
            .map(|b| format!("tcp://127.0.0.1:{b}"))
            .collect();
        let load = Load::start(&[url.clone(), url.clone()], &endpoints, &target);
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.count() < 2000 {
            assert!(
                Instant::now() < deadline,
                "only {} enqueues in 30 s",
                load.count()
            );
            thread::sleep(Duration::from_millis(20));
        }
        for pid in &c.pids {
            h.kill(*pid);
        }
        let acked = load.stop();
        // Started again with their directories, without --join: the
        // cluster forms again from the saved Raft state.
        let started = Instant::now();
        for (i, base) in c.bases.iter().enumerate() {
            let name = format!("n{i}");
            let base_s = base.to_string();
            let mut args = vec!["broker", "--port", &base_s, "--node-id", &name];
            args.extend_from_slice(&extra);
            h.spawn(&args);
        }
        c.wait_for(Duration::from_secs(30), |v| {
            v["leader"].is_u64()
                && v["nodes"]
                    .as_array()
                    .is_some_and(|a| a.len() == 3 && a.iter().all(|x| x["alive"] == true))
        });
        let formed = started.elapsed().as_secs_f64();
        let missing = seen.wait_all(
            acked.iter().map(|a| a.tag.as_str()),
            Duration::from_secs(60),
        );
        let dups = duplicates(&seen, &acked);
        println!(
            "durability (three nodes killed at once): {} acknowledged, {} lost, {} delivered twice, a leader and the roster in {formed:.1} s",
            acked.len(),
            missing.len(),
            dups.len()
        );
        assert!(
            missing.is_empty(),
            "{} acknowledged tasks lost: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        assert!(
            dups.len() * 100 <= acked.len(),
            "more than 1 % delivered twice: {:?}",
            &dups[..dups.len().min(30)]
        );
        assert_tombstoned(&url, &target, &early);
    });
}

#[test]
fn a_second_process_on_a_data_directory_fails_at_once_naming_the_holder() {
    run(Duration::from_secs(60), |h| {
        let node = h.standalone();
        let base = free_base();
        let pid = h.spawn(&[
            "broker",
            "--port",
            &base.to_string(),
            "--node-id",
            &format!("node-{}", node.base),
        ]);
        let status = h
            .wait_exit(pid, Duration::from_secs(20))
            .expect("it should stop at once");
        assert!(!status.success());
        let log = last_log_containing("in use by another process");
        assert!(log.contains(&format!("pid {}", node.pid)), "{log}");
        assert!(log.contains(&format!("node-{}", node.base)), "{log}");
    });
}

#[test]
fn a_damaged_journal_stops_the_start_and_salvage_starts_from_the_last_good_record() {
    run(Duration::from_secs(90), |h| {
        let node = h.standalone();
        let url = node.url("/queue");
        let mut ids = Vec::new();
        for i in 0..30 {
            let (s, v) = post_form(
                &url,
                &format!("task.url=http://127.0.0.1:9/x&task.countdown=3600&c={i}"),
            );
            assert_eq!(s, 200);
            ids.push(v["id"].as_str().unwrap().to_string());
        }
        h.kill(node.pid);
        let dir = h
            .dir
            .join("miyamoto-data")
            .join(format!("node-{}", node.base));
        let segment = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "journal"))
            .expect("a journal segment");
        let mut bytes = std::fs::read(&segment).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&segment, &bytes).unwrap();
        // Without salvage: the start stops, naming the file and offset.
        let args = [
            "standalone",
            "--port",
            &node.base.to_string(),
            "--listen",
            &format!("127.0.0.1:{}", node.http),
        ];
        let pid = h.spawn(&args);
        let status = h
            .wait_exit(pid, Duration::from_secs(20))
            .expect("it should refuse to start");
        assert!(!status.success());
        let log = last_log_containing("is damaged at byte");
        let name = segment.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            log.contains(&name) && log.contains("--salvage-journal"),
            "{log}"
        );
        // With it: the records before the damage are back.
        let restarted = h.standalone_at(node.base, node.http, &["--salvage-journal"]);
        let (s, v) = http(
            "GET",
            &restarted.url(&format!("/queue/default/tasks/{}", ids[0])),
            &[],
            "",
        );
        assert_eq!(s, 200, "{v}");
        let aside = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".damaged")
            })
            .count();
        assert!(aside >= 1, "the damaged segment was not set aside");
    });
}

/// The member id of the node named `name`, as the cluster's view names it.
fn member_id(v: &serde_json::Value, name: &str) -> Option<u64> {
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .and_then(|n| n["id"].as_u64())
}

/// Enqueues `n` tasks through the gateway, countdown `countdown`; their
/// tags.
fn enqueue_tagged(url: &str, target: &str, prefix: &str, n: usize, countdown: f64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let tag = format!("{prefix}{i}");
            let (s, v) = post_form(
                url,
                &format!("task.url={target}&task.countdown={countdown}&c={tag}"),
            );
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["replicas"], 2, "{v}");
            tag
        })
        .collect()
}

#[test]
fn a_member_restarted_within_the_removal_time_rejoins_as_itself_and_fires_nothing_delivered_meanwhile(
) {
    let _one = heavy();
    run(Duration::from_secs(180), |h| {
        let rx = Arc::new(Receiver::start());
        let target = rx.url("/w");
        let seen = Seen::count(rx.clone());
        let extra = ["--replica-offset", "2", "--remove-after", "60"];
        let c = Cluster::start(h, 3, &extra);
        let url = c.gateway.url("/queue");
        let before = c.wait_for(Duration::from_secs(10), |v| member_id(v, "n2").is_some());
        let id = member_id(&before, "n2");
        let tags = enqueue_tagged(&url, &target, "t", 60, 2.0);
        // n2 goes down before any is due; the others deliver them all.
        h.kill(c.pids[2]);
        let missing = seen.wait_all(tags.iter().map(String::as_str), Duration::from_secs(30));
        assert!(
            missing.is_empty(),
            "not delivered while n2 was down: {missing:?}"
        );
        let base_s = c.bases[2].to_string();
        let mut args = vec!["broker", "--port", &base_s, "--node-id", "n2"];
        args.extend_from_slice(&extra);
        h.spawn(&args);
        let after = c.wait_for(Duration::from_secs(20), |v| {
            v["leader"].is_u64()
                && v["nodes"]
                    .as_array()
                    .is_some_and(|a| a.len() == 3 && a.iter().all(|x| x["alive"] == true))
        });
        assert_eq!(
            member_id(&after, "n2"),
            id,
            "n2 came back under another id: {after}"
        );
        // Its copies would have fired by now (replica 1 of a task due 2 s
        // after the enqueue, long past): none may fire again.
        thread::sleep(Duration::from_secs(6));
        let twice: Vec<(String, u32)> = tags
            .iter()
            .map(|t| (t.clone(), seen.get(t)))
            .filter(|(_, n)| *n > 1)
            .collect();
        assert!(
            twice.is_empty(),
            "delivered again by the restarted node: {twice:?}"
        );
        // And it serves: a new task is stored on two nodes.
        let more = enqueue_tagged(&url, &target, "after", 10, 0.0);
        let missing = seen.wait_all(more.iter().map(String::as_str), Duration::from_secs(20));
        assert!(missing.is_empty(), "{missing:?}");
    });
}

#[test]
fn a_member_removed_while_down_rejoins_under_its_id_and_loses_nothing() {
    let _one = heavy();
    run(Duration::from_secs(180), |h| {
        let rx = Arc::new(Receiver::start());
        let target = rx.url("/w");
        let seen = Seen::count(rx.clone());
        let extra = ["--replica-offset", "2", "--remove-after", "2"];
        let c = Cluster::start(h, 3, &extra);
        let url = c.gateway.url("/queue");
        let before = c.wait_for(Duration::from_secs(10), |v| member_id(v, "n2").is_some());
        let id = member_id(&before, "n2");
        let tags = enqueue_tagged(&url, &target, "t", 40, 12.0);
        h.kill(c.pids[2]);
        c.wait_for(Duration::from_secs(30), |v| {
            v["leader"].is_u64() && v["nodes"].as_array().is_some_and(|a| a.len() == 2)
        });
        let base_s = c.bases[2].to_string();
        let mut args = vec!["broker", "--port", &base_s, "--node-id", "n2"];
        args.extend_from_slice(&extra);
        h.spawn(&args);
        let after = c.wait_for(Duration::from_secs(30), |v| {
            v["leader"].is_u64()
                && v["nodes"]
                    .as_array()
                    .is_some_and(|a| a.len() == 3 && a.iter().all(|x| x["alive"] == true))
        });
        assert_eq!(
            member_id(&after, "n2"),
            id,
            "n2 came back under another id: {after}"
        );
        let missing = seen.wait_all(tags.iter().map(String::as_str), Duration::from_secs(40));
        assert!(missing.is_empty(), "lost: {missing:?}");
        thread::sleep(Duration::from_secs(4));
        let twice: Vec<(String, u32)> = tags
            .iter()
            .map(|t| (t.clone(), seen.get(t)))
            .filter(|(_, n)| *n > 1)
            .collect();
        println!(
            "removed while down: {} tasks, {} delivered twice: {twice:?}",
            tags.len(),
            twice.len()
        );
        // Its recovered copies learnt the tasks' current holders and went.
        assert!(twice.is_empty(), "delivered twice: {twice:?}");
    });
}

#[test]
fn a_disk_below_its_reserve_refuses_new_tasks_and_goes_on_delivering() {
    run(Duration::from_secs(90), |h| {
        let rx = Arc::new(Receiver::start());
        let target = rx.url("/w");
        let seen = Seen::count(rx.clone());
        let node = h.standalone();
        let (s, v) = post_form(
            &node.url("/queue"),
            &format!("task.url={target}&task.countdown=3&c=before"),
        );
        assert_eq!(s, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        h.kill(node.pid);
        // A reserve larger than any disk: the disk is "full".
        let full = h.standalone_at(node.base, node.http, &["--min-free-disk", "1000000G"]);
        let (s, v) = post_form(&full.url("/queue"), &format!("task.url={target}&c=refused"));
        assert_eq!(s, 429, "{v}");
        assert!(
            v["reason"]
                .as_str()
                .unwrap_or("")
                .contains("--min-free-disk"),
            "{v}"
        );
        let missing = seen.wait_all(["before"].into_iter(), Duration::from_secs(20));
        assert!(missing.is_empty(), "the task held was not delivered");
        // Its success was recorded: it is still succeeded after a restart.
        wait_task(&full, "default", &id, Duration::from_secs(10), |t| {
            t["state"] == "succeeded"
        });
        h.kill(full.pid);
        let again = h.standalone_at(node.base, node.http, &[]);
        wait_task(&again, "default", &id, Duration::from_secs(10), |t| {
            t["state"] == "succeeded"
        });
        let (s, _) = post_form(&again.url("/queue"), &format!("task.url={target}&c=after"));
        assert_eq!(s, 200);
    });
}

#[test]
fn a_damaged_raft_state_stops_the_start_and_never_votes() {
    run(Duration::from_secs(90), |h| {
        let base = free_base();
        let base_s = base.to_string();
        let args = ["broker", "--port", base_s.as_str(), "--node-id", "solo"];
        let pid = h.spawn(&args);
        let mut p = client::Producer::connect(&format!("tcp://127.0.0.1:{base}")).unwrap();
        p.ping().unwrap();
        h.kill(pid);
        let file = h.dir.join("miyamoto-data/solo/raft.state");
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        // Refused, naming the file and the way out.
        let pid = h.spawn(&args);
        let status = h
            .wait_exit(pid, Duration::from_secs(20))
            .expect("it should refuse to start");
        assert!(!status.success());
        let log = last_log_containing("raft.state is damaged");
        assert!(
            log.contains("--salvage-journal") && log.contains("--join"),
            "{log}"
        );
        // Salvage without --join: still refused (it must not vote, and must
        // not start a cluster of its own); the state is set aside.
        let mut salvage = args.to_vec();
        salvage.push("--salvage-journal");
        let pid = h.spawn(&salvage);
        let status = h
            .wait_exit(pid, Duration::from_secs(20))
            .expect("it should refuse to start");
        assert!(!status.success());
        assert!(h.dir.join("miyamoto-data/solo/raft.state.damaged").exists());
    });
}
