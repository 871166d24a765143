//! `GET /metrics` (issue 17) on a live cluster: three brokers and a
//! gateway, tasks enqueued and delivered to a real HTTP receiver, the
//! scrape checked by the real `promtool check metrics`, and the counters
//! summed over the nodes equal to what the test did.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster::Cluster;
use crate::util::*;

/// `promtool check metrics` on `text`: its exit status and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The sum of every sample of `family` whose labels contain all of `with`.
fn sum(text: &str, family: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn scrape(gateway: &Node) -> String {
    let (status, headers, body) =
        try_http_bytes("GET", &gateway.url("/metrics"), &[], "").expect("GET /metrics");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{body}");
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    body
}

#[test]
fn a_clusters_metrics_pass_promtool_and_count_exactly_what_happened() {
    let _one = heavy();
    run(Duration::from_secs(240), |h| {
        let c = Cluster::start(h, 3, &[]);
        let rx = Receiver::start();
        // A queue whose tasks fail: two attempts each, then a dead letter.
        let (status, v) = send_json(
            "PUT",
            &c.gateway.url("/queue/doomed"),
            &json!({"max_attempts": 2, "min_backoff": 0.1, "max_backoff": 0.1}),
        );
        assert_eq!(status, 200, "{v}");
        let before = scrape(&c.gateway);
        let (ok_n, doomed_n) = (60usize, 5usize);
        let mut ids = HashSet::new();
        for i in 0..ok_n {
            let (status, v) = post_form(
                &c.gateway.url("/queue/counted"),
                &format!("task.url={}&i={i}", rx.url("/ok")),
            );
            assert_eq!(status, 200, "{v}");
            ids.insert(v["id"].as_str().unwrap().to_string());
        }
        let failing = Receiver::start();
        failing.answer_all(Answer::status(500));
        for i in 0..doomed_n {
            let (status, v) = post_form(
                &c.gateway.url("/queue/doomed"),
                &format!("task.url={}&i={i}", failing.url("/fail")),
            );
            assert_eq!(status, 200, "{v}");
        }
        let mut seen = HashSet::new();
        while seen.len() < ok_n {
            let s = rx.expect(Duration::from_secs(30));
            seen.insert(s.header("x-task-id").to_string());
        }
        assert_eq!(seen, ids);

        // The counters reach exactly what happened (a result is counted
        // once its broker has it, a moment after the receiver answered).
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            let text = scrape(&c.gateway);
            let done = sum(
                &text,
                "miyamoto_tasks_delivered_total",
                &["queue=\"counted\"", "outcome=\"succeeded\""],
            ) == ok_n as f64
                && sum(
                    &text,
                    "miyamoto_tasks_delivered_total",
                    &["queue=\"doomed\"", "outcome=\"dead_letter\""],
                ) == doomed_n as f64;
            if done {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "counters never got there:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let (ok, said) = promtool(&text);
        assert!(ok, "promtool check metrics: {said}\n{text}");
        let (ok, said) = promtool(&before);
        assert!(ok, "promtool check metrics (before): {said}");

        let count = |family: &str, with: &[&str]| sum(&text, family, with);
        println!(
            "scrape: {} lines; enqueued {} + {}, succeeded {}, dead letters {}, failed attempts {}",
            text.lines().count(),
            count("miyamoto_tasks_enqueued_total", &["queue=\"counted\""]),
            count("miyamoto_tasks_enqueued_total", &["queue=\"doomed\""]),
            count("miyamoto_tasks_delivered_total", &["outcome=\"succeeded\""]),
            count(
                "miyamoto_tasks_delivered_total",
                &["outcome=\"dead_letter\""]
            ),
            count(
                "miyamoto_tasks_delivered_total",
                &["outcome=\"failed_attempt\""]
            ),
        );
        assert_eq!(
            count("miyamoto_tasks_enqueued_total", &["queue=\"counted\""]),
            ok_n as f64
        );
        assert_eq!(
            count("miyamoto_tasks_enqueued_total", &["queue=\"doomed\""]),
            doomed_n as f64
        );
        assert_eq!(
            count(
                "miyamoto_tasks_delivered_total",
                &["queue=\"counted\"", "outcome=\"failed_attempt\""]
            ),
            0.0
        );
        assert_eq!(
            count(
                "miyamoto_tasks_delivered_total",
                &["queue=\"doomed\"", "outcome=\"failed_attempt\""]
            ),
            2.0 * doomed_n as f64
        );
        assert_eq!(
            count("miyamoto_tasks_retried_total", &["queue=\"doomed\""]),
            doomed_n as f64
        );
        // Every task is held twice (two replicas); the final ones stay
        // for their retention.
        assert_eq!(
            count(
                "miyamoto_tasks",
                &["queue=\"counted\"", "state=\"succeeded\""]
            ),
            2.0 * ok_n as f64,
            "{text}"
        );
        assert_eq!(
            count("miyamoto_tasks", &["queue=\"doomed\"", "state=\"failed\""]),
            2.0 * doomed_n as f64
        );
        // Each node reports the cluster as it sees it.
        assert_eq!(count("miyamoto_broker_up", &[]), 3.0, "{text}");
        assert_eq!(count("miyamoto_cluster_members", &[]), 9.0);
        assert_eq!(count("miyamoto_cluster_is_leader", &[]), 1.0);
        assert_eq!(count("miyamoto_cluster_has_leader", &[]), 3.0);
        assert_eq!(count("miyamoto_cluster_peer_up", &[]), 6.0);
        // The gateway is each node's *http worker; each node keeps a journal.
        assert_eq!(count("miyamoto_workers", &["pool=\"*http\""]), 3.0);
        assert!(count("miyamoto_journal_bytes", &[]) > 0.0);
        assert!(count("miyamoto_journal_sync_seconds_count", &[]) > 0.0);
        assert!(
            count("miyamoto_dispatch_lateness_seconds_count", &[]) >= (ok_n + 2 * doomed_n) as f64
        );
        assert!(
            count(
                "miyamoto_webhook_duration_seconds_count",
                &["status_class=\"2xx\""]
            ) >= ok_n as f64
        );
        assert_eq!(
            count(
                "miyamoto_webhook_duration_seconds_count",
                &["status_class=\"5xx\""]
            ),
            2.0 * doomed_n as f64
        );
        // No task ids in labels.
        for id in &ids {
            assert!(!text.contains(id.as_str()));
        }

        // A broker that is down is reported so, and the scrape still works.
        h.kill(c.pids[2]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = scrape(&c.gateway);
            if sum(&text, "miyamoto_broker_up", &[]) == 2.0 {
                assert!(promtool(&text).0);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the dead broker still up:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

#[test]
fn metrics_need_the_read_scope_when_tokens_are_set() {
    run(Duration::from_secs(60), |h| {
        let node = h.standalone_with(&[
            "--in-memory",
            "--api-token",
            "metrics-reader-0123456789:read",
        ]);
        let (status, _) = try_http("GET", &node.url("/metrics"), &[], "").unwrap();
        assert_eq!(status, 401);
        let (status, _) = try_http(
            "GET",
            &node.url("/metrics"),
            &[("Authorization", "Bearer metrics-reader-0123456789")],
            "",
        )
        .unwrap();
        assert_eq!(status, 200);
    });
}

#[test]
fn json_logs_carry_each_request_and_delivery_in_a_span() {
    run(Duration::from_secs(60), |h| {
        let node = h.standalone_env(
            &["--in-memory", "--log-format", "json"],
            &[("RUST_LOG", "info,gateway=debug")],
        );
        let rx = Receiver::start();
        let (status, v) = post_form(
            &node.url("/queue/json-logged"),
            &format!("task.url={}", rx.url("/hook")),
        );
        assert_eq!(status, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        rx.expect(Duration::from_secs(10));
        // The delivery's line comes once its result is in.
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = loop {
            if let Some(log) = try_last_log_containing(&format!("\"task\":\"{id}\"")) {
                if log.contains("\"message\":\"delivered\"") {
                    break log;
                }
            }
            assert!(Instant::now() < deadline, "no delivery logged for {id}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut delivered = false;
        let mut answered = false;
        let mut enqueued = false;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message == "delivered" && v["span"]["task"] == id.as_str() {
                assert_eq!(v["span"]["queue"], "json-logged", "{line}");
                assert_eq!(v["level"], "DEBUG");
                delivered = true;
            }
            if message == "answered" && v["span"]["path"] == "/queue/json-logged" {
                assert_eq!(v["fields"]["status"], 200, "{line}");
                assert_eq!(v["span"]["queue"], "json-logged", "{line}");
                answered = true;
            }
            if message == "enqueued" && v["fields"]["task"] == id.as_str() {
                assert_eq!(v["span"]["queue"], "json-logged", "{line}");
                enqueued = true;
            }
        }
        assert!(delivered && answered && enqueued, "{log}");
    });
}
