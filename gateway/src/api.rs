//! The REST API: routing, request parsing and the JSON answers. Every
//! request passes through [`handle`], the one place where authentication
//! will sit.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use protocol::{ClientCommand, ErrorCode, ReplyBody, TaskInfo, TaskSpec, DEFAULT_QUEUE};
use serde_json::{json, Map, Value};

use crate::broker_link::{BrokerLink, LinkError};

/// Largest request body accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

type Resp = Response<Full<Bytes>>;

/// Answers one HTTP request.
pub async fn handle(req: Request<Incoming>, link: BrokerLink) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let resp = match (segments.as_slice(), &method) {
        (["queue"], &Method::POST) => enqueue(req, DEFAULT_QUEUE.to_string(), link).await,
        (["queue", queue], &Method::POST) => enqueue(req, queue.to_string(), link).await,
        (["queue", queue, "tasks", id], &Method::GET) => {
            let cmd = ClientCommand::Get {
                queue: queue.to_string(),
                id: id.to_string(),
            };
            match link.request(cmd).await {
                Ok(ReplyBody::Task { task }) => json_response(StatusCode::OK, task_json(&task)),
                other => failure(other),
            }
        }
        (["queue", queue, "tasks", id], &Method::DELETE) => {
            let cmd = ClientCommand::Cancel {
                queue: queue.to_string(),
                id: id.to_string(),
            };
            match link.request(cmd).await {
                Ok(ReplyBody::Cancelled { id }) => {
                    json_response(StatusCode::OK, json!({"status": "cancelled", "id": id}))
                }
                other => failure(other),
            }
        }
        (["health"], &Method::GET) => match link.request(ClientCommand::Ping).await {
            Ok(ReplyBody::Pong { node, version }) => json_response(
                StatusCode::OK,
                json!({"status": "ok", "broker": node, "version": version}),
            ),
            other => failure(other),
        },
        (["queue"], _) | (["queue", _], _) => not_allowed("POST"),
        (["queue", _, "tasks", _], _) => not_allowed("GET, DELETE"),
        (["health"], _) => not_allowed("GET"),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {path}"),
        ),
    };
    Ok(resp)
}

async fn enqueue(req: Request<Incoming>, queue: String, link: BrokerLink) -> Resp {
    if !protocol::is_valid_queue_name(&queue) {
        return error(
            StatusCode::BAD_REQUEST,
            "queue names must match [A-Za-z0-9-]{1,100}",
        );
    }
    let too_big = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds {MAX_REQUEST_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
        return too_big();
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_big(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    };
    let spec = if is_json(&content_type, &body) {
        parse_json(&body)
    } else {
        parse_form(&body)
    };
    let spec = match spec {
        Ok(s) => s,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    match link
        .request(ClientCommand::Enqueue { queue, task: spec })
        .await
    {
        Ok(ReplyBody::Enqueued { id, eta, .. }) => json_response(
            StatusCode::OK,
            json!({"status": "scheduled", "id": id, "eta": eta}),
        ),
        other => failure(other),
    }
}

/// JSON when the content type says so, or when the body looks like a JSON
/// object whatever the header says (the original README's example
/// misspells it `applicatoin/json`).
fn is_json(content_type: &str, body: &[u8]) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence == "application/json"
        || essence.ends_with("+json")
        || body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Form fields: `task.*` are the task's own; every other field is a
/// parameter for the worker.
pub fn parse_form(body: &[u8]) -> Result<TaskSpec, String> {
    let mut spec = TaskSpec::default();
    let mut eta_field = None;
    for (k, v) in form_urlencoded::parse(body) {
        let (k, v) = (k.into_owned(), v.into_owned());
        let Some(field) = k.strip_prefix("task.") else {
            spec.params.push((k, v));
            continue;
        };
        match field {
            "url" => spec.url = v,
            "method" => spec.method = Some(v),
            "countdown" => spec.countdown = Some(number("task.countdown", &v)?),
            "eta" => eta_field = Some(v),
            "name" => spec.name = Some(v),
            "timeout" => spec.timeout = Some(number("task.timeout", &v)?),
            _ => match field.strip_prefix("header.") {
                Some(name) if !name.is_empty() => spec.headers.push((name.to_string(), v)),
                _ => return Err(format!("unknown task field {k:?}")),
            },
        }
    }
    if let Some(eta) = eta_field {
        spec.eta = Some(parse_eta(&eta)?);
    }
    Ok(spec)
}

fn number(field: &str, v: &str) -> Result<f64, String> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .ok_or_else(|| format!("{field} must be a number of seconds, not {v:?}"))
}

/// Unix seconds (fractional allowed) or RFC 3339.
pub fn parse_eta(v: &str) -> Result<f64, String> {
    if let Ok(n) = v.trim().parse::<f64>() {
        if n.is_finite() {
            return Ok(n);
        }
    }
    chrono::DateTime::parse_from_rfc3339(v.trim())
        .map(|t| t.timestamp_micros() as f64 / 1e6)
        .map_err(|_| format!("task.eta must be unix seconds or an RFC 3339 time, not {v:?}"))
}

/// The JSON body: `{"url", "method", "params", "body", "content_type",
/// "headers", "countdown", "eta", "name", "timeout"}`.
pub fn parse_json(body: &[u8]) -> Result<TaskSpec, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("the JSON body must be an object".into());
    };
    let mut spec = TaskSpec::default();
    for (k, v) in obj {
        match k.as_str() {
            "url" => spec.url = string(&k, v)?,
            "method" => spec.method = Some(string(&k, v)?),
            "name" => spec.name = optional(&k, v, string)?,
            "content_type" => spec.content_type = optional(&k, v, string)?,
            "body" => spec.body = optional(&k, v, string)?.map(|s| s.into_bytes().into()),
            "params" => spec.params = pairs(&k, v, true)?,
            "headers" => spec.headers = pairs(&k, v, false)?,
            "countdown" => spec.countdown = optional(&k, v, seconds)?,
            "timeout" => spec.timeout = optional(&k, v, seconds)?,
            "eta" => {
                spec.eta = match v {
                    Value::Null => None,
                    Value::String(s) => Some(parse_eta(&s)?),
                    Value::Number(n) => n.as_f64(),
                    _ => return Err("eta must be unix seconds or an RFC 3339 string".into()),
                }
            }
            _ => return Err(format!("unknown field {k:?}")),
        }
    }
    if spec.body.is_some() && !spec.params.is_empty() {
        return Err("params and body are exclusive".into());
    }
    Ok(spec)
}

fn optional<T>(
    k: &str,
    v: Value,
    f: fn(&str, Value) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if v.is_null() {
        Ok(None)
    } else {
        f(k, v).map(Some)
    }
}

fn string(k: &str, v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(format!("{k} must be a string")),
    }
}

fn seconds(k: &str, v: Value) -> Result<f64, String> {
    match &v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{k} must be a number")),
        Value::String(s) => number(k, s),
        _ => Err(format!("{k} must be a number of seconds")),
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// An object of scalars (or, for params, arrays of scalars: repeated keys).
fn pairs(k: &str, v: Value, allow_lists: bool) -> Result<Vec<(String, String)>, String> {
    let obj: Map<String, Value> = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Object(o) => o,
        _ => return Err(format!("{k} must be an object")),
    };
    let mut out = Vec::new();
    for (name, value) in obj {
        match value {
            Value::Array(items) if allow_lists => {
                for item in items {
                    let s = scalar(&item)
                        .ok_or_else(|| format!("{k}.{name} must hold strings or numbers"))?;
                    out.push((name.clone(), s));
                }
            }
            other => {
                let s = scalar(&other)
                    .ok_or_else(|| format!("{k}.{name} must be a string or a number"))?;
                out.push((name, s));
            }
        }
    }
    Ok(out)
}

fn task_json(t: &TaskInfo) -> Value {
    json!({
        "id": t.id,
        "queue": t.queue,
        "name": t.name,
        "url": t.url,
        "method": t.method,
        "state": t.state.as_str(),
        "eta": t.eta,
        "attempts": t.attempts,
        "executions": t.executions,
        "last_status": t.last_status,
        "last_error": t.last_error,
        "created": t.created,
    })
}

/// Maps a broker error or an unexpected answer to an HTTP error.
fn failure(r: Result<ReplyBody, LinkError>) -> Resp {
    match r {
        Ok(ReplyBody::Error { code, reason }) => {
            let status = match code {
                ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Malformed | ErrorCode::UnsupportedVersion | ErrorCode::Internal => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            error(status, reason)
        }
        Ok(other) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected answer from the broker: {other:?}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn not_allowed(allow: &'static str) -> Resp {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

fn error(status: StatusCode, reason: impl Into<String>) -> Resp {
    json_response(status, json!({"status": "error", "reason": reason.into()}))
}

fn json_response(status: StatusCode, v: Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields() {
        let s =
            parse_form(b"task.url=http://h/w&task.countdown=1.5&foo=bar&task.header.X-A=1&foo=baz")
                .unwrap();
        assert_eq!(s.url, "http://h/w");
        assert_eq!(s.countdown, Some(1.5));
        assert_eq!(
            s.params,
            vec![("foo".into(), "bar".into()), ("foo".into(), "baz".into())]
        );
        assert_eq!(s.headers, vec![("X-A".into(), "1".into())]);
        assert!(parse_form(b"task.url=x&task.countdown=soon").is_err());
        assert!(parse_form(b"task.url=x&task.bogus=1").is_err());
        let s = parse_form(b"task.url=x&task.eta=2030-01-01T00:00:00Z").unwrap();
        assert_eq!(s.eta, Some(1893456000.0));
    }

    #[test]
    fn json_fields_and_sniffing() {
        assert!(is_json("applicatoin/json", b" {\"url\": 1}"));
        assert!(!is_json("application/x-www-form-urlencoded", b"task.url=x"));
        let s = parse_json(br#"{"url": "http://h/", "params": {"foo": "bar", "n": 2, "l": [1, "a"]}, "countdown": 3}"#).unwrap();
        assert_eq!(s.params.len(), 4);
        assert_eq!(s.countdown, Some(3.0));
        assert!(parse_json(br#"{"url": "x", "params": {"a": "b"}, "body": "raw"}"#).is_err());
        assert!(parse_json(br#"{"url": "x", "nope": 1}"#).is_err());
        assert!(parse_json(b"{not json").is_err());
        assert!(parse_json(br#"{"url": "x", "countdown": "abc"}"#).is_err());
    }
}
