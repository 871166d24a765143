//! Replies remembered for request deduplication (a resent request gets its
//! first reply and is not acted on twice), kept compact because one entry
//! stays per enqueue for ten minutes: entries are keyed by a 64-bit hash of
//! the request id, and an `enqueued` reply is kept as its id, eta and
//! replica count (its queue is the resent request's own).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use protocol::ReplyBody;
use uuid::Uuid;

enum Remembered {
    Enqueued { id: Uuid, eta: f64, replicas: u32 },
    Other(Box<ReplyBody>),
}

#[derive(Default)]
pub struct Recent {
    map: HashMap<u64, Remembered>,
    order: VecDeque<(u64, u64)>,
}

fn key(request_id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    request_id.hash(&mut h);
    h.finish()
}

impl Recent {
    /// The remembered reply to `request_id`, whose request names `queue`.
    pub fn get(&self, request_id: &str, queue: &str) -> Option<ReplyBody> {
        Some(match self.map.get(&key(request_id))? {
            Remembered::Enqueued { id, eta, replicas } => ReplyBody::Enqueued {
                id: id.to_string(),
                queue: queue.to_string(),
                eta: *eta,
                result: None,
                replicas: *replicas,
            },
            Remembered::Other(b) => (**b).clone(),
        })
    }

    /// Remembers `body` until `expires_us`, dropping the oldest entry
    /// beyond `max` entries.
    pub fn insert(&mut self, request_id: &str, body: &ReplyBody, expires_us: u64, max: usize) {
        if self.map.len() >= max {
            if let Some((_, old)) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        let k = key(request_id);
        let r = match body {
            ReplyBody::Enqueued {
                id,
                eta,
                result: None,
                replicas,
                ..
            } => match Uuid::parse_str(id) {
                Ok(id) => Remembered::Enqueued {
                    id,
                    eta: *eta,
                    replicas: *replicas,
                },
                Err(_) => Remembered::Other(Box::new(body.clone())),
            },
            other => Remembered::Other(Box::new(other.clone())),
        };
        self.map.insert(k, r);
        self.order.push_back((expires_us, k));
    }

    /// Forgets entries that expired by `now_us`.
    pub fn expire(&mut self, now_us: u64) {
        while let Some(&(expires, k)) = self.order.front() {
            if expires > now_us {
                break;
            }
            self.order.pop_front();
            self.map.remove(&k);
        }
    }
}
