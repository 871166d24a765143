//! Admitting and routing requests: a client's request is checked (its
//! request id, the deduplication of resends, its queue name), then routed
//! to this node's tasks, to the peers that hold the task, or to every
//! peer (queue commands); enqueues are validated here before the
//! lifecycle stores them.

use super::*;

impl Store {
    pub(super) fn request(
        &mut self,
        identity: &[u8],
        mut req: ClientRequest,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> Option<ClientReply> {
        let request_id = req.request_id;
        if !(1..=MAX_REQUEST_ID_BYTES).contains(&request_id.len()) {
            return Some(ClientReply {
                request_id,
                body: error(
                    ErrorCode::BadRequest,
                    format!("request_id must be 1 to {MAX_REQUEST_ID_BYTES} bytes"),
                ),
            });
        }
        let mutating = !matches!(
            req.command,
            ClientCommand::Get { .. }
                | ClientCommand::Ping
                | ClientCommand::ListTasks { .. }
                | ClientCommand::GetQueue { .. }
                | ClientCommand::ListQueues
        );
        if mutating {
            let queue = command_queue(&req.command).unwrap_or("");
            if let Some(body) = self.recent.get(&request_id, queue) {
                self.stats.duplicate_requests += 1;
                return Some(ClientReply { request_id, body });
            }
        }
        if let Some(queue) = command_queue(&req.command) {
            if let Err(rule) = protocol::limits::check_queue_name(queue) {
                return Some(ClientReply {
                    request_id,
                    body: error(ErrorCode::BadRequest, rule),
                });
            }
        }
        let mut deferred = false;
        if self.cluster.is_clustered() {
            let stores = match &req.command {
                ClientCommand::Enqueue { .. } => true,
                ClientCommand::EnqueueBatch { tasks, .. } => tasks.len() <= MAX_BATCH,
                _ => false,
            };
            // A resend while the first copies still wait for their holders:
            // the first one's answer will do.
            if stores && self.store_pending_for(&request_id) {
                self.stats.duplicate_requests += 1;
                return None;
            }
            match req.command {
                ClientCommand::Enqueue { queue, task, wait } => {
                    let r = self.enqueue_replicated(
                        identity,
                        &request_id,
                        &queue,
                        task,
                        wait,
                        None,
                        now_us,
                    );
                    return r.map(|body| ClientReply { request_id, body });
                }
                ClientCommand::EnqueueBatch { queue, tasks } if tasks.len() <= MAX_BATCH => {
                    self.enqueue_batch_replicated(identity, &request_id, &queue, tasks, now_us);
                    return None;
                }
                command => req.command = command,
            }
            match &req.command {
                ClientCommand::Get { queue, id }
                | ClientCommand::Cancel { queue, id }
                | ClientCommand::Run { queue, id }
                    if self.find(queue, id).is_none() =>
                {
                    self.forward(identity, &request_id, req.command.clone(), now_us);
                    return None;
                }
                ClientCommand::ConfigureQueue { .. }
                | ClientCommand::PauseQueue { .. }
                | ClientCommand::ResumeQueue { .. }
                | ClientCommand::PurgeQueue { .. } => self.broadcast(req.command.clone()),
                _ => {}
            }
        }
        let body = match req.command {
            ClientCommand::Enqueue { queue, task, wait } => {
                let body = self.enqueue(&queue, task, false, now_us);
                if let (Some(wait), ReplyBody::Enqueued { id, eta, .. }) = (wait, &body) {
                    if wait.is_finite() && wait > 0.0 {
                        if let Ok(uid) = Uuid::parse_str(id) {
                            let until = now_us + secs_to_micros(wait.min(MAX_WAIT_SECS));
                            let timer = self.add_timer(until, Timer::Wait(uid));
                            self.waiters.entry(uid).or_default().push(Waiter {
                                identity: identity.to_vec(),
                                request_id: request_id.clone(),
                                queue: queue.clone(),
                                eta: *eta,
                                replicas: 1,
                                timer,
                            });
                            deferred = true;
                        }
                    }
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
            ClientCommand::Get { queue, id } => match self.find(&queue, &id) {
                Some(uid) => ReplyBody::Task {
                    task: self.info(uid, true),
                },
                None => not_found(&queue, &id),
            },
            ClientCommand::Run { queue, id } => self.run(&queue, &id, now_us, out),
            ClientCommand::ListTasks {
                queue,
                state,
                limit,
                cursor,
                full,
            } => self.list_tasks(&queue, state, limit, cursor, full),
            ClientCommand::GetQueue { queue } => ReplyBody::Queue {
                queue: self.queue_info(&queue, now_us),
            },
            ClientCommand::ListQueues => {
                let mut names: Vec<String> = self.queues.keys().cloned().collect();
                names.sort();
                ReplyBody::Queues {
                    queues: names.iter().map(|n| self.queue_info(n, now_us)).collect(),
                }
            }
            cmd @ (ClientCommand::ConfigureQueue { .. }
            | ClientCommand::PauseQueue { .. }
            | ClientCommand::ResumeQueue { .. }
            | ClientCommand::PurgeQueue { .. }) => self.queue_command(cmd, now_us, out),
            ClientCommand::ClusterInfo => error(
                ErrorCode::Internal,
                "cluster_info is answered by the I/O loop",
            ),
            ClientCommand::Ping => ReplyBody::Pong {
                node: self.config.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        };
        let reply = ClientReply { request_id, body };
        if mutating {
            self.recent.insert(
                &reply.request_id,
                &reply.body,
                now_us + REQUEST_DEDUP.as_micros() as u64,
                REQUEST_DEDUP_MAX,
            );
        }
        (!deferred).then_some(reply)
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
                ReplyBody::Queue {
                    queue: self.queue_info(&queue, now_us),
                }
            }
            ClientCommand::ResumeQueue { queue } => {
                self.queue_mut(&queue, now_us).paused = false;
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
        let share = self.cluster.members.len().max(1) as u32;
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
        let default_timeout = self.queue_mut(queue, now_us).config.timeout;
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

    /// Enqueues on this node alone (no replication): callbacks, batches'
    /// local copy, and every enqueue of a single-node cluster.
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
        let holders = self.cluster.holders_for(&placement_key(&spec, id));
        // Copies for the other holders, acknowledged later (asynchronously);
        // a single node builds no record at all.
        if !holders.is_empty() {
            let store = PeerMessage::Store {
                req: 0,
                from: self.cluster.me,
                record: new_record(id, &spec, is_callback, now_us, holders.clone()),
                check: true,
            };
            self.send_to_others(&holders, store);
        }
        self.insert_task(id, spec, is_callback, now_us, holders);
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
