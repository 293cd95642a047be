//! The warm path takes no lock in any usage pattern: with a valid token cached and the cache's
//! lock held by another thread, requests still complete in every way users call the service.
//! And it reads no clock, yet follows the token's deadlines: per-generation phase timers on
//! Tokio's clock (paused here), the clock itself once those timers' runtime is gone, and the
//! process's timer thread in real time when that runtime is never driven again.

mod common;

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use tower::buffer::Buffer;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};

/// Answers at once with the `Authorization` header it received.
#[derive(Clone, Copy, Debug)]
struct Echo;

impl Service<Request<()>> for Echo {
    type Response = Response<Option<HeaderValue>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        ready(Ok(Response::new(
            request.headers().get(AUTHORIZATION).cloned(),
        )))
    }
}

fn request() -> Request<()> {
    Request::get("https://prd.api.nuvy.ai/v1/ping")
        .body(())
        .unwrap()
}

/// A layer whose token may go to the origin of [`request`].
fn echo_layer(server: &common::NuvyServer) -> nuvy_oauth2::OAuth2Layer {
    let config = common::config_builder(server)
        .allow_origin("https://prd.api.nuvy.ai")
        .build()
        .unwrap();
    nuvy_oauth2::OAuth2Layer::new(config).unwrap()
}

/// `ready` + `call` on a service kept across requests.
async fn send_on<S>(service: &mut S) -> String
where
    S: Service<Request<()>, Response = Response<nuvy_oauth2::ResponseBody<Option<HeaderValue>>>>,
    S::Error: Into<BoxError>,
{
    let service = service.ready().await.map_err(Into::into).unwrap();
    let response = service.call(request()).await.map_err(Into::into).unwrap();
    response
        .into_body()
        .into_inner()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

async fn send<S>(service: S) -> String
where
    S: Service<Request<()>, Response = Response<nuvy_oauth2::ResponseBody<Option<HeaderValue>>>>,
    S::Error: Into<BoxError>,
{
    let response = service
        .oneshot(request())
        .await
        .map_err(Into::into)
        .unwrap();
    let header = response
        .into_body()
        .into_inner()
        .expect("the request carried a token");
    assert!(header.is_sensitive());
    header.to_str().unwrap().to_owned()
}

#[test]
fn a_never_called_clone_gets_the_token_without_the_cache_lock_in_every_pattern() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(common::server(Duration::from_secs(3600)));
    // The token may go to the origin of request().
    let config = common::config_builder(&server)
        .allow_origin("https://prd.api.nuvy.ai")
        .build()
        .unwrap();
    let layer = nuvy_oauth2::OAuth2Layer::new(config).unwrap();
    // One request through a throwaway service fetches the token; the services below never
    // made a request before the lock is taken.
    let expected = runtime.block_on(send(layer.layer(Echo)));
    let api = layer.layer(Echo);
    let api_with_retry = layer.clone().with_retry().layer(Echo);

    let held = layer.token_cache().hold_lock_for_test();
    let (done, finished) = mpsc::channel();
    let handle = runtime.handle().clone();
    std::thread::spawn(move || {
        let served = handle.block_on(async move {
            let mut served = Vec::new();
            // The README's usage: `oneshot` on a clone of a service that was never called.
            served.push(("oneshot on a clone", send(api.clone()).await));
            // A clone per request, called with ready + call.
            for _ in 0..3 {
                let mut clone = api.clone();
                let response = clone.ready().await.unwrap().call(request()).await.unwrap();
                served.push((
                    "clone per request",
                    response
                        .into_body()
                        .into_inner()
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned(),
                ));
            }
            // One instance reused: the first calls read the published token, later ones its copy.
            let mut reused = api.clone();
            for _ in 0..3 {
                let response = reused.ready().await.unwrap().call(request()).await.unwrap();
                served.push((
                    "reused",
                    response
                        .into_body()
                        .into_inner()
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned(),
                ));
            }
            // tower's Buffer: the worker task owns a clone that was never called.
            let buffer = Buffer::new(api.clone(), 8);
            for _ in 0..3 {
                served.push(("Buffer", send(buffer.clone()).await));
            }
            // BoxCloneService, cloned per request.
            let boxed = BoxCloneService::new(api.clone());
            for _ in 0..3 {
                served.push(("BoxCloneService", send(boxed.clone()).await));
            }
            // with_retry: tower's Retry clones the service per call.
            for _ in 0..3 {
                served.push(("with_retry", send(api_with_retry.clone()).await));
            }
            served
        });
        let _ = done.send(served);
    });
    // A liveness bound, not a timing assertion: a request that took the lock would never end.
    let served = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("a warm request waited for the cache lock");
    drop(held);
    assert_eq!(served.len(), 16);
    for (pattern, header) in served {
        assert_eq!(header, expected, "{pattern}");
    }
    assert_eq!(server.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_warm_path_follows_the_refresh_ahead_and_refresh_points_without_reading_the_clock() {
    // 1000 s lifetime: refresh-ahead at 750 s (± 50 s), refresh point at 940 s (margin 60 s).
    let server = common::server(Duration::from_secs(1000)).await;
    let layer = echo_layer(&server);
    // A reused instance (its own copy after two calls) and a never-called one.
    let mut reused = layer.layer(Echo);
    let first = send_on(&mut reused).await;
    assert_eq!(send_on(&mut reused).await, first);
    let never_called = layer.layer(Echo);

    // Before the refresh-ahead point: the same token, no new request.
    tokio::time::advance(Duration::from_secs(650)).await;
    assert_eq!(send_on(&mut reused).await, first);
    assert_eq!(send(never_called.clone()).await, first);
    assert_eq!(server.token_requests(), 1);

    // Past it: the reused instance's next call starts the background refresh, and is served
    // with the current token without waiting (the endpoint is slow on purpose).
    tokio::time::advance(Duration::from_secs(150)).await;
    server.delay_next_token_requests(1, Duration::from_secs(5));
    assert_eq!(send_on(&mut reused).await, first);
    assert!(layer.token_cache().status().refresh_in_flight);
    assert_eq!(send(never_called.clone()).await, first);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(server.token_requests(), 2);
    let second = send_on(&mut reused).await;
    assert_ne!(second, first);
    assert_eq!(send(never_called.clone()).await, second);

    // Past the second token's refresh point (it was requested at 800 s): the call waits for
    // a third token rather than using its copy of the second one.
    tokio::time::advance(Duration::from_secs(950)).await;
    let third = send_on(&mut reused).await;
    assert_ne!(third, second);
    assert_eq!(server.token_requests(), 3);
}

/// The embedded server (tokens of `lifetime`) on a runtime of its own, which the caller keeps
/// for the whole test while it makes and drops other runtimes.
fn server_on_a_runtime_of_its_own(
    lifetime: Duration,
) -> (tokio::runtime::Runtime, common::NuvyServer) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(common::server(lifetime));
    (runtime, server)
}

#[test]
fn once_the_runtime_that_fetched_the_token_is_gone_the_warm_path_reads_the_clock() {
    let (_server_runtime, server) = server_on_a_runtime_of_its_own(Duration::from_secs(600));
    let layer = echo_layer(&server);
    let mut reused = layer.layer(Echo);

    // The token is fetched, and its phase timers registered, in a runtime that then shuts down.
    let first_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = first_runtime.block_on(async {
        send_on(&mut reused).await;
        send_on(&mut reused).await
    });
    drop(first_runtime);

    // In another runtime (paused) the token is still served while valid, and not past its
    // refresh point (540 s), although no timer will ever mark it stale.
    let second_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    second_runtime.block_on(async {
        assert_eq!(send_on(&mut reused).await, first);
        assert_eq!(send(layer.layer(Echo)).await, first);
        tokio::time::advance(Duration::from_secs(545)).await;
        // The token request goes to the server's runtime on another thread: keep this paused
        // runtime from auto-advancing its clock past the request timeout meanwhile.
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let inhibit = tokio::task::spawn_blocking(move || {
            let _ = wait.recv();
        });
        let second = send_on(&mut reused).await;
        drop(done);
        inhibit.await.unwrap();
        assert_ne!(second, first);
        assert_eq!(server.token_requests(), 2);
    });
}

#[test]
fn a_token_whose_runtime_shut_down_with_a_blocked_worker_goes_stale_in_real_time() {
    // 1 s tokens: the refresh point comes 0.9 s after the token request, in real time.
    let (_server_runtime, server) = server_on_a_runtime_of_its_own(Duration::from_secs(1));
    let layer = echo_layer(&server);
    let mut reused = layer.layer(Echo);

    // The token is fetched, and its Tokio phase timers registered, on a multi-thread runtime
    // that is then shut down while one of its workers is blocked: Tokio never wakes those
    // timers, neither at their deadlines nor for the shutdown (it waits for every worker).
    let first_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let first = first_runtime.block_on(async {
        send_on(&mut reused).await;
        send_on(&mut reused).await
    });
    let (unblock, blocked) = mpsc::channel::<()>();
    let (started, worker_blocked) = mpsc::channel::<()>();
    first_runtime.spawn(async move {
        started.send(()).unwrap();
        let _ = blocked.recv();
    });
    worker_blocked.recv().unwrap();
    first_runtime.shutdown_background();

    // From another runtime, the warm path stops serving the token as fresh once its
    // refresh-ahead and refresh points pass in real time (the process's timer thread marks
    // them), and the next token is fetched. Without that thread it would be served for ever.
    let second_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let second = second_runtime.block_on(async {
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let served = send_on(&mut reused).await;
            if served != first {
                return served;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "the first token is still served as fresh long past its expiry"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert_ne!(second, first);
    assert_eq!(server.token_requests(), 2);
    drop(unblock);
}

/// `ready` + `call` of a request for `uri`; the `Authorization` header the inner service got.
async fn send_to<S>(service: &mut S, uri: &str) -> Result<Option<HeaderValue>, BoxError>
where
    S: Service<Request<()>, Response = Response<nuvy_oauth2::ResponseBody<Option<HeaderValue>>>>,
    S::Error: Into<BoxError>,
{
    let service = service.ready().await.map_err(Into::into)?;
    let request = Request::get(uri).body(()).unwrap();
    let response = service.call(request).await.map_err(Into::into)?;
    Ok(response.into_body().into_inner())
}

#[tokio::test]
async fn a_fresh_token_for_an_allowed_origin_as_written_takes_the_warm_path() {
    let server = common::server(Duration::from_secs(3600)).await;
    let layer = echo_layer(&server);
    let api = "https://prd.api.nuvy.ai/v1/ping";
    let mut reused = layer.layer(Echo);
    assert!(send_to(&mut reused, api).await.unwrap().is_some());
    assert_eq!(reused.cold_path_calls_for_test(), 1, "no token yet: cold");
    for _ in 0..3 {
        assert!(send_to(&mut reused, api).await.unwrap().is_some());
    }
    assert_eq!(reused.cold_path_calls_for_test(), 1, "its own copy: warm");
    // A service that was never called: the published token, then its own copy.
    let mut fresh = layer.layer(Echo);
    for _ in 0..3 {
        assert!(send_to(&mut fresh, api).await.unwrap().is_some());
    }
    assert_eq!(fresh.cold_path_calls_for_test(), 0, "published token: warm");
    // The token endpoint's own origin over plain http, allowed on this loopback setup.
    let loopback = server.token_endpoint();
    assert!(send_to(&mut fresh, &loopback).await.unwrap().is_some());
    assert_eq!(
        fresh.cold_path_calls_for_test(),
        0,
        "allowed http origin: warm"
    );
    // A URI with neither scheme nor authority (tonic's): the transport below chose where it
    // connects.
    assert!(send_to(&mut fresh, "/nuvy.v1.Api/Ping")
        .await
        .unwrap()
        .is_some());
    assert_eq!(fresh.cold_path_calls_for_test(), 0, "relative URI: warm");
    // The allowed origin spelled otherwise: the full check accepts it on the cold path.
    let upper = "https://PRD.API.NUVY.AI:443/v1/ping";
    assert!(send_to(&mut fresh, upper).await.unwrap().is_some());
    assert_eq!(fresh.cold_path_calls_for_test(), 1);
    // Another origin: refused, before the inner service sees it.
    let error = send_to(&mut fresh, "https://evil.example/v1/ping")
        .await
        .unwrap_err();
    assert!(matches!(
        common::crate_error(&error).kind(),
        nuvy_oauth2::ErrorKind::OriginNotAllowed { .. }
    ));
    assert_eq!(fresh.cold_path_calls_for_test(), 2);
    assert_eq!(server.token_requests(), 1);
}

#[tokio::test]
async fn an_http_api_request_is_refused_without_allow_insecure_http() {
    let config =
        nuvy_oauth2::OAuth2Config::builder(nuvy_oauth2::ClientCredentials::new("id", "secret"))
            .token_endpoint("https://prd.api.nuvy.ai/oauth2/token")
            .build()
            .unwrap();
    let layer = nuvy_oauth2::OAuth2Layer::new(config).unwrap();
    let mut service = layer.layer(Echo);
    // Refused before any token is fetched (none could be: the endpoint is unreachable here).
    let error = send_to(&mut service, "http://prd.api.nuvy.ai/v1/ping")
        .await
        .unwrap_err();
    assert_eq!(
        common::crate_error(&error).kind(),
        &nuvy_oauth2::ErrorKind::InsecureScheme {
            target: "API request"
        }
    );
    assert_eq!(layer.token_cache().token_requests(), 0);
}
