//! The token endpoint's worst moments, against the embedded server over loopback:
//!
//! - cold_start: N = 1, 100, 10,000 concurrent first requests; one token request for all of
//!   them (checked), time until all are served, against one bare token round trip.
//! - rotation: steady traffic across a token's refresh point with refresh-ahead in place;
//!   latency percentiles in the rotation window against steady state (printed).
//! - retry_401: a request that meets a 401, refreshes and replays, against a plain request.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{loopback_config, request, NuvyServer, Trivial};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nuvy_oauth2::OAuth2Layer;
use tower::{Layer, ServiceBuilder, ServiceExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn layer_for(server: &NuvyServer) -> OAuth2Layer {
    OAuth2Layer::new(loopback_config(server).build().unwrap()).unwrap()
}

/// One token request by hand, as the baseline round trip.
async fn bare_token_round_trip(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    server: &NuvyServer,
) {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        server.client_id(),
        server.client_secret()
    ));
    let request = http::Request::post(server.token_endpoint())
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::from("grant_type=client_credentials"))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
}

fn cold_start(c: &mut Criterion) {
    let runtime = runtime();
    let server = runtime.block_on(NuvyServer::start()).unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut group = c.benchmark_group("cold_start");
    group.sample_size(10);
    group.bench_function("baseline_one_token_round_trip", |b| {
        b.to_async(&runtime)
            .iter(|| bare_token_round_trip(&client, &server))
    });
    for callers in [1usize, 100, 10_000] {
        group.bench_with_input(
            BenchmarkId::new("callers", callers),
            &callers,
            |b, &callers| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let server = &server;
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let layer = layer_for(server);
                            let service = layer.layer(Trivial);
                            let start = Instant::now();
                            let mut calls = Vec::with_capacity(callers);
                            for _ in 0..callers {
                                calls.push(tokio::spawn(service.clone().oneshot(request())));
                            }
                            for call in calls {
                                call.await.unwrap().unwrap();
                            }
                            total += start.elapsed();
                            assert_eq!(
                                layer.token_cache().token_requests(),
                                1,
                                "{callers} cold callers must share one token request"
                            );
                        }
                        total
                    }
                })
            },
        );
    }
    group.finish();
    println!(
        "cold_start: every iteration of every width made exactly 1 token request (asserted); \
         server saw {} token requests in all",
        server.token_requests()
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Steady traffic from `tasks` tasks for `run`, over real HTTP to the protected API, each
/// request's latency tagged with its start time since `origin`.
async fn rotation_run(server: &NuvyServer, lifetime: Duration) -> (Vec<Duration>, Vec<Duration>) {
    let layer = layer_for(server);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let api = ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(client);
    let url = server.api_url("/v1/ping");
    let origin = Instant::now();
    let run = lifetime + lifetime / 2;
    let mut handles = Vec::new();
    for _ in 0..4 {
        let api = api.clone();
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while origin.elapsed() < run {
                let request = http::Request::get(&url).body(Full::default()).unwrap();
                let started = Instant::now();
                let response = api.clone().oneshot(request).await.unwrap();
                assert_eq!(response.status(), 200);
                samples.push((started - origin, started.elapsed()));
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for handle in handles {
        samples.extend(handle.await.unwrap());
    }
    // Rotation window: from the earliest refresh-ahead point (70 %) to just past the refresh
    // point (90 % + 10 %); steady: 10 %..60 % of the first lifetime.
    let (mut window, mut steady) = (Vec::new(), Vec::new());
    for (at, latency) in samples {
        let share = at.as_secs_f64() / lifetime.as_secs_f64();
        if (0.70..=1.0).contains(&share) {
            window.push(latency);
        } else if (0.10..=0.60).contains(&share) {
            steady.push(latency);
        }
    }
    window.sort();
    steady.sort();
    (steady, window)
}

fn rotation(c: &mut Criterion) {
    let runtime = runtime();
    let lifetime = Duration::from_secs(2);
    let server = runtime
        .block_on(NuvyServer::builder().token_lifetime(lifetime).start())
        .unwrap();
    // The token endpoint is slow on purpose: without refresh-ahead every caller in the window
    // would wait this long.
    let (steady, window) = runtime.block_on(async {
        server.delay_next_token_requests(8, Duration::from_millis(20));
        rotation_run(&server, lifetime).await
    });
    let report = |name: &str, samples: &[Duration]| {
        println!(
            "rotation/{name:<7} n={:<6} p50={:>9.1?} p99={:>9.1?} max={:>9.1?}",
            samples.len(),
            percentile(samples, 0.50),
            percentile(samples, 0.99),
            samples.last().copied().unwrap_or_default()
        );
    };
    report("steady", &steady);
    report("window", &window);
    let ratio = percentile(&window, 0.99).as_secs_f64() / percentile(&steady, 0.99).as_secs_f64();
    println!("rotation: p99 window / p99 steady = {ratio:.2}x (target <= 1.2x)");

    // And a criterion figure: mean request time over a run that spans a rotation.
    let mut group = c.benchmark_group("rotation");
    group.sample_size(10);
    group.bench_function("requests_across_refresh", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let server = &server;
            async move {
                let mut total = Duration::ZERO;
                let mut count = 0u64;
                for _ in 0..iters.min(3) {
                    server.delay_next_token_requests(8, Duration::from_millis(20));
                    let (steady, window) = rotation_run(server, lifetime).await;
                    total += window.iter().sum::<Duration>();
                    count += window.len() as u64;
                    drop(steady);
                }
                total.mul_f64(iters as f64 / count.max(1) as f64)
            }
        })
    });
    group.finish();
}

fn retry_401(c: &mut Criterion) {
    // Every iteration revokes the token the previous one just fetched. Consecutive generations
    // rejected moments after issue would (rightly) make the cache hold its 401s back
    // (`REJECTED_GENERATION_BACKOFF`), so each iteration first ages the token past
    // `REJECTED_GENERATION_WINDOW` on a paused clock: every 401 is then a lone revocation.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let server = runtime.block_on(NuvyServer::start()).unwrap();
    let config = loopback_config(&server).build().unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let api = ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(client);
    let url = server.api_url("/v1/ping");
    let get = || http::Request::get(&url).body(Full::default()).unwrap();
    runtime.block_on(api.clone().oneshot(get())).unwrap();
    let mut group = c.benchmark_group("retry_401");
    group.sample_size(20);
    group.bench_function("baseline_plain_request", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = api.clone().oneshot(get()).await.unwrap();
            assert_eq!(response.status(), 200);
        })
    });
    group.bench_function("401_refresh_replay", |b| {
        b.to_async(&runtime).iter(|| async {
            tokio::time::advance(nuvy_oauth2::REJECTED_GENERATION_WINDOW).await;
            server.revoke_all_tokens();
            let response = api.clone().oneshot(get()).await.unwrap();
            assert_eq!(response.status(), 200);
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = cold_start, rotation, retry_401
}
criterion_main!(benches);
