//! Wall-clock time as unix seconds (`f64`) and microseconds (`u64`).
//!
//! Etas are wall-clock instants shared with clients and (later) other
//! nodes, so the scheduler works in unix microseconds rather than
//! `Instant`s.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in unix microseconds.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Now, in unix seconds.
pub fn now_secs() -> f64 {
    micros_to_secs(now_micros())
}

pub fn micros_to_secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Seconds to microseconds, saturating; negative and NaN become 0.
pub fn secs_to_micros(s: f64) -> u64 {
    if s.is_nan() || s <= 0.0 {
        0
    } else if s >= u64::MAX as f64 / 1e6 {
        u64::MAX
    } else {
        (s * 1e6).round() as u64
    }
}
