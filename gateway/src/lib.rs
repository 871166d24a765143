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
pub mod broker_link;
pub mod cli;
pub mod webhooks;

use std::future::Future;

use broker_link::{BrokerLink, LinkConfig};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves the REST API on `listener` and dispatches webhooks until
/// `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    link_config: LinkConfig,
    webhook_config: webhooks::WebhookConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let concurrency = link_config.concurrency as usize;
    let (link, jobs) = BrokerLink::start(link_config)?;
    let dispatcher = tokio::spawn(webhooks::run(
        jobs,
        link.clone(),
        concurrency,
        webhook_config,
    ));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let link = link.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| api::handle(req, link.clone()));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    link.stop();
    dispatcher.abort();
    Ok(())
}
