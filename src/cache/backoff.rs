//! How long the cache waits before the next token request after a failure.

use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// First pause after a transient failure (connect error, timeout, 5xx, 429): 200 ms, doubled per
/// consecutive failure up to [`MAX_FAILURE_BACKOFF`], with jitter, so an outage is not met with
/// a stampede from every caller or every instance of a fleet.
pub const MIN_FAILURE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause after transient failures: 30 s.
pub const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(30);
/// Pause after a permanent failure (400, 401 `invalid_client`, an unusable token response):
/// 30 s. Retrying at once cannot help; retrying in a loop would hammer the endpoint and
/// may lock the client out. Callers without a valid token get the error at once meanwhile.
pub const PERMANENT_FAILURE_PAUSE: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured: 10 min. A longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Whether retrying the same token request later may succeed without a configuration change.
pub(crate) fn is_transient(error: &Error) -> bool {
    match error.kind() {
        ErrorKind::Timeout { .. }
        | ErrorKind::Transport
        | ErrorKind::RefreshAborted
        | ErrorKind::NoRuntime
        | ErrorKind::ResponseTooLarge { .. }
        | ErrorKind::UnexpectedContentEncoding { .. } => true,
        ErrorKind::UnexpectedStatus { status, .. } => {
            status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408
        }
        _ => false,
    }
}

/// The pause before the next token request after `consecutive_failures` failures (≥ 1), the
/// last of which is `error`.
pub(crate) fn pause_after(error: &Error, consecutive_failures: u32) -> Duration {
    if !is_transient(error) {
        return PERMANENT_FAILURE_PAUSE;
    }
    let exponent = consecutive_failures.saturating_sub(1).min(16);
    let ceiling = MIN_FAILURE_BACKOFF
        .saturating_mul(1 << exponent)
        .min(MAX_FAILURE_BACKOFF);
    // Jitter: somewhere in the upper half, so the pause never collapses to zero.
    let backoff = ceiling.mul_f64(0.5 + fastrand::f64() / 2.0);
    match error.retry_after() {
        Some(retry_after) => backoff.max(retry_after.min(MAX_RETRY_AFTER)),
        None => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn status(code: u16, retry_after: Option<Duration>) -> Error {
        Error::new(ErrorKind::UnexpectedStatus {
            status: StatusCode::from_u16(code).unwrap(),
            content_type: None,
            retry_after,
        })
    }

    #[test]
    fn transient_failures_back_off_exponentially_within_bounds() {
        let error = status(503, None);
        for failures in 1..40 {
            let pause = pause_after(&error, failures);
            assert!(pause >= MIN_FAILURE_BACKOFF / 2 && pause <= MAX_FAILURE_BACKOFF);
        }
        assert!(pause_after(&error, 1) <= MIN_FAILURE_BACKOFF);
        assert!(pause_after(&error, 20) >= MAX_FAILURE_BACKOFF / 2);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let pause = pause_after(&status(429, Some(Duration::from_secs(7))), 1);
        assert_eq!(pause, Duration::from_secs(7));
        let pause = pause_after(&status(503, Some(Duration::from_secs(100_000))), 1);
        assert_eq!(pause, MAX_RETRY_AFTER);
    }

    #[test]
    fn permanent_failures_pause_for_the_named_time() {
        let error = Error::new(ErrorKind::TokenRequestRejected {
            status: StatusCode::UNAUTHORIZED,
            fields: Default::default(),
        });
        assert_eq!(pause_after(&error, 1), PERMANENT_FAILURE_PAUSE);
    }
}
