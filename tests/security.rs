//! Who may call the API (issue 16), on real processes: API tokens and
//! their scopes, the protected default of a gateway without tokens (only
//! loopback clients), and the rules that keep a web page in a browser
//! out (`Origin`, `Sec-Fetch-Site`, `Host`).

use std::time::Duration;

use crate::util::*;

const ADMIN: &str = "admin-3f9c2b7e41d8a6c0";
const READ: &str = "read-8d1e6a4f2c9b7035";
const ENQUEUE: &str = "enqueue-5a7c1e9d3b8f2064";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The answer's status to `method url` with `headers` and a form body.
fn status_of(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let mut h = vec![("Content-Type", "application/x-www-form-urlencoded")];
    h.extend_from_slice(headers);
    try_http(method, url, &h, body.to_string())
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
        .0
}

/// A non-loopback address of this machine, to reach a gateway listening on
/// every interface as a remote client would.
fn outside_address() -> String {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("the ip command (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .expect("a global IPv4 address on this machine, to test the protected default")
}

#[test]
fn each_scope_is_allowed_its_routes_and_refused_the_others() {
    run(Duration::from_secs(60), |h| {
        let enq = format!("{ENQUEUE}:enqueue:emails,jobs-*");
        let rd = format!("{READ}:read");
        let node = h.standalone_env(
            &["--api-token", &enq, "--api-token", &rd],
            // The admin token comes from the environment.
            &[("MIYAMOTO_API_TOKENS", ADMIN)],
        );
        let url = |p: &str| node.url(p);
        let task = "task.url=http://127.0.0.1:9/x&task.countdown=3600";
        let (a, r, e) = (bearer(ADMIN), bearer(READ), bearer(ENQUEUE));
        fn auth(t: &str) -> Vec<(&'static str, &str)> {
            vec![("Authorization", t)]
        }

        // No token, a wrong one, a malformed header.
        let (s, hdrs, v) = try_http_headers(
            "POST",
            &url("/queue/emails"),
            &[("Content-Type", "application/x-www-form-urlencoded")],
            task,
        )
        .unwrap();
        assert_eq!(s, 401, "{v}");
        assert_eq!(
            hdrs.get("www-authenticate").and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
        assert!(v["reason"].as_str().unwrap().contains("Bearer"), "{v}");
        assert_eq!(
            status_of(
                "POST",
                &url("/queue/emails"),
                &auth("Bearer wrong-token-000000000000"),
                task
            ),
            401
        );
        assert_eq!(
            status_of("POST", &url("/queue/emails"), &auth(ADMIN), task),
            401
        );
        // Health is open.
        assert_eq!(status_of("GET", &url("/health"), &[], ""), 200);

        // enqueue, on its queues only.
        let (s, v) = try_http(
            "POST",
            &url("/queue/emails"),
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Authorization", &e),
            ],
            task.to_string(),
        )
        .unwrap();
        assert_eq!(s, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(
            status_of("POST", &url("/queue/jobs-7"), &auth(&e), task),
            200
        );
        assert_eq!(
            status_of(
                "POST",
                &url("/queue/jobs-7/batch"),
                &[("Authorization", &e), ("Content-Type", "application/json")],
                ""
            ),
            400
        );
        let (s, v) = try_http(
            "POST",
            &url("/queue/other"),
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Authorization", &e),
            ],
            task.to_string(),
        )
        .unwrap();
        assert_eq!(s, 403, "{v}");
        assert!(
            v["reason"]
                .as_str()
                .unwrap()
                .contains("enqueue scope on queue \"other\""),
            "{v}"
        );
        assert_eq!(status_of("POST", &url("/queue"), &auth(&e), task), 403);
        let task_url = url(&format!("/queue/emails/tasks/{id}?view=full"));
        assert_eq!(status_of("GET", &task_url, &auth(&e), ""), 403);
        assert_eq!(
            status_of("POST", &url("/queue/emails/purge"), &auth(&e), ""),
            403
        );

        // read: views and listings, nothing else.
        assert_eq!(status_of("GET", &task_url, &auth(&r), ""), 200);
        assert_eq!(
            status_of("GET", &url("/queue/emails/tasks"), &auth(&r), ""),
            200
        );
        assert_eq!(status_of("GET", &url("/queues"), &auth(&r), ""), 200);
        assert_eq!(status_of("GET", &url("/cluster"), &auth(&r), ""), 200);
        assert_eq!(
            status_of("POST", &url("/queue/emails"), &auth(&r), task),
            403
        );
        assert_eq!(
            status_of(
                "PUT",
                &url("/queue/emails"),
                &[("Authorization", &r), ("Content-Type", "application/json")],
                "{\"rate\": 5}"
            ),
            403
        );
        assert_eq!(
            status_of(
                "DELETE",
                &url(&format!("/queue/emails/tasks/{id}")),
                &auth(&r),
                ""
            ),
            403
        );

        // admin: everything.
        assert_eq!(
            status_of(
                "PUT",
                &url("/queue/emails"),
                &[("Authorization", &a), ("Content-Type", "application/json")],
                "{\"rate\": 5}"
            ),
            200
        );
        assert_eq!(
            status_of("POST", &url("/queue/emails/pause"), &auth(&a), ""),
            200
        );
        assert_eq!(
            status_of("POST", &url("/queue/emails/resume"), &auth(&a), ""),
            200
        );
        assert_eq!(
            status_of("POST", &url("/queue/other"), &auth(&a), task),
            200
        );
        assert_eq!(status_of("GET", &task_url, &auth(&a), ""), 200);
        assert_eq!(
            status_of("POST", &url("/queue/emails/purge"), &auth(&a), ""),
            200
        );

        // No token is ever written to the log.
        h.kill(node.pid);
        let log = last_log_containing(&format!("127.0.0.1:{}", node.http));
        for t in [ADMIN, READ, ENQUEUE] {
            assert!(!log.contains(t), "a token is in the log");
        }
    });
}

#[test]
fn without_tokens_only_loopback_is_served_unless_told_otherwise() {
    run(Duration::from_secs(60), |h| {
        let outside = outside_address();
        let task = "task.url=http://127.0.0.1:9/x&task.countdown=3600";
        let port = free_port();
        let base = free_base();
        let pid = h.spawn(&[
            "standalone",
            "--port",
            &base.to_string(),
            "--listen",
            &format!("0.0.0.0:{port}"),
        ]);
        let node = Node {
            base,
            http: port,
            pid,
        };
        node.wait_ready();
        assert_eq!(
            status_of("POST", &format!("http://127.0.0.1:{port}/queue"), &[], task),
            200
        );
        let far = format!("http://{outside}:{port}");
        let (s, v) = try_http(
            "POST",
            &format!("{far}/queue"),
            &[("Content-Type", "application/x-www-form-urlencoded")],
            task.to_string(),
        )
        .unwrap();
        assert_eq!(s, 403, "{v}");
        let reason = v["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("--api-token")
                && reason.contains("--no-auth")
                && reason.contains(&outside),
            "{v}"
        );
        assert_eq!(
            status_of("GET", &format!("{far}/queue/default/tasks"), &[], ""),
            403
        );
        assert_eq!(status_of("GET", &format!("{far}/health"), &[], ""), 200);
        h.kill(pid);
        let log = last_log_containing("without API tokens: only loopback clients are served");
        assert!(log.contains(&format!("0.0.0.0:{port}")), "{log}");

        // --no-auth serves everyone.
        let pid = h.spawn(&[
            "standalone",
            "--port",
            &base.to_string(),
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--no-auth",
        ]);
        let node = Node {
            base,
            http: port,
            pid,
        };
        node.wait_ready();
        assert_eq!(status_of("POST", &format!("{far}/queue"), &[], task), 200);
    });
}

#[test]
fn pages_from_other_origins_and_rebound_names_are_refused() {
    run(Duration::from_secs(60), |h| {
        let node = h.standalone_with(&[
            "--allowed-origins",
            "https://dash.example.com",
            "--allowed-hosts",
            "queue.example.com",
        ]);
        let url = node.url("/queue");
        let own = format!("http://127.0.0.1:{}", node.http);
        let task = "task.url=http://127.0.0.1:9/x&task.countdown=3600";
        // A cross-site form, and a text/plain body holding JSON.
        assert_eq!(
            status_of("POST", &url, &[("Origin", "http://evil.example")], task),
            403
        );
        let (s, _) = try_http(
            "POST",
            &url,
            &[
                ("Origin", "http://evil.example"),
                ("Content-Type", "text/plain"),
            ],
            "{\"task\": {\"url\": \"http://127.0.0.1:9/x\"}}".to_string(),
        )
        .unwrap();
        assert_eq!(s, 403);
        assert_eq!(
            status_of(
                "POST",
                &node.url("/queue/default/purge"),
                &[("Origin", "null")],
                ""
            ),
            403
        );
        assert_eq!(
            status_of("POST", &url, &[("Sec-Fetch-Site", "cross-site")], task),
            403
        );
        // DNS rebinding: a name the gateway does not serve.
        assert_eq!(
            status_of(
                "GET",
                &node.url("/queue/default/tasks?view=full"),
                &[("Host", &format!("evil.example:{}", node.http))],
                ""
            ),
            421
        );
        // Its own pages, a listed origin and name, and plain clients.
        assert_eq!(
            status_of(
                "POST",
                &url,
                &[("Origin", &own), ("Sec-Fetch-Site", "same-origin")],
                task
            ),
            200
        );
        assert_eq!(
            status_of(
                "POST",
                &url,
                &[("Origin", "https://dash.example.com")],
                task
            ),
            200
        );
        assert_eq!(
            status_of(
                "GET",
                &node.url("/queues"),
                &[("Host", "queue.example.com")],
                ""
            ),
            200
        );
        assert_eq!(status_of("POST", &url, &[], task), 200);
    });
}
