//! The token cache: reuse, expiry, single flight, cancellation, shared errors, generations,
//! and tower's readiness contract.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::{ErrorKind, OAuth2Layer};
use tokio::task::JoinSet;
use tokio_test::{assert_pending, task};
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::test]
async fn hundred_sequential_calls_make_one_token_request() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    for _ in 0..100 {
        let status = status_of(api.clone(), get(&server.api_url("/v1/ping")))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(server.token_requests(), 1);
    assert_eq!(layer.token_cache().token_requests(), 1);
    assert_eq!(server.api_requests(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_calls_on_a_cold_cache_make_one_token_request() {
    let server = server(Duration::from_secs(3600)).await;
    // A slow token endpoint widens the window in which callers pile up.
    server.delay_next_token_requests(1, Duration::from_millis(100));
    let layer = layer(&server);
    let api = api(&layer);
    let mut calls = JoinSet::new();
    for _ in 0..1000 {
        calls.spawn(status_of(api.clone(), get(&server.api_url("/v1/ping"))));
    }
    let mut ok = 0;
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(server.token_requests(), 1);
    assert_eq!(layer.token_cache().token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_new_token_is_fetched_after_expiry_and_not_before() {
    let server = server(Duration::from_secs(600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    let first = server.last_api_authorization().unwrap();

    // Half-way through the lifetime: the cached token is reused.
    tokio::time::advance(Duration::from_secs(300)).await;
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(server.token_requests(), 1);

    // Past expiry: one new token.
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(server.token_requests(), 2);
    assert_ne!(server.last_api_authorization().unwrap(), first);
    assert_eq!(layer.token_cache().status().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn inside_the_refresh_margin_callers_wait_for_a_new_token() {
    // 600 s lifetime: margin 60 s, so at 545 s the token is no longer handed out.
    let server = server(Duration::from_secs(600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    let first = server.last_api_authorization().unwrap();
    tokio::time::advance(Duration::from_secs(545)).await;
    status_of(api.clone(), get(&url)).await.unwrap();
    assert_eq!(server.token_requests(), 2);
    assert_ne!(server.last_api_authorization().unwrap(), first);
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_refreshes_in_the_background_while_the_current_token_is_used() {
    let server = server(Duration::from_secs(1000)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    let first = server.last_api_authorization().unwrap();

    // Past the refresh-ahead point (75 % ± 5 %), before the margin (900 s).
    tokio::time::advance(Duration::from_secs(850)).await;
    // The slow endpoint shows nobody waits on it: the call is served with the current token.
    server.delay_next_token_requests(1, Duration::from_secs(5));
    status_of(api.clone(), get(&url)).await.unwrap();
    assert_eq!(server.last_api_authorization().unwrap(), first);
    assert!(layer.token_cache().status().refresh_in_flight);

    // More calls during the refresh: still the current token, still one token request.
    for _ in 0..5 {
        status_of(api.clone(), get(&url)).await.unwrap();
        assert_eq!(server.last_api_authorization().unwrap(), first);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    status_of(api.clone(), get(&url)).await.unwrap();
    assert_ne!(server.last_api_authorization().unwrap(), first);
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_caller_that_started_the_refresh_does_not_cancel_it_for_the_others() {
    let server = server(Duration::from_secs(3600)).await;
    server.delay_next_token_requests(1, Duration::from_secs(5));
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");

    let mut first = task::spawn(status_of(api.clone(), get(&url)));
    assert_pending!(first.poll());
    assert!(layer.token_cache().status().refresh_in_flight);
    drop(first);

    let mut others = JoinSet::new();
    for _ in 0..10 {
        others.spawn(status_of(api.clone(), get(&url)));
    }
    while let Some(result) = others.join_next().await {
        assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(
        server.token_requests(),
        1,
        "the dropped caller's refresh served everyone"
    );
    assert_eq!(server.tokens_issued(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_failure_reaches_every_waiter_and_the_next_call_succeeds() {
    let server = server(Duration::from_secs(3600)).await;
    server.push_token_response(
        ScriptedResponse::json(500, r#"{"error":"server_error"}"#).delay(Duration::from_secs(1)),
    );
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");

    let mut waiters = JoinSet::new();
    for _ in 0..20 {
        waiters.spawn(status_of(api.clone(), get(&url)));
    }
    while let Some(result) = waiters.join_next().await {
        let error = result.unwrap().unwrap_err();
        let error = crate_error(&error);
        assert_eq!(error.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(matches!(error.kind(), ErrorKind::UnexpectedStatus { .. }));
    }
    assert_eq!(
        server.token_requests(),
        1,
        "one failed request shared by all waiters"
    );
    let status = layer.token_cache().status();
    assert_eq!(status.consecutive_failures, 1);
    assert!(status.last_error.is_some());

    // Past the failure backoff, the next call tries again and succeeds.
    tokio::time::advance(nuvy_oauth2::MIN_FAILURE_BACKOFF).await;
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(server.token_requests(), 2);
    assert_eq!(layer.token_cache().status().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn during_the_failure_pause_callers_without_a_token_get_the_last_error_at_once() {
    let server = server(Duration::from_secs(3600)).await;
    server.fail_next_token_requests(1, 401);
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    for _ in 0..50 {
        let error = status_of(api.clone(), get(&url)).await.unwrap_err();
        assert!(crate_error(&error).is_invalid_client());
    }
    assert_eq!(
        server.token_requests(),
        1,
        "a permanent failure is not retried in a loop"
    );
    tokio::time::advance(nuvy_oauth2::PERMANENT_FAILURE_PAUSE).await;
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_inside_the_margin_keeps_serving_the_still_valid_token() {
    // 600 s lifetime: margin 60 s; at 560 s the token must be refreshed but is still valid.
    let server = server(Duration::from_secs(600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    let first = server.last_api_authorization().unwrap();
    tokio::time::advance(Duration::from_secs(560)).await;
    server.fail_next_token_requests(3, 503);
    for _ in 0..3 {
        assert_eq!(
            status_of(api.clone(), get(&url)).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(server.last_api_authorization().unwrap(), first);
    }
    assert_eq!(
        server.token_requests(),
        2,
        "one failed refresh, then the backoff holds"
    );
    let status = layer.token_cache().status();
    assert_eq!(status.consecutive_failures, 1);
    assert_eq!(
        status.last_error.unwrap().status(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_token_endpoint_times_out_for_waiters_but_not_for_a_valid_token() {
    let server = server(Duration::from_secs(1000)).await;
    let layer = OAuth2Layer::new(
        config_builder(&server)
            .token_request_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .unwrap();
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    server.push_token_response(ScriptedResponse::hang());
    let started = tokio::time::Instant::now();
    let error = status_of(api.clone(), get(&url)).await.unwrap_err();
    assert!(crate_error(&error).is_timeout());
    assert_eq!(started.elapsed(), Duration::from_secs(2));

    // With a valid token, a hanging refresh-ahead never holds a request up.
    tokio::time::advance(nuvy_oauth2::MAX_FAILURE_BACKOFF).await;
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::advance(Duration::from_secs(850)).await;
    server.push_token_response(ScriptedResponse::hang());
    let started = tokio::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(
            status_of(api.clone(), get(&url)).await.unwrap(),
            StatusCode::OK
        );
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn invalidation_applies_only_to_the_generation_that_was_rejected() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    let cache = layer.token_cache();

    status_of(api.clone(), get(&url)).await.unwrap();
    assert_eq!(cache.current_generation(), 1);
    assert!(cache.invalidate(1));
    assert!(
        !cache.invalidate(1),
        "a second invalidation of the same token is a no-op"
    );
    status_of(api.clone(), get(&url)).await.unwrap();
    assert_eq!(cache.current_generation(), 2);
    assert!(
        !cache.invalidate(1),
        "a late 401 for an old token keeps the new one"
    );
    assert_eq!(cache.current_generation(), 2);
    status_of(api.clone(), get(&url)).await.unwrap();
    assert_eq!(server.token_requests(), 2);
}

/// Inner service that fails the test if `call` comes without a successful `poll_ready` on
/// the same instance (tower's contract).
struct RequireReady<S> {
    inner: S,
    ready: bool,
    violations: Arc<AtomicUsize>,
}

impl<S, R> Service<R> for RequireReady<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let poll = self.inner.poll_ready(cx);
        self.ready = matches!(poll, Poll::Ready(Ok(())));
        poll
    }

    fn call(&mut self, request: R) -> S::Future {
        if !std::mem::take(&mut self.ready) {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.call(request)
    }
}

impl<S> Clone for RequireReady<S>
where
    S: Clone,
{
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            ready: false,
            violations: Arc::clone(&self.violations),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_inner_service_is_only_called_after_it_was_polled_ready() {
    let server = server(Duration::from_secs(3600)).await;
    server.delay_next_token_requests(1, Duration::from_millis(50));
    let layer = layer(&server);
    let violations = Arc::new(AtomicUsize::new(0));
    let api = ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(RequireReady {
            inner: http_client(),
            ready: false,
            violations: Arc::clone(&violations),
        });
    let url = server.api_url("/v1/ping");
    let mut calls = JoinSet::new();
    for _ in 0..20 {
        calls.spawn(api.clone().oneshot(get(&url)));
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap().status(), StatusCode::OK);
    }
    // Cold path (waiting for the token), warm path, and the 401 replay.
    age_and_revoke_tokens(&server).await;
    assert_eq!(
        api.clone().oneshot(get(&url)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(violations.load(Ordering::SeqCst), 0);
}

#[test]
fn outside_a_runtime_the_error_is_typed_not_a_panic() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(server(Duration::from_secs(60)));
    let layer = runtime.block_on(async { layer(&server) });
    let mut service = tower::Layer::layer(&layer, http_client());
    let future = runtime.block_on(async {
        futures_ready(&mut service).await;
        // Leave the runtime context, then call.
        service.clone()
    });
    let mut service = future;
    let waker = futures_noop_waker();
    let mut cx = Context::from_waker(&waker);
    let _ = service.poll_ready(&mut cx);
    let mut response = Box::pin(service.call(get(&server.api_url("/v1/ping"))));
    match response.as_mut().poll(&mut cx) {
        Poll::Ready(Err(error)) => {
            assert!(matches!(crate_error(&error).kind(), ErrorKind::NoRuntime))
        }
        _ => panic!("expected a NoRuntime error"),
    }
}

async fn futures_ready<S: Service<R>, R>(service: &mut S) {
    std::future::poll_fn(|cx| service.poll_ready(cx)).await.ok();
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

use std::future::Future;

#[tokio::test(start_paused = true)]
async fn an_outage_of_three_503s_costs_four_token_requests_spaced_by_the_backoff() {
    let server = server(Duration::from_secs(3600)).await;
    server.fail_next_token_requests(3, 503);
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    let started = tokio::time::Instant::now();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100, "the outage never ended");
        let mut calls = JoinSet::new();
        for _ in 0..1000 {
            calls.spawn(status_of(api.clone(), get(&url)));
        }
        let mut ok = 0;
        while let Some(result) = calls.join_next().await {
            match result.unwrap() {
                Ok(status) => {
                    assert_eq!(status, StatusCode::OK);
                    ok += 1;
                }
                Err(error) => assert_eq!(
                    crate_error(&error).status(),
                    Some(StatusCode::SERVICE_UNAVAILABLE),
                    "every caller gets the shared error"
                ),
            }
        }
        if ok == 1000 {
            break;
        }
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server.token_requests(),
        4,
        "three failures and one success, no stampede"
    );
    // 200 ms, 400 ms and 800 ms ceilings, jittered into their upper halves.
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn two_layers_with_different_configurations_never_share_a_token() {
    let server = server(Duration::from_secs(3600)).await;
    let read = OAuth2Layer::new(config_builder(&server).scope("read").build().unwrap()).unwrap();
    let write = OAuth2Layer::new(config_builder(&server).scope("write").build().unwrap()).unwrap();
    let url = server.api_url("/v1/ping");
    status_of(api(&read), get(&url)).await.unwrap();
    status_of(api(&write), get(&url)).await.unwrap();
    assert_eq!(server.token_requests(), 2);
    let (read, write) = (
        read.token_cache().access_token().unwrap(),
        write.token_cache().access_token().unwrap(),
    );
    assert_ne!(read, write);
}
