//! Limits and naming rules that more than one crate applies: the broker
//! enforces them, the gateway checks them early to answer HTTP clients
//! with a precise error, and clients in other languages read them in
//! `PROTOCOL.md`. Each is defined here once, with its unit in its name.
//!
//! Limits that only one process applies (the broker's deduplication
//! window, the gateway's HTTP body cap) stay with the code that applies
//! them.

/// Largest body or encoded parameters of one task, in bytes.
pub const MAX_TASK_BODY_BYTES: usize = 1024 * 1024;

/// Most tasks in one `enqueue_batch` (and `POST /queue/{q}/batch`).
pub const MAX_BATCH_TASKS: usize = 1000;

/// The retry hint of a `busy` answer (HTTP `429` with `Retry-After`), in
/// seconds.
pub const BUSY_RETRY_SECS: u32 = 1;

/// Longest error text kept with a task (a worker's `reason`), in bytes;
/// the rest is cut off.
pub const MAX_ERROR_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Longest `wait` of an enqueue, in seconds.
pub const MAX_WAIT_SECS: f64 = 300.0;

/// What a `wait` must be, as error messages say it (HTTP and ZeroMQ).
pub const WAIT_RULE: &str = "wait must be a number of seconds from 0 to 300";

/// A `wait` as given, or [`WAIT_RULE`] when it is not finite, negative,
/// or past [`MAX_WAIT_SECS`].
pub fn check_wait(wait: f64) -> Result<f64, &'static str> {
    if wait.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&wait) {
        Ok(wait)
    } else {
        Err(WAIT_RULE)
    }
}

/// How much of a worker's answer is kept with a task and sent back by a
/// gateway, in bytes; the rest is cut off.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 100;

/// Bytes of tasks or queues one listing reply carries at most (by a
/// bound on each entry's encoded size); past it the page ends early and
/// `next_cursor` goes on from there, so a reply always fits in a message
/// (2 MiB). The first entry is always sent.
pub const MAX_LIST_REPLY_BYTES: usize = 1024 * 1024;

/// Pools one worker's `ready` may name.
pub const MAX_POOLS_PER_WORKER: usize = 100;

/// Pools a broker's dispatcher knows at once (served, or with tasks
/// waiting or out); a `ready` that would pass it is answered `busy`.
/// Pools nobody serves and nothing uses are forgotten at once.
pub const MAX_POOLS: usize = 10_000;

/// Page size of a task or queue listing: the default and the largest.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
pub const MAX_LIST_LIMIT: u32 = 1000;

/// How many deliveries a broker puts in one `tasks` message, and how many
/// results a worker puts in one `results` message, at most.
pub const MAX_BATCHED: usize = 256;

/// Beyond this many bytes (by `Dispatched::encoded_size_bound` or
/// `DeliveryResult::encoded_size_bound`), a `tasks` or `results` message
/// takes nothing more: with any one task or result well under the 2 MiB
/// message limit, so is the message.
pub const MAX_BATCHED_BYTES: usize = 1024 * 1024;

/// Whether an entry of `size` bytes (its size bound) may join a `tasks` or
/// `results` message that holds `count` entries of `bytes` bytes: within
/// [`MAX_BATCHED`] and [`MAX_BATCHED_BYTES`], and the first always may.
pub fn batch_has_room(count: usize, bytes: usize, size: usize) -> bool {
    count == 0 || (count < MAX_BATCHED && bytes + size <= MAX_BATCHED_BYTES)
}

/// Seconds that came from outside (a client, a worker, a peer, a webhook
/// target's `Retry-After`) as a `Duration` in `[0, max]`: NaN and
/// negative values give 0, anything at or past `max` gives `max`. The one
/// gate for such numbers: `Duration::from_secs_f64` panics on the values
/// it turns away (NaN, negative, or past `u64::MAX` seconds).
pub fn clamp_secs(secs: f64, max: std::time::Duration) -> std::time::Duration {
    if secs.is_nan() || secs <= 0.0 {
        return std::time::Duration::ZERO;
    }
    if secs >= max.as_secs_f64() {
        return max;
    }
    std::time::Duration::from_secs_f64(secs)
}

/// Request headers a task may not set: they would change how the webhook
/// is framed (`Content-Length`, `Transfer-Encoding`, `TE`, `Trailer`) or
/// routed (`Host`, `Connection`, `Upgrade`, `Keep-Alive`, `Expect`,
/// `Proxy-*`). Compared without case.
pub const FORBIDDEN_TASK_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "keep-alive",
];

/// Whether a task may set a request header of this name (see
/// [`FORBIDDEN_TASK_HEADERS`]; `Proxy-*` is refused too).
pub fn is_allowed_task_header(name: &str) -> bool {
    let forbidden = FORBIDDEN_TASK_HEADERS
        .iter()
        .any(|f| f.eq_ignore_ascii_case(name));
    let proxy = name.len() >= 6 && name.as_bytes()[..6].eq_ignore_ascii_case(b"proxy-");
    !forbidden && !proxy
}

/// RFC 9110 `token` (`tchar`s only, at least one): a header name.
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// RFC 9110 `field-value`: visible characters (and `obs-text`, bytes of
/// 0x80 and more) with spaces and tabs only between them. Empty is valid.
pub fn is_header_value(value: &str) -> bool {
    let b = value.as_bytes();
    let vchar = |c: u8| (0x21..=0x7e).contains(&c) || c >= 0x80;
    let inner = |c: u8| vchar(c) || c == b' ' || c == b'\t';
    match (b.first(), b.last()) {
        (None, _) | (_, None) => true,
        (Some(&f), Some(&l)) => vchar(f) && vchar(l) && b.iter().all(|&c| inner(c)),
    }
}

/// Why a task's request header is refused, or `None` when it may be set.
pub fn check_task_header(name: &str, value: &str) -> Option<String> {
    if !is_header_name(name) {
        return Some(format!(
            "header name {name:?} is not a valid HTTP header name"
        ));
    }
    if !is_allowed_task_header(name) {
        return Some(format!(
            "header {name:?} may not be set by a task: it would change how the request is framed or routed"
        ));
    }
    if !is_header_value(value) {
        return Some(format!(
            "header {name:?} has a value that is not an HTTP field value (control characters, or spaces at its ends)"
        ));
    }
    None
}

/// What a queue name must match, as error messages say it.
pub const QUEUE_NAME_RULE: &str = "queue names must match [A-Za-z0-9-]{1,100}";

/// `[A-Za-z0-9-]{1,100}`.
pub fn is_valid_queue_name(s: &str) -> bool {
    (1..=100).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The error for a queue name that breaks [`QUEUE_NAME_RULE`], or `None`.
pub fn check_queue_name(s: &str) -> Result<(), &'static str> {
    if is_valid_queue_name(s) {
        Ok(())
    } else {
        Err(QUEUE_NAME_RULE)
    }
}

/// What a task name must match, as error messages say it.
pub const TASK_NAME_RULE: &str = "task.name must match [A-Za-z0-9_-]{1,500}";

/// `[A-Za-z0-9_-]{1,500}`.
pub fn is_valid_task_name(s: &str) -> bool {
    (1..=500).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[A-Za-z0-9_.-]{1,100}`: the POOL of a `zmq://POOL` URL.
pub fn is_valid_pool_name(s: &str) -> bool {
    (1..=100).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What a signing secret must look like, as error messages say it.
pub const SIGNING_SECRET_RULE: &str = "signing secrets must be whsec_ followed by base64";

/// The key bytes of a Standard Webhooks secret, `whsec_<base64>` (the
/// prefix is optional), or `None` when it is not base64 or is empty.
pub fn decode_signing_secret(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let raw = s.strip_prefix("whsec_").unwrap_or(s);
    let key = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
    (!key.is_empty()).then_some(key)
}

/// Queues one `stats` answer describes at most (in name order); the rest
/// are counted in `queues_left_out`. Keeps the answer under 1 MiB.
pub const MAX_STATS_QUEUES: usize = 2000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_queue_name("default"));
        assert!(!is_valid_queue_name("a_b"));
        assert!(!is_valid_queue_name(""));
        assert!(is_valid_queue_name(&"a".repeat(100)));
        assert!(!is_valid_queue_name(&"a".repeat(101)));
        assert_eq!(check_queue_name("bad name"), Err(QUEUE_NAME_RULE));
        assert!(is_valid_task_name("a_b-9"));
        assert!(!is_valid_task_name("a b"));
        assert!(!is_valid_pool_name(crate::HTTP_POOL));
        assert!(is_valid_pool_name("img.resize_v2-x"));
    }

    #[test]
    fn secrets() {
        assert_eq!(decode_signing_secret("whsec_AQI="), Some(vec![1, 2]));
        assert_eq!(decode_signing_secret("AQI="), Some(vec![1, 2]));
        assert_eq!(decode_signing_secret("whsec_!!"), None);
        assert_eq!(decode_signing_secret("whsec_"), None);
    }

    #[test]
    fn seconds_from_outside_never_panic() {
        use std::time::Duration;
        let max = Duration::from_secs(60);
        assert_eq!(clamp_secs(1.5, max), Duration::from_millis(1500));
        for huge in [1e20, 1e308, f64::INFINITY, u64::MAX as f64] {
            assert_eq!(clamp_secs(huge, max), max);
        }
        for none in [f64::NAN, -1.0, f64::NEG_INFINITY, 0.0, -0.0] {
            assert_eq!(clamp_secs(none, max), Duration::ZERO);
        }
        assert_eq!(clamp_secs(f64::MAX, Duration::MAX), Duration::MAX);
    }

    #[test]
    fn task_headers() {
        assert!(check_task_header("X-Custom", "a b\tc é").is_none());
        assert!(check_task_header("Authorization", "").is_none());
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "CONNECTION",
            "Upgrade",
            "TE",
            "Expect",
            "Keep-Alive",
            "Proxy-Authorization",
            "proxy-x",
            "Trailer",
        ] {
            let e = check_task_header(name, "x").unwrap();
            assert!(e.contains(name), "{e}");
        }
        assert!(check_task_header("X-Proxy-Ok", "x").is_none());
        for value in ["a\x01b", "a\x7fb", "a\r\nb", "a\0", " lead", "trail ", "\t"] {
            assert!(check_task_header("X-A", value).is_some(), "{value:?}");
        }
        assert!(check_task_header("a b", "x").is_some());
        assert!(check_task_header("", "x").is_some());
    }

    #[test]
    fn one_rule_for_wait() {
        assert_eq!(check_wait(0.0), Ok(0.0));
        assert_eq!(check_wait(300.0), Ok(300.0));
        for bad in [300.5, 1e308, f64::INFINITY, f64::NAN, -1.0] {
            assert_eq!(check_wait(bad), Err(WAIT_RULE));
        }
    }

    #[test]
    fn batch_room() {
        assert!(batch_has_room(0, 0, MAX_BATCHED_BYTES * 2));
        assert!(!batch_has_room(MAX_BATCHED, 0, 1));
        assert!(!batch_has_room(1, MAX_BATCHED_BYTES, 1));
    }
}
