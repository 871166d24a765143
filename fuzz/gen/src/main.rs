//! Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/):
//! real messages made by the protocol's encoders, real HTTP bodies, queue
//! files and cursors. Run from the repository root:
//!
//! ```sh
//! cargo run --manifest-path fuzz/gen/Cargo.toml --target-dir fuzz/target/gen
//! ```
//!
//! Files are named by the hash of their content, so running it again
//! rewrites the same files. The `store` seeds are made by a SplitMix64
//! stream (the target reads them with `arbitrary`, so any bytes are ops).

use std::path::{Path, PathBuf};

use protocol::*;
use serde::Serialize;
use serde_bytes::ByteBuf;

fn out_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap().join("corpus")
}

fn write(target: &str, bytes: &[u8]) {
    let dir = out_dir().join(target);
    std::fs::create_dir_all(&dir).unwrap();
    // FNV-1a, enough to name a few hundred files apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    std::fs::write(dir.join(format!("{h:016x}")), bytes).unwrap();
}

/// A message as the decoder targets read it: the canonical-layout byte
/// (bit 2), then the MessagePack body.
fn message<T: Serialize>(target: &str, m: &T) {
    let frames = encode(m);
    let mut v = vec![4u8];
    v.extend_from_slice(&frames[2]);
    write(target, &v);
}

/// The same body as three explicit frames (layout byte 2: three frames,
/// lengths 0 and 4), to seed the layout checks.
fn framed<T: Serialize>(target: &str, m: &T) {
    let frames = encode(m);
    let mut v = vec![2u8, 0, 4];
    v.extend_from_slice(&frames[1]);
    v.extend_from_slice(&frames[2]);
    write(target, &v);
}

fn spec() -> TaskSpec {
    TaskSpec {
        url: "http://localhost:8080/work".into(),
        params: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        countdown: Some(1.5),
        ..Default::default()
    }
}

fn full_spec() -> TaskSpec {
    TaskSpec {
        url: "https://example.com/hook?x=1".into(),
        method: Some("PUT".into()),
        params: vec![],
        body: Some(ByteBuf::from(b"{\"k\":1}".to_vec())),
        content_type: Some("application/json".into()),
        headers: vec![("X-Custom".into(), "v".into())],
        countdown: None,
        eta: Some(1_800_000_000.25),
        name: Some("daily-report_7".into()),
        timeout: Some(60.0),
        callback_url: Some("http://cb/ok".into()),
        failure_callback_url: Some("http://cb/fail".into()),
        idempotency_key: Some("key-1".into()),
    }
}

fn delivered() -> DeliveredTask {
    DeliveredTask {
        id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
        queue: "default".into(),
        name: Some("n".into()),
        url: "http://localhost/w".into(),
        method: "POST".into(),
        params: vec![("a".into(), "1".into())],
        body: None,
        content_type: None,
        headers: vec![("x".into(), "y".into())],
        eta: 1_800_000_000.5,
        timeout: 30.0,
        retry_count: 2,
        execution_count: 1,
        signing_secrets: vec!["whsec_AQI=".into()],
    }
}

fn result(delivery: u64, outcome: Outcome) -> DeliveryResult {
    DeliveryResult {
        delivery,
        task_id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
        outcome,
        status: Some(429),
        reason: Some("slow down".into()),
        retry_after: Some(30.0),
        responded: true,
        body: Some(ByteBuf::from(b"busy".to_vec())),
        no_retry: false,
    }
}

fn task_info() -> TaskInfo {
    TaskInfo {
        id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
        queue: "default".into(),
        name: None,
        url: "http://localhost/w".into(),
        method: "POST".into(),
        state: TaskState::Retrying,
        eta: 1_800_000_001.0,
        attempts: 1,
        executions: 1,
        last_status: Some(500),
        last_error: Some("HTTP 500".into()),
        created: 1_800_000_000.0,
        replica: 0,
        replica_offset: 5.0,
        first_attempt: Some(1_800_000_000.5),
        detail: Some(TaskDetail {
            params: vec![("a".into(), "1".into())],
            timeout: 30.0,
            last_response: Some(ByteBuf::from(b"oops".to_vec())),
            ..Default::default()
        }),
        holders: Vec::new(),
    }
}

fn queue_info() -> QueueInfo {
    QueueInfo {
        name: "emails".into(),
        config: QueueConfig::default(),
        paused: true,
        stats: QueueStats {
            scheduled: 3,
            running: 1,
            dispatches_per_second: 0.5,
            ..Default::default()
        },
    }
}

fn client_requests() -> Vec<ClientRequest> {
    let q = || "default".to_string();
    let commands = vec![
        ClientCommand::Enqueue {
            queue: q(),
            task: spec(),
            wait: None,
        },
        ClientCommand::Enqueue {
            queue: "emails".into(),
            task: full_spec(),
            wait: Some(10.0),
        },
        ClientCommand::EnqueueBatch {
            queue: q(),
            tasks: vec![spec(), full_spec()],
        },
        ClientCommand::Run {
            queue: q(),
            id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
        },
        ClientCommand::ListTasks {
            queue: q(),
            state: Some(TaskState::Failed),
            limit: Some(10),
            cursor: Some("1800000000000000.6f1c2a9e3b4d4e5f8a7b9c0d1e2f3a4b".into()),
            full: true,
            owned: false,
        },
        ClientCommand::ConfigureQueue {
            queue: "emails".into(),
            config: QueueConfigPatch {
                rate: Some(20.0),
                burst: Some(5),
                max_attempts: Some(-1),
                min_backoff: Some(1.0),
                signing_secrets: Some(vec!["whsec_AQI=".into()]),
                ..Default::default()
            },
        },
        ClientCommand::GetQueue {
            queue: q(),
            owned: false,
        },
        ClientCommand::ListQueues {
            limit: None,
            cursor: None,
            owned: false,
        },
        ClientCommand::ListQueues {
            limit: Some(2),
            cursor: Some("emails".into()),
            owned: true,
        },
        ClientCommand::PauseQueue { queue: q() },
        ClientCommand::ResumeQueue { queue: q() },
        ClientCommand::PurgeQueue { queue: q() },
        ClientCommand::Cancel {
            queue: q(),
            id: "x".into(),
        },
        ClientCommand::Get {
            queue: q(),
            id: "x".into(),
        },
        ClientCommand::Ping,
        ClientCommand::ClusterInfo,
        ClientCommand::Stats,
    ];
    commands
        .into_iter()
        .enumerate()
        .map(|(i, command)| ClientRequest {
            request_id: format!("req-{i}"),
            command,
        })
        .collect()
}

fn reply_bodies() -> Vec<ReplyBody> {
    let enqueued = ReplyBody::Enqueued {
        id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
        queue: "default".into(),
        eta: 1_800_000_000.0,
        result: None,
        replicas: 2,
    };
    vec![
        enqueued.clone(),
        ReplyBody::Enqueued {
            id: "i".into(),
            queue: "q".into(),
            eta: 1.0,
            result: Some(AttemptResult {
                outcome: Outcome::Success,
                status: Some(200),
                body: Some(ByteBuf::from(b"ok".to_vec())),
                error: None,
            }),
            replicas: 1,
        },
        ReplyBody::Duplicate {
            id: "d".into(),
            tombstoned: true,
        },
        ReplyBody::Batch {
            results: vec![enqueued.clone(), enqueued.clone()],
        },
        ReplyBody::Batch {
            results: vec![
                enqueued,
                ReplyBody::Error {
                    code: ErrorCode::BadRequest,
                    reason: "task.url is required".into(),
                },
            ],
        },
        ReplyBody::Tasks {
            tasks: vec![task_info()],
            next_cursor: Some("1800000000000000.6f1c2a9e3b4d4e5f8a7b9c0d1e2f3a4b".into()),
        },
        ReplyBody::Queue {
            queue: queue_info(),
        },
        ReplyBody::Queues {
            queues: vec![queue_info()],
            next_cursor: None,
        },
        ReplyBody::Queues {
            queues: vec![queue_info(), queue_info()],
            next_cursor: Some("emails".into()),
        },
        ReplyBody::Error {
            code: ErrorCode::Busy,
            reason: "the node is at its memory budget".into(),
        },
        ReplyBody::Purged {
            queue: "default".into(),
            removed: 7,
        },
        ReplyBody::Cluster {
            cluster: ClusterInfo {
                node: 1,
                leader: Some(1),
                term: 3,
                epoch: 4,
                replicas: 2,
                replica_offset: 5.0,
                nodes: vec![NodeInfo {
                    id: 1,
                    name: "a".into(),
                    client: "tcp://127.0.0.1:7000".into(),
                    worker: "tcp://127.0.0.1:7001".into(),
                    alive: true,
                    leader: true,
                    tasks: 10,
                }],
                re_replicated: 0,
                dropped_peer_messages: 0,
            },
        },
        ReplyBody::Task { task: task_info() },
        ReplyBody::Cancelled { id: "c".into() },
        ReplyBody::Pong {
            node: "node-7000".into(),
            version: "0.1.0".into(),
        },
        ReplyBody::Error {
            code: ErrorCode::Malformed,
            reason: "bad".into(),
        },
    ]
}

fn member(id: u64) -> Member {
    Member {
        id,
        name: format!("node-{id}"),
        client: "tcp://127.0.0.1:7000".into(),
        worker: "tcp://127.0.0.1:7001".into(),
        peer: "tcp://127.0.0.1:7002".into(),
        events: "tcp://127.0.0.1:7003".into(),
    }
}

fn record() -> ReplicaRecord {
    ReplicaRecord {
        id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
        queue: "default".into(),
        name: Some("n".into()),
        url: "http://localhost/w".into(),
        pool: HTTP_POOL.into(),
        method: "POST".into(),
        params: vec![("a".into(), "1".into())],
        body: None,
        content_type: None,
        headers: vec![],
        eta: 1_800_000_000.0,
        timeout: 30.0,
        callback_url: None,
        failure_callback_url: None,
        idempotency_key: Some("k".into()),
        is_callback: false,
        created_us: 1_800_000_000_000_000,
        state: TaskState::Scheduled,
        due_us: 1_800_000_000_000_000,
        attempts: 0,
        executions: 0,
        last_status: None,
        last_error: None,
        first_attempt_us: None,
        holders: vec![1, 2],
        request: Some("req-1#0".into()),
    }
}

fn main() {
    // Client dialogue.
    for r in client_requests() {
        message("client_request", &r);
    }
    framed("client_request", &client_requests()[0]);
    // "type" last, defaults left out: the derived decoder's path.
    #[derive(Serialize)]
    struct TypeLast<'a> {
        request_id: &'a str,
        task: TaskSpec,
        r#type: &'a str,
    }
    let body = rmp_serde::to_vec_named(&TypeLast {
        request_id: "r",
        task: spec(),
        r#type: "enqueue",
    })
    .unwrap();
    write("client_request", &[&[4u8][..], &body].concat());
    for (i, body) in reply_bodies().into_iter().enumerate() {
        message(
            "client_reply",
            &ClientReply {
                request_id: format!("req-{i}"),
                body,
            },
        );
    }

    // Worker dialogue.
    let worker = vec![
        WorkerMessage::Ready {
            pools: vec![HTTP_POOL.into(), "images".into()],
            credit: 64,
            name: Some("gw".into()),
            batch: true,
        },
        WorkerMessage::Ready {
            pools: vec!["images".into()],
            credit: 1,
            name: None,
            batch: false,
        },
        WorkerMessage::Credit { credit: 10 },
        WorkerMessage::Heartbeat,
        WorkerMessage::Result(result(7, Outcome::Failure)),
        WorkerMessage::Results {
            results: vec![result(8, Outcome::Success), result(9, Outcome::Failure)],
        },
        WorkerMessage::Disconnect,
    ];
    for m in &worker {
        message("worker_message", m);
    }
    framed("worker_message", &worker[4]);
    let broker = vec![
        BrokerMessage::Task {
            delivery: 7,
            task: delivered(),
        },
        BrokerMessage::Tasks {
            tasks: vec![
                Dispatched {
                    delivery: 8,
                    task: delivered(),
                },
                Dispatched {
                    delivery: u64::MAX,
                    task: DeliveredTask {
                        body: Some(ByteBuf::from(vec![0, 1, 2])),
                        params: vec![],
                        signing_secrets: vec![],
                        ..delivered()
                    },
                },
            ],
        },
        BrokerMessage::Heartbeat,
        BrokerMessage::Disconnect {
            reason: "unknown worker".into(),
        },
        BrokerMessage::Error {
            code: ErrorCode::Malformed,
            reason: "bad".into(),
        },
    ];
    for m in &broker {
        message("broker_message", m);
    }
    framed("broker_message", &broker[0]);

    // Cluster.
    let peer = vec![
        PeerMessage::Raft {
            from: 1,
            message: ByteBuf::from(vec![8, 3, 16, 1]),
        },
        PeerMessage::Join { member: member(3) },
        PeerMessage::Store {
            req: 5,
            from: 1,
            record: record(),
            check: true,
        },
        PeerMessage::StoreResult {
            req: 5,
            from: 2,
            outcome: StoreOutcome::Stored,
        },
        PeerMessage::StoreResult {
            req: 6,
            from: 2,
            outcome: StoreOutcome::Duplicate {
                id: "d".into(),
                tombstoned: false,
            },
        },
        PeerMessage::StoreResult {
            req: 7,
            from: 2,
            outcome: StoreOutcome::Rejected {
                reason: "no".into(),
            },
        },
        PeerMessage::StoreResult {
            req: 8,
            from: 2,
            outcome: StoreOutcome::Resent {
                id: "r".into(),
                decided: false,
            },
        },
        PeerMessage::Discard { id: "x".into() },
        PeerMessage::Request {
            req: 9,
            from: 1,
            command: ClientCommand::PauseQueue {
                queue: "default".into(),
            },
        },
        PeerMessage::Reply {
            req: 9,
            from: 2,
            body: ReplyBody::Purged {
                queue: "default".into(),
                removed: 1,
            },
        },
    ];
    for m in &peer {
        message("peer_message", m);
    }
    let events = vec![
        EventBody::Heartbeat {
            tasks: 10,
            epoch: 2,
        },
        EventBody::Claimed {
            id: "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b".into(),
            deadline_us: 1_800_000_030_000_000,
        },
        EventBody::Retry {
            id: "i".into(),
            attempts: 2,
            executions: 1,
            due_us: 1_800_000_010_000_000,
            last_status: Some(500),
            last_error: Some("HTTP 500".into()),
            response: Some(ByteBuf::from(b"oops".to_vec())),
        },
        EventBody::Finished {
            id: "i".into(),
            state: TaskState::Succeeded,
            attempts: 1,
            executions: 1,
            last_status: Some(200),
            last_error: None,
            response: None,
        },
    ];
    for (seq, body) in events.into_iter().enumerate() {
        message(
            "cluster_event",
            &ClusterEvent {
                from: 1,
                seq: seq as u64,
                body,
            },
        );
    }

    // HTTP enqueue bodies (gateway/src/api.rs, README's examples).
    for form in [
        "task.url=http%3A%2F%2Flocalhost%3A8080%2Fwork&a=1&a=2",
        "task.url=https://example.com/x&task.method=GET&task.countdown=1.5&task.name=daily_1",
        "task.url=http://h/&task.eta=2027-01-15T08:00:00Z&task.timeout=60&task.header.X-Trace=abc",
        "task.url=zmq://images&task.eta=1800000000.5&task.callback_url=http://cb/&task.failure_callback_url=http://cb/f",
        "task.url=http://h/&task.nope=1",
        "task.url=http://h/&task.countdown=inf",
    ] {
        write("http_form", form.as_bytes());
    }
    let json = [
        r#"{"url":"http://localhost:8080/work","params":{"a":"1","b":["2",3,true]}}"#,
        r#"{"url":"https://example.com/x","method":"PUT","body":"{\"k\":1}","content_type":"application/json","headers":{"X-A":"b"}}"#,
        r#"{"url":"zmq://images","countdown":"2.5","name":"n-1","timeout":30,"idempotency_key":"k1"}"#,
        r#"{"url":"http://h/","eta":"2027-01-15T08:00:00+02:00","callback_url":"http://cb/","failure_callback_url":null}"#,
        r#"{"url":"http://h/","eta":1800000000.25,"params":null}"#,
        r#"{"url":"http://h/","body":"x","params":{"a":"1"}}"#,
    ];
    for j in json {
        write("http_json", j.as_bytes());
    }
    write(
        "http_batch",
        format!("[{},{}]", json[0], json[2]).as_bytes(),
    );
    write(
        "http_batch",
        format!("[{},{},5,null]", json[1], json[5]).as_bytes(),
    );
    write("http_batch", b"[]");

    // Seconds: 8 bytes f64, 12 bytes max, then a Retry-After value.
    for (secs, max_s, text) in [
        (1.5f64, 60u64, "120"),
        (f64::NAN, 86400, "Wed, 21 Oct 2015 07:28:00 GMT"),
        (1e308, u64::MAX, "Fri, 01 Jan 2100 00:00:00 GMT"),
        (-0.0, 0, "18446744073709551615"),
        (18446744073709551615.0, u64::MAX, " 5 "),
    ] {
        let mut v = secs.to_le_bytes().to_vec();
        v.extend_from_slice(&max_s.to_le_bytes());
        v.extend_from_slice(&999_999_999u32.to_le_bytes());
        v.extend_from_slice(text.as_bytes());
        write("seconds", &v);
    }

    // Queue files (TOML: mode byte 0) and patches (JSON: mode 1, or 3 on
    // a non-default base).
    for toml in [
        "[defaults]\nmax_attempts = 5\nmin_backoff = 0.5\n\n[queues.emails]\nrate = 20\nburst = 5\n\n[queues.reports]\nmax_concurrent = 2\nsigning_secrets = [\"whsec_AQI=\"]\nretention = 0\n",
        "[queues.x]\nmax_backoff = 0.01\n",
        "[queues.\"a b\"]\n",
    ] {
        write("queue_config", &[&[0u8][..], toml.as_bytes()].concat());
    }
    for (mode, json) in [
        (
            1u8,
            r#"{"rate":0.5,"burst":3,"max_doublings":64,"timeout":3600}"#,
        ),
        (
            1,
            r#"{"max_attempts":-1,"max_age":2592000,"dedup_window":0}"#,
        ),
        (3, r#"{"min_backoff":1,"max_backoff":1}"#),
        (3, r#"{"signing_secrets":["whsec_AQI=","AQI="]}"#),
        (1, r#"{"rate":1e-4}"#),
    ] {
        write("queue_config", &[&[mode][..], json.as_bytes()].concat());
    }

    // Cursors: [page size and mode, state filter, cursor or edits].
    write("list_cursor", b"\x02\x07");
    write("list_cursor", b"\x01\x06");
    write("list_cursor", b"\x03\x07junk");
    write(
        "list_cursor",
        b"\x00\x061800000000000000.6f1c2a9e3b4d4e5f8a7b9c0d1e2f3a4b",
    );
    write("list_cursor", b"\x81\x07\x00\x39");
    write("list_cursor", b"\x82\x06\x20\x2d");
    write("list_cursor", b"\x80\x00\x10\x00");

    // The store: any bytes are a sequence of ops.
    let mut state = 0x5eed_u64;
    for len in [16usize, 64, 128, 256, 512, 1024, 2048, 4096] {
        let bytes: Vec<u8> = (0..len).map(|_| splitmix64(&mut state) as u8).collect();
        write("store", &bytes);
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
