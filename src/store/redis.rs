//! [`RedisTokenStore`]: the token store of a fleet of processes, on Redis through the `redis`
//! crate's tokio connection manager.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tower::BoxError;

use super::seal::{Sealing, SealingKey};
use super::{Fence, StoreEntry, StoreFuture, StoreKey, TokenPayload, TokenStore};
use crate::error::{Error, ErrorKind};

/// Default bound on each Redis operation (a command or a script): 500 ms. A store that does not
/// answer by then counts as down (an outage).
pub const DEFAULT_REDIS_OPERATION_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on connecting to Redis (TCP and handshake), which an operation on a new or lost
/// connection waits for on top of its own timeout: 1 s.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed Redis operation the store is left alone for this long before it is tried
/// again (1 s), doubled per further failure up to [`MAX_REDIS_RETRY_BACKOFF`].
pub const MIN_REDIS_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between two attempts to reach Redis during an outage: 30 s.
pub const MAX_REDIS_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// Default prefix of the Redis keys: `nuvy-oauth2`. The keys of one configuration are
/// `<prefix>:{<StoreKey>}:token`, `…:generation` and `…:lock`; the braces are a Redis Cluster
/// hash tag, so all three live on one slot.
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "nuvy-oauth2";

/// Saves a token if the generation is still the expected one, and releases the lock if the
/// fence still holds it. KEYS: generation, token, lock. ARGV: expected generation, sealed
/// token, time to live (ms), fence. Returns the new generation, or 0 when nothing was saved.
const SAVE: &str = r"
local saved = 0
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current == tonumber(ARGV[1]) then
  saved = current + 1
  redis.call('SET', KEYS[1], saved)
  redis.call('SET', KEYS[2], saved .. ':' .. ARGV[2], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('DEL', KEYS[3])
end
return saved
";

/// Releases the lock if the fence still holds it. KEYS: lock. ARGV: fence.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Deletes the token if it is still of the given generation. KEYS: token. ARGV: generation.
const REMOVE: &str = r"
local value = redis.call('GET', KEYS[1])
if value and string.match(value, '^(%d+):') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A [`TokenStore`] on Redis (standalone; the keys are Cluster-safe), shared by every process
/// of a fleet: they make one token request per token lifetime between them. Tokens are sealed
/// with a [`SealingKey`] unless plaintext was chosen explicitly. Cheap to clone; clones share
/// the connection.
///
/// Every Redis operation is bounded by the operation timeout
/// ([`DEFAULT_REDIS_OPERATION_TIMEOUT`]), plus [`REDIS_CONNECT_TIMEOUT`] when it has to
/// connect first. When one fails, the store logs one WARN for the
/// outage and answers nothing for [`MIN_REDIS_RETRY_BACKOFF`] (doubling up to
/// [`MAX_REDIS_RETRY_BACKOFF`]): each process then requests its own tokens, as without a
/// store. The first operation that succeeds again logs an INFO and ends the outage.
///
/// ```no_run
/// # fn run(config: nuvy_oauth2::OAuth2Config) -> Result<(), nuvy_oauth2::Error> {
/// use nuvy_oauth2::store::{RedisTokenStore, SealingKey};
/// use nuvy_oauth2::OAuth2Layer;
///
/// let store = RedisTokenStore::builder("redis://redis.internal:6379")
///     .sealing_key(SealingKey::from_base64(&std::env::var("TOKEN_SEALING_KEY").unwrap_or_default())?)
///     .build()?;
/// let layer = OAuth2Layer::new(config)?.with_token_store(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisTokenStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// Made on first use, inside the runtime that uses it.
    connection: OnceCell<ConnectionManager>,
    sealing: Sealing,
    prefix: String,
    timeout: Duration,
    outage: Mutex<Outage>,
    save: Script,
    unlock: Script,
    remove: Script,
}

/// Whether Redis is considered down, and until when it is left alone.
#[derive(Default)]
struct Outage {
    /// `Some`: in an outage; no operation before this moment.
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// Builder of a [`RedisTokenStore`].
#[derive(Clone)]
pub struct RedisTokenStoreBuilder {
    url: String,
    sealing_key: Option<SealingKey>,
    plaintext: bool,
    prefix: String,
    timeout: Duration,
}

impl RedisTokenStore {
    /// Starts a builder for the Redis at `url` (`redis://[user:password@]host[:port][/db]`,
    /// `rediss://` for TLS is not enabled in this build, `redis+unix:///path`).
    pub fn builder(url: impl Into<String>) -> RedisTokenStoreBuilder {
        RedisTokenStoreBuilder {
            url: url.into(),
            sealing_key: None,
            plaintext: false,
            prefix: DEFAULT_REDIS_KEY_PREFIX.to_owned(),
            timeout: DEFAULT_REDIS_OPERATION_TIMEOUT,
        }
    }
}

impl RedisTokenStoreBuilder {
    /// Seals stored tokens with `key` (ChaCha20-Poly1305). Every process of the fleet needs
    /// the same key; a token sealed with another one is ignored (logged at WARN), never used.
    pub fn sealing_key(mut self, key: SealingKey) -> Self {
        self.sealing_key = Some(key);
        self
    }

    /// Stores tokens in plaintext when `true` and no sealing key is set: anyone who can read
    /// the Redis keys can then use the token. Off by default.
    pub fn plaintext(mut self, plaintext: bool) -> Self {
        self.plaintext = plaintext;
        self
    }

    /// The prefix of every key (default [`DEFAULT_REDIS_KEY_PREFIX`]).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The bound on each Redis operation (default [`DEFAULT_REDIS_OPERATION_TIMEOUT`], valid
    /// from 1 ms to 10 s).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks the settings. Connects lazily, on the first refresh that uses the store, so it
    /// needs no runtime and no reachable Redis.
    ///
    /// # Errors
    /// - [`ErrorKind::InvalidConfig`]: no sealing key and plaintext not chosen; a URL the
    ///   `redis` crate cannot parse (the URL is not repeated: it may hold a password); an
    ///   empty key prefix.
    /// - [`ErrorKind::SettingOutOfRange`]: an operation timeout outside 1 ms to 10 s.
    pub fn build(self) -> Result<RedisTokenStore, Error> {
        let invalid = |what: &str| Error::new(ErrorKind::InvalidConfig(what.to_owned()));
        let sealing = match (self.sealing_key, self.plaintext) {
            (Some(key), _) => Sealing::Key(key),
            (None, true) => Sealing::Plaintext,
            (None, false) => {
                return Err(invalid(
                    "a Redis token store needs a sealing key (RedisTokenStoreBuilder::\
                     sealing_key), or plaintext(true) chosen explicitly",
                ))
            }
        };
        if self.prefix.is_empty() {
            return Err(invalid("the Redis key prefix is empty"));
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&self.timeout) {
            return Err(Error::new(ErrorKind::SettingOutOfRange {
                setting: "operation_timeout",
                valid: "1 ms to 10 s",
            }));
        }
        let client = redis::Client::open(self.url.as_str())
            .map_err(|_| invalid("the Redis URL cannot be parsed"))?;
        Ok(RedisTokenStore {
            inner: Arc::new(Inner {
                client,
                connection: OnceCell::new(),
                sealing,
                prefix: self.prefix,
                timeout: self.timeout,
                outage: Mutex::new(Outage::default()),
                save: Script::new(SAVE),
                unlock: Script::new(UNLOCK),
                remove: Script::new(REMOVE),
            }),
        })
    }
}

impl Inner {
    fn key(&self, key: &StoreKey, what: &str) -> String {
        format!("{}:{{{}}}:{what}", self.prefix, key.as_str())
    }

    /// Runs one operation under the timeout and the outage rules.
    async fn run<T, F>(&self, name: &'static str, operation: F) -> Result<T, BoxError>
    where
        F: AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>,
    {
        if let Some(retry_at) = self.lock_outage().retry_at {
            if Instant::now() < retry_at {
                return Err("Redis token store: waiting before trying Redis again".into());
            }
        }
        let bound = self.timeout.saturating_add(REDIS_CONNECT_TIMEOUT);
        let result = tokio::time::timeout(bound, async {
            let connection = self.connection().await?;
            operation(connection).await
        })
        .await;
        let error: BoxError = match result {
            Ok(Ok(value)) => {
                let mut outage = self.lock_outage();
                if outage.retry_at.take().is_some() {
                    outage.backoff = Duration::ZERO;
                    tracing::info!("Redis token store reachable again");
                }
                return Ok(value);
            }
            Ok(Err(error)) => format!("Redis {name} failed: {:?}", error.kind()).into(),
            Err(_) => format!("Redis {name} timed out after {} ms", bound.as_millis()).into(),
        };
        let mut outage = self.lock_outage();
        outage.backoff = if outage.retry_at.is_none() {
            tracing::warn!(
                error = %error,
                retry_in_ms = MIN_REDIS_RETRY_BACKOFF.as_millis() as u64,
                "Redis token store unavailable: each process requests its own tokens until \
                 it is back"
            );
            MIN_REDIS_RETRY_BACKOFF
        } else {
            (outage.backoff * 2).clamp(MIN_REDIS_RETRY_BACKOFF, MAX_REDIS_RETRY_BACKOFF)
        };
        outage.retry_at = Some(Instant::now() + outage.backoff);
        Err(error)
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        self.connection
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(MAX_REDIS_RETRY_BACKOFF);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
    }

    fn lock_outage(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TokenStore for RedisTokenStore {
    fn load<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, StoreEntry> {
        let inner = &*self.inner;
        Box::pin(async move {
            let token_key = inner.key(key, "token");
            let keys = [inner.key(key, "generation"), token_key.clone()];
            let (generation, token): (Option<u64>, Option<Vec<u8>>) = inner
                .run("MGET", async |mut connection| {
                    redis::cmd("MGET")
                        .arg(&keys)
                        .query_async(&mut connection)
                        .await
                })
                .await?;
            let generation = generation.unwrap_or(0);
            let token = token.and_then(|value| {
                let at = value.iter().position(|&byte| byte == b':')?;
                let (number, sealed) = (&value[..at], &value[at + 1..]);
                if number != generation.to_string().as_bytes() {
                    return None;
                }
                let plain = inner.sealing.open(&token_key, sealed)?;
                Some(TokenPayload::from_bytes(plain))
            });
            Ok(StoreEntry { generation, token })
        })
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a StoreKey,
        lifetime: Duration,
    ) -> StoreFuture<'a, Option<Fence>> {
        let inner = &*self.inner;
        Box::pin(async move {
            let fence = Fence::random();
            let lock_key = inner.key(key, "lock");
            let millis = lifetime.as_millis().max(1) as u64;
            let taken: Option<String> = inner
                .run("SET NX PX", async |mut connection| {
                    redis::cmd("SET")
                        .arg(&lock_key)
                        .arg(fence.as_str())
                        .arg("NX")
                        .arg("PX")
                        .arg(millis)
                        .query_async(&mut connection)
                        .await
                })
                .await?;
            Ok(taken.map(|_| fence))
        })
    }

    fn unlock<'a>(&'a self, key: &'a StoreKey, fence: &'a Fence) -> StoreFuture<'a, ()> {
        let inner = &*self.inner;
        Box::pin(async move {
            let lock_key = inner.key(key, "lock");
            let _: i64 = inner
                .run("unlock script", async |mut connection| {
                    inner
                        .unlock
                        .key(&lock_key)
                        .arg(fence.as_str())
                        .invoke_async(&mut connection)
                        .await
                })
                .await?;
            Ok(())
        })
    }

    fn save<'a>(
        &'a self,
        key: &'a StoreKey,
        expected_generation: u64,
        token: &'a TokenPayload,
        time_to_live: Duration,
        fence: &'a Fence,
    ) -> StoreFuture<'a, Option<u64>> {
        let inner = &*self.inner;
        Box::pin(async move {
            let token_key = inner.key(key, "token");
            let sealed = inner
                .sealing
                .seal(&token_key, token.as_bytes())
                .ok_or("the system random generator failed")?;
            let keys = [
                inner.key(key, "generation"),
                token_key,
                inner.key(key, "lock"),
            ];
            let millis = time_to_live.as_millis().max(1) as u64;
            let saved: u64 = inner
                .run("save script", async |mut connection| {
                    inner
                        .save
                        .key(&keys[0])
                        .key(&keys[1])
                        .key(&keys[2])
                        .arg(expected_generation)
                        .arg(&sealed)
                        .arg(millis)
                        .arg(fence.as_str())
                        .invoke_async(&mut connection)
                        .await
                })
                .await?;
            Ok((saved != 0).then_some(saved))
        })
    }

    fn remove<'a>(&'a self, key: &'a StoreKey, generation: u64) -> StoreFuture<'a, bool> {
        let inner = &*self.inner;
        Box::pin(async move {
            let token_key = inner.key(key, "token");
            let removed: i64 = inner
                .run("remove script", async |mut connection| {
                    inner
                        .remove
                        .key(&token_key)
                        .arg(generation)
                        .invoke_async(&mut connection)
                        .await
                })
                .await?;
            Ok(removed != 0)
        })
    }
}

impl fmt::Debug for RedisTokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sealing = match self.inner.sealing {
            Sealing::Key(_) => "sealed",
            Sealing::Plaintext => "plaintext",
        };
        // The URL is not shown: it may hold a password.
        f.debug_struct("RedisTokenStore")
            .field("prefix", &self.inner.prefix)
            .field("sealing", &sealing)
            .field("operation_timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisTokenStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTokenStoreBuilder")
            .field("sealing_key", &self.sealing_key)
            .field("plaintext", &self.plaintext)
            .field("prefix", &self.prefix)
            .field("operation_timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
