//! The whole cluster through any gateway: `GET /queues`, `GET /queue/Q`
//! and `GET /queue/Q/tasks` gathered from every broker.
//!
//! Each task is held by several nodes; each node answers for the tasks
//! whose first holder still a member it is (`owned`, PROTOCOL.md §7.8),
//! so the answers add up to every task once. A queue's figures are the
//! sums of the nodes' (its lag the largest); queues are merged by name;
//! task pages are merged in creation order, with a cursor that holds each
//! node's own cursor, so a listing pages through all of them.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use protocol::{ClientCommand, QueueInfo, ReplyBody, TaskInfo, TaskState};

use crate::broker_link::{BrokerAnswer, BrokerLink, LinkError};

/// How long a view waits for the brokers; one that has not answered by
/// then is named in `unreachable` and its tasks are missing from the page.
const VIEW_WAIT: Duration = Duration::from_secs(5);

/// What a view found: the merged answer, or why there is none.
pub enum View {
    Queue(Box<QueueInfo>),
    Queues {
        queues: Vec<QueueInfo>,
        next_cursor: Option<String>,
        unreachable: Vec<String>,
    },
    Tasks {
        tasks: Vec<TaskInfo>,
        next_cursor: Option<String>,
        unreachable: Vec<String>,
    },
    /// A broker refused the request (a bad cursor, a bad name): its answer.
    Refused(Box<ReplyBody>),
    /// No broker answered.
    Unavailable(LinkError),
}

/// Each answering broker's endpoint and its answer.
type Answered = Vec<(String, ReplyBody)>;

/// The brokers' answers that are answers, and the brokers that gave none;
/// or, when no broker answered, the view that says so (the first refusal,
/// an `error` reply such as a bad cursor, else unavailable).
fn gather(answers: Vec<BrokerAnswer>) -> Result<(Answered, Vec<String>), View> {
    let mut ok = Vec::new();
    let mut unreachable = Vec::new();
    let mut refused = None;
    for (broker, a) in answers {
        match a {
            Ok(ReplyBody::Error { code, reason }) => {
                if refused.is_none() && code != protocol::ErrorCode::Unavailable {
                    refused = Some(ReplyBody::Error { code, reason });
                } else {
                    unreachable.push(broker);
                }
            }
            Ok(body) => ok.push((broker, body)),
            Err(_) => unreachable.push(broker),
        }
    }
    if ok.is_empty() {
        return Err(match refused {
            Some(r) => View::Refused(Box::new(r)),
            None => View::Unavailable(LinkError::Timeout),
        });
    }
    Ok((ok, unreachable))
}

fn add_stats(into: &mut QueueInfo, from: &QueueInfo) {
    let (a, b) = (&mut into.stats, &from.stats);
    a.scheduled += b.scheduled;
    a.running += b.running;
    a.retrying += b.retrying;
    a.failed += b.failed;
    a.succeeded += b.succeeded;
    a.cancelled += b.cancelled;
    a.dispatches_per_second += b.dispatches_per_second;
    a.lag = a.lag.max(b.lag);
    into.paused |= from.paused;
}

/// `GET /queue/Q`: the queue's settings (from the first node that
/// answered) and figures summed over the nodes.
pub async fn queue(link: &BrokerLink, queue: String) -> View {
    let answers = link
        .ask_each(ClientCommand::GetQueue { queue, owned: true }, VIEW_WAIT)
        .await;
    let ok = match gather(answers) {
        Ok((ok, _)) => ok,
        Err(view) => return view,
    };
    let mut merged: Option<QueueInfo> = None;
    for (_, body) in ok {
        if let ReplyBody::Queue { queue } = body {
            match &mut merged {
                None => merged = Some(queue),
                Some(m) => add_stats(m, &queue),
            }
        }
    }
    match merged {
        Some(q) => View::Queue(Box::new(q)),
        None => View::Unavailable(LinkError::Timeout),
    }
}

/// `GET /queues`: every node's queues merged by name, a page at a time in
/// name order; the cursor is the last name of the page.
pub async fn queues(link: &BrokerLink, limit: Option<u32>, cursor: Option<String>) -> View {
    let page = limit.unwrap_or(protocol::limits::DEFAULT_LIST_LIMIT) as usize;
    let answers = link
        .ask_each(
            ClientCommand::ListQueues {
                limit,
                cursor,
                owned: true,
            },
            VIEW_WAIT,
        )
        .await;
    let (ok, unreachable) = match gather(answers) {
        Ok(g) => g,
        Err(view) => return view,
    };
    let mut by_name: BTreeMap<String, QueueInfo> = BTreeMap::new();
    let mut more = false;
    for (_, body) in ok {
        if let ReplyBody::Queues {
            queues,
            next_cursor,
        } = body
        {
            more |= next_cursor.is_some();
            for q in queues {
                match by_name.get_mut(&q.name) {
                    Some(m) => add_stats(m, &q),
                    None => {
                        by_name.insert(q.name.clone(), q);
                    }
                }
            }
        }
    }
    more |= by_name.len() > page;
    let queues: Vec<QueueInfo> = by_name.into_values().take(page).collect();
    let next_cursor = if more {
        queues.last().map(|q| q.name.clone())
    } else {
        None
    };
    View::Queues {
        queues,
        next_cursor,
        unreachable,
    }
}

/// A node's own cursor after task `t` (`list_tasks`' cursor form,
/// PROTOCOL.md §7.8: its creation time in µs and its id).
fn node_cursor(t: &TaskInfo) -> Option<String> {
    let id = uuid::Uuid::parse_str(&t.id).ok()?;
    let created_us = (t.created * 1e6).round();
    (created_us.is_finite() && created_us >= 0.0)
        .then(|| format!("{}.{}", created_us as u64, id.simple()))
}

/// A cluster listing's cursor: each node's own cursor, by its endpoint.
fn encode_cursor(cursors: &BTreeMap<String, String>) -> String {
    let json = serde_json::to_vec(cursors).unwrap_or_default();
    format!(
        "c{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    )
}

fn decode_cursor(c: &str) -> Option<BTreeMap<String, String>> {
    let b64 = c.strip_prefix('c')?;
    // A cursor is this gateway's own; one longer than any it writes is
    // not one.
    if b64.len() > 64 * 1024 {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .ok()?;
    serde_json::from_slice(&json).ok()
}

/// `GET /queue/Q/tasks`: every node's page of the tasks it answers for,
/// merged in creation order and cut to `limit`; the cursor remembers
/// where each node's part of the page ended.
pub async fn tasks(
    link: &BrokerLink,
    queue: String,
    state: Option<TaskState>,
    limit: Option<u32>,
    cursor: Option<&str>,
    full: bool,
) -> View {
    let page = limit.unwrap_or(protocol::limits::DEFAULT_LIST_LIMIT) as usize;
    let cursors = match cursor.filter(|c| !c.is_empty()) {
        None => BTreeMap::new(),
        Some(c) => match decode_cursor(c) {
            Some(m) => m,
            None => {
                return View::Refused(Box::new(ReplyBody::Error {
                    code: protocol::ErrorCode::BadRequest,
                    reason: "invalid cursor".into(),
                }))
            }
        },
    };
    let asked = cursors.clone();
    let answers = link
        .ask_each_with(
            move |broker| ClientCommand::ListTasks {
                queue: queue.clone(),
                state,
                limit,
                cursor: asked.get(broker).cloned(),
                full,
                owned: true,
            },
            VIEW_WAIT,
        )
        .await;
    let (ok, unreachable) = match gather(answers) {
        Ok(g) => g,
        Err(view) => return view,
    };
    let mut all: Vec<(String, TaskInfo)> = Vec::new();
    let mut more = false;
    for (broker, body) in ok {
        if let ReplyBody::Tasks { tasks, next_cursor } = body {
            more |= next_cursor.is_some();
            all.extend(tasks.into_iter().map(|t| (broker.clone(), t)));
        }
    }
    all.sort_by(|(_, a), (_, b)| {
        a.created
            .total_cmp(&b.created)
            .then_with(|| a.id.cmp(&b.id))
    });
    more |= all.len() > page;
    all.truncate(page);
    let mut cursors = cursors;
    for (broker, t) in &all {
        if let Some(c) = node_cursor(t) {
            cursors.insert(broker.clone(), c);
        }
    }
    View::Tasks {
        tasks: all.into_iter().map(|(_, t)| t).collect(),
        next_cursor: more.then(|| encode_cursor(&cursors)),
        unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let mut m = BTreeMap::new();
        m.insert(
            "tcp://a:7000".to_string(),
            "17.00000000000000000000000000000001".to_string(),
        );
        let c = encode_cursor(&m);
        assert_eq!(decode_cursor(&c), Some(m));
        assert_eq!(decode_cursor("17.abc"), None);
        assert_eq!(decode_cursor("c!!"), None);
        let t = TaskInfo {
            id: "6f1c3a52-0000-4000-8000-000000000001".into(),
            queue: "q".into(),
            name: None,
            url: "http://a/".into(),
            method: "POST".into(),
            state: TaskState::Scheduled,
            eta: 0.0,
            attempts: 0,
            executions: 0,
            last_status: None,
            last_error: None,
            created: 1_796_000_000.123_456,
            replica: 0,
            replica_offset: 0.0,
            first_attempt: None,
            detail: None,
            holders: Vec::new(),
        };
        assert_eq!(
            node_cursor(&t).unwrap(),
            "1796000000123456.6f1c3a52000040008000000000000001"
        );
    }
}
