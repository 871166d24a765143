//! Cluster events as a broker's SUB socket decodes them (node.rs read_events: decode); split into 1-4 frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_common::check_slow::<protocol::ClusterEvent>(data);
});
