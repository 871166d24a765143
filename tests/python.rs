//! The Python producer and worker in `examples/python`, written from
//! `PROTOCOL.md` alone, run against a live broker. The test makes its own
//! virtualenv under the target directory (pip needs PyPI the first time).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn venv_python() -> PathBuf {
    venv("pyenv", "examples/python/requirements.txt").join("python")
}

#[test]
fn python_examples_work_against_a_live_broker() {
    let _one = heavy();
    run(Duration::from_secs(300), |h| {
        let python = venv_python();
        let base = free_base();
        h.broker(base);
        let smoke = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/smoke.py");
        let mut child = h.spawn_program(
            python.to_str().unwrap(),
            &[smoke.to_str().unwrap(), "--broker-base", &base.to_string()],
        );
        let status = child.wait().expect("smoke.py");
        assert!(
            status.success(),
            "smoke.py failed; see its log under target/tmp/logs"
        );
    });
}

#[test]
fn python_examples_connect_over_curve() {
    // pip (the first time) and three Python processes: not beside the
    // timed tests.
    let _one = heavy();
    run(Duration::from_secs(300), |h| {
        let python = venv_python();
        let python = python.to_str().unwrap();
        let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python");
        let (producer_py, worker_py) = (examples.join("producer.py"), examples.join("worker.py"));
        let keys =
            crate::curve::Keys::make(h, &[("py", &["producers", "workers"]), ("stranger", &[])]);
        let curve_dir = keys.dir.display().to_string();
        let node = h.standalone_with(&["--in-memory", "--curve-dir", &curve_dir]);
        let broker = node.client_endpoint();
        let server_key = keys.server_key();
        let producer = |key: Option<&str>, args: &[&str]| {
            let mut cmd = Command::new(python);
            cmd.arg(&producer_py)
                .args(["--broker", &broker, "--timeout", "3", "--retries", "0"]);
            if let Some(k) = key {
                cmd.args(["--curve-server-key", &server_key, "--curve-key", k]);
            }
            cmd.args(args).output().expect("producer.py")
        };
        let py_key = keys.secret("py");
        let out = producer(Some(&py_key), &["enqueue", "zmq://py-pool", "n=7"]);
        assert!(out.status.success(), "{out:?}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let id = reply["id"].as_str().expect("an id").to_string();

        // Without a key, and with a key the broker does not admit: no reply.
        let stranger_key = keys.secret("stranger");
        for key in [None, Some(stranger_key.as_str())] {
            let out = producer(key, &["ping"]);
            assert_eq!(out.status.code(), Some(2), "{key:?}: {out:?}");
        }

        // The worker takes the task over CURVE.
        let log = h.dir.join("worker.jsonl");
        let worker_args = [
            worker_py.to_str().unwrap(),
            "--broker",
            &node.worker_endpoint(),
            "--pool",
            "py-pool",
            "--max-tasks",
            "1",
            "--log",
            log.to_str().unwrap(),
            "--curve-server-key",
            &server_key,
            "--curve-key",
            &py_key,
        ];
        let mut worker = h.spawn_program(python, &worker_args);
        let status = worker.wait().expect("worker.py");
        assert!(status.success(), "worker.py failed; see target/tmp/logs");
        let line = std::fs::read_to_string(&log).unwrap();
        assert!(line.contains(&id) && line.contains("success"), "{line}");
        wait_task(&node, "default", &id, Duration::from_secs(10), |v| {
            v["state"] == "succeeded"
        });
    });
}
