//! The `miyamoto-broker` command line (also `miyamoto broker`).

use std::time::Duration;

use clap::Parser;

use crate::dispatch::DispatchConfig;
use crate::node::{Node, NodeConfig};
use crate::scheduler::SchedulerConfig;

/// A Miyamoto broker node: stores tasks and fires them; speaks ZeroMQ.
#[derive(Parser, Debug, Clone)]
#[command(name = "miyamoto-broker", version)]
pub struct BrokerArgs {
    /// Address to bind the ZeroMQ ports on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: String,
    /// Base port: producers on PORT, workers and gateways on PORT+1.
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// This node's id in logs and replies (default: node-PORT).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Seconds succeeded and cancelled tasks stay inspectable.
    #[arg(long, default_value_t = 3600.0)]
    pub retention: f64,
    /// Seconds between replicas' fire times.
    #[arg(long, default_value_t = 5.0)]
    pub replica_offset: f64,
    /// Seconds between heartbeats to idle workers.
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat_interval: f64,
    /// Seconds of silence after which a worker is forgotten and its tasks retried.
    #[arg(long, default_value_t = 5.0)]
    pub worker_expiry: f64,
}

impl BrokerArgs {
    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(anyhow::anyhow!(
                    "--{name} must be a positive number of seconds"
                ))
            }
        };
        if self.port == u16::MAX {
            anyhow::bail!("--port must leave room for PORT+1");
        }
        Ok(NodeConfig {
            bind: self.bind.clone(),
            base_port: self.port,
            scheduler: SchedulerConfig {
                node_id: self
                    .node_id
                    .clone()
                    .unwrap_or_else(|| format!("node-{}", self.port)),
                retention: secs("retention", self.retention)?,
                replica_offset: secs("replica-offset", self.replica_offset)?,
                ..Default::default()
            },
            dispatch: DispatchConfig {
                heartbeat_interval: secs("heartbeat-interval", self.heartbeat_interval)?,
                worker_expiry: secs("worker-expiry", self.worker_expiry)?,
                ..Default::default()
            },
        })
    }
}

/// Starts a node and serves until the process is stopped.
pub fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let node = Node::start(args.node_config()?)?;
    node.wait();
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
