//! Retry policy and App Engine's backoff rule.

use std::time::Duration;

/// When and how often a failed task is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub min_backoff: Duration,
    /// Delay never exceeds this.
    pub max_backoff: Duration,
    /// How many times the delay doubles before it grows linearly.
    pub max_doublings: u32,
    /// Attempts in all, the first included; `None` is unlimited.
    pub max_attempts: Option<u32>,
    /// No retry starts this long after the first attempt; `None` is unlimited.
    pub max_age: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3600),
            max_doublings: 16,
            max_attempts: Some(100),
            max_age: None,
        }
    }
}

/// The longest retry delay a `Retry-After` can ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 86400);

impl RetryPolicy {
    /// Delay before retry number `n` (1 for the first retry):
    /// `e = min(n-1, max_doublings)`,
    /// `delay = min(max_backoff, min_backoff · 2^e · max(1, n - e))`.
    pub fn backoff(&self, n: u32) -> Duration {
        let n = n.max(1);
        let e = (n - 1).min(self.max_doublings);
        let linear = (n - e).max(1) as f64;
        let secs = self.min_backoff.as_secs_f64() * 2f64.powi(e as i32) * linear;
        let max = self.max_backoff.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }

    /// Whether another attempt may follow `attempts` attempts made, `age`
    /// after the first one. With both limits set, retries stop only when
    /// both are exhausted (App Engine's rule); with one, that one decides.
    pub fn allows_another(&self, attempts: u32, age: Duration) -> bool {
        let attempts_left = self.max_attempts.map(|max| attempts < max);
        let age_left = self.max_age.map(|max| age < max);
        match (attempts_left, age_left) {
            (Some(a), Some(b)) => a || b,
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => true,
        }
    }

    /// The delay before the next attempt after `attempts` attempts, at
    /// least `retry_after` when the target asked for it.
    pub fn next_delay(&self, attempts: u32, retry_after: Option<f64>) -> Duration {
        let backoff = self.backoff(attempts);
        match retry_after {
            Some(s) if !s.is_nan() && s > 0.0 => {
                backoff.max(protocol::limits::clamp_secs(s, MAX_RETRY_AFTER))
            }
            _ => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(p: &RetryPolicy, n: u32) -> f64 {
        p.backoff(n).as_secs_f64()
    }

    #[test]
    fn app_engine_sequence() {
        let p = RetryPolicy {
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            max_doublings: 3,
            max_attempts: None,
            max_age: None,
        };
        let got: Vec<f64> = (1..=7).map(|n| secs(&p, n)).collect();
        assert_eq!(got, vec![10.0, 20.0, 40.0, 80.0, 160.0, 240.0, 300.0]);
    }

    #[test]
    fn defaults_double_then_cap() {
        let p = RetryPolicy::default();
        assert!((secs(&p, 1) - 0.1).abs() < 1e-9);
        assert!((secs(&p, 2) - 0.2).abs() < 1e-9);
        assert!((secs(&p, 3) - 0.4).abs() < 1e-9);
        assert_eq!(secs(&p, 90), 3600.0);
        assert!(p.allows_another(99, Duration::ZERO));
        assert!(!p.allows_another(100, Duration::ZERO));
    }

    #[test]
    fn both_limits_must_be_exhausted() {
        let p = RetryPolicy {
            max_attempts: Some(3),
            max_age: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert!(p.allows_another(5, Duration::from_secs(10)), "age left");
        assert!(
            p.allows_another(1, Duration::from_secs(100)),
            "attempts left"
        );
        assert!(!p.allows_another(3, Duration::from_secs(60)));
        let age_only = RetryPolicy {
            max_attempts: None,
            max_age: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert!(age_only.allows_another(1000, Duration::from_secs(59)));
        assert!(!age_only.allows_another(1, Duration::from_secs(60)));
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_delay(1, Some(2.0)), Duration::from_secs(2));
        assert_eq!(p.next_delay(1, Some(f64::NAN)), Duration::from_millis(100));
    }
}
