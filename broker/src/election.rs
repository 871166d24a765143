//! Leader election and the roster, on tikv's `raft` crate.
//!
//! [`Election`] is sans-IO: [`Election::handle`] takes a message from the
//! I/O loop and [`Election::tick`] a Raft tick, and both return the
//! messages to send ([`FromElection`]); it owns no socket and reads no
//! clock. Its election timeouts are drawn from a seeded generator rather
//! than raft-rs's thread-local one, so a simulated cluster replays exactly.
//! [`run`] drives it on its own thread, talking to the node's I/O loop
//! over an inproc PAIR socket; Raft messages ride the ZeroMQ peer mesh
//! that the I/O loop owns.
//!
//! The roster (members, their endpoints, an epoch) is the replicated
//! state: a member is added by a Raft `AddNode` whose context is the
//! member's record, removed by `RemoveNode`, and the first node records its
//! own endpoints with a normal entry once it leads. The epoch is the log
//! index of the last roster change, so "higher epoch" means "newer roster".
//! Raft snapshots carry the roster too (see `RosterStorage`), so a member
//! that catches up from a snapshot still learns every member's endpoints.
//!
//! Storage is raft-rs's `MemStorage`. A node with a data directory saves
//! its Raft state ([`SavedRaft`]: its id, hard state, log, snapshot and
//! roster) there after every change, before the messages that depend on it
//! go out ([`FromElection::Persist`]), and starts again from it as the same
//! member. A node without one gets a new random id at every start, so it
//! joins as a new member and can never vote twice in a term.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protobuf::Message as PbMessage;
use protocol::Member;
use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType, Message, Snapshot};
use raft::storage::MemStorage;
use raft::{Config, GetEntriesContext, RaftState, RawNode, StateRole, Storage};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::sync::{Arc, Mutex};

/// Raft tick: every election timing below is a multiple of it.
pub const TICK: Duration = Duration::from_millis(100);
/// Ticks without a leader's word before a follower campaigns: a random
/// number in `[ELECTION_TICKS, 2 × ELECTION_TICKS)` (1–2 s).
pub const ELECTION_TICKS: usize = 10;

/// What the I/O loop sends the election thread.
#[derive(Serialize, Deserialize, Debug)]
pub enum ToElection {
    /// A Raft message from a peer.
    Raft(ByteBuf),
    /// A node asks to join (arrived here or forwarded by a peer).
    Join(Member),
    /// Milliseconds since each member was last heard from.
    Liveness(Vec<(u64, u64)>),
    Stop,
}

/// What the election thread tells the I/O loop.
#[derive(Serialize, Deserialize, Debug)]
pub enum FromElection {
    /// Send a Raft message to member `to`.
    Send { to: u64, message: ByteBuf },
    /// The current view; sent whenever it changes.
    State {
        epoch: u64,
        members: Vec<Member>,
        leader: Option<u64>,
        term: u64,
    },
    /// A join arrived at a follower: forward it to the leader.
    ForwardJoin { leader: u64, member: Member },
    /// Raft messages dropped so far (sent at a tick when it grew).
    Dropped { total: u64 },
    /// Save this state ([`SavedRaft`], encoded) durably before acting on
    /// the messages after it: the election thread does so itself.
    Persist(ByteBuf),
}

/// What a node keeps of its Raft state in its data directory, enough to
/// start again as the same member: its id, the hard state (term, vote,
/// commit), the configuration, the log since the last snapshot (protobuf
/// `eraftpb` encodings), and the roster as of the commit index.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SavedRaft {
    pub id: u64,
    pub hard_state: ByteBuf,
    pub conf_state: ByteBuf,
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    pub entries: Vec<ByteBuf>,
    pub epoch: u64,
    pub members: Vec<Member>,
}

impl SavedRaft {
    /// Only an id: a node that has no Raft state yet.
    pub fn fresh(id: u64) -> SavedRaft {
        SavedRaft {
            id,
            hard_state: ByteBuf::new(),
            conf_state: ByteBuf::new(),
            snapshot_index: 0,
            snapshot_term: 0,
            entries: Vec::new(),
            epoch: 0,
            members: Vec::new(),
        }
    }

    /// Whether there is any Raft state beyond the id: such a node is a
    /// member (or was one) and neither starts a cluster nor waits to be
    /// added as a new node.
    pub fn has_state(&self) -> bool {
        !self.members.is_empty() || !self.entries.is_empty() || self.snapshot_index > 0
    }
}

/// Election settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub me: Member,
    /// Start a new cluster (true) or wait to be added to one (false).
    pub bootstrap: bool,
    /// The leader removes a member silent this long.
    pub remove_after: Duration,
    /// The state saved by an earlier run of this member.
    pub saved: Option<SavedRaft>,
    /// Ask for [`FromElection::Persist`] after every change.
    pub persist: bool,
}

#[derive(Serialize, Deserialize)]
enum RosterEntry {
    Upsert(Member),
}

/// `MemStorage` whose snapshots carry the roster, so a member that catches
/// up from a snapshot (skipping the entries that built the roster) still
/// learns every member's endpoints.
#[derive(Clone)]
struct RosterStorage {
    mem: MemStorage,
    roster: Arc<Mutex<Vec<u8>>>,
}

impl Storage for RosterStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut s = self.mem.snapshot(request_index, to)?;
        if let Ok(r) = self.roster.lock() {
            s.data = r.clone().into();
        }
        Ok(s)
    }
}

/// The roster inside a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotRoster {
    epoch: u64,
    members: Vec<Member>,
}

/// One node's Raft state machine and the roster it replicates.
pub struct Election {
    me: Member,
    node: RawNode<RosterStorage>,
    roster_bytes: Arc<Mutex<Vec<u8>>>,
    members: BTreeMap<u64, Member>,
    epoch: u64,
    remove_after: Duration,
    last_sent: Option<(u64, Option<u64>, u64)>,
    liveness: Vec<(u64, u64)>,
    /// SplitMix64 state for election timeouts.
    rng: u64,
    /// Raft messages not stepped into raft-rs ([`Election::admit`]).
    dropped: u64,
    dropped_reported: u64,
    /// Members sent a snapshot by the current `on_ready`.
    snapshots_sent: Vec<u64>,
    /// Messages to send, gathered by the current call.
    out: Vec<FromElection>,
    persist: bool,
}

/// Runs the election thread's loop on `pair` until `Stop`.
/// With `file`, the Raft state is saved there (atomically) before the
/// messages that depend on it are sent.
pub fn run(config: ElectionConfig, pair: zmq::Socket, file: Option<std::path::PathBuf>) {
    let seed = uuid::Uuid::new_v4().as_u64_pair().0;
    let mut e = match Election::new(&config, seed) {
        Ok(e) => e,
        Err(err) => {
            tracing::error!(error = %err, "cannot start Raft");
            return;
        }
    };
    let mut next_tick = Instant::now() + TICK;
    loop {
        client::logging::test_fault_point("election");
        let wait = next_tick.saturating_duration_since(Instant::now());
        match pair.poll(zmq::POLLIN, wait.as_millis().max(1) as i64) {
            Ok(n) if n > 0 => {
                while let Ok(parts) = pair.recv_multipart(zmq::DONTWAIT) {
                    match protocol::decode::<ToElection, _>(&parts) {
                        Ok(ToElection::Stop) => return,
                        Ok(msg) => send_all(&pair, e.handle(msg), file.as_deref()),
                        Err(err) => tracing::warn!(error = %err, "bad message to election thread"),
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        if Instant::now() >= next_tick {
            send_all(&pair, e.tick(), file.as_deref());
            next_tick = Instant::now() + TICK;
        }
    }
}

fn send_all(pair: &zmq::Socket, msgs: Vec<FromElection>, file: Option<&std::path::Path>) {
    for msg in &msgs {
        if let FromElection::Persist(bytes) = msg {
            if let Some(path) = file {
                if let Err(err) = crate::durable::write_file(path, bytes) {
                    tracing::error!(error = %err, file = %path.display(), "cannot save the Raft state; stopping");
                    eprintln!(
                        "miyamoto: cannot save the Raft state to {}: {err}; stopping",
                        path.display()
                    );
                    std::process::exit(74);
                }
            }
            continue;
        }
        let _ = pair.send_multipart(protocol::encode(msg), zmq::DONTWAIT);
    }
}

impl Election {
    /// A node's election; `seed` draws its election timeouts.
    pub fn new(config: &ElectionConfig, seed: u64) -> raft::Result<Election> {
        let raft_config = Config {
            id: config.me.id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: 2,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let mem = MemStorage::new();
        let roster_bytes = Arc::new(Mutex::new(Vec::new()));
        let storage = RosterStorage {
            mem: mem.clone(),
            roster: roster_bytes.clone(),
        };
        if config.bootstrap {
            // As in raft-rs's examples: a snapshot at index 1 holding the
            // initial configuration, so that later members catch up from it.
            let mut s = Snapshot::default();
            s.mut_metadata().index = 1;
            s.mut_metadata().term = 1;
            s.mut_metadata().mut_conf_state().voters = vec![config.me.id];
            mem.wl().apply_snapshot(s)?;
        }
        let mut members = BTreeMap::new();
        let mut epoch = 0;
        let mut raft_config = raft_config;
        if let Some(saved) = config.saved.as_ref().filter(|s| s.has_state()) {
            load(&mem, saved, &mut raft_config)?;
            members = saved.members.iter().map(|m| (m.id, m.clone())).collect();
            epoch = saved.epoch;
            if let Ok(mut r) = roster_bytes.lock() {
                *r = protocol::encode(&SnapshotRoster {
                    epoch,
                    members: saved.members.clone(),
                })
                .pop()
                .unwrap_or_default();
            }
        }
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = RawNode::new(&raft_config, storage, &logger)?;
        if config.saved.as_ref().is_some_and(SavedRaft::has_state) {
            let r = &node.raft;
            tracing::info!(
                term = r.term,
                vote = r.vote,
                commit = r.raft_log.committed,
                applied = r.raft_log.applied,
                last_index = r.raft_log.last_index(),
                voters = ?r.prs().conf().voters().ids().iter().collect::<Vec<_>>(),
                members = members.len(),
                "Raft state loaded"
            );
        }
        if config.bootstrap {
            node.campaign()?;
            members.insert(config.me.id, config.me.clone());
        }
        let mut e = Election {
            me: config.me.clone(),
            node,
            roster_bytes,
            members,
            epoch,
            remove_after: config.remove_after,
            last_sent: None,
            liveness: Vec::new(),
            rng: seed,
            dropped: 0,
            dropped_reported: 0,
            snapshots_sent: Vec::new(),
            out: Vec::new(),
            persist: config.persist,
        };
        e.draw_timeout();
        Ok(e)
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// This node's view: roster epoch, members, leader, term.
    pub fn view(&self) -> (u64, Vec<Member>, Option<u64>, u64) {
        let leader = match self.node.raft.leader_id {
            0 => None,
            l => Some(l),
        };
        (
            self.epoch,
            self.members.values().cloned().collect(),
            leader,
            self.node.raft.term,
        )
    }

    /// One message from the I/O loop; returns the messages to send.
    pub fn handle(&mut self, msg: ToElection) -> Vec<FromElection> {
        match msg {
            ToElection::Raft(bytes) => match Message::parse_from_bytes(&bytes) {
                Ok(m) => match self.admit(&m) {
                    Ok(()) => {
                        let _ = self.node.step(m);
                    }
                    Err(why) => self.drop_message(&m, why),
                },
                Err(err) => {
                    self.dropped += 1;
                    tracing::debug!(error = %err, "undecodable Raft message");
                }
            },
            ToElection::Join(member) => self.join(member),
            ToElection::Liveness(l) => self.liveness = l,
            ToElection::Stop => {}
        }
        self.settle()
    }

    /// Raft messages dropped so far rather than stepped into raft-rs.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether a Raft message from the wire may be stepped into raft-rs.
    ///
    /// raft-rs trusts its peers: a heartbeat whose `commit` is past this
    /// node's log, or entries that contradict a committed one, panic inside
    /// it (`to_commit … is out of range`). Such messages come from a member
    /// that talks to an older process at this address (a node restarted on
    /// its old ports has a new id), from a stale or duplicated message, or
    /// from anyone who reaches the peer port. So a message is stepped only
    /// when it is for this member, from a member, of a kind peers send, and
    /// its indexes fit this node's log.
    fn admit(&self, m: &Message) -> Result<(), &'static str> {
        use raft::prelude::MessageType::*;
        let me = self.me.id;
        if m.to != me {
            return Err("addressed to another member id");
        }
        if m.from == 0 || m.from == me {
            return Err("from no member");
        }
        // A node not yet in the roster (joining) hears first from a leader
        // it does not know; once a member, only members are heard.
        let voter = self.node.raft.prs().conf().voters().contains(m.from);
        if self.members.contains_key(&me) && !voter && !self.members.contains_key(&m.from) {
            return Err("from a node that is not a member");
        }
        let log = &self.node.raft.raft_log;
        let last = log.last_index();
        match m.get_msg_type() {
            MsgHeartbeat if m.commit > last.max(log.committed) => {
                Err("heartbeat commits past this node's log")
            }
            MsgAppend => {
                for (i, e) in m.entries.iter().enumerate() {
                    if e.index != m.index + 1 + i as u64 {
                        return Err("append entries out of sequence");
                    }
                    // A committed entry is never replaced.
                    if e.index <= log.committed && log.term(e.index).ok() != Some(e.term) {
                        return Err("append contradicts a committed entry");
                    }
                }
                Ok(())
            }
            MsgAppendResponse if m.index > last => Err("acknowledges entries this node lacks"),
            MsgHeartbeat
            | MsgAppendResponse
            | MsgHeartbeatResponse
            | MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
            | MsgSnapshot => Ok(()),
            // Proposals, leader transfers, read indexes and local messages
            // are not something a peer of this cluster sends.
            _ => Err("a kind of message peers do not send"),
        }
    }

    fn drop_message(&mut self, m: &Message, why: &'static str) {
        self.dropped += 1;
        // The first of each burst at warn, the rest at debug, so a flood
        // cannot flood the log.
        if self.dropped.is_power_of_two() {
            tracing::warn!(
                from = m.from,
                to = m.to,
                kind = ?m.get_msg_type(),
                term = m.term,
                dropped = self.dropped,
                "Raft message dropped: {why}"
            );
        } else {
            tracing::debug!(from = m.from, to = m.to, "Raft message dropped: {why}");
        }
    }

    /// One Raft tick ([`TICK`]); returns the messages to send.
    pub fn tick(&mut self) -> Vec<FromElection> {
        self.node.tick();
        self.remove_silent();
        if self.dropped != self.dropped_reported {
            self.dropped_reported = self.dropped;
            self.out.push(FromElection::Dropped {
                total: self.dropped,
            });
        }
        self.settle()
    }

    /// After each input: persist and send what Raft is ready with, and the
    /// view when it changed.
    fn settle(&mut self) -> Vec<FromElection> {
        self.on_ready();
        self.publish_state();
        self.draw_timeout();
        std::mem::take(&mut self.out)
    }

    /// raft-rs draws a new election timeout from its thread-local
    /// generator whenever it resets the election clock; this draws it
    /// again from the seeded one (same range), so runs replay exactly.
    fn draw_timeout(&mut self) {
        let raft = &mut self.node.raft;
        if raft.election_elapsed != 0 {
            return;
        }
        let (min, max) = (ELECTION_TICKS, 2 * ELECTION_TICKS);
        let span = (max - min) as u64;
        let t = min + (crate::store::splitmix64(&mut self.rng) % span) as usize;
        raft.set_randomized_election_timeout(t);
    }

    fn join(&mut self, member: Member) {
        if self.members.get(&member.id) == Some(&member) {
            return;
        }
        if !self.is_leader() {
            let leader = self.node.raft.leader_id;
            if leader != 0 && leader != self.me.id {
                self.out.push(FromElection::ForwardJoin { leader, member });
            }
            return;
        }
        if self.node.raft.has_pending_conf() {
            return; // the joiner retries
        }
        // A node at the address of a member still in the roster is that
        // member restarted (without a data directory it has a new id):
        // the old one is removed first, then the joiner's next request
        // adds it. Never a ghost next to its successor, which would make
        // the majority larger than the nodes that can answer.
        let previous = self
            .members
            .values()
            .find(|m| m.id != member.id && (m.peer == member.peer || m.client == member.client))
            .map(|m| m.id);
        if let Some(old) = previous {
            if old == self.me.id {
                tracing::warn!(member = member.id, address = %member.peer, "a node asks to join at this leader's own address; refused");
                return;
            }
            tracing::info!(
                old,
                new = member.id,
                address = %member.peer,
                "a member restarted at its address: removing its previous incarnation first"
            );
            self.propose_removal(old);
            return;
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = member.id;
        cc.context = member_bytes(&member).into();
        tracing::info!(member = member.id, name = %member.name, "proposing to add a member");
        if let Err(err) = self.node.propose_conf_change(vec![], cc) {
            tracing::warn!(error = %err, "cannot propose a member");
        }
    }

    /// The leader removes members silent past `remove_after`, one at a time.
    fn remove_silent(&mut self) {
        if !self.is_leader() || self.node.raft.has_pending_conf() {
            return;
        }
        let limit = self.remove_after.as_millis() as u64;
        let silent = self
            .liveness
            .iter()
            .find(|(id, ms)| *id != self.me.id && *ms >= limit && self.members.contains_key(id))
            .map(|(id, _)| *id);
        if let Some(id) = silent {
            tracing::warn!(member = id, "proposing to remove an unreachable member");
            self.propose_removal(id);
        }
    }

    fn propose_removal(&mut self, id: u64) {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = id;
        if let Err(err) = self.node.propose_conf_change(vec![], cc) {
            tracing::warn!(error = %err, "cannot propose a removal");
        }
        self.liveness.retain(|(m, _)| *m != id);
    }

    fn on_ready(&mut self) {
        if !self.node.has_ready() {
            return;
        }
        let store = self.node.raft.raft_log.store.mem.clone();
        let mut ready = self.node.ready();
        self.send_messages(ready.take_messages());
        let changed = !ready.entries().is_empty()
            || ready.hs().is_some()
            || *ready.snapshot() != Snapshot::default()
            || !ready.committed_entries().is_empty();
        if *ready.snapshot() != Snapshot::default() {
            let s = ready.snapshot().clone();
            tracing::debug!(
                index = s.get_metadata().index,
                bytes = s.data.len(),
                "installing a Raft snapshot"
            );
            if let Ok(r) = rmp_serde_from::<SnapshotRoster>(&s.data) {
                if r.epoch >= self.epoch {
                    self.epoch = r.epoch;
                    self.members = r.members.into_iter().map(|m| (m.id, m)).collect();
                }
            }
            if let Err(err) = store.wl().apply_snapshot(s) {
                tracing::error!(error = %err, "cannot apply a Raft snapshot");
                return;
            }
        }
        let committed = ready.take_committed_entries();
        self.apply(committed);
        if let Err(err) = store.wl().append(ready.entries()) {
            tracing::error!(error = %err, "cannot append Raft entries");
            return;
        }
        if let Some(hs) = ready.hs() {
            store.wl().set_hardstate(hs.clone());
        }
        // Messages that depend on what was just stored wait until it is
        // saved (votes, acknowledgements of entries).
        let persisted = ready.take_persisted_messages();
        let mut light = self.node.advance(ready);
        let changed = changed || light.commit_index().is_some();
        if let Some(commit) = light.commit_index() {
            store.wl().mut_hard_state().set_commit(commit);
        }
        let later = light.take_messages();
        let committed = light.take_committed_entries();
        let changed = changed || !committed.is_empty();
        self.apply(committed);
        self.node.advance_apply();
        if self.persist && changed {
            match self
                .saved()
                .map(|s| protocol::encode(&s).pop().unwrap_or_default())
            {
                Ok(bytes) => self.out.push(FromElection::Persist(ByteBuf::from(bytes))),
                Err(err) => tracing::error!(error = %err, "cannot read the Raft state to save it"),
            }
        }
        self.send_messages(persisted);
        self.send_messages(later);
        // Snapshots go over ZeroMQ without an acknowledgement: reported as
        // sent, the follower's progress goes back to probing, so a snapshot
        // that was lost is sent again when the probe is refused. Unreported,
        // raft-rs waits for it forever and the member never catches up
        // (the simulation found a roster stuck that way).
        for to in std::mem::take(&mut self.snapshots_sent) {
            self.node.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
        // A fresh leader records its own endpoints if the roster lacks them.
        if self.is_leader() && !self.members.contains_key(&self.me.id) {
            let data = rmp_entry(&RosterEntry::Upsert(self.me.clone()));
            let _ = self.node.propose(vec![], data);
            self.members.insert(self.me.id, self.me.clone());
        }
    }

    /// This member's Raft state as it is now, to save.
    pub fn saved(&self) -> raft::Result<SavedRaft> {
        let store = &self.node.raft.raft_log.store.mem;
        let state = store.initial_state()?;
        let first = store.first_index()?;
        let last = store.last_index()?;
        let snapshot_index = first - 1;
        let snapshot_term = store.term(snapshot_index)?;
        let entries = if last >= first {
            store.entries(first, last + 1, None, GetEntriesContext::empty(false))?
        } else {
            Vec::new()
        };
        let pb = |m: &dyn PbMessage| ByteBuf::from(m.write_to_bytes().unwrap_or_default());
        Ok(SavedRaft {
            id: self.me.id,
            hard_state: pb(&state.hard_state),
            conf_state: pb(&state.conf_state),
            snapshot_index,
            snapshot_term,
            entries: entries.iter().map(|e| pb(e)).collect(),
            epoch: self.epoch,
            members: self.members.values().cloned().collect(),
        })
    }

    fn send_messages(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                self.snapshots_sent.push(m.to);
            }
            match m.write_to_bytes() {
                Ok(bytes) => self.out.push(FromElection::Send {
                    to: m.to,
                    message: ByteBuf::from(bytes),
                }),
                Err(err) => tracing::warn!(error = %err, "cannot encode a Raft message"),
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        let store = self.node.raft.raft_log.store.mem.clone();
        for entry in entries {
            if entry.data.is_empty() {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if cc.merge_from_bytes(&entry.data).is_err() {
                        continue;
                    }
                    match cc.get_change_type() {
                        ConfChangeType::AddNode => {
                            if let Some(m) = member_from(&cc.context) {
                                tracing::info!(member = m.id, name = %m.name, "member added");
                                self.members.insert(m.id, m);
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            tracing::warn!(member = cc.node_id, "member removed");
                            self.members.remove(&cc.node_id);
                        }
                        ConfChangeType::AddLearnerNode => {}
                    }
                    match self.node.apply_conf_change(&cc) {
                        Ok(cs) => store.wl().set_conf_state(cs),
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot apply a membership change")
                        }
                    }
                    self.epoch = self.epoch.max(entry.index);
                }
                EntryType::EntryNormal => {
                    if let Ok(RosterEntry::Upsert(m)) = rmp_serde_from(&entry.data) {
                        self.members.insert(m.id, m);
                        self.epoch = self.epoch.max(entry.index);
                    }
                }
                EntryType::EntryConfChangeV2 => {}
            }
        }
    }

    fn publish_state(&mut self) {
        if let Ok(mut r) = self.roster_bytes.lock() {
            *r = protocol::encode(&SnapshotRoster {
                epoch: self.epoch,
                members: self.members.values().cloned().collect(),
            })
            .pop()
            .unwrap_or_default();
        }
        let leader = match self.node.raft.leader_id {
            0 => None,
            l => Some(l),
        };
        let term = self.node.raft.term;
        let key = (self.epoch, leader, term);
        if self.last_sent == Some(key) {
            return;
        }
        self.last_sent = Some(key);
        self.out.push(FromElection::State {
            epoch: self.epoch,
            members: self.members.values().cloned().collect(),
            leader,
            term,
        });
    }
}

/// Puts a saved Raft state into `mem`, and tells raft-rs that everything
/// committed was applied (the saved roster is the state as of the commit).
fn load(mem: &MemStorage, saved: &SavedRaft, config: &mut Config) -> raft::Result<()> {
    use raft::prelude::{ConfState, HardState};
    let bad = |what: &str| {
        raft::Error::Store(raft::StorageError::Other(
            format!("saved Raft state: bad {what}").into(),
        ))
    };
    let hs = HardState::parse_from_bytes(&saved.hard_state).map_err(|_| bad("hard state"))?;
    let cs = ConfState::parse_from_bytes(&saved.conf_state).map_err(|_| bad("configuration"))?;
    let mut entries = Vec::with_capacity(saved.entries.len());
    for e in &saved.entries {
        entries.push(Entry::parse_from_bytes(e).map_err(|_| bad("log entry"))?);
    }
    if saved.snapshot_index > 0 {
        let mut s = Snapshot::default();
        s.mut_metadata().index = saved.snapshot_index;
        s.mut_metadata().term = saved.snapshot_term;
        s.mut_metadata().set_conf_state(cs.clone());
        mem.wl().apply_snapshot(s)?;
    }
    mem.wl().append(&entries)?;
    mem.wl().set_conf_state(cs);
    config.applied = hs.commit.max(saved.snapshot_index);
    mem.wl().set_hardstate(hs);
    Ok(())
}

fn member_bytes(m: &Member) -> Vec<u8> {
    protocol::encode(m).pop().unwrap_or_default()
}

fn member_from(bytes: &[u8]) -> Option<Member> {
    rmp_serde_from(bytes).ok()
}

fn rmp_entry(e: &RosterEntry) -> Vec<u8> {
    protocol::encode(e).pop().unwrap_or_default()
}

/// Decodes a MessagePack body written by [`protocol::encode`].
fn rmp_serde_from<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, protocol::Error> {
    let frames = [&[][..], &protocol::frames::header()[..], bytes];
    protocol::decode(&frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn member(id: u64) -> Member {
        Member {
            id,
            name: format!("n{id}"),
            client: format!("tcp://h{id}:7000"),
            worker: format!("tcp://h{id}:7001"),
            peer: format!("tcp://h{id}:7002"),
            events: format!("tcp://h{id}:7003"),
        }
    }

    type Lose = Box<dyn FnMut(u64, &ToElection) -> bool>;

    /// Elections joined by a perfect network, driven by hand.
    struct Net {
        nodes: BTreeMap<u64, Election>,
        /// (to, message) in flight.
        wire: VecDeque<(u64, ToElection)>,
        /// Each node's last view.
        views: BTreeMap<u64, (u64, Vec<u64>, Option<u64>, u64)>,
        /// Messages (to, message) the network loses.
        lose: Option<Lose>,
        /// What each node last asked to save.
        saved: BTreeMap<u64, SavedRaft>,
    }

    impl Net {
        fn new() -> Net {
            Net {
                nodes: BTreeMap::new(),
                wire: VecDeque::new(),
                views: BTreeMap::new(),
                lose: None,
                saved: BTreeMap::new(),
            }
        }

        fn add(&mut self, id: u64, bootstrap: bool) {
            let config = ElectionConfig {
                me: member(id),
                bootstrap,
                remove_after: Duration::from_secs(2),
                saved: None,
                persist: true,
            };
            let e = Election::new(&config, id).unwrap();
            self.nodes.insert(id, e);
        }

        /// Node `id` starts again from the state it last asked to save.
        fn restart(&mut self, id: u64) {
            let saved = self.saved.get(&id).cloned();
            let config = ElectionConfig {
                me: member(id),
                bootstrap: false,
                remove_after: Duration::from_secs(2),
                saved,
                persist: true,
            };
            self.views.remove(&id);
            let e = Election::new(&config, id + 100).unwrap();
            self.nodes.insert(id, e);
        }

        fn take(&mut self, from: u64, out: Vec<FromElection>) {
            for msg in out {
                match msg {
                    FromElection::Send { to, message } => {
                        self.wire.push_back((to, ToElection::Raft(message)))
                    }
                    FromElection::ForwardJoin { leader, member } => {
                        self.wire.push_back((leader, ToElection::Join(member)))
                    }
                    FromElection::Dropped { .. } => {}
                    FromElection::Persist(bytes) => {
                        let frames = [&[][..], &protocol::frames::header()[..], &bytes[..]];
                        let s: SavedRaft = protocol::decode(&frames).expect("a saved state");
                        self.saved.insert(from, s);
                    }
                    FromElection::State {
                        epoch,
                        members,
                        leader,
                        term,
                    } => {
                        let ids = members.iter().map(|m| m.id).collect();
                        let before = self.views.insert(from, (epoch, ids, leader, term));
                        if let Some((e, ..)) = before {
                            assert!(epoch >= e, "node {from}'s epoch went back");
                        }
                    }
                }
            }
        }

        /// Delivers every message in flight, then ticks every node once.
        fn round(&mut self) {
            while let Some((to, msg)) = self.wire.pop_front() {
                if self.lose.as_mut().is_some_and(|lose| lose(to, &msg)) {
                    continue;
                }
                if let Some(e) = self.nodes.get_mut(&to) {
                    let out = e.handle(msg);
                    self.take(to, out);
                }
            }
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            for id in ids {
                let out = self.nodes.get_mut(&id).unwrap().tick();
                self.take(id, out);
            }
        }

        fn leaders(&self) -> Vec<u64> {
            self.nodes
                .iter()
                .filter(|(_, e)| e.is_leader())
                .map(|(id, _)| *id)
                .collect()
        }
    }

    #[test]
    fn a_bootstrapped_node_leads_and_others_join_through_any_member() {
        let mut net = Net::new();
        net.add(1, true);
        for _ in 0..30 {
            net.round();
        }
        assert_eq!(net.leaders(), vec![1]);
        net.add(2, false);
        net.add(3, false);
        // Node 3 asks node 2, a follower, which forwards to the leader.
        for _ in 0..60 {
            net.wire.push_back((1, ToElection::Join(member(2))));
            if net.views.get(&2).is_some_and(|v| v.1.contains(&2)) {
                net.wire.push_back((2, ToElection::Join(member(3))));
            }
            net.round();
        }
        for id in [1, 2, 3] {
            let (_, ids, leader, _) = &net.views[&id];
            assert_eq!(ids, &vec![1, 2, 3], "node {id}'s roster");
            assert_eq!(*leader, Some(1), "node {id}'s leader");
        }
        assert_eq!(net.leaders(), vec![1]);
    }

    #[test]
    fn the_leader_removes_a_silent_member_and_a_minority_elects_no_one() {
        let mut net = three();
        assert_eq!(net.views[&3].1, vec![1, 2, 3]);
        // Node 3 goes silent: the leader hears of it and removes it.
        net.nodes.remove(&3);
        for _ in 0..30 {
            net.wire
                .push_back((1, ToElection::Liveness(vec![(2, 0), (3, 5_000)])));
            net.round();
        }
        assert_eq!(net.views[&1].1, vec![1, 2]);
        assert_eq!(net.views[&2].1, vec![1, 2]);
        // The leader goes too: node 2 alone is not a majority of two.
        net.nodes.remove(&1);
        for _ in 0..60 {
            net.round();
        }
        assert!(net.leaders().is_empty(), "a minority elected itself");
    }

    /// A cluster of 1, 2 and 3, led by 1.
    fn three() -> Net {
        let mut net = Net::new();
        net.add(1, true);
        for _ in 0..30 {
            net.round();
        }
        for id in [2, 3] {
            net.add(id, false);
            for _ in 0..30 {
                net.wire.push_back((1, ToElection::Join(member(id))));
                net.round();
            }
        }
        assert_eq!(net.views[&3].1, vec![1, 2, 3]);
        net
    }

    #[test]
    fn a_cluster_restarted_from_its_saved_states_elects_a_leader_and_keeps_its_roster() {
        let mut net = three();
        let term = net.views[&1].3;
        for id in [1, 2, 3] {
            assert_eq!(net.saved[&id].id, id);
            assert!(net.saved[&id].has_state());
        }
        net.wire.clear();
        for id in [1, 2, 3] {
            net.restart(id);
        }
        for _ in 0..80 {
            net.round();
        }
        let leaders = net.leaders();
        assert_eq!(leaders.len(), 1, "leaders {leaders:?}");
        for id in [1, 2, 3] {
            let (_, ids, leader, t) = &net.views[&id];
            assert_eq!(ids, &vec![1, 2, 3], "node {id}'s roster");
            assert_eq!(*leader, Some(leaders[0]), "node {id}'s leader");
            assert!(*t > term, "a new term");
        }
    }

    #[test]
    fn a_member_restarted_alone_takes_its_place_again() {
        let mut net = three();
        net.restart(2);
        for _ in 0..40 {
            net.round();
        }
        assert_eq!(net.leaders(), vec![1]);
        assert_eq!(net.views[&2].1, vec![1, 2, 3]);
        assert_eq!(net.views[&2].2, Some(1));
    }

    fn raft_bytes(m: &Message) -> ToElection {
        ToElection::Raft(ByteBuf::from(m.write_to_bytes().unwrap()))
    }

    #[test]
    fn forged_misdirected_and_foreign_raft_messages_are_dropped_not_stepped() {
        use raft::prelude::MessageType;
        let mut net = three();
        let term = net.views[&2].3;
        let last = net.nodes[&2].node.raft.raft_log.last_index();
        // A heartbeat from the leader whose commit is past node 2's log:
        // raft-rs itself panics on it ("to_commit … is out of range").
        let mut forged = Message::default();
        forged.set_msg_type(MessageType::MsgHeartbeat);
        forged.from = 1;
        forged.to = 2;
        forged.term = term;
        forged.commit = last + 5;
        let mut bare = Election::new(
            &ElectionConfig {
                me: member(2),
                bootstrap: false,
                remove_after: Duration::from_secs(2),
                saved: None,
                persist: false,
            },
            2,
        )
        .unwrap();
        let raw = forged.clone();
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _ = bare.node.step(raw);
        }));
        assert!(
            stepped.is_err(),
            "raft-rs no longer panics: the guard may go"
        );
        let e2 = net.nodes.get_mut(&2).unwrap();
        e2.handle(raft_bytes(&forged));
        // Addressed to member 3; from a node outside the roster; a kind of
        // message peers never send (a proposal); bytes that are no message.
        let mut misdirected = forged.clone();
        misdirected.commit = 0;
        misdirected.to = 3;
        e2.handle(raft_bytes(&misdirected));
        let mut foreign = misdirected.clone();
        foreign.to = 2;
        foreign.from = 99;
        e2.handle(raft_bytes(&foreign));
        let mut proposal = Message::default();
        proposal.set_msg_type(MessageType::MsgPropose);
        proposal.from = 1;
        proposal.to = 2;
        e2.handle(raft_bytes(&proposal));
        e2.handle(ToElection::Raft(ByteBuf::from(vec![0xff; 9])));
        assert_eq!(e2.dropped(), 5);
        // Nothing changed: the same leader, the same roster, and node 2
        // still follows it.
        for _ in 0..40 {
            net.round();
        }
        assert_eq!(net.leaders(), vec![1]);
        assert_eq!(net.views[&2].1, vec![1, 2, 3]);
        assert_eq!(net.views[&2].2, Some(1));
    }

    #[test]
    fn a_lost_snapshot_is_sent_again() {
        use raft::prelude::MessageType;
        let mut net = Net::new();
        net.add(1, true);
        for _ in 0..30 {
            net.round();
        }
        net.add(2, false);
        // The network loses the first snapshot to node 2.
        let lost = std::rc::Rc::new(std::cell::Cell::new(0));
        let counter = lost.clone();
        net.lose = Some(Box::new(move |to, msg| {
            let snapshot = matches!(msg, ToElection::Raft(b) if to == 2
                && Message::parse_from_bytes(b)
                    .is_ok_and(|m| m.get_msg_type() == MessageType::MsgSnapshot));
            if snapshot && counter.get() == 0 {
                counter.set(1);
                return true;
            }
            false
        }));
        for _ in 0..80 {
            net.wire.push_back((1, ToElection::Join(member(2))));
            net.round();
        }
        assert_eq!(lost.get(), 1, "no snapshot was sent");
        assert_eq!(
            net.views.get(&2).map(|v| v.1.clone()),
            Some(vec![1, 2]),
            "node 2 never caught up"
        );
    }

    #[test]
    fn a_node_restarted_at_a_members_address_replaces_it_without_a_ghost() {
        let mut net = three();
        // Node 3 dies; it comes back on the same ports with a new id.
        net.nodes.remove(&3);
        let mut reborn = member(33);
        reborn.client = member(3).client;
        reborn.peer = member(3).peer;
        reborn.events = member(3).events;
        let config = ElectionConfig {
            me: reborn.clone(),
            bootstrap: false,
            remove_after: Duration::from_secs(60),
            saved: None,
            persist: false,
        };
        net.nodes.insert(33, Election::new(&config, 33).unwrap());
        for _ in 0..60 {
            // It asks a follower, which forwards to the leader.
            net.wire.push_back((2, ToElection::Join(reborn.clone())));
            net.round();
            for (id, v) in &net.views {
                assert!(
                    !(v.1.contains(&3) && v.1.contains(&33)),
                    "node {id} shows the old and the new incarnation together: {:?}",
                    v.1
                );
            }
        }
        for id in [1, 2, 33] {
            assert_eq!(net.views[&id].1, vec![1, 2, 33], "node {id}'s roster");
        }
        assert_eq!(net.leaders(), vec![1]);
    }

    #[test]
    fn the_same_seed_gives_the_same_election() {
        let run = || {
            let mut net = Net::new();
            for id in 1..=3 {
                net.add(id, id == 1);
            }
            for _ in 0..30 {
                for id in [2, 3] {
                    net.wire.push_back((1, ToElection::Join(member(id))));
                }
                net.round();
            }
            // The leader leaves: who wins, and in which term, is decided
            // by the seeded timeouts alone.
            net.nodes.remove(&1);
            let mut trace = Vec::new();
            for _ in 0..80 {
                net.round();
                trace.push(net.views.clone());
            }
            trace
        };
        let a = run();
        assert_eq!(a, run());
        let last = a.last().unwrap();
        assert!(
            last[&2].2.is_some_and(|l| l != 1),
            "no new leader: {last:?}"
        );
    }
}
