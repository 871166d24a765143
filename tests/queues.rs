//! Queue controls through `miyamoto standalone`: configuration three ways,
//! rate limits, concurrency caps, pause/resume/purge, names and
//! idempotency keys, dead letters and `run`, results and `wait`,
//! callbacks, batches and webhook signatures.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(90);

fn enqueue_json(node: &Node, queue: &str, task: Value) -> (u16, Value) {
    send_json("POST", &node.url(&format!("/queue/{queue}")), &task)
}

fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

#[test]
fn rate_limit_holds_every_one_second_window() {
    let _quiet = heavy();
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let (status, q) = send_json(
            "PUT",
            &node.url("/queue/limited"),
            &json!({"rate": 20, "burst": 5}),
        );
        assert_eq!(status, 200, "{q}");
        assert_eq!(
            (q["config"]["rate"].as_f64(), q["config"]["burst"].as_u64()),
            (Some(20.0), Some(5))
        );
        let tasks: Vec<Value> = (0..100)
            .map(|i| json!({"url": rx.url("/r"), "params": {"i": i}}))
            .collect();
        let (status, results) = send_json(
            "POST",
            &node.url("/queue/limited/batch"),
            &Value::Array(tasks),
        );
        assert_eq!(status, 200, "{results}");
        let mut times: Vec<f64> = (0..100)
            .map(|_| rx.expect(Duration::from_secs(20)).at)
            .collect();
        times.sort_by(f64::total_cmp);
        let mut worst = 0;
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().take_while(|u| **u < t + 1.0).count();
            worst = worst.max(in_window);
        }
        assert!(
            worst <= 25,
            "{worst} dispatches within one second (rate 20 + burst 5)"
        );
        // 100 tasks at 20/s after a burst of 5 take at least ~4.7 s.
        assert!(
            times[99] - times[0] >= 4.5,
            "all 100 within {:.2} s",
            times[99] - times[0]
        );
        // The last result may still be on its way back: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let q = loop {
            let (_, q) = http("GET", &node.url("/queue/limited"), &[], "");
            if q["stats"]["succeeded"] == 100 || Instant::now() > deadline {
                break q;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(q["stats"]["succeeded"], 100, "{q}");
        assert!(
            q["stats"]["dispatches_per_second"].as_f64().unwrap() > 1.0,
            "{q}"
        );
    });
}

#[test]
fn max_concurrent_caps_deliveries_in_flight() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        rx.answer_all(Answer {
            delay: Duration::from_millis(300),
            ..Answer::status(200)
        });
        send_json(
            "PUT",
            &node.url("/queue/capped"),
            &json!({"max_concurrent": 2}),
        );
        for i in 0..10 {
            let (s, _) = enqueue_json(
                &node,
                "capped",
                json!({"url": rx.url("/slow"), "params": {"i": i}}),
            );
            assert_eq!(s, 200);
        }
        for _ in 0..10 {
            rx.expect(Duration::from_secs(20));
        }
        assert_eq!(
            rx.max_in_flight(),
            2,
            "the cap of 2 was not reached or was exceeded"
        );
    });
}

#[test]
fn named_tasks_are_duplicate_then_tombstoned_and_idempotency_keys_dedupe() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let body = format!(
            "task.url={}&task.name=nightly-report&task.countdown=1",
            rx.url("/n")
        );
        let (s, first) = post_form(&node.url("/queue/names"), &body);
        assert_eq!(s, 200);
        let (s, dup) = post_form(&node.url("/queue/names"), &body);
        assert_eq!((s, dup["status"].as_str()), (409, Some("duplicate")));
        assert_eq!(dup["id"], first["id"]);
        rx.expect(Duration::from_secs(10));
        wait_task(
            &node,
            "names",
            &id_of(&first),
            Duration::from_secs(5),
            |t| t["state"] == "succeeded",
        );
        let (s, tomb) = post_form(&node.url("/queue/names"), &body);
        assert_eq!((s, tomb["status"].as_str()), (409, Some("tombstoned")));
        assert_eq!(tomb["id"], first["id"]);
        // The same name in another queue is another task.
        assert_eq!(post_form(&node.url("/queue/other"), &body).0, 200);
        // A deleted task's name is tombstoned too.
        let (_, del) = post_form(
            &node.url("/queue/names"),
            &format!(
                "task.url={}&task.name=deleted&task.countdown=60",
                rx.url("/d")
            ),
        );
        http(
            "DELETE",
            &node.url(&format!("/queue/names/tasks/{}", id_of(&del))),
            &[],
            "",
        );
        let (s, v) = post_form(
            &node.url("/queue/names"),
            &format!("task.url={}&task.name=deleted", rx.url("/d")),
        );
        assert_eq!((s, v["status"].as_str()), (409, Some("tombstoned")));
        // Idempotency-Key on unnamed tasks.
        let headers = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Idempotency-Key", "order-42"),
        ];
        let form = format!("task.url={}&task.countdown=60", rx.url("/i"));
        let (s, a) = http("POST", &node.url("/queue/names"), &headers, form.clone());
        assert_eq!(s, 200);
        let (s, b) = http("POST", &node.url("/queue/names"), &headers, form);
        assert_eq!((s, b["status"].as_str()), (409, Some("duplicate")));
        assert_eq!(a["id"], b["id"]);
    });
}

#[test]
fn pause_resume_and_purge() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let (s, q) = http("POST", &node.url("/queue/p/pause"), &[], "");
        assert_eq!((s, q["paused"].as_bool()), (200, Some(true)));
        for i in 0..3 {
            post_form(
                &node.url("/queue/p"),
                &format!("task.url={}&i={i}", rx.url("/p")),
            );
        }
        assert!(
            rx.next(Duration::from_millis(800)).is_none(),
            "a paused queue dispatched"
        );
        let (_, q) = http("GET", &node.url("/queue/p"), &[], "");
        assert_eq!(q["stats"]["scheduled"], 3, "{q}");
        assert!(q["stats"]["lag"].as_f64().unwrap() > 0.5, "{q}");
        let (_, q) = http("POST", &node.url("/queue/p/resume"), &[], "");
        assert_eq!(q["paused"], false);
        for _ in 0..3 {
            rx.expect(Duration::from_secs(10));
        }
        // Purge removes what was created before it, names included.
        http("POST", &node.url("/queue/p/pause"), &[], "");
        post_form(
            &node.url("/queue/p"),
            &format!("task.url={}&task.name=keep-me", rx.url("/x")),
        );
        post_form(&node.url("/queue/p"), &format!("task.url={}", rx.url("/x")));
        let (s, v) = http("POST", &node.url("/queue/p/purge"), &[], "");
        assert_eq!((s, v["removed"].as_u64()), (200, Some(5)), "{v}");
        http("POST", &node.url("/queue/p/resume"), &[], "");
        assert!(
            rx.next(Duration::from_millis(800)).is_none(),
            "a purged task was delivered"
        );
        let (s, _) = post_form(
            &node.url("/queue/p"),
            &format!("task.url={}&task.name=keep-me", rx.url("/again")),
        );
        assert_eq!(s, 200, "purge must leave no tombstone");
        assert_eq!(rx.expect(Duration::from_secs(10)).target, "/again");
    });
}

#[test]
fn dead_letters_are_kept_listed_rerun_and_removed() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        send_json(
            "PUT",
            &node.url("/queue/dl"),
            &json!({"max_attempts": 2, "min_backoff": 0.1}),
        );
        rx.answer_all(Answer {
            body: "boom",
            ..Answer::status(500)
        });
        let (_, a) = enqueue_json(&node, "dl", json!({"url": rx.url("/a")}));
        let (_, b) = enqueue_json(&node, "dl", json!({"url": rx.url("/b")}));
        for id in [id_of(&a), id_of(&b)] {
            let t = wait_task(&node, "dl", &id, Duration::from_secs(10), |t| {
                t["state"] == "failed"
            });
            assert_eq!(
                (t["attempts"].as_u64(), t["last_status"].as_u64()),
                (Some(2), Some(500))
            );
            assert_eq!(t["last_response"], "boom");
        }
        let (_, list) = http("GET", &node.url("/queue/dl/tasks?state=failed"), &[], "");
        assert_eq!(list["tasks"].as_array().unwrap().len(), 2, "{list}");
        assert!(
            list["tasks"][0].get("body").is_none(),
            "bodies only with view=full"
        );
        let (_, full) = http(
            "GET",
            &node.url("/queue/dl/tasks?state=failed&view=full&limit=1"),
            &[],
            "",
        );
        assert_eq!(full["tasks"].as_array().unwrap().len(), 1);
        assert_eq!(full["tasks"][0]["last_response"], "boom");
        let cursor = full["next_cursor"]
            .as_str()
            .expect("a second page")
            .to_string();
        let (_, page2) = http(
            "GET",
            &node.url(&format!(
                "/queue/dl/tasks?state=failed&limit=1&cursor={cursor}"
            )),
            &[],
            "",
        );
        assert_eq!(page2["tasks"].as_array().unwrap().len(), 1);
        assert!(page2["next_cursor"].is_null());
        assert_ne!(page2["tasks"][0]["id"], full["tasks"][0]["id"]);
        // Re-run one dead letter, now against a healthy receiver.
        while rx.next(Duration::from_millis(100)).is_some() {}
        rx.answer_all(Answer::status(200));
        let (s, t) = http(
            "POST",
            &node.url(&format!("/queue/dl/tasks/{}/run", id_of(&a))),
            &[],
            "",
        );
        assert_eq!(s, 200, "{t}");
        assert_eq!(
            rx.expect(Duration::from_secs(10))
                .header("x-task-retry-count"),
            "2"
        );
        wait_task(&node, "dl", &id_of(&a), Duration::from_secs(5), |t| {
            t["state"] == "succeeded"
        });
        // Remove the other one.
        let (s, _) = http(
            "DELETE",
            &node.url(&format!("/queue/dl/tasks/{}", id_of(&b))),
            &[],
            "",
        );
        assert_eq!(s, 200);
        let (_, list) = http("GET", &node.url("/queue/dl/tasks?state=failed"), &[], "");
        assert_eq!(list["tasks"].as_array().unwrap().len(), 0);
        // `run` ignores the eta; a running or finished task cannot be run.
        let (_, later) = enqueue_json(
            &node,
            "dl",
            json!({"url": rx.url("/later"), "countdown": 3600}),
        );
        let (s, _) = http(
            "POST",
            &node.url(&format!("/queue/dl/tasks/{}/run", id_of(&later))),
            &[],
            "",
        );
        assert_eq!(s, 200);
        assert_eq!(rx.expect(Duration::from_secs(10)).target, "/later");
        wait_task(&node, "dl", &id_of(&later), Duration::from_secs(5), |t| {
            t["state"] == "succeeded"
        });
        let (s, _) = http(
            "POST",
            &node.url(&format!("/queue/dl/tasks/{}/run", id_of(&later))),
            &[],
            "",
        );
        assert_eq!(s, 409);
    });
}

#[test]
fn no_retry_header_fails_the_task_at_once() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        rx.answer([Answer {
            headers: vec![("x-task-no-retry", "true".into())],
            ..Answer::status(422)
        }]);
        let (_, v) = enqueue_json(&node, "default", json!({"url": rx.url("/nr")}));
        rx.expect(Duration::from_secs(10));
        let t = wait_task(&node, "default", &id_of(&v), Duration::from_secs(5), |t| {
            t["state"] == "failed"
        });
        assert_eq!(
            (t["attempts"].as_u64(), t["last_status"].as_u64()),
            (Some(1), Some(422))
        );
        assert!(
            rx.next(Duration::from_millis(500)).is_none(),
            "retried despite X-Task-No-Retry"
        );
    });
}

#[test]
fn wait_returns_the_workers_answer() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        rx.answer([Answer {
            body: "hello from the worker",
            ..Answer::status(201)
        }]);
        let (s, v) = post_form(
            &node.url("/queue?wait=10"),
            &format!("task.url={}", rx.url("/sync")),
        );
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["response"]["status"], 201);
        assert_eq!(v["response"]["body"], "hello from the worker");
        // A failing first attempt is reported as such.
        rx.answer([Answer {
            body: "nope",
            ..Answer::status(500)
        }]);
        let (s, v) = post_form(
            &node.url("/queue?wait=10"),
            &format!("task.url={}", rx.url("/sync")),
        );
        assert_eq!(
            (s, v["status"].as_str(), v["response"]["status"].as_u64()),
            (200, Some("failed"), Some(500))
        );
        // A wait that runs out answers 202 with the task still scheduled.
        let started = Instant::now();
        let (s, v) = post_form(
            &node.url("/queue?wait=0.5"),
            &format!("task.url={}&task.countdown=30", rx.url("/later")),
        );
        assert_eq!((s, v["status"].as_str()), (202, Some("scheduled")), "{v}");
        assert!(started.elapsed() >= Duration::from_millis(450));
        assert_eq!(
            post_form(&node.url("/queue?wait=soon"), "task.url=http://a/").0,
            400
        );
    });
}

#[test]
fn callbacks_report_success_and_failure() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let worker = Receiver::start();
        let callbacks = Receiver::start();
        send_json("PUT", &node.url("/queue/cb"), &json!({"max_attempts": 1}));
        worker.answer([Answer {
            body: "done",
            ..Answer::status(200)
        }]);
        let (_, ok) = enqueue_json(
            &node,
            "cb",
            json!({"url": worker.url("/ok"), "callback_url": callbacks.url("/succeeded")}),
        );
        worker.expect(Duration::from_secs(10));
        let cb = callbacks.expect(Duration::from_secs(10));
        assert_eq!(cb.target, "/succeeded");
        assert_eq!(cb.header("content-type"), "application/json");
        let report: Value = serde_json::from_slice(&cb.body).unwrap();
        assert_eq!(report["task_id"], ok["id"]);
        assert_eq!(
            (report["status"].as_str(), report["last_status"].as_u64()),
            (Some("succeeded"), Some(200))
        );
        assert_eq!(report["response_body"], "done");

        worker.answer([Answer::status(500)]);
        let form = format!(
            "task.url={}&task.failure_callback_url={}&task.callback_url={}",
            worker.url("/bad"),
            callbacks.url("/failed"),
            callbacks.url("/never")
        );
        let (_, bad) = post_form(&node.url("/queue/cb"), &form);
        worker.expect(Duration::from_secs(10));
        let cb = callbacks.expect(Duration::from_secs(10));
        assert_eq!(cb.target, "/failed");
        let report: Value = serde_json::from_slice(&cb.body).unwrap();
        assert_eq!(report["task_id"], bad["id"]);
        assert_eq!(
            (report["status"].as_str(), report["attempts"].as_u64()),
            (Some("failed"), Some(1))
        );
        assert!(callbacks.next(Duration::from_millis(500)).is_none());
        // A bad callback URL is refused at enqueue.
        let (s, _) = enqueue_json(
            &node,
            "cb",
            json!({"url": worker.url("/x"), "callback_url": "ftp://x"}),
        );
        assert_eq!(s, 400);
    });
}

#[test]
fn batch_with_one_bad_item() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let batch = json!([
            {"url": rx.url("/one"), "name": "b-1"},
            {"url": "ftp://nope"},
            {"url": rx.url("/three"), "params": {"x": {"nested": true}}},
            {"url": rx.url("/four")},
            {"url": rx.url("/five"), "name": "b-1"},
        ]);
        let (s, v) = send_json("POST", &node.url("/queue/batches/batch"), &batch);
        assert_eq!(s, 200, "{v}");
        let statuses: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            ["scheduled", "error", "error", "scheduled", "duplicate"]
        );
        assert!(v[1]["reason"].as_str().unwrap().contains("scheme"));
        let mut targets: Vec<String> = (0..2)
            .map(|_| rx.expect(Duration::from_secs(10)).target)
            .collect();
        targets.sort();
        assert_eq!(targets, ["/four", "/one"]);
        let too_many = Value::Array((0..1001).map(|_| json!({"url": rx.url("/x")})).collect());
        assert_eq!(
            send_json("POST", &node.url("/queue/batches/batch"), &too_many).0,
            400
        );
    });
}

/// Standard Webhooks verification written from the spec with `ring`, not
/// the gateway's code: every `v1,` signature must match one of `secrets`.
fn verify(seen: &Seen, secrets: &[&str]) -> usize {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = seen.header("webhook-id");
    let ts = seen.header("webhook-timestamp");
    assert!(!id.is_empty() && !ts.is_empty(), "unsigned webhook");
    let age = now() - ts.parse::<f64>().unwrap();
    assert!(age.abs() < 300.0, "timestamp off by {age} s");
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(&seen.body);
    let expected: Vec<String> = secrets
        .iter()
        .map(|s| {
            let key = ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &b64.decode(s.trim_start_matches("whsec_")).unwrap(),
            );
            b64.encode(ring::hmac::sign(&key, &signed).as_ref())
        })
        .collect();
    let mut valid = 0;
    for sig in seen.header("webhook-signature").split(' ') {
        let (version, value) = sig.split_once(',').expect("v1,<sig>");
        assert_eq!(version, "v1");
        assert!(
            expected.iter().any(|e| e == value),
            "signature {value} matches no secret"
        );
        valid += 1;
    }
    valid
}

#[test]
fn webhooks_are_signed_per_standard_webhooks() {
    run(LIMIT, |h| {
        let global = "whsec_c2VjcmV0LW9mLXRoZS1nYXRld2F5";
        let old = "whsec_b2xkLXF1ZXVlLWtleQ==";
        let new = "whsec_bmV3LXF1ZXVlLWtleQ==";
        let node = h.standalone_with(&["--signing-secret", global]);
        let rx = Receiver::start();
        let (_, v) = post_form(
            &node.url("/queue"),
            &format!("task.url={}&foo=bar", rx.url("/signed")),
        );
        let seen = rx.expect(Duration::from_secs(10));
        assert_eq!(seen.header("webhook-id"), v["id"].as_str().unwrap());
        assert_eq!(verify(&seen, &[global]), 1);
        // A queue with its own secrets (mid-rotation: two) signs with both.
        let (s, q) = send_json(
            "PUT",
            &node.url("/queue/rotating"),
            &json!({"signing_secrets": [old, new]}),
        );
        assert_eq!(s, 200);
        assert_eq!(
            q["config"]["signing_secrets"],
            json!(["***", "***"]),
            "secrets must not be echoed"
        );
        enqueue_json(
            &node,
            "rotating",
            json!({"url": rx.url("/rotated"), "body": "{\"k\": 1}", "content_type": "application/json"}),
        );
        let seen = rx.expect(Duration::from_secs(10));
        assert_eq!(verify(&seen, &[old, new]), 2);
        // A tampered body fails verification.
        let mut tampered = seen.clone();
        tampered.body = bytes::Bytes::from_static(b"{\"k\": 2}");
        let caught = std::panic::catch_unwind(|| verify(&tampered, &[old, new]));
        assert!(caught.is_err(), "a tampered body verified");
        assert_eq!(
            send_json(
                "PUT",
                &node.url("/queue/rotating"),
                &json!({"signing_secrets": ["not base64!"]})
            )
            .0,
            400
        );
    });
}

#[test]
fn queue_configuration_three_ways_and_figures() {
    run(LIMIT, |h| {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let file = dir.join(format!("queues-{}.toml", std::process::id()));
        std::fs::write(&file, "[defaults]\nmax_attempts = 7\n\n[queues.filed]\nrate = 3.5\nburst = 2\nmax_concurrent = 4\ntimeout = 12\n").unwrap();
        let node = h.standalone_with(&["--config", file.to_str().unwrap()]);
        let (s, q) = http("GET", &node.url("/queue/filed"), &[], "");
        assert_eq!(s, 200);
        let c = &q["config"];
        assert_eq!(
            (
                c["rate"].as_f64(),
                c["burst"].as_u64(),
                c["max_concurrent"].as_u64()
            ),
            (Some(3.5), Some(2), Some(4))
        );
        assert_eq!(
            (c["timeout"].as_f64(), c["max_attempts"].as_i64()),
            (Some(12.0), Some(7))
        );
        // Queues created on first use take the file's defaults.
        let (_, fresh) = http("GET", &node.url("/queue/fresh"), &[], "");
        assert_eq!(fresh["config"]["max_attempts"], 7);
        // HTTP.
        let (s, q) = send_json(
            "PUT",
            &node.url("/queue/filed"),
            &json!({"max_age": 600, "dedup_window": 10}),
        );
        assert_eq!(s, 200, "{q}");
        assert_eq!(
            (
                q["config"]["max_age"].as_f64(),
                q["config"]["rate"].as_f64()
            ),
            (Some(600.0), Some(3.5))
        );
        assert_eq!(
            send_json("PUT", &node.url("/queue/filed"), &json!({"rat": 1})).0,
            400,
            "unknown field"
        );
        assert_eq!(
            send_json("PUT", &node.url("/queue/filed"), &json!({"burst": 0})).0,
            400
        );
        // ZeroMQ.
        let mut p = client::Producer::connect(&node.client_endpoint()).unwrap();
        let reply = p
            .request(protocol::ClientCommand::ConfigureQueue {
                queue: "filed".into(),
                config: protocol::QueueConfigPatch {
                    min_backoff: Some(2.0),
                    ..Default::default()
                },
            })
            .unwrap();
        assert!(
            matches!(reply, protocol::ReplyBody::Queue { ref queue } if queue.config.min_backoff == 2.0),
            "{reply:?}"
        );
        let (_, q) = http("GET", &node.url("/queue/filed"), &[], "");
        assert_eq!(q["config"]["min_backoff"], 2.0);
        // The task default timeout comes from the queue.
        let (_, v) = post_form(
            &node.url("/queue/filed"),
            "task.url=http://127.0.0.1:9/&task.countdown=60",
        );
        let (_, t) = http(
            "GET",
            &node.url(&format!("/queue/filed/tasks/{}", id_of(&v))),
            &[],
            "",
        );
        assert_eq!(t["timeout"], 12.0);
        let (_, all) = http("GET", &node.url("/queues"), &[], "");
        let names: Vec<&str> = all["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"filed"), "{names:?}");
        let filed = all["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "filed")
            .unwrap();
        assert_eq!(filed["stats"]["scheduled"], 1);
        let _ = std::fs::remove_file(file);
    });
}
