//! The `miyamoto-broker` binary on its own: it serves producers and
//! pulling workers, and links no HTTP code.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use client::{Producer, Worker};
use protocol::{Outcome, TaskSpec, TaskState};

fn free_base() -> u16 {
    for _ in 0..100 {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 65000 && (1..4).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no free port pair");
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn broker_binary_serves_producers_and_workers() {
    let base = free_base();
    let _broker = Kill(
        Command::new(env!("CARGO_BIN_EXE_miyamoto-broker"))
            .args(["--port", &base.to_string(), "--node-id", "solo"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Every call below is bounded: the producer gives up after 3 × 2 s and
    // the worker waits at most 10 s, so a hung broker fails the test.
    let mut p = Producer::connect(&format!("tcp://127.0.0.1:{base}")).unwrap();
    assert_eq!(p.ping().unwrap(), "solo");
    let mut w = Worker::connect(&format!("tcp://127.0.0.1:{}", base + 1), &["bin"], 1).unwrap();
    let (id, _) = p
        .enqueue(
            "default",
            TaskSpec {
                url: "zmq://bin".into(),
                body: Some(b"payload".to_vec().into()),
                ..Default::default()
            },
        )
        .unwrap();
    let job = w.next(Duration::from_secs(10)).unwrap().expect("a task");
    assert_eq!(job.task.id, id);
    assert_eq!(
        job.task.body.as_ref().map(|b| b.to_vec()),
        Some(b"payload".to_vec())
    );
    w.report(&job, Outcome::Failure, Some("first try fails".into()))
        .unwrap();
    let job = w.next(Duration::from_secs(10)).unwrap().expect("the retry");
    assert_eq!(job.task.retry_count, 1);
    assert_eq!(job.task.execution_count, 1);
    w.report(&job, Outcome::Success, None).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = p.get("default", &id).unwrap();
        if t.state == TaskState::Succeeded {
            assert_eq!((t.attempts, t.executions), (2, 2));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stuck in {:?}",
            t.state
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn broker_binary_links_no_http_code() {
    let bytes = std::fs::read(env!("CARGO_BIN_EXE_miyamoto-broker")).unwrap();
    for needle in [&b"hyper"[..], b"rustls", b"tokio"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "miyamoto-broker contains {:?}",
            String::from_utf8_lossy(needle)
        );
    }
}
