//! Client requests as a broker's client port decodes them
//! (broker/src/node.rs `read_clients`: `decode_hot`), checked against the
//! derived decoder; input split into 1–4 frames. A request that decodes is
//! then applied to a fresh single-node store, as the scheduler would, and
//! the store's timers are run a day on: no request from the wire may
//! panic the broker.
#![no_main]

use broker::store::{Command, Store, StoreConfig, TaskIds};
use libfuzzer_sys::fuzz_target;

const T0: u64 = 1_800_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    fuzz_common::check_hot::<protocol::ClientRequest>(data);
    let frames = fuzz_common::split_frames(data);
    if let Ok(request) = protocol::decode_hot::<protocol::ClientRequest, _>(&frames) {
        let mut store = Store::new(StoreConfig::default(), T0, TaskIds::seeded(1));
        let mut out = Vec::new();
        store.apply(
            Command::Request {
                identity: b"c".to_vec(),
                request,
            },
            T0,
            &mut out,
        );
        for e in &out {
            // Every reply the broker sends must encode.
            if let broker::store::Event::Reply { reply, .. } = e {
                assert!(!fuzz_common::bytes_of(reply).is_empty());
            }
        }
        store.fire_due(T0 + 86_400_000_000, &mut out);
    }
});
