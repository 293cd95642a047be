//! Token stores: where the processes of a fleet share one access token, so that a fleet makes
//! one token request per token lifetime instead of one per process.
//!
//! A store is consulted **only when a refresh is due** (a cold start, the cache's own
//! refresh-ahead or refresh point, a 401): inside the one refresh flight of a
//! [`crate::TokenCache`], never on the warm path, which keeps reading the process's own copy.
//! In that flight the cache:
//!
//! 1. after a 401, removes the rejected token from the store if it is still the stored one
//!    ([`TokenStore::remove`], compare-and-delete by [`SaveId`]: generation and random nonce);
//! 2. takes the stored token if it is not yet due for its own refresh-ahead (less than
//!    [`crate::REFRESH_AHEAD_PERCENT`] − [`crate::REFRESH_AHEAD_JITTER_PERCENT`] of its lifetime
//!    used), and sends no token request;
//! 3. otherwise takes the fleet's refresh lock ([`TokenStore::try_lock`]) and sends the token
//!    request, then saves the token ([`TokenStore::save`], compare-and-set by generation: a
//!    refresh whose lock was lost never overwrites a newer token);
//! 4. or, while another process holds the lock, waits until that token appears (woken by the
//!    store's [`StoreEvent::Saved`] where the store announces saves, else by polling), the lock
//!    is released or expires (it never sleeps past the lock's remaining lifetime, then tries
//!    itself), or the flight's deadline passes.
//!
//! A store that announces changes ([`TokenStore::subscribe`]; `RedisTokenStore` does, over
//! Redis pub/sub) also tells every cache of the key when a 401 removed the stored token
//! ([`StoreEvent::Removed`]): a cache still holding that token drops it, so its next request
//! refreshes instead of spending a 401 of its own.
//!
//! A store that fails or is too slow never fails a request: the flight then sends its own
//! token request, as a cache without a store does.
//!
//! Stores: [`MemoryTokenStore`] (one process, several layers) and, with the `redis` feature,
//! `RedisTokenStore` (a fleet of processes). Attach one with
//! [`crate::OAuth2Layer::with_token_store`].

#[cfg(feature = "redis")]
mod backend;
mod fleet;
mod key;
mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod seal;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;
use std::time::Duration;

use tower::BoxError;

pub(crate) use fleet::{fetch, Fleet};
pub use key::StoreKey;
pub use memory::MemoryTokenStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{
    RedisTokenStore, RedisTokenStoreBuilder, DEFAULT_REDIS_KEY_PREFIX,
    DEFAULT_REDIS_OPERATION_TIMEOUT, MAX_REDIS_RETRY_BACKOFF, MIN_REDIS_RETRY_BACKOFF,
    REDIS_CONNECT_TIMEOUT,
};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use seal::SealingKey;

/// The future a [`TokenStore`] method returns. An `Err` means "the store could not answer":
/// the refresh then goes on without the store (it never fails a request).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// What a store holds under one [`StoreKey`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreEntry {
    /// The generation of the newest token ever saved under the key (0: none yet). Grows by
    /// one per [`TokenStore::save`] and is kept when the token is removed, so a late writer
    /// can never save over a newer token.
    pub generation: u64,
    /// The token of `generation` and the identity of its save, unless it was removed
    /// ([`TokenStore::remove`]) or expired.
    pub token: Option<(SaveId, TokenPayload)>,
}

/// The identity of one [`TokenStore::save`]: the generation number it got and a random
/// 128-bit nonce drawn for that save. Numbers alone can repeat: when a store loses its
/// generation counter (Redis restarted without persistence, a failover to a replica that
/// missed the last writes, eviction), numbering starts again at 1, and a 401 for an old
/// token must not remove a newer token that got the same number. The nonce tells them
/// apart. Not secret: it reveals nothing of the token. Printed (`Display`) as
/// `<generation>:<nonce as 32 lowercase hex digits>`, as `RedisTokenStore` stores and
/// announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SaveId {
    /// The generation the save got (1 or more).
    pub generation: u64,
    /// Random, unique to the save (see [`SaveId::random_nonce`]).
    pub nonce: u128,
}

impl SaveId {
    /// A new random nonce for a save: 128 bits from the operating system's generator
    /// (through `ring`), or from `fastrand` should that fail (uniqueness, not secrecy, is what
    /// a nonce needs).
    pub fn random_nonce() -> u128 {
        u128::from_be_bytes(random_128_bits())
    }
}

impl fmt::Display for SaveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:032x}", self.generation, self.nonce)
    }
}

impl std::str::FromStr for SaveId {
    type Err = &'static str;

    /// Parses what `Display` prints: `<generation>:<32 hex digits>`. `Err` names what is
    /// wrong.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (generation, nonce) = text
            .split_once(':')
            .ok_or("a save id is <generation>:<nonce>")?;
        if nonce.len() != 32 {
            return Err("a save id's nonce is 32 hex digits");
        }
        Ok(Self {
            generation: generation
                .parse()
                .map_err(|_| "a save id's generation is a decimal number")?,
            nonce: u128::from_str_radix(nonce, 16)
                .map_err(|_| "a save id's nonce is 32 hex digits")?,
        })
    }
}

/// 128 random bits from the operating system's generator, or `fastrand` should it fail.
fn random_128_bits() -> [u8; 16] {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        bytes = fastrand::u128(..).to_be_bytes();
    }
    bytes
}

/// A stored token as the crate serialises it: the access token, when it was requested and
/// when it expires (wall clock, milliseconds since the Unix epoch), and its scope. Opaque to
/// stores; it contains the access token, so a store that keeps it outside the process must
/// seal it (`RedisTokenStore` does). `Debug` prints its length only.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenPayload(Vec<u8>);

impl TokenPayload {
    /// Wraps bytes that a store read back (what [`TokenPayload::as_bytes`] gave it).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes to keep. Secret: never log them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for TokenPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenPayload(<redacted, {} bytes>)", self.0.len())
    }
}

/// The proof of holding a store's refresh lock: a random value (128 bits, hex) that only the
/// holder knows, so that it releases only its own lock, never one taken after its own
/// expired.
#[derive(Clone, PartialEq, Eq)]
pub struct Fence(String);

impl Fence {
    /// A new random fence (from the operating system's generator, through `ring`).
    pub fn random() -> Self {
        // Should the system generator fail: uniqueness, not secrecy, is what a fence needs.
        let bytes = random_128_bits();
        Self(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
    }

    /// The fence as a string, as stores keep it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fence({})", self.0)
    }
}

/// What [`TokenStore::try_lock`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAttempt {
    /// The lock was free and is now held by the caller, proven by this fence.
    Taken(Fence),
    /// Another holder has the lock.
    Held {
        /// How long the holder's lock still lives before it expires by itself (Redis `PTTL`,
        /// millisecond precision), or `None` when the store cannot tell. A waiter looks again
        /// no later than this, and takes the lock itself if it is gone.
        expires_in: Option<Duration>,
    },
}

/// Where the processes of a fleet share their access token: the refresh lock, the token and
/// its generation, under one [`StoreKey`] per configuration. See the [module
/// documentation](self) for how the cache uses it.
///
/// Every method may fail (`Err`): the cache then treats the store as absent for that refresh.
/// Implementations bound each operation by a short timeout of their own; the cache also gives
/// up on any one operation after the rest of the flight's token request timeout.
pub trait TokenStore: fmt::Debug + Send + Sync + 'static {
    /// The newest generation under `key` and its token, if still there.
    fn load<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, StoreEntry>;

    /// Takes the refresh lock of `key` for `lifetime` unless someone holds it:
    /// [`LockAttempt::Taken`] with the new fence, or [`LockAttempt::Held`] with how long the
    /// holder's lock still lives. The lock expires by itself after `lifetime` (the token
    /// request timeout plus a grace), so a process that dies holding it delays the fleet by at
    /// most that: a waiter never sleeps past the held lock's expiry, then tries itself.
    fn try_lock<'a>(
        &'a self,
        key: &'a StoreKey,
        lifetime: Duration,
    ) -> StoreFuture<'a, LockAttempt>;

    /// Releases the lock of `key` if it is still held with `fence` (compare-and-delete).
    fn unlock<'a>(&'a self, key: &'a StoreKey, fence: &'a Fence) -> StoreFuture<'a, ()>;

    /// Saves `token` as generation `expected_generation + 1` if the newest generation under
    /// `key` is still `expected_generation` (compare-and-set, atomically), with a new random
    /// nonce ([`SaveId::random_nonce`]) kept with it, keeps it for `time_to_live` (the
    /// token's remaining lifetime), and releases the lock if it is still held with `fence`.
    /// Returns the [`SaveId`] of the save, or `None` when a newer token was saved meanwhile
    /// (nothing written).
    fn save<'a>(
        &'a self,
        key: &'a StoreKey,
        expected_generation: u64,
        token: &'a TokenPayload,
        time_to_live: Duration,
        fence: &'a Fence,
    ) -> StoreFuture<'a, Option<SaveId>>;

    /// Removes the token of `key` if it is still the one saved as `saved` (compare-and-delete
    /// by generation **and** nonce, after a 401 for it: a newer token that got the same
    /// number after the store lost its counter stays), keeping the generation number.
    /// Returns whether it removed it.
    fn remove<'a>(&'a self, key: &'a StoreKey, saved: SaveId) -> StoreFuture<'a, bool>;

    /// Asks the store to call `listener` with the [`StoreEvent`]s of `key` (a save, a removal
    /// after a 401), made by any process sharing the store, this one included, for as long as
    /// `listener` is alive (the store keeps only this `Weak`). Best effort: an event may be
    /// lost (a store outage, a reconnection), so caches still poll and still retry after
    /// their own 401. The default announces nothing: caches then only poll.
    fn subscribe(&self, key: &StoreKey, listener: Weak<dyn StoreListener>) {
        let _ = (key, listener);
    }

    /// Undoes one [`TokenStore::subscribe`] of `key` with this `listener` (compared by
    /// pointer, [`Weak::ptr_eq`]): called when the cache that subscribed is dropped, so that
    /// a store shared by layers made and dropped over time (one per tenant or audience, say)
    /// keeps no listener slot, channel or server-side subscription of theirs. When the key
    /// has no listener left, the store stops receiving its events. Never fails and never
    /// blocks: a store with I/O to do finishes it later. The default does nothing.
    fn unsubscribe(&self, key: &StoreKey, listener: &Weak<dyn StoreListener>) {
        let _ = (key, listener);
    }

    /// The fixed interval at which a cache waiting for another process's token request looks
    /// at the store, or `None` (the default) for the crate's schedule: after 10 ms, doubling
    /// up to 200 ms. A store that announces saves ([`StoreEvent::Saved`]) wakes its waiters at
    /// once; polling is the fallback when an announcement is lost.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }
}

/// A change to the token under one [`StoreKey`], as a store announces it to the caches that
/// subscribed to the key ([`TokenStore::subscribe`]). Carries a [`SaveId`] only, never a
/// token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// A token was saved ([`TokenStore::save`]): caches waiting for another process's token
    /// request look at the store now.
    Saved {
        /// The save's identity.
        saved: SaveId,
    },
    /// The token of the save `saved` was removed after a 401 ([`TokenStore::remove`]): a
    /// cache still using that very token (same generation and nonce) drops it and refreshes
    /// on its next request.
    Removed {
        /// The identity of the rejected token's save.
        saved: SaveId,
    },
}

/// Receives the [`StoreEvent`]s of one key ([`TokenStore::subscribe`]). Stores may call it
/// from their connection's task: it must return quickly and never block on I/O.
pub trait StoreListener: Send + Sync + 'static {
    /// One event of the key the listener subscribed to.
    fn on_event(&self, event: StoreEvent);
}

#[cfg(test)]
mod tests {
    use super::SaveId;

    #[test]
    fn a_save_id_prints_as_generation_and_hex_nonce_and_parses_back() {
        let saved = SaveId {
            generation: 7,
            nonce: 0xabc,
        };
        assert_eq!(saved.to_string(), "7:00000000000000000000000000000abc");
        assert_eq!(saved.to_string().parse(), Ok(saved));
        for bad in ["7", "x:00000000000000000000000000000abc", "7:abc", "7:zz"] {
            assert!(bad.parse::<SaveId>().is_err(), "{bad}");
        }
        assert_ne!(SaveId::random_nonce(), SaveId::random_nonce());
    }
}
