//! The gateway's form enqueue body (`gateway::api::parse_form`); a task it
//! accepts is checked as the broker will see it (`check_task_spec`:
//! encoding, both decoders, `broker::validate::validate`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = gateway::api::parse_form(data) {
        fuzz_common::check_task_spec(spec);
    }
});
