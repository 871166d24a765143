//! The REST API: routing, request parsing and the JSON answers. Every
//! request passes through [`Api::handle`], which checks first who may
//! make it ([`crate::auth`]).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use hyper::{Method, Request, Response, StatusCode};
use std::time::Duration;

use protocol::{
    ClientCommand, ErrorCode, Outcome, QueueConfigPatch, ReplyBody, TaskInfo, TaskSpec, TaskState,
    DEFAULT_QUEUE,
};
use serde_json::{json, Map, Value};

use crate::broker_link::{BrokerLink, LinkError};
use protocol::limits::{MAX_BATCH_TASKS as MAX_BATCH, MAX_LIST_LIMIT};

/// Largest request body accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How much of a body over [`MAX_REQUEST_BYTES`] is read (and thrown
/// away) so that a client that writes its whole body before reading
/// still gets its `413`; past it the connection is closed.
pub const MAX_DRAINED_BYTES: usize = 8 * 1024 * 1024;

type Resp = Response<Full<Bytes>>;

/// The API's state: the link to the brokers, the HTTP bounds and who may
/// call it.
#[derive(Clone)]
pub struct Api {
    link: BrokerLink,
    body_timeout: Duration,
    access: std::sync::Arc<crate::auth::Access>,
    metrics: std::sync::Arc<crate::metrics::GatewayMetrics>,
}

impl Api {
    pub fn new(
        link: BrokerLink,
        limits: crate::HttpLimits,
        metrics: std::sync::Arc<crate::metrics::GatewayMetrics>,
    ) -> Api {
        Api {
            link,
            body_timeout: limits.body_timeout,
            access: std::sync::Arc::new(limits.access),
            metrics,
        }
    }

    /// Answers one HTTP request from `peer`: refused as [`crate::auth`]
    /// says, or routed.
    pub async fn handle(
        self,
        req: Request<Incoming>,
        peer: std::net::IpAddr,
    ) -> Result<Resp, Infallible> {
        let need = need_of(req.method(), req.uri().path());
        if let Err(r) = self.access.check(peer, req.headers(), &need) {
            let mut resp = error(r.status, r.reason);
            if r.challenge {
                resp.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
            }
            return Ok(resp);
        }
        // Each request in a debug span: its method, path (and so its
        // queue and task), and at the end its status.
        let (queue, task) = {
            let mut seg = req.uri().path().split('/').skip(1);
            match (seg.next(), seg.next(), seg.next(), seg.next()) {
                (Some("queue"), q, Some("tasks"), id) => {
                    (q.unwrap_or_default(), id.unwrap_or_default())
                }
                (Some("queue"), q, _, _) => (q.unwrap_or(DEFAULT_QUEUE), ""),
                _ => ("", ""),
            }
        };
        let span = tracing::debug_span!(
            "http",
            method = %req.method(),
            path = %req.uri().path(),
            queue = queue,
            task = task
        );
        let resp = tracing::Instrument::instrument(
            handle(req, self.link, self.body_timeout, &self.metrics),
            span.clone(),
        )
        .await;
        if let Ok(r) = &resp {
            span.in_scope(|| tracing::debug!(status = r.status().as_u16(), "answered"));
        }
        resp
    }
}

/// What a request needs ([`crate::auth::Need`]), by its route.
fn need_of(method: &Method, path: &str) -> crate::auth::Need {
    use crate::auth::Need;
    let path = path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let read = matches!(*method, Method::GET | Method::HEAD);
    match segments.as_slice() {
        ["health"] if read => Need::Open,
        // The dashboard's files hold no data: its calls to the API carry
        // the token.
        ["ui", ..] | ["openapi.json"] if read => Need::Open,
        ["queue"] if *method == Method::POST => Need::Enqueue(DEFAULT_QUEUE.to_string()),
        ["queue", q] | ["queue", q, "batch"] if *method == Method::POST => {
            Need::Enqueue((*q).to_string())
        }
        ["queue", _]
        | ["queues"]
        | ["cluster"]
        | ["metrics"]
        | ["queue", _, "tasks"]
        | ["queue", _, "tasks", _]
            if read =>
        {
            Need::Read
        }
        ["queue", ..] => Need::Admin,
        // Unknown endpoints and methods: whoever may read learns they are
        // unknown.
        _ => Need::Read,
    }
}

/// Answers one HTTP request. `HEAD` is answered as `GET` (hyper sends
/// the headers only).
async fn handle(
    req: Request<Incoming>,
    link: BrokerLink,
    body_timeout: Duration,
    metrics: &crate::metrics::GatewayMetrics,
) -> Result<Resp, Infallible> {
    client::logging::test_fault_point("http");
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    let path = req.uri().path().trim_end_matches('/').to_string();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let q = |name: &str| -> String { name.to_string() };
    let resp = match (segments.as_slice(), &method) {
        (["queue"], &Method::POST) => {
            enqueue(req, DEFAULT_QUEUE.into(), &query, link, body_timeout).await
        }
        (["queue", queue], &Method::POST) => {
            enqueue(req, q(queue), &query, link, body_timeout).await
        }
        (["queue", queue], &Method::PUT) => configure(req, q(queue), link, body_timeout).await,
        (["queue", queue], &Method::GET) => {
            if link.brokers() > 1 {
                view(crate::views::queue(&link, q(queue)).await)
            } else {
                let cmd = ClientCommand::GetQueue {
                    queue: q(queue),
                    owned: false,
                };
                reply(&link, cmd).await
            }
        }
        (["queues"], &Method::GET) => list_queues(&query, link).await,
        (["queue", queue, "pause"], &Method::POST) => {
            reply(&link, ClientCommand::PauseQueue { queue: q(queue) }).await
        }
        (["queue", queue, "resume"], &Method::POST) => {
            reply(&link, ClientCommand::ResumeQueue { queue: q(queue) }).await
        }
        (["queue", queue, "purge"], &Method::POST) => {
            reply(&link, ClientCommand::PurgeQueue { queue: q(queue) }).await
        }
        (["queue", queue, "batch"], &Method::POST) => {
            batch(req, q(queue), link, body_timeout).await
        }
        (["queue", queue, "tasks"], &Method::GET) => list_tasks(q(queue), &query, link).await,
        (["queue", queue, "tasks", id], &Method::GET) => {
            let cmd = ClientCommand::Get {
                queue: q(queue),
                id: q(id),
            };
            reply(&link, cmd).await
        }
        (["queue", queue, "tasks", id], &Method::DELETE) => {
            let cmd = ClientCommand::Cancel {
                queue: q(queue),
                id: q(id),
            };
            reply(&link, cmd).await
        }
        (["queue", queue, "tasks", id, "run"], &Method::POST) => {
            let cmd = ClientCommand::Run {
                queue: q(queue),
                id: q(id),
            };
            reply(&link, cmd).await
        }
        (["health"], &Method::GET) => reply(&link, ClientCommand::Ping).await,
        (["cluster"], &Method::GET) => reply(&link, ClientCommand::ClusterInfo).await,
        (["metrics"], &Method::GET) => metrics_page(&link, metrics).await,
        (["openapi.json"], &Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        (["ui", ..], &Method::GET) => match crate::ui::asset(&path) {
            Some(asset) => crate::ui::serve(asset),
            None => error(StatusCode::NOT_FOUND, format!("no such file: {path}")),
        },
        (["queue"], _) => not_allowed("POST"),
        (["queue", _], _) => not_allowed("GET, HEAD, POST, PUT"),
        (
            ["queues"] | ["health"] | ["cluster"] | ["metrics"] | ["openapi.json"] | ["ui", ..],
            _,
        )
        | (["queue", _, "tasks"], _) => not_allowed("GET, HEAD"),
        (["queue", _, "pause" | "resume" | "purge" | "batch"], _) => not_allowed("POST"),
        (["queue", _, "tasks", _], _) => not_allowed("GET, HEAD, DELETE"),
        (["queue", _, "tasks", _, "run"], _) => not_allowed("POST"),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {path}"),
        ),
    };
    Ok(resp)
}

/// Sends `cmd` and renders the broker's answer.
async fn reply(link: &BrokerLink, cmd: ClientCommand) -> Resp {
    render(link.request(cmd).await)
}

/// Renders a broker answer (or link failure) as an HTTP response.
fn render(r: Result<ReplyBody, LinkError>) -> Resp {
    match r {
        // The answer to nearly every enqueue is written without a `Value`.
        Ok(body) => match Scheduled::of(body) {
            Ok(scheduled) => json_ok(serde_json::to_vec(&scheduled).unwrap_or_default()),
            Err(body) => {
                let (status, v) = reply_json(*body);
                json_response(status, v)
            }
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The answer to a task scheduled without waiting: the keys and order of
/// `reply_json`'s, written without building a `Value`.
#[derive(serde::Serialize)]
struct Scheduled {
    eta: f64,
    id: String,
    replicas: u32,
    status: &'static str,
}

/// One item of a batch's answer.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum BatchItem {
    Scheduled(Scheduled),
    Other(Value),
}

impl Scheduled {
    /// The body as a `Scheduled` answer, or back (boxed: the rarer case)
    /// if it is another one.
    fn of(body: ReplyBody) -> Result<Scheduled, Box<ReplyBody>> {
        match body {
            ReplyBody::Enqueued {
                id,
                eta,
                result: None,
                replicas,
                ..
            } => Ok(Scheduled {
                eta,
                id,
                replicas,
                status: "scheduled",
            }),
            other => Err(Box::new(other)),
        }
    }
}

impl BatchItem {
    fn of(body: ReplyBody) -> BatchItem {
        match Scheduled::of(body) {
            Ok(scheduled) => BatchItem::Scheduled(scheduled),
            Err(other) => BatchItem::Other(reply_json(*other).1),
        }
    }
}

/// The status and JSON of one reply body.
fn reply_json(body: ReplyBody) -> (StatusCode, Value) {
    match body {
        ReplyBody::Enqueued {
            id,
            eta,
            result: None,
            replicas,
            ..
        } => (
            StatusCode::OK,
            json!({"status": "scheduled", "id": id, "eta": eta, "replicas": replicas}),
        ),
        ReplyBody::Enqueued {
            id,
            eta,
            result: Some(r),
            ..
        } => (
            StatusCode::OK,
            json!({
                "status": match r.outcome { Outcome::Success => "succeeded", Outcome::Failure => "failed" },
                "id": id,
                "eta": eta,
                "response": {
                    "status": r.status,
                    "body": r.body.map(|b| String::from_utf8_lossy(&b).into_owned()),
                    "error": r.error,
                },
            }),
        ),
        ReplyBody::Duplicate { id, tombstoned } => (
            StatusCode::CONFLICT,
            json!({
                "status": if tombstoned { "tombstoned" } else { "duplicate" },
                "id": id,
            }),
        ),
        ReplyBody::Batch { results } => (
            StatusCode::OK,
            Value::Array(results.into_iter().map(|r| reply_json(r).1).collect()),
        ),
        ReplyBody::Task { task } => (StatusCode::OK, task_json(&task)),
        ReplyBody::Tasks { tasks, next_cursor } => (
            StatusCode::OK,
            json!({"tasks": tasks.iter().map(task_json).collect::<Vec<_>>(), "next_cursor": next_cursor}),
        ),
        ReplyBody::Cancelled { id } => (StatusCode::OK, json!({"status": "cancelled", "id": id})),
        ReplyBody::Stats { stats } => (
            StatusCode::OK,
            serde_json::to_value(stats).unwrap_or(Value::Null),
        ),
        ReplyBody::Queue { queue } => (
            StatusCode::OK,
            serde_json::to_value(queue).unwrap_or(Value::Null),
        ),
        ReplyBody::Queues {
            queues,
            next_cursor,
        } => (
            StatusCode::OK,
            json!({
                "queues": serde_json::to_value(queues).unwrap_or(Value::Null),
                "next_cursor": next_cursor,
            }),
        ),
        ReplyBody::Purged { queue, removed } => (
            StatusCode::OK,
            json!({"status": "purged", "queue": queue, "removed": removed}),
        ),
        ReplyBody::Cluster { cluster } => (
            StatusCode::OK,
            serde_json::to_value(cluster).unwrap_or(Value::Null),
        ),
        ReplyBody::Pong { node, version } => (
            StatusCode::OK,
            json!({"status": "ok", "broker": node, "version": version}),
        ),
        ReplyBody::Error { code, reason } => {
            let status = match code {
                ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                ErrorCode::Conflict => StatusCode::CONFLICT,
                ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Busy => StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::Malformed | ErrorCode::UnsupportedVersion | ErrorCode::Internal => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            (status, json!({"status": "error", "reason": reason}))
        }
    }
}

/// Reads a request body of at most [`MAX_REQUEST_BYTES`] within
/// `deadline`. A longer body gets `413` once it has been read (up to
/// [`MAX_DRAINED_BYTES`], so that a client writing all of it first still
/// reads the answer), or at once when the client waits for
/// `100-continue`; a body slower than `deadline` gets `408`.
async fn read_body(req: Request<Incoming>, deadline: Duration) -> Result<(String, Bytes), Resp> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let waits_for_continue = req
        .headers()
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let over = declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64);
    if over && (waits_for_continue || declared > Some(MAX_DRAINED_BYTES as u64)) {
        return Err(too_big(false));
    }
    match tokio::time::timeout(deadline, collect(req.into_body())).await {
        Ok(Ok(b)) => Ok((content_type, b)),
        Ok(Err(BodyError::TooBig { drained })) => Err(too_big(drained)),
        Ok(Err(BodyError::Broken(e))) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs_f64()
                ),
            );
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
    }
}

enum BodyError {
    /// Over [`MAX_REQUEST_BYTES`]; `drained` when all of it was read.
    TooBig {
        drained: bool,
    },
    Broken(hyper::Error),
}

/// The body, or how it failed; past [`MAX_REQUEST_BYTES`] the rest is
/// read and dropped, up to [`MAX_DRAINED_BYTES`].
async fn collect(mut body: Incoming) -> Result<Bytes, BodyError> {
    let mut out = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Broken)?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > MAX_DRAINED_BYTES {
            return Err(BodyError::TooBig { drained: false });
        }
        if seen <= MAX_REQUEST_BYTES {
            out.extend_from_slice(data);
        } else {
            out = bytes::BytesMut::new();
        }
    }
    if seen > MAX_REQUEST_BYTES {
        return Err(BodyError::TooBig { drained: true });
    }
    Ok(out.freeze())
}

/// `413`; the connection closes unless the whole body was read.
fn too_big(drained: bool) -> Resp {
    let mut r = error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body exceeds {MAX_REQUEST_BYTES} bytes"),
    );
    if !drained {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

async fn enqueue(
    req: Request<Incoming>,
    queue: String,
    query: &[(String, String)],
    link: BrokerLink,
    body_timeout: Duration,
) -> Resp {
    if let Err(rule) = protocol::limits::check_queue_name(&queue) {
        return error(StatusCode::BAD_REQUEST, rule);
    }
    let wait = match query.iter().find(|(k, _)| k == "wait") {
        None => None,
        Some((_, v)) => match v.trim().parse::<f64>().map(protocol::limits::check_wait) {
            Ok(Ok(w)) => Some(w),
            _ => return error(StatusCode::BAD_REQUEST, protocol::limits::WAIT_RULE),
        },
    };
    let idempotency_key = match req.headers().get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => Some(k.to_string()),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key must be visible ASCII",
            )
        }
    };
    let (content_type, body) = match read_body(req, body_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let spec = if is_json(&content_type, &body) {
        parse_json(&body)
    } else {
        parse_form(&body)
    };
    let mut spec = match spec {
        Ok(s) => s,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    if idempotency_key.is_some() {
        spec.idempotency_key = idempotency_key;
    }
    let extra = Duration::from_secs_f64(wait.unwrap_or(0.0));
    let answer = link
        .request_with(
            ClientCommand::Enqueue {
                queue,
                task: spec,
                wait,
            },
            extra,
        )
        .await;
    if let Ok(ReplyBody::Enqueued { id, .. }) = &answer {
        tracing::debug!(task = %id, "enqueued");
    }
    // A wait that ran out answers 202: accepted, not finished yet.
    if let (Some(_), Ok(ReplyBody::Enqueued { result: None, .. })) = (wait, &answer) {
        let mut r = render(answer);
        *r.status_mut() = StatusCode::ACCEPTED;
        return r;
    }
    render(answer)
}

/// A batch body: a JSON array of at most [`MAX_BATCH`] tasks, each
/// parsed or refused on its own.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Result<TaskSpec, String>>, String> {
    let items = match strict_json(body)? {
        Value::Array(items) => items,
        _ => return Err("a batch is a JSON array of tasks".into()),
    };
    if items.len() > MAX_BATCH {
        return Err(format!("a batch holds at most {MAX_BATCH} tasks"));
    }
    // Each item is checked on its own, but one that is not even an object
    // makes the body something other than a batch.
    if let Some(i) = items.iter().position(|v| !v.is_object()) {
        return Err(format!(
            "a batch is a JSON array of task objects; item {i} is not an object"
        ));
    }
    Ok(items.into_iter().map(parse_json_value).collect())
}

async fn batch(
    req: Request<Incoming>,
    queue: String,
    link: BrokerLink,
    body_timeout: Duration,
) -> Resp {
    let (_, body) = match read_body(req, body_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let items = match parse_batch(&body) {
        Ok(items) => items,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    // Items that do not parse are answered here, in place; the others go
    // to the broker in one request.
    let mut parsed = Vec::with_capacity(items.len());
    let mut tasks = Vec::new();
    for item in items {
        match item {
            Ok(spec) => {
                parsed.push(None);
                tasks.push(spec);
            }
            Err(reason) => parsed.push(Some(BatchItem::Other(
                json!({"status": "error", "reason": reason}),
            ))),
        }
    }
    let results = match link
        .request(ClientCommand::EnqueueBatch { queue, tasks })
        .await
    {
        Ok(ReplyBody::Batch { results }) => results,
        other => return render(other),
    };
    let mut from_broker = results.into_iter().map(BatchItem::of);
    let out: Vec<BatchItem> = parsed
        .into_iter()
        .map(|p| p.unwrap_or_else(|| from_broker.next().unwrap_or(BatchItem::Other(Value::Null))))
        .collect();
    json_ok(serde_json::to_vec(&out).unwrap_or_default())
}

async fn configure(
    req: Request<Incoming>,
    queue: String,
    link: BrokerLink,
    body_timeout: Duration,
) -> Resp {
    let (_, body) = match read_body(req, body_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let config = match parse_queue_patch(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid queue configuration: {e}"),
            )
        }
    };
    reply(&link, ClientCommand::ConfigureQueue { queue, config }).await
}

/// A `PUT /queue/{q}` body: a JSON object (serde would take an array as
/// the fields in order), no key twice.
pub fn parse_queue_patch(body: &[u8]) -> Result<QueueConfigPatch, String> {
    match strict_json(body)? {
        v @ Value::Object(_) => serde_json::from_value(v).map_err(|e| e.to_string()),
        _ => Err("the body must be a JSON object".into()),
    }
}

/// `?limit=N`: 1 to [`MAX_LIST_LIMIT`], or the default when absent.
fn list_limit(query: &[(String, String)]) -> Result<Option<u32>, String> {
    match query.iter().find(|(n, _)| n == "limit") {
        None => Ok(None),
        Some((_, l)) => match l.parse::<u32>() {
            Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => Ok(Some(n)),
            _ => Err(format!("limit must be 1 to {MAX_LIST_LIMIT}")),
        },
    }
}

/// `GET /queues?limit=N&cursor=C`: a page of queues by name.
async fn list_queues(query: &[(String, String)], link: BrokerLink) -> Resp {
    let limit = match list_limit(query) {
        Ok(l) => l,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let cursor = query
        .iter()
        .find(|(n, _)| n == "cursor")
        .map(|(_, v)| v.clone())
        .filter(|c| !c.is_empty());
    // The cursor is the last queue name of a page.
    if cursor
        .as_deref()
        .is_some_and(|c| protocol::limits::check_queue_name(c).is_err())
    {
        return error(StatusCode::BAD_REQUEST, "invalid cursor");
    }
    if link.brokers() > 1 {
        return view(crate::views::queues(&link, limit, cursor).await);
    }
    let cmd = ClientCommand::ListQueues {
        limit,
        cursor,
        owned: false,
    };
    reply(&link, cmd).await
}

/// A cluster-wide view as an HTTP answer: the shapes of the single-node
/// answers, with `unreachable` naming the brokers that did not answer.
fn view(v: crate::views::View) -> Resp {
    use crate::views::View;
    match v {
        View::Queue(queue) => json_response(
            StatusCode::OK,
            serde_json::to_value(queue).unwrap_or(Value::Null),
        ),
        View::Queues {
            queues,
            next_cursor,
            unreachable,
        } => {
            let mut v = json!({
                "queues": serde_json::to_value(queues).unwrap_or(Value::Null),
                "next_cursor": next_cursor,
            });
            if !unreachable.is_empty() {
                v["unreachable"] = json!(unreachable);
            }
            json_response(StatusCode::OK, v)
        }
        View::Tasks {
            tasks,
            next_cursor,
            unreachable,
        } => {
            let mut v = json!({
                "tasks": tasks.iter().map(task_json).collect::<Vec<_>>(),
                "next_cursor": next_cursor,
            });
            if !unreachable.is_empty() {
                v["unreachable"] = json!(unreachable);
            }
            json_response(StatusCode::OK, v)
        }
        View::Refused(body) => render(Ok(*body)),
        View::Unavailable(e) => render(Err(e)),
    }
}

async fn list_tasks(queue: String, query: &[(String, String)], link: BrokerLink) -> Resp {
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let state = match get("state") {
        None | Some("") => None,
        Some(s) => match serde_json::from_value::<TaskState>(Value::String(s.to_string())) {
            Ok(st) => Some(st),
            Err(_) => return error(StatusCode::BAD_REQUEST, format!("unknown state {s:?}")),
        },
    };
    let limit = match list_limit(query) {
        Ok(l) => l,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let full = match get("view") {
        None | Some("basic") => false,
        Some("full") => true,
        Some(v) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("view must be basic or full, not {v:?}"),
            )
        }
    };
    if link.brokers() > 1 {
        return view(crate::views::tasks(&link, queue, state, limit, get("cursor"), full).await);
    }
    let cmd = ClientCommand::ListTasks {
        queue,
        state,
        limit,
        cursor: get("cursor").map(str::to_string),
        full,
        owned: false,
    };
    reply(&link, cmd).await
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
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in form_urlencoded::parse(body) {
        let (k, v) = (k.into_owned(), v.into_owned());
        let Some(field) = k.strip_prefix("task.") else {
            spec.params.push((k, v));
            continue;
        };
        // Parameters may repeat (they are lists); the task's fields not.
        if seen.iter().any(|f| *f == field) {
            return Err(format!("the field {k:?} is given twice"));
        }
        seen.push(field.to_string());
        match field {
            "url" => spec.url = v,
            "method" => spec.method = Some(v),
            "countdown" => spec.countdown = Some(number("task.countdown", &v)?),
            "eta" => eta_field = Some(v),
            "name" => spec.name = Some(v),
            "timeout" => spec.timeout = Some(number("task.timeout", &v)?),
            "callback_url" => spec.callback_url = Some(v),
            "failure_callback_url" => spec.failure_callback_url = Some(v),
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
    parse_json_value(strict_json(body)?)
}

/// A JSON document in which no object names a key twice (serde_json
/// would keep the last one silently).
pub fn strict_json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice::<Strict>(body)
        .map(|s| s.0)
        .map_err(|e| format!("the body is not valid JSON: {e}"))
}

/// A `Value` whose objects are checked for repeated keys as they are
/// read.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        serde::Deserialize::deserialize(d).map(|s: Strict| s.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the key {key:?} is given twice"
                )));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// One task as a JSON value (an enqueue body, or an item of a batch).
pub fn parse_json_value(value: Value) -> Result<TaskSpec, String> {
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
            "callback_url" => spec.callback_url = optional(&k, v, string)?,
            "failure_callback_url" => spec.failure_callback_url = optional(&k, v, string)?,
            "idempotency_key" => spec.idempotency_key = optional(&k, v, string)?,
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

/// A JSON number (a string holding one is refused: JSON numbers are
/// numbers).
fn seconds(k: &str, v: Value) -> Result<f64, String> {
    match &v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{k} must be a number")),
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
    let mut v = json!({
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
        "first_attempt": t.first_attempt,
    });
    if let (false, Value::Object(map)) = (t.holders.is_empty(), &mut v) {
        // The member ids holding a copy (in a cluster).
        map.insert("holders".into(), json!(t.holders));
    }
    if let (Some(d), Value::Object(map)) = (&t.detail, &mut v) {
        let text = |b: &Option<serde_bytes::ByteBuf>| {
            b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
        };
        map.insert("params".into(), json!(d.params));
        map.insert("body".into(), json!(text(&d.body)));
        map.insert("content_type".into(), json!(d.content_type));
        map.insert("headers".into(), json!(d.headers));
        map.insert("timeout".into(), json!(d.timeout));
        map.insert("callback_url".into(), json!(d.callback_url));
        map.insert("failure_callback_url".into(), json!(d.failure_callback_url));
        map.insert("last_response".into(), json!(text(&d.last_response)));
    }
    v
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

/// The OpenAPI 3.1 description of this API (`GET /openapi.json`), kept
/// true by the tests below and by schemathesis (tests/openapi.rs).
pub const OPENAPI: &str = include_str!("openapi.json");

/// How long a scrape waits for the brokers' `stats`: a broker slower than
/// this is reported down (`miyamoto_broker_up 0`) rather than holding the
/// scrape past Prometheus's usual 10 s timeout.
const STATS_WAIT: Duration = Duration::from_secs(2);

/// `GET /metrics`: the gateway's figures and every known broker's.
async fn metrics_page(link: &BrokerLink, metrics: &crate::metrics::GatewayMetrics) -> Resp {
    let answers = link.ask_each(ClientCommand::Stats, STATS_WAIT).await;
    let brokers: Vec<(String, Result<protocol::NodeStats, String>)> = answers
        .into_iter()
        .map(|(broker, answer)| {
            let stats = match answer {
                Ok(ReplyBody::Stats { stats }) => Ok(stats),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            (broker, stats)
        })
        .collect();
    let mut r = Response::new(Full::new(Bytes::from(metrics.render(&brokers))));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn error(status: StatusCode, reason: impl Into<String>) -> Resp {
    json_response(status, json!({"status": "error", "reason": reason.into()}))
}

/// A JSON answer; a `429` (a broker's `busy`) says when to retry.
fn json_response(status: StatusCode, v: Value) -> Resp {
    let mut r = json_ok(v.to_string().into_bytes());
    *r.status_mut() = status;
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            HeaderValue::from(protocol::limits::BUSY_RETRY_SECS),
        );
    }
    r
}

/// A 200 answer with a JSON body already written.
fn json_ok(body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scheduled_reply_matches_the_generic_rendering() {
        use http_body_util::BodyExt;
        let body = ReplyBody::Enqueued {
            id: "0b7d2c4e".into(),
            queue: "q".into(),
            eta: 1764288000.125,
            result: None,
            replicas: 2,
        };
        let fast = render(Ok(body.clone()));
        let (status, v) = reply_json(body);
        let slow = json_response(status, v);
        assert_eq!(fast.status(), slow.status());
        assert_eq!(fast.headers(), slow.headers());
        let fast = fast.into_body().collect().await.unwrap().to_bytes();
        let slow = slow.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(fast, slow);
    }

    #[test]
    fn batch_items_match_the_generic_rendering() {
        let bodies = vec![
            ReplyBody::Enqueued {
                id: "0b7d2c4e".into(),
                queue: "q".into(),
                eta: 1764288000.125,
                result: None,
                replicas: 1,
            },
            ReplyBody::Error {
                code: protocol::ErrorCode::BadRequest,
                reason: "task.url is required".into(),
            },
        ];
        let fast: Vec<BatchItem> = bodies.iter().cloned().map(BatchItem::of).collect();
        let slow: Vec<Value> = bodies.into_iter().map(|b| reply_json(b).1).collect();
        assert_eq!(
            serde_json::to_string(&fast).unwrap(),
            Value::Array(slow).to_string()
        );
    }

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

    #[test]
    fn json_numbers_are_numbers_and_keys_come_once() {
        let e = parse_json(br#"{"url": "x", "countdown": "5"}"#).unwrap_err();
        assert!(e.contains("countdown must be a number"), "{e}");
        let e = parse_json(br#"{"url": "x", "url": "y"}"#).unwrap_err();
        assert!(e.contains("\"url\" is given twice"), "{e}");
        let e = parse_json(br#"{"url": "x", "params": {"a": 1, "a": 2}}"#).unwrap_err();
        assert!(e.contains("\"a\" is given twice"), "{e}");
        let e = parse_batch(br#"[{"url": "x", "name": "a", "name": "b"}]"#).unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        assert!(parse_json(br#"{"url": "x", "params": {"a": [1, 2]}}"#).is_ok());
    }

    #[test]
    fn a_task_field_comes_once_in_a_form() {
        let e = parse_form(b"task.url=http://a/&task.url=http://b/").unwrap_err();
        assert!(e.contains("\"task.url\" is given twice"), "{e}");
        assert!(parse_form(b"task.url=http://a/&p=1&p=2").is_ok());
    }

    #[test]
    fn a_queue_patch_is_an_object() {
        assert!(parse_queue_patch(b"[]").is_err());
        assert!(parse_queue_patch(b"{}").is_ok());
        assert!(parse_queue_patch(br#"{"paused": true, "paused": false}"#).is_err());
    }
}
