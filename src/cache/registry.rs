//! Caches by id: what a response future and a response body hold to reach their cache when a
//! token rejection arrives, so the warm path clones no `Arc` (a shared reference count written
//! on every request, and again when the response is dropped).
//!
//! A [`CacheId`] is a plain number: copying it touches no shared memory. Only a rejection (a
//! 401 about the token, gRPC UNAUTHENTICATED) or a replay looks it up, under a process-wide
//! lock held for one map lookup. A cache registers itself when it is created and leaves when its
//! last clone is dropped; a response that outlives its cache finds nothing and has nothing to
//! invalidate.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use super::{Shared, TokenCache};

/// Names one [`TokenCache`] for the life of the process (ids are never reused). Never zero, so
/// an `Option<CacheId>` (in [`crate::ResponseBody`]) takes no more room than the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheId(NonZeroU64);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

static CACHES: LazyLock<Mutex<HashMap<CacheId, Weak<Shared>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn caches() -> std::sync::MutexGuard<'static, HashMap<CacheId, Weak<Shared>>> {
    CACHES.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CacheId {
    /// A new id, never handed out before.
    pub(super) fn next() -> Self {
        // Starts at 1; the counter would wrap to 0 only after 2^64 caches.
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Self(NonZeroU64::new(id).unwrap_or(NonZeroU64::MAX))
    }

    /// The cache of this id, if a clone of it is still alive.
    pub(crate) fn cache(self) -> Option<TokenCache> {
        let shared = caches().get(&self)?.upgrade()?;
        Some(TokenCache { shared })
    }
}

/// Makes the cache findable by its id.
pub(super) fn register(shared: &Arc<Shared>) {
    caches().insert(shared.id, Arc::downgrade(shared));
}

/// Forgets the cache of `id` (its last clone is being dropped).
pub(super) fn deregister(id: CacheId) {
    caches().remove(&id);
}

/// Whether `id` still has an entry (dead or alive): tests show that a dropped cache leaves.
#[cfg(test)]
pub(super) fn is_registered(id: CacheId) -> bool {
    caches().contains_key(&id)
}
