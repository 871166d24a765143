//! Blocking Rust clients of the two dialogues in `PROTOCOL.md`: a
//! [`Producer`] (enqueue, cancel, get over the base port) and a pulling
//! [`Worker`] (base port + 1). Each owns its socket: use one per thread.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use protocol::{
    BrokerMessage, ClientCommand, ClientReply, ClientRequest, DeliveredTask, DeliveryResult,
    ErrorCode, Outcome, ReplyBody, TaskInfo, TaskSpec, WorkerMessage,
};

use crate::sockets;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no reply from the broker within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the request ({code:?}): {reason}")]
    Rejected { code: ErrorCode, reason: String },
    #[error("unexpected reply from the broker: {0}")]
    Unexpected(String),
    #[error("ZeroMQ error: {0}")]
    Zmq(#[from] zmq::Error),
}

impl ClientError {
    /// The broker answered `not_found`.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ClientError::Rejected {
                code: ErrorCode::NotFound,
                ..
            }
        )
    }
}

/// A producer: a DEALER connected to a broker's base port.
pub struct Producer {
    socket: zmq::Socket,
    _ctx: zmq::Context,
    /// How long to wait for a reply before resending the same request.
    pub attempt_timeout: Duration,
    /// Sends per request (the first included).
    pub attempts: u32,
}

impl Producer {
    /// Connects to `endpoint`, e.g. `tcp://127.0.0.1:7000`.
    pub fn connect(endpoint: &str) -> Result<Producer, ClientError> {
        let ctx = zmq::Context::new();
        let socket = sockets::dealer(&ctx, false)?;
        socket.connect(endpoint)?;
        Ok(Producer {
            socket,
            _ctx: ctx,
            attempt_timeout: Duration::from_secs(2),
            attempts: 3,
        })
    }

    /// Sends `command` and waits for its reply, resending the same request
    /// id on timeout (the broker acts on it once).
    pub fn request(&mut self, command: ClientCommand) -> Result<ReplyBody, ClientError> {
        let request = ClientRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            command,
        };
        let frames = protocol::encode(&request);
        for _ in 0..self.attempts.max(1) {
            sockets::send_parts(&self.socket, &frames).or_else(|e| {
                // DONTWAIT send: wait for room rather than fail.
                if e == zmq::Error::EAGAIN {
                    self.socket.send_multipart(&frames, 0)
                } else {
                    Err(e)
                }
            })?;
            let deadline = Instant::now() + self.attempt_timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if self
                    .socket
                    .poll(zmq::POLLIN, left.as_millis().max(1) as i64)?
                    == 0
                {
                    break;
                }
                let parts = self.socket.recv_multipart(0)?;
                let Ok(reply) = protocol::decode_hot::<ClientReply, _>(&parts) else {
                    continue;
                };
                if reply.request_id == request.request_id {
                    return match reply.body {
                        ReplyBody::Error { code, reason } => {
                            Err(ClientError::Rejected { code, reason })
                        }
                        body => Ok(body),
                    };
                }
            }
        }
        Err(ClientError::Timeout(
            self.attempt_timeout * self.attempts.max(1),
        ))
    }

    /// Enqueues `task` on `queue`; returns the task id and its eta.
    pub fn enqueue(&mut self, queue: &str, task: TaskSpec) -> Result<(String, f64), ClientError> {
        match self.request(ClientCommand::Enqueue {
            queue: queue.into(),
            task,
            wait: None,
        })? {
            ReplyBody::Enqueued { id, eta, .. } => Ok((id, eta)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Cancels a task that has not succeeded.
    pub fn cancel(&mut self, queue: &str, id: &str) -> Result<(), ClientError> {
        match self.request(ClientCommand::Cancel {
            queue: queue.into(),
            id: id.into(),
        })? {
            ReplyBody::Cancelled { .. } => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Inspects a task.
    pub fn get(&mut self, queue: &str, id: &str) -> Result<TaskInfo, ClientError> {
        match self.request(ClientCommand::Get {
            queue: queue.into(),
            id: id.into(),
        })? {
            ReplyBody::Task { task } => Ok(task),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Checks that the broker answers; returns its node id.
    pub fn ping(&mut self) -> Result<String, ClientError> {
        match self.request(ClientCommand::Ping)? {
            ReplyBody::Pong { node, .. } => Ok(node),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// One delivery received by a [`Worker`].
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery: u64,
    pub task: DeliveredTask,
}

/// A pulling worker: a DEALER connected out to a broker's worker port,
/// following the Paranoid Pirate pattern. Call [`Worker::next`] at least
/// once per heartbeat interval, even while busy, so both sides stay alive.
///
/// A worker made by [`Worker::connect_batched`] takes its tasks several
/// at a time (`tasks` messages; [`Worker::next`] still hands out one job
/// per call) and may keep the results it is given for a while, to send
/// them as one `results` message. [`Worker::next`] sends what it keeps
/// before it waits for tasks, and before it hands out a job when the last
/// job took 5 ms or more, when a result has been kept 5 ms, or when half
/// the credit is in kept results. So a result waits at most until the
/// next call to [`Worker::next`], and not at all when jobs are slow.
/// [`Worker::flush`] sends them at once; [`Worker::disconnect`] and drop
/// send them too.
pub struct Worker {
    ctx: zmq::Context,
    socket: zmq::Socket,
    endpoint: String,
    pools: Vec<String>,
    credit: u32,
    name: String,
    pub heartbeat_interval: Duration,
    /// Reconnect after hearing nothing from the broker this long.
    pub broker_expiry: Duration,
    last_heard: Instant,
    last_sent: Instant,
    /// Times the worker re-registered (disconnect or silent broker).
    pub reconnects: u64,
    batch: bool,
    /// Jobs received and not yet handed out.
    inbox: VecDeque<Job>,
    /// Results not yet sent.
    outbox: KeptResults,
    /// When [`Worker::next`] last handed out a job.
    handed_out: Instant,
    /// `tasks` messages received, and `results` messages sent.
    pub tasks_messages: u64,
    pub results_messages: u64,
}

/// Results kept to go to the broker together (PROTOCOL.md §8.7): held only
/// once the broker has sent `tasks` on the connection, and sent one by one
/// again after it sends a plain `task` (or the connection is renewed).
#[derive(Debug, Default)]
pub struct KeptResults {
    /// The broker takes `results` on this connection.
    batches: bool,
    results: Vec<DeliveryResult>,
    /// A bound on their encoded size.
    bytes: usize,
    /// When the oldest of them was kept.
    since: Option<Instant>,
}

impl KeptResults {
    /// The broker sent `tasks`: it takes `results`.
    pub fn broker_batches(&mut self) {
        self.batches = true;
    }

    /// The broker sent a plain `task` (a broker that batches sends a
    /// batching worker `tasks` only) or `disconnect` (whatever answers now
    /// may not batch): results go one by one from now on.
    pub fn broker_may_not_batch(&mut self) {
        self.batches = false;
    }

    pub fn len(&self) -> usize {
        self.results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// When the oldest result kept was kept.
    pub fn kept_since(&self) -> Option<Instant> {
        self.since
    }

    /// Keeps `result` when the broker takes batches; returns what to send
    /// now: the result itself when it does not, or what was kept before
    /// when the result would not fit beside it.
    pub fn keep(&mut self, result: DeliveryResult) -> Vec<WorkerMessage> {
        if !self.batches {
            return vec![WorkerMessage::Result(result)];
        }
        let size = result.encoded_size_bound();
        let before = if protocol::batch_has_room(self.results.len(), self.bytes, size) {
            Vec::new()
        } else {
            self.take()
        };
        self.since.get_or_insert_with(Instant::now);
        self.bytes += size;
        self.results.push(result);
        before
    }

    /// What is kept, as the messages that send it: one `results`, or one
    /// `result` each when there is only one or the broker no longer takes
    /// batches.
    pub fn take(&mut self) -> Vec<WorkerMessage> {
        self.bytes = 0;
        self.since = None;
        let results = std::mem::take(&mut self.results);
        if results.len() > 1 && self.batches {
            return vec![WorkerMessage::Results { results }];
        }
        results.into_iter().map(WorkerMessage::Result).collect()
    }
}

/// How long a batched worker that still has jobs in hand may keep a
/// result, and the job time from which it keeps none.
const RESULT_HOLD: Duration = Duration::from_millis(5);

impl Worker {
    /// Connects to `endpoint` (e.g. `tcp://127.0.0.1:7001`), serving
    /// `pools` with up to `credit` tasks in flight.
    pub fn connect(endpoint: &str, pools: &[&str], credit: u32) -> Result<Worker, ClientError> {
        Worker::start(endpoint, pools, credit, false)
    }

    /// Like [`Worker::connect`], taking tasks and sending results several
    /// at a time (see [`Worker`]): fewer messages when tasks are many and
    /// short.
    pub fn connect_batched(
        endpoint: &str,
        pools: &[&str],
        credit: u32,
    ) -> Result<Worker, ClientError> {
        Worker::start(endpoint, pools, credit, true)
    }

    fn start(
        endpoint: &str,
        pools: &[&str],
        credit: u32,
        batch: bool,
    ) -> Result<Worker, ClientError> {
        let ctx = zmq::Context::new();
        let socket = sockets::dealer(&ctx, false)?;
        socket.connect(endpoint)?;
        let now = Instant::now();
        let mut w = Worker {
            ctx,
            socket,
            endpoint: endpoint.into(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            credit,
            name: format!("worker-{}", std::process::id()),
            heartbeat_interval: Duration::from_secs(1),
            broker_expiry: Duration::from_secs(5),
            last_heard: now,
            last_sent: now,
            reconnects: 0,
            batch,
            inbox: VecDeque::new(),
            outbox: KeptResults::default(),
            handed_out: now,
            tasks_messages: 0,
            results_messages: 0,
        };
        w.ready()?;
        Ok(w)
    }

    fn send(&mut self, msg: &WorkerMessage) -> Result<(), ClientError> {
        let frames = protocol::encode(msg);
        self.socket.send_multipart(&frames, 0)?;
        self.last_sent = Instant::now();
        if let WorkerMessage::Results { .. } = msg {
            self.results_messages += 1;
        }
        Ok(())
    }

    fn ready(&mut self) -> Result<(), ClientError> {
        let msg = WorkerMessage::Ready {
            pools: self.pools.clone(),
            credit: self.credit,
            name: Some(self.name.clone()),
            batch: self.batch,
        };
        self.send(&msg)
    }

    /// Jobs and results of the old registration: the broker has given the
    /// jobs back (or will, when it forgets this worker), and ignores
    /// results for them.
    fn forget(&mut self) {
        self.inbox.clear();
        self.outbox = KeptResults::default();
    }

    fn reconnect(&mut self) -> Result<(), ClientError> {
        self.forget();
        self.socket = sockets::dealer(&self.ctx, false)?;
        self.socket.connect(&self.endpoint)?;
        self.reconnects += 1;
        self.last_heard = Instant::now();
        self.ready()
    }

    /// Waits up to `wait` for a task, keeping heartbeats going.
    pub fn next(&mut self, wait: Duration) -> Result<Option<Job>, ClientError> {
        let deadline = Instant::now() + wait;
        loop {
            // What has arrived, without waiting: a busy batched worker that
            // has jobs in hand still hears the broker's heartbeats.
            while let Some(parts) = sockets::try_recv(&self.socket) {
                self.receive(&parts)?;
            }
            let now = Instant::now();
            if !self.outbox.is_empty()
                && (self.inbox.is_empty()
                    || now.duration_since(self.handed_out) >= RESULT_HOLD
                    || self
                        .outbox
                        .kept_since()
                        .is_some_and(|t| now.duration_since(t) >= RESULT_HOLD)
                    || self.outbox.len() as u64 * 2 >= u64::from(self.credit))
            {
                self.flush()?;
            }
            if now.duration_since(self.last_sent) >= self.heartbeat_interval {
                self.send(&WorkerMessage::Heartbeat)?;
            }
            if let Some(job) = self.inbox.pop_front() {
                self.handed_out = now;
                return Ok(Some(job));
            }
            if now.duration_since(self.last_heard) >= self.broker_expiry {
                self.reconnect()?;
            }
            if now >= deadline {
                return Ok(None);
            }
            let until_beat = self
                .heartbeat_interval
                .saturating_sub(now.duration_since(self.last_sent));
            let left = deadline.saturating_duration_since(now);
            let slice = until_beat.min(left).max(Duration::from_millis(1));
            self.socket.poll(zmq::POLLIN, slice.as_millis() as i64)?;
        }
    }

    /// One message from the broker.
    fn receive(&mut self, parts: &[Vec<u8>]) -> Result<(), ClientError> {
        self.last_heard = Instant::now();
        match protocol::decode_hot::<BrokerMessage, _>(parts) {
            Ok(BrokerMessage::Task { delivery, task }) => {
                self.outbox.broker_may_not_batch();
                self.inbox.push_back(Job { delivery, task });
            }
            Ok(BrokerMessage::Tasks { tasks }) => {
                self.outbox.broker_batches();
                self.tasks_messages += 1;
                self.inbox.extend(tasks.into_iter().map(|d| Job {
                    delivery: d.delivery,
                    task: d.task,
                }));
            }
            Ok(BrokerMessage::Disconnect { .. }) => {
                self.forget();
                self.reconnects += 1;
                self.ready()?;
            }
            Ok(BrokerMessage::Heartbeat) => {}
            Ok(BrokerMessage::Error { reason, .. }) => {
                tracing::warn!(%reason, "broker reported an error");
            }
            Err(e) => tracing::warn!(error = %e, "undecodable message from broker"),
        }
        Ok(())
    }

    /// Reports a delivery's outcome (returns one credit). A batched worker
    /// may keep it for the next `results` message (see [`Worker`]).
    pub fn report(
        &mut self,
        job: &Job,
        outcome: Outcome,
        reason: Option<String>,
    ) -> Result<(), ClientError> {
        let result = DeliveryResult {
            delivery: job.delivery,
            task_id: job.task.id.clone(),
            outcome,
            status: None,
            reason,
            retry_after: None,
            responded: true,
            body: None,
            no_retry: false,
        };
        for msg in self.outbox.keep(result) {
            self.send(&msg)?;
        }
        Ok(())
    }

    /// Sends the results a batched worker keeps (see [`Worker`]).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        for msg in self.outbox.take() {
            self.send(&msg)?;
        }
        Ok(())
    }

    /// Leaves cleanly, after sending the results it keeps; in-flight tasks
    /// go back to the schedule.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.flush()?;
        self.send(&WorkerMessage::Disconnect)
    }
}

impl Drop for Worker {
    /// Sends the results still kept, as far as the socket takes them.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
