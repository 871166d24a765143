//! The gateway's batch body (`POST /queue/NAME/batch`): a JSON array of
//! tasks, each parsed on its own; every task accepted is checked as the
//! broker will see it (`check_task_spec`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // TODO: switch to `gateway::api::parse_batch(data)` (returning
    // `Result<Vec<Result<TaskSpec, String>>, String>`) once it exists; until
    // then this does what `api::batch` does inline.
    let Ok(serde_json::Value::Array(items)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    for item in items {
        if let Ok(spec) = gateway::api::parse_json_value(item) {
            fuzz_common::check_task_spec(spec);
        }
    }
});
