//! Performs webhook deliveries: one tokio task per delivery on a pooled
//! hyper client (HTTP/1.1, HTTPS through rustls with the webpki roots),
//! bounded by the credit the link granted the broker, each attempt under
//! the task's own timeout. Redirects are not followed.
//!
//! When a signing secret applies (the queue's, else the gateway's), each
//! webhook carries Standard Webhooks headers: `webhook-id` (the task id),
//! `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`, one per secret, space-separated).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use protocol::limits::MAX_RESPONSE_BYTES;
use protocol::{DeliveredTask, DeliveryResult, Outcome};
use tokio::sync::mpsc;

use crate::broker_link::{BrokerLink, Delivery};

/// The `User-Agent` of every webhook.
pub const USER_AGENT_VALUE: &str = concat!("miyamoto/", env!("CARGO_PKG_VERSION"));

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector<GuardResolver>>, Full<Bytes>>;

/// What starts the reason of a delivery the target guard refused.
const DENIED: &str = "target denied: ";

/// The resolver of webhook host names: it resolves (the system's
/// resolver, on tokio's blocking pool) and hands the connector only
/// addresses the target guard allows, so the connection goes to an
/// address that was checked, with no second lookup for DNS rebinding to
/// slip through. A name with any denied address is refused whole.
#[derive(Clone)]
pub struct GuardResolver {
    guard: Arc<protocol::targets::TargetGuard>,
}

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for GuardResolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for a in &addrs {
                if let Err(why) = guard.check_ip(a.ip()) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!("{DENIED}{host} resolves to {}: {why}", a.ip()),
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

/// Builds the pooled client, its host names resolved through `guard`,
/// trusting the webpki roots and `extra_roots` (`--webhook-ca`).
pub fn client(
    max_idle_per_host: usize,
    guard: Arc<protocol::targets::TargetGuard>,
    extra_roots: &[rustls_pki_types::CertificateDer<'static>],
) -> HttpsClient {
    let mut http = HttpConnector::new_with_resolver(GuardResolver { guard });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match tls_config(extra_roots) {
        Some(config) => builder.with_tls_config(config),
        None => builder.with_webpki_roots(),
    };
    let https = builder.https_or_http().enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(https)
}

/// A TLS configuration trusting the webpki roots and `extra` too, or
/// `None` without extra roots (or if one cannot be used: it was checked
/// when read, see [`read_roots`]).
fn tls_config(extra: &[rustls_pki_types::CertificateDer<'static>]) -> Option<rustls::ClientConfig> {
    if extra.is_empty() {
        return None;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in extra {
        if let Err(e) = roots.add(c.clone()) {
            tracing::error!(error = %e, "a --webhook-ca certificate cannot be used");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(config)
}

/// The certificates of a PEM file (`--webhook-ca`): roots trusted for
/// HTTPS webhooks beside the webpki ones.
pub fn read_roots(
    path: &std::path::Path,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    let mut store = rustls::RootCertStore::empty();
    for c in &certs {
        store
            .add(c.clone())
            .map_err(|e| format!("{}: a certificate cannot be a root: {e}", path.display()))?;
    }
    Ok(certs)
}

/// Settings of the dispatcher.
#[derive(Debug, Clone, Default)]
pub struct WebhookConfig {
    /// Secrets (`whsec_…`) signing webhooks of queues that have none of
    /// their own.
    pub signing_secrets: Vec<String>,
    /// Where webhooks may go (`--allow-targets`, `--deny-targets`).
    pub guard: Arc<protocol::targets::TargetGuard>,
    /// Roots trusted for HTTPS webhooks beside the webpki ones
    /// (`--webhook-ca`).
    pub extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
}

/// Delivers every task arriving on `jobs`, reporting through `link`.
pub async fn run(
    mut jobs: mpsc::UnboundedReceiver<Delivery>,
    link: BrokerLink,
    max_idle: usize,
    config: WebhookConfig,
    metrics: Arc<crate::metrics::GatewayMetrics>,
) {
    let client = client(max_idle, config.guard.clone(), &config.extra_roots);
    let config = Arc::new(config);
    while let Some(mut job) = jobs.recv().await {
        let client = client.clone();
        let link = link.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        // Boxed: the future is about 2 KiB, which the task would otherwise
        // copy when spawned and again when it completes.
        tokio::spawn(Box::pin(async move {
            if job.task.signing_secrets.is_empty() {
                job.task.signing_secrets = config.signing_secrets.clone();
            }
            let span =
                tracing::debug_span!("delivery", task = %job.task.id, queue = %job.task.queue);
            let started = std::time::Instant::now();
            metrics.webhook_started();
            let result = tracing::Instrument::instrument(
                deliver(&client, &config.guard, job.delivery, job.task),
                span.clone(),
            )
            .await;
            metrics.webhook_finished(result.status, started.elapsed());
            span.in_scope(
                || tracing::debug!(outcome = ?result.outcome, status = ?result.status, "delivered"),
            );
            link.report(job.broker, result);
        }));
    }
}

/// The `webhook-signature` value for `body`, or `None` without a usable
/// secret.
pub fn sign(secrets: &[String], id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let mut signatures = Vec::new();
    for secret in secrets {
        let Some(key) = protocol::limits::decode_signing_secret(secret) else {
            continue;
        };
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&key) else {
            continue;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        signatures.push(format!("v1,{sig}"));
    }
    (!signatures.is_empty()).then(|| signatures.join(" "))
}

const X_TASK_ID: HeaderName = HeaderName::from_static("x-task-id");
const X_TASK_QUEUE: HeaderName = HeaderName::from_static("x-task-queue");
const X_TASK_NAME: HeaderName = HeaderName::from_static("x-task-name");
const X_TASK_RETRY_COUNT: HeaderName = HeaderName::from_static("x-task-retry-count");
const X_TASK_EXECUTION_COUNT: HeaderName = HeaderName::from_static("x-task-execution-count");
const X_TASK_ETA: HeaderName = HeaderName::from_static("x-task-eta");
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
const FORM: HeaderValue = HeaderValue::from_static("application/x-www-form-urlencoded");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");

/// Unix seconds with six decimals, as `format!("{:.6}")` writes them for
/// times given to the microsecond (what the broker keeps), without going
/// through float formatting.
pub fn eta_header(eta: f64) -> String {
    if !(0.0..1e12).contains(&eta) {
        return format!("{eta:.6}");
    }
    let micros = (eta * 1e6).round() as u64;
    let mut buf = itoa::Buffer::new();
    let mut out = String::with_capacity(24);
    out.push_str(buf.format(micros / 1_000_000));
    out.push('.');
    let frac = buf.format(micros % 1_000_000);
    for _ in frac.len()..6 {
        out.push('0');
    }
    out.push_str(frac);
    out
}

/// Builds the HTTP request for a task (see `PROTOCOL.md`, "Webhooks").
/// The task's body moves into the request.
pub fn build_request(task: &mut DeliveredTask) -> Result<Request<Full<Bytes>>, String> {
    let method = Method::from_bytes(task.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", task.method))?;
    let in_query = method == Method::GET || method == Method::DELETE;
    let mut url = task.url.clone();
    let form = |params: &[(String, String)]| {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter())
            .finish()
    };
    let (body, content_type) = match task.body.take() {
        Some(b) => (
            Bytes::from(b.into_vec()),
            // A content type that is no header value is left out.
            match &task.content_type {
                Some(ct) => HeaderValue::from_bytes(ct.as_bytes()).ok(),
                None => Some(OCTET_STREAM),
            },
        ),
        None if in_query => {
            if !task.params.is_empty() {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(&form(&task.params));
            }
            (Bytes::new(), None)
        }
        None => (Bytes::from(form(&task.params)), Some(FORM)),
    };
    let uri = hyper::Uri::try_from(url)
        .map_err(|e| format!("cannot build a request for {:?}: {e}", task.url))?;
    let signature = if task.signing_secrets.is_empty() {
        None
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        sign(&task.signing_secrets, &task.id, now, &body).map(|s| (now, s))
    };
    let h = headers(task, signature, content_type);
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = h;
    Ok(req)
}

/// A webhook's headers: the task's own, then the `X-Task-*` headers, the
/// signature's, the content type and the user agent (which replace any
/// of the task's with the same name).
fn headers(
    task: &DeliveredTask,
    signature: Option<(u64, String)>,
    content_type: Option<HeaderValue>,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(11 + task.headers.len());
    // The broker refuses at enqueue what is skipped here; the check is
    // kept for tasks that reached a broker some other way (a peer).
    for (k, v) in &task.headers {
        if !protocol::limits::is_allowed_task_header(k) {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) {
            h.append(k, v);
        }
    }
    let text = |value: &str| HeaderValue::from_str(value).ok();
    let mut set = |name: HeaderName, value: Option<HeaderValue>| {
        if let Some(v) = value {
            h.insert(name, v);
        }
    };
    set(X_TASK_ID, text(&task.id));
    set(X_TASK_QUEUE, text(&task.queue));
    if let Some(name) = &task.name {
        set(X_TASK_NAME, text(name));
    }
    set(
        X_TASK_RETRY_COUNT,
        Some(HeaderValue::from(task.retry_count)),
    );
    set(
        X_TASK_EXECUTION_COUNT,
        Some(HeaderValue::from(task.execution_count)),
    );
    set(X_TASK_ETA, HeaderValue::try_from(eta_header(task.eta)).ok());
    if let Some((timestamp, signature)) = signature {
        set(WEBHOOK_ID, text(&task.id));
        set(WEBHOOK_TIMESTAMP, Some(HeaderValue::from(timestamp)));
        set(WEBHOOK_SIGNATURE, HeaderValue::try_from(signature).ok());
    }
    if let Some(ct) = content_type {
        h.insert(CONTENT_TYPE, ct);
    }
    h.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    h
}

/// Performs one attempt and turns its outcome into a result.
pub async fn deliver(
    client: &HttpsClient,
    guard: &protocol::targets::TargetGuard,
    delivery: u64,
    mut task: DeliveredTask,
) -> DeliveryResult {
    let req = build_request(&mut task);
    let mut result = DeliveryResult {
        delivery,
        task_id: task.id,
        outcome: Outcome::Failure,
        status: None,
        reason: None,
        retry_after: None,
        responded: false,
        body: None,
        no_retry: false,
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            result.reason = Some(e);
            return result;
        }
    };
    // An address in the URL is not resolved: it is checked here. A
    // refused target fails the task at once, without retries.
    if let Some(host) = req.uri().host() {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            if let Err(why) = guard.check_ip(ip) {
                result.reason = Some(format!("{DENIED}{why}"));
                result.no_retry = true;
                return result;
            }
        }
    }
    // The broker's number, through the one gate: a NaN panicked here once.
    let timeout = protocol::limits::clamp_secs(task.timeout, Duration::from_secs(86400))
        .max(Duration::from_millis(1));
    let attempt = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let no_retry = resp
            .headers()
            .get("x-task-no-retry")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let body = read_prefix(resp.into_body(), MAX_RESPONSE_BYTES).await;
        Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, no_retry, body))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((status, retry_after, no_retry, body))) => {
            result.responded = true;
            result.status = Some(status.as_u16());
            result.no_retry = no_retry;
            let (body, cut_short) = match body {
                Ok(b) => (b, None),
                Err((b, reason)) => (b, Some(reason)),
            };
            result.body = Some(body.into());
            if let Some(reason) = cut_short {
                // A 2xx whose body did not arrive whole is not a success:
                // the worker may not have finished (see README, Retries).
                result.reason = Some(reason);
            } else if status.is_success() {
                result.outcome = Outcome::Success;
            } else {
                result.reason = Some(format!("HTTP {}", status.as_u16()));
                if status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::SERVICE_UNAVAILABLE
                {
                    result.retry_after = retry_after;
                }
            }
        }
        Ok(Err(e)) => {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            let mut denied = None;
            while let Some(s) = source {
                reason.push_str(": ");
                reason.push_str(&s.to_string());
                if let Some(io) = s.downcast_ref::<std::io::Error>() {
                    if io.kind() == std::io::ErrorKind::PermissionDenied
                        && io.to_string().starts_with(DENIED)
                    {
                        denied = Some(io.to_string());
                    }
                }
                source = s.source();
            }
            // The target guard refused the host's addresses: no retry.
            if let Some(d) = denied {
                result.no_retry = true;
                reason = d;
            }
            result.reason = Some(reason);
        }
        Err(_) => result.reason = Some(format!("timed out after {:.3} s", timeout.as_secs_f64())),
    }
    result
}

/// The first `max` bytes of a body. A longer body is cut there, which
/// also gives up its connection. `Err` carries what was read and why the
/// body ended before its end (a reset, a short `Content-Length`).
async fn read_prefix(
    mut body: hyper::body::Incoming,
    max: usize,
) -> Result<Vec<u8>, (Vec<u8>, String)> {
    let mut out = Vec::new();
    while out.len() < max {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let take = data.len().min(max - out.len());
                    out.extend_from_slice(&data[..take]);
                }
            }
            Some(Err(e)) => {
                let reason = format!("the response was cut short after {} bytes: {e}", out.len());
                return Err((out, reason));
            }
            None => break,
        }
    }
    Ok(out)
}

/// `Retry-After`: delay-seconds or an HTTP date; returns seconds from now.
pub fn parse_retry_after(v: &str) -> Option<f64> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs as f64);
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> DeliveredTask {
        DeliveredTask {
            id: "id".into(),
            queue: "default".into(),
            name: Some("n".into()),
            url: "http://localhost:1/w?x=1".into(),
            method: "GET".into(),
            params: vec![("foo".into(), "b r".into())],
            body: None,
            content_type: None,
            headers: vec![("X-Custom".into(), "v".into())],
            eta: 1.5,
            timeout: 1.0,
            retry_count: 2,
            execution_count: 1,
            signing_secrets: vec![],
        }
    }

    #[test]
    fn get_puts_params_in_the_query() {
        let r = build_request(&mut task()).unwrap();
        assert_eq!(r.uri().to_string(), "http://localhost:1/w?x=1&foo=b+r");
        assert_eq!(r.headers()["x-task-eta"], "1.500000");
        assert_eq!(r.headers()["x-task-retry-count"], "2");
        assert_eq!(r.headers()["x-custom"], "v");
        assert!(r.headers().get(CONTENT_TYPE).is_none());
    }

    #[test]
    fn post_form_encodes_params() {
        let mut t = task();
        t.method = "POST".into();
        let r = build_request(&mut t).unwrap();
        assert_eq!(
            r.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        assert_eq!(r.uri().to_string(), "http://localhost:1/w?x=1");
    }

    #[test]
    fn eta_header_matches_float_formatting() {
        let mut micros: u64 = 1_764_288_000_123_456;
        for step in [0u64, 1, 7, 999_999, 1_000_000, 123_457_891, 86_400_000_000] {
            micros += step;
            let eta = micros as f64 / 1e6;
            assert_eq!(eta_header(eta), format!("{eta:.6}"), "{micros}");
        }
        for eta in [0.0, 0.5, 1.5, 3.000001, 59.999999, -1.0, 1e13, f64::NAN] {
            assert_eq!(eta_header(eta), format!("{eta:.6}"), "{eta}");
        }
    }

    #[test]
    fn an_unusable_content_type_keeps_the_tasks_own_header() {
        let mut t = task();
        t.method = "POST".into();
        t.params.clear();
        t.body = Some(serde_bytes::ByteBuf::from(b"x".to_vec()));
        t.content_type = Some("text/plain\u{7f}".into());
        t.headers = vec![("Content-Type".into(), "text/plain".into())];
        let r = build_request(&mut t).unwrap();
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain");
        t.content_type = None;
        t.body = Some(serde_bytes::ByteBuf::from(b"x".to_vec()));
        let r = build_request(&mut t).unwrap();
        assert_eq!(r.headers()[CONTENT_TYPE], "application/octet-stream");
    }

    #[test]
    fn a_bad_url_is_an_error_not_a_panic() {
        let mut t = task();
        t.url = "http://exa mple.com/".into();
        assert!(build_request(&mut t)
            .unwrap_err()
            .starts_with("cannot build a request for \"http://exa mple.com/\""));
        let mut t = task();
        t.method = "BAD METHOD".into();
        assert!(build_request(&mut t)
            .unwrap_err()
            .starts_with("invalid method"));
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks reference libraries.
        let sig = sign(
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string()],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(3.0));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(0.0)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
