//! Every `miyamoto bench` scenario runs on a small count against a real
//! node and reports sane JSON. Speed is not checked here: that is what the
//! benchmark suite (`bench/run.sh`) is for.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("miyamoto bench");
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bench {args:?}: not JSON ({e})"))
}

fn check(v: &Value, scenario: &str, count: u64) {
    assert_eq!(v["scenario"], scenario, "{v}");
    assert_eq!(v["count"].as_u64(), Some(count), "{v}");
    assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
    assert!(v["per_sec"].as_f64().unwrap() > 0.0, "{v}");
    let p50 = v["latency_ms"]["p50"].as_f64().unwrap();
    let max = v["latency_ms"]["max"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= max, "{v}");
}

#[test]
fn every_bench_scenario_runs_on_a_small_count() {
    run(Duration::from_secs(180), |h| {
        let node = h.standalone();
        let url = node.url("");
        let broker = node.client_endpoint();
        check(
            &bench(&[
                "enqueue-http",
                "--url",
                &url,
                "--requests",
                "200",
                "--concurrency",
                "4",
            ]),
            "enqueue-http",
            200,
        );
        check(
            &bench(&[
                "enqueue-http",
                "--url",
                &url,
                "--requests",
                "200",
                "--format",
                "json",
            ]),
            "enqueue-http",
            200,
        );
        check(
            &bench(&["http-ceiling", "--requests", "200"]),
            "http-ceiling",
            200,
        );
        check(
            &bench(&["enqueue-zmq", "--broker", &broker, "--requests", "500"]),
            "enqueue-zmq",
            500,
        );
        check(
            &bench(&["zmq-ceiling", "--requests", "500"]),
            "zmq-ceiling",
            500,
        );
        let e2e = bench(&["end-to-end", "--url", &url, "--tasks", "200"]);
        check(&e2e, "end-to-end", 200);
        assert_eq!(e2e["extra"]["via"], "http");
        // Batched enqueues, with a count that leaves a short last batch.
        let e2e = bench(&[
            "end-to-end",
            "--url",
            &url,
            "--tasks",
            "250",
            "--batch",
            "100",
        ]);
        check(&e2e, "end-to-end", 250);
        assert_eq!(e2e["extra"]["batch"], 100);
        let e2e = bench(&[
            "end-to-end",
            "--broker",
            &broker,
            "--via",
            "zmq",
            "--tasks",
            "200",
            "--delay",
            "1",
        ]);
        check(&e2e, "end-to-end", 200);
        assert!(
            e2e["extra"]["seconds_total"].as_f64().unwrap() >= 1.0,
            "the delay was not honoured: {e2e}"
        );
        // Delivery alone: every task due at one eta, a second after the start.
        let e2e = bench(&[
            "end-to-end",
            "--url",
            &url,
            "--tasks",
            "200",
            "--batch",
            "100",
            "--delay",
            "1",
            "--same-eta",
        ]);
        check(&e2e, "end-to-end", 200);
        assert_eq!(e2e["extra"]["same_eta"], true, "{e2e}");
        assert!(
            e2e["extra"]["seconds_total"].as_f64().unwrap() >= 1.0,
            "the eta was not honoured: {e2e}"
        );
        // A shared eta the enqueue cannot beat is refused, not measured.
        let out = Command::new(bin())
            .args(["bench", "end-to-end", "--url", &url, "--tasks", "50"])
            .args(["--delay", "0", "--same-eta", "--json"])
            .output()
            .expect("miyamoto bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("raise --delay"),
            "{stderr}"
        );
        check(
            &bench(&["dispatch-ceiling", "--tasks", "200"]),
            "dispatch-ceiling",
            200,
        );
        let t = bench(&[
            "timers", "--broker", &broker, "--tasks", "300", "--window", "1", "--lead", "2",
        ]);
        check(&t, "timers", 300);
        assert!(t["extra"]["enqueue_per_sec"].as_f64().unwrap() > 0.0);

        // The pending-enqueue probes: a second broker stays empty, and the
        // first keeps its load and nothing of the probes.
        let empty_base = free_base();
        h.broker(empty_base);
        let empty = format!("tcp://127.0.0.1:{empty_base}");
        let p = bench(&[
            "enqueue-pending",
            "--broker",
            &broker,
            "--empty-broker",
            &empty,
            "--pending",
            "500",
            "--probe",
            "200",
            "--rounds",
            "2",
        ]);
        check(&p, "enqueue-pending", 400);
        assert_eq!(
            p["extra"]["ratios"].as_array().map(Vec::len),
            Some(2),
            "{p}"
        );
        assert!(p["extra"]["ratio_median"].as_f64().unwrap() > 0.0, "{p}");
        let scheduled = |endpoint: &str, queue: &str| {
            let mut producer = client::Producer::connect(endpoint).unwrap();
            match producer
                .request(protocol::ClientCommand::GetQueue {
                    queue: queue.into(),
                    owned: false,
                })
                .unwrap()
            {
                protocol::ReplyBody::Queue { queue } => queue.stats.scheduled,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(scheduled(&broker, "pending"), 500);
        assert_eq!(scheduled(&broker, "probe"), 0);
        assert_eq!(scheduled(&empty, "probe"), 0);
        assert_eq!(scheduled(&empty, "pending"), 0);
    });
}
