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

/// `method url` with a form body, sent from inside network namespace
/// `ns` (by Python's urllib, which every test machine has): the status and
/// the JSON answer.
fn from_namespace(ns: &str, method: &str, url: &str, body: &str) -> (u16, serde_json::Value) {
    let script = r#"
import sys, urllib.request, urllib.error
method, url, body = sys.argv[1:4]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method,
    headers={"Content-Type": "application/x-www-form-urlencoded"})
try:
    r = urllib.request.urlopen(req, timeout=10); status, text = r.status, r.read()
except urllib.error.HTTPError as e:
    status, text = e.code, e.read()
print(status); print(text.decode())
"#;
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "python3", "-c", script, method, url, body,
        ])
        .output()
        .expect("ip netns exec python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text
        .split_once('\n')
        .unwrap_or_else(|| panic!("no answer from inside {ns}: {out:?}"));
    (
        status.trim().parse().unwrap(),
        serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null),
    )
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
        // A client on another host: a network namespace of its own, on a
        // bridge to this one.
        let hosts =
            crate::cluster::Hosts::setup(1).expect("network namespaces (root and iproute2)");
        let (ns, outside) = (hosts.namespace(0).to_string(), hosts.addr(0));
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
        let far = format!("http://{}:{port}", hosts.bridge_addr());
        let (s, v) = from_namespace(&ns, "POST", &format!("{far}/queue"), task);
        assert_eq!(s, 403, "{v}");
        let reason = v["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("--api-token")
                && reason.contains("--no-auth")
                && reason.contains(&outside),
            "{v}"
        );
        let (s, _) = from_namespace(&ns, "GET", &format!("{far}/queue/default/tasks"), "");
        assert_eq!(s, 403);
        assert_eq!(
            from_namespace(&ns, "GET", &format!("{far}/health"), "").0,
            200
        );
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
        assert_eq!(
            from_namespace(&ns, "POST", &format!("{far}/queue"), task).0,
            200
        );
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

#[test]
fn the_target_guard_refuses_metadata_user_information_and_denied_ranges() {
    run(Duration::from_secs(60), |h| {
        let rx = Receiver::start();
        let port = rx.addr.port();
        let node = h.standalone();
        let url = node.url("/queue");
        // The defaults: metadata endpoints, link-local, unspecified.
        for target in [
            "http://169.254.169.254/latest/meta-data/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://metadata/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://0.0.0.0:80/",
            "http://[::]/",
            "http://[::ffff:169.254.169.254]/",
        ] {
            let (s, v) = post_form(&url, &format!("task.url={target}"));
            assert_eq!(s, 400, "{target}: {v}");
            assert!(
                v["reason"].as_str().unwrap_or("").contains("denied"),
                "{target}: {v}"
            );
        }
        // User information is refused; the callback passes the same guard.
        let (s, v) = post_form(
            &url,
            &format!("task.url=http://alice:s3cr3t@127.0.0.1:{port}/w"),
        );
        assert_eq!(s, 400, "{v}");
        assert!(
            v["reason"].as_str().unwrap().contains("user information"),
            "{v}"
        );
        let (s, _) = post_form(
            &url,
            &format!(
                "task.url=http://127.0.0.1:{port}/w&task.callback_url=http://169.254.169.254/"
            ),
        );
        assert_eq!(s, 400);
        // Loopback spelt another way is loopback, and allowed by default.
        let (s, v) = post_form(&url, &format!("task.url=http://2130706433:{port}/spelt"));
        assert_eq!(s, 200, "{v}");
        assert_eq!(rx.expect(Duration::from_secs(10)).target, "/spelt");
    });
}

#[test]
fn a_host_name_resolving_to_a_denied_address_is_refused_at_delivery_without_a_request() {
    run(Duration::from_secs(60), |h| {
        let rx = Receiver::start();
        let port = rx.addr.port();
        // A strict configuration: loopback denied, one address let back.
        let node = h.standalone_with(&[
            "--deny-targets",
            "127.0.0.0/8,::1",
            "--allow-targets",
            "127.0.0.2",
        ]);
        let url = node.url("/queue");
        let (s, v) = post_form(&url, &format!("task.url=http://127.0.0.1:{port}/literal"));
        assert_eq!(s, 400, "{v}");
        let (s, v) = post_form(&url, &format!("task.url=http://127.1:{port}/short"));
        assert_eq!(s, 400, "{v}");
        // A name is checked where it resolves: localhost is loopback.
        let (s, v) = post_form(&url, &format!("task.url=http://localhost:{port}/named"));
        assert_eq!(s, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let t = wait_task(&node, "default", &id, Duration::from_secs(10), |t| {
            t["state"] == "failed"
        });
        assert_eq!(t["attempts"], 1, "{t}");
        let err = t["last_error"].as_str().unwrap_or("");
        assert!(
            err.contains("target denied") && err.contains("localhost"),
            "{t}"
        );
        assert!(
            rx.next(Duration::from_millis(500)).is_none(),
            "a request reached the receiver"
        );
        // The allowed address goes through the denied range.
        let (s, v) = post_form(&url, &format!("task.url=http://127.0.0.2:{port}/allowed"));
        assert_eq!(s, 200, "{v}");
    });
}

/// A `store` on the peer port as a member (or anyone who reaches it)
/// would send; the outcome the broker answers.
fn forged_store(base: u16, me: u64, record: protocol::ReplicaRecord) -> protocol::StoreOutcome {
    let ctx = zmq::Context::new();
    let d = ctx.socket(zmq::DEALER).unwrap();
    d.set_identity(b"peer-4242").unwrap();
    d.set_linger(0).unwrap();
    d.connect(&format!("tcp://127.0.0.1:{}", base + 2)).unwrap();
    let msg = protocol::PeerMessage::Store {
        req: 7,
        from: 4242,
        record,
        check: true,
    };
    let _ = me;
    d.send_multipart(protocol::encode(&msg), 0).unwrap();
    assert!(
        d.poll(zmq::POLLIN, 10_000).unwrap() > 0,
        "no answer to the store"
    );
    let parts = d.recv_multipart(0).unwrap();
    match protocol::decode::<protocol::PeerMessage, _>(&parts).unwrap() {
        protocol::PeerMessage::StoreResult { outcome, .. } => outcome,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_peers_copy_passes_the_checks_an_enqueue_passes() {
    run(Duration::from_secs(60), |h| {
        let node = h.standalone();
        let mut p = client::Producer::connect(&node.client_endpoint()).unwrap();
        let me = match p.request(protocol::ClientCommand::ClusterInfo).unwrap() {
            protocol::ReplyBody::Cluster { cluster } => cluster.node,
            other => panic!("{other:?}"),
        };
        let good = protocol::ReplicaRecord {
            id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
            queue: "default".into(),
            name: None,
            url: "http://127.0.0.1:9/w".into(),
            pool: "*http".into(),
            method: "POST".into(),
            params: vec![],
            body: None,
            content_type: None,
            headers: vec![],
            eta: now() + 3600.0,
            timeout: 30.0,
            callback_url: None,
            failure_callback_url: None,
            idempotency_key: None,
            is_callback: false,
            created_us: 1,
            state: protocol::TaskState::Scheduled,
            due_us: 1,
            attempts: 0,
            executions: 0,
            last_status: None,
            last_error: None,
            first_attempt_us: None,
            holders: vec![me],
            request: None,
        };
        let bad = [
            protocol::ReplicaRecord {
                queue: "bad queue name!".into(),
                ..good.clone()
            },
            protocol::ReplicaRecord {
                method: "TRACE".into(),
                ..good.clone()
            },
            protocol::ReplicaRecord {
                callback_url: Some("file:///etc/passwd".into()),
                ..good.clone()
            },
            protocol::ReplicaRecord {
                url: "http://169.254.169.254/".into(),
                ..good.clone()
            },
            protocol::ReplicaRecord {
                url: "http://u:p@127.0.0.1:9/".into(),
                ..good.clone()
            },
        ];
        for record in bad {
            let what = format!(
                "{} {} {:?} {}",
                record.queue, record.method, record.callback_url, record.url
            );
            match forged_store(node.base, me, record) {
                protocol::StoreOutcome::Rejected { reason } => assert!(!reason.is_empty()),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(p.get("default", &good.id).unwrap_err().is_not_found());
        // The same copy, valid, is stored.
        assert!(matches!(
            forged_store(node.base, me, good.clone()),
            protocol::StoreOutcome::Stored
        ));
        assert!(p.get("default", &good.id).is_ok());
    });
}

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1,
/// made with the `openssl` command in `dir`: (CA PEM path, leaf PEM,
/// leaf key PEM).
fn test_ca(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=miyamoto test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    (
        dir.join("ca.pem"),
        std::fs::read(dir.join("leaf.pem")).unwrap(),
        std::fs::read(dir.join("leaf.key")).unwrap(),
    )
}

/// An HTTPS receiver with `cert`/`key` on a free port of 127.0.0.1: the
/// paths of the requests it answered (200), as they arrive.
fn tls_receiver(cert: &[u8], key: &[u8]) -> (u16, std::sync::mpsc::Receiver<String>) {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let _ = tx.send(req.uri().path().to_string());
                            async {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
    (port, rx)
}

#[test]
fn https_webhooks_trust_a_private_ca_when_told_and_refuse_it_otherwise() {
    run(Duration::from_secs(90), |h| {
        let (ca, cert, key) = test_ca(&h.dir);
        let (port, seen) = tls_receiver(&cert, &key);
        let target = format!("https://localhost:{port}/secure");
        // Trusted with --webhook-ca: delivered.
        let ca_s = ca.to_str().unwrap().to_string();
        let trusting = h.standalone_with(&["--webhook-ca", &ca_s]);
        let (s, v) = post_form(&trusting.url("/queue"), &format!("task.url={target}"));
        assert_eq!(s, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(
            seen.recv_timeout(Duration::from_secs(15)).unwrap(),
            "/secure"
        );
        wait_task(&trusting, "default", &id, Duration::from_secs(10), |t| {
            t["state"] == "succeeded"
        });
        // Without it, the certificate is refused and nothing arrives.
        let wary = h.standalone();
        let (s, v) = post_form(&wary.url("/queue"), &format!("task.url={target}"));
        assert_eq!(s, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let t = wait_task(&wary, "default", &id, Duration::from_secs(15), |t| {
            t["attempts"].as_u64().unwrap_or(0) >= 1 && t["last_error"].is_string()
        });
        let err = t["last_error"].as_str().unwrap_or("").to_lowercase();
        assert!(
            err.contains("certificate") || err.contains("unknownissuer"),
            "{t}"
        );
        assert!(
            seen.recv_timeout(Duration::from_millis(500)).is_err(),
            "a request got through"
        );
    });
}
