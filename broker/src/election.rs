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
    /// Messages to send, gathered by the current call.
    out: Vec<FromElection>,
}

/// Runs the election thread's loop on `pair` until `Stop`.
pub fn run(config: ElectionConfig, pair: zmq::Socket) {
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
                        Ok(msg) => send_all(&pair, e.handle(msg)),
                        Err(err) => tracing::warn!(error = %err, "bad message to election thread"),
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        if Instant::now() >= next_tick {
            send_all(&pair, e.tick());
            next_tick = Instant::now() + TICK;
        }
    }
}

fn send_all(pair: &zmq::Socket, msgs: Vec<FromElection>) {
    for msg in &msgs {
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
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = RawNode::new(&raft_config, storage, &logger)?;
        let mut members = BTreeMap::new();
        if config.bootstrap {
            node.campaign()?;
            members.insert(config.me.id, config.me.clone());
        }
        let mut e = Election {
            me: config.me.clone(),
            node,
            roster_bytes,
            members,
            epoch: 0,
            remove_after: config.remove_after,
            last_sent: None,
            liveness: Vec::new(),
            rng: seed,
            out: Vec::new(),
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
                Ok(m) => {
                    let _ = self.node.step(m);
                }
                Err(err) => tracing::debug!(error = %err, "undecodable Raft message"),
            },
            ToElection::Join(member) => self.join(member),
            ToElection::Liveness(l) => self.liveness = l,
            ToElection::Stop => {}
        }
        self.settle()
    }

    /// One Raft tick ([`TICK`]); returns the messages to send.
    pub fn tick(&mut self) -> Vec<FromElection> {
        self.node.tick();
        self.remove_silent();
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

    fn on_ready(&mut self) {
        if !self.node.has_ready() {
            return;
        }
        let store = self.node.raft.raft_log.store.mem.clone();
        let mut ready = self.node.ready();
        self.send_messages(ready.take_messages());
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
        self.send_messages(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            store.wl().mut_hard_state().set_commit(commit);
        }
        self.send_messages(light.take_messages());
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

    fn send_messages(&mut self, msgs: Vec<Message>) {
        for m in msgs {
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

    /// Elections joined by a perfect network, driven by hand.
    struct Net {
        nodes: BTreeMap<u64, Election>,
        /// (to, message) in flight.
        wire: VecDeque<(u64, ToElection)>,
        /// Each node's last view.
        views: BTreeMap<u64, (u64, Vec<u64>, Option<u64>, u64)>,
    }

    impl Net {
        fn new() -> Net {
            Net {
                nodes: BTreeMap::new(),
                wire: VecDeque::new(),
                views: BTreeMap::new(),
            }
        }

        fn add(&mut self, id: u64, bootstrap: bool) {
            let config = ElectionConfig {
                me: member(id),
                bootstrap,
                remove_after: Duration::from_secs(2),
            };
            let e = Election::new(&config, id).unwrap();
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
