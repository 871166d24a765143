//! Leader election and the roster, on tikv's `raft` crate, in their own
//! thread. The thread owns the Raft state machine (sans-IO: messages in,
//! messages out) and talks to the node's I/O loop over an inproc PAIR
//! socket; Raft messages ride the ZeroMQ peer mesh that the I/O loop owns.
//!
//! The roster (members, their endpoints, an epoch) is the replicated
//! state: a member is added by a Raft `AddNode` whose context is the
//! member's record, removed by `RemoveNode`, and the first node records its
//! own endpoints with a normal entry once it leads. The epoch is the log
//! index of the last roster change, so "higher epoch" means "newer roster".
//! Raft snapshots carry the roster too (see `RosterStorage`), so a member
//! that catches up from a snapshot still learns every member's endpoints.
//!
//! Storage is in memory: a node without a data directory gets a new random
//! id at every start, so it joins as a new member and can never vote twice
//! in a term.

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

/// What the I/O loop sends the election thread.
#[derive(Serialize, Deserialize, Debug)]
pub enum ToElection {
    /// A Raft message from a peer.
    Raft(ByteBuf),
    /// A node asks to join (arrived here or forwarded by a peer).
    Join(Member),
    /// A peer's roster, newer than ours (by epoch): adopt it.
    Roster {
        epoch: u64,
        members: Vec<Member>,
    },
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
}

/// Election settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub me: Member,
    /// Start a new cluster (true) or wait to be added to one (false).
    pub bootstrap: bool,
    /// The leader removes a member silent this long.
    pub remove_after: Duration,
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

struct Election {
    me: Member,
    node: RawNode<RosterStorage>,
    roster_bytes: Arc<Mutex<Vec<u8>>>,
    members: BTreeMap<u64, Member>,
    epoch: u64,
    remove_after: Duration,
    last_sent: Option<(u64, Option<u64>, u64)>,
    liveness: Vec<(u64, u64)>,
}

/// Runs the election thread's loop on `pair` until `Stop`.
pub fn run(config: ElectionConfig, pair: zmq::Socket) {
    let mut e = match Election::new(&config) {
        Ok(e) => e,
        Err(err) => {
            tracing::error!(error = %err, "cannot start Raft");
            return;
        }
    };
    let mut next_tick = Instant::now() + TICK;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match pair.poll(zmq::POLLIN, wait.as_millis().max(1) as i64) {
            Ok(n) if n > 0 => {
                while let Ok(parts) = pair.recv_multipart(zmq::DONTWAIT) {
                    match protocol::decode::<ToElection, _>(&parts) {
                        Ok(ToElection::Stop) => return,
                        Ok(msg) => e.handle(msg, &pair),
                        Err(err) => tracing::warn!(error = %err, "bad message to election thread"),
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        if Instant::now() >= next_tick {
            e.node.tick();
            e.remove_silent();
            next_tick = Instant::now() + TICK;
        }
        e.on_ready(&pair);
        e.publish_state(&pair);
    }
}

fn send(pair: &zmq::Socket, msg: &FromElection) {
    let _ = pair.send_multipart(protocol::encode(msg), zmq::DONTWAIT);
}

impl Election {
    fn new(config: &ElectionConfig) -> raft::Result<Election> {
        let raft_config = Config {
            id: config.me.id,
            election_tick: 10,
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
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = RawNode::new(&raft_config, storage, &logger)?;
        let mut members = BTreeMap::new();
        if config.bootstrap {
            node.campaign()?;
            members.insert(config.me.id, config.me.clone());
        }
        Ok(Election {
            me: config.me.clone(),
            node,
            roster_bytes,
            members,
            epoch: 0,
            remove_after: config.remove_after,
            last_sent: None,
            liveness: Vec::new(),
        })
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn handle(&mut self, msg: ToElection, pair: &zmq::Socket) {
        match msg {
            ToElection::Raft(bytes) => match Message::parse_from_bytes(&bytes) {
                Ok(m) => {
                    let _ = self.node.step(m);
                }
                Err(err) => tracing::debug!(error = %err, "undecodable Raft message"),
            },
            ToElection::Join(member) => self.join(member, pair),
            ToElection::Roster { epoch, members } => {
                if epoch > self.epoch {
                    self.epoch = epoch;
                    self.members = members.into_iter().map(|m| (m.id, m)).collect();
                }
            }
            ToElection::Liveness(l) => self.liveness = l,
            ToElection::Stop => {}
        }
    }

    fn join(&mut self, member: Member, pair: &zmq::Socket) {
        if self.members.get(&member.id) == Some(&member) {
            return;
        }
        if !self.is_leader() {
            let leader = self.node.raft.leader_id;
            if leader != 0 && leader != self.me.id {
                send(pair, &FromElection::ForwardJoin { leader, member });
            }
            return;
        }
        if self.node.raft.has_pending_conf() {
            return; // the joiner retries
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
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::RemoveNode);
            cc.node_id = id;
            tracing::warn!(member = id, "proposing to remove an unreachable member");
            if let Err(err) = self.node.propose_conf_change(vec![], cc) {
                tracing::warn!(error = %err, "cannot propose a removal");
            }
            self.liveness.retain(|(m, _)| *m != id);
        }
    }

    fn on_ready(&mut self, pair: &zmq::Socket) {
        if !self.node.has_ready() {
            return;
        }
        let store = self.node.raft.raft_log.store.mem.clone();
        let mut ready = self.node.ready();
        self.send_messages(ready.take_messages(), pair);
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
        self.send_messages(ready.take_persisted_messages(), pair);
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            store.wl().mut_hard_state().set_commit(commit);
        }
        self.send_messages(light.take_messages(), pair);
        let committed = light.take_committed_entries();
        self.apply(committed);
        self.node.advance_apply();
        // A fresh leader records its own endpoints if the roster lacks them.
        if self.is_leader() && !self.members.contains_key(&self.me.id) {
            let data = rmp_entry(&RosterEntry::Upsert(self.me.clone()));
            let _ = self.node.propose(vec![], data);
            self.members.insert(self.me.id, self.me.clone());
        }
    }

    fn send_messages(&self, msgs: Vec<Message>, pair: &zmq::Socket) {
        for m in msgs {
            match m.write_to_bytes() {
                Ok(bytes) => send(
                    pair,
                    &FromElection::Send {
                        to: m.to,
                        message: ByteBuf::from(bytes),
                    },
                ),
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

    fn publish_state(&mut self, pair: &zmq::Socket) {
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
        send(
            pair,
            &FromElection::State {
                epoch: self.epoch,
                members: self.members.values().cloned().collect(),
                leader,
                term,
            },
        );
    }
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
