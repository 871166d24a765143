//! The gateway's ZeroMQ side: one dedicated thread that owns both sockets
//! to the broker and is linked to tokio by channels.
//!
//! * Requests (enqueue, get, cancel) from HTTP handlers arrive on a
//!   crossbeam channel with a `oneshot` for the reply; the thread sends
//!   them on a DEALER to the broker's base port and matches replies by
//!   request id. Plain enqueues to one queue found waiting together go as
//!   one `enqueue_batch` (up to [`COALESCE_MAX`] tasks and
//!   [`COALESCE_BYTES`]), whose results are handed
//!   out in order: the broker treats each task of a batch exactly as a
//!   single enqueue, so only the per-request costs change. `ZMQ_IMMEDIATE` makes a send fail at once while no broker
//!   is connected, so the caller gets a 503 rather than a late enqueue.
//! * Webhook work: the thread registers on the broker's worker port for
//!   the `*http` pool with the dispatcher's concurrency as credit and
//!   `batch` set, passes each task to tokio, and sends back the results
//!   webhooks report: the results found waiting together go as one
//!   `results` message once the broker has shown it batches (it sent
//!   `tasks`).
//!
//! The doorbell wakes the thread from `zmq::poll` when a channel has work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use client::sockets::{self, Bell, Doorbell};
use client::{SessionConfig, Tick, WorkerSession};
use crossbeam_channel::{unbounded, Receiver, Sender};
use protocol::{
    BrokerMessage, ClientCommand, ClientReply, ClientRequest, DeliveredTask, DeliveryResult,
    ReplyBody, WorkerMessage, HTTP_POOL,
};
use tokio::sync::{mpsc, oneshot};

/// Why a request to the broker got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// No broker is connected.
    NotConnected,
    /// The broker did not answer in time.
    Timeout,
    /// The link thread has stopped.
    Closed,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::NotConnected => write!(f, "no broker is reachable"),
            LinkError::Timeout => write!(f, "the broker did not answer in time"),
            LinkError::Closed => write!(f, "the gateway's broker link has stopped"),
        }
    }
}

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Brokers' base-port endpoints, e.g. `tcp://127.0.0.1:7000`: any one
    /// is enough, the others are learned from its roster.
    pub brokers: Vec<String>,
    /// Webhooks in flight at once (the credit granted to the broker).
    pub concurrency: u32,
    /// How long a caller waits for the broker's answer in all.
    pub request_timeout: Duration,
    /// An unanswered request is sent again, under its request id, after
    /// this long (and again after as long, within `request_timeout`).
    /// Twice the brokers' 0.5 s handoff time: a replicated enqueue whose
    /// holder is silent is answered by its broker well before, so only a
    /// request whose broker died (or that died on the way) is resent, and
    /// ZeroMQ takes the resend to a live broker.
    pub resend_after: Duration,
    pub heartbeat_interval: Duration,
    /// Re-register after hearing nothing from the broker this long.
    pub broker_expiry: Duration,
    /// A broker in this process (`miyamoto standalone`), reached in-process.
    pub local: Option<LocalBroker>,
    /// CURVE keys for the brokers' ports (`--curve-server-key`,
    /// `--curve-key`): this gateway's public key must be admitted on the
    /// producer and worker ports.
    pub curve: Option<client::curve::ClientKeys>,
}

/// A broker running in the same process and ZeroMQ context as the gateway.
/// Its TCP base endpoint, wherever it appears (the configuration or a
/// roster), is reached through its `inproc://` endpoints instead: no
/// loopback TCP, no ZeroMQ I/O thread on either side.
#[derive(Clone)]
pub struct LocalBroker {
    pub ctx: zmq::Context,
    /// The broker's TCP base endpoint, e.g. `tcp://127.0.0.1:7000`.
    pub endpoint: String,
    /// Its in-process client and worker endpoints.
    pub client: String,
    pub worker: String,
}

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBroker")
            .field("endpoint", &self.endpoint)
            .field("client", &self.client)
            .field("worker", &self.worker)
            .finish()
    }
}

/// Passes over the channels and sockets between two polls, while they
/// yield, and the time they may take.
const REREADS: usize = 16;
const REREAD_BUDGET: Duration = Duration::from_millis(2);

/// The worker endpoint (port + 1) of a base-port endpoint.
pub fn worker_endpoint(client_endpoint: &str) -> Result<String, String> {
    let (head, port) = client_endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("{client_endpoint:?} is not tcp://HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{client_endpoint:?} does not end in a port number"))?;
    if !head.starts_with("tcp://") || port == u16::MAX {
        return Err(format!("{client_endpoint:?} is not tcp://HOST:PORT"));
    }
    Ok(format!("{head}:{}", port + 1))
}

impl LinkConfig {
    /// A link to one broker (more are learned from its roster).
    pub fn for_broker(client_endpoint: &str, concurrency: u32) -> Result<LinkConfig, String> {
        Self::for_brokers(&[client_endpoint.to_string()], concurrency)
    }

    /// A link to several brokers (`--broker A,B,C`).
    pub fn for_brokers(brokers: &[String], concurrency: u32) -> Result<LinkConfig, String> {
        if brokers.is_empty() {
            return Err("at least one broker endpoint is needed".into());
        }
        for b in brokers {
            worker_endpoint(b)?;
        }
        Ok(LinkConfig {
            brokers: brokers.to_vec(),
            concurrency: concurrency.max(1),
            request_timeout: Duration::from_secs(5),
            resend_after: Duration::from_millis(1000),
            heartbeat_interval: Duration::from_secs(1),
            broker_expiry: Duration::from_secs(5),
            local: None,
            curve: None,
        })
    }
}

/// A request for every broker known, each answering for itself (`stats`).
struct FanOut {
    /// The command for each broker, by its base endpoint.
    command: Box<dyn Fn(&str) -> ClientCommand + Send>,
    wait: Duration,
    reply: oneshot::Sender<Vec<BrokerAnswer>>,
}

/// One broker's answer to a [`BrokerLink::ask_each`]: its base endpoint
/// and what it said.
pub type BrokerAnswer = (String, Result<ReplyBody, LinkError>);

struct LinkRequest {
    command: ClientCommand,
    /// Extra time on top of the link's request timeout (a `wait`).
    extra: Duration,
    reply: oneshot::Sender<Result<ReplyBody, LinkError>>,
}

/// The handle HTTP handlers use; cheap to clone.
#[derive(Clone)]
pub struct BrokerLink {
    requests: Sender<LinkRequest>,
    fanouts: Sender<FanOut>,
    /// Brokers with a direct connection (see [`BrokerLink::brokers`]).
    brokers: Arc<AtomicU64>,
    results: Sender<(BrokerId, DeliveryResult)>,
    bell: Bell,
    stop: Arc<AtomicBool>,
    coalesced: Arc<AtomicU64>,
}

/// Which of the link's brokers sent a task (its result goes back there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerId(usize);

/// A task to deliver, handed from the link thread to tokio.
#[derive(Debug)]
pub struct Delivery {
    /// The broker that sent it.
    pub broker: BrokerId,
    pub delivery: u64,
    pub task: DeliveredTask,
}

impl BrokerLink {
    /// Starts the link thread. Webhook tasks arrive on the returned receiver.
    pub fn start(
        config: LinkConfig,
    ) -> std::io::Result<(BrokerLink, mpsc::UnboundedReceiver<Delivery>)> {
        let (bell, doorbell) = sockets::doorbell()?;
        let (req_tx, req_rx) = unbounded();
        let (fan_tx, fan_rx) = unbounded();
        let (res_tx, res_rx) = unbounded();
        let (job_tx, job_rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let coalesced = Arc::new(AtomicU64::new(0));
        let thread_stop = stop.clone();
        let counter = coalesced.clone();
        let brokers = Arc::new(AtomicU64::new(0));
        let brokers_counter = brokers.clone();
        thread::Builder::new()
            .name("broker-link".into())
            .spawn(move || {
                let channels = Channels {
                    doorbell,
                    requests: req_rx,
                    fanouts: fan_rx,
                    results: res_rx,
                    jobs: job_tx,
                    coalesced: counter,
                    brokers: brokers_counter,
                };
                // Crash-only: a gateway without its link answers 503 for
                // good, so it ends (the binaries exit on a panic).
                if let Err(e) = run(config, channels, &thread_stop) {
                    panic!("the broker link stopped: {e}");
                }
            })?;
        Ok((
            BrokerLink {
                requests: req_tx,
                fanouts: fan_tx,
                results: res_tx,
                bell,
                stop,
                coalesced,
                brokers,
            },
            job_rx,
        ))
    }

    /// Sends a request to the broker and waits for its reply.
    pub async fn request(&self, command: ClientCommand) -> Result<ReplyBody, LinkError> {
        self.request_with(command, Duration::ZERO).await
    }

    /// Like [`BrokerLink::request`], allowing `extra` time for the reply
    /// (an enqueue that waits for its first attempt).
    pub async fn request_with(
        &self,
        command: ClientCommand,
        extra: Duration,
    ) -> Result<ReplyBody, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(LinkRequest {
                command,
                extra,
                reply: tx,
            })
            .map_err(|_| LinkError::Closed)?;
        self.bell.ring();
        rx.await.unwrap_or(Err(LinkError::Closed))
    }

    /// Sends `command` to every broker known (each on its own connection)
    /// and gathers their answers, waiting at most `wait`: a broker that
    /// did not answer by then is [`LinkError::Timeout`].
    pub async fn ask_each(&self, command: ClientCommand, wait: Duration) -> Vec<BrokerAnswer> {
        self.ask_each_with(move |_| command.clone(), wait).await
    }

    /// Like [`BrokerLink::ask_each`], with a command made for each broker
    /// (from its base endpoint): a page of a listing goes on from each
    /// broker's own cursor.
    pub async fn ask_each_with(
        &self,
        command: impl Fn(&str) -> ClientCommand + Send + 'static,
        wait: Duration,
    ) -> Vec<BrokerAnswer> {
        let (tx, rx) = oneshot::channel();
        if self
            .fanouts
            .send(FanOut {
                command: Box::new(command),
                wait,
                reply: tx,
            })
            .is_err()
        {
            return Vec::new();
        }
        self.bell.ring();
        rx.await.unwrap_or_default()
    }

    /// Reports a webhook's outcome to the broker that sent the task.
    pub fn report(&self, broker: BrokerId, result: DeliveryResult) {
        if self.results.send((broker, result)).is_ok() {
            self.bell.ring();
        }
    }

    /// Brokers this gateway knows and reaches directly: more than one
    /// means a cluster, whose views are gathered from every node.
    pub fn brokers(&self) -> u64 {
        self.brokers.load(Ordering::Relaxed)
    }

    /// How many enqueues went to the broker inside a shared batch.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Stops the link thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.bell.ring();
    }
}

type ReplyTx = oneshot::Sender<Result<ReplyBody, LinkError>>;

/// Who waits for a request's reply.
enum Waiting {
    One(ReplyTx),
    /// Single enqueues sent as one `enqueue_batch`: one per result, in order.
    Coalesced(Vec<ReplyTx>),
}

impl Waiting {
    fn callers(&self) -> usize {
        match self {
            Waiting::One(_) => 1,
            Waiting::Coalesced(txs) => txs.len(),
        }
    }

    fn answer(self, body: Result<ReplyBody, LinkError>) {
        match (self, body) {
            (Waiting::One(tx), body) => {
                let _ = tx.send(body);
            }
            (Waiting::Coalesced(txs), Ok(ReplyBody::Batch { results }))
                if results.len() == txs.len() =>
            {
                for (tx, r) in txs.into_iter().zip(results) {
                    let _ = tx.send(Ok(r));
                }
            }
            // An answer for the whole request (an error): everyone's.
            (Waiting::Coalesced(txs), body) => {
                let body = match body {
                    Ok(ReplyBody::Batch { results }) => Ok(ReplyBody::Error {
                        code: protocol::ErrorCode::Internal,
                        reason: format!(
                            "the broker answered {} results for {} tasks",
                            results.len(),
                            txs.len()
                        ),
                    }),
                    other => other,
                };
                for tx in txs {
                    let _ = tx.send(body.clone());
                }
            }
        }
    }
}

/// A request sent to the brokers and not answered yet.
struct Pending {
    reply: Waiting,
    /// When the callers get [`LinkError::Timeout`].
    deadline: Instant,
    /// The request as sent, to send again under the same request id.
    frames: Vec<Vec<u8>>,
    /// When to send it again (`None`: never; a `wait` is not resent, as a
    /// resend would be answered at once, without the attempt's result, and
    /// neither are `run` and `purge_queue`: see [`resendable`]).
    resend_at: Option<Instant>,
    /// Resent every `resend_after` while unanswered (else only after an
    /// `unavailable` refusal, which acted on nothing).
    resendable: bool,
}

/// A request a broker refused with `unavailable` (it acted on nothing: a
/// node still joining its cluster) goes again after this long, which
/// ZeroMQ takes to the next broker; within the request's deadline.
const REFUSED_RESEND: Duration = Duration::from_millis(50);

/// The most single enqueues sent as one batch, and the most bytes of
/// tasks in it (well below the 2 MiB a message may hold).
const COALESCE_MAX: usize = 128;
const COALESCE_BYTES: usize = 1 << 20;
/// The most brokers the link connects to (a roster naming more is not
/// followed past it).
const MAX_BROKERS: usize = 256;
/// Poll timeout when nothing is due sooner.
const LINK_TICK: Duration = Duration::from_millis(100);
/// How often the roster is asked for, to learn the other brokers.
const ROSTER_EVERY: Duration = Duration::from_secs(2);
/// The request id of roster requests (never a uuid, so never a caller's).
const ROSTER_REQUEST: &str = "roster";

/// The link thread's ends of its channels.
struct Channels {
    doorbell: Doorbell,
    requests: Receiver<LinkRequest>,
    fanouts: Receiver<FanOut>,
    results: Receiver<(BrokerId, DeliveryResult)>,
    jobs: mpsc::UnboundedSender<Delivery>,
    coalesced: Arc<AtomicU64>,
    brokers: Arc<AtomicU64>,
}

/// The link thread's state: its sockets, the brokers it knows and the
/// requests waiting for answers.
struct Link {
    config: LinkConfig,
    ctx: zmq::Context,
    /// One DEALER to every broker's client port: ZeroMQ spreads requests
    /// over the connected ones, and IMMEDIATE skips the dead.
    client: zmq::Socket,
    /// Base endpoints of the brokers connected to.
    known: Vec<String>,
    /// Registrations by `BrokerId`: the list only grows, so an id stays
    /// valid (a registration renewed by `keep_alive` keeps its place).
    workers: Vec<Registration>,
    pending: HashMap<String, Pending>,
    /// One DEALER to each known broker's client port, for the requests
    /// every broker answers for itself; in `known`'s order.
    direct: Vec<(String, zmq::Socket)>,
    fanouts: HashMap<String, FanPending>,
    next_roster: Instant,
    ch: Channels,
}

/// A fan-out waiting for its brokers.
struct FanPending {
    reply: oneshot::Sender<Vec<BrokerAnswer>>,
    answers: Vec<(String, Option<Result<ReplyBody, LinkError>>)>,
    deadline: Instant,
}

impl FanPending {
    fn complete(&self) -> bool {
        self.answers.iter().all(|(_, a)| a.is_some())
    }

    fn answer(self) {
        let answers = self
            .answers
            .into_iter()
            .map(|(b, a)| (b, a.unwrap_or(Err(LinkError::Timeout))))
            .collect();
        let _ = self.reply.send(answers);
    }
}

/// Fan-outs waiting at once; past it a new one is answered at once with
/// every broker `NotConnected` (a scraper asking faster than brokers
/// answer must not grow the map).
const MAX_FANOUTS: usize = 64;

fn run(config: LinkConfig, ch: Channels, stop: &AtomicBool) -> Result<(), zmq::Error> {
    let ctx = match &config.local {
        Some(l) => l.ctx.clone(),
        None => zmq::Context::new(),
    };
    let client = sockets::dealer(&ctx, true, config.curve.as_ref())?;
    let mut link = Link {
        ctx,
        client,
        known: Vec::new(),
        workers: Vec::new(),
        pending: HashMap::new(),
        direct: Vec::new(),
        fanouts: HashMap::new(),
        // The roster is asked for right away, then every ROSTER_EVERY.
        next_roster: Instant::now(),
        ch,
        config,
    };
    for b in link.config.brokers.clone() {
        link.connect_broker(&b)?;
    }
    // Which worker sockets were readable, reused across iterations.
    let mut readable: Vec<bool> = Vec::new();
    loop {
        client::logging::test_fault_point("broker-link");
        let client_readable = link.poll(&mut readable)?;
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        link.ch.doorbell.clear();
        let now = Instant::now();
        link.ask_roster(now);
        // Under load, more has arrived by the end of a pass: read the
        // channels and sockets again before polling (a syscall and a check
        // of every socket); a read that finds nothing is cheap.
        let until = now + REREAD_BUDGET;
        for pass in 0..REREADS {
            if pass > 0 && Instant::now() >= until {
                break;
            }
            let mut n = link.send_requests(now) + link.send_results() + link.send_fanouts(now);
            n += link.read_direct();
            if client_readable || pass > 0 {
                n += link.read_replies()?;
            }
            for (i, reg) in link.workers.iter_mut().enumerate() {
                if pass == 0 && !readable.get(i).copied().unwrap_or(false) {
                    continue;
                }
                n += reg.read(BrokerId(i), &link.ch.jobs);
            }
            if n == 0 {
                break;
            }
        }
        link.resend_and_expire(Instant::now());
        link.expire_fanouts(Instant::now());
        for reg in link.workers.iter_mut() {
            reg.keep_alive(&link.ctx)?;
        }
    }
}

impl Link {
    /// Waits for a socket or the doorbell; returns whether the client
    /// DEALER is readable, and which registrations are in `readable`.
    fn poll(&self, readable: &mut Vec<bool>) -> Result<bool, zmq::Error> {
        let mut items = Vec::with_capacity(2 + self.workers.len());
        items.push(self.client.as_poll_item(zmq::POLLIN));
        items.push(zmq::PollItem::from_fd(self.ch.doorbell.fd(), zmq::POLLIN));
        items.extend(
            self.workers
                .iter()
                .map(|r| r.socket.as_poll_item(zmq::POLLIN)),
        );
        // Only to wake: they are read on every pass (`read_direct`).
        items.extend(self.direct.iter().map(|(_, s)| s.as_poll_item(zmq::POLLIN)));
        match zmq::poll(&mut items, LINK_TICK.as_millis() as i64) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(e),
        }
        readable.clear();
        readable.extend(
            items[2..2 + self.workers.len()]
                .iter()
                .map(|i| i.is_readable()),
        );
        Ok(items[0].is_readable())
    }

    fn ask_roster(&mut self, now: Instant) {
        if now < self.next_roster {
            return;
        }
        self.next_roster = now + ROSTER_EVERY;
        let frames = protocol::encode(&ClientRequest {
            request_id: ROSTER_REQUEST.to_string(),
            command: ClientCommand::ClusterInfo,
        });
        let _ = sockets::send_parts(&self.client, &frames);
    }

    /// Sends what HTTP handlers asked for, single enqueues gathered into
    /// batches; returns how many callers were served.
    fn send_requests(&mut self, now: Instant) -> usize {
        let mut n = 0;
        let mut next = None;
        while let Some(r) = next.take().or_else(|| self.ch.requests.try_recv().ok()) {
            let deadline = now + self.config.request_timeout + r.extra;
            let waits = !r.extra.is_zero();
            let (command, waiting, after) = gather(r, &self.ch.requests);
            let resend_at =
                (!waits && resendable(&command)).then(|| now + self.config.resend_after);
            next = after;
            n += waiting.callers();
            if let Waiting::Coalesced(txs) = &waiting {
                self.ch
                    .coalesced
                    .fetch_add(txs.len() as u64, Ordering::Relaxed);
            }
            let request_id = uuid::Uuid::new_v4().to_string();
            let frames = protocol::encode(&ClientRequest {
                request_id: request_id.clone(),
                command,
            });
            match sockets::send_parts(&self.client, &frames) {
                Ok(()) => {
                    let pending = Pending {
                        reply: waiting,
                        deadline,
                        frames,
                        resend_at,
                        resendable: resend_at.is_some(),
                    };
                    self.pending.insert(request_id, pending);
                }
                Err(_) => waiting.answer(Err(LinkError::NotConnected)),
            }
        }
        n
    }

    /// Sends each fan-out to every broker on its own connection.
    fn send_fanouts(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Ok(f) = self.ch.fanouts.try_recv() {
            n += 1;
            let mut pending = FanPending {
                reply: f.reply,
                answers: Vec::with_capacity(self.direct.len()),
                deadline: now + f.wait,
            };
            if self.fanouts.len() >= MAX_FANOUTS {
                pending.answers = self
                    .direct
                    .iter()
                    .map(|(b, _)| (b.clone(), Some(Err(LinkError::NotConnected))))
                    .collect();
                pending.answer();
                continue;
            }
            let request_id = uuid::Uuid::new_v4().to_string();
            for (broker, socket) in &self.direct {
                let frames = protocol::encode(&ClientRequest {
                    request_id: request_id.clone(),
                    command: (f.command)(broker),
                });
                // IMMEDIATE: a broker not connected now fails at once.
                let sent = sockets::send_parts(socket, &frames).is_ok();
                let answer = (!sent).then_some(Err(LinkError::NotConnected));
                pending.answers.push((broker.clone(), answer));
            }
            if pending.complete() {
                pending.answer();
            } else {
                self.fanouts.insert(request_id, pending);
            }
        }
        n
    }

    /// Reads the direct connections' answers into their fan-outs.
    fn read_direct(&mut self) -> usize {
        let mut n = 0;
        for (i, (_, socket)) in self.direct.iter().enumerate() {
            while let Some(parts) = sockets::try_recv(socket) {
                n += 1;
                let Ok(reply) = protocol::decode_hot::<ClientReply, _>(&parts) else {
                    continue;
                };
                let Some(p) = self.fanouts.get_mut(&reply.request_id) else {
                    continue;
                };
                if let Some((_, slot)) = p.answers.get_mut(i) {
                    *slot = Some(Ok(reply.body));
                }
                if p.complete() {
                    if let Some(p) = self.fanouts.remove(&reply.request_id) {
                        p.answer();
                    }
                }
            }
        }
        n
    }

    fn expire_fanouts(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .fanouts
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(p) = self.fanouts.remove(&id) {
                p.answer();
            }
        }
    }

    /// Sends the webhooks' results to the brokers that sent the tasks.
    fn send_results(&mut self) -> usize {
        let mut n = 0;
        while let Ok((broker, result)) = self.ch.results.try_recv() {
            n += 1;
            if let Some(reg) = self.workers.get_mut(broker.0) {
                reg.report(result);
            }
        }
        for reg in self.workers.iter_mut() {
            reg.flush_results();
        }
        n
    }

    /// Hands out the brokers' replies; a roster names brokers to connect
    /// to. Returns how many replies were read.
    fn read_replies(&mut self) -> Result<usize, zmq::Error> {
        let mut n = 0;
        while let Some(parts) = sockets::try_recv(&self.client) {
            n += 1;
            match protocol::decode_hot::<ClientReply, _>(&parts) {
                Ok(reply) if reply.request_id == ROSTER_REQUEST => {
                    if let ReplyBody::Cluster { cluster } = reply.body {
                        for node in cluster.nodes {
                            self.connect_broker(&node.client)?;
                        }
                    }
                }
                Ok(reply) => {
                    if let ReplyBody::Error {
                        code: protocol::ErrorCode::Unavailable,
                        ..
                    } = &reply.body
                    {
                        if let Some(p) = self.pending.get_mut(&reply.request_id) {
                            let at = Instant::now() + REFUSED_RESEND;
                            if at < p.deadline {
                                p.resend_at = Some(at);
                                continue;
                            }
                        }
                    }
                    // A resend's second answer finds nothing here: the
                    // first one was handed out.
                    if let Some(p) = self.pending.remove(&reply.request_id) {
                        p.reply.answer(Ok(reply.body));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "undecodable reply from broker"),
            }
        }
        Ok(n)
    }

    /// Sends again, under the same request id, what has waited past
    /// `resend_after` (ZeroMQ takes it to a live broker, and the brokers
    /// act on a request id once, even across brokers: PROTOCOL.md §7.2, §16.8),
    /// and gives up on what has waited past its deadline.
    fn resend_and_expire(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (id, p) in self.pending.iter_mut() {
            if p.deadline <= now {
                expired.push(id.clone());
                continue;
            }
            if p.resend_at.is_none_or(|at| at > now) {
                continue;
            }
            // At most one resend in flight at a time, each after the last.
            let next = now + self.config.resend_after;
            p.resend_at = (p.resendable && next < p.deadline).then_some(next);
            if sockets::send_parts(&self.client, &p.frames).is_ok() {
                tracing::debug!(request = %id, "resent an unanswered request");
            }
        }
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                p.reply.answer(Err(LinkError::Timeout));
            }
        }
    }

    /// Connects to a broker not seen before: its client port joins the
    /// shared DEALER, and a registration pulls its webhook tasks.
    fn connect_broker(&mut self, endpoint: &str) -> Result<(), zmq::Error> {
        if self.known.iter().any(|k| k == endpoint) {
            return Ok(());
        }
        let Ok(worker) = worker_endpoint(endpoint) else {
            return Ok(());
        };
        let (client_at, worker_at) = match &self.config.local {
            Some(l) if l.endpoint == endpoint => (l.client.clone(), l.worker.clone()),
            _ => (endpoint.to_string(), worker),
        };
        if self.known.len() >= MAX_BROKERS {
            tracing::warn!(broker = %endpoint, "too many brokers known; not connecting to another");
            return Ok(());
        }
        // Remembered even when it fails, so a bad endpoint in a roster is
        // tried once, not every time the roster comes.
        self.known.push(endpoint.to_string());
        // An endpoint a roster names may be one libzmq refuses: the link
        // goes on with the brokers it has.
        if let Err(e) = self.client.connect(&client_at) {
            tracing::warn!(broker = %endpoint, error = %e, "cannot connect to a broker the roster names");
            return Ok(());
        }
        tracing::info!(broker = %endpoint, via = %client_at, "gateway connected to a broker");
        match sockets::dealer(&self.ctx, true, self.config.curve.as_ref()) {
            Ok(d) if d.connect(&client_at).is_ok() => {
                self.direct.push((endpoint.to_string(), d));
                self.ch
                    .brokers
                    .store(self.direct.len() as u64, Ordering::Relaxed);
            }
            _ => tracing::warn!(broker = %endpoint, "cannot make a direct connection to a broker"),
        }
        match Registration::new(&self.ctx, &self.config, &worker_at) {
            Ok(reg) => self.workers.push(reg),
            Err(e) => {
                tracing::warn!(broker = %endpoint, error = %e, "cannot register for a broker's webhook tasks");
            }
        }
        Ok(())
    }
}

/// Whether a command may be sent again under its request id when no
/// answer comes. A resend may reach another broker, and only enqueues are
/// deduplicated across brokers (PROTOCOL.md §7.2); of the rest, only what
/// is harmless to repeat is resent. Not `run` (a second broker that holds
/// a copy would run it again) nor `purge_queue` (a second purge would
/// remove tasks enqueued in between).
fn resendable(command: &ClientCommand) -> bool {
    !matches!(
        command,
        ClientCommand::Run { .. } | ClientCommand::PurgeQueue { .. }
    )
}

/// The request `first` and, when it is a plain enqueue, the plain enqueues
/// to the same queue waiting behind it, up to [`COALESCE_MAX`] tasks and
/// [`COALESCE_BYTES`]: what to send, who waits for the answer, and the
/// request read after them that did not fit (to be sent next).
fn gather(
    first: LinkRequest,
    requests: &Receiver<LinkRequest>,
) -> (ClientCommand, Waiting, Option<LinkRequest>) {
    let ClientCommand::Enqueue {
        queue,
        task,
        wait: None,
    } = first.command
    else {
        return (first.command, Waiting::One(first.reply), None);
    };
    let mut bytes = task.encoded_size_bound();
    let mut tasks = vec![task];
    let mut txs = vec![first.reply];
    let mut after = None;
    while tasks.len() < COALESCE_MAX {
        match requests.try_recv() {
            Ok(LinkRequest {
                command:
                    ClientCommand::Enqueue {
                        queue: q,
                        task,
                        wait: None,
                    },
                reply,
                ..
            }) if q == queue && bytes + task.encoded_size_bound() <= COALESCE_BYTES => {
                bytes += task.encoded_size_bound();
                tasks.push(task);
                txs.push(reply);
            }
            Ok(other) => {
                after = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    if tasks.len() == 1 {
        if let (Some(task), Some(tx)) = (tasks.pop(), txs.pop()) {
            let command = ClientCommand::Enqueue {
                queue,
                task,
                wait: None,
            };
            return (command, Waiting::One(tx), after);
        }
    }
    let command = ClientCommand::EnqueueBatch { queue, tasks };
    (command, Waiting::Coalesced(txs), after)
}

/// The dispatcher's registration on one broker's worker port: the socket,
/// and the worker session ([`client::WorkerSession`]) that keeps the
/// dialogue's rules.
struct Registration {
    endpoint: String,
    curve: Option<client::curve::ClientKeys>,
    socket: zmq::Socket,
    session: WorkerSession,
}

impl Registration {
    fn new(
        ctx: &zmq::Context,
        config: &LinkConfig,
        endpoint: &str,
    ) -> Result<Registration, zmq::Error> {
        let socket = sockets::dealer(ctx, false, config.curve.as_ref())?;
        socket.connect(endpoint)?;
        let mut session_config = SessionConfig::new(
            &[HTTP_POOL],
            config.concurrency,
            &format!("gateway-{}", std::process::id()),
            true,
        );
        session_config.heartbeat_interval = config.heartbeat_interval;
        session_config.broker_expiry = config.broker_expiry;
        let mut r = Registration {
            endpoint: endpoint.to_string(),
            curve: config.curve.clone(),
            socket,
            session: WorkerSession::new(session_config, Instant::now()),
        };
        let ready = r.session.ready();
        r.send(&ready);
        Ok(r)
    }

    fn send(&mut self, msg: &WorkerMessage) {
        // Queued by ZeroMQ while the broker is away; dropped only when the
        // high-water mark is reached, which the broker's heartbeat expiry
        // and our re-registration recover from.
        if sockets::send_parts(&self.socket, &protocol::encode(msg)).is_ok() {
            self.session.sent(Instant::now());
        }
    }

    fn send_all(&mut self, out: &mut Vec<WorkerMessage>) {
        for msg in out.drain(..) {
            self.send(&msg);
        }
    }

    /// Reads what the broker sent; deliveries go to `jobs`. Returns how
    /// many messages were read.
    fn read(&mut self, broker: BrokerId, jobs: &mpsc::UnboundedSender<Delivery>) -> usize {
        let mut n = 0;
        let mut out = Vec::new();
        while let Some(parts) = sockets::try_recv(&self.socket) {
            n += 1;
            let msg = match protocol::decode_hot::<BrokerMessage, _>(&parts) {
                Ok(msg) => msg,
                Err(err) => {
                    tracing::warn!(error = %err, broker = %self.endpoint, "undecodable message from broker");
                    continue;
                }
            };
            let deliver = |job: client::Job| {
                let _ = jobs.send(Delivery {
                    broker,
                    delivery: job.delivery,
                    task: job.task,
                });
            };
            self.session.receive(msg, Instant::now(), deliver, &mut out);
            self.send_all(&mut out);
        }
        n
    }

    /// Sends a webhook's result, or keeps it for the next `results`
    /// message when the broker takes them.
    fn report(&mut self, result: DeliveryResult) {
        let mut out = Vec::new();
        self.session.report(result, Instant::now(), &mut out);
        self.send_all(&mut out);
    }

    /// Sends the results kept by [`Registration::report`].
    fn flush_results(&mut self) {
        let mut out = Vec::new();
        self.session.flush(&mut out);
        self.send_all(&mut out);
    }

    fn keep_alive(&mut self, ctx: &zmq::Context) -> Result<(), zmq::Error> {
        let now = Instant::now();
        match self.session.tick(now) {
            Tick::Reconnect => {
                tracing::warn!(broker = %self.endpoint, "broker silent; registering again on a new connection");
                self.socket = sockets::dealer(ctx, false, self.curve.as_ref())?;
                self.socket.connect(&self.endpoint)?;
                let ready = self.session.renewed(now);
                self.send(&ready);
            }
            Tick::Heartbeat => self.send(&WorkerMessage::Heartbeat),
            Tick::Nothing => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::TaskSpec;

    fn enqueue(queue: &str, body: usize, wait: Option<f64>) -> (LinkRequest, ReplyRx) {
        let (reply, rx) = oneshot::channel();
        let task = TaskSpec {
            url: "http://127.0.0.1/w".into(),
            body: (body > 0).then(|| serde_bytes::ByteBuf::from(vec![b'x'; body])),
            ..Default::default()
        };
        let command = ClientCommand::Enqueue {
            queue: queue.into(),
            task,
            wait,
        };
        let extra = Duration::ZERO;
        (
            LinkRequest {
                command,
                extra,
                reply,
            },
            rx,
        )
    }

    type ReplyRx = oneshot::Receiver<Result<ReplyBody, LinkError>>;

    fn queued(items: Vec<LinkRequest>) -> Receiver<LinkRequest> {
        let (tx, rx) = unbounded();
        for i in items {
            tx.send(i).ok();
        }
        rx
    }

    fn tasks_of(c: &ClientCommand) -> usize {
        match c {
            ClientCommand::EnqueueBatch { tasks, .. } => tasks.len(),
            ClientCommand::Enqueue { .. } => 1,
            _ => 0,
        }
    }

    #[test]
    fn gathers_plain_enqueues_of_one_queue_in_order() {
        let (first, _r0) = enqueue("a", 0, None);
        let mut rest = Vec::new();
        let mut rxs = Vec::new();
        for q in ["a", "a", "b", "a"] {
            let (r, rx) = enqueue(q, 0, None);
            rest.push(r);
            rxs.push(rx);
        }
        let requests = queued(rest);
        let (command, waiting, after) = gather(first, &requests);
        assert_eq!(tasks_of(&command), 3);
        assert!(matches!(command, ClientCommand::EnqueueBatch { ref queue, .. } if queue == "a"));
        // The first request of another queue ends the batch and goes next.
        let after = after.expect("the queue-b enqueue");
        assert!(matches!(after.command, ClientCommand::Enqueue { ref queue, .. } if queue == "b"));
        // Answers go back in order.
        let ids = ["x", "y", "z"];
        let results = ids
            .iter()
            .map(|id| ReplyBody::Duplicate {
                id: id.to_string(),
                tombstoned: false,
            })
            .collect();
        waiting.answer(Ok(ReplyBody::Batch { results }));
        for (rx, id) in rxs.iter_mut().zip(&ids[1..]) {
            match rx.try_recv() {
                Ok(Ok(ReplyBody::Duplicate { id: got, .. })) => assert_eq!(&got, id),
                other => panic!("{other:?}"),
            }
        }
        // The last queue-a enqueue waits in the channel for its own turn.
        let (command, waiting, after) = gather(after, &requests);
        assert!(matches!(waiting, Waiting::One(_)) && after.is_some());
        assert_eq!(tasks_of(&command), 1);
    }

    #[test]
    fn a_wait_and_other_commands_are_never_gathered() {
        let (first, _r0) = enqueue("a", 0, Some(1.0));
        let (next, _r1) = enqueue("a", 0, None);
        let requests = queued(vec![next]);
        let (command, waiting, after) = gather(first, &requests);
        assert!(matches!(
            command,
            ClientCommand::Enqueue { wait: Some(_), .. }
        ));
        assert!(matches!(waiting, Waiting::One(_)));
        assert!(after.is_none(), "the next request was read");
        let (first, _r2) = enqueue("a", 0, None);
        let (mut other, _r3) = enqueue("a", 0, None);
        other.command = ClientCommand::Ping;
        let requests = queued(vec![other]);
        let (command, _, after) = gather(first, &requests);
        assert_eq!(tasks_of(&command), 1);
        assert!(matches!(
            after.map(|a| a.command),
            Some(ClientCommand::Ping)
        ));
    }

    #[test]
    fn a_batch_stays_well_inside_the_message_limit() {
        // Ten tasks of 300 KiB: all together would be 3 MiB.
        let (first, _r) = enqueue("a", 300 * 1024, None);
        let mut rest = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..9 {
            let (r, rx) = enqueue("a", 300 * 1024, None);
            rest.push(r);
            keep.push(rx);
        }
        let requests = queued(rest);
        let mut next = Some(first);
        let (mut sent, mut largest) = (0, 0);
        while let Some(r) = next.take() {
            let (command, _, after) = gather(r, &requests);
            sent += tasks_of(&command);
            largest = largest.max(tasks_of(&command));
            let frames = protocol::encode(&ClientRequest {
                request_id: "r".into(),
                command,
            });
            // The broker's decoder takes it (it refuses more than 2 MiB).
            let size = frames.iter().map(Vec::len).sum::<usize>();
            let decoded = protocol::decode::<ClientRequest, _>(&frames);
            assert!(decoded.is_ok(), "a request of {size} bytes: {decoded:?}");
            next = after.or_else(|| requests.try_recv().ok());
        }
        assert_eq!(sent, 10);
        assert!(largest > 1, "no batch was gathered, so nothing was checked");
    }

    #[test]
    fn a_whole_request_error_reaches_everyone() {
        let mut rxs = Vec::new();
        let mut txs = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel();
            txs.push(tx);
            rxs.push(rx);
        }
        Waiting::Coalesced(txs).answer(Err(LinkError::Timeout));
        for mut rx in rxs {
            assert!(matches!(rx.try_recv(), Ok(Err(LinkError::Timeout))));
        }
        // A batch answer of the wrong length is an error for everyone.
        let (tx, mut rx) = oneshot::channel();
        Waiting::Coalesced(vec![tx]).answer(Ok(ReplyBody::Batch { results: vec![] }));
        assert!(matches!(
            rx.try_recv(),
            Ok(Ok(ReplyBody::Error {
                code: protocol::ErrorCode::Internal,
                ..
            }))
        ));
    }
}
