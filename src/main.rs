//! The `miyamoto` command: a single-process `standalone` mode (broker and
//! gateway together), the `broker` and `gateway` processes, and client
//! tools that talk ZeroMQ to a broker.

mod bench;

/// mimalloc: per-thread free lists suit a process whose tasks are
/// allocated on one thread and freed on another (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use client::Producer;
use protocol::TaskSpec;

#[derive(Parser, Debug)]
#[command(
    name = "miyamoto",
    version,
    about = "A fast, clusterable HTTP task queue"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `text` or `json` (also MIYAMOTO_LOG_FORMAT).
    #[arg(
        long,
        global = true,
        env = "MIYAMOTO_LOG_FORMAT",
        default_value = "text",
        value_parser = ["text", "json"]
    )]
    log_format: String,
}

#[derive(Subcommand, Debug)]
// Parsed once at start: boxing the largest would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Broker and gateway in one process: HTTP on $INTERFACE:8088, ZeroMQ on 7000/7001.
    Standalone(StandaloneArgs),
    /// A broker node (same as `miyamoto-broker`).
    Broker(broker::cli::BrokerArgs),
    /// A gateway (same as `miyamoto-gateway`).
    Gateway(gateway::cli::GatewayArgs),
    /// Enqueue a task over ZeroMQ and print its id.
    Enqueue(EnqueueArgs),
    /// Print a task's state as JSON.
    Get(TaskRef),
    /// Cancel a task.
    Cancel(TaskRef),
    /// Print a broker's view of the cluster as JSON.
    Cluster(ClusterArgs),
    /// A pull worker that logs each task as a JSON line and answers success.
    Worker(WorkerArgs),
    /// A local cluster for trying it out: N broker processes and a gateway.
    DevCluster(DevClusterArgs),
    /// Load scenarios and their bare ceilings (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Write a CURVE key pair: PATH.key (public) and PATH.key_secret.
    CurveKeygen(KeygenArgs),
}

#[derive(clap::Args, Debug)]
struct KeygenArgs {
    /// Where to write, without the suffix: `keys/server` writes
    /// keys/server.key and keys/server.key_secret (never over existing files).
    path: std::path::PathBuf,
}

#[derive(clap::Args, Debug)]
struct DevClusterArgs {
    /// Broker processes to start.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Base port of the first broker; the next ones use PORT+10, PORT+20, …
    #[arg(long, default_value_t = 7000)]
    port: u16,
    /// The gateway's HTTP address (default: $INTERFACE:8088).
    #[arg(long)]
    listen: Option<String>,
    /// Nodes holding each task.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Where the nodes keep their state, each in DIR/node-N: started
    /// again, the cluster comes back with its tasks.
    #[arg(long, default_value = "miyamoto-data")]
    data_dir: std::path::PathBuf,
    /// Keep nothing on disk.
    #[arg(long)]
    in_memory: bool,
}

#[derive(clap::Args, Debug)]
struct WorkerArgs {
    /// The broker's worker endpoint (base port + 1).
    #[arg(long, default_value = "tcp://127.0.0.1:7001")]
    broker: String,
    /// Pools to serve (the POOL of zmq://POOL task URLs).
    #[arg(long = "pool", required = true)]
    pools: Vec<String>,
    /// Tasks held at once.
    #[arg(long, default_value_t = 1)]
    credit: u32,
    /// Seconds to hold each task before answering.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Answer failure instead of success.
    #[arg(long)]
    fail: bool,
    #[command(flatten)]
    curve: gateway::cli::CurveClientArgs,
}

#[derive(clap::Args, Debug)]
struct StandaloneArgs {
    #[command(flatten)]
    broker: broker::cli::BrokerArgs,
    /// HTTP address (default: $INTERFACE:8088, INTERFACE defaulting to 127.0.0.1).
    #[arg(long)]
    listen: Option<String>,
    /// Webhook deliveries in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: u32,
    /// Standard Webhooks secret (`whsec_<base64>`) for queues without their
    /// own; repeatable. Also MIYAMOTO_SIGNING_SECRETS (comma-separated).
    #[arg(
        long = "signing-secret",
        env = "MIYAMOTO_SIGNING_SECRETS",
        value_delimiter = ','
    )]
    signing_secrets: Vec<String>,
    #[command(flatten)]
    http: gateway::cli::HttpArgs,
}

#[derive(clap::Args, Debug)]
struct EnqueueArgs {
    /// The broker's base-port endpoint.
    #[arg(long, default_value = "tcp://127.0.0.1:7000")]
    broker: String,
    #[arg(long, default_value = "default")]
    queue: String,
    /// Target: http(s)://… or zmq://POOL.
    url: String,
    /// Parameters as KEY=VALUE.
    params: Vec<String>,
    #[arg(long)]
    countdown: Option<f64>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    method: Option<String>,
    #[command(flatten)]
    curve: gateway::cli::CurveClientArgs,
}

#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// Any broker's base-port endpoint.
    #[arg(long, default_value = "tcp://127.0.0.1:7000")]
    broker: String,
    #[command(flatten)]
    curve: gateway::cli::CurveClientArgs,
}

#[derive(clap::Args, Debug)]
struct TaskRef {
    #[arg(long, default_value = "tcp://127.0.0.1:7000")]
    broker: String,
    #[arg(long, default_value = "default")]
    queue: String,
    id: String,
    #[command(flatten)]
    curve: gateway::cli::CurveClientArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    client::logging::init_with(cli.log_format == "json");
    client::logging::exit_on_panic();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("miyamoto: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Standalone(args) => standalone(args),
        Command::Broker(args) => broker::cli::run(args),
        Command::Gateway(args) => tokio_runtime()?.block_on(gateway::cli::run(args)),
        Command::Enqueue(a) => {
            let params = a
                .params
                .iter()
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => Ok((k.to_string(), v.to_string())),
                    None => Err(anyhow::anyhow!("parameter {p:?} is not KEY=VALUE")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let spec = TaskSpec {
                url: a.url,
                params,
                countdown: a.countdown,
                name: a.name,
                method: a.method,
                ..Default::default()
            };
            let (id, eta) = Producer::connect_with(&a.broker, a.curve.keys()?.as_ref())?
                .enqueue(&a.queue, spec)?;
            println!("{{\"status\": \"scheduled\", \"id\": \"{id}\", \"eta\": {eta}}}");
            Ok(())
        }
        Command::Get(t) => {
            let info = Producer::connect_with(&t.broker, t.curve.keys()?.as_ref())?
                .get(&t.queue, &t.id)?;
            // Byte fields (a raw body, the worker's answer) print as
            // arrays of numbers: JSON has no byte strings.
            println!("{}", serde_json::to_string(&info)?);
            Ok(())
        }
        Command::Worker(w) => work(w),
        Command::Cluster(c) => {
            let mut p = Producer::connect_with(&c.broker, c.curve.keys()?.as_ref())?;
            match p.request(protocol::ClientCommand::ClusterInfo)? {
                protocol::ReplyBody::Cluster { cluster } => {
                    println!("{}", serde_json::to_string(&cluster)?);
                    Ok(())
                }
                other => anyhow::bail!("unexpected answer: {other:?}"),
            }
        }
        Command::DevCluster(d) => dev_cluster(d),
        Command::Bench(b) => bench::run(b),
        Command::CurveKeygen(k) => {
            let pair = client::curve::KeyPair::generate().map_err(anyhow::Error::msg)?;
            let (public, secret) = pair.write(&k.path).map_err(anyhow::Error::msg)?;
            eprintln!(
                "wrote {} (public) and {} (secret: keep it to this machine)",
                public.display(),
                secret.display()
            );
            println!("{}", client::curve::z85_encode(&pair.public));
            Ok(())
        }
        Command::Cancel(t) => {
            Producer::connect_with(&t.broker, t.curve.keys()?.as_ref())?.cancel(&t.queue, &t.id)?;
            println!("{{\"status\": \"cancelled\", \"id\": \"{}\"}}", t.id);
            Ok(())
        }
    }
}

/// Serves tasks forever: one JSON line per task on stdout, flushed before
/// the hold starts, so a watcher knows the task is in hand.
fn work(args: WorkerArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let pools: Vec<&str> = args.pools.iter().map(String::as_str).collect();
    let mut worker =
        client::Worker::connect_with(&args.broker, &pools, args.credit, false, args.curve.keys()?)?;
    let hold = std::time::Duration::from_secs_f64(args.hold.max(0.0));
    loop {
        let Some(job) = worker.next(std::time::Duration::from_secs(1))? else {
            continue;
        };
        let line = serde_json::json!({
            "id": job.task.id,
            "params": job.task.params,
            "retry_count": job.task.retry_count,
            "execution_count": job.task.execution_count,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        drop(out);
        // Keep heartbeats going while holding the task.
        let until = std::time::Instant::now() + hold;
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            if let Some(extra) = worker.next(left)? {
                // Credit 1 makes this rare; answer it as failed so it is retried.
                worker.report(&extra, protocol::Outcome::Failure, Some("busy".into()))?;
            }
        }
        let outcome = if args.fail {
            protocol::Outcome::Failure
        } else {
            protocol::Outcome::Success
        };
        worker.report(&job, outcome, None)?;
    }
}

/// Starts the brokers one after another (each joining through the
/// previous one) and a gateway, then waits; Ctrl-C stops them all, and so
/// does any of them exiting.
fn dev_cluster(args: DevClusterArgs) -> anyhow::Result<()> {
    use std::process::{Child, Command as Process};
    struct Children(Vec<Child>);
    impl Drop for Children {
        fn drop(&mut self) {
            for c in self.0.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    if args.nodes == 0 || args.port.checked_add(args.nodes * 10).is_none() {
        anyhow::bail!("--nodes must be at least 1 and leave room for the ports");
    }
    let exe = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    let first = format!("tcp://127.0.0.1:{}", args.port);
    for i in 0..args.nodes {
        let port = args.port + i * 10;
        let mut cmd = Process::new(&exe);
        cmd.args([
            "broker",
            "--port",
            &port.to_string(),
            "--node-id",
            &format!("node-{}", i + 1),
            "--replicas",
            &args.replicas.to_string(),
        ]);
        if args.in_memory {
            cmd.arg("--in-memory");
        } else {
            cmd.arg("--data-dir").arg(&args.data_dir);
        }
        if i > 0 {
            cmd.args(["--join", &format!("tcp://127.0.0.1:{}", port - 10)]);
        }
        children.0.push(cmd.spawn()?);
        // Each node must answer before the next one joins through it.
        let mut p = Producer::connect(&format!("tcp://127.0.0.1:{port}"))?;
        p.ping()?;
        println!(
            "broker node-{}: tcp://127.0.0.1:{port} (workers on {})",
            i + 1,
            port + 1
        );
    }
    let listen = args
        .listen
        .unwrap_or_else(|| gateway::cli::default_listen(8088));
    children.0.push(
        Process::new(&exe)
            .args(["gateway", "--listen", &listen, "--broker", &first])
            .spawn()?,
    );
    println!("gateway: http://{listen}  (try: curl http://{listen}/cluster)");
    println!("Ctrl-C stops the cluster.");
    loop {
        for c in children.0.iter_mut() {
            if let Some(status) = c.try_wait()? {
                anyhow::bail!("a cluster process exited ({status}); stopping the others");
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Broker threads and the gateway's runtime in one process. They share one
/// ZeroMQ context and the gateway reaches the broker over `inproc://`; the
/// broker's TCP ports serve everyone else as usual.
fn standalone(args: StandaloneArgs) -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let inproc = format!("standalone-{}", std::process::id());
    broker::validate::set_target_guard(args.broker.target_guard()?);
    let node = broker::Node::start_in(args.broker.node_config()?, ctx.clone(), Some(&inproc))?;
    // The node's advertised endpoint, as its roster names it: the link
    // reaches it over inproc whatever the roster says.
    let endpoint = node.client_endpoint.clone();
    let listen = args
        .listen
        .unwrap_or_else(|| gateway::cli::default_listen(8088));
    let mut link = gateway::broker_link::LinkConfig::for_broker(&endpoint, args.concurrency)
        .map_err(anyhow::Error::msg)?;
    let (client, worker) = broker::node::inproc_endpoints(&inproc);
    link.local = Some(gateway::broker_link::LocalBroker {
        ctx,
        endpoint: endpoint.clone(),
        client,
        worker,
    });
    let mut webhooks = gateway::cli::webhook_config(&args.signing_secrets)?;
    webhooks.guard = std::sync::Arc::new(args.broker.target_guard()?);
    webhooks.extra_roots = args.http.webhook_roots()?;
    let limits = args.http.limits()?;
    let rt = tokio_runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        tracing::info!(%listen, broker = %endpoint, "miyamoto standalone ready");
        if let Some(w) = listener
            .local_addr()
            .ok()
            .and_then(|a| limits.access.warning(&a))
        {
            tracing::warn!("{w}");
        }
        gateway::serve(listener, link, webhooks, limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        anyhow::Ok(())
    })?;
    node.shutdown();
    Ok(())
}
