//! The task lifecycle: a task is inserted, dispatched, settled (retried,
//! succeeded, failed), cancelled, run again, purged and removed here.
//!
//! [`Store::change`] is the only writer of a task's state, of the task
//! table's membership and of the per-queue counters (tasks per state,
//! deliveries running): every change goes through it, which is where the
//! journal will record it. Leaving `Running` other than by settling
//! revokes the delivery under way there, and only there.

use super::*;

/// A change in a task's life, as [`Store::change`] applies it.
pub(super) enum Change {
    /// A new task enters the store in the state it carries.
    Insert(Box<Task>),
    /// The task moves to another state.
    To(TaskState),
    /// The task leaves the store (retention over, purged, discarded).
    Remove,
}

impl Store {
    /// Applies `change` to task `id`: the one writer of task states and of
    /// the counters that follow them (see the module's comment). Returns
    /// the task a [`Change::Remove`] took out.
    pub(super) fn change(
        &mut self,
        id: Uuid,
        change: Change,
        out: &mut Vec<Event>,
    ) -> Option<Box<Task>> {
        let mut removed = None;
        let (queue, from, to, delivery) = match change {
            Change::Insert(task) => {
                let (queue, to) = (task.spec.queue.clone(), task.state);
                self.task_bytes += task.footprint();
                self.tasks.insert(task);
                (queue, None, Some(to), None)
            }
            Change::To(to) => {
                let t = self.tasks.get_mut(&id)?;
                let from = t.state;
                t.state = to;
                if !matches!(to, TaskState::Scheduled | TaskState::Retrying) {
                    t.in_ready = false;
                }
                // A delivery still set when leaving `Running` was not
                // settled: it is abandoned.
                let delivery = if from == TaskState::Running && to != TaskState::Running {
                    let d = t.delivery();
                    t.set_delivery(None);
                    d
                } else {
                    None
                };
                (t.spec.queue.clone(), Some(from), Some(to), delivery)
            }
            Change::Remove => {
                let t = self.tasks.remove(&id)?;
                self.persist_removed(&t);
                self.task_bytes = self.task_bytes.saturating_sub(t.footprint());
                let delivery = (t.state == TaskState::Running)
                    .then(|| t.delivery())
                    .flatten();
                let r = (t.spec.queue.clone(), Some(t.state), None, delivery);
                removed = Some(t);
                r
            }
        };
        if let Some(delivery) = delivery {
            out.push(Event::Revoke { delivery });
        }
        if let Some(changes) = &mut self.changes {
            changes.push(TaskChange {
                id,
                queue: queue.clone(),
                state: to,
            });
        }
        if let Some(q) = self.queues.get_mut(&*queue) {
            q.count(from, to);
            if from == Some(TaskState::Running) && to != Some(TaskState::Running) {
                q.running = q.running.saturating_sub(1);
            }
            if to == Some(TaskState::Running) && from != Some(TaskState::Running) {
                q.running += 1;
            }
        }
        removed
    }

    /// Counts something that happened to task `id` in its queue's counters.
    pub(super) fn count(&mut self, id: Uuid, f: impl FnOnce(&mut crate::queues::Counters)) {
        let Some(t) = self.tasks.get(&id) else { return };
        let queue = t.spec.queue.clone();
        if let Some(q) = self.queues.get_mut(&*queue) {
            f(&mut q.counters);
        }
    }

    /// Moves a task to `to` (see [`Store::change`]).
    pub(super) fn transition(&mut self, id: Uuid, to: TaskState, out: &mut Vec<Event>) {
        self.change(id, Change::To(to), out);
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
        let replica = self.cluster.replica_index(&holders);
        let fire_at = due + replica as u64 * self.config.replica_offset.as_micros() as u64;
        let task = Box::new(Task {
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
        });
        // An insert revokes nothing: no event to collect.
        self.change(id, Change::Insert(task), &mut Vec::new());
        self.set_task_timer(id, fire_at);
        self.stats.enqueued += 1;
    }

    /// Forgets a task entirely (retention over, purged or discarded); a
    /// delivery under way is revoked.
    pub(super) fn remove_task(&mut self, id: Uuid, out: &mut Vec<Event>) {
        self.clear_timer(id);
        let Some(t) = self.change(id, Change::Remove, out) else {
            return;
        };
        self.sweep_task_timers();
        if let Some(q) = self.queues.get_mut(&*t.spec.queue) {
            q.index.removed();
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
        if let Some(t) = self.tasks.get(&id) {
            let late = now_us.saturating_sub(t.fire_at_us);
            self.lateness.observe(late as f64 / 1e6);
        }
        self.clear_timer(id);
        self.transition(id, TaskState::Running, out);
        let delivery = self.next_delivery;
        self.next_delivery += 1;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.set_delivery(Some(delivery));
        if task.first_attempt_us().is_none() {
            task.set_first_attempt_us(Some(now_us));
        }
        task.attempts += 1;
        self.stats.dispatched += 1;
        let timeout = task.spec.timeout();
        let mut signing_secrets = Vec::new();
        if let Some(q) = self.queues.get_mut(&*task.spec.queue) {
            q.record_dispatch(now_us);
            if task.spec.pool() == HTTP_POOL {
                signing_secrets = q.config.signing_secrets.clone();
            }
        }
        let deadline_us = now_us + secs_to_micros(timeout) + CLAIM_GRACE.as_micros() as u64;
        tracing::debug!(task = %id, replica = task.replica, holders = ?task.holders, attempt = task.attempts, "dispatching");
        out.push(Event::Dispatch {
            pool: task.spec.pool().to_string(),
            delivery,
            timeout,
            task: views::delivered_task(task, signing_secrets),
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
        self.transition(id, TaskState::Cancelled, out);
        self.stats.cancelled += 1;
        self.count(id, |c| c.cancelled += 1);
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

    /// A worker's verdict on delivery `delivery` of task `task_id`: the
    /// attempt is recorded, then the task succeeds, retries or fails, and
    /// the queue's next tasks may go.
    pub(super) fn settle(
        &mut self,
        task_id: &str,
        delivery: u64,
        v: Verdict,
        now_us: u64,
        out: &mut Vec<Event>,
    ) {
        let Some(id) = self.settling(task_id, delivery) else {
            self.stats.stale_results += 1;
            return;
        };
        let Some((queue, attempt)) = self.record_attempt(id, &v) else {
            return;
        };
        match v.outcome {
            Outcome::Success => self.succeed(id, now_us, out),
            Outcome::Failure => {
                if matches!(v.status, Some(429) | Some(503)) {
                    self.slow_down(&queue, v.retry_after, now_us);
                }
                self.failed_attempt(id, &v, now_us, out);
            }
        }
        self.answer_waiters(id, Some(attempt), out);
        self.pump(&queue, now_us, out);
    }

    /// The task whose delivery `delivery` a verdict settles, if that
    /// delivery is still the one under way (else the verdict is stale).
    fn settling(&mut self, task_id: &str, delivery: u64) -> Option<Uuid> {
        let id = Uuid::parse_str(task_id).ok()?;
        let task = self.tasks.get_mut(&id)?;
        if task.state != TaskState::Running || task.delivery() != Some(delivery) {
            return None;
        }
        // Settled, so not revoked by the transition that follows.
        task.set_delivery(None);
        Some(id)
    }

    /// Records an attempt's answer on the task; returns its queue and the
    /// attempt as a held enqueue's reply shows it.
    fn record_attempt(&mut self, id: Uuid, v: &Verdict) -> Option<(Arc<String>, AttemptResult)> {
        let task = self.tasks.get_mut(&id)?;
        task.last_status = v.status;
        let kept = task.set_last_response(v.body.clone().map(|mut b| {
            b.truncate(MAX_RESPONSE_BYTES);
            b
        }));
        if v.responded {
            task.executions += 1;
        }
        let error = (v.outcome == Outcome::Failure)
            .then(|| v.reason.clone().unwrap_or_else(|| failure_text(v.status)));
        task.set_last_error(error.clone());
        let attempt = AttemptResult {
            outcome: v.outcome,
            status: v.status,
            body: task.last_response().map(ByteBuf::from),
            error,
        };
        self.task_bytes = self.task_bytes.saturating_add_signed(kept);
        Some((task.spec.queue.clone(), attempt))
    }

    /// A 429 or 503 holds the whole queue back for its `Retry-After` (1 s
    /// without one, [`MAX_QUEUE_SLOWDOWN`] at most).
    fn slow_down(&mut self, queue: &str, retry_after: Option<f64>, now_us: u64) {
        // A worker's or a target's number: through the one gate (a
        // `Retry-After` of 1e20 s panicked the scheduler here once).
        let hold = retry_after
            .filter(|s| !s.is_nan() && *s > 0.0)
            .map(|s| protocol::limits::clamp_secs(s, MAX_QUEUE_SLOWDOWN))
            .unwrap_or(Duration::from_secs(1));
        if let Some(q) = self.queues.get_mut(queue) {
            q.slow_until_us = q.slow_until_us.max(now_us + hold.as_micros() as u64);
        }
    }

    fn succeed(&mut self, id: Uuid, now_us: u64, out: &mut Vec<Event>) {
        self.transition(id, TaskState::Succeeded, out);
        self.stats.succeeded += 1;
        self.count(id, |c| c.succeeded += 1);
        self.finish(id, now_us, out);
        self.publish_finished(id);
        self.callback(id, true, now_us);
    }

    /// A failed attempt: another one later if the queue's policy allows,
    /// else the task is dead-lettered (kept as failed).
    fn failed_attempt(&mut self, id: Uuid, v: &Verdict, now_us: u64, out: &mut Vec<Event>) {
        let Some(t) = self.tasks.get(&id) else { return };
        let attempts = t.attempts;
        let age =
            Duration::from_micros(now_us.saturating_sub(t.first_attempt_us().unwrap_or(now_us)));
        let Some(policy) = self.queues.get(&*t.spec.queue).map(|q| q.policy.clone()) else {
            return;
        };
        self.count(id, |c| c.failed_attempts += 1);
        if v.no_retry || !policy.allows_another(attempts, age) {
            self.transition(id, TaskState::Failed, out);
            self.stats.failed += 1;
            self.count(id, |c| c.dead_letters += 1);
            self.finish(id, now_us, out);
            self.publish_finished(id);
            self.callback(id, false, now_us);
            return;
        }
        let at = now_us + policy.next_delay(attempts, v.retry_after).as_micros() as u64;
        self.transition(id, TaskState::Retrying, out);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.due_us = at;
        }
        self.stats.retried += 1;
        self.count(id, |c| c.retried += 1);
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
            if self.tasks.get(&id).is_none() {
                continue;
            }
            // No tombstones: the names are free again at once.
            self.free_keys(id);
            self.answer_waiters(id, None, out);
            self.remove_task(id, out);
            removed += 1;
        }
        self.pump(queue, now_us, out);
        removed
    }

    /// Frees the name and idempotency key that task `id` holds, with no
    /// tombstone (purged, or a copy discarded).
    pub(super) fn free_keys(&mut self, id: Uuid) {
        let Some(t) = self.tasks.get(&id) else { return };
        let Some(q) = self.queues.get_mut(&*t.spec.queue) else {
            return;
        };
        for key in task_keys(&t.spec) {
            if q.keys.get(&key).is_some_and(|e| e.id == id) {
                q.keys.remove(&key);
            }
        }
    }
}
