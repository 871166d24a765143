//! The REST API through `miyamoto standalone`: the original README's
//! examples, inspection, cancellation and every kind of bad input.

use std::time::Duration;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn readme_form_example_honours_countdown() {
    let _quiet = heavy();
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let (status, v) = post_form(
            &node.url("/queue"),
            &format!("task.url={}&task.countdown=2&foo=bar", rx.url("/worker")),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["status"], "scheduled");
        let id = v["id"].as_str().unwrap().to_string();
        let eta = v["eta"].as_f64().unwrap();
        let seen = rx.expect(Duration::from_secs(10));
        let late = seen.at - eta;
        assert!(
            (0.0..0.1).contains(&late),
            "delivered {late:.3} s from its eta"
        );
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.target, "/worker");
        assert_eq!(
            seen.header("content-type"),
            "application/x-www-form-urlencoded"
        );
        assert_eq!(seen.header("x-task-id"), id);
        assert_eq!(seen.header("x-task-queue"), "default");
        assert_eq!(seen.header("x-task-retry-count"), "0");
        assert_eq!(seen.header("x-task-execution-count"), "0");
        assert_eq!(
            seen.header("user-agent"),
            format!("miyamoto/{}", env!("CARGO_PKG_VERSION"))
        );
        let header_eta: f64 = seen.header("x-task-eta").parse().unwrap();
        assert!((header_eta - eta).abs() < 1e-5);
        assert_eq!(&seen.body[..], b"foo=bar");
        let t = wait_task(&node, "default", &id, Duration::from_secs(5), |t| {
            t["state"] == "succeeded"
        });
        assert_eq!(t["attempts"], 1);
        assert_eq!(t["last_status"], 200);
    });
}

#[test]
fn readme_json_example_with_misspelt_content_type() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let body = format!(
            r#"{{"url": "{}", "params": {{"foo": "bar"}}}}"#,
            rx.url("/worker")
        );
        let (status, v) = http(
            "POST",
            &node.url("/queue"),
            &[("Content-Type", "applicatoin/json")],
            body,
        );
        assert_eq!(status, 200, "{v}");
        let seen = rx.expect(Duration::from_secs(10));
        assert_eq!(seen.header("x-task-id"), v["id"].as_str().unwrap());
        assert_eq!(&seen.body[..], b"foo=bar");
    });
}

#[test]
fn named_queue_methods_headers_and_raw_bodies() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        // GET: params go to the query string; named task; custom header.
        let (status, v) = post_form(
            &node.url("/queue/emails"),
            &format!(
                "task.url={}&task.method=GET&task.name=n-1&task.header.X-Custom=yes&a=1&b=two+words",
                rx.url("/get?x=0")
            ),
        );
        assert_eq!(status, 200, "{v}");
        let seen = rx.expect(Duration::from_secs(10));
        assert_eq!(seen.method, "GET");
        assert_eq!(seen.target, "/get?x=0&a=1&b=two+words");
        assert_eq!(seen.header("x-task-queue"), "emails");
        assert_eq!(seen.header("x-task-name"), "n-1");
        assert_eq!(seen.header("x-custom"), "yes");
        // JSON with a raw body and its content type, eta in RFC 3339.
        let body = format!(
            r#"{{"url": "{}", "method": "PUT", "body": "{{\"k\": 1}}", "content_type": "application/json", "eta": "2000-01-01T00:00:00Z", "headers": {{"X-A": "b"}}}}"#,
            rx.url("/put")
        );
        let (status, v) = http(
            "POST",
            &node.url("/queue/emails"),
            &[("Content-Type", "application/json")],
            body,
        );
        assert_eq!(status, 200, "{v}");
        let seen = rx.expect(Duration::from_secs(10));
        assert_eq!(seen.method, "PUT");
        assert_eq!(seen.header("content-type"), "application/json");
        assert_eq!(seen.header("x-a"), "b");
        assert_eq!(&seen.body[..], br#"{"k": 1}"#);
        // GET of the task in the wrong queue is 404.
        let id = v["id"].as_str().unwrap();
        let (status, _) = http(
            "GET",
            &node.url(&format!("/queue/default/tasks/{id}")),
            &[],
            "",
        );
        assert_eq!(status, 404);
    });
}

#[test]
fn cancel_and_inspect() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let rx = Receiver::start();
        let (_, v) = post_form(
            &node.url("/queue"),
            &format!("task.url={}&task.countdown=1", rx.url("/never")),
        );
        let id = v["id"].as_str().unwrap().to_string();
        let task_url = node.url(&format!("/queue/default/tasks/{id}"));
        let (status, t) = http("GET", &task_url, &[], "");
        assert_eq!(status, 200);
        assert_eq!(t["state"], "scheduled");
        assert_eq!(t["url"], rx.url("/never"));
        assert_eq!(t["attempts"], 0);
        let (status, c) = http("DELETE", &task_url, &[], "");
        assert_eq!((status, c["status"].as_str()), (200, Some("cancelled")));
        let (_, t) = http("GET", &task_url, &[], "");
        assert_eq!(t["state"], "cancelled");
        // Past its eta: nothing arrives.
        assert!(
            rx.next(Duration::from_millis(1500)).is_none(),
            "a cancelled task was delivered"
        );
        // Unknown ids are 404 for both verbs.
        let missing = node.url("/queue/default/tasks/00000000-0000-0000-0000-000000000000");
        assert_eq!(http("GET", &missing, &[], "").0, 404);
        assert_eq!(http("DELETE", &missing, &[], "").0, 404);
        // A succeeded task cannot be cancelled.
        let (_, v) = post_form(&node.url("/queue"), &format!("task.url={}", rx.url("/now")));
        let id = v["id"].as_str().unwrap().to_string();
        rx.expect(Duration::from_secs(10));
        wait_task(&node, "default", &id, Duration::from_secs(5), |t| {
            t["state"] == "succeeded"
        });
        assert_eq!(
            http(
                "DELETE",
                &node.url(&format!("/queue/default/tasks/{id}")),
                &[],
                ""
            )
            .0,
            404
        );
    });
}

fn assert_error(resp: (u16, serde_json::Value), status: u16, what: &str) {
    assert_eq!(resp.0, status, "{what}: {}", resp.1);
    assert_eq!(resp.1["status"], "error", "{what}");
    assert!(
        resp.1["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{what}: no reason"
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    run(LIMIT, |h| {
        let node = h.standalone();
        let q = node.url("/queue");
        let form = |b: &str| post_form(&q, b);
        assert_error(form("foo=bar"), 400, "missing url");
        assert_error(form("task.url=not%20a%20url"), 400, "unparsable url");
        assert_error(form("task.url=ftp://example.com/"), 400, "ftp scheme");
        assert_error(
            form("task.url=http://a/&task.countdown=soon"),
            400,
            "non-numeric countdown",
        );
        assert_error(
            form("task.url=http://a/&task.countdown=1&task.eta=1"),
            400,
            "countdown and eta",
        );
        let far = (now() + 31.0 * 86400.0).to_string();
        assert_error(
            form(&format!("task.url=http://a/&task.eta={far}")),
            400,
            "eta too far",
        );
        assert_error(form("task.url=http://a/&task.eta=tomorrow"), 400, "bad eta");
        assert_error(
            form("task.url=http://a/&task.name=bad%20name"),
            400,
            "bad name",
        );
        assert_error(
            form("task.url=http://a/&task.method=TRACE"),
            400,
            "bad method",
        );
        assert_error(
            form("task.url=http://a/&task.timeout=-1"),
            400,
            "bad timeout",
        );
        assert_error(
            form("task.url=http://a/&task.unknown=1"),
            400,
            "unknown task field",
        );
        let json = |b: &str| {
            http(
                "POST",
                &q,
                &[("Content-Type", "application/json")],
                b.to_string(),
            )
        };
        assert_error(json("{not json"), 400, "malformed JSON");
        assert_error(json("[1]"), 400, "JSON array");
        assert_error(
            json(r#"{"url": "http://a/", "params": {"a": "b"}, "body": "x"}"#),
            400,
            "params and body",
        );
        assert_error(
            json(r#"{"url": "http://a/", "params": {"a": {"b": 1}}}"#),
            400,
            "nested param",
        );
        assert_error(
            post_form(&node.url("/queue/bad_queue!"), "task.url=http://a/"),
            400,
            "bad queue name",
        );
        let big = format!("task.url=http://a/&data={}", "x".repeat(1024 * 1024 + 1));
        assert_error(form(&big), 413, "body over 1 MiB");
        assert_error(
            http("GET", &node.url("/nowhere"), &[], ""),
            404,
            "unknown path",
        );
        assert_error(http("GET", &q, &[], ""), 405, "GET /queue");
        assert_error(
            http("PUT", &node.url("/queue/default/tasks/x"), &[], ""),
            405,
            "PUT on a task",
        );
        // The node still works after all that.
        let (status, _) = form("task.url=http://127.0.0.1:9/&task.countdown=100");
        assert_eq!(status, 200);
    });
}

#[test]
fn gateway_without_broker_answers_503() {
    run(LIMIT, |h| {
        let http_port = free_port();
        let nobody = free_base();
        h.spawn(&[
            "gateway",
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--broker",
            &format!("tcp://127.0.0.1:{nobody}"),
        ]);
        let url = format!("http://127.0.0.1:{http_port}/queue");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let resp = loop {
            match try_http(
                "POST",
                &url,
                &[("Content-Type", "application/x-www-form-urlencoded")],
                "task.url=http://a/",
            ) {
                Ok(r) => break r,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("gateway never listened: {e}"),
            }
        };
        assert_error(resp, 503, "no broker");
    });
}

#[test]
fn separate_gateway_survives_a_broker_restart() {
    run(LIMIT, |h| {
        let base = free_base();
        let http_port = free_port();
        let broker = h.broker(base);
        let pid = h.spawn(&[
            "gateway",
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--broker",
            &format!("tcp://127.0.0.1:{base}"),
        ]);
        let node = Node {
            base,
            http: http_port,
            pid,
        };
        node.wait_ready();
        let rx = Receiver::start();
        let (status, v) = post_form(
            &node.url("/queue"),
            &format!("task.url={}", rx.url("/before")),
        );
        assert_eq!(status, 200);
        assert_eq!(rx.expect(Duration::from_secs(10)).target, "/before");
        // Recorded as done before the kill: the restarted broker, which
        // recovers its data directory, must not deliver it again.
        let id = v["id"].as_str().unwrap();
        wait_task(&node, "default", id, Duration::from_secs(10), |t| {
            t["state"] == "succeeded"
        });

        h.kill(broker);
        h.broker(base);
        node.wait_ready();
        let (status, _) = post_form(
            &node.url("/queue"),
            &format!("task.url={}", rx.url("/after")),
        );
        assert_eq!(status, 200);
        // The gateway's dispatcher registers again on the new broker.
        assert_eq!(rx.expect(Duration::from_secs(15)).target, "/after");
    });
}
