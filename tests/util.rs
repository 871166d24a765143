//! Shared helpers: process harness with a timeout, free ports, an HTTP
//! client, and a scripted HTTP receiver that records every webhook.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

/// Held by the tests that load the machine (clusters, thousands of tasks)
/// and by the ones that measure time (a countdown honoured within 100 ms),
/// so that the two never overlap on this 2-core machine.
pub static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`HEAVY`], whatever an earlier test's panic left behind.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Python virtualenv under the target directory, named `name`, with
/// `requirements` (relative to the repository) installed: its `bin/`.
/// Made once, by one test at a time; pip needs PyPI the first time.
pub fn venv(name: &str, requirements: &str) -> PathBuf {
    static VENV: Mutex<()> = Mutex::new(());
    let _one = VENV.lock().unwrap_or_else(|e| e.into_inner());
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    if !python.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv")
            .success();
        assert!(ok, "cannot create a virtualenv");
    }
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(requirements))
        .status()
        .expect("pip")
        .success();
    assert!(ok, "pip install -r {requirements} failed");
    venv.join("bin")
}

/// The `miyamoto` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_miyamoto"))
}

/// Unix seconds now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Processes started by one test; all killed when the test ends. They
/// run in the test's own directory (under `target/tmp/runs`, removed when
/// the test passes), so their default `./miyamoto-data` is the test's
/// alone and a node restarted by the test finds its data again.
pub struct Harness {
    children: Mutex<Vec<Child>>,
    pub dir: PathBuf,
}

impl Default for Harness {
    fn default() -> Self {
        static N: AtomicU16 = AtomicU16::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("runs")
            .join(format!(
                "{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a test directory");
        Harness {
            children: Mutex::new(Vec::new()),
            dir,
        }
    }
}

/// Runs `f` with a harness; fails if it takes longer than `limit`.
/// Processes are killed in every case.
pub fn run<F>(limit: Duration, f: F)
where
    F: FnOnce(&Harness) + Send + 'static,
{
    let h = Arc::new(Harness::default());
    let (tx, rx) = mpsc::channel();
    let inner = h.clone();
    let t = thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&inner)));
        let _ = tx.send(());
        r
    });
    let finished = rx.recv_timeout(limit).is_ok();
    h.kill_all();
    if !finished {
        panic!("test timed out after {limit:?}");
    }
    if let Err(p) = t.join().expect("test thread") {
        std::panic::resume_unwind(p);
    }
    let _ = std::fs::remove_dir_all(&h.dir);
}

impl Harness {
    /// Starts `miyamoto ARGS`, its output going to a log file.
    pub fn spawn(&self, args: &[&str]) -> u32 {
        self.spawn_env(args, &[])
    }

    /// Starts `miyamoto ARGS` with extra environment variables.
    pub fn spawn_env(&self, args: &[&str], env: &[(&str, &str)]) -> u32 {
        let log = log_file(args);
        let child = Command::new(bin())
            .args(args)
            .current_dir(&self.dir)
            // MIYAMOTO_TEST_LOG=debug turns up the processes' logs (under
            // target/tmp/logs) when a test needs explaining.
            .env(
                "RUST_LOG",
                std::env::var("MIYAMOTO_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn miyamoto");
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Waits up to `wait` for one of this test's processes to end; its
    /// exit status, or `None` if it is still running.
    pub fn wait_exit(&self, pid: u32, wait: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut children = self.children.lock().unwrap();
                let c = children.iter_mut().find(|c| c.id() == pid)?;
                if let Ok(Some(status)) = c.try_wait() {
                    return Some(status);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of one of this test's processes, in bytes.
    pub fn rss_bytes(&self, pid: u32) -> u64 {
        proc_status_bytes(pid, "VmRSS:")
    }

    /// Starts `miyamoto ARGS` and hands back its stdout lines.
    pub fn spawn_piped(&self, args: &[&str]) -> (u32, mpsc::Receiver<String>) {
        let log = log_file(args);
        let mut child = Command::new(bin())
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn miyamoto");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        (pid, rx)
    }

    /// Starts an arbitrary program and hands back its stdout lines; it is
    /// killed with the test's other processes.
    pub fn spawn_program_piped(&self, program: &str, args: &[&str]) -> mpsc::Receiver<String> {
        let log = log_file(args);
        let mut child = Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.children.lock().unwrap().push(child);
        rx
    }

    /// Starts an arbitrary program in the background, output to a log file;
    /// it is killed with the test's other processes.
    pub fn spawn_background(&self, program: &str, args: &[&str]) {
        let child = self.spawn_program(program, args);
        self.children.lock().unwrap().push(child);
    }

    /// Starts an arbitrary program (e.g. Python), output to a log file.
    pub fn spawn_program(&self, program: &str, args: &[&str]) -> Child {
        let log = log_file(args);
        Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"))
    }

    /// Makes a process started by [`Harness::spawn_program`] one of this
    /// test's, killed with the others.
    pub fn adopt(&self, child: Child) {
        self.children.lock().unwrap().push(child);
    }

    /// `kill -9` one of this test's processes.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap();
        if let Some(c) = children.iter_mut().find(|c| c.id() == pid) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill_all(&self) {
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `miyamoto standalone` on free ports, ready to serve.
    pub fn standalone(&self) -> Node {
        self.standalone_with(&[])
    }

    /// `miyamoto standalone` with extra arguments.
    pub fn standalone_with(&self, extra: &[&str]) -> Node {
        self.standalone_env(extra, &[])
    }

    /// `miyamoto standalone` with extra arguments and environment.
    pub fn standalone_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let base = free_base();
        let http = free_port();
        let listen = format!("127.0.0.1:{http}");
        let base_s = base.to_string();
        let mut args = vec!["standalone", "--port", &base_s, "--listen", &listen];
        args.extend_from_slice(extra);
        let pid = self.spawn_env(&args, env);
        let node = Node { base, http, pid };
        node.wait_ready();
        node
    }

    /// `miyamoto standalone` on given ports (a node started again).
    pub fn standalone_at(&self, base: u16, http: u16, extra: &[&str]) -> Node {
        let listen = format!("127.0.0.1:{http}");
        let base_s = base.to_string();
        let mut args = vec!["standalone", "--port", &base_s, "--listen", &listen];
        args.extend_from_slice(extra);
        let pid = self.spawn(&args);
        let node = Node { base, http, pid };
        node.wait_ready();
        node
    }

    /// `miyamoto broker` on a free base port.
    pub fn broker(&self, base: u16) -> u32 {
        self.spawn(&["broker", "--port", &base.to_string()])
    }
}

fn log_file(args: &[&str]) -> std::fs::File {
    static N: AtomicU16 = AtomicU16::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!(
        "{}-{}-{}.log",
        args.first().copied().unwrap_or("x").replace('/', "_"),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    std::fs::File::create(dir.join(name)).unwrap()
}

/// The newest process log (under `target/tmp/logs`) that contains
/// `needle`, or a panic.
pub fn last_log_containing(needle: &str) -> String {
    try_last_log_containing(needle).unwrap_or_else(|| panic!("no log contains {needle:?}"))
}

/// The newest process log that contains `needle`, if any.
pub fn try_last_log_containing(needle: &str) -> Option<String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("logs");
    let mut logs: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.metadata().ok()?.modified().ok()?, e.path()))
        })
        .collect();
    logs.sort();
    logs.iter().rev().find_map(|(_, p)| {
        std::fs::read_to_string(p)
            .ok()
            .filter(|t| t.contains(needle))
    })
}

/// A size in `/proc/PID/status` (`VmRSS:`, `VmHWM:`…), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb * 1024
}

/// A standalone node's addresses.
pub struct Node {
    pub base: u16,
    pub http: u16,
    pub pid: u32,
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http, path)
    }
    pub fn client_endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.base)
    }
    pub fn worker_endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.base + 1)
    }
    /// Waits until `GET /health` answers 200 (the gateway reached the broker).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = try_http("GET", &self.url("/health"), &[], "") {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("node on {} never became ready", self.http);
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A base port whose successor is free too.
pub fn free_base() -> u16 {
    for _ in 0..100 {
        let p = free_port();
        // The base port and the three after it (workers, peers, events).
        if p < 65000 && (0..4).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no free port pair");
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// One HTTP request; the answer's status and JSON body (Null if not JSON).
pub fn try_http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<(u16, Value), String> {
    try_http_headers(method, url, headers, body).map(|(s, _, v)| (s, v))
}

/// Like [`try_http`], with the answer's headers.
pub fn try_http_headers(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<(u16, hyper::HeaderMap, Value), String> {
    let (status, headers, body) = try_http_bytes(method, url, headers, body)?;
    Ok((
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    ))
}

/// One HTTP request; the answer's status, headers and body as it came.
pub fn try_http_bytes(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    runtime().block_on(async {
        let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let fut = async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, headers, body))
        };
        tokio::time::timeout(Duration::from_secs(15), fut)
            .await
            .map_err(|_| "HTTP request timed out".to_string())?
    })
}

/// Like [`try_http`], panicking on transport errors.
pub fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, Value) {
    try_http(method, url, headers, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// A JSON request.
pub fn send_json(method: &str, url: &str, v: &Value) -> (u16, Value) {
    http(
        method,
        url,
        &[("Content-Type", "application/json")],
        v.to_string(),
    )
}

/// A form-encoded POST.
pub fn post_form(url: &str, body: &str) -> (u16, Value) {
    http(
        "POST",
        url,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.to_string(),
    )
}

/// A webhook as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    /// Unix seconds when it arrived.
    pub at: f64,
}

impl Seen {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// A field of a form body (the task's params), "" when absent. Only
    /// for the tests' own values, which need no percent-decoding.
    pub fn form(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.body)
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or("")
            .to_string()
    }
}

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
    pub body: &'static str,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: vec![],
            delay: Duration::ZERO,
            body: "ok",
        }
    }
}

/// A real HTTP server on a free port that records every request and
/// answers from a script (then 200).
pub struct Receiver {
    pub addr: SocketAddr,
    seen: Mutex<mpsc::Receiver<Seen>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    /// Requests being answered right now, and the most there ever were.
    pub in_flight: Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
    /// How every request not scripted is answered.
    pub default: Arc<Mutex<Answer>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        let script: Arc<Mutex<VecDeque<Answer>>> = Arc::default();
        let s = script.clone();
        let in_flight: Arc<(
            std::sync::atomic::AtomicUsize,
            std::sync::atomic::AtomicUsize,
        )> = Arc::default();
        let default = Arc::new(Mutex::new(Answer::status(200)));
        let (fl, df) = (in_flight.clone(), default.clone());
        runtime().spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                let s = s.clone();
                let (fl, df) = (fl.clone(), df.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        let s = s.clone();
                        let (fl, df) = (fl.clone(), df.clone());
                        async move {
                            let now_in = fl.0.fetch_add(1, Ordering::SeqCst) + 1;
                            fl.1.fetch_max(now_in, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let _ = tx.send(Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                                at: now(),
                            });
                            let answer = s
                                .lock()
                                .unwrap()
                                .pop_front()
                                .unwrap_or_else(|| df.lock().unwrap().clone());
                            tokio::time::sleep(answer.delay).await;
                            fl.0.fetch_sub(1, Ordering::SeqCst);
                            let mut resp = hyper::Response::new(Full::new(Bytes::from_static(
                                answer.body.as_bytes(),
                            )));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(answer.status).unwrap();
                            for (k, v) in answer.headers {
                                resp.headers_mut().insert(k, v.parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            seen: Mutex::new(rx),
            script,
            in_flight,
            default,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Queues answers for the next requests.
    pub fn answer(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    /// Answers every request not scripted with `a`.
    pub fn answer_all(&self, a: Answer) {
        *self.default.lock().unwrap() = a;
    }

    /// The most requests that were ever in progress at once.
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.1.load(Ordering::SeqCst)
    }

    /// The next request, waiting up to `wait`.
    pub fn next(&self, wait: Duration) -> Option<Seen> {
        self.seen.lock().unwrap().recv_timeout(wait).ok()
    }

    /// The next request, or a panic after `wait`.
    pub fn expect(&self, wait: Duration) -> Seen {
        self.next(wait)
            .unwrap_or_else(|| panic!("no webhook arrived within {wait:?}"))
    }
}

/// Polls `GET /queue/Q/tasks/ID` until `pred` holds on the JSON.
pub fn wait_task(
    node: &Node,
    queue: &str,
    id: &str,
    wait: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + wait;
    let url = node.url(&format!("/queue/{queue}/tasks/{id}"));
    loop {
        let (status, v) = http("GET", &url, &[], "");
        if status == 200 && pred(&v) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("task {id} never reached the expected state; last: {status} {v}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
