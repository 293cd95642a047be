//! [`TokenCache`]: the one cached access token of a layer and everything that keeps it fresh.
//!
//! - **Read path** ([`snapshot`]): a valid token is used with one atomic load (generation and
//!   phase; the service's own copy) or one more lock-free `ArcSwap` load (a service that holds
//!   no copy yet), and no clock read: per-generation phase timers (Tokio's, backed by the
//!   process's timer thread, [`timer_thread`]) mark the refresh-ahead and refresh points. No
//!   lock, no allocation. Every
//!   change of the current token goes through one place, `TokenCache::set_current`, which
//!   publishes it (`TokenCache::publish`).
//! - **Single flight** ([`refresh`]): a small state machine (`Idle`, `InFlight`, `BackingOff`,
//!   `Paused`) with named transitions; at most one token request is in flight per cache, and
//!   only the current flight writes its outcome. It runs in a spawned task, so dropping any
//!   caller (the one that started it included) neither cancels nor stalls it; its outcome,
//!   success or shared [`Error`], reaches every waiter.
//! - **Generations**: every token gets a number, and numbers only grow; a 401 invalidates only
//!   the generation it was answered for ([`TokenCache::invalidate`]); 401 storms are bounded by
//!   backoff on consecutive rejected generations.
//! - **Refresh-ahead**: after about 75 % of the lifetime the first request to notice starts a
//!   background refresh while everyone keeps using the current token; after a failure the next
//!   request past the backoff tries again; callers wait only inside the refresh margin or with
//!   no token at all.

mod backoff;
mod refresh;
mod registry;
mod snapshot;
mod timer_thread;
mod timing;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::error::Error;
use crate::secret::AccessToken;
use crate::token::TokenFetcher;

pub(crate) use backoff::is_transient;
use backoff::rejected_generation_backoff;
pub use backoff::{
    MAX_FAILURE_BACKOFF, MAX_RETRY_AFTER, MIN_FAILURE_BACKOFF, PERMANENT_FAILURE_PAUSE,
    REJECTED_GENERATION_BACKOFF, REJECTED_GENERATION_WINDOW,
};
pub use refresh::RefreshReason;
pub(crate) use refresh::RefreshWait;
pub(crate) use registry::CacheId;
pub(crate) use timing::saturating_add;
pub use timing::{REFRESH_AHEAD_JITTER_PERCENT, REFRESH_AHEAD_PERCENT};

/// What [`TokenCache::reject`] did with a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// The rejected token was the cached one and is gone; replay.
    Invalidated,
    /// A newer token is cached or on its way; replay.
    AlreadyReplaced,
    /// Consecutive generations were rejected shortly after issue: the token stays until the
    /// rejection backoff ([`REJECTED_GENERATION_BACKOFF`]) ends; the 401 is returned as it is.
    Held,
}

impl Rejection {
    pub(crate) fn allows_replay(self) -> bool {
        !matches!(self, Rejection::Held)
    }
}

pub(crate) use snapshot::{generation_of, phase_of, FRESH, STALE};
use snapshot::{Published, AHEAD, CLOCK, NO_TOKEN};

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

impl LocalToken {
    pub(crate) fn new(
        generation: u64,
        authorization: HeaderValue,
        refresh_at: Instant,
        refresh_ahead_at: Instant,
    ) -> Self {
        Self {
            generation,
            authorization,
            refresh_at,
            refresh_ahead_at,
        }
    }

    /// Whether the warm path may use this token, the published one, in `phase` (of the word it
    /// was checked against, never stale): no clock read but in the "read the clock" phase
    /// (no timer thread, or the timers' runtime shut down). Starts the background refresh
    /// when it is due.
    #[inline]
    pub(crate) fn usable(&self, phase: u64, cache: &TokenCache) -> bool {
        let ahead = if phase == CLOCK {
            let now = Instant::now();
            if now >= self.refresh_at {
                return false;
            }
            now >= self.refresh_ahead_at
        } else {
            phase == AHEAD
        };
        if ahead {
            cache.start_refresh_ahead(self.generation);
        }
        true
    }
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

/// Everything that changes when a token is installed, rejected or refreshed. Guarded by the
/// cache's one mutex; the refresh part is the state machine of [`refresh::Refresh`].
pub(crate) struct State {
    current: Option<CachedToken>,
    refresh: refresh::Refresh,
    /// The generation of the newest token ever installed: only grows.
    last_generation: u64,
    /// The error of the most recent failed flight, cleared by a success.
    last_error: Option<Error>,
    /// Flights that ended without a token in a row (0 after a success).
    consecutive_failures: u32,
    /// Identifies flights, so that only the current one writes its outcome.
    last_flight_id: u64,
    /// Consecutive rejected generations and the hold they caused ([`TokenCache::reject`]).
    rejections: Rejections,
    /// The cached token was dropped by [`TokenCache::invalidate`] (logged as the reason of the
    /// next token request); cleared by a success.
    invalidated_by_user: bool,
}

/// The 401 history that bounds a storm: which generation was rejected last, how many
/// consecutive generations were rejected shortly after issue, and until when the current
/// token is held (its 401s returned as they are) instead of being replaced.
#[derive(Default)]
struct Rejections {
    /// `(generation, streak)` of the last rejected generation.
    last: Option<(u64, u32)>,
    /// `(generation, until)`: no 401-driven refresh of this generation before `until`.
    hold: Option<(u64, Instant)>,
}

struct Shared {
    /// This cache's name in the registry, for response futures and bodies ([`CacheId`]).
    id: CacheId,
    /// `state.current` as the warm path reads it, lock-free. Written only by
    /// [`TokenCache::publish`], under the `state` lock.
    published: Published,
    /// The highest generation whose refresh-ahead was claimed by a request.
    refresh_ahead_claimed: AtomicU64,
    /// After a failed flight while a token is cached: nanoseconds after `epoch` from which the
    /// refresh-ahead of the current generation may be claimed again ([`NEVER`]: not armed).
    refresh_ahead_retry_at: AtomicU64,
    /// The origin of `refresh_ahead_retry_at`.
    epoch: Instant,
    state: Mutex<State>,
    fetcher: TokenFetcher,
    /// The token store shared with other caches, consulted only inside a refresh flight.
    fleet: Option<crate::store::Fleet>,
    token_requests: AtomicU64,
    unauthorized_retries: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        registry::deregister(self.id);
    }
}

/// `refresh_ahead_retry_at` when no retry is armed.
const NEVER: u64 = u64::MAX;

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
    /// Refreshes that ended without a token in a row (0 after a success): failed token
    /// requests, timeouts, and refreshes whose task or runtime went away.
    pub consecutive_failures: u32,
    /// The error of the most recent refresh that ended without a token, cleared by a success.
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
    pub(crate) fn new(fetcher: TokenFetcher) -> Self {
        Self::with_fleet(fetcher, None)
    }

    /// A cache whose refreshes go through a token store ([`crate::store`]).
    pub(crate) fn with_fleet(fetcher: TokenFetcher, fleet: Option<crate::store::Fleet>) -> Self {
        let shared = Arc::new(Shared {
            id: CacheId::next(),
            published: Published::new(),
            refresh_ahead_claimed: AtomicU64::new(NO_TOKEN),
            refresh_ahead_retry_at: AtomicU64::new(NEVER),
            epoch: Instant::now(),
            state: Mutex::new(State {
                current: None,
                refresh: refresh::Refresh::Idle,
                last_generation: NO_TOKEN,
                last_error: None,
                consecutive_failures: 0,
                last_flight_id: 0,
                rejections: Rejections::default(),
                invalidated_by_user: false,
            }),
            fetcher,
            fleet,
            token_requests: AtomicU64::new(0),
            unauthorized_retries: AtomicU64::new(0),
        });
        registry::register(&shared);
        if let Some(fleet) = &shared.fleet {
            // Weak: the store's subscription never keeps the cache alive.
            let weak = Arc::downgrade(&shared);
            fleet.on_removed_elsewhere(Box::new(move |still_rejected| {
                if let Some(shared) = weak.upgrade() {
                    TokenCache { shared }.drop_rejected_elsewhere(still_rejected);
                }
            }));
        }
        Self { shared }
    }

    /// Drops the cached token because another process of the fleet had it rejected (a 401
    /// announced through the token store), if `still_rejected()`, asked under the cache's lock,
    /// says the cached token is still the rejected one. The next request then refreshes (from
    /// the store or the token endpoint) instead of spending a 401. Returns whether it dropped.
    fn drop_rejected_elsewhere(&self, still_rejected: &dyn Fn() -> bool) -> bool {
        let mut state = self.lock();
        let Some(generation) = state.current.as_ref().map(|token| token.local.generation) else {
            return false;
        };
        if !still_rejected() {
            return false;
        }
        self.set_current(&mut state, None);
        tracing::debug!(
            generation,
            "access token dropped: another process of the fleet had it rejected"
        );
        true
    }

    /// This cache's id: what a response future or body keeps (a copy, no reference count) to
    /// find the cache when a token rejection arrives.
    #[inline]
    pub(crate) fn id(&self) -> CacheId {
        self.shared.id
    }

    /// The generation of the usable cached token, 0 when there is none. One atomic load.
    #[inline]
    pub fn current_generation(&self) -> u64 {
        self.shared.published.generation()
    }

    /// The published generation and phase, packed ([`generation_of`], [`phase_of`]): one
    /// atomic load of a line that only a publish and the phase timer write.
    #[inline]
    pub(crate) fn published_word(&self) -> u64 {
        self.shared.published.word()
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

    /// The token fetcher, for a new cache with the same configuration.
    pub(crate) fn fetcher(&self) -> &TokenFetcher {
        &self.shared.fetcher
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
        crate::telemetry::unauthorized_replay(self.shared.fetcher.labels());
    }

    /// Handles a 401 about the token of `generation`, received at `now`:
    /// - an older generation (a newer token is cached, or a refresh is under way): nothing to
    ///   invalidate; the request may be replayed with the newer token;
    /// - the cached token, while it is held after consecutive rejected generations: left in
    ///   place, and the 401 is returned as it is ([`Rejection::Held`]);
    /// - the cached token otherwise: invalidated, and the request may be replayed. One
    ///   rejection always may. If the previous generation was rejected too and this one was
    ///   rejected within [`REJECTED_GENERATION_WINDOW`] of its request, the token is held
    ///   instead for [`REJECTED_GENERATION_BACKOFF`], doubled per further rejected generation
    ///   up to [`MAX_FAILURE_BACKOFF`]: a server that rejects every token costs at most one
    ///   token request per backoff step, however many requests see 401s.
    pub(crate) fn reject(&self, generation: u64, now: Instant) -> Rejection {
        let mut state = self.lock();
        let Some(current) = state
            .current
            .as_ref()
            .filter(|current| current.local.generation == generation)
        else {
            return Rejection::AlreadyReplaced;
        };
        let age = now.saturating_duration_since(current.requested_at);
        let rejections = &mut state.rejections;
        if let Some((held, until)) = rejections.hold {
            if held == generation {
                if now < until {
                    return Rejection::Held;
                }
                // The hold is over: this 401 may cause the one token request of this step.
                rejections.hold = None;
                self.set_current(&mut state, None);
                tracing::debug!(generation, "access token invalidated after a 401");
                return Rejection::Invalidated;
            }
        }
        let streak = match rejections.last {
            Some((last, streak))
                if last.checked_add(1) == Some(generation) && age < REJECTED_GENERATION_WINDOW =>
            {
                streak.saturating_add(1)
            }
            _ => 1,
        };
        rejections.last = Some((generation, streak));
        if let Some(backoff) = rejected_generation_backoff(streak) {
            rejections.hold = Some((generation, timing::saturating_add(now, backoff)));
            tracing::debug!(
                generation,
                rejected_in_a_row = streak,
                retry_in_ms = backoff.as_millis() as u64,
                "401 for consecutive fresh tokens: returned as it is until the backoff ends"
            );
            return Rejection::Held;
        }
        self.set_current(&mut state, None);
        tracing::debug!(generation, "access token invalidated after a 401");
        Rejection::Invalidated
    }

    /// Forgets the token of `generation` if it is still the cached one, so the next request
    /// fetches a new token. A late call for an older generation does nothing, so a burst of
    /// 401s for one token causes one refresh. Returns whether the token was dropped.
    pub fn invalidate(&self, generation: u64) -> bool {
        let mut state = self.lock();
        match &state.current {
            Some(current) if current.local.generation == generation => {
                self.set_current(&mut state, None);
                state.invalidated_by_user = true;
                tracing::debug!(generation, "access token invalidated by the user");
                true
            }
            _ => false,
        }
    }

    /// A valid access token, for clients that are not a tower stack (reqwest, a WebSocket
    /// handshake, a CLI printing a token for curl): the cached one, or the result of the one
    /// shared token request, through the same single flight, caching, refresh-ahead and
    /// failure backoff as [`crate::OAuth2Service`] (1,000 concurrent calls on a cold cache make
    /// one token request). Takes the cache lock briefly. Never log the token.
    ///
    /// When the API rejects it, report exactly that token with
    /// [`reject_token`](Self::reject_token), never "whatever is current".
    ///
    /// # Errors
    /// The token request's [`Error`] (shared by every waiter), the last error during a failure
    /// backoff, [`crate::ErrorKind::NoRuntime`] outside a Tokio runtime.
    pub async fn token(&self) -> Result<AccessToken, Error> {
        // A token invalidated between the wait and the read is fetched again, a bounded number
        // of times (each round is a real token request, so this never spins).
        for _ in 0..3 {
            let local = match self.lookup(Instant::now())? {
                Lookup::Ready(local) => local,
                Lookup::Wait(wait) => wait.await?,
            };
            if let Some(token) = self.access_token_of(local.generation) {
                return Ok(token);
            }
        }
        Err(Error::new(crate::error::ErrorKind::RefreshAborted))
    }

    /// Reports that the API rejected `token` (one handed out by [`token`](Self::token)): if it
    /// is still the cached token it is dropped, so the next call fetches a new one; a token
    /// already replaced is ignored, so a burst of rejections of one token causes one refresh.
    /// Returns whether the token was dropped. (With a response from [`crate::OAuth2Service`],
    /// use [`invalidate`](Self::invalidate) with its
    /// [`ResponseBody::token_generation`](crate::ResponseBody::token_generation).)
    ///
    /// Rejections are bounded like 401s: while consecutive generations are rejected shortly
    /// after issue, the token is kept until the [`REJECTED_GENERATION_BACKOFF`] step ends
    /// (then this returns `false`).
    pub fn reject_token(&self, token: &AccessToken) -> bool {
        let generation = {
            let state = self.lock();
            match &state.current {
                Some(current) if current.access_token == *token => current.local.generation,
                _ => return false,
            }
        };
        self.reject(generation, Instant::now()) == Rejection::Invalidated
    }

    /// The access token of `generation`, if it is still the cached one.
    fn access_token_of(&self, generation: u64) -> Option<AccessToken> {
        let state = self.lock();
        state
            .current
            .as_ref()
            .filter(|token| token.local.generation == generation)
            .map(|token| token.access_token.clone())
    }

    /// The cached access token while it is usable (before its refresh margin), for callers
    /// that must hand a token to something outside tower (a WebSocket handshake, say). Does not
    /// fetch. Never log it.
    pub fn access_token(&self) -> Option<AccessToken> {
        let now = Instant::now();
        let state = self.lock();
        usable(&state, now).and(
            state
                .current
                .as_ref()
                .map(|token| token.access_token.clone()),
        )
    }

    /// A snapshot of the cache for health checks. Takes the cache lock briefly.
    pub fn status(&self) -> TokenCacheStatus {
        let now = Instant::now();
        let state = self.lock();
        let current = state.current.as_ref();
        crate::telemetry::remaining_lifetime(
            self.shared.fetcher.labels(),
            current.map(|token| token.expires_at.saturating_duration_since(now)),
        );
        TokenCacheStatus {
            token_valid_for: current
                .map(|token| token.local.refresh_at.saturating_duration_since(now))
                .filter(|left| !left.is_zero()),
            token_expires_in: current.map(|token| token.expires_at.saturating_duration_since(now)),
            token_age: current.map(|token| now.saturating_duration_since(token.requested_at)),
            generation: current.map_or(NO_TOKEN, |token| token.local.generation),
            token_requests: self.token_requests(),
            consecutive_failures: state.consecutive_failures,
            last_error: state.last_error.clone(),
            refresh_in_flight: state.refresh.live_flight().is_some(),
            granted_scope: current
                .and_then(|token| token.granted_scope.as_deref().map(str::to_owned)),
        }
    }

    /// The slow path: a copy of the cached token if it is valid at `now`, else a wait on the
    /// one refresh (joined, or started here unless a backoff or pause holds it back).
    ///
    /// During a backoff or pause: a token that has not yet reached `expires_at` is still
    /// served; without one, the last error comes back at once instead of a new token request,
    /// except after a refresh that ended without an outcome (its runtime went away): then the
    /// caller waits out the backoff and starts the next refresh itself.
    pub(crate) fn lookup(&self, now: Instant) -> Result<Lookup, Error> {
        let mut state = self.lock();
        if let Some(local) = usable(&state, now) {
            if now >= local.refresh_ahead_at {
                drop(state);
                self.start_refresh_ahead(local.generation);
            }
            return Ok(Lookup::Ready(local));
        }
        refresh::lookup_slow(self, &mut state, now)
    }

    /// The current token if it has not reached `expires_at` (used when a refresh inside the
    /// margin fails: a still-valid token keeps being served).
    pub(crate) fn still_valid_token(&self, now: Instant) -> Option<LocalToken> {
        still_valid(&self.lock(), now)
    }

    /// Starts a background refresh for the token of `generation` unless one was already
    /// claimed for it (or a newer one). After a failed refresh the claim comes back once the
    /// backoff is over, so the next request after it tries again while the token is still
    /// valid. Never waits; lock-free unless it starts a refresh.
    pub(crate) fn start_refresh_ahead(&self, generation: u64) {
        let shared = &self.shared;
        if shared.refresh_ahead_claimed.load(Ordering::Acquire) >= generation {
            // Claimed already: only a failed attempt's backoff running out re-arms it.
            let retry_at = shared.refresh_ahead_retry_at.load(Ordering::Acquire);
            if retry_at == NEVER || self.nanos_since_epoch(Instant::now()) < retry_at {
                return;
            }
            if shared
                .refresh_ahead_retry_at
                .compare_exchange(retry_at, NEVER, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                return;
            }
        } else if shared
            .refresh_ahead_claimed
            .fetch_max(generation, Ordering::AcqRel)
            >= generation
        {
            return;
        }
        let now = Instant::now();
        let mut state = self.lock();
        let still_current = state
            .current
            .as_ref()
            .is_some_and(|token| token.local.generation == generation);
        if still_current {
            // An error here (no runtime, no timer) is recorded in the status; the token stays
            // usable.
            if let Err(error) = refresh::start_in_background(self, &mut state, now) {
                state.last_error = Some(error);
            }
        }
    }

    /// Arms the next refresh-ahead attempt for `until` (a failed flight's backoff end).
    fn rearm_refresh_ahead(&self, until: Instant) {
        // `NEVER - 1` keeps an armed value distinct from NEVER; `nanos_since_epoch` never
        // reaches it (584 years), so `NEVER / 1` here is an equivalent mutant.
        let at = self.nanos_since_epoch(until).min(NEVER - 1);
        self.shared
            .refresh_ahead_retry_at
            .store(at, Ordering::Release);
    }

    /// Nanoseconds from the cache's creation to `at`, rounded up (so that `now`'s value at
    /// least `at`'s means `now >= at`).
    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.shared.epoch).as_nanos();
        // Only a moment 584 years after the cache's creation overflows: `NEVER / 1` in the
        // fallback is an equivalent mutant.
        u64::try_from(nanos).unwrap_or(NEVER - 1)
    }

    /// The one place where the current token changes: installed after a successful flight,
    /// dropped after a rejection or an invalidation. Publishes it for the lock-free read path.
    fn set_current(&self, state: &mut State, token: Option<CachedToken>) {
        state.current = token;
        self.publish(state);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, but never let a poisoned lock panic a caller.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The current token of `state` if it is usable at `now`: before its refresh point, from
/// which callers wait for a new one. The one place that decides it for the cache's lock side.
fn usable(state: &State, now: Instant) -> Option<LocalToken> {
    state
        .current
        .as_ref()
        .filter(|token| now < token.local.refresh_at)
        .map(|token| token.local.clone())
}

/// The current token of `state` if it has not reached `expires_at` at `now`.
fn still_valid(state: &State, now: Instant) -> Option<LocalToken> {
    state
        .current
        .as_ref()
        .filter(|token| now < token.expires_at)
        .map(|token| token.local.clone())
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
        let cache = TokenCache::new(TokenFetcher::with_default_transport(&config).unwrap());
        let weak = Arc::downgrade(&cache.shared);
        let id = cache.id();
        assert!(
            id.cache()
                .is_some_and(|found| Arc::ptr_eq(&found.shared, &cache.shared)),
            "a live cache is found by its id"
        );
        assert_ne!(
            id,
            TokenCache::new(cache.fetcher().clone()).id(),
            "ids are unique"
        );
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
        assert!(id.cache().is_none(), "a dropped cache is not found");
        assert!(
            !registry::is_registered(id),
            "a dropped cache leaves the registry (no entry per cache ever made)"
        );
    }

    #[tokio::test]
    async fn only_the_read_the_clock_phase_reads_the_clock() {
        let config = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .build()
            .unwrap();
        let cache = TokenCache::new(TokenFetcher::with_default_transport(&config).unwrap());
        let now = Instant::now();
        let mut token = LocalToken::new(
            1,
            HeaderValue::from_static("Bearer x"),
            now + Duration::from_secs(3600),
            now + Duration::from_secs(3000),
        );
        // Past its points on Tokio's clock, but no timer said so: the phase decides.
        token.refresh_at = now;
        token.refresh_ahead_at = now;
        assert!(token.usable(snapshot::FRESH, &cache));
        assert!(token.usable(AHEAD, &cache));
        // With the timers gone, Tokio's clock decides.
        assert!(!token.usable(CLOCK, &cache));
        token.refresh_at = now + Duration::from_secs(3600);
        assert!(token.usable(CLOCK, &cache));
    }

    /// A cache whose token endpoint is an in-process transport: the first request gets a token
    /// of `lifetime_secs`, every later one a 503 with `Retry-After: 60`. Returns the cache and
    /// the number of token requests sent.
    fn cache_over_script(lifetime_secs: u64) -> (TokenCache, Arc<AtomicU64>) {
        use bytes::Bytes;
        use http_body_util::Full;
        let sent = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&sent);
        let transport = tower::service_fn(move |_request| {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                let response = if first {
                    let body = format!(
                        r#"{{"access_token":"t","token_type":"Bearer","expires_in":{lifetime_secs}}}"#
                    );
                    http::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                } else {
                    http::Response::builder()
                        .status(503)
                        .header("retry-after", "60")
                        .body(Full::new(Bytes::new()))
                };
                Ok::<_, std::convert::Infallible>(response.unwrap())
            }
        });
        let config = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .token_endpoint("https://auth.example/token")
            .build()
            .unwrap();
        let fetcher = TokenFetcher::with_transport(&config, transport).unwrap();
        (TokenCache::new(fetcher), sent)
    }

    async fn first_token(cache: &TokenCache) -> LocalToken {
        match cache.lookup(Instant::now()) {
            Ok(Lookup::Wait(wait)) => wait.await.unwrap(),
            _ => panic!("a cold cache waits for its first token"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lookup_serves_the_token_until_its_refresh_point_and_claims_refresh_ahead_from_its_point(
    ) {
        let (cache, sent) = cache_over_script(1000);
        let token = first_token(&cache).await;
        let nanosecond = Duration::from_nanos(1);
        assert!(matches!(
            cache.lookup(token.refresh_ahead_at - nanosecond),
            Ok(Lookup::Ready(_))
        ));
        assert!(
            !cache.status().refresh_in_flight,
            "no refresh-ahead before its point"
        );
        assert!(matches!(
            cache.lookup(token.refresh_at - nanosecond),
            Ok(Lookup::Ready(_))
        ));
        assert!(
            cache.status().refresh_in_flight,
            "refresh-ahead claimed past its point"
        );
        tokio::task::yield_now().await;
        assert_eq!(sent.load(Ordering::SeqCst), 2);
        // The claim is one per token: no second background refresh on the next lookups.
        assert!(matches!(
            cache.lookup(token.refresh_at - nanosecond),
            Ok(Lookup::Ready(_))
        ));
        assert!(!cache.status().refresh_in_flight);
        // At the refresh point (the backoff long over): callers wait for a new token.
        assert!(matches!(
            cache.lookup(token.refresh_at),
            Ok(Lookup::Wait(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_ahead_is_retried_exactly_at_the_end_of_its_backoff_without_locking_before(
    ) {
        let (cache, sent) = cache_over_script(3600);
        let token = first_token(&cache).await;
        // A refresh-ahead that fails with Retry-After: 60 s, from this very instant.
        cache.start_refresh_ahead(token.generation);
        tokio::task::yield_now().await;
        assert_eq!(cache.status().consecutive_failures, 1);
        assert_eq!(sent.load(Ordering::SeqCst), 2);

        // During the backoff, the request that notices the token's refresh-ahead point takes no
        // lock: with the lock held elsewhere it still returns at once.
        let held = cache.lock();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                cache.start_refresh_ahead(token.generation);
                let _ = done.send(());
            });
            let returned = finished.recv_timeout(Duration::from_secs(5)).is_ok();
            drop(held);
            assert!(
                returned,
                "start_refresh_ahead took the cache lock during the backoff"
            );
        });

        tokio::time::advance(Duration::from_secs(60) - Duration::from_nanos(1)).await;
        cache.start_refresh_ahead(token.generation);
        tokio::task::yield_now().await;
        assert_eq!(
            sent.load(Ordering::SeqCst),
            2,
            "not before the backoff ends"
        );
        tokio::time::advance(Duration::from_nanos(1)).await;
        cache.start_refresh_ahead(token.generation);
        tokio::task::yield_now().await;
        assert_eq!(
            sent.load(Ordering::SeqCst),
            3,
            "retried at the end of the backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_announced_by_the_fleet_drops_the_token_only_if_it_is_still_the_rejected_one(
    ) {
        let (cache, _) = cache_over_script(3600);
        let asked = std::cell::Cell::new(0);
        let asked = &asked;
        let ask = |answer: bool| {
            move || {
                asked.set(asked.get() + 1);
                answer
            }
        };
        assert!(
            !cache.drop_rejected_elsewhere(&ask(true)),
            "a cold cache has nothing to drop and is not asked"
        );
        assert_eq!(asked.get(), 0);
        let token = first_token(&cache).await;
        assert!(
            !cache.drop_rejected_elsewhere(&ask(false)),
            "a token the announcement is not about stays"
        );
        assert_eq!(cache.current_generation(), token.generation);
        assert!(cache.drop_rejected_elsewhere(&ask(true)));
        assert_eq!(cache.current_generation(), 0, "the rejected token is gone");
        assert_eq!(asked.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn debug_shows_the_generation_and_the_token_request_count() {
        let (cache, _) = cache_over_script(3600);
        first_token(&cache).await;
        let debug = format!("{cache:?}");
        assert!(debug.contains("generation: 1"), "{debug}");
        assert!(debug.contains("token_requests: 1"), "{debug}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_outcome_of_the_flight_it_joined_even_when_it_looks_late() {
        let (cache, sent) = cache_over_script(3600);
        let Ok(Lookup::Wait(wait)) = cache.lookup(Instant::now()) else {
            panic!("a cold cache waits for its first token");
        };
        // The flight ends, and its token is invalidated, before the waiter is first polled.
        while cache.current_generation() == NO_TOKEN {
            tokio::task::yield_now().await;
        }
        assert!(cache.invalidate(1));
        let token = wait.await.unwrap();
        assert_eq!(token.generation, 1, "the joined flight's token");
        assert_eq!(sent.load(Ordering::SeqCst), 1, "no second flight");
    }

    /// A cache whose last flight vanished (its runtime shut down) and whose backoff runs until
    /// `backoff` from now.
    fn after_a_vanished_flight(backoff: Duration) -> (TokenCache, Arc<AtomicU64>) {
        let (cache, sent) = cache_over_script(3600);
        {
            let mut state = cache.lock();
            state.refresh = refresh::Refresh::BackingOff {
                until: Instant::now() + backoff,
            };
            state.last_error = Some(Error::new(crate::error::ErrorKind::RefreshAborted));
            state.consecutive_failures = 1;
        }
        (cache, sent)
    }

    async fn wait_from(cache: &TokenCache) -> Result<LocalToken, Error> {
        match cache.lookup(Instant::now()) {
            Ok(Lookup::Wait(wait)) => wait.await,
            Ok(Lookup::Ready(_)) => panic!("no token is cached"),
            Err(error) => Err(error),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_vanished_refresh_callers_wait_out_a_backoff_that_ends_by_their_deadline() {
        // The deadline of a caller with nothing to join: the token request timeout (10 s) plus
        // the 1 s grace.
        for backoff in [Duration::from_secs(10), Duration::from_secs(11)] {
            let (cache, sent) = after_a_vanished_flight(backoff);
            let started = Instant::now();
            let token = wait_from(&cache).await.unwrap();
            assert_eq!(started.elapsed(), backoff);
            assert_eq!((token.generation, sent.load(Ordering::SeqCst)), (1, 1));
        }
        // A backoff past the deadline: the caller is told at once, nothing is sent.
        let (cache, sent) =
            after_a_vanished_flight(Duration::from_secs(11) + Duration::from_nanos(1));
        let started = Instant::now();
        let Err(error) = wait_from(&cache).await else {
            panic!("a token past the deadline");
        };
        assert!(matches!(
            error.kind(),
            crate::error::ErrorKind::RefreshAborted
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(sent.load(Ordering::SeqCst), 0);
    }
}
