//! Timers: a task's own timer (fire a pending task, or forget a finished
//! one) in a min-heap with lazy deletion, and every other timer (queue
//! wake-ups, waits, tombstones, peer requests) in a `BTreeMap`;
//! [`Store::fire_due`] fires what is due.

use super::*;

pub(super) enum Timer {
    /// A queue waiting for a token or for its 429/503 slow-down to end.
    Wake(String),
    /// An enqueue's `wait` ran out.
    Wait(Uuid),
    /// A name or idempotency key's tombstone may have expired (boxed: rare,
    /// and it would make every timer entry larger).
    Tombstone(Box<(String, KeyKind, String)>),
    /// A request to peers ran out of time.
    Pending(u64),
}

impl Store {
    /// When the earliest timer fires, in unix µs.
    pub fn next_deadline(&self) -> Option<u64> {
        let task = self.task_timers.peek().map(|Reverse((at, _))| *at);
        let other = self.timers.keys().next().map(|k| k.0);
        match (task, other) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires every timer due at `now_us`.
    pub fn fire_due(&mut self, now_us: u64, out: &mut Vec<Event>) {
        let mut touched: BTreeSet<String> = BTreeSet::new();
        loop {
            let task_at = self.task_timers.peek().map(|Reverse((at, _))| *at);
            let other_at = self.timers.keys().next().map(|k| k.0);
            if let Some(at) = task_at.filter(|&a| a <= now_us && other_at.is_none_or(|o| a <= o)) {
                let Some(Reverse((_, id))) = self.task_timers.pop() else {
                    break;
                };
                let Some(task) = self.tasks.get_mut_quiet(&id) else {
                    continue;
                };
                if !task.timed || task.fire_at_us != at {
                    continue; // stale: cleared or moved since
                }
                task.timed = false;
                if task.state.is_final() {
                    if task.state != TaskState::Failed {
                        self.remove_task(id, out);
                    }
                    continue;
                }
                // Scheduled or Retrying: due. Join the ready line.
                task.in_ready = true;
                let queue = task.spec.queue.to_string();
                if let Some(q) = self.queues.get_mut(&queue) {
                    q.ready.push_back(id);
                }
                touched.insert(queue);
                continue;
            }
            if other_at.is_none_or(|o| o > now_us) {
                break;
            }
            let Some((key, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Wake(queue) => {
                    if let Some(q) = self.queues.get_mut(&queue) {
                        if q.wake == Some(key) {
                            q.wake = None;
                        }
                    }
                    touched.insert(queue);
                }
                Timer::Wait(id) => {
                    if let Some(list) = self.waiters.get_mut(&id) {
                        if let Some(pos) = list.iter().position(|w| w.timer == key) {
                            let w = list.remove(pos);
                            out.push(waiter_reply(w, id, None));
                        }
                        if list.is_empty() {
                            self.waiters.remove(&id);
                        }
                    }
                }
                Timer::Pending(req) => self.pending_expired(req, now_us, out),
                Timer::Tombstone(t) => {
                    let (queue, kind, name) = *t;
                    if let Some(q) = self.queues.get_mut(&queue) {
                        let k = (kind, name);
                        let expired = q.keys.get(&k).is_some_and(|e| {
                            // A re-run dead letter is live again: keep its name.
                            let live = self.tasks.get(&e.id).is_some_and(|t| !t.state.is_final());
                            !live && e.tombstone_until.is_some_and(|until| until <= now_us)
                        });
                        if expired {
                            q.keys.remove(&k);
                        }
                    }
                }
            }
        }
        for queue in touched {
            self.pump(&queue, now_us, out);
        }
        self.expire_requests(now_us);
        self.sweep_queues(now_us);
        out.append(&mut self.outbox);
    }

    pub(super) fn set_wake(&mut self, queue: &str, at_us: u64) {
        let current = self.queues.get(queue).and_then(|q| q.wake);
        if current.is_some_and(|k| k.0 <= at_us) {
            return;
        }
        if let Some(k) = current {
            self.timers.remove(&k);
        }
        let key = self.add_timer(at_us, Timer::Wake(queue.to_string()));
        if let Some(q) = self.queues.get_mut(queue) {
            q.wake = Some(key);
        }
    }

    /// Clears a task's timer (its heap entry goes stale).
    pub(super) fn clear_timer(&mut self, id: Uuid) {
        if let Some(t) = self.tasks.get_mut_quiet(&id) {
            t.timed = false;
        }
    }

    pub(super) fn add_timer(&mut self, at_us: u64, timer: Timer) -> (u64, u64) {
        self.seq += 1;
        let key = (at_us, self.seq);
        self.timers.insert(key, timer);
        key
    }

    /// Sets a task's timer to `at_us`, which becomes its `fire_at_us`.
    pub(super) fn set_task_timer(&mut self, id: Uuid, at_us: u64) {
        let Some(t) = self.tasks.get_mut_quiet(&id) else {
            return;
        };
        t.fire_at_us = at_us;
        t.timed = true;
        self.task_timers.push(Reverse((at_us, id)));
        self.sweep_task_timers();
    }

    /// Drops stale heap entries once they outnumber the tasks (after many
    /// moves, or a purge).
    pub(super) fn sweep_task_timers(&mut self) {
        if self.task_timers.len() > 2 * self.tasks.len() + 1024 {
            let tasks = &self.tasks;
            self.task_timers.retain(|Reverse((at, id))| {
                tasks
                    .get(id)
                    .is_some_and(|t| t.timed && t.fire_at_us == *at)
            });
        }
    }
}
