//! Views: every conversion of a task or a queue into a reply (task info,
//! listings and their cursors, queue figures, a held enqueue's answer).

use super::*;

impl Store {
    /// A task by its queue and id, with its details.
    pub(super) fn get(&self, queue: &str, id: &str) -> ReplyBody {
        match self.find(queue, id) {
            Some(uid) => ReplyBody::Task {
                task: self.info(uid, true),
            },
            None => not_found(queue, id),
        }
    }

    /// Every queue this node knows, by name.
    /// Queues by name, a page at a time: after `cursor` (the last name
    /// of the page before), at most `limit`, cut short to fit
    /// [`protocol::limits::MAX_LIST_REPLY_BYTES`].
    pub(super) fn list_queues(
        &self,
        limit: Option<u32>,
        cursor: Option<String>,
        now_us: u64,
        owned: bool,
    ) -> ReplyBody {
        let limit = limit
            .unwrap_or(protocol::limits::DEFAULT_LIST_LIMIT)
            .clamp(1, protocol::limits::MAX_LIST_LIMIT) as usize;
        let after = cursor.unwrap_or_default();
        let mut names: Vec<&String> = self
            .queues
            .keys()
            .filter(|n| n.as_str() > after.as_str())
            .collect();
        names.sort();
        let mut queues = Vec::new();
        let mut bytes = 0;
        let mut next_cursor = None;
        for name in names {
            let info = self.queue_info_for(name, now_us, owned);
            let size = queue_info_size_bound(&info);
            if page_is_full(queues.len(), limit, bytes, size) {
                next_cursor = queues.last().map(|q: &QueueInfo| q.name.clone());
                break;
            }
            bytes += size;
            queues.push(info);
        }
        ReplyBody::Queues {
            queues,
            next_cursor,
        }
    }

    /// The store's part of the `stats` answer: per queue counters and
    /// gauges (name order, bounded), tasks, memory, dispatch lateness. The
    /// I/O loop adds the workers, the cluster and the journal.
    pub(super) fn node_stats(&self, now_us: u64) -> protocol::NodeStats {
        let mut names: Vec<&String> = self.queues.keys().collect();
        names.sort();
        let left_out = names
            .len()
            .saturating_sub(protocol::limits::MAX_STATS_QUEUES);
        let queues = names
            .into_iter()
            .take(protocol::limits::MAX_STATS_QUEUES)
            .map(|name| {
                let c = self
                    .queues
                    .get(name)
                    .map(|q| q.counters)
                    .unwrap_or_default();
                protocol::QueueCounters {
                    name: name.clone(),
                    enqueued: c.enqueued,
                    succeeded: c.succeeded,
                    failed_attempts: c.failed_attempts,
                    dead_letters: c.dead_letters,
                    cancelled: c.cancelled,
                    retried: c.retried,
                    states: self.queue_info(name, now_us).stats,
                }
            })
            .collect();
        protocol::NodeStats {
            node: self.config.node_id.clone(),
            queues,
            queues_left_out: left_out as u64,
            tasks: self.tasks.len() as u64,
            task_bytes: self.task_bytes,
            dispatch_lateness: self.lateness.clone(),
            ..Default::default()
        }
    }

    /// Whether this node answers for task `t` in a cluster-wide view: the
    /// first of its holders that is still a member is this node (a task
    /// none of whose holders is a member is answered for by every node
    /// holding it, so that it is not missed). On a single node, always.
    fn owns(&self, holders: &[u64]) -> bool {
        if !self.cluster.is_clustered() || holders.is_empty() {
            return true;
        }
        match holders
            .iter()
            .find(|h| self.cluster.members.binary_search(h).is_ok())
        {
            Some(first) => *first == self.cluster.me,
            None => true,
        }
    }

    /// [`Store::queue_info`], with `owned` the figures of only the tasks
    /// this node answers for: one pass over the queue's tasks (the
    /// per-state counts kept as tasks move count every copy).
    pub(super) fn queue_info_for(&self, name: &str, now_us: u64, owned: bool) -> QueueInfo {
        let mut info = self.queue_info(name, now_us);
        if !owned || !self.cluster.is_clustered() {
            return info;
        }
        let Some(q) = self.queues.get(name) else {
            return info;
        };
        let s = &mut info.stats;
        (
            s.scheduled,
            s.running,
            s.retrying,
            s.failed,
            s.succeeded,
            s.cancelled,
        ) = (0, 0, 0, 0, 0, 0);
        for (created, id) in q.index.after(None) {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if t.created_us != created || *t.spec.queue != *name || !self.owns(&t.holders) {
                continue;
            }
            *match t.state {
                TaskState::Scheduled => &mut s.scheduled,
                TaskState::Running => &mut s.running,
                TaskState::Retrying => &mut s.retrying,
                TaskState::Failed => &mut s.failed,
                TaskState::Succeeded => &mut s.succeeded,
                TaskState::Cancelled => &mut s.cancelled,
            } += 1;
        }
        info
    }

    pub(super) fn queue_info(&self, name: &str, now_us: u64) -> QueueInfo {
        let fresh;
        let q = match self.queues.get(name) {
            Some(q) => q,
            None => {
                fresh = Queue::new(self.config.queue_defaults.clone(), now_us);
                &fresh
            }
        };
        let oldest = q
            .ready
            .iter()
            .find(|id| self.tasks.get(id).is_some_and(|t| t.in_ready))
            .and_then(|id| self.tasks.get(id))
            .map(|t| t.fire_at_us);
        let lag = oldest
            .map(|at| micros_to_secs(now_us.saturating_sub(at)))
            .unwrap_or(0.0);
        QueueInfo {
            name: name.to_string(),
            config: queues::redacted(&q.config),
            paused: q.paused,
            stats: q.stats(now_us, lag),
        }
    }

    pub(super) fn list_tasks(
        &self,
        queue: &str,
        state: Option<TaskState>,
        limit: Option<u32>,
        cursor: Option<String>,
        full: bool,
        owned: bool,
    ) -> ReplyBody {
        let limit = limit
            .unwrap_or(protocol::limits::DEFAULT_LIST_LIMIT)
            .clamp(1, protocol::limits::MAX_LIST_LIMIT) as usize;
        let start = match cursor.as_deref() {
            None | Some("") => None,
            Some(c) => match parse_cursor(c) {
                Some(k) => Some(k),
                None => return error(ErrorCode::BadRequest, "invalid cursor"),
            },
        };
        let Some(q) = self.queues.get(queue) else {
            return ReplyBody::Tasks {
                tasks: Vec::new(),
                next_cursor: None,
            };
        };
        let range = q.index.after(start);
        let mut tasks = Vec::new();
        let mut bytes = 0;
        let mut last = None;
        let mut next_cursor = None;
        for (created, id) in range {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if t.created_us != created || *t.spec.queue != *queue {
                continue; // stale entry
            }
            if state.is_some_and(|s| s != t.state) || (owned && !self.owns(&t.holders)) {
                continue;
            }
            // A page full by count ends before the next task is built.
            let entry = (tasks.len() < limit)
                .then(|| self.info(id, full))
                .map(|info| (task_info_size_bound(&info), info))
                .filter(|(size, _)| !page_is_full(tasks.len(), limit, bytes, *size));
            let Some((size, info)) = entry else {
                // More match: the next page starts after the last one returned.
                next_cursor = last.map(|(c, i)| make_cursor(c, i));
                break;
            };
            bytes += size;
            tasks.push(info);
            last = Some((created, id));
        }
        ReplyBody::Tasks { tasks, next_cursor }
    }

    pub(super) fn info(&self, id: Uuid, full: bool) -> TaskInfo {
        let Some(t) = self.tasks.get(&id) else {
            return TaskInfo {
                id: id.to_string(),
                queue: String::new(),
                name: None,
                url: String::new(),
                method: String::new(),
                state: TaskState::Cancelled,
                eta: 0.0,
                attempts: 0,
                executions: 0,
                last_status: None,
                last_error: None,
                created: 0.0,
                replica: 0,
                replica_offset: 0.0,
                first_attempt: None,
                detail: None,
                holders: Vec::new(),
            };
        };
        let s = &t.spec;
        TaskInfo {
            id: id.to_string(),
            queue: s.queue.to_string(),
            name: s.rare().name.clone(),
            url: s.url.to_string(),
            method: s.method.as_str().to_string(),
            state: t.state,
            eta: if t.state.is_final() {
                s.eta
            } else {
                micros_to_secs(t.fire_at_us)
            },
            attempts: t.attempts,
            executions: t.executions,
            last_status: t.last_status,
            last_error: t.last_error(),
            created: micros_to_secs(t.created_us),
            replica: t.replica,
            replica_offset: self.config.replica_offset.as_secs_f64(),
            first_attempt: t.first_attempt_us().map(micros_to_secs),
            detail: full.then(|| TaskDetail {
                params: s.params(),
                body: s.body().map(|b| ByteBuf::from(b.to_vec())),
                content_type: s.rare().content_type.clone(),
                headers: s.rare().headers.clone(),
                timeout: s.timeout(),
                callback_url: s.rare().callback_url.clone(),
                failure_callback_url: s.rare().failure_callback_url.clone(),
                last_response: t.last_response().map(ByteBuf::from),
            }),
            holders: t.holders.to_vec(),
        }
    }
}

pub(super) fn make_cursor(created_us: u64, id: Uuid) -> String {
    format!("{created_us}.{}", id.simple())
}

pub(super) fn parse_cursor(c: &str) -> Option<(u64, Uuid)> {
    let (a, b) = c.split_once('.')?;
    Some((a.parse().ok()?, Uuid::parse_str(b).ok()?))
}

pub(super) fn waiter_reply(w: Waiter, id: Uuid, result: Option<AttemptResult>) -> Event {
    Event::Reply {
        identity: w.identity,
        reply: ClientReply {
            request_id: w.request_id,
            body: ReplyBody::Enqueued {
                id: id.to_string(),
                queue: w.queue,
                eta: w.eta,
                result,
                replicas: w.replicas,
            },
        },
    }
}

/// A task as its worker receives it, for the attempt just started (the
/// attempt is counted already).
pub(super) fn delivered_task(t: &Task, signing_secrets: Vec<String>) -> DeliveredTask {
    let s = &t.spec;
    DeliveredTask {
        id: t.id.to_string(),
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
        retry_count: t.attempts.saturating_sub(1),
        execution_count: t.executions,
        signing_secrets,
    }
}

/// Whether a listing page holding `count` entries of `bytes` (by their
/// size bounds) ends before an entry of `size`: at `limit`, or when it
/// would pass [`protocol::limits::MAX_LIST_REPLY_BYTES`] (the first entry
/// always goes).
fn page_is_full(count: usize, limit: usize, bytes: usize, size: usize) -> bool {
    count == limit || (count > 0 && bytes + size > protocol::limits::MAX_LIST_REPLY_BYTES)
}

/// At least the MessagePack size of a task's entry in a listing: its
/// variable parts plus room for every fixed field and key.
fn task_info_size_bound(t: &TaskInfo) -> usize {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let mut n = 512 + t.id.len() + t.queue.len() + t.url.len() + t.method.len();
    n += text(&t.name) + text(&t.last_error);
    if let Some(d) = &t.detail {
        let bytes = |b: &Option<ByteBuf>| b.as_ref().map_or(0, |b| b.len());
        n += 256 + bytes(&d.body) + bytes(&d.last_response);
        n += text(&d.content_type) + text(&d.callback_url) + text(&d.failure_callback_url);
        let pairs =
            |p: &[(String, String)]| p.iter().map(|(k, v)| k.len() + v.len() + 16).sum::<usize>();
        n += pairs(&d.params) + pairs(&d.headers);
    }
    n
}

/// At least the MessagePack size of a queue's entry in a listing.
fn queue_info_size_bound(q: &QueueInfo) -> usize {
    2048 + q.name.len()
}
