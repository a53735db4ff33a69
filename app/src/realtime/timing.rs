//! When to try again after a lost connection, and when to refresh a token before it expires.
//! Pure arithmetic, so both feature sets compile it and the tests run on the host.

use std::time::Duration;

use crate::protocol::TokenGrant;

/// Refresh no later than this long before the token expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(2);

/// Exponential backoff with full jitter: attempt `n` waits a random time between zero and
/// `min(cap, base * 2^n)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The longest wait before attempt `attempt` (counting from zero).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before attempt `attempt`, for a uniform random `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.ceiling(attempt).mul_f64(unit)
    }
}

/// How long to wait before refreshing a token that has `remaining` left to live: at three
/// quarters of it, and at least [`REFRESH_MARGIN`] before it runs out.
pub fn refresh_delay(remaining: Duration) -> Duration {
    let three_quarters = remaining.mul_f64(0.75);
    three_quarters.min(remaining.saturating_sub(REFRESH_MARGIN))
}

/// A token's lifetime measured on the browser's clock, so a skewed clock between browser and
/// server does not move the refresh.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenClock {
    /// Server time (seconds) at which the token was issued.
    issued_at: u64,
    /// Browser time (milliseconds) at which the grant arrived.
    received_at_ms: f64,
}

impl TokenClock {
    pub fn new(grant: &TokenGrant, received_at_ms: f64) -> Self {
        Self {
            issued_at: grant.expires_at.saturating_sub(grant.ttl_secs),
            received_at_ms,
        }
    }

    /// What is left at browser time `now_ms` of a token the server says expires at
    /// `expires_at` (seconds).
    pub fn remaining(&self, expires_at: u64, now_ms: f64) -> Duration {
        let lifetime_ms = expires_at.saturating_sub(self.issued_at) as f64 * 1000.0;
        let left_ms = self.received_at_ms + lifetime_ms - now_ms;
        Duration::from_secs_f64((left_ms / 1000.0).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let backoff = Backoff::default();
        assert_eq!(backoff.ceiling(0), ms(250));
        assert_eq!(backoff.ceiling(1), ms(500));
        assert_eq!(backoff.ceiling(3), ms(2000));
        assert_eq!(backoff.ceiling(6), ms(10_000));
        assert_eq!(backoff.ceiling(31), ms(10_000));
        assert_eq!(backoff.ceiling(200), ms(10_000));
    }

    #[test]
    fn backoff_jitter_stays_inside_the_ceiling() {
        let backoff = Backoff::default();
        assert_eq!(backoff.delay(2, 0.0), Duration::ZERO);
        assert_eq!(backoff.delay(2, 0.5), ms(500));
        assert!(backoff.delay(2, 0.999) < ms(1000));
        assert_eq!(backoff.delay(2, 7.0), ms(1000));
        assert_eq!(backoff.delay(2, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn refresh_comes_at_three_quarters_or_two_seconds_early() {
        assert_eq!(
            refresh_delay(Duration::from_secs(60)),
            Duration::from_secs(45)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(4)),
            Duration::from_secs(2)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(refresh_delay(ms(1500)), Duration::ZERO);
        assert_eq!(refresh_delay(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn token_clock_ignores_browser_skew() {
        // The browser's clock is far from the server's; only elapsed browser time matters.
        let grant = TokenGrant {
            token: "t".into(),
            channel: "user:u".into(),
            topics: vec!["ai".into()],
            expires_at: 1_000_060,
            ttl_secs: 60,
        };
        let clock = TokenClock::new(&grant, 5_000.0);
        assert_eq!(
            clock.remaining(grant.expires_at, 5_000.0),
            Duration::from_secs(60)
        );
        assert_eq!(
            clock.remaining(grant.expires_at, 35_000.0),
            Duration::from_secs(30)
        );
        assert_eq!(clock.remaining(grant.expires_at, 99_000.0), Duration::ZERO);
        // A server that grants a longer life in its reply is believed.
        assert_eq!(clock.remaining(1_000_090, 5_000.0), Duration::from_secs(90));
    }
}
