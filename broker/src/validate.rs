//! Turns a producer's [`TaskSpec`] into a task the scheduler can store, or
//! a reason for a `bad_request` error. This is the one place enqueue rules
//! live; the gateway relies on it rather than repeating them.

use protocol::{is_valid_pool_name, is_valid_queue_name, is_valid_task_name, TaskSpec, HTTP_POOL};

/// Longest allowed distance of an eta into the future.
pub const MAX_ETA_AHEAD_SECS: f64 = 30.0 * 86400.0;
/// Default and largest per-attempt timeout.
pub const DEFAULT_TIMEOUT_SECS: f64 = 30.0;
pub const MAX_TIMEOUT_SECS: f64 = 3600.0;

/// Methods a task may use.
pub const METHODS: [&str; 5] = ["POST", "GET", "PUT", "PATCH", "DELETE"];

/// A task that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTask {
    pub queue: String,
    pub name: Option<String>,
    /// Normalized URL (ASCII, as `url::Url` serializes it).
    pub url: String,
    /// The dispatch pool: [`HTTP_POOL`] or the POOL of `zmq://POOL`.
    pub pool: String,
    pub method: String,
    pub params: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Unix seconds; never in the past of `now`.
    pub eta: f64,
    pub timeout: f64,
    pub callback_url: Option<String>,
    pub failure_callback_url: Option<String>,
    pub idempotency_key: Option<String>,
}

/// Checks `spec` for `queue` at time `now` (unix seconds), with the default
/// per-attempt timeout [`DEFAULT_TIMEOUT_SECS`].
pub fn validate(queue: &str, spec: TaskSpec, now: f64) -> Result<ValidTask, String> {
    validate_with(queue, spec, now, DEFAULT_TIMEOUT_SECS)
}

/// A callback URL must be a plain http(s) URL with a host.
fn callback(field: &str, url: Option<String>) -> Result<Option<String>, String> {
    let Some(url) = url else { return Ok(None) };
    let parsed = url::Url::parse(&url).map_err(|e| format!("{field} is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{field} must be an http or https URL with a host"));
    }
    Ok(Some(parsed.to_string()))
}

/// Like [`validate`], with the queue's default timeout.
pub fn validate_with(
    queue: &str,
    spec: TaskSpec,
    now: f64,
    default_timeout: f64,
) -> Result<ValidTask, String> {
    if !is_valid_queue_name(queue) {
        return Err("queue names must match [A-Za-z0-9-]{1,100}".into());
    }
    if spec.url.is_empty() {
        return Err("task.url is required".into());
    }
    let url =
        url::Url::parse(&spec.url).map_err(|e| format!("task.url is not a valid URL: {e}"))?;
    let pool = match url.scheme() {
        "http" | "https" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err("task.url must name a host".into());
            }
            HTTP_POOL.to_string()
        }
        "zmq" => {
            let pool = url.host_str().unwrap_or("");
            if !is_valid_pool_name(pool) || !matches!(url.path(), "" | "/") || url.query().is_some()
            {
                return Err(
                    "zmq URLs must be zmq://POOL with POOL matching [A-Za-z0-9_.-]{1,100}".into(),
                );
            }
            pool.to_string()
        }
        other => {
            return Err(format!(
                "task.url scheme must be http, https or zmq, not {other:?}"
            ))
        }
    };
    let method = match spec.method.as_deref() {
        None | Some("") => "POST".to_string(),
        Some(m) => {
            let upper = m.to_ascii_uppercase();
            if !METHODS.contains(&upper.as_str()) {
                return Err(format!(
                    "task.method must be one of {}, not {m:?}",
                    METHODS.join(", ")
                ));
            }
            upper
        }
    };
    if spec.body.is_some() && !spec.params.is_empty() {
        return Err("params and body are exclusive".into());
    }
    let body_len = match &spec.body {
        Some(b) => b.len(),
        None => spec.params.iter().map(|(k, v)| k.len() + v.len() + 2).sum(),
    };
    if body_len > protocol::MAX_TASK_BODY_BYTES {
        return Err(format!(
            "the task body exceeds {} bytes",
            protocol::MAX_TASK_BODY_BYTES
        ));
    }
    let eta = match (spec.countdown, spec.eta) {
        (Some(_), Some(_)) => return Err("task.countdown and task.eta are exclusive".into()),
        (Some(c), None) => {
            if !c.is_finite() || c < 0.0 {
                return Err("task.countdown must be a number of seconds, 0 or more".into());
            }
            if c > MAX_ETA_AHEAD_SECS {
                return Err("task.countdown is more than 30 days ahead".into());
            }
            now + c
        }
        (None, Some(e)) => {
            if !e.is_finite() {
                return Err("task.eta must be a unix time in seconds".into());
            }
            if e > now + MAX_ETA_AHEAD_SECS {
                return Err("task.eta is more than 30 days ahead".into());
            }
            e.max(now)
        }
        (None, None) => now,
    };
    if let Some(name) = &spec.name {
        if !is_valid_task_name(name) {
            return Err("task.name must match [A-Za-z0-9_-]{1,500}".into());
        }
    }
    let timeout = match spec.timeout {
        None => default_timeout,
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_SECS => t,
        Some(_) => {
            return Err(format!(
                "task.timeout must be between 0 and {MAX_TIMEOUT_SECS} seconds"
            ))
        }
    };
    for (k, v) in &spec.headers {
        if k.is_empty() || !k.bytes().all(is_token_byte) {
            return Err(format!("header name {k:?} is not a valid HTTP header name"));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!("header {k:?} has a control character in its value"));
        }
    }
    if let Some(ct) = &spec.content_type {
        if ct.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err("content_type has a control character".into());
        }
    }
    let callback_url = callback("callback_url", spec.callback_url)?;
    let failure_callback_url = callback("failure_callback_url", spec.failure_callback_url)?;
    if let Some(k) = &spec.idempotency_key {
        if !(1..=500).contains(&k.len()) || !k.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err("the idempotency key must be 1 to 500 visible ASCII characters".into());
        }
    }
    Ok(ValidTask {
        queue: queue.to_string(),
        name: spec.name,
        url: url.to_string(),
        pool,
        method,
        params: spec.params,
        body: spec.body.map(|b| b.into_vec()),
        content_type: spec.content_type,
        headers: spec.headers,
        eta,
        timeout,
        callback_url,
        failure_callback_url,
        idempotency_key: spec.idempotency_key,
    })
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> TaskSpec {
        TaskSpec {
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_and_normalizes() {
        let t = validate("default", spec("http://localhost:9099/worker"), 100.0).unwrap();
        assert_eq!(t.pool, HTTP_POOL);
        assert_eq!(t.method, "POST");
        assert_eq!(t.eta, 100.0);
        assert_eq!(t.timeout, 30.0);
        let t = validate("q", spec("zmq://images"), 1.0).unwrap();
        assert_eq!(t.pool, "images");
    }

    #[test]
    fn rejects_bad_input() {
        let now = 1000.0;
        let bad = |s: TaskSpec| validate("default", s, now).unwrap_err();
        bad(spec(""));
        bad(spec("ftp://x/"));
        bad(spec("not a url"));
        bad(spec("zmq://a/b"));
        bad(TaskSpec {
            countdown: Some(1.0),
            eta: Some(1.0),
            ..spec("http://a/")
        });
        bad(TaskSpec {
            countdown: Some(f64::NAN),
            ..spec("http://a/")
        });
        bad(TaskSpec {
            eta: Some(now + 31.0 * 86400.0),
            ..spec("http://a/")
        });
        bad(TaskSpec {
            name: Some("a b".into()),
            ..spec("http://a/")
        });
        bad(TaskSpec {
            method: Some("TRACE".into()),
            ..spec("http://a/")
        });
        bad(TaskSpec {
            timeout: Some(0.0),
            ..spec("http://a/")
        });
        bad(TaskSpec {
            headers: vec![("a b".into(), "v".into())],
            ..spec("http://a/")
        });
        bad(TaskSpec {
            headers: vec![("a".into(), "v\r\nx".into())],
            ..spec("http://a/")
        });
        assert!(validate("bad_queue", spec("http://a/"), now).is_err());
    }

    #[test]
    fn past_eta_means_now() {
        let t = validate(
            "default",
            TaskSpec {
                eta: Some(5.0),
                ..spec("http://a/")
            },
            1000.0,
        )
        .unwrap();
        assert_eq!(t.eta, 1000.0);
    }
}
