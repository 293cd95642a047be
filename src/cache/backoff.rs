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

/// Pause before the 401-driven refresh after a second consecutive token generation was
/// rejected shortly after issue: 1 s, doubled per further rejected generation up to
/// [`MAX_FAILURE_BACKOFF`]. One rejection always invalidates the token and replays the request
/// (a revoked token, a key rotation); a server that rejects every token instead gets one token
/// request per backoff step, and meanwhile its 401s are returned as they are.
pub const REJECTED_GENERATION_BACKOFF: Duration = Duration::from_secs(1);
/// A rejected token counts towards a run of consecutive rejected generations only when the
/// 401 came within this long of its token request: 10 s. A token that worked for longer and
/// was then revoked starts a new run; its 401 is always replayed.
pub const REJECTED_GENERATION_WINDOW: Duration = Duration::from_secs(10);

/// The hold after `streak` consecutive generations were rejected shortly after issue: none for
/// the first one, then [`REJECTED_GENERATION_BACKOFF`] doubling up to [`MAX_FAILURE_BACKOFF`].
pub(crate) fn rejected_generation_backoff(streak: u32) -> Option<Duration> {
    let exponent = streak.checked_sub(2)?.min(16);
    Some(
        REJECTED_GENERATION_BACKOFF
            .saturating_mul(1 << exponent)
            .min(MAX_FAILURE_BACKOFF),
    )
}

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
        // The server's own fault in an RFC 6749 §5.2-shaped body (codes of §4.1.2.1 that
        // token endpoints send too): backed off like a 503, not paused like bad credentials.
        ErrorKind::TokenRequestRejected { fields, .. } => matches!(
            fields.error.as_deref(),
            Some("server_error" | "temporarily_unavailable")
        ),
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
    fn rejected_generations_back_off_from_the_second_one_exponentially() {
        assert_eq!(rejected_generation_backoff(0), None);
        assert_eq!(rejected_generation_backoff(1), None);
        assert_eq!(
            rejected_generation_backoff(2),
            Some(REJECTED_GENERATION_BACKOFF)
        );
        assert_eq!(
            rejected_generation_backoff(3),
            Some(REJECTED_GENERATION_BACKOFF * 2)
        );
        assert_eq!(
            rejected_generation_backoff(4),
            Some(REJECTED_GENERATION_BACKOFF * 4)
        );
        assert_eq!(rejected_generation_backoff(40), Some(MAX_FAILURE_BACKOFF));
    }

    #[test]
    fn only_failures_that_may_pass_are_transient() {
        for code in [500, 502, 503, 504, 429, 408] {
            assert!(is_transient(&status(code, None)), "{code}");
        }
        for code in [300, 302, 404, 409, 418] {
            assert!(!is_transient(&status(code, None)), "{code}");
        }
        for kind in [
            ErrorKind::Transport,
            ErrorKind::RefreshAborted,
            ErrorKind::Timeout {
                after: Duration::from_secs(1),
            },
            ErrorKind::ResponseTooLarge { limit: 1 },
        ] {
            assert!(is_transient(&Error::new(kind.clone())), "{kind:?}");
        }
        for kind in [
            ErrorKind::NoTimeDriver,
            ErrorKind::InvalidTokenResponse {
                field: "access_token",
                reason: "is missing",
                content_type: None,
            },
            ErrorKind::UnsupportedTokenType {
                token_type: "mac".into(),
            },
        ] {
            assert!(!is_transient(&Error::new(kind.clone())), "{kind:?}");
        }
    }

    #[test]
    fn a_rejection_naming_a_server_fault_is_transient_and_other_codes_are_not() {
        let rejected = |code: Option<&str>| {
            Error::new(ErrorKind::TokenRequestRejected {
                status: StatusCode::BAD_REQUEST,
                fields: crate::error::TokenErrorFields {
                    error: code.map(str::to_owned),
                    ..Default::default()
                },
            })
        };
        assert!(is_transient(&rejected(Some("temporarily_unavailable"))));
        assert!(is_transient(&rejected(Some("server_error"))));
        for code in [
            None,
            Some("invalid_client"),
            Some("invalid_request"),
            Some("invalid_scope"),
            Some("temporarily_unavailable "),
        ] {
            assert!(!is_transient(&rejected(code)), "{code:?}");
        }
        assert!(pause_after(&rejected(Some("temporarily_unavailable")), 1) <= MIN_FAILURE_BACKOFF);
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
