//! Replies remembered for request deduplication (a resent request gets its
//! first reply and is not acted on twice), kept compact because one entry
//! stays per enqueue for ten minutes, and a million pending tasks may mean
//! a million entries:
//!
//! * entries live in one ring buffer in expiry order, 40 bytes each: a
//!   64-bit hash of the request id, its expiry, and an `enqueued` reply as
//!   its task id, eta and replica count (its queue is the resent
//!   request's own); other replies are boxed to the side;
//! * the lookup table holds only each entry's 32-bit position, 5 bytes a
//!   slot.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use hashbrown::HashTable;
use protocol::ReplyBody;
use uuid::Uuid;

struct Entry {
    key: u64,
    /// Unix seconds, rounded up (4 bytes instead of 8).
    expires_s: u32,
    /// The `enqueued` reply's task id (nil for another reply, kept in
    /// `others`).
    id: Uuid,
    eta: f64,
    replicas: u32,
}

// An entry must stay at 40 bytes (see the module's comment).
const _: () = assert!(std::mem::size_of::<Entry>() <= 40);

#[derive(Default)]
pub struct Recent {
    /// Oldest first; `entries[i]` has position `head + i` (mod 2³²).
    entries: VecDeque<Entry>,
    head: u32,
    /// Positions of the entries, hashed by their key.
    index: HashTable<u32>,
    others: HashMap<u64, Box<ReplyBody>>,
}

fn key(request_id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    request_id.hash(&mut h);
    h.finish()
}

impl Recent {
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
        if e.id.is_nil() {
            return self.others.get(&k).map(|b| (**b).clone());
        }
        Some(ReplyBody::Enqueued {
            id: e.id.to_string(),
            queue: queue.to_string(),
            eta: e.eta,
            result: None,
            replicas: e.replicas,
        })
    }

    /// Remembers `body` until `expires_us`, dropping the oldest entry
    /// beyond `max` entries.
    pub fn insert(&mut self, request_id: &str, body: &ReplyBody, expires_us: u64, max: usize) {
        while self.entries.len() >= max.clamp(1, u32::MAX as usize / 2) {
            self.pop_oldest();
        }
        let k = key(request_id);
        if self.position(k).is_some() {
            return; // the first reply stands
        }
        let mut e = Entry {
            key: k,
            expires_s: u32::try_from(expires_us.div_ceil(1_000_000)).unwrap_or(u32::MAX),
            id: Uuid::nil(),
            eta: 0.0,
            replicas: 0,
        };
        match body {
            ReplyBody::Enqueued {
                id,
                eta,
                result: None,
                replicas,
                ..
            } if Uuid::parse_str(id).is_ok_and(|u| !u.is_nil()) => {
                e.id = Uuid::parse_str(id).unwrap_or_default();
                e.eta = *eta;
                e.replicas = *replicas;
            }
            other => {
                self.others.insert(k, Box::new(other.clone()));
            }
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
            self.others.remove(&e.key);
        }
    }

    /// Forgets entries that expired by `now_us`.
    pub fn expire(&mut self, now_us: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| u64::from(e.expires_s) * 1_000_000 <= now_us)
        {
            self.pop_oldest();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
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
}
