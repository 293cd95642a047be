//! What the crate tells operators about its token requests.
//!
//! - **Logs** (`tracing`): one INFO event `access token obtained` per token obtained, with the
//!   token endpoint's host, the `client_id`, the requested and granted scope, the new token's
//!   generation, why it was requested (`initial`, `expired`, `refresh-ahead`, `rejected`,
//!   `invalidated by the user`), the time the request took, the token's lifetime and its
//!   `source` (`token endpoint`, or `token store` when another process requested it); one WARN
//!   event `token request failed` per failure, with the same identification and the error
//!   (which names the cause, see [`crate::Error`]). No field ever holds a secret: not the
//!   `client_secret`, not an access token.
//! - **Span**: each token request runs in a span `oauth2_token_request` that has no parent
//!   (background token traffic never lands inside an unrelated user trace) and *follows from*
//!   the span of the request that triggered it.
//! - **Metrics** (feature `metrics`, through the [`metrics`](https://docs.rs/metrics) facade;
//!   install any recorder): the names below, each labelled with `client_id` and `endpoint`.
//! - **Health** (feature `serde`): [`crate::TokenCacheStatus`] serialises, durations as
//!   seconds and the last error as its one-line text.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::RefreshReason;
use crate::error::Error;

/// Counter: token requests that ended, label `outcome` = `success`, `transient_failure`
/// (timeouts, transport errors, 5xx, 429: retried after a backoff) or `permanent_failure`
/// (rejected client or grant, unusable response: paused), and `reason` as in the logs.
/// Feature `metrics`.
pub const METRIC_TOKEN_REQUESTS: &str = "nuvy_oauth2_token_requests_total";
/// Histogram: duration of token requests that ended, in seconds. Feature `metrics`.
pub const METRIC_TOKEN_REQUEST_DURATION: &str = "nuvy_oauth2_token_request_duration_seconds";
/// Counter: API requests sent again after a 401 (or gRPC `UNAUTHENTICATED`) with a fresh
/// token. Feature `metrics`.
pub const METRIC_UNAUTHORIZED_REPLAYS: &str = "nuvy_oauth2_unauthorized_replays_total";
/// Gauge: seconds until the current token's `expires_in` runs out (0: no token). Set when a
/// token is installed and whenever [`crate::TokenCache::status`] is read (poll it from a
/// health endpoint to keep the gauge current). Feature `metrics`.
pub const METRIC_TOKEN_REMAINING_LIFETIME: &str = "nuvy_oauth2_token_remaining_lifetime_seconds";

/// What identifies one cache's token traffic in logs and metrics. Public values only.
#[derive(Debug)]
pub(crate) struct Labels {
    /// The token endpoint's host (and port when given), without userinfo, path or query.
    endpoint: Arc<str>,
    client_id: Arc<str>,
    requested_scope: Option<Arc<str>>,
}

impl Labels {
    pub(crate) fn new(token_endpoint: &http::Uri, client_id: &str, scope: Option<&str>) -> Self {
        let host = token_endpoint.host().unwrap_or_default();
        let endpoint = match token_endpoint.port_u16() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Self {
            endpoint: endpoint.into(),
            client_id: client_id.into(),
            requested_scope: scope.map(Arc::from),
        }
    }
}

/// The span a token request runs in: no parent, follows from the caller's current span.
pub(crate) fn token_request_span() -> tracing::Span {
    let span = tracing::info_span!(parent: None, "oauth2_token_request");
    span.follows_from(tracing::Span::current());
    span
}

/// A token request that obtained a token.
pub(crate) struct Obtained<'a> {
    pub(crate) reason: RefreshReason,
    pub(crate) generation: u64,
    pub(crate) granted_scope: Option<&'a str>,
    pub(crate) elapsed: Duration,
    pub(crate) lifetime: Duration,
    /// Taken from a token store: no token request was sent by this process.
    pub(crate) from_store: bool,
}

/// Logs (INFO) and counts a token obtained.
pub(crate) fn token_obtained(labels: &Labels, obtained: &Obtained<'_>) {
    tracing::info!(
        endpoint = %labels.endpoint,
        client_id = %labels.client_id,
        reason = obtained.reason.as_str(),
        requested_scope = labels.requested_scope.as_deref(),
        granted_scope = obtained.granted_scope,
        generation = obtained.generation,
        elapsed_ms = obtained.elapsed.as_millis() as u64,
        lifetime_secs = obtained.lifetime.as_secs(),
        source = if obtained.from_store { "token store" } else { "token endpoint" },
        "access token obtained"
    );
    #[cfg(feature = "metrics")]
    {
        if !obtained.from_store {
            record::request(labels, obtained.reason, "success", obtained.elapsed);
        }
        record::remaining_lifetime(labels, Some(obtained.lifetime));
    }
}

/// A token request that ended without a token.
pub(crate) struct Failed<'a> {
    pub(crate) reason: RefreshReason,
    pub(crate) error: &'a Error,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) transient: bool,
    pub(crate) elapsed: Duration,
    pub(crate) consecutive_failures: u32,
    pub(crate) retry_in: Duration,
}

/// Logs (WARN, with the error's cause) and counts a failed token request.
pub(crate) fn token_request_failed(labels: &Labels, failed: &Failed<'_>) {
    tracing::warn!(
        endpoint = %labels.endpoint,
        client_id = %labels.client_id,
        reason = failed.reason.as_str(),
        elapsed_ms = failed.elapsed.as_millis() as u64,
        consecutive_failures = failed.consecutive_failures,
        retry_in_ms = failed.retry_in.as_millis() as u64,
        error = %failed.error,
        "token request failed"
    );
    #[cfg(feature = "metrics")]
    {
        let outcome = if failed.transient {
            "transient_failure"
        } else {
            "permanent_failure"
        };
        record::request(labels, failed.reason, outcome, failed.elapsed);
    }
}

/// Counts an API request replayed after a 401.
pub(crate) fn unauthorized_replay(labels: &Labels) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        METRIC_UNAUTHORIZED_REPLAYS,
        "client_id" => labels.client_id.to_string(),
        "endpoint" => labels.endpoint.to_string(),
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = labels;
}

/// Sets the remaining-lifetime gauge (`None`: no token).
pub(crate) fn remaining_lifetime(labels: &Labels, remaining: Option<Duration>) {
    #[cfg(feature = "metrics")]
    record::remaining_lifetime(labels, remaining);
    #[cfg(not(feature = "metrics"))]
    let _ = (labels, remaining);
}

#[cfg(feature = "metrics")]
mod record {
    use std::time::Duration;

    use super::*;

    pub(super) fn request(
        labels: &Labels,
        reason: RefreshReason,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        metrics::counter!(
            METRIC_TOKEN_REQUESTS,
            "client_id" => labels.client_id.to_string(),
            "endpoint" => labels.endpoint.to_string(),
            "outcome" => outcome,
            "reason" => reason.as_str(),
        )
        .increment(1);
        metrics::histogram!(
            METRIC_TOKEN_REQUEST_DURATION,
            "client_id" => labels.client_id.to_string(),
            "endpoint" => labels.endpoint.to_string(),
        )
        .record(elapsed.as_secs_f64());
    }

    pub(super) fn remaining_lifetime(labels: &Labels, remaining: Option<Duration>) {
        metrics::gauge!(
            METRIC_TOKEN_REMAINING_LIFETIME,
            "client_id" => labels.client_id.to_string(),
            "endpoint" => labels.endpoint.to_string(),
        )
        .set(remaining.map_or(0.0, |left| left.as_secs_f64()));
    }
}

#[cfg(feature = "serde")]
mod status_serde {
    use std::time::Duration;

    use serde::ser::{Serialize, SerializeStruct, Serializer};

    use crate::cache::TokenCacheStatus;

    /// Durations as seconds (`f64`), the last error as its one-line `Display` text.
    impl Serialize for TokenCacheStatus {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let secs = |duration: Option<Duration>| duration.map(|d| d.as_secs_f64());
            let mut status = serializer.serialize_struct("TokenCacheStatus", 9)?;
            status.serialize_field("token_valid_for_secs", &secs(self.token_valid_for))?;
            status.serialize_field("token_expires_in_secs", &secs(self.token_expires_in))?;
            status.serialize_field("token_age_secs", &secs(self.token_age))?;
            status.serialize_field("generation", &self.generation)?;
            status.serialize_field("token_requests", &self.token_requests)?;
            status.serialize_field("consecutive_failures", &self.consecutive_failures)?;
            let last_error = self.last_error.as_ref().map(ToString::to_string);
            status.serialize_field("last_error", &last_error)?;
            status.serialize_field("refresh_in_flight", &self.refresh_in_flight)?;
            status.serialize_field("granted_scope", &self.granted_scope)?;
            status.end()
        }
    }
}
