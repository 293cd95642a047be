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

impl RedisServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
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
    let mut calls = JoinSet::new();
    for layer in &layers {
        let api = api(layer);
        for _ in 0..100 {
            calls.spawn(status_of(api.clone(), get(&server.api_url("/v1/ping"))));
        }
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(server.token_requests(), 1);
    assert_eq!(requests_sent(&layers), 1);
}

/// Calls on every layer every 20 ms for `duration` (real time); every call must succeed.
async fn steady_traffic(server: &NuvyServer, layers: &[OAuth2Layer], duration: Duration) {
    let end = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let mut calls = JoinSet::new();
        for layer in layers {
            calls.spawn(status_of(api(layer), get(&server.api_url("/v1/ping"))));
        }
        while let Some(result) = calls.join_next().await {
            assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_three_token_lifetimes_a_fleet_on_redis_requests_as_often_as_one_process() {
    // Real time: Redis expires keys on its own clock. Two-second tokens, six seconds.
    let lifetime = Duration::from_secs(2);
    let redis = RedisServer::start();
    let server = server(lifetime).await;
    let layers = fleet(&server, &redis, 10);
    steady_traffic(&server, &layers, lifetime * 3).await;
    // Refresh-ahead at 70-80 % of the lifetime: the first token, then one per 0.7-0.8
    // lifetimes, for the whole fleet, as for one process alone.
    let requests = server.token_requests();
    assert!(
        (4..=5).contains(&requests),
        "{requests} token requests for 10 layers over three lifetimes"
    );
    assert_eq!(requests_sent(&layers), requests);
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
    let status = status_of(api(&first), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
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
    let status = status_of(api(&second), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
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
        let status = status_of(api(layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(server.token_requests(), 1);
    server.revoke_all_tokens();
    for layer in &layers {
        let status = status_of(api(layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(server.token_requests(), 2, "one new token for the fleet");
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
