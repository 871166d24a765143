//! Seconds from outside: `gateway::webhooks::parse_retry_after` (never
//! panics; `Some` is finite and >= 0) and `protocol::limits::clamp_secs`
//! (never panics; the result is within `[0, max]`, 0 for NaN and
//! negatives, `max` at or past it, and otherwise within a rounding step
//! of the input). Input: 8 bytes of f64, 12 bytes of `max` (u64 seconds,
//! u32 nanoseconds), the rest a `Retry-After` header value.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = [0u8; 20];
    let n = data.len().min(20);
    head[..n].copy_from_slice(&data[..n]);
    let secs = f64::from_le_bytes(head[..8].try_into().unwrap());
    let max_s = u64::from_le_bytes(head[8..16].try_into().unwrap());
    let max_n = u32::from_le_bytes(head[16..20].try_into().unwrap()) % 1_000_000_000;
    for max in [
        Duration::new(max_s, max_n),
        Duration::from_secs(60),
        Duration::from_secs(86400),
        Duration::MAX,
    ] {
        let d = protocol::limits::clamp_secs(secs, max);
        assert!(d <= max, "clamp_secs({secs}, {max:?}) = {d:?} exceeds max");
        if secs.is_nan() || secs <= 0.0 {
            assert_eq!(d, Duration::ZERO, "clamp_secs({secs}, {max:?})");
        } else if secs >= max.as_secs_f64() {
            assert_eq!(d, max, "clamp_secs({secs}, {max:?})");
        } else {
            let back = d.as_secs_f64();
            assert!(
                (back - secs).abs() <= 2e-9_f64.max(secs * 1e-15),
                "clamp_secs({secs}, {max:?}) = {d:?}"
            );
        }
    }
    let text = String::from_utf8_lossy(&data[n..]);
    if let Some(s) = gateway::webhooks::parse_retry_after(&text) {
        assert!(
            s.is_finite() && s >= 0.0,
            "parse_retry_after({text:?}) = {s}"
        );
    }
});
