//! Peer messages as a broker's peer port decodes them (node.rs on_peer_frames: decode); split into 1-4 frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_common::check_slow::<protocol::PeerMessage>(data);
});
