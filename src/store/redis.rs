//! [`RedisTokenStore`]: the token store of a fleet of processes, on Redis through the `redis`
//! crate's tokio connection manager (standalone, Sentinel) or async Cluster connection.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use redis::{PushInfo, PushKind, Script, Value};
use tokio::time::Instant;
use tower::BoxError;

use super::backend::{Backend, Connection, Subscriber, Target};
use super::seal::{Sealing, SealingKey};
use super::{
    Fence, LockAttempt, SaveId, StoreEntry, StoreEvent, StoreFuture, StoreKey, StoreListener,
    TokenPayload, TokenStore,
};
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
/// `<prefix>:{<StoreKey>}:token`, `…:generation` and `…:lock`, and its pub/sub channel is
/// `<prefix>:{<StoreKey>}:events`; the braces are a Redis Cluster hash tag, so all of them
/// live on one slot.
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "nuvy-oauth2";

/// Saves a token if the generation is still the expected one, as
/// `<generation>:<nonce>:<sealed token>` (the save's [`SaveId`] first), announces it, and
/// releases the lock if the fence still holds it. Announcing is best effort (`pcall`): a server
/// without the publish command (`SPUBLISH` before Redis 7) still saves. KEYS: generation,
/// token, lock. ARGV: expected generation, sealed token, time to live (ms), fence, publish
/// command, channel, nonce (32 hex digits). Returns the new generation, or 0 when nothing was
/// saved.
const SAVE: &str = r"
local saved = 0
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current == tonumber(ARGV[1]) then
  saved = current + 1
  redis.call('SET', KEYS[1], saved)
  redis.call('SET', KEYS[2], saved .. ':' .. ARGV[7] .. ':' .. ARGV[2], 'PX', ARGV[3])
  redis.pcall(ARGV[5], ARGV[6], 'saved:' .. saved .. ':' .. ARGV[7])
end
if redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('DEL', KEYS[3])
end
return saved
";

/// Takes the lock unless it is held (`SET NX PX`), else tells how long the holder's lock still
/// lives (`PTTL`), in one round trip. KEYS: lock. ARGV: fence, lifetime (ms). Returns -3 when
/// taken, else the lock's remaining lifetime in ms (-1: no expiry, -2: gone meanwhile; neither
/// happens to a lock set by this crate).
const LOCK: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return -3
end
return redis.call('PTTL', KEYS[1])
";

/// Releases the lock if the fence still holds it. KEYS: lock. ARGV: fence.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Deletes the token if it is still the one of the given save (generation and nonce), and
/// announces it (best effort, as in [`SAVE`]). KEYS: token. ARGV: save id
/// (`<generation>:<nonce>`), publish command, channel.
const REMOVE: &str = r"
local value = redis.call('GET', KEYS[1])
local prefix = ARGV[1] .. ':'
if value and string.sub(value, 1, string.len(prefix)) == prefix then
  redis.call('DEL', KEYS[1])
  redis.pcall(ARGV[2], ARGV[3], 'removed:' .. ARGV[1])
  return 1
end
return 0
";

/// A [`TokenStore`] on Redis (standalone: [`RedisTokenStore::builder`]; a master behind
/// Sentinel: [`RedisTokenStore::sentinel_builder`]; a Cluster:
/// [`RedisTokenStore::cluster_builder`]), shared by every process of a fleet: they make one
/// token request per token lifetime between them. Tokens are sealed with a [`SealingKey`]
/// unless plaintext was chosen explicitly. Cheap to clone; clones share the connections.
///
/// Every Redis operation is bounded by the operation timeout
/// ([`DEFAULT_REDIS_OPERATION_TIMEOUT`]), plus [`REDIS_CONNECT_TIMEOUT`] when it has to
/// connect first. When one fails, the store logs one WARN for the
/// outage and answers nothing for [`MIN_REDIS_RETRY_BACKOFF`] (doubling up to
/// [`MAX_REDIS_RETRY_BACKOFF`]): each process then requests its own tokens, as without a
/// store. The first operation that succeeds again logs an INFO and ends the outage.
///
/// **Announcements.** Each save and each removal after a 401 is published, from inside its
/// script, on the key's channel (`<prefix>:{<StoreKey>}:events`, messages
/// `saved:<generation>:<nonce>` and `removed:<generation>:<nonce>`, the save's [`SaveId`]:
/// never a token). Every store subscribes to the channels of its layers over a dedicated
/// RESP3 connection (Redis 6 or later): a process waiting for another's token request wakes
/// when it is saved, and a process still using a token that another had rejected drops it
/// before its next request spends a 401. Announcements are best effort: a lost one costs a
/// poll (waiters) or a 401 and its replay (rejections), as without them. The subscription is
/// made by the first store operation of a layer (its first refresh), off the request path.
/// When the subscriber connection drops (a Redis restart, a network cut), a small task of the
/// store subscribes again by itself, retrying after 1 s, doubling up to 30 s, until Redis
/// answers, even in a process with no refresh due; it holds the store only weakly and ends
/// with it. The channel of a dropped layer is unsubscribed and forgotten once no layer of
/// its key is left; everything ends with the store.
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
    /// This store's own `Weak`, for the resubscription task (which must not keep it alive).
    me: Weak<Inner>,
    backend: Backend,
    /// Made on first use, inside the runtime that uses it (again after a failure, with
    /// Sentinel: the master may have moved).
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// The subscriptions' own RESP3 connection, made on first use; it calls `listeners` with
    /// every message and resubscribes by itself after a reconnection.
    subscriber: tokio::sync::Mutex<Option<Subscriber>>,
    listeners: Arc<Listeners>,
    /// Channels with listeners, or whose last listener went but are still subscribed, and
    /// where each stands with the subscriber connection.
    channels: Mutex<HashMap<String, Subscription>>,
    /// Held through each subscribing pass ([`Inner::subscribe_pending`]), so that the
    /// `SUBSCRIBE` and `UNSUBSCRIBE` of one channel reach Redis in the order they were asked.
    subscribing: tokio::sync::Mutex<()>,
    /// After a failed subscription: no new attempt before this moment (1 s, doubling up to
    /// 30 s), so a server that cannot subscribe (before Redis 6) costs no round trip per
    /// operation.
    subscribe_backoff: Mutex<Outage>,
    /// Wakes the resubscription task ([`resubscribe_after_disconnections`]) after a
    /// disconnection or when a channel lost its last listener; started with the first
    /// subscriber connection.
    resubscribe: OnceLock<tokio::sync::mpsc::Sender<()>>,
    sealing: Sealing,
    prefix: String,
    timeout: Duration,
    poll_interval: Option<Duration>,
    outage: Mutex<Outage>,
    save: Script,
    lock: Script,
    unlock: Script,
    remove: Script,
}

/// Where one channel stands with the subscriber connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Subscription {
    /// It has listeners and is not (or no longer) known to be subscribed: the next pass
    /// subscribes.
    Pending,
    /// Redis confirmed the subscription.
    Confirmed,
    /// Its last listener went (the caches of its key were dropped): the next pass
    /// unsubscribes and forgets the channel.
    Leaving,
}

/// The listeners of each channel, held weakly: a listener goes with its cache; and whether
/// the subscriber connection was lost since the resubscription task last looked.
#[derive(Default)]
struct Listeners(
    Mutex<HashMap<String, Vec<Weak<dyn StoreListener>>>>,
    AtomicBool,
);

impl Listeners {
    /// The subscriber connection was lost (a `Disconnection` push).
    fn note_disconnected(&self) {
        self.1.store(true, Ordering::Release);
    }

    /// Whether the subscriber connection was lost since the last call.
    fn take_disconnected(&self) -> bool {
        self.1.swap(false, Ordering::AcqRel)
    }

    /// Forgets `listener` (and any listener already gone) on `channel`. Returns whether the
    /// channel has no listener left (and was forgotten).
    fn remove(&self, channel: &str, listener: &Weak<dyn StoreListener>) -> bool {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(list) = map.get_mut(channel) else {
            return true;
        };
        list.retain(|kept| kept.strong_count() > 0 && !Weak::ptr_eq(kept, listener));
        if list.is_empty() {
            map.remove(channel);
            return true;
        }
        false
    }

    fn add(&self, channel: &str, listener: Weak<dyn StoreListener>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.entry(channel.to_owned()).or_default();
        list.retain(|listener| listener.strong_count() > 0);
        list.push(listener);
    }

    /// One push from the subscriber connection: a message on a channel becomes a
    /// [`StoreEvent`] for that channel's live listeners. Anything else is ignored.
    fn dispatch(&self, push: PushInfo) {
        if !matches!(push.kind, PushKind::Message | PushKind::SMessage) {
            return;
        }
        let [Value::BulkString(channel), Value::BulkString(message)] = &push.data[..] else {
            return;
        };
        let (Ok(channel), Some(event)) = (std::str::from_utf8(channel), parse_event(message))
        else {
            return;
        };
        let listeners: Vec<Arc<dyn StoreListener>> = {
            let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(list) = map.get_mut(channel) else {
                return;
            };
            list.retain(|listener| listener.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        for listener in listeners {
            listener.on_event(event);
        }
    }
}

/// `saved:<generation>:<nonce>` or `removed:<generation>:<nonce>`.
fn parse_event(message: &[u8]) -> Option<StoreEvent> {
    let message = std::str::from_utf8(message).ok()?;
    let (kind, saved) = message.split_once(':')?;
    let saved: SaveId = saved.parse().ok()?;
    match kind {
        "saved" => Some(StoreEvent::Saved { saved }),
        "removed" => Some(StoreEvent::Removed { saved }),
        _ => None,
    }
}

/// Splits a stored value, `<generation>:<nonce>:<sealed token>`, into the save's identity and
/// the sealed token.
fn split_stored(value: &[u8]) -> Option<(SaveId, &[u8])> {
    let first = value.iter().position(|&byte| byte == b':')?;
    let second = first + 1 + value[first + 1..].iter().position(|&byte| byte == b':')?;
    let saved = std::str::from_utf8(&value[..second]).ok()?.parse().ok()?;
    Some((saved, &value[second + 1..]))
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
    target: Target,
    sealing_key: Option<SealingKey>,
    plaintext: bool,
    prefix: String,
    timeout: Duration,
    poll_interval: Option<Duration>,
}

impl RedisTokenStore {
    /// Starts a builder for the Redis at `url` (`redis://[user:password@]host[:port][/db]`,
    /// `rediss://` for TLS is not enabled in this build, `redis+unix:///path`).
    pub fn builder(url: impl Into<String>) -> RedisTokenStoreBuilder {
        RedisTokenStoreBuilder::new(Target::Standalone(url.into()))
    }

    /// Starts a builder for the master that Redis Sentinel names `service_name` (the
    /// `sentinel monitor <service_name> …` of the Sentinels' configuration), found through
    /// the Sentinels at `sentinel_urls` (`redis://host:26379`, tried in order). Every
    /// operation goes to the current master: after a failed operation the next one asks the
    /// Sentinels again, so a failover costs at most the outage backoff. The master is reached
    /// without a password on database 0 unless
    /// [`sentinel_master_settings`](RedisTokenStoreBuilder::sentinel_master_settings) says
    /// otherwise.
    pub fn sentinel_builder(
        sentinel_urls: impl IntoIterator<Item = impl Into<String>>,
        service_name: impl Into<String>,
    ) -> RedisTokenStoreBuilder {
        RedisTokenStoreBuilder::new(Target::Sentinel {
            sentinels: sentinel_urls.into_iter().map(Into::into).collect(),
            service: service_name.into(),
            master_settings: None,
        })
    }

    /// Starts a builder for the Redis Cluster that the nodes at `node_urls`
    /// (`redis://[user:password@]host:port`, one or more; the rest is discovered) belong to.
    /// Each configuration's keys share a hash tag, so its scripts run on one shard; its
    /// announcements use sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7 or later).
    pub fn cluster_builder(
        node_urls: impl IntoIterator<Item = impl Into<String>>,
    ) -> RedisTokenStoreBuilder {
        RedisTokenStoreBuilder::new(Target::Cluster(
            node_urls.into_iter().map(Into::into).collect(),
        ))
    }
}

impl RedisTokenStoreBuilder {
    fn new(target: Target) -> Self {
        Self {
            target,
            sealing_key: None,
            plaintext: false,
            prefix: DEFAULT_REDIS_KEY_PREFIX.to_owned(),
            timeout: DEFAULT_REDIS_OPERATION_TIMEOUT,
            poll_interval: None,
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

    /// With [`RedisTokenStore::sentinel_builder`]: the username, password and database to use
    /// on the master, as a URL (`redis://[user:password@]any-host[/db]`; its host is ignored:
    /// the Sentinels name the master). Ignored for the other setups.
    pub fn sentinel_master_settings(mut self, url: impl Into<String>) -> Self {
        if let Target::Sentinel {
            master_settings, ..
        } = &mut self.target
        {
            *master_settings = Some(url.into());
        }
        self
    }

    /// Looks at Redis every `interval` (fixed, from 1 ms to 10 min) while another process of
    /// the fleet requests the token, instead of the default schedule (after 10 ms, doubling up
    /// to 200 ms). Waiters wake as soon as the token is saved (its announcement); polling is
    /// the fallback when an announcement is lost, so a long interval suits a reliable network
    /// and a short one a lossy one. A waiter never sleeps past the holder's lock expiry (its
    /// `PTTL`, read with each look): once a dead holder's lock has expired, the waiter takes
    /// the lock and requests the token itself. Waiting never outlasts the refresh's deadline
    /// (the token request timeout).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval);
        self
    }

    /// Checks the settings. Connects lazily, on the first refresh that uses the store, so it
    /// needs no runtime and no reachable Redis.
    ///
    /// # Errors
    /// - [`ErrorKind::InvalidConfig`]: no sealing key and plaintext not chosen; a URL the
    ///   `redis` crate cannot parse (the URL is not repeated: it may hold a password); no
    ///   Sentinel URL or an empty service name; no Cluster node; an empty key prefix.
    /// - [`ErrorKind::SettingOutOfRange`]: an operation timeout outside 1 ms to 10 s, a poll
    ///   interval outside 1 ms to 10 min.
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
        if let Some(interval) = self.poll_interval {
            if !(Duration::from_millis(1)..=Duration::from_secs(600)).contains(&interval) {
                return Err(Error::new(ErrorKind::SettingOutOfRange {
                    setting: "poll_interval",
                    valid: "1 ms to 10 min",
                }));
            }
        }
        let backend = Backend::new(self.target, self.timeout).map_err(invalid)?;
        Ok(RedisTokenStore {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                backend,
                connection: tokio::sync::Mutex::new(None),
                subscriber: tokio::sync::Mutex::new(None),
                listeners: Arc::default(),
                channels: Mutex::default(),
                subscribing: tokio::sync::Mutex::new(()),
                subscribe_backoff: Mutex::default(),
                resubscribe: OnceLock::new(),
                sealing,
                prefix: self.prefix,
                timeout: self.timeout,
                poll_interval: self.poll_interval,
                outage: Mutex::new(Outage::default()),
                save: Script::new(SAVE),
                lock: Script::new(LOCK),
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

    fn channel(&self, key: &StoreKey) -> String {
        self.key(key, "events")
    }

    /// The command that announces an event: `PUBLISH`, `SPUBLISH` on a Cluster.
    fn publish_command(&self) -> &'static str {
        self.backend.publish_command()
    }

    /// Subscribes the subscriber connection to the channels that have listeners and no
    /// confirmed subscription yet, and unsubscribes it from those whose last listener went
    /// (`UNSUBSCRIBE`, `SUNSUBSCRIBE` on a Cluster), forgetting them. Failures are left for the
    /// next operation, or the resubscription task, to retry: the caches poll meanwhile.
    /// Returns `None` when no channel is left to do, else when to try again (the
    /// subscription backoff: 1 s, doubling up to 30 s).
    async fn subscribe_pending(&self) -> Option<Instant> {
        let _pass = self.subscribing.lock().await;
        let (pending, leaving): (Vec<String>, Vec<String>) = {
            let channels = self.lock_channels();
            let with = |wanted: Subscription| {
                channels
                    .iter()
                    .filter(|(_, state)| **state == wanted)
                    .map(|(channel, _)| channel.clone())
                    .collect()
            };
            (with(Subscription::Pending), with(Subscription::Leaving))
        };
        if pending.is_empty() && leaving.is_empty() {
            return None;
        }
        if let Some(retry_at) = self.lock_subscribe_backoff().retry_at {
            if Instant::now() < retry_at {
                return Some(retry_at);
            }
        }
        let subscribed =
            tokio::time::timeout(self.timeout.saturating_add(REDIS_CONNECT_TIMEOUT), async {
                let mut subscriber = self.subscriber().await?;
                for channel in &leaving {
                    subscriber.unsubscribe(channel).await?;
                }
                for channel in &pending {
                    subscriber.subscribe(channel).await?;
                }
                Ok::<(), redis::RedisError>(())
            })
            .await;
        match subscribed {
            Ok(Ok(())) => {
                *self.lock_subscribe_backoff() = Outage::default();
                let mut channels = self.lock_channels();
                // Only where nothing changed meanwhile: a channel that lost its last listener
                // during the pass is still to be left, one that got a new one still kept.
                for channel in pending {
                    if let Some(state @ Subscription::Pending) = channels.get_mut(&channel) {
                        *state = Subscription::Confirmed;
                    }
                }
                for channel in leaving {
                    if channels.get(&channel) == Some(&Subscription::Leaving) {
                        channels.remove(&channel);
                    }
                }
                return None;
            }
            Ok(Err(error)) => tracing::debug!(
                error = ?error.kind(),
                "Redis token store: subscribing to announcements failed; polling meanwhile"
            ),
            Err(_) => tracing::debug!(
                "Redis token store: subscribing to announcements timed out; polling meanwhile"
            ),
        }
        let mut backoff = self.lock_subscribe_backoff();
        backoff.backoff =
            (backoff.backoff * 2).clamp(MIN_REDIS_RETRY_BACKOFF, MAX_REDIS_RETRY_BACKOFF);
        let retry_at = Instant::now() + backoff.backoff;
        backoff.retry_at = Some(retry_at);
        Some(retry_at)
    }

    /// After the subscriber connection was lost or replaced: every confirmed channel is to
    /// be subscribed again.
    fn mark_unconfirmed(&self) {
        for state in self.lock_channels().values_mut() {
            if *state == Subscription::Confirmed {
                *state = Subscription::Pending;
            }
        }
    }

    fn lock_subscribe_backoff(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.subscribe_backoff
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn subscriber(&self) -> redis::RedisResult<Subscriber> {
        let mut slot = self.subscriber.lock().await;
        if let Some(subscriber) = &*slot {
            return Ok(subscriber.clone());
        }
        let resubscribe = self.resubscribe_sender();
        let listeners = Arc::clone(&self.listeners);
        let handler = Arc::new(move |push: PushInfo| {
            if push.kind == PushKind::Disconnection {
                listeners.note_disconnected();
                let _ = resubscribe.try_send(());
            } else {
                listeners.dispatch(push);
            }
        });
        let subscriber = self.backend.subscriber(self.timeout, handler).await?;
        *slot = Some(subscriber.clone());
        Ok(subscriber)
    }

    /// Wakes the resubscription task, started on first use (inside the runtime of the
    /// first subscription).
    fn resubscribe_sender(&self) -> tokio::sync::mpsc::Sender<()> {
        self.resubscribe
            .get_or_init(|| {
                // Capacity 1: a wake-up already pending covers any later disconnection.
                let (wake, woken) = tokio::sync::mpsc::channel(1);
                tokio::spawn(resubscribe_after_disconnections(self.me.clone(), woken));
                wake
            })
            .clone()
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscription>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one operation under the timeout and the outage rules.
    async fn run<T, F>(&self, name: &'static str, operation: F) -> Result<T, BoxError>
    where
        F: AsyncFnOnce(Connection) -> redis::RedisResult<T>,
    {
        if let Some(retry_at) = self.lock_outage().retry_at {
            if Instant::now() < retry_at {
                return Err("Redis token store: waiting before trying Redis again".into());
            }
        }
        let _ = self.subscribe_pending().await;
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
                    drop(outage);
                    // Subscribe again at the next operation, which also makes the subscriber
                    // connection reconnect if the outage broke it.
                    self.mark_unconfirmed();
                    *self.lock_subscribe_backoff() = Outage::default();
                    tracing::info!("Redis token store reachable again");
                }
                return Ok(value);
            }
            Ok(Err(error)) => format!("Redis {name} failed: {:?}", error.kind()).into(),
            Err(_) => format!("Redis {name} timed out after {} ms", bound.as_millis()).into(),
        };
        self.forget_connections().await;
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

    async fn connection(&self) -> redis::RedisResult<Connection> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = &*slot {
            return Ok(connection.clone());
        }
        let connection = self.backend.connect(self.timeout).await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// After a failed operation with Sentinel: the next one asks the Sentinels for the master
    /// again, and subscribes there again.
    async fn forget_connections(&self) {
        if self.backend.rediscovers() {
            *self.connection.lock().await = None;
            *self.subscriber.lock().await = None;
            self.mark_unconfirmed();
        }
    }

    fn lock_outage(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The resubscription task of one store: after each disconnection of the subscriber
/// connection (a Redis restart, a network cut), marks every channel unconfirmed and subscribes
/// again (and, when woken by [`TokenStore::unsubscribe`], unsubscribes the channels whose
/// last listener went), retrying with the subscription backoff (1 s, doubling up to 30 s)
/// until Redis confirms, so that a process with no refresh due (no store operation for most
/// of a token lifetime) hears announcements again without waiting for one. The connection
/// manager's own reconnection tries only briefly (one retry: a long one would keep its
/// connection alive after the store is gone); this task takes over from there. It holds the
/// store only weakly, and only while subscribing: it ends when the store is gone (the `Weak`
/// no longer upgrades) or when every sender of `woken` (the store and its subscriber
/// connections) is gone, and never keeps a runtime, a connection or the store alive.
async fn resubscribe_after_disconnections(
    store: Weak<Inner>,
    mut woken: tokio::sync::mpsc::Receiver<()>,
) {
    while woken.recv().await.is_some() {
        let Some(inner) = store.upgrade() else {
            return;
        };
        if inner.listeners.take_disconnected() {
            inner.mark_unconfirmed();
        }
        drop(inner);
        loop {
            let Some(inner) = store.upgrade() else {
                return;
            };
            let retry_at = inner.subscribe_pending().await;
            drop(inner);
            match retry_at {
                None => break,
                Some(retry_at) => tokio::time::sleep_until(retry_at).await,
            }
        }
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
                let (saved, sealed) = split_stored(&value)?;
                if saved.generation != generation {
                    return None;
                }
                let plain = inner.sealing.open(&token_key, sealed)?;
                Some((saved, TokenPayload::from_bytes(plain)))
            });
            Ok(StoreEntry { generation, token })
        })
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a StoreKey,
        lifetime: Duration,
    ) -> StoreFuture<'a, LockAttempt> {
        let inner = &*self.inner;
        Box::pin(async move {
            let fence = Fence::random();
            let lock_key = inner.key(key, "lock");
            let millis = lifetime.as_millis().max(1) as u64;
            let answer: i64 = inner
                .run("lock script", async |mut connection| {
                    inner
                        .lock
                        .key(&lock_key)
                        .arg(fence.as_str())
                        .arg(millis)
                        .invoke_async(&mut connection)
                        .await
                })
                .await?;
            Ok(match answer {
                -3 => LockAttempt::Taken(fence),
                // Gone between the two commands cannot happen inside a script; treat it as
                // expiring now, so the waiter looks again at once.
                -2 => LockAttempt::Held {
                    expires_in: Some(Duration::ZERO),
                },
                millis if millis >= 0 => LockAttempt::Held {
                    expires_in: Some(Duration::from_millis(millis as u64)),
                },
                _ => LockAttempt::Held { expires_in: None },
            })
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
    ) -> StoreFuture<'a, Option<SaveId>> {
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
            let channel = inner.channel(key);
            let nonce = SaveId::random_nonce();
            let nonce_hex = format!("{nonce:032x}");
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
                        .arg(inner.publish_command())
                        .arg(&channel)
                        .arg(&nonce_hex)
                        .invoke_async(&mut connection)
                        .await
                })
                .await?;
            Ok((saved != 0).then_some(SaveId {
                generation: saved,
                nonce,
            }))
        })
    }

    fn remove<'a>(&'a self, key: &'a StoreKey, saved: SaveId) -> StoreFuture<'a, bool> {
        let inner = &*self.inner;
        Box::pin(async move {
            let token_key = inner.key(key, "token");
            let channel = inner.channel(key);
            let removed: i64 = inner
                .run("remove script", async |mut connection| {
                    inner
                        .remove
                        .key(&token_key)
                        .arg(saved.to_string())
                        .arg(inner.publish_command())
                        .arg(&channel)
                        .invoke_async(&mut connection)
                        .await
                })
                .await?;
            Ok(removed != 0)
        })
    }

    /// Registers `listener` for the key's channel; the subscription itself is made by the
    /// next operation of this store (inside a runtime).
    fn subscribe(&self, key: &StoreKey, listener: Weak<dyn StoreListener>) {
        let channel = self.inner.channel(key);
        self.inner.listeners.add(&channel, listener);
        let mut channels = self.inner.lock_channels();
        let state = channels.entry(channel).or_insert(Subscription::Pending);
        if *state == Subscription::Leaving {
            // Subscribed again after the pending UNSUBSCRIBE (passes run in order).
            *state = Subscription::Pending;
        }
    }

    /// Forgets `listener`; when the key's channel has no listener left, the store forgets
    /// the channel too, and its resubscription task (or else its next operation) sends the
    /// `UNSUBSCRIBE`.
    fn unsubscribe(&self, key: &StoreKey, listener: &Weak<dyn StoreListener>) {
        let channel = self.inner.channel(key);
        if !self.inner.listeners.remove(&channel, listener) {
            return;
        }
        let mut channels = self.inner.lock_channels();
        match channels.get(&channel) {
            Some(Subscription::Confirmed) => {
                channels.insert(channel, Subscription::Leaving);
                drop(channels);
                if let Some(wake) = self.inner.resubscribe.get() {
                    let _ = wake.try_send(());
                }
            }
            // No subscriber connection was ever made: nothing to undo in Redis.
            Some(Subscription::Pending) if self.inner.resubscribe.get().is_none() => {
                channels.remove(&channel);
            }
            // Perhaps subscribed before a reconnection (the connection replays its
            // subscriptions): unsubscribed at the next pass, which costs nothing if not.
            Some(Subscription::Pending) => {
                channels.insert(channel, Subscription::Leaving);
            }
            Some(Subscription::Leaving) | None => {}
        }
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.inner.poll_interval
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
            .field("poll_interval", &self.inner.poll_interval)
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
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}
