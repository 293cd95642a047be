//! [`Fleet`]: a cache's use of a [`TokenStore`] inside its refresh flight ([`fetch`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Fence, LockAttempt, SaveId, StoreEntry, StoreEvent, StoreKey, StoreListener, TokenPayload,
    TokenStore,
};
use crate::cache::{RefreshReason, REFRESH_AHEAD_JITTER_PERCENT, REFRESH_AHEAD_PERCENT};
use crate::error::Error;
use crate::secret::AccessToken;
use crate::token::{FetchedToken, TokenFetcher};

/// How long the fleet's refresh lock outlives the token request timeout: 1 s (the same grace
/// a waiter gives a flight in this process).
pub(crate) const LOCK_GRACE: Duration = Duration::from_secs(1);
/// First interval at which a process waiting for another's token request looks at the store:
/// 10 ms, doubled per look up to [`MAX_POLL_INTERVAL`].
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest interval between two looks at the store while waiting: 200 ms.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A cache's store, the key of its configuration, and what the cache knows of the stored token.
pub(crate) struct Fleet {
    store: Arc<dyn TokenStore>,
    key: StoreKey,
    /// Shared with the store's subscription (which holds it weakly): gone with the cache.
    watch: Arc<Watch>,
    /// `watch` as given to the store's subscription, to take it back on drop.
    listener: Weak<dyn StoreListener>,
}

impl Drop for Fleet {
    /// The cache is gone: its store forgets its listener (and the key's subscription when no
    /// other cache of the key is left).
    fn drop(&mut self) {
        self.store.unsubscribe(&self.key, &self.listener);
    }
}

/// The cache's side of the store's events ([`StoreEvent`]).
struct Watch {
    /// The save of the token this cache last took or saved (`None`: none, or its current
    /// token was requested without the store). Generation and nonce: a number alone can
    /// repeat after the store lost its counter.
    seen: Mutex<Option<SaveId>>,
    /// Woken by [`StoreEvent::Saved`]: waiters for another process's token look again.
    saved: Notify,
    /// Drops the cache's token when the check it is given (asked under the cache's lock)
    /// holds; set once by the cache ([`Fleet::on_removed_elsewhere`]).
    drop_local: OnceLock<DropLocal>,
}

/// See [`Watch::drop_local`].
pub(crate) type DropLocal = Box<dyn Fn(&dyn Fn() -> bool) + Send + Sync>;

impl StoreListener for Watch {
    fn on_event(&self, event: StoreEvent) {
        match event {
            StoreEvent::Saved { .. } => self.saved.notify_waiters(),
            StoreEvent::Removed { saved } => {
                if let Some(drop_local) = self.drop_local.get() {
                    // Only while the cached token is still the removed one: a token taken or
                    // saved since (`seen` moves before the cache installs it) stays.
                    drop_local(&|| self.seen() == Some(saved));
                }
            }
        }
    }
}

impl Watch {
    fn seen(&self) -> Option<SaveId> {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_seen(&self, saved: Option<SaveId>) {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = saved;
    }
}

impl Fleet {
    pub(crate) fn new(store: Arc<dyn TokenStore>, key: StoreKey) -> Self {
        let watch = Arc::new(Watch {
            seen: Mutex::new(None),
            saved: Notify::new(),
            drop_local: OnceLock::new(),
        });
        let listener: Arc<dyn StoreListener> = watch.clone();
        let listener: Weak<dyn StoreListener> = Arc::downgrade(&listener);
        store.subscribe(&key, listener.clone());
        Self {
            store,
            key,
            watch,
            listener,
        }
    }

    /// How the cache drops its token when another process had it rejected
    /// ([`StoreEvent::Removed`] for the save it holds). Set once; later calls do nothing.
    pub(crate) fn on_removed_elsewhere(&self, drop_local: DropLocal) {
        let _ = self.watch.drop_local.set(drop_local);
    }
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("store", &self.store)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The token request of one refresh flight, by `deadline`: through the fleet's store when
/// there is one (see the [module documentation](super)), else straight to the token endpoint.
/// `requests` counts the token requests actually sent.
pub(crate) async fn fetch(
    fleet: Option<&Fleet>,
    fetcher: &TokenFetcher,
    requests: &AtomicU64,
    deadline: Instant,
    reason: RefreshReason,
) -> Result<FetchedToken, Error> {
    match fleet {
        None => send(fetcher, requests, deadline).await,
        Some(fleet) => fleet.fetch(fetcher, requests, deadline, reason).await,
    }
}

async fn send(
    fetcher: &TokenFetcher,
    requests: &AtomicU64,
    deadline: Instant,
) -> Result<FetchedToken, Error> {
    requests.fetch_add(1, Ordering::Relaxed);
    fetcher.fetch(deadline).await
}

/// Why the flight goes on without the store.
enum Unavailable {
    /// The store failed, or did not answer by the flight's deadline.
    Store,
}

impl Fleet {
    async fn fetch(
        &self,
        fetcher: &TokenFetcher,
        requests: &AtomicU64,
        deadline: Instant,
        reason: RefreshReason,
    ) -> Result<FetchedToken, Error> {
        match self.coordinate(fetcher, requests, deadline, reason).await {
            Ok(result) => result,
            Err(Unavailable::Store) => {
                tracing::debug!("token store unavailable: requesting a token for this process");
                self.watch.set_seen(None);
                send(fetcher, requests, deadline).await
            }
        }
    }

    /// Bounds one store operation by the flight's deadline.
    async fn op<T>(
        &self,
        deadline: Instant,
        future: super::StoreFuture<'_, T>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout_at(deadline, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "token store operation failed");
                Err(Unavailable::Store)
            }
            Err(_) => Err(Unavailable::Store),
        }
    }

    async fn coordinate(
        &self,
        fetcher: &TokenFetcher,
        requests: &AtomicU64,
        deadline: Instant,
        reason: RefreshReason,
    ) -> Result<Result<FetchedToken, Error>, Unavailable> {
        let store = &*self.store;
        let key = &self.key;
        // After a 401: the rejected token goes from the store too, unless it was replaced.
        let rejected = if reason == RefreshReason::AfterUnauthorized {
            let seen = self.watch.seen();
            if let Some(seen) = seen {
                if self.op(deadline, store.remove(key, seen)).await? {
                    tracing::debug!(
                        generation = seen.generation,
                        "rejected token removed from the token store"
                    );
                }
            }
            seen
        } else {
            None
        };
        let (mut poll, max_poll) = match store.poll_interval() {
            Some(interval) => (interval, interval),
            None => (MIN_POLL_INTERVAL, MAX_POLL_INTERVAL),
        };
        loop {
            // Listening before the look, so that a save announced in between is not missed.
            let mut saved = std::pin::pin!(self.watch.saved.notified());
            saved.as_mut().enable();
            let entry = self.op(deadline, store.load(key)).await?;
            if let Some(token) = self.usable(&entry, rejected) {
                tracing::debug!(
                    generation = entry.generation,
                    "access token taken from the token store"
                );
                return Ok(Ok(token));
            }
            let lock_lifetime = fetcher.timeout().saturating_add(LOCK_GRACE);
            let expires_in = match self
                .op(deadline, store.try_lock(key, lock_lifetime))
                .await?
            {
                LockAttempt::Taken(fence) => {
                    return Ok(self
                        .refresh_for_fleet(fetcher, requests, deadline, fence, rejected)
                        .await)
                }
                LockAttempt::Held { expires_in } => expires_in,
            };
            // Another process is requesting the token: look again when it announces the save,
            // after the poll interval, or once its lock has expired (a dead holder: then this
            // process takes the lock), whichever comes first, until the deadline.
            let now = Instant::now();
            if now >= deadline {
                return Ok(Err(fetcher.timeout_error()));
            }
            let mut wake = deadline.min(now + poll);
            if let Some(expires_in) = expires_in {
                // At least 1 ms: a lock about to expire is not looked at in a busy loop.
                wake = wake.min(now + expires_in.max(Duration::from_millis(1)));
            }
            let _ = tokio::time::timeout_at(wake, saved).await;
            poll = (poll * 2).min(max_poll);
        }
    }

    /// With the fleet's lock held: sends the token request and saves the token.
    async fn refresh_for_fleet(
        &self,
        fetcher: &TokenFetcher,
        requests: &AtomicU64,
        deadline: Instant,
        fence: Fence,
        rejected: Option<SaveId>,
    ) -> Result<FetchedToken, Error> {
        let store = &*self.store;
        let key = &self.key;
        // A token may have been saved between the look and the lock.
        let entry = match self.op(deadline, store.load(key)).await {
            Ok(entry) => entry,
            Err(Unavailable::Store) => {
                self.watch.set_seen(None);
                return send(fetcher, requests, deadline).await;
            }
        };
        if let Some(token) = self.usable(&entry, rejected) {
            let _ = self.op(deadline, store.unlock(key, &fence)).await;
            return Ok(token);
        }
        tracing::debug!("requesting the access token for the fleet");
        let result = send(fetcher, requests, deadline).await;
        match &result {
            Ok(token) => {
                let payload = encode(token);
                // The store keeps the token until it expires.
                let time_to_live = token.lifetime.saturating_sub(token.requested_at.elapsed());
                match self
                    .op(
                        deadline.max(Instant::now() + LOCK_GRACE),
                        store.save(key, entry.generation, &payload, time_to_live, &fence),
                    )
                    .await
                {
                    Ok(Some(saved)) => {
                        self.watch.set_seen(Some(saved));
                        tracing::debug!(
                            generation = saved.generation,
                            "access token saved in the token store"
                        );
                    }
                    Ok(None) => {
                        self.watch.set_seen(None);
                        tracing::debug!(
                            "a newer token was saved in the token store meanwhile; this one is \
                             kept by this process only"
                        );
                    }
                    Err(Unavailable::Store) => self.watch.set_seen(None),
                }
            }
            Err(_) => {
                // Let the others try at once instead of waiting for the lock to expire.
                let _ = self
                    .op(
                        deadline.max(Instant::now() + LOCK_GRACE),
                        store.unlock(key, &fence),
                    )
                    .await;
            }
        }
        result
    }

    /// The stored token of `entry` if it is not yet due for its refresh-ahead and is not the
    /// `rejected` one (same save: generation and nonce; a token that got the same number
    /// after the store lost its counter is another token, and usable).
    fn usable(&self, entry: &StoreEntry, rejected: Option<SaveId>) -> Option<FetchedToken> {
        let (saved, payload) = entry.token.as_ref()?;
        if Some(*saved) == rejected {
            return None;
        }
        let token = decode(payload)?;
        self.watch.set_seen(Some(*saved));
        Some(token)
    }
}

/// A token as stored (see [`TokenPayload`]).
#[derive(Serialize, Deserialize)]
struct Stored {
    access_token: String,
    /// When the token request was sent: milliseconds since the Unix epoch.
    requested_at_ms: u64,
    /// When the token expires: milliseconds since the Unix epoch.
    expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

/// The process's wall clock in milliseconds since the Unix epoch, advancing with Tokio's clock
/// (so a paused test clock moves it too): the wall clock read once, plus Tokio time since.
fn wall_now_ms() -> u64 {
    static BASE: OnceLock<(u64, std::time::Instant)> = OnceLock::new();
    let (wall, instant) = *BASE.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        (wall, std::time::Instant::now())
    });
    let elapsed = Instant::now()
        .into_std()
        .saturating_duration_since(instant)
        .as_millis() as u64;
    wall.saturating_add(elapsed)
}

fn encode(token: &FetchedToken) -> TokenPayload {
    let requested_at_ms =
        wall_now_ms().saturating_sub(token.requested_at.elapsed().as_millis() as u64);
    let stored = Stored {
        access_token: token.access_token.expose_secret().to_owned(),
        requested_at_ms,
        expires_at_ms: requested_at_ms.saturating_add(token.lifetime.as_millis() as u64),
        scope: token.granted_scope.as_deref().map(str::to_owned),
    };
    TokenPayload(serde_json::to_vec(&stored).unwrap_or_default())
}

/// The token of `payload` if it is well-formed and not yet due for refresh-ahead anywhere
/// (less than [`REFRESH_AHEAD_PERCENT`] − [`REFRESH_AHEAD_JITTER_PERCENT`] of its lifetime
/// used, by this process's wall clock).
fn decode(payload: &TokenPayload) -> Option<FetchedToken> {
    let stored: Stored = match serde_json::from_slice(payload.as_bytes()) {
        Ok(stored) => stored,
        Err(_) => {
            tracing::warn!("unreadable token in the token store: ignored");
            return None;
        }
    };
    let lifetime_ms = stored.expires_at_ms.checked_sub(stored.requested_at_ms)?;
    let used_ms = wall_now_ms().saturating_sub(stored.requested_at_ms);
    let fresh_share = u64::from(REFRESH_AHEAD_PERCENT - REFRESH_AHEAD_JITTER_PERCENT);
    if used_ms.saturating_mul(100) >= lifetime_ms.saturating_mul(fresh_share) {
        return None;
    }
    let mut authorization =
        HeaderValue::try_from(format!("Bearer {}", stored.access_token)).ok()?;
    authorization.set_sensitive(true);
    let now = Instant::now();
    Some(FetchedToken {
        authorization,
        access_token: AccessToken::new(stored.access_token),
        lifetime: Duration::from_millis(lifetime_ms),
        granted_scope: stored.scope.map(Arc::from),
        requested_at: now
            .checked_sub(Duration::from_millis(used_ms))
            .unwrap_or(now),
        from_store: true,
    })
}
