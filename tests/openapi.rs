//! `GET /openapi.json` (issue 17) kept true: every route the gateway
//! serves is in the description and every operation it describes is
//! served (a request of each method on each path reaches a handler, not
//! "no such endpoint" or "method not allowed"), and schemathesis runs its
//! checks against a live gateway and broker for a bounded number of cases.
//!
//! Every check runs, on every operation but two: for the enqueues (`POST
//! /queue`, `POST /queue/{queue}`), `tests/schemathesis.toml` leaves out
//! `positive_data_acceptance` and `negative_data_rejection`, which hold
//! only when the description is an exact grammar of valid input, and a
//! task's validity (its URL against the target guard, its eta within the
//! horizon from now) is not something JSON Schema can state. The
//! description states what it can (patterns of names, cursors, secrets;
//! ranges).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

/// Every route the gateway serves, as the description names it.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/queue"),
    ("post", "/queue/{queue}"),
    ("get", "/queue/{queue}"),
    ("put", "/queue/{queue}"),
    ("get", "/queues"),
    ("post", "/queue/{queue}/pause"),
    ("post", "/queue/{queue}/resume"),
    ("post", "/queue/{queue}/purge"),
    ("post", "/queue/{queue}/batch"),
    ("get", "/queue/{queue}/tasks"),
    ("get", "/queue/{queue}/tasks/{id}"),
    ("delete", "/queue/{queue}/tasks/{id}"),
    ("post", "/queue/{queue}/tasks/{id}/run"),
    ("get", "/health"),
    ("get", "/cluster"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/ui"),
];

#[test]
fn the_description_names_every_route_and_every_route_it_names_is_served() {
    run(Duration::from_secs(60), |h| {
        let node = h.standalone_with(&["--in-memory"]);
        let (status, doc) = http("GET", &node.url("/openapi.json"), &[], "");
        assert_eq!(status, 200);
        assert_eq!(doc["openapi"], "3.1.0");
        let mut described = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "post", "put", "delete", "patch"] {
                if item.get(method).is_some() {
                    described.push((method.to_string(), path.clone()));
                }
            }
        }
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        described.sort();
        assert_eq!(described, routes, "the description and the routes differ");
        // Each is served: not 404 "no such endpoint", not 405.
        for (method, path) in &routes {
            let concrete = path.replace("{queue}", "described").replace("{id}", "nope");
            let (status, headers, body) = try_http_bytes(
                &method.to_uppercase(),
                &node.url(&concrete),
                &[("Content-Type", "application/json")],
                "{}",
            )
            .unwrap();
            let text = String::from_utf8_lossy(&body);
            assert_ne!(status, 405, "{method} {path}: {text}");
            assert!(
                !(status == 404 && text.contains("no such endpoint")),
                "{method} {path} is not served: {text}"
            );
            // Every JSON answer's content type says so.
            if serde_json::from_slice::<Value>(&body).is_ok() && *path != "/openapi.json" {
                let ct = headers.get("content-type").unwrap().to_str().unwrap();
                assert!(ct.starts_with("application/json"), "{method} {path}: {ct}");
            }
        }
    });
}

fn schemathesis() -> PathBuf {
    venv("schemathesis-env", "tests/openapi-requirements.txt").join("st")
}

#[test]
fn schemathesis_finds_nothing_against_a_live_gateway() {
    // Installing and running schemathesis loads this 2-core machine: not
    // beside the timed tests.
    let _one = heavy();
    let st = schemathesis();
    run(Duration::from_secs(300), move |h| {
        let node = h.standalone_with(&["--in-memory"]);
        let report = h.dir.join("schemathesis.txt");
        let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
        let out = Command::new(&st)
            .arg("--config-file")
            .arg(&config)
            .args([
                "--no-color",
                "run",
                &node.url("/openapi.json"),
                "--max-examples",
                "60",
                "--request-timeout",
                "20",
            ])
            .current_dir(&h.dir)
            .output()
            .expect("st run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::write(&report, &text);
        let summary: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("failures"))
            .collect();
        println!("schemathesis: {summary:?}");
        // The report's lines, each cut short (a failing case can be a
        // megabyte of JSON); the whole of it is in the test's directory.
        let short: String = text
            .lines()
            .map(|l| l.chars().take(300).collect::<String>() + "\n")
            .collect();
        assert!(
            out.status.success(),
            "schemathesis found failures:\n{short}"
        );
        assert!(
            text.contains("Tested: 17"),
            "not every operation was tested:\n{text}"
        );
    });
}
