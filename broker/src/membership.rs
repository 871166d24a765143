//! Cluster membership as this node sees it, sans-IO: who is in the
//! roster, which peers to connect to and disconnect from, when peers were
//! last heard from, what to tell the store and the election, and the
//! sequence numbers of the cluster events it publishes and receives.
//!
//! It owns no socket and reads no clock: the I/O loop ([`crate::node`])
//! and the cluster simulation ([`crate::sim`]) feed it messages and the
//! time, and carry out the [`Decision`]s it returns. Removing a member is
//! the election's decision (the leader proposes it after
//! [`crate::election::ElectionConfig::remove_after`] of silence, from the
//! liveness this module reports); this module only acts on the roster
//! the election commits.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use protocol::{ClusterEvent, ClusterInfo, EventBody, Member, NodeInfo, PeerMessage};

use crate::election::{FromElection, ToElection};
use crate::store::Command;

/// How often a node publishes its heartbeat and reports liveness to Raft.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A member not heard from this long is shown as not alive.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(3);
/// A member not heard from this long (three heartbeats) is suspected: the
/// store places new tasks past it ([`Command::Suspects`]) until it is heard
/// again or the leader removes it.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(1500);
/// How often a joining node repeats its request.
pub const JOIN_EVERY: Duration = Duration::from_secs(1);

/// What membership asks the I/O loop to do.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // made once per roster change or message
pub enum Decision {
    /// Connect a DEALER to this member's peer port and subscribe to its
    /// events.
    Connect(Member),
    /// Drop the DEALER to, and the subscription of, a former member.
    Disconnect(Member),
    /// Send to a peer over the peer mesh.
    SendPeer { to: u64, msg: PeerMessage },
    /// Publish on this node's events port.
    Publish(ClusterEvent),
    /// Hand to the store.
    Store(Command),
    /// Hand to the election.
    Election(ToElection),
    /// Send on the connection to the `--join` target.
    Join(PeerMessage),
    /// This node is in the roster: the `--join` connection can go.
    Joined,
}

/// The election's view, as [`FromElection::State`] carries it.
struct View {
    epoch: u64,
    members: Vec<Member>,
    leader: Option<u64>,
    term: u64,
}

/// This node's view of the cluster.
pub struct Membership {
    me: Member,
    /// Nodes holding each task.
    replicas: u32,
    replica_offset: Duration,
    /// Waiting to be added to a cluster (started with `--join`).
    joining: bool,
    /// Restarted from its data directory: a member by its saved roster,
    /// it asks to join again until a leader is heard, in case it was
    /// removed while it was down (the leader adds it back; a member's
    /// request changes nothing).
    rejoining: bool,
    /// The roster as the election last reported it.
    members: Vec<Member>,
    /// Members a DEALER is connected to.
    connected: BTreeSet<u64>,
    leader: Option<u64>,
    term: u64,
    epoch: u64,
    /// When each peer was last heard from (any message or event).
    heard: BTreeMap<u64, Instant>,
    started: Instant,
    tasks_by_node: BTreeMap<u64, u64>,
    /// Sequence of this node's published events.
    seq: u64,
    last_seq: BTreeMap<u64, u64>,
    /// Cluster events missed (sequence gaps), for operators.
    pub missed_events: u64,
    /// Raft messages the election dropped (as it last reported).
    raft_dropped: u64,
    last_beat: Instant,
    last_join: Option<Instant>,
    /// The suspects last told to the store.
    suspects: Vec<u64>,
}

impl Membership {
    /// A node's membership at `now`; `joining` when it waits to be added
    /// to an existing cluster.
    pub fn new(
        me: Member,
        replicas: u32,
        replica_offset: Duration,
        joining: bool,
        now: Instant,
    ) -> Membership {
        Membership {
            me,
            replicas: replicas.max(1),
            replica_offset,
            joining,
            rejoining: false,
            members: Vec::new(),
            connected: BTreeSet::new(),
            leader: None,
            term: 0,
            epoch: 0,
            heard: BTreeMap::new(),
            started: now,
            tasks_by_node: BTreeMap::new(),
            seq: 0,
            last_seq: BTreeMap::new(),
            missed_events: 0,
            raft_dropped: 0,
            last_beat: now,
            last_join: None,
            suspects: Vec::new(),
        }
    }

    /// See `rejoining`.
    pub fn rejoin(&mut self) {
        self.rejoining = true;
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn leader(&self) -> Option<u64> {
        self.leader
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn is_member(&self) -> bool {
        self.members.iter().any(|m| m.id == self.me.id)
    }

    /// What the node does before it reads any socket: the store learns
    /// this node's id (so its first answers to peers name it, not 0), and
    /// a node started to join refuses clients from its very first request.
    pub fn start(&mut self, out: &mut Vec<Decision>) {
        out.push(Decision::Store(Command::Identity(self.me.id)));
        if self.joining {
            out.push(Decision::Store(Command::Joining(true)));
        }
    }

    /// Stamps `body` as this node's next cluster event.
    pub fn publish(&mut self, body: EventBody) -> ClusterEvent {
        self.seq += 1;
        ClusterEvent {
            from: self.me.id,
            seq: self.seq,
            body,
        }
    }

    /// What is due at `now`: every [`HEARTBEAT_EVERY`], the heartbeat
    /// (with `tasks`, this node's task count), the peers' liveness for
    /// the election, and while joining, the join request again.
    pub fn tick(&mut self, now: Instant, tasks: u64, out: &mut Vec<Decision>) {
        if now.duration_since(self.last_beat) < HEARTBEAT_EVERY {
            return;
        }
        self.last_beat = now;
        let beat = self.publish(EventBody::Heartbeat {
            tasks,
            epoch: self.epoch,
        });
        out.push(Decision::Publish(beat));
        let liveness: Vec<(u64, u64)> = self
            .members
            .iter()
            .filter(|m| m.id != self.me.id)
            .map(|m| {
                let since = self.heard.get(&m.id).copied().unwrap_or(self.started);
                (m.id, now.duration_since(since).as_millis() as u64)
            })
            .collect();
        let suspects: Vec<u64> = liveness
            .iter()
            .filter(|(_, ms)| *ms >= SUSPECT_AFTER.as_millis() as u64)
            .map(|(id, _)| *id)
            .collect();
        out.push(Decision::Election(ToElection::Liveness(liveness)));
        if suspects != self.suspects {
            if !suspects.is_empty() {
                tracing::info!(
                    ?suspects,
                    "members not heard from lately: new tasks go past them"
                );
            }
            self.suspects = suspects.clone();
            out.push(Decision::Store(Command::Suspects(suspects)));
        }
        // Joining ends once this node is a member; rejoining once it also
        // hears a leader.
        let done = if self.joining {
            self.is_member()
        } else if self.rejoining {
            self.leader.is_some() && self.is_member()
        } else {
            return;
        };
        if done {
            self.joining = false;
            self.rejoining = false;
            out.push(Decision::Joined);
        } else if self
            .last_join
            .is_none_or(|t| now.duration_since(t) >= JOIN_EVERY)
        {
            self.last_join = Some(now);
            out.push(Decision::Join(PeerMessage::Join {
                member: self.me.clone(),
            }));
        }
    }

    /// What the election says, at `now`.
    pub fn from_election(&mut self, msg: FromElection, now: Instant, out: &mut Vec<Decision>) {
        match msg {
            FromElection::Send { to, message } => out.push(Decision::SendPeer {
                to,
                msg: PeerMessage::Raft {
                    from: self.me.id,
                    message,
                },
            }),
            FromElection::ForwardJoin { leader, member } => out.push(Decision::SendPeer {
                to: leader,
                msg: PeerMessage::Join { member },
            }),
            FromElection::Dropped { total } => self.raft_dropped = total,
            // Saved by the election thread itself.
            FromElection::Persist(_) => {}
            FromElection::State {
                epoch,
                members,
                leader,
                term,
            } => self.on_state(
                View {
                    epoch,
                    members,
                    leader,
                    term,
                },
                now,
                out,
            ),
        }
    }

    /// A new view from Raft: connect to new members, drop gone ones, and
    /// tell the store the new roster.
    fn on_state(&mut self, view: View, now: Instant, out: &mut Vec<Decision>) {
        let View {
            epoch,
            members,
            leader,
            term,
        } = view;
        if leader != self.leader {
            tracing::info!(?leader, term, "leader changed");
        }
        self.leader = leader;
        self.term = term;
        let changed = epoch != self.epoch || members != self.members;
        self.epoch = epoch;
        if !changed {
            return;
        }
        let me = self.me.id;
        // Gone members first: a member restarted on its old ports has the
        // same endpoints under a new id, and disconnecting the old one's
        // endpoint after connecting the new one's would cut the new one.
        let gone: Vec<u64> = self
            .connected
            .iter()
            .copied()
            .filter(|id| !members.iter().any(|m| m.id == *id))
            .collect();
        for id in gone {
            self.connected.remove(&id);
            if let Some(m) = self.members.iter().find(|m| m.id == id) {
                out.push(Decision::Disconnect(m.clone()));
                // A member already connected at the same endpoints (its
                // successor, added before it was removed) lost its
                // connections with it: connect again.
                for other in members.iter().filter(|o| {
                    o.id != me
                        && self.connected.contains(&o.id)
                        && (o.events == m.events || o.peer == m.peer)
                }) {
                    out.push(Decision::Connect(other.clone()));
                }
            }
            self.heard.remove(&id);
            self.tasks_by_node.remove(&id);
            self.last_seq.remove(&id);
        }
        for m in &members {
            if m.id != me && self.connected.insert(m.id) {
                out.push(Decision::Connect(m.clone()));
                // A new peer gets the full silence allowance from now.
                self.heard.entry(m.id).or_insert(now);
            }
        }
        self.members = members;
        tracing::info!(epoch, members = self.members.len(), "roster changed");
        if self.joining && self.is_member() {
            // Serve at once; the join connection goes at the next tick.
            out.push(Decision::Store(Command::Joining(false)));
        }
        let ids: Vec<u64> = if self.is_member() {
            self.members.iter().map(|m| m.id).collect()
        } else {
            Vec::new()
        };
        out.push(Decision::Store(Command::Roster {
            me,
            members: ids,
            replicas: self.replicas,
        }));
    }

    /// A message from a peer: Raft and joins go to the election, the rest
    /// to the store.
    pub fn on_peer(&mut self, msg: PeerMessage, now: Instant, out: &mut Vec<Decision>) {
        let from = match &msg {
            PeerMessage::Raft { from, .. }
            | PeerMessage::Store { from, .. }
            | PeerMessage::StoreResult { from, .. }
            | PeerMessage::Request { from, .. }
            | PeerMessage::Reply { from, .. } => Some(*from),
            PeerMessage::Join { .. } | PeerMessage::Discard { .. } => None,
        };
        if let Some(f) = from {
            self.hear(f, now);
        }
        out.push(match msg {
            PeerMessage::Raft { message, .. } => Decision::Election(ToElection::Raft(message)),
            PeerMessage::Join { member } => Decision::Election(ToElection::Join(member)),
            other => Decision::Store(Command::Peer(other)),
        });
    }

    /// A cluster event from a peer's events port: heartbeats are kept
    /// here, the rest go to the store. Our own events are ignored.
    pub fn on_event(&mut self, ev: ClusterEvent, now: Instant, out: &mut Vec<Decision>) {
        if ev.from == self.me.id {
            return;
        }
        self.hear(ev.from, now);
        if let Some(last) = self.last_seq.insert(ev.from, ev.seq) {
            if ev.seq > last + 1 {
                self.missed_events += ev.seq - last - 1;
            }
        }
        match ev.body {
            EventBody::Heartbeat { tasks, .. } => {
                self.tasks_by_node.insert(ev.from, tasks);
            }
            body => out.push(Decision::Store(Command::PeerEvent(body))),
        }
    }

    /// Remembers hearing from a member (others are not tracked: the map
    /// is bounded by the roster).
    fn hear(&mut self, from: u64, now: Instant) {
        if self.members.iter().any(|m| m.id == from) {
            self.heard.insert(from, now);
        }
    }

    /// The cluster part of the `stats` answer.
    pub fn figures(&self, now: Instant, re_replicated: u64) -> protocol::ClusterFigures {
        protocol::ClusterFigures {
            members: self.members.len() as u64,
            leader: self.leader,
            is_leader: self.leader == Some(self.me.id),
            term: self.term,
            epoch: self.epoch,
            re_replicated,
            peers: self
                .members
                .iter()
                .filter(|m| m.id != self.me.id)
                .map(|m| {
                    let alive = self
                        .heard
                        .get(&m.id)
                        .is_some_and(|t| now.duration_since(*t) < ALIVE_WITHIN);
                    (m.name.clone(), alive)
                })
                .collect(),
        }
    }

    /// The answer to `cluster_info`; `tasks` and `re_replicated` are this
    /// node's own figures.
    pub fn cluster_info(&self, now: Instant, tasks: u64, re_replicated: u64) -> ClusterInfo {
        let nodes = self
            .members
            .iter()
            .map(|m| NodeInfo {
                id: m.id,
                name: m.name.clone(),
                client: m.client.clone(),
                worker: m.worker.clone(),
                alive: m.id == self.me.id
                    || self
                        .heard
                        .get(&m.id)
                        .is_some_and(|t| now.duration_since(*t) < ALIVE_WITHIN),
                leader: Some(m.id) == self.leader,
                tasks: if m.id == self.me.id {
                    tasks
                } else {
                    self.tasks_by_node.get(&m.id).copied().unwrap_or(0)
                },
            })
            .collect();
        ClusterInfo {
            node: self.me.id,
            leader: self.leader,
            term: self.term,
            epoch: self.epoch,
            replicas: self.replicas,
            replica_offset: self.replica_offset.as_secs_f64(),
            nodes,
            re_replicated,
            dropped_peer_messages: self.raft_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64) -> Member {
        Member {
            id,
            name: format!("n{id}"),
            client: format!("tcp://h:{}", 7000 + id * 10),
            worker: format!("tcp://h:{}", 7001 + id * 10),
            peer: format!("tcp://h:{}", 7002 + id * 10),
            events: format!("tcp://h:{}", 7003 + id * 10),
        }
    }

    fn state(epoch: u64, ids: &[u64]) -> FromElection {
        FromElection::State {
            epoch,
            members: ids.iter().map(|i| member(*i)).collect(),
            leader: Some(ids[0]),
            term: 1,
        }
    }

    #[test]
    fn a_roster_change_connects_the_new_and_drops_the_gone() {
        let t0 = Instant::now();
        let mut m = Membership::new(member(1), 2, Duration::from_secs(5), false, t0);
        let mut out = Vec::new();
        m.from_election(state(3, &[1, 2, 3]), t0, &mut out);
        let connects: Vec<u64> = out
            .iter()
            .filter_map(|d| match d {
                Decision::Connect(m) => Some(m.id),
                _ => None,
            })
            .collect();
        assert_eq!(connects, vec![2, 3]);
        assert!(matches!(
            out.last(),
            Some(Decision::Store(Command::Roster { me: 1, members, replicas: 2 })) if members == &vec![1, 2, 3]
        ));
        out.clear();
        // The same view again changes nothing.
        m.from_election(state(3, &[1, 2, 3]), t0, &mut out);
        assert!(out.is_empty(), "{out:?}");
        m.from_election(state(4, &[1, 3]), t0, &mut out);
        assert!(matches!(&out[0], Decision::Disconnect(m) if m.id == 2));
        assert!(matches!(
            &out[1],
            Decision::Store(Command::Roster { members, .. }) if members == &vec![1, 3]
        ));
    }

    #[test]
    fn a_node_outside_the_roster_gives_the_store_no_members() {
        let t0 = Instant::now();
        let mut m = Membership::new(member(9), 2, Duration::from_secs(5), true, t0);
        let mut out = Vec::new();
        m.from_election(state(2, &[1, 2]), t0, &mut out);
        assert!(matches!(
            out.last(),
            Some(Decision::Store(Command::Roster { members, .. })) if members.is_empty()
        ));
    }

    #[test]
    fn heartbeats_liveness_and_join_retries_follow_the_clock() {
        let t0 = Instant::now();
        let mut m = Membership::new(member(9), 2, Duration::from_secs(5), true, t0);
        let mut out = Vec::new();
        // Before any socket is read, the store learns the node's id, and
        // that it refuses clients until the node is a member.
        m.start(&mut out);
        assert!(
            matches!(
                out.as_slice(),
                [
                    Decision::Store(Command::Identity(9)),
                    Decision::Store(Command::Joining(true))
                ]
            ),
            "{out:?}"
        );
        out.clear();
        m.tick(t0, 0, &mut out);
        assert!(out.is_empty(), "nothing before the first interval");
        let t1 = t0 + HEARTBEAT_EVERY;
        m.tick(t1, 4, &mut out);
        assert!(matches!(
            &out[0],
            Decision::Publish(ClusterEvent {
                seq: 1,
                body: EventBody::Heartbeat { tasks: 4, .. },
                ..
            })
        ));
        assert!(matches!(&out[1], Decision::Election(ToElection::Liveness(l)) if l.is_empty()));
        assert!(matches!(&out[2], Decision::Join(PeerMessage::Join { .. })));
        out.clear();
        // Within JOIN_EVERY of the last request: no new one.
        m.tick(t1 + HEARTBEAT_EVERY, 4, &mut out);
        assert!(!out.iter().any(|d| matches!(d, Decision::Join(_))));
        out.clear();
        // Added: the join connection goes, and peers' silence is reported.
        m.from_election(state(5, &[1, 9]), t0, &mut out);
        out.clear();
        let t3 = t1 + 4 * HEARTBEAT_EVERY;
        m.tick(t3, 4, &mut out);
        assert!(out.iter().any(|d| matches!(d, Decision::Joined)));
        let silence = out.iter().find_map(|d| match d {
            Decision::Election(ToElection::Liveness(l)) => Some(l.clone()),
            _ => None,
        });
        assert_eq!(silence, Some(vec![(1, 2500)]));
    }

    #[test]
    fn peer_messages_and_events_are_routed_and_gaps_counted() {
        let t0 = Instant::now();
        let mut m = Membership::new(member(1), 2, Duration::from_secs(5), false, t0);
        let mut out = Vec::new();
        m.from_election(state(3, &[1, 2]), t0, &mut out);
        out.clear();
        m.on_peer(
            PeerMessage::Raft {
                from: 2,
                message: Default::default(),
            },
            t0,
            &mut out,
        );
        m.on_peer(PeerMessage::Discard { id: "x".into() }, t0, &mut out);
        assert!(matches!(out[0], Decision::Election(ToElection::Raft(_))));
        assert!(matches!(out[1], Decision::Store(Command::Peer(_))));
        out.clear();
        let ev = |seq, body| ClusterEvent { from: 2, seq, body };
        m.on_event(
            ev(1, EventBody::Heartbeat { tasks: 7, epoch: 3 }),
            t0,
            &mut out,
        );
        m.on_event(
            ev(
                4,
                EventBody::Claimed {
                    id: "t".into(),
                    deadline_us: 1,
                },
            ),
            t0,
            &mut out,
        );
        assert_eq!(m.missed_events, 2);
        assert!(matches!(
            out.as_slice(),
            [Decision::Store(Command::PeerEvent(_))]
        ));
        let info = m.cluster_info(t0, 3, 0);
        let tasks: Vec<(u64, u64, bool)> = info
            .nodes
            .iter()
            .map(|n| (n.id, n.tasks, n.alive))
            .collect();
        assert_eq!(tasks, vec![(1, 3, true), (2, 7, true)]);
        assert!(!m.cluster_info(t0 + ALIVE_WITHIN, 3, 0).nodes[1].alive);
    }
}
