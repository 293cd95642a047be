//! [`TokenCache`]: the one cached access token of a layer and everything that keeps it fresh.
//!
//! - **Read path** ([`snapshot`]): a valid token is used with one atomic load (the service's own
//!   copy) or one lock-free `ArcSwap` load (a service that holds no copy yet), and one clock
//!   read; no lock, no allocation. Every change of the current token is published from one
//!   place, `TokenCache::publish`.
//! - **Single flight** ([`refresh`]): at most one token request is in flight per cache. It runs
//!   in a spawned task, so dropping any caller (the one that started it included) neither
//!   cancels nor stalls it; its outcome, success or shared [`Error`], reaches every waiter.
//! - **Generations**: every token gets a number; a 401 invalidates only the generation it was
//!   answered for ([`TokenCache::invalidate`]).
//! - **Refresh-ahead**: after about 75 % of the lifetime the first request to notice starts a
//!   background refresh while everyone keeps using the current token; callers wait only inside
//!   the refresh margin or with no token at all.

mod backoff;
mod refresh;
mod snapshot;
mod timing;

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::error::Error;
use crate::secret::AccessToken;
use crate::token::TokenFetcher;

pub(crate) use backoff::is_transient;
pub use backoff::{
    MAX_FAILURE_BACKOFF, MAX_RETRY_AFTER, MIN_FAILURE_BACKOFF, PERMANENT_FAILURE_PAUSE,
};
pub use refresh::RefreshReason;
pub(crate) use refresh::RefreshWait;
pub use timing::{REFRESH_AHEAD_JITTER_PERCENT, REFRESH_AHEAD_PERCENT};

/// A 401 for a token requested less than this long ago is returned as it is, neither
/// invalidated nor replayed: 1 s. A server that rejects fresh tokens would reject the next one
/// too, and replaying would turn every request into a token request; older tokens (revoked,
/// expired early) are the case the retry exists for.
pub const MIN_TOKEN_AGE_FOR_401_RETRY: Duration = Duration::from_secs(1);

/// What [`TokenCache::reject`] did with a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// The rejected token was the cached one and is gone; replay.
    Invalidated,
    /// A newer token is cached or on its way; replay.
    AlreadyReplaced,
    /// The rejected token was issued moments ago; return the 401.
    TooFresh,
}

impl Rejection {
    pub(crate) fn allows_replay(self) -> bool {
        !matches!(self, Rejection::TooFresh)
    }
}

use snapshot::{Published, NO_TOKEN};

/// A service's own copy of the current token: what the warm path reads.
#[derive(Clone)]
pub(crate) struct LocalToken {
    pub(crate) generation: u64,
    /// `Bearer <token>`, sensitive.
    pub(crate) authorization: HeaderValue,
    /// From here on callers wait for a new token (expiry minus the refresh margin).
    pub(crate) refresh_at: Instant,
    /// From here on the first request starts a background refresh.
    pub(crate) refresh_ahead_at: Instant,
}

/// The token as stored in the cache.
#[derive(Clone)]
pub(crate) struct CachedToken {
    pub(crate) local: LocalToken,
    pub(crate) access_token: AccessToken,
    pub(crate) requested_at: Instant,
    pub(crate) expires_at: Instant,
    /// The token's scope, see [`TokenCacheStatus::granted_scope`].
    pub(crate) granted_scope: Option<Arc<str>>,
}

struct State {
    current: Option<CachedToken>,
    in_flight: Option<refresh::InFlight>,
    last_generation: u64,
    last_error: Option<Error>,
    /// After a failed token request, no new one is sent before this moment.
    retry_not_before: Option<Instant>,
    /// Identifies refreshes, so a late one cannot clear a newer one's in-flight slot.
    last_flight_id: u64,
}

struct Shared {
    /// `state.current` as the warm path reads it, lock-free. Written only by
    /// [`TokenCache::publish`], under the `state` lock.
    published: Published,
    /// The highest generation whose refresh-ahead was claimed by a request.
    refresh_ahead_claimed: AtomicU64,
    state: Mutex<State>,
    fetcher: TokenFetcher,
    min_token_age_for_401_retry: Duration,
    token_requests: AtomicU64,
    unauthorized_retries: AtomicU64,
    consecutive_failures: AtomicU32,
}

/// The token cache of one [`crate::OAuth2Layer`] and all services made from it. Cheap to clone
/// (an `Arc`); clones share the token.
#[derive(Clone)]
pub struct TokenCache {
    shared: Arc<Shared>,
}

/// A point-in-time view of a [`TokenCache`], cheap enough for a health endpoint.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TokenCacheStatus {
    /// How long the cached token stays usable before callers have to wait for a new one
    /// (`None`: no token, or it is inside its refresh margin).
    pub token_valid_for: Option<Duration>,
    /// How long until the cached token's `expires_in` runs out (`None`: no token).
    pub token_expires_in: Option<Duration>,
    /// How long ago the cached token was requested (`None`: no token).
    pub token_age: Option<Duration>,
    /// Generation of the cached token (1 for the first token; 0 when there is none).
    pub generation: u64,
    /// Token requests sent since the cache was created.
    pub token_requests: u64,
    /// Token requests that failed in a row (0 after a success).
    pub consecutive_failures: u32,
    /// The error of the most recent failed token request, cleared by a success.
    pub last_error: Option<Error>,
    /// Whether a token request is in flight now.
    pub refresh_in_flight: bool,
    /// The scope of the cached token (RFC 6749 §3.3, space-delimited): the `scope` of its token
    /// response, or the requested scope when the response had none (RFC 6749 §5.1: then it is
    /// the one requested). `None`: no token, or neither was given. The server may grant less
    /// than requested; the crate then logs a WARN once per token naming the missing scopes.
    pub granted_scope: Option<String>,
}

/// What a request gets from the cache on its slow path.
pub(crate) enum Lookup {
    /// A valid token: use it now.
    Ready(LocalToken),
    /// Wait for the one in-flight refresh.
    Wait(RefreshWait),
}

impl TokenCache {
    pub(crate) fn new(fetcher: TokenFetcher, min_token_age_for_401_retry: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                published: Published::new(),
                refresh_ahead_claimed: AtomicU64::new(NO_TOKEN),
                state: Mutex::new(State {
                    current: None,
                    in_flight: None,
                    last_generation: NO_TOKEN,
                    last_error: None,
                    retry_not_before: None,
                    last_flight_id: 0,
                }),
                fetcher,
                min_token_age_for_401_retry,
                token_requests: AtomicU64::new(0),
                unauthorized_retries: AtomicU64::new(0),
                consecutive_failures: AtomicU32::new(0),
            }),
        }
    }

    /// The generation of the usable cached token, 0 when there is none. One atomic load.
    #[inline]
    pub fn current_generation(&self) -> u64 {
        self.shared.published.generation()
    }

    /// The published current token: lock-free, for a service that holds no copy of it yet.
    #[inline]
    pub(crate) fn published_token(&self) -> arc_swap::Guard<Option<Arc<LocalToken>>> {
        self.shared.published.load()
    }

    /// Makes `state.current` the token every request sees. Every change of the current token
    /// (installed by a refresh, dropped after a 401 or by [`TokenCache::invalidate`]) goes
    /// through here, with the state lock held.
    fn publish(&self, state: &State) {
        self.shared
            .published
            .store(state.current.as_ref().map(|token| &token.local));
    }

    /// Holds the cache's lock until the returned guard is dropped, so tests can show that the
    /// warm path never takes it. Test support, not part of the API (always compiled: the
    /// crate's tests build without the `test-util` feature, see tests/common/mod.rs).
    #[doc(hidden)]
    pub fn hold_lock_for_test(&self) -> impl Drop + '_ {
        self.lock()
    }

    /// The origins this cache's token may be sent to (RFC 6750 §5.3).
    #[inline]
    pub(crate) fn allowed_origins(&self) -> &crate::origin::AllowedOrigins {
        self.shared.fetcher.allowed_origins()
    }

    /// Token requests sent so far by this cache (each one counted when it is sent).
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::Relaxed)
    }

    /// Requests that [`crate::RetryOnUnauthorized`] sent again after a 401.
    pub fn unauthorized_retries(&self) -> u64 {
        self.shared.unauthorized_retries.load(Ordering::Relaxed)
    }

    pub(crate) fn record_unauthorized_retry(&self) {
        self.shared
            .unauthorized_retries
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Handles a 401 about the token of `generation`, received at `now`:
    /// - the cached token, at least the configured minimum age
    ///   (default [`MIN_TOKEN_AGE_FOR_401_RETRY`]) old: invalidated, and the
    ///   request may be replayed;
    /// - an older generation (a newer token is cached, or a refresh is under way): nothing to
    ///   invalidate, and the request may be replayed with the newer token;
    /// - the cached token, younger than that: left in place and not replayed. A server that
    ///   rejects fresh tokens would reject the next one too; without this guard every request
    ///   would cost a token request.
    pub(crate) fn reject(&self, generation: u64, now: Instant) -> Rejection {
        let mut state = self.lock();
        match &state.current {
            Some(current) if current.local.generation == generation => {
                let age = now.saturating_duration_since(current.requested_at);
                if age < self.shared.min_token_age_for_401_retry {
                    tracing::debug!(
                        generation,
                        "401 for a token issued moments ago: not retried"
                    );
                    return Rejection::TooFresh;
                }
                self.drop_current(&mut state, generation);
                Rejection::Invalidated
            }
            _ => Rejection::AlreadyReplaced,
        }
    }

    /// Forgets the token of `generation` if it is still the cached one, so the next request
    /// fetches a new token. A late call for an older generation does nothing, so a burst of
    /// 401s for one token causes one refresh. Returns whether the token was dropped.
    pub fn invalidate(&self, generation: u64) -> bool {
        let mut state = self.lock();
        match &state.current {
            Some(current) if current.local.generation == generation => {
                self.drop_current(&mut state, generation);
                true
            }
            _ => false,
        }
    }

    /// The cached access token while it is usable (before its refresh margin), for callers
    /// that must hand a token to something outside tower (a WebSocket handshake, say). Does not
    /// fetch. Never log it.
    pub fn access_token(&self) -> Option<AccessToken> {
        let now = Instant::now();
        let state = self.lock();
        state
            .current
            .as_ref()
            .filter(|token| now < token.local.refresh_at)
            .map(|token| token.access_token.clone())
    }

    /// A snapshot of the cache for health checks. Takes the cache lock briefly.
    pub fn status(&self) -> TokenCacheStatus {
        let now = Instant::now();
        let state = self.lock();
        let current = state.current.as_ref();
        TokenCacheStatus {
            token_valid_for: current
                .map(|token| token.local.refresh_at.saturating_duration_since(now))
                .filter(|left| !left.is_zero()),
            token_expires_in: current.map(|token| token.expires_at.saturating_duration_since(now)),
            token_age: current.map(|token| now.saturating_duration_since(token.requested_at)),
            generation: current.map_or(NO_TOKEN, |token| token.local.generation),
            token_requests: self.token_requests(),
            consecutive_failures: self.shared.consecutive_failures.load(Ordering::Relaxed),
            last_error: state.last_error.clone(),
            refresh_in_flight: state
                .in_flight
                .as_ref()
                .is_some_and(refresh::InFlight::is_live),
            granted_scope: current
                .and_then(|token| token.granted_scope.as_deref().map(str::to_owned)),
        }
    }

    /// The slow path: a copy of the cached token if it is valid at `now`, else a wait on the
    /// one refresh (started here if none is in flight and no failure pause is running).
    ///
    /// During a failure pause: a token that has not yet reached `expires_at` is still served;
    /// without one, the last error comes back at once instead of a new token request.
    pub(crate) fn lookup(&self, now: Instant) -> Result<Lookup, Error> {
        let mut state = self.lock();
        if let Some(current) = &state.current {
            if now < current.local.refresh_at {
                let local = current.local.clone();
                if now >= local.refresh_ahead_at {
                    drop(state);
                    self.start_refresh_ahead(local.generation);
                }
                return Ok(Lookup::Ready(local));
            }
        }
        let paused = state.retry_not_before.is_some_and(|until| now < until);
        let in_flight = state
            .in_flight
            .as_ref()
            .is_some_and(refresh::InFlight::is_live);
        if paused && !in_flight {
            if let Some(current) = state
                .current
                .as_ref()
                .filter(|token| now < token.expires_at)
            {
                return Ok(Lookup::Ready(current.local.clone()));
            }
            return Err(state
                .last_error
                .clone()
                .unwrap_or_else(|| Error::new(crate::error::ErrorKind::RefreshAborted)));
        }
        let reason = if state.current.is_some() {
            RefreshReason::Expired
        } else if state.last_generation == NO_TOKEN {
            RefreshReason::Initial
        } else {
            RefreshReason::AfterUnauthorized
        };
        refresh::join_or_start(self, &mut state, reason).map(Lookup::Wait)
    }

    /// The current token if it has not reached `expires_at` (used when a refresh inside the
    /// margin fails: a still-valid token keeps being served).
    pub(crate) fn still_valid_token(&self, now: Instant) -> Option<LocalToken> {
        let state = self.lock();
        state
            .current
            .as_ref()
            .filter(|token| now < token.expires_at)
            .map(|token| token.local.clone())
    }

    /// Starts a background refresh for the token of `generation` unless one was already
    /// claimed for it (or a newer one). Never waits; lock-free after the first call per token.
    pub(crate) fn start_refresh_ahead(&self, generation: u64) {
        let claimed = self
            .shared
            .refresh_ahead_claimed
            .fetch_max(generation, Ordering::AcqRel);
        if claimed >= generation {
            return;
        }
        let now = Instant::now();
        let mut state = self.lock();
        let still_current = state
            .current
            .as_ref()
            .is_some_and(|token| token.local.generation == generation);
        let paused = state.retry_not_before.is_some_and(|until| now < until);
        if still_current && !paused {
            // An error here (no runtime) is recorded in the status; the token stays usable.
            if let Err(error) =
                refresh::join_or_start(self, &mut state, RefreshReason::RefreshAhead)
            {
                state.last_error = Some(error);
            }
        }
    }

    /// Drops the cached token (of `generation`) so every service's next request misses.
    fn drop_current(&self, state: &mut State, generation: u64) {
        state.current = None;
        self.publish(state);
        tracing::debug!(generation, "access token invalidated after a 401");
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, but never let a poisoned lock panic a caller.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("generation", &self.current_generation())
            .field("token_requests", &self.token_requests())
            .field("fetcher", &self.shared.fetcher)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientCredentials, OAuth2Config};

    #[tokio::test]
    async fn nothing_outlives_the_last_clone_once_a_refresh_has_ended() {
        // An endpoint that refuses connections: the refresh ends quickly, with an error.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let config = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .token_endpoint(format!("http://127.0.0.1:{port}/token"))
            .allow_insecure_http(true)
            .build()
            .unwrap();
        let cache = TokenCache::new(
            TokenFetcher::with_default_transport(&config).unwrap(),
            MIN_TOKEN_AGE_FOR_401_RETRY,
        );
        let weak = Arc::downgrade(&cache.shared);
        match cache.lookup(Instant::now()) {
            Ok(Lookup::Wait(wait)) => assert!(wait.await.is_err()),
            _ => panic!("a cold cache waits for its first token"),
        }
        drop(cache);
        tokio::task::yield_now().await;
        assert!(
            weak.upgrade().is_none(),
            "no task or timer keeps the cache alive"
        );
    }
}
