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
    /// Webhook targets let through whatever the deny rules say: CIDR
    /// ranges and host names (`*.internal`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub allow_targets: Vec<String>,
    /// Webhook targets refused, beside the defaults (link-local, cloud
    /// metadata, 0.0.0.0 and ::); checked on every address a host name
    /// resolves to. A refused delivery fails its task without retries.
    #[arg(long, value_delimiter = ',')]
    pub deny_targets: Vec<String>,
    #[command(flatten)]
    pub curve: CurveClientArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// CURVE keys of a ZeroMQ client (the gateway, `miyamoto enqueue`, `get`,
/// `cancel`, `cluster`, `worker`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CurveClientArgs {
    /// The brokers' public key file (server.key of their --curve-dir):
    /// connect over CURVE. Also MIYAMOTO_CURVE_SERVER_KEY.
    #[arg(long, env = "MIYAMOTO_CURVE_SERVER_KEY", requires = "curve_key")]
    pub curve_server_key: Option<std::path::PathBuf>,
    /// This client's secret key file (NAME.key_secret, from `miyamoto
    /// curve-keygen`); its public half must be admitted by the brokers.
    /// Also MIYAMOTO_CURVE_KEY.
    #[arg(long, env = "MIYAMOTO_CURVE_KEY", requires = "curve_server_key")]
    pub curve_key: Option<std::path::PathBuf>,
}

impl CurveClientArgs {
    /// The keys, read and checked; `None` without the flags.
    pub fn keys(&self) -> anyhow::Result<Option<client::curve::ClientKeys>> {
        client::curve::ClientKeys::from_options(
            self.curve_server_key.as_deref(),
            self.curve_key.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    }
}

/// The HTTP server's bounds (see `LIMITS.md`).
#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// Seconds to receive a request's headers, counted from when the
    /// connection is ready for one (so also the longest a kept-alive
    /// connection may sit idle).
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds to receive a request's body; a slower one gets 408.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Connections served at once; past it a new connection is answered
    /// 503 and closed (default: half the file descriptors, 16 to 16384).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// An API token that may call the API, sent as `Authorization: Bearer
    /// TOKEN`: `TOKEN` (every scope), `TOKEN:SCOPES` (enqueue, read,
    /// admin, comma-separated) or `TOKEN:enqueue:QUEUES` (names, or
    /// prefixes as `jobs-*`). Repeatable. Also MIYAMOTO_API_TOKENS
    /// (tokens separated by white space).
    #[arg(long = "api-token")]
    pub api_tokens: Vec<String>,
    /// A file of API tokens, one a line as `--api-token` takes them;
    /// blank lines and `#` comments are skipped.
    #[arg(long = "api-tokens")]
    pub api_token_file: Option<std::path::PathBuf>,
    /// Serve every client without a token. Without tokens and without
    /// this, only loopback clients are served.
    #[arg(long)]
    pub no_auth: bool,
    /// Web origins (`https://dash.example.com`) whose pages may call the
    /// API from a browser; other pages' requests are refused.
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Host names the gateway answers to, beyond addresses and localhost
    /// (`queue.example.com`, `*.internal`, or `*` for any).
    #[arg(long, value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// A PEM file of CA certificates trusted for HTTPS webhooks, beside
    /// the usual web roots (a private CA's).
    #[arg(long)]
    pub webhook_ca: Option<std::path::PathBuf>,
}

impl HttpArgs {
    /// The extra roots of `--webhook-ca`.
    pub fn webhook_roots(&self) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
        match &self.webhook_ca {
            Some(p) => crate::webhooks::read_roots(p).map_err(anyhow::Error::msg),
            None => Ok(Vec::new()),
        }
    }
}

impl HttpArgs {
    /// The bounds, with the seconds checked.
    pub fn limits(&self) -> anyhow::Result<crate::HttpLimits> {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 86400.0 {
                Ok(std::time::Duration::from_secs_f64(v))
            } else {
                Err(anyhow::anyhow!(
                    "--{name} must be a number of seconds from 0 to 86400"
                ))
            }
        };
        let mut specs = self.api_tokens.clone();
        if let Some(path) = &self.api_token_file {
            specs.extend(crate::auth::read_token_file(path).map_err(anyhow::Error::msg)?);
        }
        if let Ok(env) = std::env::var("MIYAMOTO_API_TOKENS") {
            specs.extend(env.split_whitespace().map(str::to_string));
        }
        let access = crate::auth::Access::new(
            &specs,
            self.no_auth,
            self.allowed_origins.clone(),
            self.allowed_hosts.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        Ok(crate::HttpLimits {
            access,
            header_timeout: secs("header-timeout", self.header_timeout)?,
            body_timeout: secs("body-timeout", self.body_timeout)?,
            max_connections: self
                .max_connections
                .unwrap_or_else(crate::default_max_connections),
        })
    }
}

impl GatewayArgs {
    /// The dispatcher's settings, with the secrets checked.
    pub fn webhook_config(&self) -> anyhow::Result<crate::webhooks::WebhookConfig> {
        let mut c = webhook_config(&self.signing_secrets)?;
        c.extra_roots = self.http.webhook_roots()?;
        c.guard = std::sync::Arc::new(
            protocol::targets::TargetGuard::new(&self.allow_targets, &self.deny_targets)
                .map_err(anyhow::Error::msg)?,
        );
        Ok(c)
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
        guard: Default::default(),
        extra_roots: Vec::new(),
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
    let mut link =
        LinkConfig::for_brokers(&args.broker, args.concurrency).map_err(anyhow::Error::msg)?;
    link.curve = args.curve.keys()?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, brokers = ?args.broker, "gateway listening");
    let webhooks = args.webhook_config()?;
    let limits = args.http.limits()?;
    if let Some(w) = listener
        .local_addr()
        .ok()
        .and_then(|a| limits.access.warning(&a))
    {
        tracing::warn!("{w}");
    }
    crate::serve(listener, link, webhooks, limits, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
