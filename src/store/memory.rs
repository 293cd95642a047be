//! [`MemoryTokenStore`]: a store shared by the layers of one process.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Fence, LockAttempt, SaveId, StoreEntry, StoreFuture, StoreKey, TokenPayload, TokenStore,
};
use crate::cache::saturating_add;

/// A [`TokenStore`] in this process's memory: layers built separately (one per tenant module,
/// say) that share one clone of it make one token request per token lifetime between them, as
/// processes sharing a `RedisTokenStore` do. Cheap to clone; clones share the tokens. Never
/// fails. Lock and token lifetimes count on Tokio's clock.
#[derive(Clone, Default)]
pub struct MemoryTokenStore {
    entries: Arc<Mutex<HashMap<StoreKey, Entry>>>,
}

#[derive(Default)]
struct Entry {
    generation: u64,
    /// The token of `generation`, its save's identity, and when it stops being kept.
    token: Option<(SaveId, TokenPayload, Instant)>,
    /// The refresh lock and when it expires.
    lock: Option<(Fence, Instant)>,
}

impl MemoryTokenStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_entry<T>(&self, key: &StoreKey, f: impl FnOnce(&mut Entry, Instant) -> T) -> T {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(key.clone()).or_default();
        if entry
            .token
            .as_ref()
            .is_some_and(|(_, _, until)| now >= *until)
        {
            entry.token = None;
        }
        if entry.lock.as_ref().is_some_and(|(_, until)| now >= *until) {
            entry.lock = None;
        }
        f(entry, now)
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl TokenStore for MemoryTokenStore {
    fn load<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, StoreEntry> {
        ready(self.with_entry(key, |entry, _| {
            StoreEntry {
                generation: entry.generation,
                token: entry
                    .token
                    .as_ref()
                    .map(|(saved, token, _)| (*saved, token.clone())),
            }
        }))
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a StoreKey,
        lifetime: Duration,
    ) -> StoreFuture<'a, LockAttempt> {
        ready(self.with_entry(key, |entry, now| {
            if let Some((_, until)) = &entry.lock {
                return LockAttempt::Held {
                    expires_in: Some(until.saturating_duration_since(now)),
                };
            }
            let fence = Fence::random();
            entry.lock = Some((fence.clone(), saturating_add(now, lifetime)));
            LockAttempt::Taken(fence)
        }))
    }

    fn unlock<'a>(&'a self, key: &'a StoreKey, fence: &'a Fence) -> StoreFuture<'a, ()> {
        self.with_entry(key, |entry, _| {
            if entry.lock.as_ref().is_some_and(|(held, _)| held == fence) {
                entry.lock = None;
            }
        });
        ready(())
    }

    fn save<'a>(
        &'a self,
        key: &'a StoreKey,
        expected_generation: u64,
        token: &'a TokenPayload,
        time_to_live: Duration,
        fence: &'a Fence,
    ) -> StoreFuture<'a, Option<SaveId>> {
        ready(self.with_entry(key, |entry, now| {
            if entry.lock.as_ref().is_some_and(|(held, _)| held == fence) {
                entry.lock = None;
            }
            if entry.generation != expected_generation {
                return None;
            }
            entry.generation += 1;
            let saved = SaveId {
                generation: entry.generation,
                nonce: SaveId::random_nonce(),
            };
            entry.token = Some((saved, token.clone(), saturating_add(now, time_to_live)));
            Some(saved)
        }))
    }

    fn remove<'a>(&'a self, key: &'a StoreKey, saved: SaveId) -> StoreFuture<'a, bool> {
        ready(self.with_entry(key, |entry, _| {
            if entry.token.as_ref().is_some_and(|(id, _, _)| *id == saved) {
                entry.token = None;
                true
            } else {
                false
            }
        }))
    }
}

impl fmt::Debug for MemoryTokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("MemoryTokenStore")
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}
