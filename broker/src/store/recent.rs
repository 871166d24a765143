//! Replies remembered for request deduplication (a resent request gets its
//! first reply and is not acted on twice), kept compact because one entry
//! stays per enqueue for ten minutes, and a million pending tasks may mean
//! a million entries:
//!
//! * entries live in one ring buffer in expiry order, 40 bytes each: a
//!   64-bit hash of the request id, its expiry, and an `enqueued` reply as
//!   its task id, eta and replica count (its queue is the resent
//!   request's own); other replies are boxed to the side, a batch's
//!   `enqueued` results as compactly (32 bytes each);
//! * the cap counts a batch as one entry per result, so it bounds memory
//!   whatever the batch sizes;
//! * the lookup table holds only each entry's 32-bit position, 5 bytes a
//!   slot.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use hashbrown::HashTable;
use protocol::ReplyBody;
use uuid::Uuid;

struct Entry {
    key: u64,
    /// Seconds from `Recent::base_s`, rounded up (4 bytes instead of 8).
    expires_s: u32,
    /// The `enqueued` reply's task id (nil for another reply, kept in
    /// `others`).
    id: Uuid,
    eta: f64,
    replicas: u32,
}

// An entry must stay at 40 bytes (see the module's comment).
const _: () = assert!(std::mem::size_of::<Entry>() <= 40);

/// A remembered reply other than a single `enqueued`.
enum Kept {
    Batch(Box<[Item]>),
    Other(Box<ReplyBody>),
}

/// One result of a remembered batch.
enum Item {
    Enqueued { id: Uuid, eta: f64, replicas: u32 },
    Other(Box<ReplyBody>),
}

const _: () = assert!(std::mem::size_of::<Item>() <= 32);

impl Item {
    fn of(body: &ReplyBody) -> Item {
        match compact(body) {
            Some((id, eta, replicas)) => Item::Enqueued { id, eta, replicas },
            None => Item::Other(Box::new(body.clone())),
        }
    }
}

/// An `enqueued` reply's id, eta and replicas, when that is all it says.
fn compact(body: &ReplyBody) -> Option<(Uuid, f64, u32)> {
    match body {
        ReplyBody::Enqueued {
            id,
            eta,
            result: None,
            replicas,
            ..
        } => Uuid::parse_str(id)
            .ok()
            .filter(|u| !u.is_nil())
            .map(|u| (u, *eta, *replicas)),
        _ => None,
    }
}

fn enqueued(id: Uuid, queue: &str, eta: f64, replicas: u32) -> ReplyBody {
    ReplyBody::Enqueued {
        id: id.to_string(),
        queue: queue.to_string(),
        eta,
        result: None,
        replicas,
    }
}

#[derive(Default)]
pub struct Recent {
    /// Oldest first; `entries[i]` has position `head + i` (mod 2³²).
    entries: VecDeque<Entry>,
    head: u32,
    /// Positions of the entries, hashed by their key.
    index: HashTable<u32>,
    others: HashMap<u64, Kept>,
    /// Results held by the batches in `others`.
    batch_results: usize,
    /// Unix seconds that entries' `expires_s` count from: 2³¹ s (68 years)
    /// before the first expiry, so times on either side of it fit in a
    /// `u32` (absolute unix seconds would stop fitting in 2106, found by
    /// the store fuzz target).
    base_s: Option<u64>,
}

/// A request id's key: SipHash-2-4 with zero keys. The journal keeps
/// keys, not request ids, so the function must never change; std's
/// `DefaultHasher` does not promise that, `SipHasher` names its
/// algorithm (it is deprecated only in favour of crates that do the same).
pub fn key(request_id: &str) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0, 0);
    request_id.hash(&mut h);
    h.finish()
}

/// A remembered reply as the journal records it (`STORAGE.md`): the
/// request id's key, its expiry, and the reply in the compact form kept
/// here (an `enqueued` reply without its queue, which the resend names).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedReply {
    pub key: u64,
    pub expires_us: u64,
    pub reply: SavedBody,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SavedBody {
    Enqueued { id: u128, eta: f64, replicas: u32 },
    Batch(Vec<SavedBody>),
    Other(Box<ReplyBody>),
}

impl Recent {
    /// An expiry in unix µs as seconds from the base. An expiry more
    /// than 68 years from the base's middle moves the base there, and
    /// forgets every entry: their expiries (a dedup window after they
    /// were made) lie decades before or after this one, so they are
    /// long expired, or come from a clock that jumped that far.
    fn relative(&mut self, expires_us: u64) -> u32 {
        let s = expires_us.div_ceil(1_000_000);
        let fits = |base: u64| s >= base && s - base <= u64::from(u32::MAX);
        let base = match self.base_s {
            Some(base) if fits(base) => base,
            _ => {
                while !self.entries.is_empty() {
                    self.pop_oldest();
                }
                let base = s.saturating_sub(1 << 31);
                self.base_s = Some(base);
                base
            }
        };
        u32::try_from(s - base).unwrap_or(u32::MAX)
    }

    /// The unix µs of an entry's `expires_s`.
    fn absolute_us(&self, expires_s: u32) -> u64 {
        (self.base_s.unwrap_or(0) + u64::from(expires_s)).saturating_mul(1_000_000)
    }

    fn entry(&self, pos: u32) -> Option<&Entry> {
        self.entries.get(pos.wrapping_sub(self.head) as usize)
    }

    /// Where the entry keyed `k` is in the ring.
    fn position(&self, k: u64) -> Option<u32> {
        self.index
            .find(k, |&p| self.entry(p).is_some_and(|e| e.key == k))
            .copied()
    }

    /// The remembered reply to `request_id`, whose request names `queue`.
    pub fn get(&self, request_id: &str, queue: &str) -> Option<ReplyBody> {
        let k = key(request_id);
        let e = self.entry(self.position(k)?)?;
        if !e.id.is_nil() {
            return Some(enqueued(e.id, queue, e.eta, e.replicas));
        }
        Some(match self.others.get(&k)? {
            Kept::Other(b) => (**b).clone(),
            Kept::Batch(items) => ReplyBody::Batch {
                results: items
                    .iter()
                    .map(|i| match i {
                        Item::Enqueued { id, eta, replicas } => {
                            enqueued(*id, queue, *eta, *replicas)
                        }
                        Item::Other(b) => (**b).clone(),
                    })
                    .collect(),
            },
        })
    }

    /// Remembers `body` until `expires_us`, dropping the oldest entries
    /// beyond `max` (a batch counts once per result).
    /// Returns the request id's key (for [`Recent::export_key`]).
    pub fn insert(
        &mut self,
        request_id: &str,
        body: &ReplyBody,
        expires_us: u64,
        max: usize,
    ) -> u64 {
        let k = key(request_id);
        self.insert_keyed(k, body, expires_us, max);
        k
    }

    fn insert_keyed(&mut self, k: u64, body: &ReplyBody, expires_us: u64, max: usize) {
        while !self.entries.is_empty()
            && self.entries.len() + self.batch_results >= max.clamp(1, u32::MAX as usize / 2)
        {
            self.pop_oldest();
        }
        if let Some(pos) = self.position(k) {
            // The first reply stands; but a copy stored here for another
            // coordinator (marked `replicas` 0) gives way to this node's
            // own answer to the same request.
            let head = self.head;
            let held = self.entries.get_mut(pos.wrapping_sub(head) as usize);
            if let (Some(e), Some((id, eta, replicas))) = (held, compact(body)) {
                if e.replicas == 0 && !e.id.is_nil() {
                    (e.id, e.eta, e.replicas) = (id, eta, replicas);
                }
            }
            return;
        }
        let mut e = Entry {
            key: k,
            expires_s: self.relative(expires_us),
            id: Uuid::nil(),
            eta: 0.0,
            replicas: 0,
        };
        if let Some((id, eta, replicas)) = compact(body) {
            (e.id, e.eta, e.replicas) = (id, eta, replicas);
        } else if let ReplyBody::Batch { results } = body {
            self.batch_results += results.len();
            let items = results.iter().map(Item::of).collect();
            self.others.insert(k, Kept::Batch(items));
        } else {
            self.others.insert(k, Kept::Other(Box::new(body.clone())));
        }
        let pos = self.head.wrapping_add(self.entries.len() as u32);
        self.entries.push_back(e);
        self.index.insert_unique(k, pos, |&p| {
            // Rehashing: every position in the table is a live entry.
            self.entries
                .get(p.wrapping_sub(self.head) as usize)
                .map_or(0, |e| e.key)
        });
    }

    fn pop_oldest(&mut self) {
        let Some(e) = self.entries.pop_front() else {
            return;
        };
        let pos = self.head;
        self.head = self.head.wrapping_add(1);
        if let Ok(found) = self.index.find_entry(e.key, |&p| p == pos) {
            found.remove();
        }
        if e.id.is_nil() {
            if let Some(Kept::Batch(items)) = self.others.remove(&e.key) {
                self.batch_results -= items.len();
            }
        }
    }

    /// Forgets entries that expired by `now_us`.
    pub fn expire(&mut self, now_us: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| self.absolute_us(e.expires_s) <= now_us)
        {
            self.pop_oldest();
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The positions held now, oldest first: `(first, count)`.
    pub fn positions(&self) -> (u32, u32) {
        (self.head, self.entries.len() as u32)
    }

    /// The entry of a request id's key, as the journal records it.
    pub fn export_key(&self, k: u64) -> Option<SavedReply> {
        self.export_at(self.position(k)?)
    }

    /// The entry at position `pos`, if it is still held.
    pub fn export_at(&self, pos: u32) -> Option<SavedReply> {
        let offset = pos.wrapping_sub(self.head);
        if offset >= self.entries.len() as u32 {
            return None;
        }
        let e = self.entry(pos)?;
        let reply = if !e.id.is_nil() {
            SavedBody::Enqueued {
                id: e.id.as_u128(),
                eta: e.eta,
                replicas: e.replicas,
            }
        } else {
            match self.others.get(&e.key)? {
                Kept::Other(b) => SavedBody::Other(b.clone()),
                Kept::Batch(items) => SavedBody::Batch(
                    items
                        .iter()
                        .map(|i| match i {
                            Item::Enqueued { id, eta, replicas } => SavedBody::Enqueued {
                                id: id.as_u128(),
                                eta: *eta,
                                replicas: *replicas,
                            },
                            Item::Other(b) => SavedBody::Other(b.clone()),
                        })
                        .collect(),
                ),
            }
        };
        Some(SavedReply {
            key: e.key,
            expires_us: self.absolute_us(e.expires_s),
            reply,
        })
    }

    /// Takes back an entry the journal recorded (a later record of the
    /// same key replaces the earlier one).
    pub fn import(&mut self, saved: SavedReply, max: usize) {
        let body = |b: SavedBody| match b {
            SavedBody::Enqueued { id, eta, replicas } => {
                enqueued(Uuid::from_u128(id), "", eta, replicas)
            }
            SavedBody::Other(b) => *b,
            // A batch holds no batch.
            SavedBody::Batch(_) => ReplyBody::Batch {
                results: Vec::new(),
            },
        };
        let reply = match saved.reply {
            SavedBody::Batch(items) => ReplyBody::Batch {
                results: items.into_iter().map(body).collect(),
            },
            other => body(other),
        };
        if let Some(pos) = self.position(saved.key) {
            // A later record of the same entry: its own replica count.
            let head = self.head;
            if let (Some(e), Some((id, eta, replicas))) = (
                self.entries.get_mut(pos.wrapping_sub(head) as usize),
                compact(&reply),
            ) {
                (e.id, e.eta, e.replicas) = (id, eta, replicas);
            }
            return;
        }
        self.insert_keyed(saved.key, &reply, saved.expires_us, max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enqueued(id: Uuid, eta: f64) -> ReplyBody {
        ReplyBody::Enqueued {
            id: id.to_string(),
            queue: "q".into(),
            eta,
            result: None,
            replicas: 2,
        }
    }

    #[test]
    fn remembers_expires_and_caps() {
        let mut r = Recent::default();
        let ids: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            r.insert(
                &format!("req-{i}"),
                &enqueued(*id, i as f64),
                (1000 + i as u64) * 1_000_000,
                50,
            );
        }
        // Capped at 50: the oldest 50 are gone, the newest 50 answer.
        assert_eq!(r.len(), 50);
        assert_eq!(r.get("req-10", "q"), None);
        assert_eq!(
            r.get("req-60", "other"),
            Some(ReplyBody::Enqueued {
                id: ids[60].to_string(),
                queue: "other".into(),
                eta: 60.0,
                result: None,
                replicas: 2,
            })
        );
        // A second insert under the same id keeps the first reply.
        r.insert("req-60", &enqueued(Uuid::new_v4(), 1.0), 5_000_000_000, 50);
        assert!(
            matches!(r.get("req-60", "q"), Some(ReplyBody::Enqueued { eta, .. }) if eta == 60.0)
        );
        // Other replies are kept whole.
        let dup = ReplyBody::Duplicate {
            id: "x".into(),
            tombstoned: true,
        };
        r.insert("dup", &dup, 2_000_000_000, 50);
        assert_eq!(r.get("dup", "q"), Some(dup));
        // Expiry drops everything up to the time, oldest first.
        r.expire(1_074_000_000);
        assert_eq!(r.get("req-74", "q"), None);
        assert!(r.get("req-75", "q").is_some());
        r.expire(u64::MAX);
        assert_eq!(r.len(), 0);
        assert_eq!(r.get("dup", "q"), None);
        assert!(r.others.is_empty());
        assert_eq!(r.index.len(), 0);
    }

    #[test]
    fn batches_are_kept_compactly_and_count_per_result() {
        let mut r = Recent::default();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let error = ReplyBody::Error {
            code: protocol::ErrorCode::BadRequest,
            reason: "bad".into(),
        };
        let batch = ReplyBody::Batch {
            results: vec![enqueued(ids[0], 1.0), error.clone(), enqueued(ids[1], 2.0)],
        };
        r.insert("b", &batch, u64::MAX, 10);
        // Answered again with the resend's queue, the error kept whole.
        let ReplyBody::Batch { results } = r.get("b", "resent").expect("remembered") else {
            panic!("not a batch")
        };
        let in_queue = |id: Uuid, eta: f64| ReplyBody::Enqueued {
            id: id.to_string(),
            queue: "resent".into(),
            eta,
            result: None,
            replicas: 2,
        };
        assert_eq!(
            results,
            vec![in_queue(ids[0], 1.0), error, in_queue(ids[1], 2.0)]
        );
        assert_eq!(r.batch_results, 3);
        // 1 entry + 3 results, then singles: the cap of 10 drops the batch
        // first, and with it its results.
        for i in 0..6 {
            r.insert(&format!("s{i}"), &enqueued(ids[2], 0.0), u64::MAX, 10);
        }
        assert!(r.get("b", "q").is_some());
        r.insert("s6", &enqueued(ids[2], 0.0), u64::MAX, 10);
        assert_eq!(r.get("b", "q"), None);
        assert_eq!(r.batch_results, 0);
        assert_eq!(r.len(), 7);
    }

    #[test]
    fn positions_survive_wrapping() {
        let mut r = Recent {
            head: u32::MAX - 5,
            ..Default::default()
        };
        for i in 0..20 {
            r.insert(&format!("w{i}"), &enqueued(Uuid::new_v4(), i as f64), i, 8);
        }
        for i in 12..20 {
            assert!(
                matches!(r.get(&format!("w{i}"), "q"), Some(ReplyBody::Enqueued { eta, .. }) if eta == i as f64)
            );
        }
        assert_eq!(r.get("w11", "q"), None);
    }

    #[test]
    fn entries_expire_on_time_after_2106() {
        // Found by the store fuzz target: absolute seconds in a u32 ran
        // out in 2106 and every entry expired at once.
        let mut r = Recent::default();
        let now = 4_294_967_153 * 1_000_000 + 5_000_000;
        let body = ReplyBody::Cancelled { id: "x".into() };
        r.insert("a", &body, now + 600_000_000, 10);
        r.expire(now);
        assert!(r.get("a", "q").is_some());
        r.expire(now + 600_000_000);
        assert!(r.get("a", "q").is_none());
        // 139 years after a first entry (the fuzz input's jump).
        let mut r = Recent::default();
        r.insert("old", &body, 1_800_000_600 * 1_000_000, 10);
        let later = 6_212_868_508 * 1_000_000;
        r.insert("new", &body, later + 600_000_000, 10);
        r.expire(later);
        assert!(r.get("new", "q").is_some());
        assert!(r.get("old", "q").is_none());
    }
}
