//! Task-listing cursors: `list_tasks`' `cursor` (decoded by the private
//! `parse_cursor` in broker/src/store/views.rs), reached through the
//! public `Store::apply` with a `ListTasks` request on a store holding a
//! few tasks in different states (some created in the same microsecond).
//!
//! Input: byte 0 = page size (1–8) and mode, byte 1 = state filter, the
//! rest = the cursor. In mode "edit" the cursor is a real `next_cursor`
//! with the input's bytes written over it (so most inputs are nearly
//! valid). Checks: the answer is a page or `bad_request`; a page holds
//! only the queue's tasks, in creation order, matching the filter; and
//! following `next_cursor` from the first page visits every listed task
//! exactly once, in the order of the unpaged listing.
#![no_main]

use broker::store::{Command, Event, Store, StoreConfig, TaskIds};
use libfuzzer_sys::fuzz_target;
use protocol::{
    ClientCommand, ClientRequest, DeliveryResult, ErrorCode, Outcome, ReplyBody, TaskInfo,
    TaskSpec, TaskState,
};

const T0: u64 = 1_800_000_000_000_000;

struct H {
    store: Store,
    n: u64,
    now: u64,
}

impl H {
    fn request(&mut self, command: ClientCommand) -> ReplyBody {
        self.n += 1;
        let mut out = Vec::new();
        self.store.apply(
            Command::Request {
                identity: b"c".to_vec(),
                request: ClientRequest {
                    request_id: format!("r{}", self.n),
                    command,
                },
            },
            self.now,
            &mut out,
        );
        out.into_iter()
            .rev()
            .find_map(|e| match e {
                Event::Reply { reply, .. } => Some(reply.body),
                _ => None,
            })
            .expect("a reply")
    }

    fn list(&mut self, state: Option<TaskState>, limit: u32, cursor: Option<String>) -> ReplyBody {
        self.request(ClientCommand::ListTasks {
            queue: "default".into(),
            state,
            limit: Some(limit),
            cursor,
            full: false,
            owned: false,
        })
    }
}

fn task(countdown: f64) -> TaskSpec {
    TaskSpec {
        url: "http://localhost/w".into(),
        countdown: Some(countdown),
        ..Default::default()
    }
}

/// A store with tasks scheduled, running, retrying, succeeded, cancelled.
fn setup() -> H {
    let mut h = H {
        store: Store::new(StoreConfig::default(), T0, TaskIds::seeded(3)),
        n: 0,
        now: T0,
    };
    h.request(ClientCommand::EnqueueBatch {
        queue: "default".into(),
        tasks: vec![task(0.0), task(0.0), task(0.0), task(100.0)],
    });
    for i in 0..4 {
        h.now = T0 + 1 + i;
        h.request(ClientCommand::Enqueue {
            queue: "default".into(),
            task: task(if i % 2 == 0 { 0.0 } else { 50.0 }),
            wait: None,
        });
    }
    h.request(ClientCommand::Enqueue {
        queue: "other".into(),
        task: task(0.0),
        wait: None,
    });
    let mut out = Vec::new();
    h.store.fire_due(h.now, &mut out);
    let dispatched: Vec<(u64, String)> = out
        .iter()
        .filter_map(|e| match e {
            Event::Dispatch { delivery, task, .. } => Some((*delivery, task.id.clone())),
            _ => None,
        })
        .collect();
    for (i, (delivery, id)) in dispatched.iter().enumerate() {
        if i % 3 == 2 {
            continue; // stays running
        }
        let outcome = if i % 3 == 0 {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        h.store.apply(
            Command::Result(DeliveryResult {
                delivery: *delivery,
                task_id: id.clone(),
                outcome,
                status: Some(500),
                reason: None,
                retry_after: None,
                responded: true,
                body: None,
                no_retry: false,
            }),
            h.now,
            &mut out,
        );
    }
    if let ReplyBody::Tasks { tasks, .. } = h.list(Some(TaskState::Scheduled), 1, None) {
        let id = tasks[0].id.clone();
        h.request(ClientCommand::Cancel {
            queue: "default".into(),
            id,
        });
    }
    h
}

fn page(body: ReplyBody) -> Option<(Vec<TaskInfo>, Option<String>)> {
    match body {
        ReplyBody::Tasks { tasks, next_cursor } => Some((tasks, next_cursor)),
        ReplyBody::Error {
            code: ErrorCode::BadRequest,
            reason,
        } => {
            assert_eq!(reason, "invalid cursor");
            None
        }
        other => panic!("unexpected answer to list_tasks: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let (mode, filter, text) = match data {
        [a, b, rest @ ..] => (*a, *b, rest),
        _ => return,
    };
    let limit = 1 + u32::from(mode & 7);
    let state = match filter % 8 {
        0 => Some(TaskState::Scheduled),
        1 => Some(TaskState::Running),
        2 => Some(TaskState::Retrying),
        3 => Some(TaskState::Succeeded),
        4 => Some(TaskState::Cancelled),
        5 => Some(TaskState::Failed),
        _ => None,
    };
    let mut h = setup();
    let Some((all, none)) = page(h.list(state, 1000, None)) else {
        panic!("listing without a cursor refused");
    };
    assert!(none.is_none());
    for t in &all {
        assert_eq!(t.queue, "default");
        assert!(state.is_none_or(|s| s == t.state));
    }
    let created: Vec<f64> = all.iter().map(|t| t.created).collect();
    assert!(
        created.windows(2).all(|w| w[0] <= w[1]),
        "not in creation order"
    );

    // Paging from the start visits everything once, in order.
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut first_cursor = None;
    for _ in 0..=all.len() {
        let (tasks, next) = page(h.list(state, limit, cursor.clone())).expect("own cursor refused");
        assert!(tasks.len() <= limit as usize);
        seen.extend(tasks.into_iter().map(|t| t.id));
        if first_cursor.is_none() {
            first_cursor = next.clone();
        }
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let ids: Vec<String> = all.iter().map(|t| t.id.clone()).collect();
    assert_eq!(seen, ids, "paging with limit {limit} differs from one page");

    // The fuzzed cursor.
    let cursor = if mode & 0x80 != 0 {
        let Some(mut c) = first_cursor.map(String::into_bytes) else {
            return;
        };
        for pair in text.chunks(2) {
            if let [at, b] = pair {
                let at = *at as usize;
                if at < c.len() {
                    c[at] = *b;
                } else {
                    c.truncate(at % (c.len() + 1));
                }
            }
        }
        String::from_utf8_lossy(&c).into_owned()
    } else {
        String::from_utf8_lossy(text).into_owned()
    };
    if let Some((tasks, next)) = page(h.list(state, limit, Some(cursor))) {
        assert!(tasks.len() <= limit as usize);
        // The page is a run of the full listing.
        if let Some(first) = tasks.first() {
            let at = ids
                .iter()
                .position(|id| *id == first.id)
                .expect("a listed task missing from the full listing");
            for (i, t) in tasks.iter().enumerate() {
                assert_eq!(
                    ids.get(at + i),
                    Some(&t.id),
                    "page is not a run of the listing"
                );
            }
        }
        if let Some(next) = next {
            page(h.list(state, limit, Some(next))).expect("a next_cursor refused");
        }
    }
});
