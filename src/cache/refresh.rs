//! The single-flight refresh: one token request per cache at a time, run in its own task, its
//! outcome shared with every waiter through a `watch` channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::backoff::pause_after;
use super::timing::schedule;
use super::{CachedToken, LocalToken, State, TokenCache};
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
}

impl RefreshReason {
    fn as_str(self) -> &'static str {
        match self {
            RefreshReason::Initial => "initial",
            RefreshReason::Expired => "expired",
            RefreshReason::RefreshAhead => "refresh-ahead",
            RefreshReason::AfterUnauthorized => "after-401",
        }
    }
}

type Outcome = Option<Result<LocalToken, Error>>;

/// A waiter's future on the in-flight refresh. Boxed: only the cold path allocates it.
pub(crate) type RefreshWait = Pin<Box<dyn Future<Output = Result<LocalToken, Error>> + Send>>;

/// The refresh in flight, as stored in the cache state.
pub(crate) struct InFlight {
    id: u64,
    outcome: watch::Receiver<Outcome>,
}

impl InFlight {
    /// False once the refresh task is gone (finished, panicked, or its runtime shut down).
    pub(crate) fn is_live(&self) -> bool {
        self.outcome.has_changed().is_ok()
    }
}

/// Joins the refresh in flight, or starts one. Called with the state lock held.
pub(crate) fn join_or_start(
    cache: &TokenCache,
    state: &mut State,
    reason: RefreshReason,
) -> Result<RefreshWait, Error> {
    if let Some(in_flight) = state.in_flight.as_ref().filter(|f| f.is_live()) {
        return Ok(wait(cache.clone(), in_flight.id, in_flight.outcome.clone()));
    }
    let runtime =
        tokio::runtime::Handle::try_current().map_err(|_| Error::new(ErrorKind::NoRuntime))?;
    let (sender, receiver) = watch::channel(None);
    state.last_flight_id += 1;
    let id = state.last_flight_id;
    state.in_flight = Some(InFlight {
        id,
        outcome: receiver.clone(),
    });
    cache.shared.token_requests.fetch_add(1, Ordering::Relaxed);
    let task_cache = cache.clone();
    let span = tracing::debug_span!("oauth2_token_request", reason = reason.as_str());
    runtime.spawn(
        async move {
            let started = Instant::now();
            let result = task_cache.shared.fetcher.fetch().await;
            let outcome = complete(&task_cache, id, result, started);
            // Nobody waiting is fine: the token is cached all the same.
            let _ = sender.send(Some(outcome));
        }
        .instrument(span),
    );
    Ok(wait(cache.clone(), id, receiver))
}

/// Extra time a waiter gives the refresh beyond the token request timeout before it stops
/// waiting on its own (the refresh task's runtime may be stalled or gone): 1 s.
const WAITER_GRACE: Duration = Duration::from_secs(1);

fn wait(cache: TokenCache, id: u64, mut outcome: watch::Receiver<Outcome>) -> RefreshWait {
    Box::pin(async move {
        let deadline = cache.shared.fetcher.timeout() + WAITER_GRACE;
        let result = match tokio::time::timeout(deadline, outcome.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => match &*value {
                Some(result) => result.clone(),
                None => Err(Error::new(ErrorKind::RefreshAborted)),
            },
            Ok(Err(_)) => Err(Error::new(ErrorKind::RefreshAborted)),
            Err(_) => {
                // The refresh made no progress in time: forget it so the next call starts anew.
                let mut state = cache.lock();
                if state.in_flight.as_ref().is_some_and(|f| f.id == id) {
                    state.in_flight = None;
                }
                Err(Error::new(ErrorKind::Timeout { after: deadline }))
            }
        };
        // A failed refresh never takes away a token that is still valid.
        result.or_else(|error| cache.still_valid_token(Instant::now()).ok_or(error))
    })
}

/// Stores the outcome of a token request. Never discards a good token on failure.
fn complete(
    cache: &TokenCache,
    id: u64,
    result: Result<FetchedToken, Error>,
    started: Instant,
) -> Result<LocalToken, Error> {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let shared = &cache.shared;
    let mut state = cache.lock();
    if state.in_flight.as_ref().is_some_and(|f| f.id == id) {
        state.in_flight = None;
    }
    match result {
        Ok(fetched) => {
            state.last_generation += 1;
            let generation = state.last_generation;
            let schedule = schedule(fetched.requested_at, fetched.lifetime);
            let local = LocalToken {
                generation,
                authorization: fetched.authorization,
                refresh_at: schedule.refresh_at,
                refresh_ahead_at: schedule.refresh_ahead_at,
            };
            state.current = Some(CachedToken {
                local: local.clone(),
                access_token: fetched.access_token,
                requested_at: fetched.requested_at,
                expires_at: schedule.expires_at,
                granted_scope: fetched.granted_scope,
            });
            state.last_error = None;
            state.retry_not_before = None;
            shared.consecutive_failures.store(0, Ordering::Relaxed);
            cache.publish(&state);
            tracing::debug!(
                outcome = "success",
                generation,
                elapsed_ms,
                lifetime_secs = fetched.lifetime.as_secs(),
                "access token obtained"
            );
            Ok(local)
        }
        Err(error) => {
            let failures = shared.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            let pause = pause_after(&error, failures);
            state.retry_not_before = Some(Instant::now() + pause);
            tracing::warn!(
                outcome = "failure",
                elapsed_ms,
                consecutive_failures = failures,
                retry_in_ms = pause.as_millis() as u64,
                error = %error,
                "token request failed"
            );
            state.last_error = Some(error.clone());
            Err(error)
        }
    }
}
