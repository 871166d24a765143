//! The store's cluster side: where tasks live (placement over the
//! roster), copies to the other holders with acknowledgements, events that
//! keep replicas in step (claimed, retry, finished), requests for tasks held
//! elsewhere, and re-replication when members leave.
//!
//! Still sans-IO: peers are reached through [`Event::ToPeer`] and
//! [`Event::Publish`], and their answers come back as commands.
//!
//! The interface the rest of the store uses, and nothing else:
//! * the view of the roster (`self.cluster`): [`ClusterView::is_clustered`],
//!   [`ClusterView::share`] (a queue's limit share) and
//!   [`ClusterView::replica_index`];
//! * for requests (`admit`): `enqueue_replicated`,
//!   `enqueue_batch_replicated`, `store_pending_for`, `forward`,
//!   `broadcast`, and `copy_unacknowledged` for an enqueue answered at once;
//! * for the lifecycle: `publish_for` and `publish_finished` (the events
//!   that keep replicas in step), and `retime`;
//! * commands from the I/O loop: `on_peer`, `on_event`, `on_roster`, and
//!   `pending_expired` for the timers.
//!
//! The state it keeps (`pending`, `pending_ids`, `next_req`) is touched
//! only here.

use super::admit::Held;
use super::*;
use crate::placement::place;
use crate::validate::{Method, Rare, TaskParts};

/// How long an enqueue waits for the other holders' acknowledgements, and
/// a forwarded request for the peers' answers.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// A holder that has not acknowledged its copy this long after the
/// `store` is passed over: the copy goes to the next member in the task's
/// placement order (hinted handoff). Holders on a working network answer
/// in milliseconds; a spurious handoff costs one extra `store` and a
/// `discard` to the slow holder.
pub const HANDOFF_AFTER: Duration = Duration::from_millis(500);
/// A copy enqueued this long ago has had its enqueue decided and answered
/// (decisions take at most [`PEER_TIMEOUT`]; one more second covers the
/// clocks of two hosts): a resend's coordinator told of it defers to it.
pub const DECIDED_AFTER: Duration = Duration::from_secs(3);
/// Margin past a delivery's deadline before another replica may fire.
pub const CLAIM_GRACE: Duration = Duration::from_secs(10);

/// The roster as the store uses it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub me: u64,
    /// Sorted member ids (this node included).
    pub members: Vec<u64>,
    pub replicas: usize,
    /// Sorted ids of members not heard from lately: new tasks are placed
    /// past them (they stay members until the leader removes them).
    pub suspects: Vec<u64>,
}

impl ClusterView {
    /// More than one member: tasks are replicated and events published.
    pub fn is_clustered(&self) -> bool {
        self.members.len() > 1
    }

    /// The holders of a task with this key; empty on a single node.
    pub fn holders_for(&self, key: &str) -> Vec<u64> {
        if !self.is_clustered() {
            return Vec::new();
        }
        place(key, &self.members, self.replicas.max(1))
    }

    /// The holders of a new task with this key: as [`Self::holders_for`],
    /// with suspected members passed over for the next ones in placement
    /// order while enough others are left.
    pub fn holders_for_new(&self, key: &str) -> Vec<u64> {
        if !self.is_clustered() {
            return Vec::new();
        }
        let want = self.replicas.max(1).min(self.members.len());
        let order = place(key, &self.members, self.members.len());
        let mut holders: Vec<u64> = order
            .iter()
            .copied()
            .filter(|m| self.suspects.binary_search(m).is_err())
            .take(want)
            .collect();
        // Fewer members heard from than replicas: the suspects too, in
        // their order, rather than fewer copies asked for.
        for &m in &order {
            if holders.len() >= want {
                break;
            }
            if !holders.contains(&m) {
                holders.push(m);
            }
        }
        // In placement order.
        holders.sort_by_key(|h| order_index(&order, *h));
        holders
    }

    /// How many members share a queue's limits (1 on a single node).
    pub fn share(&self) -> u32 {
        self.members.len().max(1) as u32
    }

    /// This node's replica index among `holders` (0 when it holds alone).
    pub fn replica_index(&self, holders: &[u64]) -> u32 {
        holders
            .iter()
            .position(|h| *h == self.me)
            .unwrap_or(if holders.is_empty() { 0 } else { holders.len() }) as u32
    }
}

fn order_index(order: &[u64], m: u64) -> usize {
    order.iter().position(|o| *o == m).unwrap_or(order.len())
}

/// A request waiting for peers.
pub enum Pending {
    Store(Box<PendingStore>),
    Request(PendingRequest),
    Batch(PendingBatch),
    Copy(PendingCopy),
    Confirm(PendingConfirm),
}

/// A task recovered from the journal, asked about of its other holders
/// before it may fire (`persist`'s `confirm_recovered`).
pub struct PendingConfirm {
    pub(super) id: Uuid,
    pub(super) outstanding: usize,
    /// Whether any holder answered.
    pub(super) answered: bool,
    /// Times the question was sent.
    pub(super) sends: u32,
    pub(super) timer: (u64, u64),
}

/// Times the holders of a recovered task are asked about it, [`PEER_TIMEOUT`]
/// apart, before it fires without their word.
pub const CONFIRM_SENDS: u32 = 4;

/// Times a re-replication copy is sent without an answer before this node
/// gives up on that new holder (the next roster change tries again).
pub const COPY_SENDS: u32 = 3;

/// A re-replication copy waiting for its new holder's `store_result`; sent
/// again after [`PEER_TIMEOUT`], up to [`COPY_SENDS`] times.
pub struct PendingCopy {
    id: Uuid,
    to: u64,
    sends: u32,
    timer: (u64, u64),
}

/// A batch whose tasks wait for their holders: answered when the last
/// task's copies are decided. It has no timer: each task's store has one.
pub struct PendingBatch {
    identity: Vec<u8>,
    request_id: String,
    results: Vec<Option<ReplyBody>>,
    left: usize,
}

/// An enqueue waiting for the other holders.
pub struct PendingStore {
    identity: Vec<u8>,
    request_id: String,
    id: Uuid,
    to: Enqueuing,
    holders: Vec<u64>,
    spec: ValidTask,
    /// Stored here too.
    local: bool,
    /// By holder (ordered, so what follows from them replays exactly).
    answers: BTreeMap<u64, StoreOutcome>,
    timer: (u64, u64),
    /// The placement key, the request key and the enqueue time: what a
    /// handoff needs to place and build the copy again.
    key: String,
    request_key: String,
    created_us: u64,
    /// The handoff was made ([`HANDOFF_AFTER`]); the next expiry decides.
    handed_off: bool,
    /// (silent holder, the member given its place) for each handoff: the
    /// silent ones' answers no longer count.
    replaced: Vec<(u64, u64)>,
}

/// Who asked, under which request id: where a later reply goes.
#[derive(Clone, Copy)]
pub(super) struct Client<'a> {
    pub identity: &'a [u8],
    pub request_id: &'a str,
}

/// What an enqueue in a cluster answers to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Enqueuing {
    /// Its own request, held after storing for `wait` seconds if set.
    Single { wait: Option<f64> },
    /// Place `slot` of the batch pending under key `batch`.
    InBatch { batch: u64, slot: usize },
}

/// A client command forwarded to every peer (the task is held elsewhere).
pub struct PendingRequest {
    identity: Vec<u8>,
    request_id: String,
    outstanding: usize,
    answered: bool,
    timer: (u64, u64),
}

/// The key placement hashes: the name, else the idempotency key, else
/// `otherwise` — the request key of a client's enqueue (so a resend to
/// another coordinator finds the same holders), or the task id.
pub(super) fn placement_key(spec: &ValidTask, otherwise: &str) -> String {
    spec.name()
        .or_else(|| spec.idempotency_key())
        .unwrap_or(otherwise)
        .to_string()
}

/// What identifies a task of a client's request among resends:
/// `REQUEST_ID`, or `REQUEST_ID#i` for the task at place `i` of a batch.
pub(super) fn request_key(request_id: &str, to: Enqueuing) -> String {
    match to {
        Enqueuing::Single { .. } => request_id.to_string(),
        Enqueuing::InBatch { slot, .. } => format!("{request_id}#{slot}"),
    }
}

/// A fresh task's record.
pub(super) fn new_record(
    id: Uuid,
    s: &ValidTask,
    is_callback: bool,
    now_us: u64,
    holders: Vec<u64>,
) -> ReplicaRecord {
    ReplicaRecord {
        id: id.to_string(),
        queue: s.queue.to_string(),
        name: s.rare().name.clone(),
        url: s.url.to_string(),
        pool: s.pool().to_string(),
        method: s.method.as_str().to_string(),
        params: s.params(),
        body: s.body().map(|b| ByteBuf::from(b.to_vec())),
        content_type: s.rare().content_type.clone(),
        headers: s.rare().headers.clone(),
        eta: s.eta,
        timeout: s.timeout(),
        callback_url: s.rare().callback_url.clone(),
        failure_callback_url: s.rare().failure_callback_url.clone(),
        idempotency_key: s.rare().idempotency_key.clone(),
        is_callback,
        created_us: now_us,
        state: TaskState::Scheduled,
        due_us: secs_to_micros(s.eta),
        attempts: 0,
        executions: 0,
        last_status: None,
        last_error: None,
        first_attempt_us: None,
        holders,
        request: None,
    }
}

/// A task's record as it stands: its specification and progress.
pub(super) fn record_of_task(t: &Task) -> ReplicaRecord {
    let mut r = new_record(
        t.id,
        &t.spec,
        t.is_callback,
        t.created_us,
        t.holders.to_vec(),
    );
    r.state = t.state;
    r.due_us = t.due_us;
    r.attempts = t.attempts;
    r.executions = t.executions;
    r.last_status = t.last_status;
    r.last_error = t.last_error();
    r.first_attempt_us = t.first_attempt_us();
    r
}

pub(super) fn spec_of(r: &ReplicaRecord) -> ValidTask {
    // A peer's record was validated where it was enqueued; an unknown
    // method (a newer peer) falls back to POST rather than losing the task.
    ValidTask::from_parts(TaskParts {
        queue: &r.queue,
        url: &r.url,
        method: Method::parse(&r.method).unwrap_or(Method::Post),
        params: &r.params,
        body: r.body.as_ref().map(|b| b.to_vec()),
        eta: r.eta,
        timeout: r.timeout,
        rare: Rare {
            name: r.name.clone(),
            content_type: r.content_type.clone(),
            headers: r.headers.clone(),
            callback_url: r.callback_url.clone(),
            failure_callback_url: r.failure_callback_url.clone(),
            idempotency_key: r.idempotency_key.clone(),
        },
    })
}

impl Store {
    /// An enqueue answered at once (a callback report in a cluster, or any
    /// enqueue of a single node): its holders, and copies for the others,
    /// not waited for. A single node sends nothing and gets no holders.
    pub(super) fn copy_unacknowledged(
        &mut self,
        id: Uuid,
        spec: &ValidTask,
        is_callback: bool,
        now_us: u64,
    ) -> Vec<u64> {
        let holders = self
            .cluster
            .holders_for(&placement_key(spec, &id.to_string()));
        if !holders.is_empty() {
            let store = PeerMessage::Store {
                req: 0,
                from: self.cluster.me,
                record: new_record(id, spec, is_callback, now_us, holders.clone()),
                check: true,
            };
            self.send_to_others(&holders, store);
        }
        holders
    }

    /// Sends `msg` to every node of `to` except this one; returns how many.
    pub(super) fn send_to_others(&mut self, to: &[u64], msg: PeerMessage) -> usize {
        let me = self.cluster.me;
        let mut n = 0;
        for &peer in to.iter().filter(|p| **p != me) {
            self.outbox.push(Event::ToPeer {
                to: peer,
                msg: msg.clone(),
            });
            n += 1;
        }
        n
    }

    /// A fresh id for a peer request that expects answers (0 means none).
    fn new_req(&mut self) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        req
    }

    /// The record of a task this node holds, at `now_us`, for copying it
    /// elsewhere. A task this node is delivering is due, for the copy, no
    /// earlier than that delivery's latest deadline (as a `claimed` event
    /// would say): a copy made during a delivery must not fire at once.
    fn record_of(&self, id: Uuid, now_us: u64) -> Option<ReplicaRecord> {
        let t = self.tasks.get(&id)?;
        let mut r = record_of_task(t);
        if t.state == TaskState::Running {
            let deadline =
                now_us + secs_to_micros(t.spec.timeout()) + CLAIM_GRACE.as_micros() as u64;
            r.due_us = r.due_us.max(deadline);
        }
        Some(r)
    }

    /// Publishes `body` when the task has other holders.
    pub(super) fn publish_for(&mut self, id: Uuid, body: impl FnOnce(&Task) -> EventBody) {
        if let Some(t) = self.tasks.get(&id) {
            if t.holders.len() > 1 {
                let ev = body(t);
                self.outbox.push(Event::Publish(ev));
            }
        }
    }

    /// Publishes a task's final state to its other holders.
    pub(super) fn publish_finished(&mut self, id: Uuid) {
        self.publish_for(id, |t| EventBody::Finished {
            id: id.to_string(),
            state: t.state,
            attempts: t.attempts,
            executions: t.executions,
            last_status: t.last_status,
            last_error: t.last_error(),
            response: t.last_response().map(ByteBuf::from),
        });
    }

    /// Resets a pending task's timer from `due_us` and its replica index.
    pub(super) fn retime(&mut self, id: Uuid) {
        let offset = self.config.replica_offset.as_micros() as u64;
        if !self.awaiting.is_empty() && self.awaiting.contains(&id) {
            return; // fires once its other holders answered
        }
        let Some(t) = self.tasks.get_mut_quiet(&id) else {
            return;
        };
        if !matches!(t.state, TaskState::Scheduled | TaskState::Retrying) {
            return;
        }
        t.in_ready = false;
        let at = t.due_us + t.replica as u64 * offset;
        t.fire_at_us = at;
        self.set_task_timer(id, at);
    }

    /// A batch in a cluster: each task is stored as by
    /// [`Store::enqueue_replicated`], and the batch is answered when every
    /// task's holders acknowledged (or timed out). The answer goes out
    /// through the outbox, at once when no task waits for a peer.
    pub(super) fn enqueue_batch_replicated(
        &mut self,
        client: Client<'_>,
        queue: &str,
        tasks: Vec<TaskSpec>,
        now_us: u64,
    ) {
        if tasks.is_empty() {
            self.answer_batch(
                client.identity.to_vec(),
                client.request_id.to_string(),
                Vec::new(),
                now_us,
            );
            return;
        }
        let batch = self.new_req();
        self.pending_ids.insert(client.request_id.to_string());
        self.pending.insert(
            batch,
            Pending::Batch(PendingBatch {
                identity: client.identity.to_vec(),
                request_id: client.request_id.to_string(),
                results: vec![None; tasks.len()],
                left: tasks.len(),
            }),
        );
        for (slot, spec) in tasks.into_iter().enumerate() {
            let to = Enqueuing::InBatch { batch, slot };
            if let Some(body) = self.enqueue_replicated(client, queue, spec, to, now_us) {
                self.fill_slot(batch, slot, body, now_us);
            }
        }
    }

    /// One task of a batch is decided; the last one answers the batch.
    fn fill_slot(&mut self, batch: u64, i: usize, body: ReplyBody, now_us: u64) {
        let Some(Pending::Batch(b)) = self.pending.get_mut(&batch) else {
            return;
        };
        if let Some(r) = b.results.get_mut(i) {
            *r = Some(body);
        }
        b.left = b.left.saturating_sub(1);
        if b.left > 0 {
            return;
        }
        if let Some(Pending::Batch(b)) = self.pending.remove(&batch) {
            self.pending_ids.remove(&b.request_id);
            self.answer_batch(b.identity, b.request_id, b.results, now_us);
        }
    }

    fn answer_batch(
        &mut self,
        identity: Vec<u8>,
        request_id: String,
        results: Vec<Option<ReplyBody>>,
        now_us: u64,
    ) {
        let reply = ClientReply {
            request_id,
            body: ReplyBody::Batch {
                results: results
                    .into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| error(ErrorCode::Internal, "the task was not decided"))
                    })
                    .collect(),
            },
        };
        self.remember(&reply, now_us);
        self.outbox.push(Event::Reply { identity, reply });
    }

    /// An enqueue in a cluster: store on this node if it is a holder, copy
    /// to the other holders, answer when they all acknowledged (or
    /// [`PEER_TIMEOUT`] passed). `None`: the reply comes later, for a
    /// batch's task as its place in the batch's answer.
    pub(super) fn enqueue_replicated(
        &mut self,
        client: Client<'_>,
        queue: &str,
        spec: TaskSpec,
        to: Enqueuing,
        now_us: u64,
    ) -> Option<ReplyBody> {
        let spec = match self.check(queue, spec, now_us) {
            Ok(s) => s,
            Err(reply) => return Some(reply),
        };
        let key = request_key(client.request_id, to);
        let pkey = placement_key(&spec, &key);
        let holders = self.cluster.holders_for_new(&pkey);
        let me = self.cluster.me;
        let local = holders.contains(&me);
        if local {
            // A resend whose first coordinator stored a copy here.
            if let Some(body) = self.remembered(&key, queue) {
                self.stats.duplicate_requests += 1;
                return Some(body);
            }
            if let Some(dup) = self.duplicate_of(&spec, now_us) {
                return Some(dup);
            }
        }
        let id = self.ids.next_id();
        if local {
            self.insert_task(id, spec.clone(), false, now_us, holders.clone());
            // It fires once the enqueue is decided: the decision may drop
            // it for another coordinator's task (a resend), and a task due
            // now would otherwise be delivered before that.
            self.clear_timer(id);
            self.note_copy_for(&key, id, queue, spec.eta, now_us);
        }
        let req = self.new_req();
        let mut record = new_record(id, &spec, false, now_us, holders.clone());
        record.request = Some(key.clone());
        let store = PeerMessage::Store {
            req,
            from: me,
            record,
            check: true,
        };
        let remote = self.send_to_others(&holders, store);
        if let Enqueuing::Single { .. } = to {
            self.pending_ids.insert(client.request_id.to_string());
        }
        let timer = self.add_timer(
            now_us + HANDOFF_AFTER.as_micros() as u64,
            Timer::Pending(req),
        );
        self.pending.insert(
            req,
            Pending::Store(Box::new(PendingStore {
                key: pkey,
                request_key: key,
                created_us: now_us,
                handed_off: false,
                replaced: Vec::new(),
                identity: client.identity.to_vec(),
                request_id: client.request_id.to_string(),
                id,
                to,
                holders,
                spec,
                local,
                answers: BTreeMap::new(),
                timer,
            })),
        );
        if remote == 0 {
            self.decide_store(req, now_us);
        }
        None
    }

    /// Every holder answered, or the time is up: the enqueue is answered
    /// (or its place in its batch filled).
    fn decide_store(&mut self, req: u64, now_us: u64) {
        let Some(Pending::Store(mut p)) = self.pending.remove(&req) else {
            return;
        };
        self.timers.remove(&p.timer);
        let handed = self.settle_handoffs(&mut p);
        let body = self.store_verdict(&p, now_us);
        tracing::debug!(
            request = %p.request_key,
            task = %p.id,
            holders = ?p.holders,
            answers = ?p.answers,
            local = p.local,
            ?body,
            "enqueue decided"
        );
        let created = matches!(body, ReplyBody::Enqueued { ref id, .. } if *id == p.id.to_string());
        if handed && created {
            self.settle_holders(&p, now_us);
        }
        if created {
            // Counted by the coordinator, once per task, whether or not it
            // holds a copy.
            self.queue_mut(&p.spec.queue, now_us).counters.enqueued += 1;
        }
        // This node's copy, if the decision kept it, may fire now.
        if p.local {
            self.retime(p.id);
        }
        let wait = match p.to {
            Enqueuing::InBatch { batch, slot } => return self.fill_slot(batch, slot, body, now_us),
            Enqueuing::Single { wait } => wait,
        };
        self.pending_ids.remove(&p.request_id);
        let reply = ClientReply {
            request_id: p.request_id,
            body,
        };
        self.remember(&reply, now_us);
        if let ReplyBody::Enqueued {
            ref id, replicas, ..
        } = reply.body
        {
            // The task the answer names (another coordinator's, after a
            // resend), whose first attempt the caller waits for.
            let id = Uuid::parse_str(id).unwrap_or(p.id);
            let held = Held {
                identity: &p.identity,
                request_id: &reply.request_id,
                id,
                queue: &p.spec.queue,
                eta: p.spec.eta,
                replicas,
            };
            if self.hold(held, wait, now_us) {
                return;
            }
        }
        self.outbox.push(Event::Reply {
            identity: p.identity,
            reply,
        });
    }

    /// [`HANDOFF_AFTER`] passed with holders silent: each one's place goes
    /// to the next member in the task's placement order that is neither a
    /// holder, nor passed over, nor suspected — this node included, when it
    /// coordinates without holding. The enqueue is then decided when the
    /// new holders answer, or at [`PEER_TIMEOUT`] from the enqueue; what
    /// becomes of the silent holders is settled then
    /// ([`Store::settle_handoffs`]).
    fn hand_off(&mut self, req: u64, now_us: u64) {
        let me = self.cluster.me;
        let Some(Pending::Store(p)) = self.pending.get_mut(&req) else {
            return;
        };
        p.handed_off = true;
        let silent: Vec<u64> = p
            .holders
            .iter()
            .copied()
            .filter(|h| *h != me && !p.answers.contains_key(h))
            .collect();
        let order = place(&p.key, &self.cluster.members, self.cluster.members.len());
        for h in silent {
            let next = order.iter().copied().find(|m| {
                !p.holders.contains(m)
                    && !p.replaced.iter().any(|(passed, _)| passed == m)
                    && self.cluster.suspects.binary_search(m).is_err()
                    && (*m != me || !p.local)
            });
            let Some(next) = next else { break };
            if let Some(slot) = p.holders.iter_mut().find(|x| **x == h) {
                *slot = next;
            }
            p.replaced.push((h, next));
        }
        // The decision now waits for the new holders, up to PEER_TIMEOUT
        // from the enqueue.
        let deadline = p.created_us + PEER_TIMEOUT.as_micros() as u64;
        let old_timer = p.timer;
        let (id, holders, spec, created_us, request_key, replaced) = (
            p.id,
            p.holders.clone(),
            p.spec.clone(),
            p.created_us,
            p.request_key.clone(),
            p.replaced.clone(),
        );
        self.timers.remove(&old_timer);
        let timer = self.add_timer(deadline.max(now_us), Timer::Pending(req));
        if let Some(Pending::Store(p)) = self.pending.get_mut(&req) {
            p.timer = timer;
        }
        if replaced.is_empty() {
            return;
        }
        self.stats.handed_off += replaced.len() as u64;
        for (silent, next) in replaced {
            tracing::debug!(task = %id, silent, next, "holder silent: copy handed to the next member");
            if next == me {
                self.insert_task(id, spec.clone(), false, created_us, holders.clone());
                self.clear_timer(id);
                self.note_copy_for(&request_key, id, &spec.queue, spec.eta, now_us);
                if let Some(Pending::Store(p)) = self.pending.get_mut(&req) {
                    p.local = true;
                }
                continue;
            }
            let mut record = new_record(id, &spec, false, created_us, holders.clone());
            record.request = Some(request_key.clone());
            self.outbox.push(Event::ToPeer {
                to: next,
                msg: PeerMessage::Store {
                    req,
                    from: me,
                    record,
                    check: true,
                },
            });
        }
        let done = match self.pending.get(&req) {
            Some(Pending::Store(p)) => p
                .holders
                .iter()
                .filter(|h| **h != me)
                .all(|h| p.answers.contains_key(h)),
            _ => false,
        };
        if done {
            self.decide_store(req, now_us);
        }
    }

    /// Decides each handoff of a pending store. A silent holder may hold
    /// the copy all the same (its answer may be what was lost), so:
    /// * the new member did not answer either: the place goes back to the
    ///   silent holder;
    /// * the new member answered and the copies known to be stored reach
    ///   the replication factor: the silent holder is sent `discard` (if it
    ///   was only slow, it keeps no copy outside the list);
    /// * the new member answered but the copies known fall short: the
    ///   silent holder stays on the list as an extra holder, and keeps
    ///   what it may hold.
    ///
    /// Returns whether the holder list changed.
    fn settle_handoffs(&mut self, p: &mut PendingStore) -> bool {
        let me = self.cluster.me;
        let target = self.cluster.replicas.min(self.cluster.members.len());
        let confirmed = p.local as usize
            + p.holders
                .iter()
                .filter(|h| matches!(p.answers.get(h), Some(StoreOutcome::Stored)))
                .count();
        let mut changed = false;
        for &(silent, next) in &p.replaced {
            let answered = p.answers.contains_key(&next) || next == me;
            if !answered {
                if let Some(slot) = p.holders.iter_mut().find(|x| **x == next) {
                    *slot = silent;
                }
                continue;
            }
            changed = true;
            if confirmed >= target {
                self.outbox.push(Event::ToPeer {
                    to: silent,
                    msg: PeerMessage::Discard {
                        id: p.id.to_string(),
                    },
                });
            } else if !p.holders.contains(&silent) {
                p.holders.push(silent);
            }
        }
        changed
    }

    /// After a handoff, the copies stored before it learn the final holder
    /// list (a `store` without check updates a copy's holders, §16.7), and
    /// so does this node's own.
    fn settle_holders(&mut self, p: &PendingStore, now_us: u64) {
        let me = self.cluster.me;
        if p.local {
            let replica = self.cluster.replica_index(&p.holders);
            if let Some(t) = self.tasks.get_mut(&p.id) {
                t.holders = p.holders.clone().into_boxed_slice();
                t.replica = replica;
            }
            self.retime(p.id);
        }
        let mut record = self
            .record_of(p.id, now_us)
            .unwrap_or_else(|| new_record(p.id, &p.spec, false, p.created_us, Vec::new()));
        record.holders = p.holders.clone();
        for (h, o) in &p.answers {
            if *h != me && matches!(o, StoreOutcome::Stored) && p.holders.contains(h) {
                self.outbox.push(Event::ToPeer {
                    to: *h,
                    msg: PeerMessage::Store {
                        req: 0,
                        from: me,
                        record: record.clone(),
                        check: false,
                    },
                });
            }
        }
    }

    /// Remembers that this node's copy `id` is the task of request key
    /// `key`, so a resend of the request to another node finds it here
    /// (`resent`): a copy from another coordinator, or this node's own
    /// while its enqueue waits for the other holders (two coordinators
    /// whose stores cross so keep one task). `replicas` 0 marks such an
    /// entry (a reply this node gave says 1 or more; see
    /// `Store::remembered`).
    fn note_copy_for(&mut self, key: &str, id: Uuid, queue: &str, eta: f64, now_us: u64) {
        let body = ReplyBody::Enqueued {
            id: id.to_string(),
            queue: queue.to_string(),
            eta,
            result: None,
            replicas: 0,
        };
        let k = self.recent.insert(
            key,
            &body,
            now_us + REQUEST_DEDUP.as_micros() as u64,
            REQUEST_DEDUP_MAX,
        );
        self.persist_reply(k);
    }

    /// Forgets a copy refused elsewhere (its name taken, or another task
    /// kept for its request), freeing its name at once; a delivery of it
    /// under way is revoked and its queue may dispatch the next task.
    pub(super) fn drop_copy(&mut self, id: Uuid, now_us: u64, out: &mut Vec<Event>) {
        let Some(queue) = self.tasks.get(&id).map(|t| t.spec.queue.to_string()) else {
            return;
        };
        self.free_keys(id);
        self.remove_task(id, out);
        self.pump(&queue, now_us, out);
    }

    /// A holder had the request's task already (as `id`): the copies made
    /// for this resend go, and the answer is the first one's task.
    fn answer_resend(&mut self, p: &PendingStore, id: Uuid, now_us: u64) -> ReplyBody {
        for (h, o) in &p.answers {
            if matches!(o, StoreOutcome::Stored) {
                self.outbox.push(Event::ToPeer {
                    to: *h,
                    msg: PeerMessage::Discard {
                        id: p.id.to_string(),
                    },
                });
            }
        }
        if p.local {
            let mut out = Vec::new();
            self.drop_copy(p.id, now_us, &mut out);
            self.outbox.append(&mut out);
        }
        self.stats.duplicate_requests += 1;
        let wanted = id.to_string();
        let copies = p
            .answers
            .values()
            .filter(|o| matches!(o, StoreOutcome::Resent { id, .. } if *id == wanted))
            .count();
        ReplyBody::Enqueued {
            id: wanted,
            queue: p.spec.queue.to_string(),
            eta: p.spec.eta,
            result: None,
            replicas: copies as u32,
        }
    }

    /// What the holders' answers decide for a pending store: `enqueued`
    /// with the number of copies, or `duplicate` when the first holder
    /// that answered (in placement order) holds the name already. With no
    /// holder answering, the task is kept here rather than lost.
    fn store_verdict(&mut self, p: &PendingStore, now_us: u64) -> ReplyBody {
        let mut stored = p.local as u32
            + p.answers
                .values()
                .filter(|o| matches!(o, StoreOutcome::Stored))
                .count() as u32;
        // Other tasks for the same request, held by the holders: one whose
        // coordinator has answered long since wins (a coordinator that was
        // frozen wakes up to its old requests); otherwise the smallest id
        // wins, whichever coordinator decides first, so two coordinators of
        // one request (a resend that crossed the first store) keep the same
        // task and not none.
        let decided = p
            .answers
            .values()
            .filter_map(|o| match o {
                StoreOutcome::Resent { id, decided: true } => Uuid::parse_str(id).ok(),
                _ => None,
            })
            .find(|id| *id != p.id);
        if let Some(first) = decided {
            return self.answer_resend(p, first, now_us);
        }
        let first = p
            .answers
            .values()
            .filter_map(|o| match o {
                StoreOutcome::Resent { id, .. } => Uuid::parse_str(id).ok(),
                _ => None,
            })
            .filter(|id| *id != p.id)
            .min();
        if let Some(first) = first.filter(|first| *first < p.id) {
            return self.answer_resend(p, first, now_us);
        }
        if !p.local {
            let verdict = p.holders.iter().find_map(|h| p.answers.get(h));
            if let Some(StoreOutcome::Duplicate { id, tombstoned }) = verdict {
                for (h, o) in &p.answers {
                    if matches!(o, StoreOutcome::Stored) {
                        self.outbox.push(Event::ToPeer {
                            to: *h,
                            msg: PeerMessage::Discard {
                                id: p.id.to_string(),
                            },
                        });
                    }
                }
                return ReplyBody::Duplicate {
                    id: id.clone(),
                    tombstoned: *tombstoned,
                };
            }
            if stored == 0 {
                if let Some(dup) = self.duplicate_of(&p.spec, now_us) {
                    return dup;
                }
                let mut holders = vec![self.cluster.me];
                holders.extend(p.holders.iter().copied());
                self.insert_task(p.id, p.spec.clone(), false, now_us, holders);
                stored = 1;
            }
        }
        ReplyBody::Enqueued {
            id: p.id.to_string(),
            queue: p.spec.queue.to_string(),
            eta: p.spec.eta,
            result: None,
            replicas: stored,
        }
    }

    /// Whether an enqueue with this request id still waits for its holders.
    pub(super) fn store_pending_for(&self, request_id: &str) -> bool {
        self.pending_ids.contains(request_id)
    }

    /// Sends a client command about a task held elsewhere to every peer;
    /// the first answer that is not `not_found` wins.
    pub(super) fn forward(&mut self, client: Client<'_>, command: ClientCommand, now_us: u64) {
        let req = self.new_req();
        let members = self.cluster.members.clone();
        let msg = PeerMessage::Request {
            req,
            from: self.cluster.me,
            command,
        };
        let outstanding = self.send_to_others(&members, msg);
        let timer = self.add_timer(
            now_us + PEER_TIMEOUT.as_micros() as u64,
            Timer::Pending(req),
        );
        self.pending.insert(
            req,
            Pending::Request(PendingRequest {
                identity: client.identity.to_vec(),
                request_id: client.request_id.to_string(),
                outstanding,
                answered: false,
                timer,
            }),
        );
        if outstanding == 0 {
            self.pending_expired(req, now_us, &mut Vec::new());
        }
    }

    /// Applies a queue command on every peer too (no answers expected).
    pub(super) fn broadcast(&mut self, command: ClientCommand) {
        let members = self.cluster.members.clone();
        let msg = PeerMessage::Request {
            req: 0,
            from: self.cluster.me,
            command,
        };
        self.send_to_others(&members, msg);
    }

    pub(super) fn pending_expired(&mut self, req: u64, now_us: u64, _out: &mut Vec<Event>) {
        match self.pending.get(&req) {
            Some(Pending::Store(p)) if !p.handed_off => self.hand_off(req, now_us),
            Some(Pending::Store(_)) => self.decide_store(req, now_us),
            // Its tasks' stores have the timers.
            Some(Pending::Batch(_)) => {}
            Some(Pending::Copy(_)) => {
                let Some(Pending::Copy(c)) = self.pending.remove(&req) else {
                    return;
                };
                // Again while the task is pending here and `to` is still
                // a member holding it.
                let wanted = self.cluster.members.binary_search(&c.to).is_ok()
                    && self
                        .tasks
                        .get(&c.id)
                        .is_some_and(|t| !t.state.is_final() && t.holders.contains(&c.to));
                if wanted && c.sends < COPY_SENDS {
                    self.send_copy(c.id, c.to, c.sends + 1, now_us);
                }
            }
            Some(Pending::Confirm(_)) => {
                if let Some(Pending::Confirm(c)) = self.pending.remove(&req) {
                    self.timers.remove(&c.timer);
                    if c.answered || c.sends >= CONFIRM_SENDS {
                        self.confirmed(c.id, now_us);
                    } else {
                        // No holder answered: just restarted, this node
                        // may not be connected to them yet.
                        self.ask_holders(c.id, c.sends + 1, now_us);
                    }
                }
            }
            Some(Pending::Request(_)) => {
                if let Some(Pending::Request(p)) = self.pending.remove(&req) {
                    self.timers.remove(&p.timer);
                    if !p.answered {
                        self.outbox.push(Event::Reply {
                            identity: p.identity,
                            reply: ClientReply {
                                request_id: p.request_id,
                                body: error(ErrorCode::NotFound, "no such task on any node"),
                            },
                        });
                    }
                }
            }
            None => {}
        }
    }

    pub(super) fn on_peer(&mut self, msg: PeerMessage, now_us: u64, out: &mut Vec<Event>) {
        let me = self.cluster.me;
        match msg {
            PeerMessage::Store {
                req,
                from,
                record,
                check,
            } => {
                let outcome = self.adopt(record, check, now_us, out);
                if req != 0 {
                    self.outbox.push(Event::ToPeer {
                        to: from,
                        msg: PeerMessage::StoreResult {
                            req,
                            from: me,
                            outcome,
                        },
                    });
                }
            }
            PeerMessage::StoreResult { req, from, outcome } => {
                self.on_store_result(req, from, outcome, now_us)
            }
            PeerMessage::Discard { id } => {
                if let Ok(uid) = Uuid::parse_str(&id) {
                    self.drop_copy(uid, now_us, out);
                }
            }
            PeerMessage::Request { req, from, command } => {
                let body = self.local_command(command, now_us, out);
                if req != 0 {
                    self.outbox.push(Event::ToPeer {
                        to: from,
                        msg: PeerMessage::Reply {
                            req,
                            from: me,
                            body,
                        },
                    });
                }
            }
            PeerMessage::Reply { req, body, .. } => self.on_peer_reply(req, body, now_us, out),
            PeerMessage::Raft { .. } | PeerMessage::Join { .. } => {}
        }
    }

    /// A holder's answer to a `store`: the enqueue is decided once every
    /// other holder answered.
    fn on_store_result(&mut self, req: u64, from: u64, outcome: StoreOutcome, now_us: u64) {
        let me = self.cluster.me;
        let done = match self.pending.get_mut(&req) {
            // A holder passed over answers too late to count.
            Some(Pending::Store(p)) if p.holders.contains(&from) => {
                p.answers.insert(from, outcome);
                let remote = p.holders.iter().filter(|h| **h != me).count();
                p.answers.len() >= remote
            }
            Some(Pending::Copy(c)) if c.to == from => {
                let timer = c.timer;
                self.pending.remove(&req);
                self.timers.remove(&timer);
                false
            }
            _ => false,
        };
        if done {
            self.decide_store(req, now_us);
        }
    }

    /// A peer's answer to a forwarded request: the first one that found
    /// the task is the client's; `not_found` only when every peer says so.
    fn on_peer_reply(&mut self, req: u64, body: ReplyBody, now_us: u64, out: &mut Vec<Event>) {
        if let Some(Pending::Confirm(c)) = self.pending.get_mut(&req) {
            c.outstanding = c.outstanding.saturating_sub(1);
            c.answered = true;
            let (id, done) = (c.id, c.outstanding == 0);
            self.holder_says(id, body, now_us, out);
            if done {
                self.pending_expired(req, now_us, out);
            }
            return;
        }
        let found = !matches!(
            body,
            ReplyBody::Error {
                code: ErrorCode::NotFound,
                ..
            }
        );
        let mut finished = false;
        if let Some(Pending::Request(p)) = self.pending.get_mut(&req) {
            p.outstanding = p.outstanding.saturating_sub(1);
            if found && !p.answered {
                p.answered = true;
                self.outbox.push(Event::Reply {
                    identity: p.identity.clone(),
                    reply: ClientReply {
                        request_id: p.request_id.clone(),
                        body,
                    },
                });
            }
            finished = p.outstanding == 0;
        }
        if finished {
            self.pending_expired(req, now_us, out);
        }
    }

    /// A command from a peer, applied to this node's tasks only.
    fn local_command(
        &mut self,
        command: ClientCommand,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> ReplyBody {
        match command {
            ClientCommand::Get { queue, id } => self.get(&queue, &id),
            ClientCommand::Cancel { queue, id } => self.cancel(&queue, &id, now_us, out),
            ClientCommand::Run { queue, id } => {
                // Every holder gets a forwarded `run`: only the first live
                // one acts, so the task runs once.
                let Some(uid) = self.find(&queue, &id) else {
                    return not_found(&queue, &id);
                };
                let me = self.cluster.me;
                let first_live = self.tasks.get(&uid).and_then(|t| {
                    t.holders
                        .iter()
                        .copied()
                        .find(|h| self.cluster.members.binary_search(h).is_ok())
                });
                if first_live.is_none_or(|h| h == me) {
                    self.run(&queue, &id, now_us, out)
                } else {
                    ReplyBody::Task {
                        task: self.info(uid, false),
                    }
                }
            }
            other => self.queue_command(other, now_us, out),
        }
    }

    /// Stores a copy sent by a peer: a fresh enqueue (`check`: refused if
    /// its name is taken) or an adoption for re-replication.
    fn adopt(
        &mut self,
        record: ReplicaRecord,
        check: bool,
        now_us: u64,
        out: &mut Vec<Event>,
    ) -> StoreOutcome {
        let Ok(id) = Uuid::parse_str(&record.id) else {
            return StoreOutcome::Rejected {
                reason: "invalid task id".into(),
            };
        };
        let me = self.cluster.me;
        if me != 0 && !record.holders.is_empty() && !record.holders.contains(&me) {
            // Meant for another member: a previous process at this
            // address (its peers' connections reach whoever is there).
            return StoreOutcome::Rejected {
                reason: "this node is not one of the copy's holders".into(),
            };
        }
        if let Some(t) = self.tasks.get_mut(&id) {
            t.holders = record.holders.clone().into_boxed_slice();
            t.replica = self.cluster.replica_index(&record.holders);
            let (state, timeout) = (t.state, t.spec.timeout());
            self.retime(id);
            // New holders may have joined the list (a handoff) after this
            // copy's delivery started or ended: they missed its `claimed`
            // or `finished`, so it is published again for them.
            if state == TaskState::Running {
                let deadline_us = now_us + secs_to_micros(timeout) + CLAIM_GRACE.as_micros() as u64;
                self.publish_for(id, |_| EventBody::Claimed {
                    id: id.to_string(),
                    deadline_us,
                });
            } else if state.is_final() {
                self.publish_finished(id);
            }
            return StoreOutcome::Stored;
        }
        if record.state.is_final() {
            return StoreOutcome::Stored;
        }
        let request = record.request.as_deref().filter(|_| check);
        if let Some(key) = request {
            if let Some(first) = self.held_for(key, &record.queue) {
                if first != id {
                    let settled = DECIDED_AFTER.as_micros() as u64;
                    let decided = self
                        .tasks
                        .get(&first)
                        .is_some_and(|t| t.created_us.saturating_add(settled) < now_us);
                    return StoreOutcome::Resent {
                        id: first.to_string(),
                        decided,
                    };
                }
            }
        }
        if let Err(reason) =
            crate::validate::check_record(&record, crate::clock::micros_to_secs(now_us))
        {
            tracing::warn!(task = %record.id, %reason, "a peer's copy refused");
            return StoreOutcome::Rejected { reason };
        }
        let mut spec = spec_of(&record);
        self.intern_peer(&mut spec);
        if check {
            if let Some(ReplyBody::Duplicate { id, tombstoned }) = self.duplicate_of(&spec, now_us)
            {
                return StoreOutcome::Duplicate { id, tombstoned };
            }
        }
        if let Some(key) = request {
            self.note_copy_for(key, id, &record.queue, record.eta, now_us);
        }
        self.insert_task(
            id,
            spec,
            record.is_callback,
            record.created_us,
            record.holders.clone(),
        );
        if let Some(t) = self.tasks.get_mut(&id) {
            t.load_progress(&record);
        }
        if record.state == TaskState::Retrying {
            self.transition(id, TaskState::Retrying, out);
        }
        self.retime(id);
        StoreOutcome::Stored
    }

    /// A cluster event a peer published about a task both hold.
    pub(super) fn on_event(&mut self, ev: EventBody, now_us: u64, out: &mut Vec<Event>) {
        let id = match &ev {
            EventBody::Heartbeat { .. } => return,
            EventBody::Claimed { id, .. }
            | EventBody::Retry { id, .. }
            | EventBody::Finished { id, .. } => id,
        };
        let Ok(uid) = Uuid::parse_str(id) else {
            return;
        };
        match ev {
            EventBody::Claimed { deadline_us, .. } => self.peer_claimed(uid, deadline_us),
            ev @ EventBody::Retry { .. } => self.peer_retried(uid, ev, out),
            ev @ EventBody::Finished { .. } => self.peer_finished(uid, ev, now_us, out),
            EventBody::Heartbeat { .. } => {}
        }
    }

    /// Another holder started a delivery: this copy fires no earlier than
    /// that delivery's deadline.
    fn peer_claimed(&mut self, id: Uuid, deadline_us: u64) {
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        if matches!(t.state, TaskState::Scheduled | TaskState::Retrying) {
            t.due_us = t.due_us.max(deadline_us);
            self.retime(id);
        }
    }

    /// Another holder's attempt failed and the task retries at `due_us`:
    /// so does this copy, and held replies get the attempt.
    fn peer_retried(&mut self, id: Uuid, ev: EventBody, out: &mut Vec<Event>) {
        let EventBody::Retry {
            attempts,
            executions,
            due_us,
            last_status,
            last_error,
            response,
            ..
        } = ev
        else {
            return;
        };
        let attempt = AttemptResult {
            outcome: Outcome::Failure,
            status: last_status,
            body: response,
            error: last_error.clone(),
        };
        self.answer_waiters(id, Some(attempt), out);
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        if t.state.is_final() || t.state == TaskState::Running {
            return;
        }
        t.merge_attempts(attempts, executions, last_status, last_error);
        t.due_us = due_us;
        self.transition(id, TaskState::Retrying, out);
        self.retime(id);
    }

    /// Another holder finished the task: so does this copy (a delivery of
    /// its own under way is revoked), and held replies are answered.
    fn peer_finished(&mut self, id: Uuid, ev: EventBody, now_us: u64, out: &mut Vec<Event>) {
        let EventBody::Finished {
            state,
            attempts,
            executions,
            last_status,
            last_error,
            response,
            ..
        } = ev
        else {
            return;
        };
        let attempt = (state != TaskState::Cancelled).then(|| AttemptResult {
            outcome: if state == TaskState::Succeeded {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            status: last_status,
            body: response.clone(),
            error: last_error.clone(),
        });
        self.answer_waiters(id, attempt, out);
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        if t.state.is_final() || !state.is_final() {
            return;
        }
        let queue = t.spec.queue.to_string();
        t.merge_attempts(attempts, executions, last_status, last_error);
        let kept = t.set_last_response(response.map(|b| b.into_vec()));
        self.task_bytes = self.task_bytes.saturating_add_signed(kept);
        self.transition(id, state, out);
        self.finish(id, now_us, out);
        self.pump(&queue, now_us, out);
    }

    /// A new roster: queue shares, and copies to restore the replication
    /// factor of tasks whose holders left.
    pub(super) fn on_roster(
        &mut self,
        me: u64,
        mut members: Vec<u64>,
        replicas: u32,
        now_us: u64,
        out: &mut Vec<Event>,
    ) {
        members.sort_unstable();
        members.dedup();
        let confirm = !self.unconfirmed.is_empty() && members.binary_search(&me).is_ok();
        let mut suspects = std::mem::take(&mut self.cluster.suspects);
        suspects.retain(|s| members.binary_search(s).is_ok());
        self.cluster = ClusterView {
            me,
            members,
            replicas: replicas.max(1) as usize,
            suspects,
        };
        let share = self.cluster.share();
        for q in self.queues.values_mut() {
            q.share = share;
        }
        if confirm {
            self.confirm_recovered(now_us);
        }
        if !self.cluster.is_clustered() {
            return;
        }
        let ids: Vec<Uuid> = self
            .tasks
            .iter()
            .filter(|(_, t)| !t.state.is_final())
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            self.re_replicate(id, now_us);
        }
        // In name order, so a run replays exactly.
        let mut queues: Vec<String> = self.queues.keys().cloned().collect();
        queues.sort_unstable();
        for q in queues {
            self.pump(&q, now_us, out);
        }
    }

    /// Sends new holder `to` its re-replication copy of task `id` (send
    /// number `sends`), and waits for its answer: a copy lost on the way is
    /// sent again rather than leave the task one holder short.
    fn send_copy(&mut self, id: Uuid, to: u64, sends: u32, now_us: u64) {
        let Some(record) = self.record_of(id, now_us) else {
            return;
        };
        let req = self.new_req();
        self.outbox.push(Event::ToPeer {
            to,
            msg: PeerMessage::Store {
                req,
                from: self.cluster.me,
                record,
                check: false,
            },
        });
        self.stats.re_replicated += 1;
        let timer = self.add_timer(
            now_us + PEER_TIMEOUT.as_micros() as u64,
            Timer::Pending(req),
        );
        self.pending.insert(
            req,
            Pending::Copy(PendingCopy {
                id,
                to,
                sends,
                timer,
            }),
        );
    }

    /// Gives task `id` new holders in place of those that left the roster;
    /// the first surviving holder sends the newcomers their copies.
    fn re_replicate(&mut self, id: Uuid, now_us: u64) {
        let Some(t) = self.tasks.get(&id) else {
            return;
        };
        let me = self.cluster.me;
        let members = &self.cluster.members;
        let target = self.cluster.replicas.min(members.len());
        let holders = if t.holders.is_empty() {
            vec![me]
        } else {
            t.holders.to_vec()
        };
        let alive: Vec<u64> = holders
            .iter()
            .copied()
            .filter(|h| members.binary_search(h).is_ok())
            .collect();
        if alive.len() >= target && alive.len() == holders.len() {
            return;
        }
        let mut new_holders = alive.clone();
        let key = placement_key(&t.spec, &id.to_string());
        for m in place(&key, members, self.cluster.replicas) {
            if new_holders.len() >= target {
                break;
            }
            if !new_holders.contains(&m) {
                new_holders.push(m);
            }
        }
        let coordinator = alive.first().copied() == Some(me);
        let newcomers: Vec<u64> = new_holders
            .iter()
            .copied()
            .filter(|h| !alive.contains(h))
            .collect();
        let replica = self.cluster.replica_index(&new_holders);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.holders = new_holders.into_boxed_slice();
            t.replica = replica;
        }
        self.retime(id);
        if coordinator {
            for to in newcomers.into_iter().filter(|n| *n != me) {
                self.send_copy(id, to, 1, now_us);
            }
        }
    }
}
