//! A blocking pulling worker for a broker's worker port (`PROTOCOL.md`
//! §8), following the Paranoid Pirate pattern. The rules of the dialogue
//! are in [`crate::session`]; this file adds the socket and the wait.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use protocol::{BrokerMessage, DeliveryResult, Outcome, WorkerMessage};

use crate::session::{Job, Received, SessionConfig, Tick, WorkerSession};
use crate::{sockets, ClientError};

/// A pulling worker: a DEALER connected out to a broker's worker port.
/// Call [`Worker::next`] at least once per heartbeat interval, even while
/// busy, so both sides stay alive. It owns its socket: use one per thread.
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
    /// CURVE keys, kept for reconnections.
    curve: Option<crate::curve::ClientKeys>,
    session: WorkerSession,
    /// Times the worker re-registered (disconnect or silent broker).
    pub reconnects: u64,
    /// Jobs received and not yet handed out.
    inbox: VecDeque<Job>,
    /// When [`Worker::next`] last handed out a job.
    handed_out: Instant,
    /// `results` messages sent.
    pub results_messages: u64,
}

/// How long a message waits for a connection to take it: none comes when
/// the broker refused this worker (an unadmitted CURVE key).
const SEND_WAIT: Duration = Duration::from_secs(2);

/// How long a batched worker that still has jobs in hand may keep a
/// result, and the job time from which it keeps none.
const RESULT_HOLD: Duration = Duration::from_millis(5);

impl Worker {
    /// Connects to `endpoint` (e.g. `tcp://127.0.0.1:7001`), serving
    /// `pools` with up to `credit` tasks in flight.
    pub fn connect(endpoint: &str, pools: &[&str], credit: u32) -> Result<Worker, ClientError> {
        Worker::connect_with(endpoint, pools, credit, false, None)
    }

    /// Like [`Worker::connect`], taking tasks and sending results several
    /// at a time (see [`Worker`]): fewer messages when tasks are many and
    /// short.
    pub fn connect_batched(
        endpoint: &str,
        pools: &[&str],
        credit: u32,
    ) -> Result<Worker, ClientError> {
        Worker::connect_with(endpoint, pools, credit, true, None)
    }

    /// Connects as [`Worker::connect`] (`batch` false) or
    /// [`Worker::connect_batched`] (`batch` true) do, over CURVE when
    /// given keys (`PROTOCOL.md` §17.2).
    pub fn connect_with(
        endpoint: &str,
        pools: &[&str],
        credit: u32,
        batch: bool,
        curve: Option<crate::curve::ClientKeys>,
    ) -> Result<Worker, ClientError> {
        let ctx = zmq::Context::new();
        let socket = sockets::dealer(&ctx, false, curve.as_ref())?;
        socket.connect(endpoint)?;
        let now = Instant::now();
        let name = format!("worker-{}", std::process::id());
        let session = WorkerSession::new(SessionConfig::new(pools, credit, &name, batch), now);
        let mut w = Worker {
            ctx,
            socket,
            endpoint: endpoint.into(),
            curve,
            session,
            reconnects: 0,
            inbox: VecDeque::new(),
            handed_out: now,
            results_messages: 0,
        };
        let ready = w.session.ready();
        w.send(&ready)?;
        Ok(w)
    }

    /// `tasks` messages received.
    pub fn tasks_messages(&self) -> u64 {
        self.session.tasks_messages
    }

    fn send(&mut self, msg: &WorkerMessage) -> Result<(), ClientError> {
        let frames = protocol::encode(msg);
        match sockets::send_parts_within(&self.socket, &frames, SEND_WAIT) {
            Err(zmq::Error::EAGAIN) => return Err(ClientError::Timeout(SEND_WAIT)),
            other => other?,
        }
        self.session.sent(Instant::now());
        if let WorkerMessage::Results { .. } = msg {
            self.results_messages += 1;
        }
        Ok(())
    }

    fn send_all(&mut self, out: Vec<WorkerMessage>) -> Result<(), ClientError> {
        for msg in &out {
            self.send(msg)?;
        }
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), ClientError> {
        // The broker has given the old registration's jobs back (or will,
        // when it forgets this worker), and ignores results for them.
        self.inbox.clear();
        self.socket = sockets::dealer(&self.ctx, false, self.curve.as_ref())?;
        self.socket.connect(&self.endpoint)?;
        self.reconnects += 1;
        let ready = self.session.renewed(Instant::now());
        self.send(&ready)
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
            let kept = self.session.kept();
            if !kept.is_empty()
                && (self.inbox.is_empty()
                    || now.duration_since(self.handed_out) >= RESULT_HOLD
                    || kept
                        .kept_since()
                        .is_some_and(|t| now.duration_since(t) >= RESULT_HOLD)
                    || kept.len() as u64 * 2 >= u64::from(self.session.config().credit))
            {
                self.flush()?;
            }
            if self.session.tick(now) == Tick::Heartbeat {
                self.send(&WorkerMessage::Heartbeat)?;
            }
            if let Some(job) = self.inbox.pop_front() {
                self.handed_out = now;
                return Ok(Some(job));
            }
            if self.session.tick(now) == Tick::Reconnect {
                self.reconnect()?;
            }
            if now >= deadline {
                return Ok(None);
            }
            let until_beat = self.session.until_heartbeat(now);
            let left = deadline.saturating_duration_since(now);
            let slice = until_beat.min(left).max(Duration::from_millis(1));
            self.socket.poll(zmq::POLLIN, slice.as_millis() as i64)?;
        }
    }

    /// One message from the broker.
    fn receive(&mut self, parts: &[Vec<u8>]) -> Result<(), ClientError> {
        let msg = match protocol::decode_hot::<BrokerMessage, _>(parts) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable message from broker");
                return Ok(());
            }
        };
        let mut out = Vec::new();
        let inbox = &mut self.inbox;
        if self
            .session
            .receive(msg, Instant::now(), |j| inbox.push_back(j), &mut out)
            == Received::Renewed
        {
            self.inbox.clear();
            self.reconnects += 1;
        }
        self.send_all(out)
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
        let mut out = Vec::new();
        self.session.report(result, Instant::now(), &mut out);
        self.send_all(out)
    }

    /// Sends the results a batched worker keeps (see [`Worker`]).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let mut out = Vec::new();
        self.session.flush(&mut out);
        self.send_all(out)
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
