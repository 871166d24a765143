//! Turns a producer's [`TaskSpec`] into a task the scheduler can store, or
//! a reason for a `bad_request` error. This is the one place enqueue rules
//! live; the gateway relies on it rather than repeating them.

use std::sync::Arc;

use smallvec::SmallVec;

use protocol::{is_valid_pool_name, is_valid_task_name, TaskSpec, HTTP_POOL};

/// Longest allowed distance of an eta into the future.
pub const MAX_ETA_AHEAD_SECS: f64 = 30.0 * 86400.0;
/// Default and largest per-attempt timeout.
pub const DEFAULT_TIMEOUT_SECS: f64 = 30.0;
pub const MAX_TIMEOUT_SECS: f64 = 3600.0;

/// Methods a task may use.
pub const METHODS: [&str; 5] = ["POST", "GET", "PUT", "PATCH", "DELETE"];

/// A task that passed validation, in the compact form the store keeps:
/// a million pending tasks must stay small (see `BENCHMARKS.md`).
///
/// * The queue and URL are shared `Arc<String>`s (thin pointers), which
///   the store interns, so tasks of one queue or endpoint share them.
/// * The pool is derived from the URL and the method is a byte.
/// * Parameters are kept form-encoded in one allocation (decoded when the
///   task is dispatched or shown); a raw body is kept as it came.
/// * The fields most tasks leave empty share one optional box.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTask {
    pub queue: Arc<String>,
    /// Normalized URL (ASCII, as `url::Url` serializes it).
    pub url: Arc<String>,
    pub method: Method,
    /// Unix seconds; never in the past of `now`.
    pub eta: f64,
    /// Per-attempt timeout in milliseconds (see [`ValidTask::timeout`]).
    timeout_ms: u32,
    /// The parameters, form-encoded, or the raw body when `raw` is set;
    /// up to 16 bytes are kept inline.
    payload: SmallVec<[u8; 16]>,
    raw: bool,
    rare: Option<Box<Rare>>,
}

/// The fields of a task that most tasks leave empty.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rare {
    pub name: Option<String>,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub callback_url: Option<String>,
    pub failure_callback_url: Option<String>,
    pub idempotency_key: Option<String>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        *self == Rare::default()
    }
}

/// A task's HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Get,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// Case-insensitive; `None` for a method tasks may not use.
    pub fn parse(m: &str) -> Option<Method> {
        Some(match m.to_ascii_uppercase().as_str() {
            "POST" => Method::Post,
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }
}

/// Where a task is delivered: [`HTTP_POOL`] for a webhook, else the POOL of
/// its `zmq://POOL` URL.
pub fn pool_of(url: &str) -> &str {
    match url.strip_prefix("zmq://") {
        Some(rest) => rest.split('/').next().unwrap_or(rest),
        None => HTTP_POOL,
    }
}

/// The fields of a task that passed its checks (here, or on the node that
/// enqueued it), before they are packed into a [`ValidTask`].
pub struct TaskParts<'a> {
    pub queue: &'a str,
    pub url: &'a str,
    pub method: Method,
    pub params: &'a [(String, String)],
    pub body: Option<Vec<u8>>,
    /// Unix seconds.
    pub eta: f64,
    /// Seconds a worker has for each attempt.
    pub timeout: f64,
    pub rare: Rare,
}

impl ValidTask {
    /// Packs checked parts (a fresh enqueue's, or a peer's record).
    pub fn from_parts(parts: TaskParts<'_>) -> ValidTask {
        let TaskParts {
            queue,
            url,
            method,
            params,
            body,
            eta,
            timeout,
            rare,
        } = parts;
        let (payload, raw) = match body {
            Some(b) => {
                let mut v = SmallVec::from_vec(b);
                v.shrink_to_fit(); // inline when it fits
                (v, true)
            }
            None => (encode_params(params), false),
        };
        ValidTask {
            queue: Arc::new(queue.to_string()),
            url: Arc::new(url.to_string()),
            method,
            eta,
            // At most an hour, at least a millisecond.
            timeout_ms: (timeout * 1000.0).round().clamp(1.0, u32::MAX as f64) as u32,
            payload,
            raw,
            rare: (!rare.is_empty()).then(|| Box::new(rare)),
        }
    }

    /// Seconds a worker has for each attempt (kept to the millisecond).
    pub fn timeout(&self) -> f64 {
        f64::from(self.timeout_ms) / 1000.0
    }

    /// The dispatch pool: [`HTTP_POOL`] or the POOL of `zmq://POOL`.
    pub fn pool(&self) -> &str {
        pool_of(&self.url)
    }

    /// The parameters, in order (empty with a raw body).
    pub fn params(&self) -> Vec<(String, String)> {
        if self.raw {
            return Vec::new();
        }
        url::form_urlencoded::parse(&self.payload)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// The raw body, if the task has one.
    pub fn body(&self) -> Option<&[u8]> {
        self.raw.then_some(&self.payload[..])
    }

    /// Bytes the task holds on the heap of its own (the shared queue name
    /// and URL are not counted): its payload past the inline bytes and
    /// its rare fields.
    pub fn heap_bytes(&self) -> usize {
        let payload = if self.payload.spilled() {
            self.payload.capacity()
        } else {
            0
        };
        let rare = self.rare.as_deref().map_or(0, |r| {
            let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
            std::mem::size_of::<Rare>()
                + text(&r.name)
                + text(&r.content_type)
                + text(&r.callback_url)
                + text(&r.failure_callback_url)
                + text(&r.idempotency_key)
                + r.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 48)
                    .sum::<usize>()
        });
        payload + rare
    }

    /// The rarely used fields (all empty for most tasks).
    pub fn rare(&self) -> &Rare {
        static EMPTY: Rare = Rare {
            name: None,
            content_type: None,
            headers: Vec::new(),
            callback_url: None,
            failure_callback_url: None,
            idempotency_key: None,
        };
        self.rare.as_deref().unwrap_or(&EMPTY)
    }

    pub fn name(&self) -> Option<&str> {
        self.rare().name.as_deref()
    }

    pub fn idempotency_key(&self) -> Option<&str> {
        self.rare().idempotency_key.as_deref()
    }
}

/// Parameters in one allocation, `application/x-www-form-urlencoded`
/// (decoding gives back exactly the same pairs).
fn encode_params(params: &[(String, String)]) -> SmallVec<[u8; 16]> {
    if params.is_empty() {
        return SmallVec::new();
    }
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    let mut v = SmallVec::from_vec(s.finish().into_bytes());
    v.shrink_to_fit(); // inline when it fits
    v
}

/// Checks `spec` for `queue` at time `now` (unix seconds), with the default
/// per-attempt timeout [`DEFAULT_TIMEOUT_SECS`].
pub fn validate(queue: &str, spec: TaskSpec, now: f64) -> Result<ValidTask, String> {
    validate_with(queue, spec, now, DEFAULT_TIMEOUT_SECS)
}

/// A peer's copy passes the checks an enqueue passes (issue 16): its
/// queue name, URL (normalised, through the target guard, no user
/// information), method, payload, name, timeout and callback URLs. A
/// member is admitted to the cluster, but what it sends is not trusted
/// blindly. `now` is unix seconds; the copy's eta may lie in the past.
pub fn check_record(r: &protocol::ReplicaRecord, now: f64) -> Result<(), String> {
    let spec = TaskSpec {
        url: r.url.clone(),
        method: Some(r.method.clone()),
        params: r.params.clone(),
        body: r.body.clone(),
        content_type: r.content_type.clone(),
        headers: r.headers.clone(),
        countdown: None,
        eta: Some(r.eta.min(now)),
        name: r.name.clone(),
        timeout: Some(r.timeout),
        callback_url: r.callback_url.clone(),
        failure_callback_url: r.failure_callback_url.clone(),
        idempotency_key: r.idempotency_key.clone(),
    };
    let v = validate(&r.queue, spec, now)?;
    if *v.url != r.url {
        return Err("task.url is not in its normal form".into());
    }
    if v.pool() != r.pool {
        return Err("the copy's pool does not match its URL".into());
    }
    Ok(())
}

/// A callback URL must be a plain http(s) URL with a host.
fn callback(field: &str, url: Option<String>) -> Result<Option<String>, String> {
    let Some(url) = url else { return Ok(None) };
    let parsed = url::Url::parse(&url).map_err(|e| format!("{field} is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{field} must be an http or https URL with a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "{field} must not carry user information (user:password@)"
        ));
    }
    if let Some(host) = parsed.host_str() {
        target_guard()
            .check_host(host)
            .map_err(|e| format!("{field}: {e}"))?;
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
    validate_known(queue, spec, now, default_timeout, |_| false)
}

/// Like [`validate_with`]; `known(url)` says that `url` is exactly the
/// normalized form of a URL accepted before, which then needs no parsing
/// (normalizing a normalized URL gives it back). The store passes its
/// shared URLs.
pub fn validate_known(
    queue: &str,
    spec: TaskSpec,
    now: f64,
    default_timeout: f64,
    known: impl Fn(&String) -> bool,
) -> Result<ValidTask, String> {
    protocol::limits::check_queue_name(queue)?;
    if spec.url.is_empty() {
        return Err("task.url is required".into());
    }
    let url = if known(&spec.url) {
        spec.url.clone()
    } else {
        normalize_url(&spec.url)?
    };
    let method = method_of(spec.method.as_deref())?;
    check_payload(&spec)?;
    let eta = eta_of(spec.countdown, spec.eta, now)?;
    if let Some(name) = &spec.name {
        if !is_valid_task_name(name) {
            return Err(protocol::limits::TASK_NAME_RULE.into());
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
    check_headers(&spec)?;
    let callback_url = callback("callback_url", spec.callback_url)?;
    let failure_callback_url = callback("failure_callback_url", spec.failure_callback_url)?;
    if let Some(k) = &spec.idempotency_key {
        if !(1..=500).contains(&k.len()) || !k.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err("the idempotency key must be 1 to 500 visible ASCII characters".into());
        }
    }
    Ok(ValidTask::from_parts(TaskParts {
        queue,
        url: &url,
        method,
        params: &spec.params,
        body: spec.body.map(|b| b.into_vec()),
        eta,
        timeout,
        rare: Rare {
            name: spec.name,
            content_type: spec.content_type,
            headers: spec.headers,
            callback_url,
            failure_callback_url,
            idempotency_key: spec.idempotency_key,
        },
    }))
}

/// `task.method`: POST when absent.
fn method_of(method: Option<&str>) -> Result<Method, String> {
    match method {
        None | Some("") => Ok(Method::Post),
        Some(m) => Method::parse(m).ok_or_else(|| {
            format!(
                "task.method must be one of {}, not {m:?}",
                METHODS.join(", ")
            )
        }),
    }
}

/// Params or a raw body, not both, within [`protocol::MAX_TASK_BODY_BYTES`].
fn check_payload(spec: &TaskSpec) -> Result<(), String> {
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
    Ok(())
}

/// The task's eta (unix seconds) from a countdown or an eta (not both): a
/// past eta means now, and at most [`MAX_ETA_AHEAD_SECS`] ahead.
fn eta_of(countdown: Option<f64>, eta: Option<f64>, now: f64) -> Result<f64, String> {
    match (countdown, eta) {
        (Some(_), Some(_)) => Err("task.countdown and task.eta are exclusive".into()),
        (Some(c), None) => {
            if !c.is_finite() || c < 0.0 {
                return Err("task.countdown must be a number of seconds, 0 or more".into());
            }
            if c > MAX_ETA_AHEAD_SECS {
                return Err("task.countdown is more than 30 days ahead".into());
            }
            Ok(now + c)
        }
        (None, Some(e)) => {
            if !e.is_finite() {
                return Err("task.eta must be a unix time in seconds".into());
            }
            if e > now + MAX_ETA_AHEAD_SECS {
                return Err("task.eta is more than 30 days ahead".into());
            }
            Ok(e.max(now))
        }
        (None, None) => Ok(now),
    }
}

/// Header names are HTTP tokens, values RFC 9110 field values, and no
/// header changes the request's framing or routing (see
/// `protocol::limits::check_task_header`); the content type holds no
/// control characters. So every header accepted here is sent.
fn check_headers(spec: &TaskSpec) -> Result<(), String> {
    for (k, v) in &spec.headers {
        if let Some(reason) = protocol::limits::check_task_header(k, v) {
            return Err(reason);
        }
    }
    if let Some(ct) = &spec.content_type {
        if !protocol::limits::is_header_value(ct) {
            return Err("content_type is not an HTTP field value (control characters, or spaces at its ends)".into());
        }
    }
    Ok(())
}

/// Parses and checks a task URL; returns its normalized form.
/// The target guard enqueues are checked against (`--allow-targets`,
/// `--deny-targets`): set once at start ([`set_target_guard`]), the
/// defaults otherwise. A process-wide setting, like the flags it comes
/// from; the store's validation reads it without threading it through
/// every call.
static TARGET_GUARD: std::sync::OnceLock<protocol::targets::TargetGuard> =
    std::sync::OnceLock::new();

/// Sets the target guard, once, before the node starts.
pub fn set_target_guard(guard: protocol::targets::TargetGuard) {
    let _ = TARGET_GUARD.set(guard);
}

fn target_guard() -> &'static protocol::targets::TargetGuard {
    static DEFAULT: std::sync::OnceLock<protocol::targets::TargetGuard> =
        std::sync::OnceLock::new();
    TARGET_GUARD
        .get()
        .unwrap_or_else(|| DEFAULT.get_or_init(protocol::targets::TargetGuard::default))
}

pub fn normalize_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("task.url is not a valid URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {
            let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
                return Err("task.url must name a host".into());
            };
            if !url.username().is_empty() || url.password().is_some() {
                return Err("task.url must not carry user information (user:password@): it would not be sent, and anyone reading the task would see it; send credentials in a header".into());
            }
            target_guard().check_host(host)?;
        }
        "zmq" => {
            let pool = url.host_str().unwrap_or("");
            // Nothing but the pool: no user, port, path, query or fragment.
            let bare = matches!(url.as_str().strip_prefix("zmq://"), Some(r) if r == pool || r.strip_suffix('/') == Some(pool));
            if !is_valid_pool_name(pool) || !bare {
                return Err(
                    "zmq URLs must be zmq://POOL with POOL matching [A-Za-z0-9_.-]{1,100}".into(),
                );
            }
        }
        other => {
            return Err(format!(
                "task.url scheme must be http, https or zmq, not {other:?}"
            ))
        }
    }
    Ok(url.into())
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
        assert_eq!(t.pool(), HTTP_POOL);
        assert_eq!(t.method, Method::Post);
        assert_eq!(t.eta, 100.0);
        assert_eq!(t.timeout(), 30.0);
        let t = validate("q", spec("zmq://images"), 1.0).unwrap();
        assert_eq!(t.pool(), "images");
        let t = validate("q", spec("zmq://images/"), 1.0).unwrap();
        assert_eq!(t.pool(), "images");
    }

    #[test]
    fn rejects_bad_input() {
        let now = 1000.0;
        let bad = |s: TaskSpec| validate("default", s, now).unwrap_err();
        bad(spec(""));
        bad(spec("ftp://x/"));
        bad(spec("not a url"));
        bad(spec("zmq://a/b"));
        bad(spec("zmq://a#f"));
        bad(spec("zmq://u@a"));
        bad(spec("zmq://a:5"));
        bad(spec("zmq://a?x=1"));
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

    #[test]
    fn params_come_back_exactly() {
        let tricky = vec![
            ("a".to_string(), "1".to_string()),
            ("".to_string(), "".to_string()),
            ("sp ace".to_string(), "plus+and&amp=eq%25".to_string()),
            ("a".to_string(), "repeated key, ünïcode ✓".to_string()),
            ("\n\t".to_string(), " leading and trailing ".to_string()),
        ];
        let t = validate(
            "q",
            TaskSpec {
                params: tricky.clone(),
                ..spec("http://a/")
            },
            1.0,
        )
        .unwrap();
        assert_eq!(t.params(), tricky);
        assert_eq!(t.body(), None);
        let t = validate(
            "q",
            TaskSpec {
                body: Some(serde_bytes::ByteBuf::from(b"a=1&b".to_vec())),
                ..spec("http://a/")
            },
            1.0,
        )
        .unwrap();
        assert_eq!(t.body(), Some(&b"a=1&b"[..]));
        assert!(t.params().is_empty());
        let t = validate("q", spec("http://a/"), 1.0).unwrap();
        assert!(t.params().is_empty());
        assert_eq!(t.body(), None);
    }
}
