//! `miyamoto bench`: a load tool for a running gateway or broker, and the
//! bare ceilings it is compared with (a bare hyper server, a bare
//! DEALER→ROUTER echo, a bare hyper client), like `redis-benchmark` or
//! `nats bench`. Progress goes to stderr every half second; the summary
//! (throughput and an HDR latency histogram) to stdout, as text or with
//! `--json` as one JSON object.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use protocol::{ClientCommand, ClientRequest, ReplyBody, TaskSpec};
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// A label copied into the output (to tell runs apart).
    #[arg(long, global = true, default_value = "")]
    label: String,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Keep-alive HTTP enqueues against a running gateway.
    EnqueueHttp {
        #[arg(long, default_value = "http://127.0.0.1:8088")]
        url: String,
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, value_enum, default_value_t = Format::Form)]
        format: Format,
    },
    /// The same HTTP load against a bare hyper server that answers 200:
    /// the HTTP ceiling of this machine.
    HttpCeiling {
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, value_enum, default_value_t = Format::Form)]
        format: Format,
    },
    /// Pipelined ZeroMQ enqueues against a broker.
    EnqueueZmq {
        #[arg(long, default_value = "tcp://127.0.0.1:7000")]
        broker: String,
        #[arg(long, default_value_t = 50_000)]
        requests: u64,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        window: usize,
    },
    /// The same pipelined load against a bare DEALER→ROUTER echo: the
    /// ZeroMQ ceiling.
    ZmqCeiling {
        #[arg(long, default_value_t = 50_000)]
        requests: u64,
        #[arg(long, default_value_t = 64)]
        window: usize,
    },
    /// N tasks from enqueue until a built-in receiver has seen every one.
    EndToEnd {
        /// Gateway URL (HTTP enqueues and webhooks).
        #[arg(long, default_value = "http://127.0.0.1:8088")]
        url: String,
        /// Broker base endpoint (ZeroMQ enqueues, pull workers on +1).
        #[arg(long, default_value = "tcp://127.0.0.1:7000")]
        broker: String,
        #[arg(long, default_value_t = 10_000)]
        tasks: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Countdown of every task, seconds.
        #[arg(long, default_value_t = 0.0)]
        delay: f64,
        /// Give every task the same eta, the start plus `--delay`, instead
        /// of a countdown from its own enqueue: all are due at once, so the
        /// throughput after the eta is delivery alone, not paced by the
        /// enqueue. Fails if the enqueue takes longer than `--delay`.
        #[arg(long)]
        same_eta: bool,
        /// `http`: enqueue over HTTP, deliver as webhooks to the built-in
        /// receiver; `zmq`: enqueue over ZeroMQ, deliver to built-in pull
        /// workers.
        #[arg(long, value_enum, default_value_t = Via::Http)]
        via: Via,
        /// Pull workers (with `--via zmq`).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// With `--via http`: enqueue this many tasks per request
        /// (`POST /queue/{queue}/batch`, at most 1000) instead of one.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
        batch: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
    },
    /// A bare hyper client posting the same requests straight to the
    /// built-in receiver: the dispatch ceiling.
    DispatchCeiling {
        #[arg(long, default_value_t = 10_000)]
        tasks: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// The enqueue rate into a broker holding many pending tasks beside the
    /// rate into an empty one: both brokers run at once, and short probes
    /// alternate between them.
    EnqueuePending {
        /// The broker to fill (base endpoint).
        #[arg(long, default_value = "tcp://127.0.0.1:7000")]
        broker: String,
        /// A second broker, left empty (base endpoint).
        #[arg(long)]
        empty_broker: String,
        /// Tasks to leave pending in `--broker` (etas a week ahead).
        #[arg(long, default_value_t = 1_000_000)]
        pending: u64,
        /// Enqueues per probe.
        #[arg(long, default_value_t = 50_000)]
        probe: u64,
        /// Probe pairs (one probe of each broker per round, the order
        /// alternating).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 256)]
        window: usize,
    },
    /// M tasks with etas spread over a window: firing lateness, and the
    /// broker's memory per pending task.
    Timers {
        #[arg(long, default_value = "tcp://127.0.0.1:7000")]
        broker: String,
        #[arg(long, default_value_t = 100_000)]
        tasks: u64,
        /// Seconds over which the etas are spread.
        #[arg(long, default_value_t = 30.0)]
        window: f64,
        /// Seconds from the start to the first eta (must cover the enqueue).
        #[arg(long, default_value_t = 10.0)]
        lead: f64,
        /// The broker's pid, to read its resident memory from /proc.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 64)]
        window_requests: usize,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Format {
    Form,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Via {
    Http,
    Zmq,
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 3 significant digits, up to an hour.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Prints `done/total` and the rate to stderr every half second.
struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(what: &str, total: u64) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, what) = (done.clone(), stop.clone(), what.to_string());
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let n = d.load(Ordering::Relaxed);
                let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
                eprint!("\r{what}: {n}/{total} ({rate:.0}/s)   ");
                let _ = std::io::stderr().flush();
            }
            eprintln!();
        });
        Progress {
            done,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The figures every scenario reports.
struct Report {
    scenario: &'static str,
    count: u64,
    errors: u64,
    seconds: f64,
    latency: Histogram<u64>,
    extra: Value,
}

impl Report {
    fn print(&self, args: &BenchArgs) {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        let per_sec = self.count as f64 / self.seconds.max(1e-9);
        let v = json!({
            "scenario": self.scenario,
            "label": args.label,
            "count": self.count,
            "errors": self.errors,
            "seconds": self.seconds,
            "per_sec": per_sec,
            "latency_ms": {
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99),
                "max": self.latency.max() as f64 / 1000.0,
                "mean": self.latency.mean() / 1000.0,
            },
            "extra": self.extra,
        });
        if args.json {
            println!("{v}");
            return;
        }
        println!("{} {}", self.scenario, args.label);
        println!(
            "  {} in {:.3} s: {:.0}/s, {} errors",
            self.count, self.seconds, per_sec, self.errors
        );
        println!(
            "  latency (ms)   p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            self.latency.max() as f64 / 1000.0
        );
        println!("  histogram (ms):");
        for q in [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let upto = self.latency.value_at_quantile(q) as f64 / 1000.0;
            let bar = "#".repeat((q * 40.0) as usize);
            println!("    {:>6.2}% <= {:>9.3}  {bar}", q * 100.0, upto);
        }
        if !self.extra.is_null() {
            println!("  {}", self.extra);
        }
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = match &args.scenario {
        Scenario::EnqueueHttp {
            url,
            requests,
            concurrency,
            format,
        } => rt.block_on(http_load(
            "enqueue-http",
            format!("{}/queue/bench", url.trim_end_matches('/')),
            *requests,
            *concurrency,
            *format,
        ))?,
        Scenario::HttpCeiling {
            requests,
            concurrency,
            format,
        } => rt.block_on(async {
            let (addr, _) = receiver(None).await?;
            http_load(
                "http-ceiling",
                format!("http://{addr}/queue/bench"),
                *requests,
                *concurrency,
                *format,
            )
            .await
        })?,
        Scenario::EnqueueZmq {
            broker,
            requests,
            window,
        } => zmq_load("enqueue-zmq", broker, *requests, *window)?,
        Scenario::ZmqCeiling { requests, window } => {
            let endpoint = echo_server()?;
            zmq_load("zmq-ceiling", &endpoint, *requests, *window)?
        }
        Scenario::EndToEnd {
            url,
            broker,
            tasks,
            concurrency,
            delay,
            same_eta,
            via,
            workers,
            batch,
            timeout,
        } => rt.block_on(end_to_end(EndToEnd {
            url,
            broker,
            tasks: *tasks,
            concurrency: *concurrency,
            due: Due::new(*delay, *same_eta),
            via: *via,
            workers: *workers,
            batch: *batch,
            timeout: *timeout,
        }))?,
        Scenario::DispatchCeiling { tasks, concurrency } => {
            rt.block_on(dispatch_ceiling(*tasks, *concurrency))?
        }
        Scenario::EnqueuePending {
            broker,
            empty_broker,
            pending,
            probe,
            rounds,
            window,
        } => enqueue_pending(broker, empty_broker, *pending, *probe, *rounds, *window)?,
        Scenario::Timers {
            broker,
            tasks,
            window,
            lead,
            pid,
            window_requests,
        } => timers(broker, *tasks, *window, *lead, *pid, *window_requests)?,
    };
    report.print(&args);
    Ok(())
}

/// When an end-to-end task is due: `delay` seconds after its own enqueue,
/// or at one eta shared by every task (`--same-eta`).
#[derive(Clone, Copy, Debug)]
struct Due {
    delay: f64,
    eta: Option<f64>,
}

impl Due {
    fn new(delay: f64, same_eta: bool) -> Due {
        Due {
            delay,
            eta: same_eta.then(|| now_secs() + delay.max(0.0)),
        }
    }

    fn countdown(delay: f64) -> Due {
        Due { delay, eta: None }
    }

    /// The task's JSON key and value.
    fn key_value(self) -> (&'static str, f64) {
        match self.eta {
            Some(eta) => ("eta", eta),
            None => ("countdown", self.delay),
        }
    }

    fn json(self, target: &str, i: u64) -> Value {
        let (key, value) = self.key_value();
        let mut task = json!({"url": target, "params": {"i": i.to_string()}});
        task[key] = json!(value);
        task
    }
}

fn body_for(format: Format, target: &str, i: u64, due: Due) -> (Bytes, &'static str) {
    match format {
        Format::Form => {
            let (key, value) = due.key_value();
            (
                Bytes::from(format!("task.url={target}&task.{key}={value}&i={i}")),
                "application/x-www-form-urlencoded",
            )
        }
        Format::Json => (
            Bytes::from(due.json(target, i).to_string()),
            "application/json",
        ),
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The `Authorization` header of a gateway that wants a token: the
/// bench sends `MIYAMOTO_BENCH_TOKEN`, when set, with every API request.
fn with_token(b: hyper::http::request::Builder) -> hyper::http::request::Builder {
    static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match TOKEN.get_or_init(|| std::env::var("MIYAMOTO_BENCH_TOKEN").ok()) {
        Some(t) => b.header("authorization", format!("Bearer {t}")),
        None => b,
    }
}

fn http_client(concurrency: usize) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build(c)
}

/// `concurrency` keep-alive connections posting until `requests` are done.
/// Enqueued tasks get a long countdown so they do not fire meanwhile.
async fn http_load(
    scenario: &'static str,
    url: String,
    requests: u64,
    concurrency: usize,
    format: Format,
) -> anyhow::Result<Report> {
    let client = http_client(concurrency);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(scenario, requests);
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, next, errors, done) = (
            client.clone(),
            url.clone(),
            next.clone(),
            errors.clone(),
            progress.done.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut h = histogram();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let (body, ct) = body_for(
                    format,
                    "http://127.0.0.1:9/never",
                    i,
                    Due::countdown(3600.0),
                );
                let req = with_token(hyper::Request::post(&url).header("content-type", ct))
                    .body(Full::new(body));
                let t = Instant::now();
                let ok = match req {
                    Ok(req) => match client.request(req).await {
                        Ok(resp) => {
                            let ok = resp.status().is_success();
                            let _ = resp.into_body().collect().await;
                            ok
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            h
        }));
    }
    let mut latency = histogram();
    for handle in handles {
        latency.add(handle.await?)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(progress);
    Ok(Report {
        scenario,
        count: requests,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        latency,
        extra: json!({"concurrency": concurrency, "format": format!("{format:?}").to_lowercase()}),
    })
}

/// A bare hyper server answering 200 to everything; with `seen`, it also
/// records when each request's `i` arrived (the receiver of end-to-end runs).
async fn receiver(
    seen: Option<Arc<Mutex<HashMap<u64, Instant>>>>,
) -> anyhow::Result<(std::net::SocketAddr, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (seen, c) = (seen.clone(), c.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (seen, c) = (seen.clone(), c.clone());
                    async move {
                        let at = Instant::now();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let Some(seen) = seen {
                            if let Some(i) = param_i(&body) {
                                if let Ok(mut s) = seen.lock() {
                                    s.entry(i).or_insert(at);
                                }
                            }
                        }
                        c.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            br#"{"status":"scheduled"}"#,
                        ))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, count))
}

fn param_i(body: &[u8]) -> Option<u64> {
    form_pairs(body)
        .find(|(k, _)| k == "i")
        .and_then(|(_, v)| v.parse().ok())
}

fn form_pairs(body: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    body.split(|b| *b == b'&').filter_map(|pair| {
        let s = std::str::from_utf8(pair).ok()?;
        let (k, v) = s.split_once('=')?;
        Some((k.to_string(), v.to_string()))
    })
}

/// A bare ROUTER that sends every message straight back.
fn echo_server() -> anyhow::Result<String> {
    let ctx = zmq::Context::new();
    let router = client::sockets::router(&ctx)?;
    router.bind("tcp://127.0.0.1:*")?;
    let endpoint = router
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("no endpoint"))?;
    std::thread::spawn(move || {
        let _ctx = ctx;
        while let Ok(parts) = router.recv_multipart(0) {
            let _ = router.send_multipart(parts, 0);
        }
    });
    Ok(endpoint)
}

/// Pipelined requests on one DEALER with at most `window` in flight.
fn zmq_load(
    scenario: &'static str,
    endpoint: &str,
    requests: u64,
    window: usize,
) -> anyhow::Result<Report> {
    zmq_enqueue(scenario, endpoint, "bench", requests, window, |i| {
        TaskSpec {
            url: "http://127.0.0.1:9/never".into(),
            countdown: Some(3600.0),
            params: vec![("i".into(), i.to_string())],
            ..Default::default()
        }
    })
    .map(|(r, _)| r)
}

/// Sends `requests` enqueues built by `task`; returns the report and the
/// send time of each (by `i`).
fn zmq_enqueue(
    scenario: &'static str,
    endpoint: &str,
    queue: &str,
    requests: u64,
    window: usize,
    task: impl Fn(u64) -> TaskSpec,
) -> anyhow::Result<(Report, Vec<Instant>)> {
    let ctx = zmq::Context::new();
    // Over CURVE when the environment names keys, as the client commands
    // take them (bench/curve.sh).
    let path = |var: &str| std::env::var_os(var).map(std::path::PathBuf::from);
    let curve = client::curve::ClientKeys::from_options(
        path("MIYAMOTO_CURVE_SERVER_KEY").as_deref(),
        path("MIYAMOTO_CURVE_KEY").as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let s = client::sockets::dealer(&ctx, false, curve.as_ref())?;
    s.connect(endpoint)?;
    let progress = Progress::start(scenario, requests);
    let mut sent_at: Vec<Instant> = Vec::with_capacity(requests as usize);
    let mut latency = histogram();
    let (mut sent, mut done, mut errors) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    // Request ids are unique per run: the broker answers a repeated id from
    // its memory instead of enqueueing again.
    let run = uuid::Uuid::new_v4().simple().to_string();
    while done < requests {
        while sent < requests && (sent - done) < window.max(1) as u64 {
            let req = ClientRequest {
                request_id: format!("{run}-{sent}"),
                command: ClientCommand::Enqueue {
                    queue: queue.into(),
                    task: task(sent),
                    wait: None,
                },
            };
            s.send_multipart(protocol::encode(&req), 0)?;
            sent_at.push(Instant::now());
            sent += 1;
        }
        if s.poll(zmq::POLLIN, 1000)? == 0 {
            anyhow::ensure!(Instant::now() < deadline, "no reply from {endpoint}");
            continue;
        }
        let parts = s.recv_multipart(0)?;
        let Some(id) = protocol::frames::peek_request_id(&parts)
            .and_then(|r| r.rsplit_once('-').and_then(|(_, n)| n.parse::<u64>().ok()))
        else {
            errors += 1;
            done += 1;
            continue;
        };
        if let Some(t) = sent_at.get(id as usize) {
            let _ = latency.record(t.elapsed().as_micros().max(1) as u64);
        }
        if let Ok(reply) = protocol::decode_hot::<protocol::ClientReply, _>(&parts) {
            if matches!(reply.body, ReplyBody::Error { .. }) {
                errors += 1;
            }
        }
        done += 1;
        progress.done.store(done, Ordering::Relaxed);
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(progress);
    Ok((
        Report {
            scenario,
            count: requests,
            errors,
            seconds,
            latency,
            extra: json!({"window": window}),
        },
        sent_at,
    ))
}

/// An end-to-end run: what to enqueue, how, and how long to wait.
#[derive(Clone, Copy)]
struct EndToEnd<'a> {
    url: &'a str,
    broker: &'a str,
    tasks: u64,
    concurrency: usize,
    due: Due,
    via: Via,
    workers: usize,
    batch: u64,
    timeout: f64,
}

/// When each task arrived, by its number.
type Arrivals = Arc<Mutex<HashMap<u64, Instant>>>;

async fn end_to_end(run: EndToEnd<'_>) -> anyhow::Result<Report> {
    let EndToEnd {
        tasks,
        concurrency,
        due,
        via,
        batch,
        timeout,
        ..
    } = run;
    let delay = due.delay;
    let seen: Arrivals = Arc::default();
    let start = Instant::now();
    let mut stop_workers = None;
    let enqueued_at = match via {
        Via::Http => enqueue_webhook_tasks(&run, seen.clone(), start).await?,
        Via::Zmq => {
            let (times, stop) = enqueue_pull_tasks(&run, seen.clone()).await?;
            stop_workers = Some(stop);
            times
        }
    };
    let enqueue_seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        due.eta.is_none() || enqueue_seconds < delay,
        "the enqueue took {enqueue_seconds:.2} s, past the shared eta: raise --delay"
    );
    let arrived = await_arrivals(&seen, tasks, timeout).await;
    if let Some(s) = stop_workers {
        s.store(true, Ordering::Relaxed);
    }
    arrived?;
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let last = seen.values().max().copied().unwrap_or(start);
    let mut latency = histogram();
    let delay_d = Duration::from_secs_f64(delay.max(0.0));
    for (i, at) in &seen {
        if let Some(t) = enqueued_at.get(*i as usize) {
            // A shared eta: every task was due at the start plus the delay.
            let due = if due.eta.is_some() { start } else { *t } + delay_d;
            let _ = latency.record(at.saturating_duration_since(due).as_micros().max(1) as u64);
        }
    }
    let total = last.duration_since(start).as_secs_f64();
    // With a delay, throughput counts from when the first task was due.
    let seconds = (total - delay.max(0.0)).max(1e-6);
    Ok(Report {
        scenario: "end-to-end",
        count: tasks,
        errors: 0,
        seconds,
        latency,
        extra: json!({"via": format!("{via:?}").to_lowercase(), "delay": delay, "same_eta": due.eta.is_some(), "seconds_total": total, "enqueue_seconds": enqueue_seconds, "concurrency": concurrency, "batch": batch}),
    })
}

/// Enqueues webhook tasks over HTTP to a built-in receiver that records
/// their arrivals in `seen`; returns when each was enqueued.
async fn enqueue_webhook_tasks(
    run: &EndToEnd<'_>,
    seen: Arrivals,
    start: Instant,
) -> anyhow::Result<Vec<Instant>> {
    let EndToEnd {
        url,
        tasks,
        concurrency,
        due,
        batch,
        ..
    } = *run;
    let (addr, _) = receiver(Some(seen.clone())).await?;
    let target = format!("http://{addr}/hook");
    let client = http_client(concurrency);
    let next = Arc::new(AtomicU64::new(0));
    let times: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; tasks as usize]));
    let endpoint = if batch > 1 {
        format!("{}/queue/bench/batch", url.trim_end_matches('/'))
    } else {
        format!("{}/queue/bench", url.trim_end_matches('/'))
    };
    let mut handles = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, endpoint, next, times, target) = (
            client.clone(),
            endpoint.clone(),
            next.clone(),
            times.clone(),
            target.clone(),
        );
        handles.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= tasks {
                    break;
                }
                let ids = first..(first + batch).min(tasks);
                let (body, ct) = if batch > 1 {
                    let items: Vec<Value> = ids.clone().map(|i| due.json(&target, i)).collect();
                    (
                        Bytes::from(Value::Array(items).to_string()),
                        "application/json",
                    )
                } else {
                    body_for(Format::Form, &target, first, due)
                };
                let Ok(req) =
                    with_token(hyper::Request::post(&endpoint).header("content-type", ct))
                        .body(Full::new(body))
                else {
                    continue;
                };
                let t = Instant::now();
                if let Ok(resp) = client.request(req).await {
                    let _ = resp.into_body().collect().await;
                }
                if let Ok(mut v) = times.lock() {
                    for i in ids {
                        v[i as usize] = Some(t);
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await?;
    }
    let v = times.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(v.into_iter().map(|t| t.unwrap_or(start)).collect())
}

/// Starts pull workers that record arrivals in `seen`, then enqueues over
/// ZeroMQ; returns when each task was enqueued, and the workers' stop.
async fn enqueue_pull_tasks(
    run: &EndToEnd<'_>,
    seen: Arrivals,
) -> anyhow::Result<(Vec<Instant>, Arc<AtomicBool>)> {
    let EndToEnd {
        broker,
        tasks,
        due,
        workers,
        ..
    } = *run;
    let delay = due.delay;
    let worker_ep = gateway::broker_link::worker_endpoint(broker).map_err(anyhow::Error::msg)?;
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..workers.max(1) {
        let (seen, stop, ep) = (seen.clone(), stop.clone(), worker_ep.clone());
        std::thread::spawn(move || {
            let Ok(mut w) = client::Worker::connect_batched(&ep, &["bench"], 256) else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some(job)) = w.next(Duration::from_millis(200)) else {
                    continue;
                };
                let at = Instant::now();
                if let Some(i) = job
                    .task
                    .params
                    .iter()
                    .find(|(k, _)| k == "i")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                {
                    if let Ok(mut s) = seen.lock() {
                        s.entry(i).or_insert(at);
                    }
                }
                let _ = w.report(&job, protocol::Outcome::Success, None);
            }
        });
    }
    let broker = broker.to_string();
    let (_, times) = tokio::task::spawn_blocking(move || {
        zmq_enqueue("end-to-end enqueue", &broker, "bench", tasks, 64, |i| {
            TaskSpec {
                url: "zmq://bench".into(),
                countdown: due.eta.is_none().then_some(delay),
                eta: due.eta,
                params: vec![("i".into(), i.to_string())],
                ..Default::default()
            }
        })
    })
    .await??;
    Ok((times, stop))
}

/// Waits until `tasks` tasks have arrived, showing progress, for at most
/// `timeout` seconds.
async fn await_arrivals(seen: &Arrivals, tasks: u64, timeout: f64) -> anyhow::Result<()> {
    let progress = Progress::start("end-to-end", tasks);
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    loop {
        let n = seen.lock().map(|s| s.len() as u64).unwrap_or(0);
        progress.done.store(n, Ordering::Relaxed);
        if n >= tasks {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {n} of {tasks} tasks arrived within {timeout} s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn dispatch_ceiling(tasks: u64, concurrency: usize) -> anyhow::Result<Report> {
    let seen: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let (addr, _) = receiver(Some(seen.clone())).await?;
    let mut r = http_load(
        "dispatch-ceiling",
        format!("http://{addr}/hook"),
        tasks,
        concurrency,
        Format::Form,
    )
    .await?;
    let n = seen.lock().map(|s| s.len() as u64).unwrap_or(0);
    anyhow::ensure!(n == tasks, "the receiver saw {n} of {tasks}");
    r.extra = json!({"concurrency": concurrency});
    Ok(r)
}

/// See [`Scenario::EnqueuePending`]. Probe tasks go to the queue `probe`,
/// which is purged after each probe, so the empty broker stays empty and
/// the full one keeps its `pending` tasks and nothing more.
fn enqueue_pending(
    full: &str,
    empty: &str,
    pending: u64,
    probe: u64,
    rounds: usize,
    window: usize,
) -> anyhow::Result<Report> {
    let far = now_secs() + 7.0 * 86400.0;
    let task = |pool: &str, i: u64| TaskSpec {
        url: format!("zmq://{pool}"),
        eta: Some(far),
        params: vec![("i".into(), i.to_string())],
        ..Default::default()
    };
    let (load, _) = zmq_enqueue("pending load", full, "pending", pending, window, |i| {
        task("pending", i)
    })?;
    anyhow::ensure!(
        load.errors == 0,
        "{} enqueues of the load failed",
        load.errors
    );
    let (mut empty_rates, mut full_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut latency = histogram();
    let mut full_seconds = 0.0;
    for round in 0..rounds.max(1) {
        let mut rate = [0.0f64; 2];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let endpoint = if which == 0 { empty } else { full };
            let (r, _) = zmq_enqueue("pending probe", endpoint, "probe", probe, window, |i| {
                task("probe", i)
            })?;
            anyhow::ensure!(r.errors == 0, "{} probe enqueues failed", r.errors);
            rate[which] = probe as f64 / r.seconds.max(1e-9);
            if which == 1 {
                latency.add(&r.latency)?;
                full_seconds += r.seconds;
            }
            client::Producer::connect(endpoint)?.request(ClientCommand::PurgeQueue {
                queue: "probe".into(),
            })?;
        }
        empty_rates.push(rate[0]);
        full_rates.push(rate[1]);
        ratios.push(rate[1] / rate[0].max(1e-9));
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Report {
        scenario: "enqueue-pending",
        count: probe * rounds.max(1) as u64,
        errors: 0,
        seconds: full_seconds,
        latency,
        extra: json!({
            "what": "throughput and latency are the probes of the full broker",
            "pending": pending,
            "probe": probe,
            "window": window,
            "empty_per_sec": empty_rates,
            "full_per_sec": full_rates,
            "ratios": ratios,
            "ratio_median": median(&ratios),
            "empty_per_sec_median": median(&empty_rates),
            "full_per_sec_median": median(&full_rates),
        }),
    })
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Two pull workers (so that measuring does not become the bottleneck)
/// recording each task's firing lateness in `fired`.
fn lateness_workers(
    broker: &str,
    fired: &Arc<Mutex<Histogram<u64>>>,
    count: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<anyhow::Result<()>>>> {
    let worker_ep = gateway::broker_link::worker_endpoint(broker).map_err(anyhow::Error::msg)?;
    Ok((0..2)
        .map(|_| {
            let (fired, count, stop, worker_ep) = (
                fired.clone(),
                count.clone(),
                stop.clone(),
                worker_ep.clone(),
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut w = client::Worker::connect(&worker_ep, &["timers"], 2000)?;
                while !stop.load(Ordering::Relaxed) {
                    let Some(job) = w.next(Duration::from_millis(200))? else {
                        continue;
                    };
                    let late = (now_secs() - job.task.eta).max(0.0);
                    if let Ok(mut h) = fired.lock() {
                        let _ = h.record((late * 1e6) as u64 + 1);
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    w.report(&job, protocol::Outcome::Success, None)?;
                }
                Ok(())
            })
        })
        .collect())
}

/// Waits until `tasks` have fired, showing progress, for at most
/// `limit_secs`.
fn await_firings(count: &AtomicU64, tasks: u64, limit_secs: f64) -> anyhow::Result<()> {
    let progress = Progress::start("timers firing", tasks);
    let deadline = Instant::now() + Duration::from_secs_f64(limit_secs);
    while count.load(Ordering::Relaxed) < tasks {
        progress
            .done
            .store(count.load(Ordering::Relaxed), Ordering::Relaxed);
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {tasks} fired",
            count.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn timers(
    broker: &str,
    tasks: u64,
    window: f64,
    lead: f64,
    pid: Option<u32>,
    window_requests: usize,
) -> anyhow::Result<Report> {
    let rss_before = pid.and_then(rss_bytes);
    let t0 = now_secs() + lead;
    // Lateness (µs) of every firing, measured by a pull worker.
    let fired = Arc::new(Mutex::new(histogram()));
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = lateness_workers(broker, &fired, &count, &stop)?;
    let (enqueue, sent_at) = zmq_enqueue(
        "timers enqueue",
        broker,
        "bench",
        tasks,
        window_requests,
        |i| TaskSpec {
            url: "zmq://timers".into(),
            eta: Some(t0 + window * i as f64 / tasks.max(1) as f64),
            params: vec![("i".into(), i.to_string())],
            ..Default::default()
        },
    )?;
    anyhow::ensure!(
        now_secs() < t0,
        "the enqueue took longer than --lead; raise it"
    );
    let rss_after = pid.and_then(rss_bytes);
    // Enqueue rate over the first and the last tenth (the store nearly full).
    let tenth = (tasks / 10).max(1) as usize;
    let rate = |a: usize, b: usize| {
        let span = sent_at[b - 1].duration_since(sent_at[a]).as_secs_f64();
        (b - a) as f64 / span.max(1e-9)
    };
    let (first_rate, last_rate) = if sent_at.len() >= 2 * tenth && tenth > 1 {
        (rate(0, tenth), rate(sent_at.len() - tenth, sent_at.len()))
    } else {
        (0.0, 0.0)
    };
    let fired_all = await_firings(&count, tasks, lead + window + 120.0);
    stop.store(true, Ordering::Relaxed);
    fired_all?;
    for w in workers {
        let _ = w.join();
    }
    let latency = fired
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let per_task = match (rss_before, rss_after) {
        (Some(a), Some(b)) => json!((b.saturating_sub(a)) as f64 / tasks as f64),
        _ => Value::Null,
    };
    Ok(Report {
        scenario: "timers",
        count: tasks,
        errors: enqueue.errors,
        seconds: window,
        latency,
        extra: json!({
            "what": "latency is firing lateness (delivery time minus eta)",
            "enqueue_per_sec": tasks as f64 / enqueue.seconds,
            "enqueue_per_sec_first_tenth": first_rate,
            "enqueue_per_sec_last_tenth": last_rate,
            "rss_before": rss_before, "rss_after": rss_after,
            "rss_bytes_per_pending_task": per_task,
            // The task's payload: its parameter `i=<n>`, form-encoded as
            // the broker keeps it.
            "payload_bytes_per_task": (0..tasks).map(|i| 2 + i.to_string().len() as u64).sum::<u64>() as f64 / tasks.max(1) as f64,
            "window": window,
        }),
    })
}
