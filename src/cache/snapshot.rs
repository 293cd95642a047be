//! The read side of the cache: the current token as published for the warm path.
//!
//! Every change of the cache's current token (installed by a refresh, dropped by a 401 or
//! [`TokenCache::invalidate`](super::TokenCache::invalidate)) goes through
//! [`TokenCache::publish`](super::TokenCache), which stores it here. Readers never lock:
//!
//! - `generation` is one atomic word, on its own cache line, that every request loads (and
//!   nothing but a publish writes), so a service that already holds a copy of the current token
//!   checks it with one load of a line that stays shared-clean in every core's cache;
//! - `token` is an `ArcSwapOption`: a service that holds no copy yet (a clone made from a
//!   service that was never called, as in `api.clone().oneshot(request)`) takes the header from
//!   it with a lock-free load, whatever its usage pattern.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwapOption, Guard};

use super::LocalToken;

/// The generation number meaning "no usable token".
pub(crate) const NO_TOKEN: u64 = 0;

/// Keeps the word read on every request on its own cache line, away from the `Arc` reference
/// counts and the mutex that other cores write.
#[repr(align(128))]
struct CacheLine<T>(T);

/// The published current token.
pub(crate) struct Published {
    /// Generation of the published token, [`NO_TOKEN`] when there is none.
    generation: CacheLine<AtomicU64>,
    token: ArcSwapOption<LocalToken>,
}

impl Published {
    pub(crate) fn new() -> Self {
        Self {
            generation: CacheLine(AtomicU64::new(NO_TOKEN)),
            token: ArcSwapOption::const_empty(),
        }
    }

    /// The generation of the published token, [`NO_TOKEN`] when there is none.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.0.load(Ordering::Acquire)
    }

    /// The published token, lock-free (no allocation once the thread has read it before).
    #[inline]
    pub(crate) fn load(&self) -> Guard<Option<Arc<LocalToken>>> {
        self.token.load()
    }

    /// Replaces the published token. Called only by `TokenCache::publish`, under the state
    /// lock, so publications never interleave.
    pub(crate) fn store(&self, token: Option<&LocalToken>) {
        let generation = token.map_or(NO_TOKEN, |token| token.generation);
        self.token.store(token.cloned().map(Arc::new));
        self.generation.0.store(generation, Ordering::Release);
    }
}
