//! The refresh state machine of one cache ([`Refresh`]), its named transitions, the flight's
//! task, and the future its waiters poll.
//!
//! ```text
//!           start                        succeed
//!   Idle ─────────────► InFlight{id} ─────────────────────────────► Idle
//!    ▲                     │ fail, timed_out, ended_without_outcome
//!    │ (backoff over)      ▼
//!    └──────────── BackingOff{until} (transient) │ Paused{until} (permanent)
//! ```
//!
//! Rules, each one enforced here:
//! - **One flight.** A token request starts only from `Idle` or from a backoff or pause whose
//!   `until` has passed; while a flight is `InFlight` everyone joins it.
//! - **Only the current flight writes.** `succeed` and `fail` change the token, the generation,
//!   the backoff, `last_error` and the failure count only while the state is still
//!   `InFlight{id}` for that flight's `id`; a late flight's outcome is dropped (`Superseded`).
//! - **Deadlines count from the flight's start.** The token request must finish by
//!   `started + timeout`; its waiters give up at `started + timeout + WAITER_GRACE`, and the
//!   first of them to do so records the flight as failed (`timed_out`): its task can no longer
//!   write anything, and if its runtime runs it later it sends nothing (its deadline passed).
//! - **Every way to end without a token is a failure**, followed by backoff: an error, a
//!   timeout, a task that vanished (panic, runtime shut down: `ended_without_outcome`).
//! - **A vanished flight is replaced, not reported.** Its waiters (on live runtimes) wait out
//!   the backoff and start or join the next flight, within their deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::backoff::{is_transient, pause_after};
use super::timing::{saturating_add, schedule};
use super::{
    still_valid, usable, CachedToken, LocalToken, Lookup, State, TokenCache, NEVER, NO_TOKEN,
};
use crate::error::{Error, ErrorKind};
use crate::token::FetchedToken;

/// Why a token request was sent (reported in `tracing` events and spans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshReason {
    /// No token had been fetched yet.
    Initial,
    /// The cached token reached its refresh margin.
    Expired,
    /// Background refresh before the margin; nobody waits on it.
    RefreshAhead,
    /// The API answered 401 for the cached token.
    AfterUnauthorized,
    /// The application dropped the cached token with [`TokenCache::invalidate`].
    Invalidated,
}

impl RefreshReason {
    /// How logs and metrics name the reason: `initial`, `expired`, `refresh-ahead`,
    /// `rejected` (after a 401), `invalidated by the user`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RefreshReason::Initial => "initial",
            RefreshReason::Expired => "expired",
            RefreshReason::RefreshAhead => "refresh-ahead",
            RefreshReason::AfterUnauthorized => "rejected",
            RefreshReason::Invalidated => "invalidated by the user",
        }
    }
}

/// Where the refresh of one cache stands. Changed only by the transitions of this module,
/// under the cache's lock.
pub(crate) enum Refresh {
    /// No token request in flight, none held back.
    Idle,
    /// One token request in flight; only this flight may write its outcome.
    InFlight(Flight),
    /// After a transient failure (timeout, transport, 5xx, 429, a vanished task): no token
    /// request before `until` (exponential backoff with jitter, or `Retry-After`).
    BackingOff {
        /// End of the backoff.
        until: Instant,
    },
    /// After a permanent failure (rejected client, unusable response): no token request
    /// before `until` ([`super::PERMANENT_FAILURE_PAUSE`]).
    Paused {
        /// End of the pause.
        until: Instant,
    },
}

impl Refresh {
    /// The flight in flight, if its task is still there.
    pub(crate) fn live_flight(&self) -> Option<&Flight> {
        match self {
            Refresh::InFlight(flight) if flight.is_live() => Some(flight),
            _ => None,
        }
    }

    /// Why the flight in flight was started (`Initial` outside a flight: never asked then).
    fn reason(&self) -> RefreshReason {
        match self {
            Refresh::InFlight(flight) => flight.reason,
            _ => RefreshReason::Initial,
        }
    }

    fn is_flight(&self, id: u64) -> bool {
        matches!(self, Refresh::InFlight(flight) if flight.id == id)
    }

    /// The end of a backoff or pause still running at `now`.
    fn held_until(&self, now: Instant) -> Option<Instant> {
        match *self {
            Refresh::BackingOff { until } | Refresh::Paused { until } if now < until => Some(until),
            _ => None,
        }
    }
}

/// The one refresh in flight.
pub(crate) struct Flight {
    id: u64,
    /// When the flight started: its deadlines count from here.
    started: Instant,
    /// Why it was started (logs and metrics).
    reason: RefreshReason,
    outcome: watch::Receiver<Outcome>,
}

impl Flight {
    /// False once the flight's task is gone (finished, panicked, or its runtime shut down).
    /// A finished task has already left `InFlight` before it goes, so a flight still in the
    /// state whose task is gone ended without an outcome.
    fn is_live(&self) -> bool {
        self.outcome.has_changed().is_ok()
    }
}

/// What a flight tells its waiters.
#[derive(Clone)]
enum Outcome {
    Pending,
    /// The flight was current when it ended: its result.
    Settled(Result<LocalToken, Error>),
    /// The flight was no longer current when it ended: nothing was written; look again.
    Superseded,
}

impl Outcome {
    fn is_final(&self) -> bool {
        !matches!(self, Outcome::Pending)
    }
}

/// A waiter's future. Boxed: only the cold path allocates it.
pub(crate) type RefreshWait = Pin<Box<dyn Future<Output = Result<LocalToken, Error>> + Send>>;

/// Extra time a waiter gives a flight beyond the token request timeout before it records the
/// flight as failed on its own (its runtime may be stalled): 1 s.
const WAITER_GRACE: Duration = Duration::from_secs(1);

/// How many flights one waiter follows when the flight it waited on vanished.
const MAX_FLIGHTS_PER_WAITER: usize = 4;

/// A waiter's hold on one flight.
struct Joined {
    id: u64,
    started: Instant,
    /// `started + timeout + WAITER_GRACE`.
    deadline: Instant,
    outcome: watch::Receiver<Outcome>,
}

/// What a caller without a valid token does next.
enum Next {
    Ready(LocalToken),
    Join(Joined),
    /// Wait until `until` (the backoff after a vanished flight), then look again.
    Held {
        until: Instant,
    },
    Failed(Error),
}

/// The slow path of [`TokenCache::lookup`]: no valid token at `now` (lock held).
pub(super) fn lookup_slow(
    cache: &TokenCache,
    state: &mut State,
    now: Instant,
) -> Result<Lookup, Error> {
    match next(cache, state, now) {
        Next::Ready(token) => Ok(Lookup::Ready(token)),
        Next::Failed(error) => Err(error),
        next @ (Next::Join(_) | Next::Held { .. }) => {
            let give_up_at = waiter_deadline(cache, now);
            Ok(Lookup::Wait(wait(cache.clone(), next, give_up_at)))
        }
    }
}

/// Starts a refresh-ahead flight unless one is in flight or a backoff holds it back (lock
/// held). A backoff re-arms the claim for when it ends.
pub(super) fn start_in_background(
    cache: &TokenCache,
    state: &mut State,
    now: Instant,
) -> Result<(), Error> {
    match join_or_start(cache, state, now, RefreshReason::RefreshAhead)? {
        Started::Held { until } => {
            cache.rearm_refresh_ahead(until);
            Ok(())
        }
        Started::Joined(_) => Ok(()),
    }
}

enum Started {
    Joined(Joined),
    Held { until: Instant },
}

/// Joins the live flight; records a flight whose task vanished as failed; starts a new flight
/// unless a backoff or pause holds it back. Lock held.
fn join_or_start(
    cache: &TokenCache,
    state: &mut State,
    now: Instant,
    reason: RefreshReason,
) -> Result<Started, Error> {
    if let Refresh::InFlight(flight) = &state.refresh {
        if flight.is_live() {
            return Ok(Started::Joined(Joined {
                id: flight.id,
                started: flight.started,
                deadline: waiter_deadline(cache, flight.started),
                outcome: flight.outcome.clone(),
            }));
        }
        let (id, started) = (flight.id, flight.started);
        fail(
            cache,
            state,
            id,
            Error::new(ErrorKind::RefreshAborted),
            now,
            started,
        );
    }
    if let Some(until) = state.refresh.held_until(now) {
        return Ok(Started::Held { until });
    }
    start(cache, state, now, reason).map(Started::Joined)
}

/// For a caller without a valid token (lock held): the still-valid token during a backoff,
/// the flight to wait on, the backoff to wait out after a vanished flight, or the error.
fn next(cache: &TokenCache, state: &mut State, now: Instant) -> Next {
    let reason = if state.current.is_some() {
        RefreshReason::Expired
    } else if state.last_generation == NO_TOKEN {
        RefreshReason::Initial
    } else if state.invalidated_by_user {
        RefreshReason::Invalidated
    } else {
        RefreshReason::AfterUnauthorized
    };
    match join_or_start(cache, state, now, reason) {
        Ok(Started::Joined(joined)) => Next::Join(joined),
        Ok(Started::Held { until }) => {
            if let Some(token) = still_valid(state, now) {
                return Next::Ready(token);
            }
            match &state.last_error {
                // The last flight vanished with its runtime: not an answer to give a caller on a
                // live runtime. Wait the backoff out, then start the next flight.
                Some(error) if matches!(error.kind(), ErrorKind::RefreshAborted) => {
                    Next::Held { until }
                }
                Some(error) => Next::Failed(error.clone()),
                None => Next::Failed(Error::new(ErrorKind::RefreshAborted)),
            }
        }
        Err(error) => Next::Failed(error),
    }
}

/// Looks again after the flight a waiter followed ended without an outcome.
fn look_again(cache: &TokenCache, now: Instant) -> Next {
    let mut state = cache.lock();
    match usable(&state, now) {
        Some(token) => Next::Ready(token),
        None => next(cache, &mut state, now),
    }
}

/// Transition `Idle` (or an expired backoff or pause) → `InFlight`: spawns the flight's task
/// on the current runtime.
fn start(
    cache: &TokenCache,
    state: &mut State,
    now: Instant,
    reason: RefreshReason,
) -> Result<Joined, Error> {
    let runtime =
        tokio::runtime::Handle::try_current().map_err(|_| Error::new(ErrorKind::NoRuntime))?;
    check_time_driver()?;
    let (sender, receiver) = watch::channel(Outcome::Pending);
    state.last_flight_id += 1;
    let id = state.last_flight_id;
    state.refresh = Refresh::InFlight(Flight {
        id,
        started: now,
        reason,
        outcome: receiver.clone(),
    });
    let fetch_deadline = saturating_add(now, cache.shared.fetcher.timeout());
    let task_cache = cache.clone();
    let span = crate::telemetry::token_request_span();
    runtime.spawn(
        async move {
            // A flight that was given up before its task ran sends nothing.
            let outcome = if is_current(&task_cache, id) {
                let fetcher = &task_cache.shared.fetcher;
                // A task that starts past its deadline (its runtime was stalled) sends nothing.
                let result = if Instant::now() < fetch_deadline {
                    let shared = &task_cache.shared;
                    let requests = &shared.token_requests;
                    let fleet = shared.fleet.as_ref();
                    crate::store::fetch(fleet, fetcher, requests, fetch_deadline, reason).await
                } else {
                    Err(fetcher.timeout_error())
                };
                complete(&task_cache, id, result, now)
            } else {
                Outcome::Superseded
            };
            // Nobody waiting is fine: the token is cached all the same.
            let _ = sender.send(outcome);
        }
        .instrument(span),
    );
    Ok(Joined {
        id,
        started: now,
        deadline: waiter_deadline(cache, now),
        outcome: receiver,
    })
}

fn is_current(cache: &TokenCache, id: u64) -> bool {
    cache.lock().refresh.is_flight(id)
}

/// Stores the outcome of flight `id`, if it is still the current one.
fn complete(
    cache: &TokenCache,
    id: u64,
    result: Result<FetchedToken, Error>,
    started: Instant,
) -> Outcome {
    let mut state = cache.lock();
    if !state.refresh.is_flight(id) {
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "token request outcome dropped: its refresh was given up"
        );
        return Outcome::Superseded;
    }
    match result {
        Ok(fetched) => Outcome::Settled(Ok(succeed(cache, &mut state, fetched, started))),
        Err(error) => {
            fail(
                cache,
                &mut state,
                id,
                error.clone(),
                Instant::now(),
                started,
            );
            Outcome::Settled(Err(error))
        }
    }
}

/// Transition `InFlight` → `Idle` with a new token (current flight only: checked by the
/// caller). The one place a generation is assigned: generations only grow.
fn succeed(
    cache: &TokenCache,
    state: &mut State,
    fetched: FetchedToken,
    started: Instant,
) -> LocalToken {
    let reason = state.refresh.reason();
    state.refresh = Refresh::Idle;
    state.invalidated_by_user = false;
    state.last_generation += 1;
    let generation = state.last_generation;
    let schedule = schedule(fetched.requested_at, fetched.lifetime);
    let local = LocalToken::new(
        generation,
        fetched.authorization,
        schedule.refresh_at,
        schedule.refresh_ahead_at,
    );
    cache.set_current(
        state,
        Some(CachedToken {
            local: local.clone(),
            access_token: fetched.access_token,
            requested_at: fetched.requested_at,
            expires_at: schedule.expires_at,
            granted_scope: fetched.granted_scope,
        }),
    );
    state.last_error = None;
    state.consecutive_failures = 0;
    cache
        .shared
        .refresh_ahead_retry_at
        .store(NEVER, Ordering::Release);
    crate::telemetry::token_obtained(
        cache.shared.fetcher.labels(),
        &crate::telemetry::Obtained {
            reason,
            generation,
            granted_scope: state
                .current
                .as_ref()
                .and_then(|token| token.granted_scope.as_deref()),
            elapsed: started.elapsed(),
            lifetime: fetched.lifetime,
            from_store: fetched.from_store,
        },
    );
    local
}

/// Transition `InFlight{id}` → `BackingOff` (transient error) or `Paused` (permanent), if
/// flight `id` is still the current one. Never discards a token. Returns whether it applied.
fn fail(
    cache: &TokenCache,
    state: &mut State,
    id: u64,
    error: Error,
    now: Instant,
    started: Instant,
) -> bool {
    if !state.refresh.is_flight(id) {
        return false;
    }
    let reason = state.refresh.reason();
    state.consecutive_failures = state.consecutive_failures.saturating_add(1);
    let failures = state.consecutive_failures;
    let pause = pause_after(&error, failures);
    let until = saturating_add(now, pause);
    let transient = is_transient(&error);
    state.refresh = if transient {
        Refresh::BackingOff { until }
    } else {
        Refresh::Paused { until }
    };
    if state.current.is_some() {
        // The token is still cached: refresh-ahead tries again once the backoff is over.
        cache.rearm_refresh_ahead(until);
    }
    crate::telemetry::token_request_failed(
        cache.shared.fetcher.labels(),
        &crate::telemetry::Failed {
            reason,
            error: &error,
            transient,
            elapsed: now.saturating_duration_since(started),
            consecutive_failures: failures,
            retry_in: pause,
        },
    );
    state.last_error = Some(error);
    true
}

/// A flight's waiter deadline: `started + timeout + WAITER_GRACE`, saturating.
fn waiter_deadline(cache: &TokenCache, started: Instant) -> Instant {
    saturating_add(started, waiter_budget(cache))
}

fn waiter_budget(cache: &TokenCache) -> Duration {
    cache.shared.fetcher.timeout().saturating_add(WAITER_GRACE)
}

/// Tokio cannot be asked whether a runtime has its time driver, and creating a timer without
/// one panics. This asks by creating one (never polled, so never registered) and turns that
/// panic into [`ErrorKind::NoTimeDriver`]; the runtime's panic hook may still print it.
fn check_time_driver() -> Result<(), Error> {
    std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO)))
        .map_err(|_| Error::new(ErrorKind::NoTimeDriver))
}

/// The future of a caller waiting for a token: follows the flight it joined; when that flight
/// vanishes, waits out the backoff and follows the next one (at most
/// [`MAX_FLIGHTS_PER_WAITER`]); gives up at the followed flight's deadline. A still-valid
/// token is served instead of any error.
fn wait(cache: TokenCache, first: Next, mut give_up_at: Instant) -> RefreshWait {
    Box::pin(async move {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(ErrorKind::NoRuntime));
        }
        check_time_driver()?;
        let mut next = first;
        for _ in 0..MAX_FLIGHTS_PER_WAITER {
            match next {
                Next::Ready(token) => return Ok(token),
                Next::Failed(error) => return fallback(&cache, error),
                Next::Join(joined) => {
                    give_up_at = joined.deadline;
                    if let Some(result) = follow(&cache, joined).await {
                        return result.or_else(|error| fallback(&cache, error));
                    }
                }
                Next::Held { until } => {
                    if until > give_up_at {
                        let error = cache.lock().last_error.clone();
                        return fallback(
                            &cache,
                            error.unwrap_or_else(|| Error::new(ErrorKind::RefreshAborted)),
                        );
                    }
                    tokio::time::sleep_until(until).await;
                }
            }
            next = look_again(&cache, Instant::now());
        }
        fallback(&cache, Error::new(ErrorKind::RefreshAborted))
    })
}

/// Waits for the outcome of one flight, until its deadline. `None`: it ended without one
/// (its task vanished, or it was superseded); look again.
async fn follow(cache: &TokenCache, mut joined: Joined) -> Option<Result<LocalToken, Error>> {
    let ended =
        tokio::time::timeout_at(joined.deadline, joined.outcome.wait_for(Outcome::is_final))
            .await
            .map(|outcome| outcome.map(|outcome| outcome.clone()));
    match ended {
        Ok(Ok(Outcome::Settled(result))) => Some(result),
        Ok(Ok(_)) => None,
        Ok(Err(_)) => {
            // The task is gone without a word: a failure, followed by backoff.
            let mut state = cache.lock();
            if fail(
                cache,
                &mut state,
                joined.id,
                Error::new(ErrorKind::RefreshAborted),
                Instant::now(),
                joined.started,
            ) {
                tracing::debug!("token refresh ended without an outcome; starting over");
            }
            None
        }
        Err(_) => {
            // The flight is past its deadline: record it as failed so it can write nothing.
            let error = Error::new(ErrorKind::Timeout {
                after: waiter_budget(cache),
            });
            let mut state = cache.lock();
            fail(
                cache,
                &mut state,
                joined.id,
                error.clone(),
                Instant::now(),
                joined.started,
            );
            Some(Err(error))
        }
    }
}

/// A failed wait never takes away a token that is still valid.
fn fallback(cache: &TokenCache, error: Error) -> Result<LocalToken, Error> {
    cache.still_valid_token(Instant::now()).ok_or(error)
}
