//! Performs webhook deliveries: one tokio task per delivery on a pooled
//! hyper client (HTTP/1.1, HTTPS through rustls with the webpki roots),
//! bounded by the credit the link granted the broker, each attempt under
//! the task's own timeout. Redirects are not followed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use protocol::{DeliveredTask, DeliveryResult, Outcome};
use tokio::sync::mpsc;

use crate::broker_link::{BrokerLink, Delivery};

/// The `User-Agent` of every webhook.
pub const USER_AGENT_VALUE: &str = concat!("miyamoto/", env!("CARGO_PKG_VERSION"));

/// How much of a worker's answer is read (the rest is dropped).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the pooled client.
pub fn client(max_idle_per_host: usize) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(https)
}

/// Delivers every task arriving on `jobs`, reporting through `link`.
pub async fn run(mut jobs: mpsc::UnboundedReceiver<Delivery>, link: BrokerLink, max_idle: usize) {
    let client = client(max_idle);
    while let Some(job) = jobs.recv().await {
        let client = client.clone();
        let link = link.clone();
        tokio::spawn(async move {
            let result = deliver(&client, job.delivery, &job.task).await;
            link.report(result);
        });
    }
}

/// Builds the HTTP request for a task (see `PROTOCOL.md`, "Webhooks").
pub fn build_request(task: &DeliveredTask) -> Result<Request<Full<Bytes>>, String> {
    let method = Method::from_bytes(task.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", task.method))?;
    let in_query = method == Method::GET || method == Method::DELETE;
    let mut url = task.url.clone();
    let form = || {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(task.params.iter())
            .finish()
    };
    let (body, content_type) = match &task.body {
        Some(b) => (
            Bytes::from(b.to_vec()),
            Some(
                task.content_type
                    .clone()
                    .unwrap_or_else(|| "application/octet-stream".into()),
            ),
        ),
        None if in_query => {
            if !task.params.is_empty() {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(&form());
            }
            (Bytes::new(), None)
        }
        None => (
            Bytes::from(form()),
            Some("application/x-www-form-urlencoded".to_string()),
        ),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(&url)
        .body(Full::new(body))
        .map_err(|e| format!("cannot build a request for {url:?}: {e}"))?;
    let h = req.headers_mut();
    for (k, v) in &task.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    set("x-task-id", task.id.clone());
    set("x-task-queue", task.queue.clone());
    if let Some(name) = &task.name {
        set("x-task-name", name.clone());
    }
    set("x-task-retry-count", task.retry_count.to_string());
    set("x-task-execution-count", task.execution_count.to_string());
    set("x-task-eta", format!("{:.6}", task.eta));
    if let Some(ct) = content_type {
        if let Ok(v) = HeaderValue::from_str(&ct) {
            h.insert(CONTENT_TYPE, v);
        }
    }
    h.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    Ok(req)
}

/// Performs one attempt and turns its outcome into a result.
pub async fn deliver(client: &HttpsClient, delivery: u64, task: &DeliveredTask) -> DeliveryResult {
    let mut result = DeliveryResult {
        delivery,
        task_id: task.id.clone(),
        outcome: Outcome::Failure,
        status: None,
        reason: None,
        retry_after: None,
        responded: false,
    };
    let req = match build_request(task) {
        Ok(r) => r,
        Err(e) => {
            result.reason = Some(e);
            return result;
        }
    };
    let timeout = Duration::from_secs_f64(task.timeout.clamp(0.001, 86400.0));
    let attempt = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read (a bounded part of) the answer so the connection is reused.
        let _ = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await;
        Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((status, retry_after))) => {
            result.responded = true;
            result.status = Some(status.as_u16());
            if status.is_success() {
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
            while let Some(s) = source {
                reason.push_str(": ");
                reason.push_str(&s.to_string());
                source = s.source();
            }
            result.reason = Some(reason);
        }
        Err(_) => result.reason = Some(format!("timed out after {:.3} s", timeout.as_secs_f64())),
    }
    result
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
        }
    }

    #[test]
    fn get_puts_params_in_the_query() {
        let r = build_request(&task()).unwrap();
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
        let r = build_request(&t).unwrap();
        assert_eq!(
            r.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        assert_eq!(r.uri().to_string(), "http://localhost:1/w?x=1");
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
