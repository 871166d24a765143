//! Broker replies as producers and gateways decode them (decode_hot), against the derived decoder; split into 1-4 frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_common::check_hot::<protocol::ClientReply>(data);
});
