//! The refresh state machine under hostile interleavings: stalled and vanished runtimes, a
//! blocked thread, a failing refresh-ahead. Only the current flight writes; deadlines count
//! from the flight's start; every refresh that ends without a token is a failure followed by
//! backoff, and its waiters on live runtimes get a token from the next flight.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::{ErrorKind, OAuth2Layer};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_test::{assert_pending, task};

fn paused_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

type Caller = task::Spawn<
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<StatusCode, tower::BoxError>>>>,
>;

/// Starts a request on `runtime` and leaves it there: the refresh task it spawned is never
/// run unless `runtime` is driven again (a stalled runtime, or one about to shut down).
fn start_refresh_on(runtime: &Runtime, layer: &OAuth2Layer, url: &str) -> Caller {
    #[allow(clippy::async_yields_async)]
    runtime.block_on(async {
        let mut first: Caller = task::spawn(Box::pin(status_of(api(layer), get(url))));
        assert_pending!(first.poll());
        first
    })
}

#[test]
fn a_refresh_stalled_on_another_runtime_is_given_up_at_its_deadline_and_never_writes_later() {
    let stalled = paused_runtime();
    let live = paused_runtime();
    let server = live.block_on(server(Duration::from_secs(3600)));
    let config = config_builder(&server)
        .token_request_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let url = server.api_url("/v1/ping");
    let mut stalled_caller = start_refresh_on(&stalled, &layer, &url);

    #[allow(clippy::async_yields_async)]
    let next = live.block_on(async {
        let started = Instant::now();
        tokio::time::advance(Duration::from_millis(500)).await;
        let error = status_of(api(&layer), get(&url)).await.unwrap_err();
        assert!(crate_error(&error).is_timeout());
        // The deadline is the flight's: its start + 2 s + 1 s of grace, not 3 s after this
        // caller came (3.5 s).
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(2900) && waited < Duration::from_millis(3400),
            "{waited:?}"
        );
        let status = layer.token_cache().status();
        assert_eq!(status.consecutive_failures, 1, "a lost flight is a failure");
        assert!(!status.refresh_in_flight);

        // After the backoff, a new flight on the live runtime, left in flight (the live runtime
        // is not driven while the stalled one runs).
        tokio::time::advance(nuvy_oauth2::MIN_FAILURE_BACKOFF).await;
        let next = tokio::spawn(status_of(api(&layer), get(&url)));
        while layer.token_cache().token_requests() == 0 {
            tokio::task::yield_now().await;
        }
        next
    });

    // The stalled runtime runs again, beside the new flight: the given-up flight sends and
    // writes nothing, and the caller that started it joins the new flight.
    stalled.block_on(async {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_pending!(stalled_caller.poll());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(layer.token_cache().token_requests(), 1);
        assert!(layer.token_cache().status().refresh_in_flight);
    });
    live.block_on(async {
        assert_eq!(next.await.unwrap().unwrap(), StatusCode::OK);
        assert_eq!(
            server.token_requests(),
            1,
            "the given-up flight sent nothing"
        );
        let status = layer.token_cache().status();
        assert_eq!(status.generation, 1);
        assert_eq!(status.consecutive_failures, 0);
        assert!(status.last_error.is_none());
        assert_eq!(
            status_of(api(&layer), get(&url)).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(server.token_requests(), 1);
    });
    drop(stalled_caller);
}

#[test]
fn a_waiter_whose_refresh_runtime_shut_down_gets_its_token_from_a_new_refresh() {
    let live = paused_runtime();
    let server = live.block_on(server(Duration::from_secs(3600)));
    let layer = layer(&server);
    let url = server.api_url("/v1/ping");
    let doomed = paused_runtime();
    drop(start_refresh_on(&doomed, &layer, &url));

    // A caller on the live runtime joins that refresh.
    #[allow(clippy::async_yields_async)]
    let waiter = live.block_on(async {
        let waiter = tokio::spawn(status_of(api(&layer), get(&url)));
        tokio::task::yield_now().await;
        assert!(layer.token_cache().status().refresh_in_flight);
        waiter
    });
    // The runtime that ran the refresh shuts down (a #[tokio::test] ending, a CLI's runtime).
    drop(doomed);

    live.block_on(async {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // Counted as a failure, with the next flight held back by the backoff...
        let status = layer.token_cache().status();
        assert_eq!(status.consecutive_failures, 1);
        assert!(matches!(
            status.last_error.unwrap().kind(),
            ErrorKind::RefreshAborted
        ));
        assert_eq!(server.token_requests(), 0);
        // ...then the waiter starts it itself and gets its token.
        assert_eq!(waiter.await.unwrap().unwrap(), StatusCode::OK);
        assert_eq!(server.token_requests(), 1);
        let status = layer.token_cache().status();
        assert_eq!((status.generation, status.consecutive_failures), (1, 0));
    });
}

#[test]
fn a_refresh_lost_with_its_runtime_is_a_failure_followed_by_backoff_not_an_error() {
    let live = paused_runtime();
    let server = live.block_on(server(Duration::from_secs(3600)));
    let layer = layer(&server);
    let url = server.api_url("/v1/ping");
    let doomed = paused_runtime();
    drop(start_refresh_on(&doomed, &layer, &url));
    assert!(layer.token_cache().status().refresh_in_flight);
    drop(doomed);
    assert!(
        !layer.token_cache().status().refresh_in_flight,
        "a refresh whose runtime is gone is not in flight"
    );

    live.block_on(async {
        // A new caller finds the refresh gone: no RefreshAborted, no immediate retry either.
        let started = Instant::now();
        assert_eq!(
            status_of(api(&layer), get(&url)).await.unwrap(),
            StatusCode::OK
        );
        assert!(started.elapsed() >= nuvy_oauth2::MIN_FAILURE_BACKOFF / 2);
        assert_eq!(server.token_requests(), 1);
    });
}

#[test]
fn a_thread_blocked_past_the_deadline_never_puts_two_token_requests_in_flight() {
    // The server has a thread of its own, so token requests progress while the client's
    // one thread is blocked by user code.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = server_runtime.block_on(server(Duration::from_secs(3600)));
    server.delay_next_token_requests(3, Duration::from_millis(100));
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client.block_on(async {
        let config = config_builder(&server)
            .token_request_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let layer = OAuth2Layer::new(config).unwrap();
        let url = server.api_url("/v1/ping");
        // Callers that try again 10 ms after any error, until they get through.
        let until_ok = |api: Api, url: String| async move {
            loop {
                match status_of(api.clone(), get(&url)).await {
                    Ok(status) => return status,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        let mut first = task::spawn(until_ok(api(&layer), url.clone()));
        assert_pending!(first.poll());
        // User code blocks the runtime's only thread past every deadline of the refresh.
        std::thread::sleep(Duration::from_millis(1500));
        let mut calls = JoinSet::new();
        for _ in 0..10 {
            calls.spawn(until_ok(api(&layer), url.clone()));
        }
        assert_eq!(first.await, StatusCode::OK);
        while let Some(status) = calls.join_next().await {
            assert_eq!(status.unwrap(), StatusCode::OK);
        }
        assert_eq!(server.max_concurrent_token_requests(), 1);
        let status = layer.token_cache().status();
        assert_eq!(status.generation, 1, "one token installed");
        assert!(status.last_error.is_none());
    });
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_tries_again_after_a_failure_so_nobody_waits() {
    let server = server(Duration::from_secs(1000)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    let first = server.last_api_authorization().unwrap();

    // Past the refresh-ahead point; its refresh meets one 503.
    tokio::time::advance(Duration::from_secs(850)).await;
    server.fail_next_token_requests(1, 503);
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(layer.token_cache().status().consecutive_failures, 1);
    assert_eq!(server.last_api_authorization().unwrap(), first);

    // Once the backoff is over, the next request tries again in the background.
    tokio::time::advance(nuvy_oauth2::MIN_FAILURE_BACKOFF).await;
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let status = layer.token_cache().status();
    assert_eq!((status.generation, status.consecutive_failures), (2, 0));
    assert_eq!(server.token_requests(), 3);

    // At 941 s (past the first token's refresh point) nobody waits, even on a slow endpoint.
    tokio::time::advance(Duration::from_secs(90)).await;
    server.delay_next_token_requests(1, Duration::from_secs(5));
    let started = Instant::now();
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_ne!(server.last_api_authorization().unwrap(), first);
}

#[test]
fn a_refresh_whose_task_first_runs_at_its_deadline_sends_and_counts_nothing() {
    let runtime = paused_runtime();
    let server = runtime.block_on(server(Duration::from_secs(3600)));
    let config = config_builder(&server)
        .token_request_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let url = server.api_url("/v1/ping");
    drop(start_refresh_on(&runtime, &layer, &url));
    runtime.block_on(async {
        // The runtime comes back exactly at the refresh's deadline: its task gives up unsent.
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let status = layer.token_cache().status();
        assert_eq!(status.token_requests, 0);
        assert_eq!(status.consecutive_failures, 1);
        assert!(status.last_error.unwrap().is_timeout());
        assert_eq!(server.token_requests(), 0);
    });
}

#[tokio::test(start_paused = true)]
async fn the_refresh_point_and_the_expiry_are_exact_instants() {
    // 600 s tokens: refresh point at 540 s (60 s margin), expiry at 600 s.
    let server = server(Duration::from_secs(600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    let cache = layer.token_cache();

    tokio::time::advance(Duration::from_secs(540) - Duration::from_nanos(1)).await;
    assert!(
        cache.access_token().is_some(),
        "usable until the refresh point"
    );
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(cache.access_token().is_none(), "not at the refresh point");
    assert_eq!(cache.status().token_valid_for, None);
    // From the refresh point on, a fresh service waits for a new token.
    status_of(api.clone(), get(&url)).await.unwrap();
    assert_eq!(server.token_requests(), 2);

    // The second token is refreshed at 540 s too; there a failing refresh keeps serving it
    // until, and not at, its expiry.
    tokio::time::advance(Duration::from_secs(540)).await;
    server.fail_next_token_requests(1, 503);
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        http::StatusCode::OK
    );
    tokio::time::advance(Duration::from_secs(60)).await;
    server.fail_next_token_requests(1, 503);
    let api_requests = server.api_requests();
    let error = status_of(api.clone(), get(&url)).await.unwrap_err();
    assert_eq!(
        crate_error(&error).status(),
        Some(http::StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(
        server.api_requests(),
        api_requests,
        "the expired token was not sent"
    );
}

#[tokio::test(start_paused = true)]
async fn during_a_transient_backoff_callers_without_a_token_get_the_last_error_at_once() {
    let server = server(Duration::from_secs(3600)).await;
    server.fail_next_token_requests(1, 503);
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap_err();
    let started = Instant::now();
    let error = status_of(api.clone(), get(&url)).await.unwrap_err();
    assert_eq!(
        crate_error(&error).status(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "not held until the backoff ends"
    );
    assert_eq!(server.token_requests(), 1);
}
