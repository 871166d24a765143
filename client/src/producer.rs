//! A blocking producer for a broker's request port (`PROTOCOL.md` §7):
//! enqueue, cancel, get, ping. It owns its socket: use one per thread.

use std::time::{Duration, Instant};

use protocol::{
    ClientCommand, ClientReply, ClientRequest, ErrorCode, ReplyBody, TaskInfo, TaskSpec,
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
        Producer::connect_with(endpoint, None)
    }

    /// Connects as [`Producer::connect`] does, over CURVE when given keys
    /// (`PROTOCOL.md` §17.2).
    pub fn connect_with(
        endpoint: &str,
        curve: Option<&crate::curve::ClientKeys>,
    ) -> Result<Producer, ClientError> {
        let ctx = zmq::Context::new();
        let socket = sockets::dealer(&ctx, false, curve)?;
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
            let deadline = Instant::now() + self.attempt_timeout;
            // Wait for room, or for a connection (none when the broker
            // refused the handshake), until the attempt's deadline.
            match sockets::send_parts_within(&self.socket, &frames, self.attempt_timeout) {
                Ok(()) | Err(zmq::Error::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
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
