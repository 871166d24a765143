//! Webhook delivery semantics: retries with backoff, Retry-After, timeouts,
//! refused connections.

use std::time::Duration;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn retries_500_then_503_with_retry_after_then_200() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        rx.answer([
            Answer::status(500),
            Answer {
                status: 503,
                headers: vec![("retry-after", "1".into())],
                delay: Duration::ZERO,
                body: "busy",
            },
        ]);
        let (status, v) = post_form(
            &node.url("/queue"),
            &format!("task.url={}&x=1", rx.url("/flaky")),
        );
        assert_eq!(status, 200);
        let id = v["id"].as_str().unwrap().to_string();
        let first = rx.expect(Duration::from_secs(10));
        let second = rx.expect(Duration::from_secs(10));
        let third = rx.expect(Duration::from_secs(10));
        for (i, s) in [&first, &second, &third].iter().enumerate() {
            assert_eq!(s.header("x-task-id"), id);
            assert_eq!(
                s.header("x-task-retry-count"),
                i.to_string(),
                "retry count of attempt {i}"
            );
            assert_eq!(
                s.header("x-task-execution-count"),
                i.to_string(),
                "execution count of attempt {i}"
            );
            assert_eq!(&s.body[..], b"x=1");
        }
        // min_backoff is 0.1 s; Retry-After: 1 stretches the second wait.
        let gap1 = second.at - first.at;
        let gap2 = third.at - second.at;
        assert!(gap1 >= 0.09, "first retry after {gap1:.3} s");
        assert!(
            gap2 >= 0.99,
            "Retry-After ignored: second retry after {gap2:.3} s"
        );
        let t = wait_task(&node, "default", &id, Duration::from_secs(5), |t| {
            t["state"] == "succeeded"
        });
        assert_eq!(t["attempts"], 3);
        assert_eq!(t["executions"], 3);
        assert_eq!(t["last_status"], 200);
    });
}

#[test]
fn timeout_and_refused_connection_are_failed_attempts() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let slow = Answer {
            status: 200,
            headers: vec![],
            delay: Duration::from_secs(3),
            body: "slow",
        };
        rx.answer([slow.clone(), slow]);
        let (_, v) = post_form(
            &node.url("/queue"),
            &format!("task.url={}&task.timeout=0.5", rx.url("/slow")),
        );
        let id = v["id"].as_str().unwrap().to_string();
        let first = rx.expect(Duration::from_secs(10));
        // While the second attempt hangs, the first one's error is visible.
        let t = wait_task(&node, "default", &id, Duration::from_secs(10), |t| {
            t["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("timed out"))
        });
        assert_eq!(t["executions"], 0, "{t}");
        let second = rx.expect(Duration::from_secs(10));
        let third = rx.expect(Duration::from_secs(10));
        assert!(second.at - first.at >= 0.5, "retried before the timeout");
        assert!(third.at - second.at >= 0.5, "retried before the timeout");
        // A timed-out attempt got no answer: it is not an execution.
        for (s, n) in [(&second, "1"), (&third, "2")] {
            assert_eq!(s.header("x-task-retry-count"), n);
            assert_eq!(s.header("x-task-execution-count"), "0");
        }
        let t = wait_task(&node, "default", &id, Duration::from_secs(5), |t| {
            t["state"] == "succeeded"
        });
        assert_eq!(
            (t["attempts"].as_u64(), t["executions"].as_u64()),
            (Some(3), Some(1))
        );

        // Nothing listens on this port: connection refused, retried.
        let closed = free_port();
        let (_, v) = post_form(
            &node.url("/queue"),
            &format!("task.url=http://127.0.0.1:{closed}/x"),
        );
        let id = v["id"].as_str().unwrap().to_string();
        let t = wait_task(&node, "default", &id, Duration::from_secs(10), |t| {
            t["attempts"].as_u64().unwrap_or(0) >= 2 && t["state"] == "retrying"
        });
        assert_eq!(t["executions"], 0);
        assert!(t["last_status"].is_null());
        assert!(!t["last_error"].as_str().unwrap_or("").is_empty());
    });
}

/// A target answers 429 with a `Retry-After` past any duration
/// (u64::MAX seconds): the node holds the queue back for at most its
/// longest slow-down, retries the task later, and goes on delivering.
/// This one answer once panicked the scheduler thread (issue 13).
#[test]
fn a_retry_after_past_any_duration_does_not_stop_the_node() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        rx.answer([Answer {
            status: 429,
            headers: vec![("retry-after", "18446744073709551615".into())],
            delay: Duration::ZERO,
            body: "slow down",
        }]);
        let (status, v) = post_form(
            &node.url("/queue/hostile"),
            &format!("task.url={}", rx.url("/hostile")),
        );
        assert_eq!(status, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let first = rx.expect(Duration::from_secs(10));
        assert_eq!(first.header("x-task-id"), id);
        let t = wait_task(&node, "hostile", &id, Duration::from_secs(5), |t| {
            t["state"] == "retrying"
        });
        assert_eq!(t["last_status"], 429);
        // The node still answers, and delivers another queue's task.
        let (status, _) = http("GET", &node.url("/health"), &[], Vec::new());
        assert_eq!(status, 200);
        let (status, v) = post_form(
            &node.url("/queue/other"),
            &format!("task.url={}", rx.url("/other")),
        );
        assert_eq!(status, 200, "{v}");
        let other = rx.expect(Duration::from_secs(10));
        assert_eq!(other.header("x-task-id"), v["id"].as_str().unwrap());
    });
}
