//! The gateway's batch body (`POST /queue/NAME/batch`,
//! `gateway::api::parse_batch`): refused whole, or one result per item
//! (never more than `MAX_BATCH_TASKS`); every task accepted is checked as
//! the broker will see it (`check_task_spec`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(items) = gateway::api::parse_batch(data) else {
        return;
    };
    assert!(items.len() <= protocol::limits::MAX_BATCH_TASKS);
    for spec in items.into_iter().flatten() {
        fuzz_common::check_task_spec(spec);
    }
});
