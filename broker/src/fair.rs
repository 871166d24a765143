//! The tasks of one pool waiting for a worker, in lines by queue and, in
//! each queue, by destination host, served so that one slow or dead
//! receiver cannot take every delivery slot while other queues wait.
//!
//! Sans-IO; owned by the dispatcher on the I/O thread.
//!
//! **The share.** The pool's capacity is the credit its workers granted
//! (for the gateway, its `--concurrency`). Queues take turns, one task a
//! turn; within a queue, hosts take turns. In the gateways' pool
//! (`*http`), whose slots a receiver that never answers can hold for a
//! task's whole timeout, an eighth of the capacity is kept in reserve:
//! while more than that is free, any queue may take a slot. Within
//! the reserve, only a queue holding fewer than `capacity / (queues + 1)`
//! deliveries may (`queues` counts those with tasks waiting or out). So a
//! queue whose receiver never answers stops growing at seven eighths of
//! the slots, and a task of another queue finds one of the reserve at
//! once. A pull worker's credit is its own parallelism, which a queue
//! alone should use whole: its pools only take turns. A queue's own `max_concurrent` (enforced by the store before a
//! task gets here) lowers its use further; it never raises it.
//!
//! Every line is removed once it has nothing waiting and nothing out, so
//! the memory held is bounded by the tasks waiting and in flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Where a delivery is counted: its queue and its destination host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub queue: Arc<str>,
    pub host: Arc<str>,
}

/// The destination host of a task URL (`host[:port]`), or `""` for
/// `zmq://` URLs and anything without an authority.
pub fn host_of(url: &str) -> &str {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "";
    };
    if scheme == "zmq" {
        return "";
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    // Credentials are not part of the destination.
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

struct HostLine<T> {
    waiting: VecDeque<T>,
    out: u32,
}

struct QueueLine<T> {
    hosts: BTreeMap<Arc<str>, HostLine<T>>,
    /// Hosts with tasks waiting, in turn order.
    turn: VecDeque<Arc<str>>,
    waiting: usize,
    out: u32,
}

/// See the module docs. `T` is what waits (the dispatcher's `Waiting`).
pub struct FairLines<T> {
    queues: BTreeMap<Arc<str>, QueueLine<T>>,
    /// Queues with tasks waiting, in turn order.
    turn: VecDeque<Arc<str>>,
    waiting: usize,
    out: u32,
}

impl<T> Default for FairLines<T> {
    fn default() -> Self {
        FairLines {
            queues: BTreeMap::new(),
            turn: VecDeque::new(),
            waiting: 0,
            out: 0,
        }
    }
}

impl<T> FairLines<T> {
    /// Tasks waiting.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Deliveries out.
    pub fn out(&self) -> u32 {
        self.out
    }

    /// Whether nothing waits and nothing is out.
    pub fn is_idle(&self) -> bool {
        self.waiting == 0 && self.out == 0
    }

    /// Queues with tasks waiting or out.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// The line of `queue` and `host`, made if need be, with one more task
    /// counted as waiting; its queue and host in the turns (moved to their
    /// front when `front`).
    fn line(&mut self, queue: &str, host: &str, front: bool) -> &mut HostLine<T> {
        let queue: Arc<str> = match self.queues.get_key_value(queue) {
            Some((k, _)) => k.clone(),
            None => {
                let line = QueueLine {
                    hosts: BTreeMap::new(),
                    turn: VecDeque::new(),
                    waiting: 0,
                    out: 0,
                };
                let k: Arc<str> = queue.into();
                self.queues.insert(k.clone(), line);
                k
            }
        };
        let Some(q) = self.queues.get_mut(&queue) else {
            unreachable!("inserted above");
        };
        take_turn(&mut self.turn, &queue, q.waiting > 0, front);
        let host: Arc<str> = match q.hosts.get_key_value(host) {
            Some((k, _)) => k.clone(),
            None => {
                let line = HostLine {
                    waiting: VecDeque::new(),
                    out: 0,
                };
                let k: Arc<str> = host.into();
                q.hosts.insert(k.clone(), line);
                k
            }
        };
        let waiting = q.hosts.get(&host).is_some_and(|h| !h.waiting.is_empty());
        take_turn(&mut q.turn, &host, waiting, front);
        q.waiting += 1;
        self.waiting += 1;
        let Some(h) = q.hosts.get_mut(&host) else {
            unreachable!("inserted above");
        };
        h
    }

    /// A task at the back of its line.
    pub fn push_back(&mut self, queue: &str, host: &str, item: T) {
        self.line(queue, host, false).waiting.push_back(item);
    }

    /// A task given back: at the front of its line, its queue's and its
    /// host's turn first.
    pub fn push_front(&mut self, queue: &str, host: &str, item: T) {
        self.line(queue, host, true).waiting.push_front(item);
    }

    /// [`Self::push_back`] (or [`Self::push_front`] when `front`), the
    /// queue and host read from the item itself.
    pub fn push_keyed(&mut self, item: T, front: bool, keys: impl FnOnce(&T) -> (&str, &str)) {
        let (queue, host) = keys(&item);
        let line = self.line(queue, host, front);
        if front {
            line.waiting.push_front(item);
        } else {
            line.waiting.push_back(item);
        }
    }

    /// The next task to start, by the share of the module docs, counted
    /// out; `None` when nothing waits or no waiting queue may take a slot
    /// of `capacity` now. Without `reserve`, queues only take turns.
    pub fn pop(&mut self, capacity: u32, reserve: bool) -> Option<(Flow, T)> {
        let open = !reserve || capacity.saturating_sub(self.out) > capacity / 8;
        let share = if open {
            0
        } else {
            (capacity / (self.queues.len() as u32 + 1)).max(1)
        };
        for _ in 0..self.turn.len() {
            let queue = self.turn.pop_front()?;
            let Some(q) = self.queues.get_mut(&queue) else {
                continue;
            };
            if !open && q.out >= share {
                self.turn.push_back(queue);
                continue;
            }
            let host = q.turn.pop_front()?;
            let h = q.hosts.get_mut(&host)?;
            let item = h.waiting.pop_front()?;
            h.out += 1;
            if !h.waiting.is_empty() {
                q.turn.push_back(host.clone());
            }
            q.out += 1;
            q.waiting -= 1;
            if q.waiting > 0 {
                self.turn.push_back(queue.clone());
            }
            self.out += 1;
            self.waiting -= 1;
            return Some((Flow { queue, host }, item));
        }
        None
    }

    /// A delivery of `flow` ended (settled, lost or given back).
    pub fn release(&mut self, flow: &Flow) {
        let Some(q) = self.queues.get_mut(&flow.queue) else {
            return;
        };
        let Some(h) = q.hosts.get_mut(&flow.host) else {
            return;
        };
        if h.out == 0 {
            return;
        }
        h.out -= 1;
        q.out -= 1;
        self.out -= 1;
        if h.out == 0 && h.waiting.is_empty() {
            q.hosts.remove(&flow.host);
        }
        if q.out == 0 && q.waiting == 0 {
            self.queues.remove(&flow.queue);
        }
    }

    /// Drops the waiting tasks `gone` picks; returns how many.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&T) -> bool) -> usize {
        let mut removed = 0;
        for q in self.queues.values_mut() {
            for h in q.hosts.values_mut() {
                let before = h.waiting.len();
                h.waiting.retain(|t| !gone(t));
                let n = before - h.waiting.len();
                q.waiting -= n;
                removed += n;
            }
            q.hosts.retain(|_, h| !h.waiting.is_empty() || h.out > 0);
            let hosts = &q.hosts;
            q.turn
                .retain(|h| hosts.get(h).is_some_and(|l| !l.waiting.is_empty()));
        }
        self.waiting -= removed;
        self.queues.retain(|_, q| q.waiting > 0 || q.out > 0);
        let queues = &self.queues;
        self.turn
            .retain(|q| queues.get(q).is_some_and(|l| l.waiting > 0));
        removed
    }
}

/// Puts `key` in `turn`: at the back if it is not there yet, or at the
/// front (moved there if it was) when `front`.
fn take_turn(turn: &mut VecDeque<Arc<str>>, key: &Arc<str>, present: bool, front: bool) {
    if front {
        if present {
            turn.retain(|k| k != key);
        }
        turn.push_front(key.clone());
    } else if !present {
        turn.push_back(key.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(host_of("http://a.example:8080/x?y"), "a.example:8080");
        assert_eq!(host_of("https://u:p@h/"), "h");
        assert_eq!(host_of("zmq://pool"), "");
        assert_eq!(host_of("http://h"), "h");
        assert_eq!(host_of("nonsense"), "");
    }

    #[test]
    fn one_queue_alone_keeps_its_order() {
        let mut f = FairLines::default();
        for i in 0..5 {
            f.push_back("q", "h", i);
        }
        let got: Vec<i32> = std::iter::from_fn(|| f.pop(100, true).map(|(_, t)| t)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn queues_and_hosts_take_turns() {
        let mut f = FairLines::default();
        for i in 0..3 {
            f.push_back("a", "h1", ("a", i));
            f.push_back("a", "h2", ("a2", i));
            f.push_back("b", "h", ("b", i));
        }
        let order: Vec<&str> = std::iter::from_fn(|| f.pop(100, true).map(|(_, t)| t.0))
            .take(6)
            .collect();
        assert_eq!(order, vec!["a", "b", "a2", "b", "a", "b"]);
    }

    #[test]
    fn a_hog_leaves_the_reserve_to_another_queue() {
        let mut f = FairLines::default();
        for i in 0..400 {
            f.push_back("hog", "dead", i);
        }
        let mut started = 0;
        while f.pop(256, true).is_some() {
            started += 1;
        }
        // Seven eighths, then nothing more while it is alone...
        assert_eq!(started, 224);
        assert_eq!(f.waiting(), 176);
        // ...and another queue's task starts at once.
        f.push_back("other", "live", 1000);
        let (flow, t) = f.pop(256, true).expect("a slot of the reserve");
        assert_eq!((&*flow.queue, t), ("other", 1000));
        f.release(&flow);
        assert_eq!(f.queues(), 1);
    }

    #[test]
    fn without_a_reserve_a_queue_alone_takes_every_slot() {
        let mut f = FairLines::default();
        for i in 0..20 {
            f.push_back("q", "", i);
        }
        let mut started = 0;
        while f.pop(15, false).is_some() {
            started += 1;
        }
        assert_eq!(started, 20, "turns only: the credit is the caller's bound");
    }

    #[test]
    fn lines_are_forgotten_when_idle() {
        let mut f = FairLines::default();
        f.push_back("q", "h", 1);
        f.push_back("q", "h", 2);
        let (flow, _) = f.pop(10, true).unwrap();
        assert_eq!(f.remove_where(|t| *t == 2), 1);
        assert_eq!(f.queues(), 1);
        f.release(&flow);
        assert!(f.is_idle());
        assert_eq!(f.queues(), 0);
        // A release of something unknown changes nothing.
        f.release(&flow);
        assert!(f.is_idle());
    }

    #[test]
    fn a_given_back_task_goes_first() {
        let mut f = FairLines::default();
        f.push_back("a", "h", 1);
        f.push_back("b", "h", 2);
        f.push_front("b", "h", 0);
        let (_, t) = f.pop(10, true).unwrap();
        assert_eq!(t, 0);
    }
}
