//! When a token is refreshed: the refresh-ahead point (background, nobody waits) and the
//! refresh point (callers wait), both counted from when the token request was sent.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{MAX_REFRESH_MARGIN, MAX_TOKEN_LIFETIME, REFRESH_MARGIN_PERCENT};

/// Refresh-ahead starts at this share of the token lifetime, in percent: 75 %. Early enough that
/// a slow or failing endpoint has a quarter of the lifetime to recover before anyone waits.
pub const REFRESH_AHEAD_PERCENT: u32 = 75;
/// Random spread of the refresh-ahead point, in percent of the lifetime either side (±5 %), so a
/// fleet that started together does not refresh in lockstep.
pub const REFRESH_AHEAD_JITTER_PERCENT: u32 = 5;

/// The three moments of a token's life.
pub(crate) struct Schedule {
    pub(crate) refresh_ahead_at: Instant,
    pub(crate) refresh_at: Instant,
    pub(crate) expires_at: Instant,
}

/// The refresh margin: the smaller of [`MAX_REFRESH_MARGIN`] and [`REFRESH_MARGIN_PERCENT`] of
/// the lifetime.
pub(crate) fn refresh_margin(lifetime: Duration) -> Duration {
    MAX_REFRESH_MARGIN.min(lifetime * REFRESH_MARGIN_PERCENT / 100)
}

/// About 30 years: what "later than anything representable" saturates to.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// `at + offset`, saturating: a sum past what an `Instant` can hold becomes a moment about 30
/// years ahead (or `at` itself on a platform where even that does not fit). Never panics.
pub(crate) fn saturating_add(at: Instant, offset: Duration) -> Instant {
    at.checked_add(offset)
        .or_else(|| at.checked_add(FAR_FUTURE.min(offset)))
        .unwrap_or(at)
}

pub(crate) fn schedule(requested_at: Instant, lifetime: Duration) -> Schedule {
    let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
    let after = |offset: Duration| saturating_add(requested_at, offset);
    let expires_at = after(lifetime);
    let refresh_at = after(lifetime - refresh_margin(lifetime));
    let jitter = (fastrand::f64() * 2.0 - 1.0) * f64::from(REFRESH_AHEAD_JITTER_PERCENT);
    // `PERCENT - jitter` would draw from the same distribution (the jitter is symmetric around
    // zero): an equivalent mutant.
    let ahead_share = (f64::from(REFRESH_AHEAD_PERCENT) + jitter) / 100.0;
    let refresh_ahead_at = after(lifetime.mul_f64(ahead_share)).min(refresh_at);
    Schedule {
        refresh_ahead_at,
        refresh_at,
        expires_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_adapts_to_short_lifetimes() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            MAX_REFRESH_MARGIN
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(5)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn refresh_ahead_comes_before_refresh_which_comes_before_expiry() {
        let start = Instant::now();
        let (mut earliest, mut latest) = (Duration::MAX, Duration::ZERO);
        for _ in 0..200 {
            let schedule = schedule(start, Duration::from_secs(100));
            let ahead = schedule.refresh_ahead_at - start;
            assert!(ahead >= Duration::from_secs(70) && ahead <= Duration::from_secs(80));
            assert_eq!(schedule.refresh_at - start, Duration::from_secs(90));
            assert_eq!(schedule.expires_at - start, Duration::from_secs(100));
            earliest = earliest.min(ahead);
            latest = latest.max(ahead);
        }
        // The jitter spreads the points over the whole ±5 % (200 draws: both outer fifths hit).
        assert!(earliest < Duration::from_secs(72), "{earliest:?}");
        assert!(latest > Duration::from_secs(78), "{latest:?}");
    }

    #[test]
    fn instant_arithmetic_saturates() {
        let now = Instant::now();
        assert_eq!(
            saturating_add(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = saturating_add(now, Duration::MAX);
        assert!(far >= now + Duration::from_secs(29 * 365 * 24 * 60 * 60));
    }

    #[test]
    fn huge_lifetimes_never_overflow() {
        let schedule = schedule(Instant::now(), Duration::MAX);
        assert!(schedule.refresh_at < schedule.expires_at);
    }
}
