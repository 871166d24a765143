//! The dashboard (issue 17) in a real browser: `tests/ui/dashboard.mjs`
//! drives Debian's chromium with playwright-core against a live
//! `miyamoto standalone`: the queue and its tasks appear, the queue is
//! paused through the page (and the API says so), a dead letter is opened
//! and run again (and the API sees its second attempt), the cluster page
//! lists the node; a screenshot goes to `target/ui-dashboard.png`. The
//! gateway has an API token: the page asks for it and sends it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

const TOKEN: &str = "ui-admin-token-0123456789";

/// A call with the token; the status and the JSON answer.
fn call(method: &str, url: &str, form: &str) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    try_http(method, url, &headers, form.to_string()).unwrap()
}

/// Polls a task with the token until `pred` holds.
fn wait_for(node: &Node, queue: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = call("GET", &node.url(&format!("/queue/{queue}/tasks/{id}")), "");
        if status == 200 && pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "task {id}: {status} {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tools() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/ui/dashboard.mjs");
    assert!(
        root.join("tests/ui/node_modules/playwright-core").exists(),
        "playwright-core is missing: run `npm ci --prefix tests/ui` (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "chromium is missing: apt-get install chromium (.ci/run does)"
    );
    (script, root.join("target/ui-dashboard.png"))
}

#[test]
fn the_dashboard_shows_pauses_and_runs_again_in_a_real_browser() {
    let (script, shot) = tools();
    // A browser loads this 2-core machine: not beside the timed tests.
    let _one = heavy();
    run(Duration::from_secs(180), move |h| {
        let node = h.standalone_with(&["--in-memory", "--api-token", TOKEN]);
        for i in 0..3 {
            let (status, v) = call(
                "POST",
                &node.url("/queue/ui-demo"),
                &format!("task.url=http://127.0.0.1:9/x&task.countdown=3600&task.name=demo-{i}"),
            );
            assert_eq!(status, 200, "{v}");
        }
        let failing = Receiver::start();
        failing.answer_all(Answer::status(500));
        let auth = format!("Bearer {TOKEN}");
        let (status, v) = try_http(
            "PUT",
            &node.url("/queue/ui-dead"),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            json!({"max_attempts": 1}).to_string(),
        )
        .unwrap();
        assert_eq!(status, 200, "{v}");
        let (status, v) = call(
            "POST",
            &node.url("/queue/ui-dead"),
            &format!("task.url={}", failing.url("/fail")),
        );
        assert_eq!(status, 200, "{v}");
        let dead = v["id"].as_str().unwrap().to_string();
        wait_for(&node, "ui-dead", &dead, |t| t["state"] == "failed");

        let _ = std::fs::remove_file(&shot);
        let lines = h.spawn_program_piped(
            "node",
            &[
                script.to_str().unwrap(),
                &format!("http://127.0.0.1:{}", node.http),
                shot.to_str().unwrap(),
                TOKEN,
            ],
        );
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l == "DONE" => break,
                Ok(l) => {
                    println!("browser: {l}");
                    assert!(!l.starts_with("PAGEERROR"), "{l}");
                    seen.push(l);
                }
                Err(_) => panic!(
                    "the browser script stopped after {seen:?} (its log is under target/tmp/logs)"
                ),
            }
        }
        let has = |p: &str| seen.iter().any(|l| l.starts_with(p));
        assert!(has("ASKED FOR A TOKEN"), "{seen:?}");
        assert!(
            seen.iter().any(|l| l.starts_with("QUEUE ui-demo 3 ")),
            "{seen:?}"
        );
        assert!(has("TASKS 3"), "{seen:?}");
        assert!(has("PAUSED"), "{seen:?}");
        assert!(seen.iter().any(|l| l == &format!("RAN {dead}")), "{seen:?}");
        assert!(
            seen.iter()
                .any(|l| l.starts_with("DETAIL") && l.contains("500")),
            "the detail shows the last status: {seen:?}"
        );
        assert!(has("NODES 1"), "{seen:?}");

        // What the page did, seen through the API.
        let (_, q) = call("GET", &node.url("/queue/ui-demo"), "");
        assert_eq!(q["paused"], true, "{q}");
        wait_for(&node, "ui-dead", &dead, |t| {
            t["attempts"] == 2 && t["state"] == "failed"
        });
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 10_000,
            "screenshot {} is {size} bytes",
            shot.display()
        );
    });
}
