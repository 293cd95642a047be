//! fleet: many independent layers (as many processes would be) against one token endpoint,
//! without a token store, with a `MemoryTokenStore`, and (feature `redis`, `redis-server` on
//! PATH) with a `RedisTokenStore` on a redis-server of its own on loopback.
//!
//! - cold_start/<store>/<layers>: 1, 10, 100 fresh layers, one first request each, all at once;
//!   time until all are served. Token requests per cold start (= per token lifetime: each
//!   refresh is the same single flight) are counted and printed.
//! - warm/<store>: one request on a layer holding a valid token. The store is off the warm
//!   path, so the ratio with a store must be 1.0.
//!
//! `cargo bench --bench fleet` (add `--features redis` for the Redis rows).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{loopback_config, request, NuvyServer, Trivial};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nuvy_oauth2::store::MemoryTokenStore;
use nuvy_oauth2::OAuth2Layer;
use tower::{Layer, ServiceExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Which store the layers of one iteration share.
#[derive(Clone, Copy, Debug)]
enum Store {
    None,
    Memory,
    #[cfg(feature = "redis")]
    Redis,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::None => "no_store",
            Store::Memory => "memory",
            #[cfg(feature = "redis")]
            Store::Redis => "redis",
        }
    }
}

/// A fresh fleet of `count` layers sharing a fresh store (a new Redis key prefix per fleet).
fn fleet(server: &NuvyServer, store: Store, count: usize, redis: Option<&str>) -> Vec<OAuth2Layer> {
    static FLEETS: AtomicU64 = AtomicU64::new(0);
    let fleet_id = FLEETS.fetch_add(1, Ordering::Relaxed);
    let memory = MemoryTokenStore::new();
    let _ = (fleet_id, redis);
    (0..count)
        .map(|_| {
            let layer = OAuth2Layer::new(loopback_config(server).build().unwrap()).unwrap();
            match store {
                Store::None => layer,
                Store::Memory => layer.with_token_store(memory.clone()),
                #[cfg(feature = "redis")]
                Store::Redis => layer.with_token_store(
                    nuvy_oauth2::store::RedisTokenStore::builder(redis.expect("redis url"))
                        .plaintext(true)
                        .key_prefix(format!("bench-{fleet_id}"))
                        .build()
                        .unwrap(),
                ),
            }
        })
        .collect()
}

#[cfg(feature = "redis")]
struct RedisServer(std::process::Child, String);

#[cfg(feature = "redis")]
impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(feature = "redis")]
fn start_redis() -> Option<RedisServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let server = RedisServer(child, format!("redis://127.0.0.1:{port}/"));
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn stores() -> Vec<Store> {
    #[allow(unused_mut)]
    let mut stores = vec![Store::None, Store::Memory];
    #[cfg(feature = "redis")]
    stores.push(Store::Redis);
    stores
}

fn fleet_benches(c: &mut Criterion) {
    let runtime = runtime();
    let server = runtime.block_on(NuvyServer::start()).unwrap();
    #[cfg(feature = "redis")]
    let redis = start_redis();
    #[cfg(feature = "redis")]
    let redis_url = redis.as_ref().map(|redis| redis.1.clone());
    #[cfg(not(feature = "redis"))]
    let redis_url: Option<String> = None;
    let stores: Vec<Store> = stores()
        .into_iter()
        .filter(|store| store.name() != "redis" || redis_url.is_some())
        .collect();

    let mut group = c.benchmark_group("fleet");
    group.sample_size(10);
    let mut requests_per_cold_start = Vec::new();
    for &store in &stores {
        for layers in [1usize, 10, 100] {
            let (fleets, requests) = (AtomicU64::new(0), AtomicU64::new(0));
            group.bench_with_input(
                BenchmarkId::new(format!("cold_start/{}", store.name()), layers),
                &layers,
                |b, &layers| {
                    b.to_async(&runtime).iter_custom(|iters| {
                        let (server, redis_url) = (&server, redis_url.as_deref());
                        let (fleets, requests) = (&fleets, &requests);
                        async move {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                let fleet = fleet(server, store, layers, redis_url);
                                let start = Instant::now();
                                let calls: Vec<_> = fleet
                                    .iter()
                                    .map(|layer| {
                                        tokio::spawn(layer.layer(Trivial).oneshot(request()))
                                    })
                                    .collect();
                                for call in calls {
                                    call.await.unwrap().unwrap();
                                }
                                total += start.elapsed();
                                fleets.fetch_add(1, Ordering::Relaxed);
                                requests.fetch_add(
                                    fleet
                                        .iter()
                                        .map(|layer| layer.token_cache().token_requests())
                                        .sum::<u64>(),
                                    Ordering::Relaxed,
                                );
                            }
                            total
                        }
                    })
                },
            );
            let per_fleet = requests.load(Ordering::Relaxed) as f64
                / fleets.load(Ordering::Relaxed).max(1) as f64;
            requests_per_cold_start.push((store.name(), layers, per_fleet));
        }
    }
    for &store in &stores {
        let fleet = fleet(&server, store, 1, redis_url.as_deref());
        let service = fleet[0].layer(Trivial);
        runtime
            .block_on(service.clone().oneshot(request()))
            .unwrap();
        group.bench_function(format!("warm/{}", store.name()), |b| {
            b.to_async(&runtime)
                .iter(|| service.clone().oneshot(request()))
        });
    }
    group.finish();
    for (store, layers, requests) in requests_per_cold_start {
        println!("fleet: {store}, {layers} layers: {requests:.2} token requests per cold start (per token lifetime)");
    }
}

criterion_group!(benches, fleet_benches);
criterion_main!(benches);
