//! Queue configuration from outside: a queue file (TOML,
//! `broker::cli::parse_queue_file`, what `--queues FILE` reads) or a JSON
//! patch (`PUT /queue/NAME`: `QueueConfigPatch` via serde_json, applied by
//! `broker::queues::apply_patch`). The first byte chooses; the rest is the
//! text. Every configuration accepted must hold the rules `apply_patch`
//! states, a refused patch must leave the configuration unchanged, an
//! accepted one must be idempotent, and the queue built from it (retry
//! policy, token bucket) must not panic at any attempt count or time.
#![no_main]

use broker::queues::{apply_patch, retry_policy, Queue};
use libfuzzer_sys::fuzz_target;
use protocol::{QueueConfig, QueueConfigPatch};

const T0: u64 = 1_800_000_000_000_000;
const DAYS_30: f64 = 30.0 * 86400.0;

fn check_config(c: &QueueConfig, tail: &[u8]) {
    assert!(
        c.rate == 0.0 || (c.rate >= 0.001 && c.rate <= 1e9),
        "rate {}",
        c.rate
    );
    assert!(c.burst >= 1);
    assert!(c.max_attempts == -1 || (1..=u32::MAX as i64).contains(&c.max_attempts));
    for (name, v, zero) in [
        ("max_age", c.max_age, true),
        ("min_backoff", c.min_backoff, false),
        ("max_backoff", c.max_backoff, false),
        ("dedup_window", c.dedup_window, true),
        ("retention", c.retention, true),
    ] {
        assert!(
            v.is_finite() && (v > 0.0 || (zero && v == 0.0)) && v <= DAYS_30,
            "{name} = {v}"
        );
    }
    assert!(c.min_backoff <= c.max_backoff);
    assert!(c.max_doublings <= 64);
    assert!(c.timeout > 0.0 && c.timeout <= broker::validate::MAX_TIMEOUT_SECS);
    for s in &c.signing_secrets {
        assert!(protocol::limits::decode_signing_secret(s).is_some());
    }
    let _ = broker::queues::redacted(c);

    let policy = retry_policy(c);
    let retry_after = tail
        .get(..8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()));
    for n in [0, 1, 2, 17, 63, 64, 65, 1000, u32::MAX] {
        let d = policy.backoff(n);
        assert!(d <= policy.max_backoff, "backoff({n}) = {d:?}");
        let _ = policy.next_delay(n, retry_after);
        let _ = policy.allows_another(n, d);
    }
    let mut q = Queue::new(c.clone(), T0);
    let mut now = T0;
    for chunk in tail.chunks(4).take(32) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        // Up to 136 years on, in microseconds' steps of varying size.
        now += u64::from(u32::from_le_bytes(b)) << (chunk[0] % 21);
        if let Err(at) = q.take_token(now) {
            assert!(at > now, "take_token({now}) asks to wait until {at}");
        }
        q.record_dispatch(now);
        let _ = q.stats(now, 0.0);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // The part used for retry delays and token-bucket times.
    let tail = &rest[rest.len().saturating_sub(64)..];
    if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok((defaults, queues)) = broker::cli::parse_queue_file(text, QueueConfig::default())
        {
            check_config(&defaults, tail);
            for (name, c) in &queues {
                assert!(protocol::limits::is_valid_queue_name(name), "{name:?}");
                check_config(c, tail);
            }
        }
    } else {
        let Ok(patch) = serde_json::from_slice::<QueueConfigPatch>(rest) else {
            return;
        };
        let base = if mode & 2 == 0 {
            QueueConfig::default()
        } else {
            QueueConfig {
                rate: 5.0,
                burst: 1,
                max_concurrent: 3,
                max_attempts: -1,
                max_age: DAYS_30,
                min_backoff: DAYS_30,
                max_backoff: DAYS_30,
                max_doublings: 64,
                timeout: 3600.0,
                dedup_window: 0.0,
                retention: 0.0,
                signing_secrets: vec!["whsec_AQI=".into()],
            }
        };
        let mut c = base.clone();
        match apply_patch(&mut c, patch.clone()) {
            Ok(()) => {
                check_config(&c, tail);
                let mut again = c.clone();
                apply_patch(&mut again, patch).expect("a patch accepted once is accepted again");
                assert_eq!(again, c, "applying a patch twice changed the result");
            }
            Err(_) => assert_eq!(c, base, "a refused patch changed the configuration"),
        }
    }
});
