//! The `miyamoto-gateway` command line (also `miyamoto gateway`).

use clap::Parser;

use crate::broker_link::LinkConfig;

/// A Miyamoto gateway: the REST API and the webhook dispatcher.
#[derive(Parser, Debug, Clone)]
#[command(name = "miyamoto-gateway", version)]
pub struct GatewayArgs {
    /// HTTP address to listen on (default: $INTERFACE:8088, INTERFACE
    /// defaulting to 127.0.0.1).
    #[arg(long)]
    pub listen: Option<String>,
    /// Brokers' base-port endpoints, comma-separated; one is enough (the
    /// others are learned from its roster).
    #[arg(long, default_value = "tcp://127.0.0.1:7000", value_delimiter = ',')]
    pub broker: Vec<String>,
    /// Webhook deliveries in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u32,
    /// Standard Webhooks secret (`whsec_<base64>`) signing every webhook of
    /// queues without secrets of their own; repeat it during a key
    /// rotation. Also read from MIYAMOTO_SIGNING_SECRETS (comma-separated).
    #[arg(
        long = "signing-secret",
        env = "MIYAMOTO_SIGNING_SECRETS",
        value_delimiter = ','
    )]
    pub signing_secrets: Vec<String>,
}

impl GatewayArgs {
    /// The dispatcher's settings, with the secrets checked.
    pub fn webhook_config(&self) -> anyhow::Result<crate::webhooks::WebhookConfig> {
        webhook_config(&self.signing_secrets)
    }
}

/// Checks signing secrets and builds the dispatcher's settings.
pub fn webhook_config(secrets: &[String]) -> anyhow::Result<crate::webhooks::WebhookConfig> {
    for s in secrets {
        if protocol::limits::decode_signing_secret(s).is_none() {
            anyhow::bail!("a signing secret must be whsec_ followed by base64");
        }
    }
    Ok(crate::webhooks::WebhookConfig {
        signing_secrets: secrets.to_vec(),
    })
}

/// `$INTERFACE:port`, as the original Miyamoto did.
pub fn default_listen(port: u16) -> String {
    let interface = std::env::var("INTERFACE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into());
    if interface.contains(':') && !interface.starts_with('[') {
        format!("[{interface}]:{port}")
    } else {
        format!("{interface}:{port}")
    }
}

/// Runs the gateway until Ctrl-C.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let listen = args.listen.clone().unwrap_or_else(|| default_listen(8088));
    let link =
        LinkConfig::for_brokers(&args.broker, args.concurrency).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, brokers = ?args.broker, "gateway listening");
    let webhooks = args.webhook_config()?;
    crate::serve(listener, link, webhooks, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
