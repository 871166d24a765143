//! Miyamoto's gateway: the REST API and the webhook dispatcher, on tokio
//! and hyper. ZeroMQ lives on one dedicated thread ([`broker_link`]).
//!
//! Layout:
//! * [`api`] — routing and parsing of the REST API (one entry point).
//! * [`broker_link`] — the ZeroMQ thread: requests to the broker, and the
//!   worker registration through which due webhook tasks arrive.
//! * [`webhooks`] — performs deliveries with a pooled hyper client.
//! * [`cli`] — the `miyamoto-gateway` command line.

pub mod api;
pub mod auth;
pub mod broker_link;
pub mod cli;
pub mod metrics;
pub mod ui;
pub mod views;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use broker_link::{BrokerLink, LinkConfig};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The HTTP server's bounds (see `LIMITS.md`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Longest time to receive a request's headers, counted from when the
    /// connection is ready for one: so also the longest a kept-alive
    /// connection may sit idle (hyper keeps one timer for both).
    pub header_timeout: Duration,
    /// Longest time to receive a request's body.
    pub body_timeout: Duration,
    /// Connections served at once; past it, a new connection is answered
    /// `503` and closed.
    pub max_connections: usize,
    /// Who may call the API ([`auth`]).
    pub access: auth::Access,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: default_max_connections(),
            access: auth::Access::default(),
        }
    }
}

/// Half the process's file descriptors (the other half is for the
/// webhooks' connections and ZeroMQ), between 16 and 16,384.
pub fn default_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let fds = if ok { lim.rlim_cur as usize } else { 1024 };
    (fds / 2).clamp(16, 16_384)
}

/// Connections over the cap being told `503` and drained at once, at most;
/// past that the `503` is written without waiting (it fits any send
/// buffer) and the connection closed undrained. Each takes at most
/// [`REFUSAL_DRAIN`], so a crowd of idle connections is answered at
/// thousands a second.
const MAX_REFUSING: usize = 256;

/// How long a refused connection's request is read (and dropped) after
/// the `503`, so that closing does not reset the answer away.
const REFUSAL_DRAIN: Duration = Duration::from_millis(100);

/// What a connection over the cap is told before it is closed.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 78\r\n\r\n{\"status\":\"error\",\"reason\":\"too many connections to this gateway; try again\"}\n";

/// Serves the REST API on `listener` and dispatches webhooks until
/// `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    link_config: LinkConfig,
    webhook_config: webhooks::WebhookConfig,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let concurrency = link_config.concurrency as usize;
    let (link, jobs) = BrokerLink::start(link_config)?;
    let metrics = Arc::new(metrics::GatewayMetrics::default());
    let dispatcher = tokio::spawn(webhooks::run(
        jobs,
        link.clone(),
        concurrency,
        webhook_config,
        metrics.clone(),
    ));
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let api = api::Api::new(link.clone(), limits.clone(), metrics);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refuse(stream, &refusing);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let peer = peer.ip();
            let service = service_fn(move |req| api.clone().handle(req, peer));
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    link.stop();
    dispatcher.abort();
    Ok(())
}

/// Tells a connection over the cap `503`, reading what it sent for up to
/// [`REFUSAL_DRAIN`] so that closing does not reset the answer away.
fn refuse(mut stream: TcpStream, refusing: &Arc<Semaphore>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        // Best effort: a client that already sent its request may see the
        // answer reset away by the close, one that waits for it reads it.
        let _ = stream.try_write(BUSY_RESPONSE);
        return;
    };
    tokio::spawn(async move {
        let _ = stream.write_all(BUSY_RESPONSE).await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let drain = async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_DRAIN, drain).await;
        drop(permit);
    });
}
