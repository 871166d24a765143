//! Helpers shared by the fuzz targets (see `README.md` beside this crate).

use std::fmt::Debug;

use protocol::FastDecode;
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::Serialize;

/// Splits a fuzz input into 1–4 frames; the first byte chooses how.
///
/// * bit 2 set: the canonical layout `[""] ["MYM" 1] [rest]`, so that most
///   inputs reach the MessagePack body decoder;
/// * otherwise `1 + (b & 3)` frames: the next `n - 1` bytes are the lengths
///   of the first `n - 1` frames (cut short at the end of the input), and
///   the last frame takes what remains.
pub fn split_frames(data: &[u8]) -> Vec<Vec<u8>> {
    let Some((&b, rest)) = data.split_first() else {
        return vec![Vec::new()];
    };
    if b & 4 != 0 {
        return vec![
            Vec::new(),
            protocol::frames::header().to_vec(),
            rest.to_vec(),
        ];
    }
    let n = 1 + (b & 3) as usize;
    let cut = (n - 1).min(rest.len());
    let (lens, mut rest) = rest.split_at(cut);
    let mut frames = Vec::with_capacity(n);
    for &len in lens {
        let take = (len as usize).min(rest.len());
        let (f, r) = rest.split_at(take);
        frames.push(f.to_vec());
        rest = r;
    }
    frames.push(rest.to_vec());
    frames
}

/// The MessagePack encoding of a message: how two decoded messages are
/// compared (byte for byte, so NaN equals the same NaN).
pub fn bytes_of<T: Serialize>(m: &T) -> Vec<u8> {
    protocol::encode(m).pop().unwrap_or_default()
}

/// What [`check_slow`] and [`check_hot`] verify on every message a
/// decoder accepts: the encoder writes it back in a form the decoder
/// takes, and decoding that gives the same message (same bytes again).
fn check_round_trip<T: Serialize + DeserializeOwned + Debug>(m: &T) {
    let frames = protocol::encode(m);
    assert!(
        !frames[2].is_empty(),
        "the encoder failed (empty body) on a decoded message: {m:?}"
    );
    let back: T = match protocol::decode(&frames) {
        Ok(b) => b,
        Err(e) => panic!("a decoded message does not decode once re-encoded: {e}\n{m:?}"),
    };
    assert_eq!(
        bytes_of(&back),
        frames[2],
        "re-encoding changed the message: {m:?} became {back:?}"
    );
}

/// A message type decoded by [`protocol::decode`] only (no fast path).
pub fn check_slow<T: Serialize + DeserializeOwned + Debug>(data: &[u8]) {
    let frames = split_frames(data);
    let _ = protocol::frames::peek_request_id(&frames);
    match protocol::decode::<T, _>(&frames) {
        Ok(m) => check_round_trip(&m),
        Err(e) => {
            let _ = (e.code(), e.to_string());
        }
    }
}

/// A message type with a fast path ([`protocol::decode_hot`]).
///
/// The contract (protocol/src/fast.rs, module comment): the fast path
/// either gives `None` or the message the derived decoder gives, so
/// `decode_hot` and `decode` agree; every error is the same error. The
/// one stated difference: a map repeating `"type"` after its fields is
/// taken by the fast path and refused by the derived decoder.
pub fn check_hot<T: FastDecode + Serialize + Debug>(data: &[u8]) {
    let frames = split_frames(data);
    let _ = protocol::frames::peek_request_id(&frames);
    let slow = protocol::decode::<T, _>(&frames);
    let hot = protocol::decode_hot::<T, _>(&frames);
    match (slow, hot) {
        (Ok(s), Ok(h)) => {
            assert_eq!(
                bytes_of(&s),
                bytes_of(&h),
                "fast and derived decoders disagree:\n derived {s:?}\n fast    {h:?}"
            );
            check_round_trip(&s);
        }
        (Ok(s), Err(e)) => panic!("decode_hot refused what decode accepts: {e}\n{s:?}"),
        (Err(e1), Err(e2)) => {
            assert_eq!(e1, e2, "decode and decode_hot give different errors");
            let _ = (e1.code(), e1.to_string());
        }
        (Err(e), Ok(h)) => {
            // The fast path takes more than the derived decoder: a map
            // repeating "type" (stated in fast.rs), and more that the long
            // runs found (README.md, "Known differences"). Harmless while
            // what it takes re-encodes to a message both decoders take
            // alike; with FUZZ_STRICT_FAST set, a difference of a kind not
            // listed there is a failure.
            if strict_fast() {
                let body = frames.last().map(Vec::as_slice).unwrap_or_default();
                let dups = repeated_top_keys(body);
                let text = e.to_string();
                assert!(
                    dups.iter().any(|k| k == "type" || k == "request_id")
                        || text.contains("invalid type: integer")
                        || text.contains("invalid type: byte array"),
                    "decode_hot accepted what decode refuses ({e}); repeated top-level keys: \
                     {dups:?}:\n{h:?}"
                );
            }
            check_round_trip(&h);
        }
    }
}

/// `FUZZ_STRICT_FAST` is set (see [`check_hot`]).
fn strict_fast() -> bool {
    static STRICT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("FUZZ_STRICT_FAST").is_some())
}

/// The top-level keys of a MessagePack map that appear more than once
/// (string keys only; empty if `body` is not a map).
pub fn repeated_top_keys(body: &[u8]) -> Vec<String> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dups = Vec::new();
            while let Some(k) = map.next_key::<KeyName>()? {
                map.next_value::<IgnoredAny>()?;
                if let KeyName(Some(k)) = k {
                    if !seen.insert(k.clone()) {
                        dups.push(k);
                    }
                }
            }
            Ok(dups)
        }
    }
    struct KeyName(Option<String>);
    impl<'de> serde::Deserialize<'de> for KeyName {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = KeyName;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a key")
                }
                fn visit_str<E>(self, v: &str) -> Result<KeyName, E> {
                    Ok(KeyName(Some(v.to_string())))
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<KeyName, E> {
                    Ok(KeyName(std::str::from_utf8(v).ok().map(str::to_string)))
                }
                fn visit_u64<E>(self, _: u64) -> Result<KeyName, E> {
                    Ok(KeyName(None))
                }
                fn visit_i64<E>(self, _: i64) -> Result<KeyName, E> {
                    Ok(KeyName(None))
                }
            }
            d.deserialize_any(V)
        }
    }
    let mut d = rmp_serde::Deserializer::from_read_ref(body);
    serde::Deserializer::deserialize_map(&mut d, Keys).unwrap_or_default()
}

/// A fixed "now" for validation, unix seconds (2027-01-15).
pub const NOW_SECS: f64 = 1_800_000_000.0;

/// Checks a task the gateway parsed from HTTP as the rest of the system
/// will see it: it travels to the broker in an `enqueue` (encoded size
/// within its stated bound, decoded back the same by both decoders), and
/// the broker's validation either refuses it or keeps exactly its
/// parameters and body, with an eta in `[now, now + 30 days]` and a
/// timeout in `(0, MAX_TIMEOUT_SECS]`.
pub fn check_task_spec(spec: protocol::TaskSpec) {
    use protocol::{ClientCommand, ClientRequest};
    let bound = spec.encoded_size_bound();
    let alone = rmp_serde::to_vec_named(&spec).expect("a TaskSpec encodes");
    assert!(
        alone.len() <= bound,
        "encoded_size_bound {bound} < encoded size {} for {spec:?}",
        alone.len()
    );
    let req = ClientRequest {
        request_id: "r".into(),
        command: ClientCommand::Enqueue {
            queue: "default".into(),
            task: spec.clone(),
            wait: None,
        },
    };
    let frames = protocol::encode(&req);
    let hot: ClientRequest = protocol::decode_hot(&frames).expect("an enqueue decodes (hot)");
    let slow: ClientRequest = protocol::decode(&frames).expect("an enqueue decodes");
    assert_eq!(bytes_of(&hot), frames[2]);
    assert_eq!(bytes_of(&slow), frames[2]);

    let params = spec.params.clone();
    let body = spec.body.clone();
    if let Ok(v) = broker::validate::validate("default", spec, NOW_SECS) {
        assert!(
            v.eta.is_finite()
                && v.eta >= NOW_SECS
                && v.eta <= NOW_SECS + broker::validate::MAX_ETA_AHEAD_SECS,
            "eta {} out of range",
            v.eta
        );
        let t = v.timeout();
        assert!(
            t.is_finite() && t > 0.0 && t <= broker::validate::MAX_TIMEOUT_SECS,
            "timeout {t} out of range"
        );
        match body {
            Some(b) => assert_eq!(v.body(), Some(&b[..])),
            None => assert_eq!(v.params(), params, "parameters changed by validation"),
        }
        // The normalized URL is a fixed point (the store relies on it:
        // `validate_known` skips parsing a URL it has seen normalized).
        assert_eq!(
            broker::validate::normalize_url(&v.url).as_deref(),
            Ok(v.url.as_str()),
            "normalizing a normalized URL changed it"
        );
    }
}
