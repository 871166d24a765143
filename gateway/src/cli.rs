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
    /// The broker's base-port endpoint.
    #[arg(long, default_value = "tcp://127.0.0.1:7000")]
    pub broker: String,
    /// Webhook deliveries in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u32,
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
        LinkConfig::for_broker(&args.broker, args.concurrency).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, broker = %args.broker, "gateway listening");
    crate::serve(listener, link, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
