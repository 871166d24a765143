//! The task lifecycle: a task is inserted, dispatched, settled (retried,
//! succeeded, failed), cancelled, run again, purged and removed here.
//! [`Store::transition`] is the only writer of a task's state and of the
//! per-queue counters: every change of state goes through it, which is
//! where the journal will record it.

use super::*;

impl Store {
    /// Moves a task to `to`, keeping its queue's counters right.
    pub(super) fn transition(&mut self, id: Uuid, to: TaskState) {
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        let from = t.state;
        t.state = to;
        if let Some(q) = self.queues.get_mut(&*t.spec.queue) {
            q.count(Some(from), Some(to));
        }
    }

    /// Adds a task to this node's store and sets its timer.
    pub(super) fn insert_task(
        &mut self,
        id: Uuid,
        spec: ValidTask,
        is_callback: bool,
        now_us: u64,
        holders: Vec<u64>,
    ) {
        let due = secs_to_micros(spec.eta);
        let q = self.queue_mut(&spec.queue, now_us);
        for key in task_keys(&spec) {
            q.keys.insert(
                key,
                DedupEntry {
                    id,
                    tombstone_until: None,
                },
            );
        }
        q.index.insert((now_us, id));
        q.count(None, Some(TaskState::Scheduled));
        let replica = self.cluster.replica_index(&holders);
        let fire_at = due + replica as u64 * self.config.replica_offset.as_micros() as u64;
        self.tasks.insert(Box::new(Task {
            id,
            spec,
            created_us: now_us,
            replica,
            state: TaskState::Scheduled,
            fire_at_us: fire_at,
            timed: false,
            attempts: 0,
            executions: 0,
            last_status: None,
            run: None,
            in_ready: false,
            is_callback,
            due_us: due,
            holders: holders.into_boxed_slice(),
        }));
        self.set_task_timer(id, fire_at);
        self.stats.enqueued += 1;
    }

    /// Forgets a task entirely (retention over, or purged).
    pub(super) fn remove_task(&mut self, id: Uuid) {
        self.clear_timer(id);
        let Some(t) = self.tasks.remove(&id) else {
            return;
        };
        self.sweep_task_timers();
        if let Some(q) = self.queues.get_mut(&*t.spec.queue) {
            q.index.removed();
            q.count(Some(t.state), None);
            if q.index.needs_sweep() {
                let (tasks, queue) = (&self.tasks, &t.spec.queue);
                q.index.sweep(|(created, id)| {
                    tasks
                        .get(id)
                        .is_some_and(|t| t.created_us == *created && t.spec.queue == *queue)
                });
            }
        }
    }

    /// Hands ready tasks of `queue` to the dispatcher while its limits allow.
    pub(super) fn pump(&mut self, queue: &str, now_us: u64, out: &mut Vec<Event>) {
        loop {
            let Some(q) = self.queues.get_mut(queue) else {
                return;
            };
            if q.paused {
                return;
            }
            let Some(&id) = q.ready.front() else { return };
            if !self.tasks.get(&id).is_some_and(|t| t.in_ready) {
                q.ready.pop_front();
                continue;
            }
            if now_us < q.slow_until_us {
                let at = q.slow_until_us;
                self.set_wake(queue, at);
                return;
            }
            if !q.has_slot() {
                // A settling delivery frees a slot and pumps again.
                return;
            }
            if let Err(at) = q.take_token(now_us) {
                self.set_wake(queue, at);
                return;
            }
            q.ready.pop_front();
            self.dispatch(id, now_us, out);
        }
    }

    /// Starts an attempt now.
    pub(super) fn dispatch(&mut self, id: Uuid, now_us: u64, out: &mut Vec<Event>) {
        self.clear_timer(id);
        self.transition(id, TaskState::Running);
        let delivery = self.next_delivery;
        self.next_delivery += 1;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.in_ready = false;
        task.set_delivery(Some(delivery));
        if task.first_attempt_us().is_none() {
            task.set_first_attempt_us(Some(now_us));
        }
        let retry_count = task.attempts;
        task.attempts += 1;
        self.stats.dispatched += 1;
        let s = &task.spec;
        let mut signing_secrets = Vec::new();
        if let Some(q) = self.queues.get_mut(&*s.queue) {
            q.running += 1;
            q.record_dispatch(now_us);
            if s.pool() == HTTP_POOL {
                signing_secrets = q.config.signing_secrets.clone();
            }
        }
        let deadline_us = now_us + secs_to_micros(s.timeout()) + CLAIM_GRACE.as_micros() as u64;
        out.push(Event::Dispatch {
            pool: s.pool().to_string(),
            delivery,
            timeout: s.timeout(),
            task: DeliveredTask {
                id: id.to_string(),
                queue: s.queue.to_string(),
                name: s.rare().name.clone(),
                url: s.url.to_string(),
                method: s.method.as_str().to_string(),
                params: s.params(),
                body: s.body().map(|b| ByteBuf::from(b.to_vec())),
                content_type: s.rare().content_type.clone(),
                headers: s.rare().headers.clone(),
                eta: s.eta,
                timeout: s.timeout(),
                retry_count,
                execution_count: task.executions,
                signing_secrets,
            },
        });
        self.publish_for(id, |_| EventBody::Claimed {
            id: id.to_string(),
            deadline_us,
        });
    }

    pub(super) fn cancel(
        &mut self,
        queue: &str,
        id_str: &str,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        let Some(id) = self.find(queue, id_str) else {
            return not_found(queue, id_str);
        };
        let Some(task) = self.tasks.get_mut(&id) else {
            return not_found(queue, id_str);
        };
        match task.state {
            TaskState::Succeeded => {
                return error(
                    ErrorCode::NotFound,
                    format!("task {id_str} already succeeded"),
                )
            }
            TaskState::Cancelled => {
                return ReplyBody::Cancelled {
                    id: id_str.to_string(),
                }
            }
            _ => {}
        }
        let was_running = task.state == TaskState::Running;
        if let (true, Some(delivery)) = (was_running, task.delivery()) {
            out.push(Event::Revoke { delivery });
        }
        task.set_delivery(None);
        task.in_ready = false;
        if was_running {
            if let Some(q) = self.queues.get_mut(queue) {
                q.running = q.running.saturating_sub(1);
            }
        }
        self.transition(id, TaskState::Cancelled);
        self.stats.cancelled += 1;
        self.finish(id, now_us, out);
        self.publish_finished(id);
        self.answer_waiters(id, None, out);
        if was_running {
            self.pump(queue, now_us, out);
        }
        ReplyBody::Cancelled {
            id: id_str.to_string(),
        }
    }

    pub(super) fn run(
        &mut self,
        queue: &str,
        id_str: &str,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        let Some(id) = self.find(queue, id_str) else {
            return not_found(queue, id_str);
        };
        let state = self.tasks.get(&id).map(|t| t.state);
        match state {
            Some(TaskState::Scheduled | TaskState::Retrying | TaskState::Failed) => {
                self.dispatch(id, now_us, out);
                ReplyBody::Task {
                    task: self.info(id, false),
                }
            }
            Some(s) => error(
                ErrorCode::Conflict,
                format!("task {id_str} is {} and cannot be run", s.as_str()),
            ),
            None => not_found(queue, id_str),
        }
    }

    pub(super) fn settle(
        &mut self,
        task_id: &str,
        delivery: u64,
        v: Verdict,
        now_us: u64,
        out: &mut Vec<Event>,
    ) {
        let Some(id) = Uuid::parse_str(task_id).ok() else {
            self.stats.stale_results += 1;
            return;
        };
        let Some(task) = self.tasks.get_mut(&id) else {
            self.stats.stale_results += 1;
            return;
        };
        if task.state != TaskState::Running || task.delivery() != Some(delivery) {
            self.stats.stale_results += 1;
            return;
        }
        task.set_delivery(None);
        task.last_status = v.status;
        task.set_last_response(v.body.clone().map(|mut b| {
            b.truncate(MAX_RESPONSE_BYTES);
            b
        }));
        if v.responded {
            task.executions += 1;
        }
        let queue = task.spec.queue.to_string();
        let attempts = task.attempts;
        let age =
            Duration::from_micros(now_us.saturating_sub(task.first_attempt_us().unwrap_or(now_us)));
        let attempt = AttemptResult {
            outcome: v.outcome,
            status: v.status,
            body: task.last_response().map(ByteBuf::from),
            error: if v.outcome == Outcome::Failure {
                Some(v.reason.clone().unwrap_or_else(|| failure_text(v.status)))
            } else {
                None
            },
        };
        let Some(q) = self.queues.get_mut(&queue) else {
            return;
        };
        q.running = q.running.saturating_sub(1);
        let policy = q.policy.clone();
        match v.outcome {
            Outcome::Success => {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.set_last_error(None);
                }
                self.transition(id, TaskState::Succeeded);
                self.stats.succeeded += 1;
                self.finish(id, now_us, out);
                self.publish_finished(id);
                self.callback(id, true, now_us);
            }
            Outcome::Failure => {
                if matches!(v.status, Some(429) | Some(503)) {
                    let hold = v
                        .retry_after
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .map(Duration::from_secs_f64)
                        .unwrap_or(Duration::from_secs(1))
                        .min(MAX_QUEUE_SLOWDOWN);
                    q.slow_until_us = q.slow_until_us.max(now_us + hold.as_micros() as u64);
                }
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.set_last_error(attempt.error.clone());
                }
                if !v.no_retry && policy.allows_another(attempts, age) {
                    let delay = policy.next_delay(attempts, v.retry_after);
                    let at = now_us + delay.as_micros() as u64;
                    self.transition(id, TaskState::Retrying);
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.due_us = at;
                    }
                    self.stats.retried += 1;
                    self.retime(id);
                    self.publish_for(id, |t| EventBody::Retry {
                        id: id.to_string(),
                        attempts: t.attempts,
                        executions: t.executions,
                        due_us: at,
                        last_status: t.last_status,
                        last_error: t.last_error(),
                        response: t.last_response().map(ByteBuf::from),
                    });
                } else {
                    self.transition(id, TaskState::Failed);
                    self.stats.failed += 1;
                    self.finish(id, now_us, out);
                    self.publish_finished(id);
                    self.callback(id, false, now_us);
                }
            }
        }
        self.answer_waiters(id, Some(attempt), out);
        self.pump(&queue, now_us, out);
    }

    /// A task became final: retention timer (not for dead letters, which
    /// are kept) and tombstones for its name and idempotency key.
    pub(super) fn finish(&mut self, id: Uuid, now_us: u64, _out: &mut Vec<Event>) {
        let Some(t) = self.tasks.get(&id) else { return };
        let state = t.state;
        let queue = t.spec.queue.to_string();
        let keys = task_keys(&t.spec);
        let (retention, dedup) = match self.queues.get(&queue) {
            Some(q) => (q.config.retention, q.config.dedup_window),
            None => (3600.0, 3600.0),
        };
        if state == TaskState::Failed {
            self.clear_timer(id);
        } else {
            self.set_task_timer(id, now_us + secs_to_micros(retention));
        }
        let until = now_us + secs_to_micros(dedup);
        for key in keys {
            let owned = self
                .queues
                .get(&queue)
                .and_then(|q| q.keys.get(&key))
                .is_some_and(|e| e.id == id);
            if !owned {
                continue;
            }
            if dedup <= 0.0 {
                if let Some(q) = self.queues.get_mut(&queue) {
                    q.keys.remove(&key);
                }
                continue;
            }
            if let Some(e) = self
                .queues
                .get_mut(&queue)
                .and_then(|q| q.keys.get_mut(&key))
            {
                e.tombstone_until = Some(until);
            }
            self.add_timer(
                until,
                Timer::Tombstone(Box::new((queue.clone(), key.0, key.1))),
            );
        }
    }

    /// Enqueues the JSON report of a finished task to its callback URL.
    pub(super) fn callback(&mut self, id: Uuid, succeeded: bool, now_us: u64) {
        let Some(t) = self.tasks.get(&id) else { return };
        if t.is_callback {
            return;
        }
        let url = if succeeded {
            t.spec.rare().callback_url.clone()
        } else {
            t.spec.rare().failure_callback_url.clone()
        };
        let Some(url) = url else { return };
        let report = serde_json::json!({
            "task_id": id.to_string(),
            "queue": &*t.spec.queue,
            "name": t.spec.name(),
            "url": &*t.spec.url,
            "status": if succeeded { "succeeded" } else { "failed" },
            "attempts": t.attempts,
            "last_status": t.last_status,
            "last_error": t.last_error(),
            "response_body": t.last_response_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
        });
        let queue = t.spec.queue.to_string();
        let spec = TaskSpec {
            url,
            body: Some(ByteBuf::from(report.to_string().into_bytes())),
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        if let ReplyBody::Error { reason, .. } = self.enqueue(&queue, spec, true, now_us) {
            tracing::warn!(task = %id, %reason, "callback could not be enqueued");
        }
    }

    pub(super) fn answer_waiters(
        &mut self,
        id: Uuid,
        result: Option<AttemptResult>,
        out: &mut Vec<Event>,
    ) {
        if let Some(list) = self.waiters.remove(&id) {
            for w in list {
                self.timers.remove(&w.timer);
                out.push(waiter_reply(w, id, result.clone()));
            }
        }
    }

    pub(super) fn purge(&mut self, queue: &str, now_us: u64, out: &mut Vec<Event>) -> u64 {
        let Some(q) = self.queues.get(queue) else {
            return 0;
        };
        let ids: Vec<Uuid> = q
            .index
            .after(None)
            .take_while(|(created, _)| *created <= now_us)
            .map(|(_, id)| id)
            .collect();
        let mut removed = 0;
        for id in ids {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if let (TaskState::Running, Some(delivery)) = (t.state, t.delivery()) {
                out.push(Event::Revoke { delivery });
                if let Some(q) = self.queues.get_mut(queue) {
                    q.running = q.running.saturating_sub(1);
                }
            }
            // No tombstones: the names are free again at once.
            let keys = task_keys(&t.spec);
            if let Some(q) = self.queues.get_mut(queue) {
                for key in keys {
                    if q.keys.get(&key).is_some_and(|e| e.id == id) {
                        q.keys.remove(&key);
                    }
                }
            }
            self.answer_waiters(id, None, out);
            self.remove_task(id);
            removed += 1;
        }
        self.pump(queue, now_us, out);
        removed
    }
}
