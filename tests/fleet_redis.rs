//! A fleet sharing a real `redis-server` (feature `redis`; `.ci/run` installs the Debian
//! package). Each test starts its own server on a free loopback port, without persistence,
//! and stops it when done.
#![cfg(feature = "redis")]

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::store::{RedisTokenStore, SealingKey};
use nuvy_oauth2::OAuth2Layer;
use tokio::task::JoinSet;

/// A `redis-server` of this test's own, stopped on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl RedisServer {
    fn start() -> Self {
        Self::start_with(free_port(), &[])
    }

    /// A server on `port` with `extra` arguments (a configuration file first, if any).
    fn start_with(port: u16, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(extra)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        let server = Self {
            child: Some(child),
            port,
        };
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start listening on port {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sealing_key() -> SealingKey {
    SealingKey::from_bytes(&[42; 32]).unwrap()
}

/// A store with a generous operation timeout: two cores shared with other builds, a debug
/// build and thousands of tasks can hold a Redis reply back for longer than the default
/// (which would count as an outage; the outage test shows that path).
fn store(redis: &RedisServer) -> RedisTokenStore {
    RedisTokenStore::builder(redis.url())
        .sealing_key(sealing_key())
        .operation_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// `count` layers built independently, each with its own connection to Redis, as `count`
/// processes would be.
fn fleet(server: &NuvyServer, redis: &RedisServer, count: usize) -> Vec<OAuth2Layer> {
    (0..count)
        .map(|_| layer(server).with_token_store(store(redis)))
        .collect()
}

fn requests_sent(layers: &[OAuth2Layer]) -> u64 {
    layers
        .iter()
        .map(|layer| layer.token_cache().token_requests())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_layers_sharing_redis_with_a_hundred_cold_calls_each_make_one_token_request() {
    let redis = RedisServer::start();
    let server = server(Duration::from_secs(3600)).await;
    server.delay_next_token_requests(1, Duration::from_millis(100));
    let layers = fleet(&server, &redis, 50);
    ping_all_at_once(&server, &layers, 100).await;
    assert_eq!(server.token_requests(), 1);
    assert_eq!(requests_sent(&layers), 1);
}

/// Calls on every layer every 20 ms for `duration` (real time); every call must succeed.
async fn steady_traffic(server: &NuvyServer, layers: &[OAuth2Layer], duration: Duration) {
    let end = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        ping_all_at_once(server, layers, 1).await;
    }
}

/// Over a span of three token lifetimes, a fleet of ten layers sharing Redis requests exactly as
/// many tokens as one process alone: three.
///
/// Why three, and "one per token lifetime": a token's useful lifetime is its refresh interval.
/// A process refreshes it ahead of expiry, at [`REFRESH_AHEAD_PERCENT`] ±
/// [`REFRESH_AHEAD_JITTER_PERCENT`] of its `expires_in` (70-80 %, drawn per process and per
/// token), so one process requests tokens at t0 = 0 and then every 0.7-0.8 `expires_in`: after k
/// refreshes, between 0.7·k and 0.8·k lifetimes. (Over three nominal `expires_in` that is four
/// or five requests, which is what the fleet made too: no duplicate, just refresh-ahead.) The
/// third token is requested by 1.6 `expires_in` at the latest, the fourth not before 2.1: a
/// span in between (here their midpoint, 1.85 `expires_in`, padded by half a second either
/// side for scheduling) holds exactly three tokens whatever the jitter. The fleet refreshes when
/// its first member's refresh-ahead comes (the others then find the new token in Redis, which
/// is taken while under 70 % used), so it requests on the same schedule: exactly three tokens
/// as well; a duplicate request between members would make it four or more.
///
/// [`REFRESH_AHEAD_PERCENT`]: nuvy_oauth2::REFRESH_AHEAD_PERCENT
/// [`REFRESH_AHEAD_JITTER_PERCENT`]: nuvy_oauth2::REFRESH_AHEAD_JITTER_PERCENT
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_three_refresh_intervals_a_fleet_on_redis_requests_three_tokens_as_one_process_does() {
    use nuvy_oauth2::{REFRESH_AHEAD_JITTER_PERCENT, REFRESH_AHEAD_PERCENT};
    // Real time: Redis expires keys on its own clock. Three-second tokens.
    let lifetime = Duration::from_secs(3);
    let earliest = f64::from(REFRESH_AHEAD_PERCENT - REFRESH_AHEAD_JITTER_PERCENT) / 100.0;
    let latest = f64::from(REFRESH_AHEAD_PERCENT + REFRESH_AHEAD_JITTER_PERCENT) / 100.0;
    let third_token_by = lifetime.mul_f64(2.0 * latest);
    let fourth_token_not_before = lifetime.mul_f64(3.0 * earliest);
    let span = (third_token_by + fourth_token_not_before) / 2;
    assert!(third_token_by + Duration::from_millis(500) < span);
    assert!(span + Duration::from_millis(500) < fourth_token_not_before);

    let redis = RedisServer::start();
    let server = server(lifetime).await;
    let layers = fleet(&server, &redis, 10);
    let alone = layer(&server);
    let mut everyone = layers.clone();
    everyone.push(alone.clone());
    // When the fleet's requests were sent (as seen by the traffic, to the tick), for the
    // message of a failure.
    let started = tokio::time::Instant::now();
    let mut seen = Vec::new();
    let end = started + span;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        ping_all_at_once(&server, &everyone, 1).await;
        let sent = requests_sent(&layers);
        if seen.last().is_none_or(|&(_, last)| last < sent) {
            seen.push((started.elapsed().as_millis(), sent));
        }
    }
    assert_eq!(
        alone.token_cache().token_requests(),
        3,
        "one process alone, over {span:?}"
    );
    assert_eq!(
        requests_sent(&layers),
        3,
        "the fleet of ten, over {span:?}: (ms, requests so far) {seen:?}"
    );
    assert_eq!(server.token_requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_in_the_middle_of_steady_traffic_fails_no_request() {
    let lifetime = Duration::from_secs(2);
    let mut redis = RedisServer::start();
    let server = server(lifetime).await;
    let layers = fleet(&server, &redis, 5);
    steady_traffic(&server, &layers, Duration::from_millis(1000)).await;
    assert_eq!(server.token_requests(), 1, "shared while Redis is up");
    redis.kill();
    // Every layer now requests its own tokens; no call fails.
    steady_traffic(&server, &layers, Duration::from_millis(3500)).await;
    assert!(server.token_requests() > 1);
    assert_eq!(requests_sent(&layers), server.token_requests());
}

#[tokio::test]
async fn tokens_at_rest_are_sealed_and_another_key_never_uses_them() {
    let redis = RedisServer::start();
    let server = server(Duration::from_secs(3600)).await;
    let first = layer(&server).with_token_store(store(&redis));
    ping_ok(&server, &first).await;
    let token = first.token_cache().access_token().unwrap();

    // What Redis holds: no access token in it.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("nuvy-oauth2:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        2,
        "generation and token (lock released): {keys:?}"
    );
    assert!(keys
        .iter()
        .all(|key| key.contains(":{") && key.contains("}:")));
    for key in &keys {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let secret = token.expose_secret().as_bytes();
        assert!(!value.windows(secret.len()).any(|window| window == secret));
        assert!(!value.windows(9).any(|window| window == b"client_id"));
    }

    // A process with another key cannot open it: it requests its own token.
    let other_key = RedisTokenStore::builder(redis.url())
        .sealing_key(SealingKey::from_bytes(&[7; 32]).unwrap())
        .build()
        .unwrap();
    let second = layer(&server).with_token_store(other_key);
    ping_ok(&server, &second).await;
    assert_eq!(second.token_cache().token_requests(), 1);
    assert_eq!(server.token_requests(), 2);
}

#[test]
fn a_redis_store_without_a_key_is_refused_unless_plaintext_is_chosen() {
    let error = RedisTokenStore::builder("redis://127.0.0.1:1/")
        .build()
        .unwrap_err();
    assert!(
        matches!(error.kind(), nuvy_oauth2::ErrorKind::InvalidConfig(what) if what.contains("sealing key"))
    );
    assert!(RedisTokenStore::builder("redis://127.0.0.1:1/")
        .plaintext(true)
        .build()
        .is_ok());
    let error = RedisTokenStore::builder("redis://:hunter2@127.0.0.1:1/not-a-db")
        .sealing_key(sealing_key())
        .build()
        .unwrap_err();
    assert!(!error.to_string().contains("hunter2"));
}

#[tokio::test]
async fn a_401_removes_the_rejected_token_for_the_whole_fleet() {
    let redis = RedisServer::start();
    let server = server(Duration::from_secs(3600)).await;
    let layers = fleet(&server, &redis, 3);
    for layer in &layers {
        ping_ok(&server, layer).await;
    }
    assert_eq!(server.token_requests(), 1);
    server.revoke_all_tokens();
    for layer in &layers {
        ping_ok(&server, layer).await;
    }
    assert_eq!(server.token_requests(), 2, "one new token for the fleet");
}

/// A connection of the test's own to `redis`, for looking at what the stores did.
async fn inspect(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Subscribers of the stores' announcement channels (`nuvy-oauth2:{<key>}:events`), summed.
async fn subscribers(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("nuvy-oauth2:*")
        .query_async(connection)
        .await
        .unwrap();
    if channels.is_empty() {
        return 0;
    }
    let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channels)
        .query_async(connection)
        .await
        .unwrap();
    counts.iter().map(|(_, count)| count).sum()
}

/// Waits (bounded: 10 s of real time, looking every 10 ms) until `condition` holds.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut condition: F) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(tokio::time::Instant::now() < give_up, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many times Redis ran `command` (lowercase), from `INFO commandstats`.
async fn command_calls(connection: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// Calls the embedded API through `layer` and asserts a 200.
async fn ping_ok(server: &NuvyServer, layer: &OAuth2Layer) {
    let status = status_of(api(layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// Two layers on stores of `redis`, each past its first call, both stores subscribed to the
/// announcements.
async fn two_subscribed_layers(
    server: &NuvyServer,
    redis: &RedisServer,
    inspector: &mut redis::aio::MultiplexedConnection,
) -> (OAuth2Layer, OAuth2Layer) {
    let a = layer(server).with_token_store(store(redis));
    let b = layer(server).with_token_store(store(redis));
    ping_ok(server, &a).await;
    ping_ok(server, &b).await;
    eventually("both stores subscribed", async || {
        subscribers(inspector).await == 2
    })
    .await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_announced_through_redis_spares_the_other_processes_their_own_401() {
    let redis = RedisServer::start();
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    let a = layer(&server).with_token_store(store(&redis));
    let b = layer(&server).with_token_store(store(&redis));
    for layer in [&a, &b] {
        ping_ok(&server, layer).await;
    }
    assert_eq!(server.token_requests(), 1, "both hold the one token");
    // Each store subscribed with its first operation.
    eventually("both stores subscribed", async || {
        subscribers(&mut inspector).await == 2
    })
    .await;

    server.revoke_all_tokens();
    let status = status_of(api(&a), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "A's 401 was replayed with a new token"
    );
    assert_eq!(server.api_unauthorized(), 1);
    assert_eq!(server.token_requests(), 2);

    // A's removal was announced: B drops the rejected token without having used it.
    eventually("B dropped the token A had rejected", async || {
        b.token_cache().current_generation() == 0
    })
    .await;
    ping_ok(&server, &b).await;
    assert_eq!(
        server.api_unauthorized(),
        1,
        "B never sent the rejected token"
    );
    assert_eq!(b.token_cache().unauthorized_retries(), 0);
    assert_eq!(
        server.token_requests(),
        2,
        "B took A's new token from Redis"
    );
    assert_eq!(b.token_cache().token_requests(), 0);

    // The subscriptions go with the layers: no connection or task outlives them.
    drop((a, b));
    eventually("the subscriptions ended with the layers", async || {
        subscribers(&mut inspector).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_the_stores_subscribe_again_and_announcements_work_again() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    let (a, b) = two_subscribed_layers(&server, &redis, &mut inspector).await;

    // A restart (no persistence: an empty Redis), then refreshes on both layers until both
    // stores have subscribed again. No call fails meanwhile.
    redis.kill();
    let redis = RedisServer::start_with(port, &[]);
    let mut inspector = inspect(&redis).await;
    eventually("both stores subscribed again", async || {
        for layer in [&a, &b] {
            layer
                .token_cache()
                .invalidate(layer.token_cache().current_generation());
            ping_ok(&server, layer).await;
        }
        subscribers(&mut inspector).await == 2
    })
    .await;
    // Both hold the same stored token again (taken or saved once Redis answered).
    eventually("A and B share a token again", async || {
        for layer in [&a, &b] {
            layer
                .token_cache()
                .invalidate(layer.token_cache().current_generation());
            ping_ok(&server, layer).await;
        }
        a.token_cache().access_token() == b.token_cache().access_token()
    })
    .await;

    server.revoke_all_tokens();
    let unauthorized = server.api_unauthorized();
    ping_ok(&server, &a).await;
    assert_eq!(server.api_unauthorized(), unauthorized + 1);
    eventually("B dropped the token A had rejected", async || {
        b.token_cache().current_generation() == 0
    })
    .await;
    ping_ok(&server, &b).await;
    assert_eq!(server.api_unauthorized(), unauthorized + 1, "B met no 401");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_waiting_for_the_fleet_token_wakes_when_it_is_saved_not_at_its_next_poll() {
    let redis = RedisServer::start();
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    server.delay_next_token_requests(1, Duration::from_secs(2));
    // Polling alone would look again only after ten minutes, far past the refresh's deadline
    // (the 10 s token request timeout): only the announcement of the save can wake B in time.
    let store = || {
        RedisTokenStore::builder(redis.url())
            .sealing_key(sealing_key())
            .operation_timeout(Duration::from_secs(2))
            .poll_interval(Duration::from_secs(600))
            .build()
            .unwrap()
    };
    let a = layer(&server).with_token_store(store());
    let b = layer(&server).with_token_store(store());
    let holder = tokio::spawn(status_of(api(&a), get(&server.api_url("/v1/ping"))));
    // A holds the fleet's lock and waits for its (slow) token response.
    eventually("A took the lock", async || {
        let locks: Vec<String> = redis::cmd("KEYS")
            .arg("nuvy-oauth2:*:lock")
            .query_async(&mut inspector)
            .await
            .unwrap();
        !locks.is_empty()
    })
    .await;
    assert_eq!(server.token_requests_in_flight(), 1);
    ping_ok(&server, &b).await;
    assert_eq!(holder.await.unwrap().unwrap(), StatusCode::OK);
    assert_eq!(server.token_requests(), 1);
    assert_eq!(b.token_cache().token_requests(), 0, "B took A's token");
    // Looks at the store: A's before taking the lock and under it, B's before waiting and
    // once woken. No poll.
    assert_eq!(command_calls(&mut inspector, "mget").await, 4);
}

/// Sets the fleet's lock of `config` as a process that took it and died would leave it: it
/// expires by itself after `millis`.
async fn lock_of_a_dead_process(
    inspector: &mut redis::aio::MultiplexedConnection,
    config: &nuvy_oauth2::OAuth2Config,
    millis: u64,
) {
    let key = nuvy_oauth2::store::StoreKey::for_config(config);
    let _: () = redis::cmd("SET")
        .arg(format!("nuvy-oauth2:{{{}}}:lock", key.as_str()))
        .arg("fence-of-a-dead-process")
        .arg("PX")
        .arg(millis)
        .query_async(inspector)
        .await
        .unwrap();
}

/// A dead process's lock of 200 ms on the fleet's token, then one API call through a layer
/// on `store` (whose token request timeout is 2 s): the waiter tries itself once the lock
/// expired, and succeeds with one token request.
async fn one_call_after_a_dead_holders_lock(store: impl FnOnce(&RedisServer) -> RedisTokenStore) {
    let redis = RedisServer::start();
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    let config = config_builder(&server)
        .token_request_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    lock_of_a_dead_process(&mut inspector, &config, 200).await;
    let layer = OAuth2Layer::new(config)
        .unwrap()
        .with_token_store(store(&redis));
    let status = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .map_err(|error| error.to_string());
    assert_eq!(status, Ok(StatusCode::OK));
    assert_eq!(server.token_requests(), 1);
}

/// A waiter never sleeps past the holder's lock expiry, whatever its poll interval: ten
/// minutes here, against a 2 s token request timeout and a dead holder's lock of 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_with_a_long_poll_interval_tries_itself_once_a_dead_holders_lock_expired() {
    one_call_after_a_dead_holders_lock(|redis| {
        RedisTokenStore::builder(redis.url())
            .sealing_key(sealing_key())
            .operation_timeout(Duration::from_secs(1))
            .poll_interval(Duration::from_secs(600))
            .build()
            .unwrap()
    })
    .await;
}

/// The same with the default schedule (10 ms doubling to 200 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_schedule_a_waiter_tries_itself_once_a_dead_holders_lock_expired() {
    one_call_after_a_dead_holders_lock(store).await;
}

/// Generation numbers start again at 1 when Redis loses its data (a restart without
/// persistence, a failover to a replica that missed the last writes, eviction): a 401 for an
/// old token then must neither remove nor make anyone drop a newer token that got the same
/// number. Each save's random nonce tells them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_for_an_old_token_never_removes_a_newer_token_of_the_same_number() {
    let redis = RedisServer::start();
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    let b = layer(&server).with_token_store(store(&redis));
    ping_ok(&server, &b).await;
    let old = b.token_cache().access_token().unwrap();
    // Redis loses its data (FLUSHALL here; the same after a restart without persistence).
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut inspector)
        .await
        .unwrap();
    // A starts: requests a new token and saves it, as generation 1 again.
    let a = layer(&server).with_token_store(store(&redis));
    ping_ok(&server, &a).await;
    assert_eq!(server.token_requests(), 2);
    eventually("both stores subscribed", async || {
        subscribers(&mut inspector).await == 2
    })
    .await;
    let newer = a.token_cache().access_token().unwrap();
    // Only B's old token is revoked; A's newer token stays valid.
    assert!(server.revoke_token(old.expose_secret()));
    let status = status_of(api(&b), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "B's 401 was replayed");
    assert_eq!(
        server.token_requests(),
        2,
        "B takes A's valid token from the store instead of requesting a third"
    );
    assert_eq!(
        b.token_cache()
            .access_token()
            .map(|token| token.expose_secret().to_owned()),
        Some(newer.expose_secret().to_owned())
    );
    // Nothing was removed, so nothing was announced (the remove script publishes only what
    // it deletes): A's token is still in Redis, and only the two saves were published.
    let tokens: Vec<String> = redis::cmd("KEYS")
        .arg("nuvy-oauth2:*:token")
        .query_async(&mut inspector)
        .await
        .unwrap();
    assert_eq!(tokens.len(), 1, "A's token is still stored");
    assert_eq!(
        command_calls(&mut inspector, "publish").await,
        2,
        "the two saves"
    );
    assert!(
        a.token_cache()
            .access_token()
            .is_some_and(|token| token.expose_secret() == newer.expose_secret()),
        "A keeps its valid token: nobody rejected it"
    );
}

/// A process whose token is fresh makes no store operation for most of a token lifetime: its
/// store subscribes again by itself after a Redis restart longer than the connection
/// manager's own reconnection attempt (one second here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_process_hears_announcements_again_after_a_redis_restart() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    let (a, b) = two_subscribed_layers(&server, &redis, &mut inspector).await;

    redis.kill();
    // Real time: the restart must outlast the connection manager's reconnection attempt.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let redis = RedisServer::start_with(port, &[]);
    let mut inspector = inspect(&redis).await;
    // Only B refreshes (A's token is fresh: A has no reason to touch the store).
    eventually("B subscribed again", async || {
        b.token_cache()
            .invalidate(b.token_cache().current_generation());
        ping_ok(&server, &b).await;
        subscribers(&mut inspector).await >= 1
    })
    .await;
    eventually("A subscribed again by itself", async || {
        subscribers(&mut inspector).await == 2
    })
    .await;
    assert_eq!(a.token_cache().token_requests(), 1, "A made no refresh");
}

/// Once the layers and every clone of the store are gone, the store's two connections
/// (commands, subscriptions) are closed: neither they nor the resubscription task outlive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_store_closes_its_connections() {
    let redis = RedisServer::start();
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    let shared = store(&redis);
    let a = layer(&server).with_token_store(shared.clone());
    ping_ok(&server, &a).await;
    let clients = async |inspector: &mut redis::aio::MultiplexedConnection| -> usize {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(inspector)
            .await
            .unwrap();
        list.lines().count()
    };
    assert_eq!(
        clients(&mut inspector).await,
        3,
        "the inspector and the store's two"
    );
    drop((a, shared));
    eventually("the store's connections closed", async || {
        clients(&mut inspector).await == 1
    })
    .await;
}

/// Layers made and dropped over time (one per tenant or audience) with one shared store: the
/// store forgets each dropped layer's channel and unsubscribes from it in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_store_forgets_the_channels_of_dropped_layers() {
    let redis = RedisServer::start();
    let mut inspector = inspect(&redis).await;
    let server = server(Duration::from_secs(3600)).await;
    let shared = store(&redis);
    let kept = layer(&server).with_token_store(shared.clone());
    let channels = async |inspector: &mut redis::aio::MultiplexedConnection| -> Vec<String> {
        redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("nuvy-oauth2:*")
            .query_async(inspector)
            .await
            .unwrap()
    };
    ping_ok(&server, &kept).await;
    for round in 0..20 {
        let config = config_builder(&server)
            .audience(format!("tenant-{round}"))
            .build()
            .unwrap();
        let gone = OAuth2Layer::new(config)
            .unwrap()
            .with_token_store(shared.clone());
        // Half of them refresh (and subscribe) before they go, half never do.
        if round % 2 == 0 {
            ping_ok(&server, &gone).await;
            assert_eq!(channels(&mut inspector).await.len(), 2);
        }
        drop(gone);
        kept.token_cache()
            .invalidate(kept.token_cache().current_generation());
        ping_ok(&server, &kept).await;
    }
    let kept_channel = format!(
        "nuvy-oauth2:{{{}}}:events",
        nuvy_oauth2::store::StoreKey::for_config(&config_builder(&server).build().unwrap())
            .as_str()
    );
    eventually(
        "only the live layer's channel stays subscribed",
        async || channels(&mut inspector).await == [kept_channel.clone()],
    )
    .await;
    assert_eq!(subscribers(&mut inspector).await, 1);
}

/// A scratch directory for server files, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "nuvy-oauth2-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `redis-cli` with `args`; its standard output.
fn redis_cli(args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli on PATH (it comes with redis-server)");
    assert!(output.status.success(), "redis-cli {args:?} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits (bounded, real time) until `redis-cli args` prints something containing `expected`.
fn wait_for_cli(args: &[&str], expected: &str) {
    for _ in 0..1000 {
        if redis_cli(args).contains(expected) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-cli {args:?} never printed {expected:?}");
}

/// Ten layers with twenty concurrent cold calls each, on stores made by `store`: one token
/// request between them. Then the token is revoked: the first layer's 401 is announced, and
/// the nine others drop the token without a 401 of their own.
async fn ten_layers_cold_then_one_401(server: &NuvyServer, store: impl Fn() -> RedisTokenStore) {
    server.delay_next_token_requests(1, Duration::from_millis(100));
    let layers: Vec<_> = (0..10)
        .map(|_| layer(server).with_token_store(store()))
        .collect();
    ping_all_at_once(server, &layers, 20).await;
    assert_eq!(server.token_requests(), 1);
    assert_eq!(requests_sent(&layers), 1);

    server.revoke_all_tokens();
    let status = status_of(api(&layers[0]), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    for (index, layer) in layers.iter().enumerate().skip(1) {
        eventually(
            &format!("layer {index} dropped the rejected token"),
            async || layer.token_cache().current_generation() == 0,
        )
        .await;
        ping_ok(server, layer).await;
    }
    assert_eq!(
        server.api_unauthorized(),
        1,
        "only the first layer met the 401"
    );
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_a_three_master_redis_cluster_makes_one_token_request_and_hears_of_a_401() {
    let scratch = Scratch::new("cluster");
    let ports = [free_port(), free_port(), free_port()];
    let _nodes: Vec<RedisServer> = ports
        .iter()
        .map(|port| {
            let config = scratch.file(&format!("nodes-{port}.conf"));
            RedisServer::start_with(
                *port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &config,
                    "--dir",
                    &scratch.file(""),
                ],
            )
        })
        .collect();
    let addresses: Vec<String> = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(addresses.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    redis_cli(&create);
    for port in ports {
        wait_for_cli(
            &["-p", &port.to_string(), "cluster", "info"],
            "cluster_state:ok",
        );
    }
    let server = server(Duration::from_secs(3600)).await;
    let urls: Vec<String> = ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}/"))
        .collect();
    ten_layers_cold_then_one_401(&server, || {
        RedisTokenStore::cluster_builder(urls.clone())
            .sealing_key(sealing_key())
            .operation_timeout(Duration::from_secs(2))
            .build()
            .unwrap()
    })
    .await;
    // The one token lives on one shard, under one hash tag (the first was removed after the
    // 401; its successor took its place).
    let keys: usize = ports
        .iter()
        .map(|port| {
            redis_cli(&[
                "-p",
                &port.to_string(),
                "--scan",
                "--pattern",
                "nuvy-oauth2:*",
            ])
            .lines()
            .count()
        })
        .sum();
    assert_eq!(keys, 2, "generation and token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_redis_sentinel_makes_one_token_request_and_hears_of_a_401() {
    let scratch = Scratch::new("sentinel");
    let master = RedisServer::start();
    let sentinel_port = free_port();
    let config = scratch.file("sentinel.conf");
    std::fs::write(
        &config,
        format!(
            "sentinel monitor fleet 127.0.0.1 {} 1\nsentinel down-after-milliseconds fleet 5000\n",
            master.port
        ),
    )
    .unwrap();
    let _sentinel = RedisServer::start_with(sentinel_port, &[&config, "--sentinel"]);
    wait_for_cli(
        &[
            "-p",
            &sentinel_port.to_string(),
            "sentinel",
            "get-master-addr-by-name",
            "fleet",
        ],
        &master.port.to_string(),
    );
    let server = server(Duration::from_secs(3600)).await;
    ten_layers_cold_then_one_401(&server, || {
        RedisTokenStore::sentinel_builder([format!("redis://127.0.0.1:{sentinel_port}/")], "fleet")
            .sealing_key(sealing_key())
            .operation_timeout(Duration::from_secs(2))
            .build()
            .unwrap()
    })
    .await;
    let keys = redis_cli(&[
        "-p",
        &master.port.to_string(),
        "--scan",
        "--pattern",
        "nuvy-oauth2:*",
    ]);
    assert_eq!(keys.lines().count(), 2, "the token is on the master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_the_fleet_works_on_the_promoted_replica_and_no_request_fails() {
    let scratch = Scratch::new("failover");
    // Replication writes RDB files: into the scratch directory, never the working tree.
    let dir = scratch.file("");
    let mut master = RedisServer::start_with(free_port(), &["--dir", &dir]);
    let master_port = master.port.to_string();
    let replica = RedisServer::start_with(
        free_port(),
        &["--dir", &dir, "--replicaof", "127.0.0.1", &master_port],
    );
    let replica_port = replica.port.to_string();
    wait_for_cli(
        &["-p", &replica_port, "info", "replication"],
        "master_link_status:up",
    );
    let sentinel_port = free_port().to_string();
    let config = scratch.file("sentinel.conf");
    std::fs::write(
        &config,
        format!(
            "sentinel monitor fleet 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds fleet 300\n\
             sentinel failover-timeout fleet 2000\n"
        ),
    )
    .unwrap();
    let _sentinel =
        RedisServer::start_with(sentinel_port.parse().unwrap(), &[&config, "--sentinel"]);
    // The Sentinel knows the replica (from the master's INFO) before the master goes.
    wait_for_cli(
        &["-p", &sentinel_port, "sentinel", "replicas", "fleet"],
        &replica_port,
    );
    let server = server(Duration::from_secs(3600)).await;
    let store = || {
        RedisTokenStore::sentinel_builder([format!("redis://127.0.0.1:{sentinel_port}/")], "fleet")
            .sealing_key(sealing_key())
            .operation_timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    };
    let url = server.api_url("/v1/ping");
    let first = layer(&server).with_token_store(store());
    assert_eq!(
        status_of(api(&first), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    // The token reached the replica before the master is killed.
    wait_for_cli(
        &["-p", &replica_port, "--scan", "--pattern", "nuvy-oauth2:*"],
        "nuvy-oauth2:",
    );

    master.kill();
    wait_for_cli(
        &[
            "-p",
            &sentinel_port,
            "sentinel",
            "get-master-addr-by-name",
            "fleet",
        ],
        &replica_port,
    );
    // Every request succeeds across the failover: the running layer serves its own token, and a
    // new member right after the switch may find Redis briefly unavailable (the Sentinel names
    // the promoted replica while it is still being reconfigured, and kills its client
    // connections) and then requests a token for itself.
    assert_eq!(
        status_of(api(&first), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    let second = layer(&server).with_token_store(store());
    assert_eq!(
        status_of(api(&second), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    // Then the fleet works on the promoted replica: a new member finds a token there through
    // the Sentinel and requests none of its own.
    let mut members = Vec::new();
    eventually(
        "a new member takes the token from the promoted replica",
        async || {
            let requests = server.token_requests();
            let member = layer(&server).with_token_store(store());
            let status = status_of(api(&member), get(&url)).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            members.push(member);
            server.token_requests() == requests
        },
    )
    .await;
}

/// One member of a fleet of OS processes: this test binary started again with
/// `FLEET_MEMBER_TOKEN_ENDPOINT` set (see the next test). Does nothing otherwise.
#[tokio::test]
#[ignore = "run as a child process by several_processes_make_one_token_request"]
async fn fleet_member_process() {
    let (Ok(endpoint), Ok(redis_url), Ok(id), Ok(secret)) = (
        std::env::var("FLEET_MEMBER_TOKEN_ENDPOINT"),
        std::env::var("FLEET_MEMBER_REDIS_URL"),
        std::env::var("FLEET_MEMBER_CLIENT_ID"),
        std::env::var("FLEET_MEMBER_CLIENT_SECRET"),
    ) else {
        return;
    };
    let config =
        nuvy_oauth2::OAuth2Config::builder(nuvy_oauth2::ClientCredentials::new(id, secret))
            .token_endpoint(&endpoint)
            .allow_insecure_http(true)
            .build()
            .unwrap();
    let store = RedisTokenStore::builder(redis_url)
        .sealing_key(sealing_key())
        .operation_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let layer = OAuth2Layer::new(config).unwrap().with_token_store(store);
    let api_url = std::env::var("FLEET_MEMBER_API_URL").unwrap();
    let mut calls = JoinSet::new();
    for _ in 0..20 {
        calls.spawn(status_of(api(&layer), get(&api_url)));
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_processes_make_one_token_request() {
    let redis = RedisServer::start();
    let server = server(Duration::from_secs(3600)).await;
    server.delay_next_token_requests(1, Duration::from_millis(300));
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            tokio::process::Command::new(&exe)
                .args(["fleet_member_process", "--exact", "--ignored", "--quiet"])
                .env("FLEET_MEMBER_TOKEN_ENDPOINT", server.token_endpoint())
                .env("FLEET_MEMBER_REDIS_URL", redis.url())
                .env("FLEET_MEMBER_API_URL", server.api_url("/v1/ping"))
                .env("FLEET_MEMBER_CLIENT_ID", server.client_id())
                .env("FLEET_MEMBER_CLIENT_SECRET", server.client_secret())
                .stdout(Stdio::null())
                .status()
        })
        .collect();
    for child in children {
        assert!(child.await.unwrap().success(), "a member process failed");
    }
    assert_eq!(server.api_requests(), 80, "four processes made their calls");
    assert_eq!(server.token_requests(), 1);
}
