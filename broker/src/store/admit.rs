//! Admitting and routing requests: a client's request is checked (its
//! request id, the deduplication of resends, its queue name), then routed
//! to this node's tasks, to the peers that hold the task, or to every
//! peer (queue commands); enqueues are validated here before the
//! lifecycle stores them.

use super::replication::{Client, Enqueuing};
use super::*;

/// Where [`Store::route`] sent a request.
enum Routed {
    /// To this node's tasks.
    Here(ClientCommand),
    /// To peers, or held: the reply comes later.
    Later,
    /// Answered at once.
    Answered(ReplyBody),
}

/// An enqueue whose reply is held until the task's first attempt ends
/// (its `wait`), and who waits for it.
pub(super) struct Held<'a> {
    pub identity: &'a [u8],
    pub request_id: &'a str,
    pub id: Uuid,
    pub queue: &'a str,
    pub eta: f64,
    /// Copies stored, repeated in the held reply.
    pub replicas: u32,
}

/// Whether a command changes anything (and so is deduplicated by its
/// request id).
fn is_mutating(command: &ClientCommand) -> bool {
    !matches!(
        command,
        ClientCommand::Get { .. }
            | ClientCommand::Ping
            | ClientCommand::ListTasks { .. }
            | ClientCommand::GetQueue { .. }
            | ClientCommand::ListQueues { .. }
            | ClientCommand::Stats
    )
}

impl Store {
    /// A client's request: checked, deduplicated, routed and applied.
    /// `None`: the reply comes later (from peers, or after a `wait`).
    pub(super) fn request(
        &mut self,
        identity: &[u8],
        req: ClientRequest,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> Option<ClientReply> {
        let ClientRequest {
            request_id,
            command,
        } = req;
        if self.joining && !matches!(command, ClientCommand::Ping) {
            let body = error(
                ErrorCode::Unavailable,
                "this node is joining a cluster and serves requests once it is a member: send the request to another node",
            );
            return Some(ClientReply { request_id, body });
        }
        let mutating = is_mutating(&command);
        // A resend while the first copies still wait for their holders:
        // the first one's answer will do. (Before the memory of replies,
        // which knows this node's own copy of the pending task.)
        if mutating && self.store_pending_for(&request_id) {
            self.stats.duplicate_requests += 1;
            return None;
        }
        if let Some(body) = self.admit(&request_id, &command, mutating) {
            return Some(ClientReply { request_id, body });
        }
        let command = if self.cluster.is_clustered() {
            match self.route(identity, &request_id, command, now_us) {
                Routed::Here(command) => command,
                Routed::Later => return None,
                Routed::Answered(body) => return Some(ClientReply { request_id, body }),
            }
        } else {
            command
        };
        let (body, held) = self.apply_here(identity, &request_id, command, now_us, out);
        let reply = ClientReply { request_id, body };
        // An error changed nothing, and a resend is answered the same
        // afresh: remembering it would only let a stream of bad requests
        // fill the memory of replies.
        if mutating && !matches!(reply.body, ReplyBody::Error { .. }) {
            self.remember(&reply, now_us);
        }
        (!held).then_some(reply)
    }

    /// The checks that answer a request at once: its request id's length,
    /// a resend of a change already answered (its first reply again), and
    /// its queue name.
    fn admit(
        &mut self,
        request_id: &str,
        command: &ClientCommand,
        mutating: bool,
    ) -> Option<ReplyBody> {
        if !(1..=MAX_REQUEST_ID_BYTES).contains(&request_id.len()) {
            return Some(error(
                ErrorCode::BadRequest,
                format!("request_id must be 1 to {MAX_REQUEST_ID_BYTES} bytes"),
            ));
        }
        let queue = command_queue(command);
        if mutating {
            if let Some(body) = self.remembered(request_id, queue.unwrap_or("")) {
                self.stats.duplicate_requests += 1;
                return Some(body);
            }
        }
        if let Some(Err(rule)) = queue.map(protocol::limits::check_queue_name) {
            return Some(error(ErrorCode::BadRequest, rule));
        }
        if let ClientCommand::Enqueue { wait: Some(w), .. } = command {
            if let Err(rule) = protocol::limits::check_wait(*w) {
                return Some(error(ErrorCode::BadRequest, rule));
            }
        }
        let new_tasks = match command {
            ClientCommand::Enqueue { .. } => 1,
            ClientCommand::EnqueueBatch { tasks, .. } => tasks.len(),
            _ => 0,
        };
        // Commands that make the queue they name count against the cap.
        let makes_queue = matches!(
            command,
            ClientCommand::ConfigureQueue { .. }
                | ClientCommand::PauseQueue { .. }
                | ClientCommand::ResumeQueue { .. }
        );
        if new_tasks > 0 || makes_queue {
            if let Some(busy) = self.over_limits(queue.unwrap_or(""), new_tasks) {
                self.stats.busy += 1;
                return Some(busy);
            }
        }
        None
    }

    /// In a cluster: enqueues are stored on their holders, commands about
    /// a task held elsewhere go to the peers, queue commands to everyone
    /// as well as here.
    fn route(
        &mut self,
        identity: &[u8],
        request_id: &str,
        command: ClientCommand,
        now_us: u64,
    ) -> Routed {
        let stores = match &command {
            ClientCommand::Enqueue { .. } => true,
            ClientCommand::EnqueueBatch { tasks, .. } => tasks.len() <= MAX_BATCH,
            _ => false,
        };
        // A resend while the first copies still wait for their holders:
        // the first one's answer will do.
        if stores && self.store_pending_for(request_id) {
            self.stats.duplicate_requests += 1;
            return Routed::Later;
        }
        let client = Client {
            identity,
            request_id,
        };
        match command {
            ClientCommand::Enqueue { queue, task, wait } => {
                let to = Enqueuing::Single { wait };
                match self.enqueue_replicated(client, &queue, task, to, now_us) {
                    Some(body) => Routed::Answered(body),
                    None => Routed::Later,
                }
            }
            ClientCommand::EnqueueBatch { queue, tasks } if stores => {
                self.enqueue_batch_replicated(client, &queue, tasks, now_us);
                Routed::Later
            }
            ClientCommand::Get { ref queue, ref id }
            | ClientCommand::Cancel { ref queue, ref id }
            | ClientCommand::Run { ref queue, ref id }
                if self.find(queue, id).is_none() =>
            {
                self.forward(client, command, now_us);
                Routed::Later
            }
            ClientCommand::ConfigureQueue { .. }
            | ClientCommand::PauseQueue { .. }
            | ClientCommand::ResumeQueue { .. }
            | ClientCommand::PurgeQueue { .. } => {
                self.broadcast(command.clone());
                Routed::Here(command)
            }
            command => Routed::Here(command),
        }
    }

    /// Applies a command to this node's tasks. Returns the reply, and
    /// whether it is held (an enqueue's `wait`).
    fn apply_here(
        &mut self,
        identity: &[u8],
        request_id: &str,
        command: ClientCommand,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> (ReplyBody, bool) {
        let body = match command {
            ClientCommand::Enqueue { queue, task, wait } => {
                let body = self.enqueue(&queue, task, false, now_us);
                if let ReplyBody::Enqueued { id, eta, .. } = &body {
                    let held = Uuid::parse_str(id).ok().is_some_and(|id| {
                        let held = Held {
                            identity,
                            request_id,
                            id,
                            queue: &queue,
                            eta: *eta,
                            replicas: 1,
                        };
                        self.hold(held, wait, now_us)
                    });
                    return (body, held);
                }
                body
            }
            ClientCommand::EnqueueBatch { queue, tasks } => {
                if tasks.len() > MAX_BATCH {
                    error(
                        ErrorCode::BadRequest,
                        format!("a batch holds at most {MAX_BATCH} tasks"),
                    )
                } else {
                    let results = tasks
                        .into_iter()
                        .map(|t| self.enqueue(&queue, t, false, now_us))
                        .collect();
                    ReplyBody::Batch { results }
                }
            }
            ClientCommand::Cancel { queue, id } => self.cancel(&queue, &id, now_us, out),
            ClientCommand::Get { queue, id } => self.get(&queue, &id),
            ClientCommand::Run { queue, id } => self.run(&queue, &id, now_us, out),
            ClientCommand::ListTasks {
                queue,
                state,
                limit,
                cursor,
                full,
                owned,
            } => self.list_tasks(&queue, state, limit, cursor, full, owned),
            ClientCommand::GetQueue { queue, owned } => ReplyBody::Queue {
                queue: self.queue_info_for(&queue, now_us, owned),
            },
            ClientCommand::ListQueues {
                limit,
                cursor,
                owned,
            } => self.list_queues(limit, cursor, now_us, owned),
            cmd @ (ClientCommand::ConfigureQueue { .. }
            | ClientCommand::PauseQueue { .. }
            | ClientCommand::ResumeQueue { .. }
            | ClientCommand::PurgeQueue { .. }) => self.queue_command(cmd, now_us, out),
            ClientCommand::ClusterInfo => error(
                ErrorCode::Internal,
                "cluster_info is answered by the I/O loop",
            ),
            ClientCommand::Stats => ReplyBody::Stats {
                stats: self.node_stats(now_us),
            },
            ClientCommand::Ping => ReplyBody::Pong {
                node: self.config.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        };
        (body, false)
    }

    /// Holds an enqueue's reply until the task's first attempt ends, for
    /// at most `wait` seconds ([`MAX_WAIT_SECS`] at most). Returns whether
    /// it is held (a `wait` of 0 or none holds nothing).
    pub(super) fn hold(&mut self, held: Held<'_>, wait: Option<f64>, now_us: u64) -> bool {
        let Some(wait) = wait.filter(|w| w.is_finite() && *w > 0.0) else {
            return false;
        };
        let until = now_us + secs_to_micros(wait.min(MAX_WAIT_SECS));
        let timer = self.add_timer(until, Timer::Wait(held.id));
        self.waiters.entry(held.id).or_default().push(Waiter {
            identity: held.identity.to_vec(),
            request_id: held.request_id.to_string(),
            queue: held.queue.to_string(),
            eta: held.eta,
            replicas: held.replicas,
            timer,
        });
        true
    }

    /// The reply remembered for a request (or a batch's task, by its
    /// request key): what this node answered, or the copy it stores for
    /// another coordinator, while that copy is here (a copy discarded
    /// since, because its name was taken elsewhere, answers nothing).
    pub(super) fn remembered(&self, key: &str, queue: &str) -> Option<ReplyBody> {
        match self.recent.get(key, queue)? {
            ReplyBody::Enqueued {
                id,
                queue,
                eta,
                result,
                replicas: 0,
            } => {
                let uid = Uuid::parse_str(&id).ok()?;
                self.tasks.get(&uid)?;
                Some(ReplyBody::Enqueued {
                    id,
                    queue,
                    eta,
                    result,
                    replicas: 1,
                })
            }
            body => Some(body),
        }
    }

    /// The task remembered for a request key that this node holds (a copy
    /// it stores for that request, or the task it answered with).
    pub(super) fn held_for(&self, key: &str, queue: &str) -> Option<Uuid> {
        match self.recent.get(key, queue)? {
            ReplyBody::Enqueued { id, .. } => {
                let id = Uuid::parse_str(&id).ok()?;
                self.tasks.get(&id).map(|_| id)
            }
            _ => None,
        }
    }

    /// Remembers a change's reply, so a resend of its request gets it
    /// again instead of acting twice.
    pub(super) fn remember(&mut self, reply: &ClientReply, now_us: u64) {
        let k = self.recent.insert(
            &reply.request_id,
            &reply.body,
            now_us + REQUEST_DEDUP.as_micros() as u64,
            REQUEST_DEDUP_MAX,
        );
        self.persist_reply(k);
    }

    /// Configure, pause, resume and purge: from a client or a peer alike.
    pub(super) fn queue_command(
        &mut self,
        command: ClientCommand,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        match command {
            ClientCommand::ConfigureQueue { queue, config } => {
                self.configure(&queue, config, now_us, out)
            }
            ClientCommand::PauseQueue { queue } => {
                self.queue_mut(&queue, now_us).paused = true;
                self.persist_queue(&queue);
                ReplyBody::Queue {
                    queue: self.queue_info(&queue, now_us),
                }
            }
            ClientCommand::ResumeQueue { queue } => {
                self.queue_mut(&queue, now_us).paused = false;
                self.persist_queue(&queue);
                self.pump(&queue, now_us, out);
                ReplyBody::Queue {
                    queue: self.queue_info(&queue, now_us),
                }
            }
            ClientCommand::PurgeQueue { queue } => {
                let removed = self.purge(&queue, now_us, out);
                ReplyBody::Purged { queue, removed }
            }
            _ => error(ErrorCode::BadRequest, "not a queue command"),
        }
    }

    pub(super) fn expire_requests(&mut self, now_us: u64) {
        self.recent.expire(now_us);
    }

    /// The queue, created with the defaults on first use.
    pub(super) fn queue_mut(&mut self, name: &str, now_us: u64) -> &mut Queue {
        let defaults = &self.config.queue_defaults;
        let share = self.cluster.share();
        self.queues.entry(name.to_string()).or_insert_with(|| {
            let mut q = Queue::new(defaults.clone(), now_us);
            q.share = share;
            q
        })
    }

    /// Validates a task for `queue`, with the queue's default timeout.
    #[allow(clippy::result_large_err)] // the error is the reply itself, sent at once
    pub(super) fn check(
        &mut self,
        queue: &str,
        spec: TaskSpec,
        now_us: u64,
    ) -> Result<ValidTask, ReplyBody> {
        // Read, not created: a queue is made only by a task stored in it.
        let default_timeout = self
            .queues
            .get(queue)
            .map_or(self.config.queue_defaults.timeout, |q| q.config.timeout);
        let urls = &self.urls;
        let mut t = validate_known(queue, spec, micros_to_secs(now_us), default_timeout, |u| {
            urls.contains(u)
        })
        .map_err(|reason| error(ErrorCode::BadRequest, reason))?;
        self.intern(&mut t);
        Ok(t)
    }

    /// The answer to a task whose name or idempotency key is taken.
    pub(super) fn duplicate_of(&self, spec: &ValidTask, now_us: u64) -> Option<ReplyBody> {
        for key in &task_keys(spec) {
            let Some(e) = self.queues.get(&*spec.queue).and_then(|q| q.keys.get(key)) else {
                continue;
            };
            let live = self.tasks.get(&e.id).is_some_and(|t| !t.state.is_final());
            if live {
                return Some(ReplyBody::Duplicate {
                    id: e.id.to_string(),
                    tombstoned: false,
                });
            }
            if e.tombstone_until.is_some_and(|u| u > now_us) {
                return Some(ReplyBody::Duplicate {
                    id: e.id.to_string(),
                    tombstoned: true,
                });
            }
        }
        None
    }

    /// Enqueues here and answers at once: every enqueue of a single node,
    /// and the callbacks of finished tasks in a cluster. In a cluster the
    /// copies still go to the task's other holders, without waiting for
    /// their acknowledgements (so the answer says one replica).
    pub(super) fn enqueue(
        &mut self,
        queue: &str,
        spec: TaskSpec,
        is_callback: bool,
        now_us: u64,
    ) -> ReplyBody {
        let spec = match self.check(queue, spec, now_us) {
            Ok(t) => t,
            Err(reply) => return reply,
        };
        if let Some(dup) = self.duplicate_of(&spec, now_us) {
            return dup;
        }
        let id = self.ids.next_id();
        let reply = ReplyBody::Enqueued {
            id: id.to_string(),
            queue: spec.queue.to_string(),
            eta: spec.eta,
            result: None,
            replicas: 1,
        };
        let holders = self.copy_unacknowledged(id, &spec, is_callback, now_us);
        self.insert_task(id, spec, is_callback, now_us, holders);
        self.count(id, |c| c.enqueued += 1);
        reply
    }

    pub(super) fn configure(
        &mut self,
        queue: &str,
        patch: QueueConfigPatch,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        let q = self.queue_mut(queue, now_us);
        let mut config = q.config.clone();
        if let Err(reason) = queues::apply_patch(&mut config, patch) {
            return error(ErrorCode::BadRequest, reason);
        }
        q.set_config(config);
        self.persist_queue(queue);
        self.pump(queue, now_us, out);
        ReplyBody::Queue {
            queue: self.queue_info(queue, now_us),
        }
    }

    pub(super) fn find(&self, queue: &str, id: &str) -> Option<Uuid> {
        let id = Uuid::parse_str(id).ok()?;
        let t = self.tasks.get(&id)?;
        (*t.spec.queue == *queue).then_some(id)
    }
}
