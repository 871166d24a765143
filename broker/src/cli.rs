//! The `miyamoto-broker` command line (also `miyamoto broker`).

use std::time::Duration;

use clap::Parser;

use crate::dispatch::DispatchConfig;
use crate::node::{Node, NodeConfig};
use crate::store::StoreConfig;

/// A Miyamoto broker node: stores tasks and fires them; speaks ZeroMQ.
#[derive(Parser, Debug, Clone)]
#[command(name = "miyamoto-broker", version)]
pub struct BrokerArgs {
    /// Address to bind the ZeroMQ ports on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: String,
    /// Base port: producers on PORT, workers and gateways on PORT+1, peers
    /// on PORT+2, cluster events on PORT+3.
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// This node's id in logs and replies (default: node-PORT).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Seconds succeeded and cancelled tasks stay inspectable (default for
    /// queues that do not set `retention`).
    #[arg(long, default_value_t = 3600.0)]
    pub retention: f64,
    /// Queue configuration file (TOML): a `[defaults]` table for every
    /// queue and one `[queues.NAME]` table per queue.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Seconds between replicas' fire times (replica i fires at eta + i × offset).
    #[arg(long, default_value_t = 5.0)]
    pub replica_offset: f64,
    /// Join the cluster of any existing node, given its base endpoint
    /// (tcp://HOST:PORT). Without it, the node starts a new cluster.
    #[arg(long)]
    pub join: Option<String>,
    /// Nodes holding each task (the replication factor).
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// Seconds after which the leader removes an unreachable member.
    #[arg(long, default_value_t = 10.0)]
    pub remove_after: f64,
    /// Host that other nodes and gateways use to reach this node (default:
    /// the bind address; 127.0.0.1 when binding 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Seconds between heartbeats to idle workers.
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat_interval: f64,
    /// Seconds of silence after which a worker is forgotten and its tasks retried.
    #[arg(long, default_value_t = 5.0)]
    pub worker_expiry: f64,
    /// Memory for tasks, in bytes (suffixes K, M, G, KiB, MiB, GiB);
    /// past it enqueues are answered busy (HTTP 429). Default: a quarter
    /// of the machine's memory.
    #[arg(long, value_parser = parse_bytes)]
    pub max_pending_bytes: Option<u64>,
    /// Tasks held, in every state; past it enqueues are answered busy.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_tasks: usize,
    /// Queues known; past it a task for a new queue is answered busy.
    #[arg(long, default_value_t = 10_000)]
    pub max_queues: usize,
    /// Where nodes keep their state: this node uses DIR/NODE-ID, so
    /// nodes on one machine never share files (see STORAGE.md).
    #[arg(long, default_value = "miyamoto-data")]
    pub data_dir: std::path::PathBuf,
    /// Keep everything in memory only: a restart loses every task.
    #[arg(long, conflicts_with_all = ["fsync", "salvage_journal"])]
    pub in_memory: bool,
    /// When a change is answered: `always` after fdatasync (survives a
    /// power cut), `never` after write (survives a crash of the process,
    /// not of the machine).
    #[arg(long, value_enum, default_value_t = FsyncArg::Always)]
    pub fsync: FsyncArg,
    /// Start even though the journal is damaged, from the last good
    /// record; the damaged part is renamed *.damaged, not deleted.
    #[arg(long)]
    pub salvage_journal: bool,
    /// Below this much free space on the data directory's disk, new tasks
    /// are refused (busy, HTTP 429) while the node goes on delivering and
    /// recording what finishes.
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    pub min_free_disk: u64,
    /// Webhook targets let through whatever the deny rules say: CIDR
    /// ranges (`10.1.0.0/16`, an address) and host names (`*.internal`),
    /// comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub allow_targets: Vec<String>,
    /// Webhook targets refused, beside the defaults (link-local ranges,
    /// cloud metadata names and addresses, 0.0.0.0 and ::): CIDR ranges
    /// and host names, comma-separated. An enqueue naming one gets 400.
    #[arg(long, value_delimiter = ',')]
    pub deny_targets: Vec<String>,
    /// Encrypt and authenticate every ZeroMQ port with CURVE, keys from
    /// DIR: server.key_secret (the same on every node), peer.key_secret
    /// (this node's key towards its peers), and the public keys admitted
    /// in producers/, workers/ and peers/ (see README, "Securing").
    #[arg(long)]
    pub curve_dir: Option<std::path::PathBuf>,
}

/// `--fsync`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncArg {
    Always,
    Never,
}

/// A node id fit to name its directory: letters, digits, `-`, `_`, `.`,
/// not starting with a dot.
fn check_node_id(id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        anyhow::bail!("--node-id {id:?} must be 1 to 128 letters, digits, '-', '_' or '.', not starting with '.' (it names the node's data directory)");
    }
    Ok(())
}

/// `1048576`, `64M`, `64MiB`, `2G`… (K, M, G are 1024-based, as
/// memory is counted).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes (e.g. 512M, 4GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: the unit must be K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl BrokerArgs {
    /// The target guard of `--allow-targets` and `--deny-targets`.
    pub fn target_guard(&self) -> anyhow::Result<protocol::targets::TargetGuard> {
        protocol::targets::TargetGuard::new(&self.allow_targets, &self.deny_targets)
            .map_err(anyhow::Error::msg)
    }

    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        // A year at most: `Duration::from_secs_f64` panics past u64 seconds.
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 365.0 * 86400.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(anyhow::anyhow!(
                    "--{name} must be a positive number of seconds, at most a year"
                ))
            }
        };
        if self.port == u16::MAX {
            anyhow::bail!("--port must leave room for PORT+1");
        }
        let mut queue_defaults = protocol::QueueConfig {
            retention: secs("retention", self.retention)?.as_secs_f64(),
            ..Default::default()
        };
        let mut queues = Vec::new();
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            let (d, q) = parse_queue_file(&text, queue_defaults)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            queue_defaults = d;
            queues = q;
        }
        if self.replicas == 0 {
            anyhow::bail!("--replicas must be at least 1");
        }
        if self.port > u16::MAX - 3 {
            anyhow::bail!("--port must leave room for PORT+3");
        }
        let node_id = self
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{}", self.port));
        check_node_id(&node_id)?;
        let data = (!self.in_memory).then(|| crate::node::DataConfig {
            dir: self.data_dir.join(&node_id),
            fsync: match self.fsync {
                FsyncArg::Always => crate::journal::Fsync::Always,
                FsyncArg::Never => crate::journal::Fsync::Never,
            },
            salvage: self.salvage_journal,
            min_free: self.min_free_disk,
        });
        let curve = match &self.curve_dir {
            Some(dir) => Some(
                crate::zap::BrokerCurve::read_dir(dir)
                    .map_err(|e| anyhow::anyhow!("--curve-dir: {e}"))?,
            ),
            None => None,
        };
        Ok(NodeConfig {
            curve,
            data,
            bind: self.bind.clone(),
            advertise: self.advertise.clone(),
            base_port: self.port,
            join: self.join.clone(),
            replicas: self.replicas,
            remove_after: secs("remove-after", self.remove_after)?,
            scheduler: StoreConfig {
                node_id,
                queue_defaults,
                queues,
                replica_offset: secs("replica-offset", self.replica_offset)?,
                limits: crate::store::StoreLimits {
                    max_task_bytes: self
                        .max_pending_bytes
                        .unwrap_or_else(crate::store::default_task_bytes),
                    max_tasks: self.max_tasks,
                    max_queues: self.max_queues,
                },
            },
            dispatch: DispatchConfig {
                heartbeat_interval: secs("heartbeat-interval", self.heartbeat_interval)?,
                worker_expiry: secs("worker-expiry", self.worker_expiry)?,
                ..Default::default()
            },
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueFile {
    #[serde(default)]
    defaults: Option<protocol::QueueConfigPatch>,
    #[serde(default)]
    queues: std::collections::BTreeMap<String, protocol::QueueConfigPatch>,
}

/// Reads a queue configuration file: the defaults for every queue and the
/// settings of each named queue, checked like `PUT /queue/NAME`.
pub fn parse_queue_file(
    text: &str,
    mut defaults: protocol::QueueConfig,
) -> Result<(protocol::QueueConfig, Vec<(String, protocol::QueueConfig)>), String> {
    let file: QueueFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if let Some(d) = file.defaults {
        crate::queues::apply_patch(&mut defaults, d).map_err(|e| format!("[defaults]: {e}"))?;
    }
    let mut queues = Vec::new();
    for (name, patch) in file.queues {
        if let Err(rule) = protocol::limits::check_queue_name(&name) {
            return Err(format!("queue {name:?}: {rule}"));
        }
        let mut c = defaults.clone();
        crate::queues::apply_patch(&mut c, patch).map_err(|e| format!("[queues.{name}]: {e}"))?;
        queues.push((name, c));
    }
    Ok((defaults, queues))
}

/// Starts a node and serves until the process is stopped.
pub fn run(args: BrokerArgs) -> anyhow::Result<()> {
    crate::validate::set_target_guard(args.target_guard()?);
    let node = Node::start(args.node_config()?)?;
    node.wait();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_file() {
        let (d, q) = parse_queue_file(
            "[defaults]\nmax_attempts = 5\n[queues.emails]\nrate = 20\nburst = 5\n",
            protocol::QueueConfig::default(),
        )
        .unwrap();
        assert_eq!(d.max_attempts, 5);
        assert_eq!(q[0].0, "emails");
        assert_eq!(
            (q[0].1.rate, q[0].1.burst, q[0].1.max_attempts),
            (20.0, 5, 5)
        );
        assert!(parse_queue_file("[queues.x]\nrat = 1\n", Default::default()).is_err());
        assert!(parse_queue_file("[queues.x]\nburst = 0\n", Default::default()).is_err());
        assert!(parse_queue_file("[queues.\"a b\"]\n", Default::default()).is_err());
    }
}
