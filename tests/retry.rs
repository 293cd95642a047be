//! The 401 retry: one refresh, one replay, never a loop.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body::Frame;
use http_body_util::channel::Channel;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tower::{BoxError, ServiceBuilder, ServiceExt};

#[tokio::test(start_paused = true)]
async fn a_401_from_the_api_causes_one_refresh_and_one_retry() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();

    age_and_revoke_tokens(&server).await;
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(server.token_requests(), 2);
    assert_eq!(server.api_unauthorized(), 1);
    assert_eq!(server.api_requests(), 3);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_persistent_401_is_returned_after_one_retry() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::advance(nuvy_oauth2::REJECTED_GENERATION_WINDOW).await;
    server.reject_all_api_requests(true);
    let status = status_of(api, get(&url)).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        server.api_requests(),
        3,
        "one success, then the original and one replay"
    );
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_server_rejecting_every_token_costs_one_token_request_per_backoff_step() {
    let server = server(Duration::from_secs(3600)).await;
    server.reject_all_api_requests(true);
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    // 60 s of traffic, 10 concurrent requests every 100 ms: 6,000 requests, all 401.
    for _ in 0..600 {
        let mut calls = JoinSet::new();
        for _ in 0..10 {
            calls.spawn(status_of(api.clone(), get(&url)));
        }
        while let Some(result) = calls.join_next().await {
            assert_eq!(result.unwrap().unwrap(), StatusCode::UNAUTHORIZED);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    // The first token's 401 is replayed (one rejection always may); the second generation
    // rejected moments after issue starts the backoff: 1 s, 2 s, 4 s, 8 s, 16 s, then 30 s.
    // New tokens at 0 s (two), 1 s, 3 s, 7 s, 15 s and 31 s: seven in 60 s.
    assert_eq!(server.token_requests(), 7);
    // Each step's burst is replayed once, with the one new token of that step.
    assert_eq!(layer.token_cache().unauthorized_retries(), 6 * 10);
}

#[tokio::test(start_paused = true)]
async fn a_token_revoked_right_after_issue_costs_one_refresh_and_no_failed_request() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    // Revoked at once, then 1,000 requests together: each is replayed with the one new token.
    server.revoke_all_tokens();
    let mut calls = JoinSet::new();
    for _ in 0..1000 {
        calls.spawn(status_of(api.clone(), get(&url)));
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(server.token_requests(), 2);
    assert_eq!(layer.token_cache().status().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn a_lone_401_on_a_cold_cache_is_replayed() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    // The API refuses the very first token (say, its keys were rotated a moment too late).
    server.reject_all_api_requests(true);
    let mut first = Box::pin(status_of(api.clone(), get(&url)));
    // Let the first API answer arrive, then heal the API before the replay.
    while server.api_unauthorized() == 0 {
        tokio::select! {
            biased;
            result = &mut first => panic!("returned before the replay: {result:?}"),
            () = tokio::task::yield_now() => {}
        }
    }
    server.reject_all_api_requests(false);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn idempotent_only_retry_replays_get_but_not_post() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = tower::ServiceBuilder::new()
        .layer(layer.clone().with_idempotent_retry())
        .service(http_client());
    let url = server.api_url("/v1/orders");
    api.clone().oneshot(get(&url)).await.unwrap();
    age_and_revoke_tokens(&server).await;
    let post = http::Request::post(&url).body(Full::from("x")).unwrap();
    let response = api.clone().oneshot(post).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "POST is not replayed"
    );
    // The token was invalidated all the same; a GET on a revoked token is replayed.
    let status = api.clone().oneshot(get(&url)).await.unwrap().status();
    assert_eq!(status, StatusCode::OK);
    age_and_revoke_tokens(&server).await;
    let status = api.clone().oneshot(get(&url)).await.unwrap().status();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_401s_for_the_same_token_cause_one_refresh() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();

    age_and_revoke_tokens(&server).await;
    let mut calls = JoinSet::new();
    for _ in 0..100 {
        calls.spawn(status_of(api.clone(), get(&url)));
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(
        server.token_requests(),
        2,
        "one initial token, one refresh for the burst"
    );
}

#[tokio::test(start_paused = true)]
async fn a_replayed_request_keeps_its_method_and_body() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/orders");
    status_of(api.clone(), get(&url)).await.unwrap();
    age_and_revoke_tokens(&server).await;

    let request = http::Request::post(&url)
        .body(Full::new(Bytes::from_static(b"{\"qty\":3}")))
        .unwrap();
    let response = api.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["method"], "POST");
    assert_eq!(json["body_bytes"], 9);
}

#[tokio::test(start_paused = true)]
async fn a_401_is_replayed_below_a_concurrency_limit_of_one() {
    // The first attempt's future, and the permit it holds, are gone before the replay waits
    // for the service to be ready: else the replay would wait for itself.
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .concurrency_limit(1)
        .service(http_client());
    let url = server.api_url("/v1/ping");
    assert_eq!(
        api.clone().oneshot(get(&url)).await.unwrap().status(),
        StatusCode::OK
    );
    age_and_revoke_tokens(&server).await;
    let response = tokio::time::timeout(Duration::from_secs(60), api.oneshot(get(&url)))
        .await
        .expect("the replay must not wait for the first attempt's permit")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

#[tokio::test]
async fn the_retry_future_polled_again_after_its_output_stays_pending() {
    use tower::Service;
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let mut api = api(&layer);
    let url = server.api_url("/v1/ping");
    ServiceExt::<http::Request<Full<Bytes>>>::ready(&mut api)
        .await
        .unwrap();
    let mut future = tokio_test::task::spawn(api.call(get(&url)));
    let response = std::future::poll_fn(|cx| {
        // Each wake-up polls the future again through the task, as an executor would.
        let poll = future.poll();
        if poll.is_pending() {
            cx.waker().wake_by_ref();
        }
        poll
    })
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio_test::assert_pending!(future.poll());
    assert!(format!("{future:?}").contains("done"), "{future:?}");
}

type Streaming = UnsyncBoxBody<Bytes, BoxError>;

/// A body of `chunks` frames of `chunk_len` bytes each, with no size known in advance (a
/// stream, as a forwarded upload is).
fn streamed(chunks: usize, chunk_len: usize) -> Streaming {
    let (mut sender, body) = Channel::<Bytes, BoxError>::new(chunks + 1);
    for _ in 0..chunks {
        sender
            .try_send(Frame::data(Bytes::from(vec![b'x'; chunk_len])))
            .expect("buffer holds every chunk");
    }
    drop(sender);
    body.boxed_unsync()
}

fn streaming_api(
    layer: &nuvy_oauth2::OAuth2Layer,
) -> nuvy_oauth2::OAuth2RetryService<Client<HttpConnector, Streaming>> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Streaming>();
    ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(client)
}

#[tokio::test(start_paused = true)]
async fn a_401_on_a_small_streamed_body_is_replayed_from_the_bytes_kept_while_it_streamed() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = streaming_api(&layer);
    let url = server.api_url("/v1/upload");
    let request = http::Request::post(&url).body(streamed(1, 10)).unwrap();
    assert_eq!(
        api.clone().oneshot(request).await.unwrap().status(),
        StatusCode::OK
    );

    age_and_revoke_tokens(&server).await;
    // 3 chunks of 1,000 bytes: well under the 64 KiB cap.
    let request = http::Request::post(&url).body(streamed(3, 1000)).unwrap();
    let response = api.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json["body_bytes"], 3000,
        "the replay carried the whole body"
    );
    assert_eq!(server.api_requests(), 3, "one success, the 401, the replay");
    assert_eq!(server.token_requests(), 2);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_over_the_cap_is_sent_once_and_its_401_returned_with_the_token_invalidated()
{
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server).max_replay_body_bytes(4096);
    let api = streaming_api(&layer);
    let url = server.api_url("/v1/upload");
    let request = http::Request::post(&url).body(streamed(1, 10)).unwrap();
    assert_eq!(
        api.clone().oneshot(request).await.unwrap().status(),
        StatusCode::OK
    );

    age_and_revoke_tokens(&server).await;
    // 5 chunks of 1,000 bytes: over the 4,096-byte cap.
    let request = http::Request::post(&url).body(streamed(5, 1000)).unwrap();
    let response = api.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.api_requests(), 2, "never replayed");
    assert_eq!(layer.token_cache().unauthorized_retries(), 0);
    // The rejected token was invalidated all the same: the next request gets a new one.
    let nuvy_oauth2::UsedTokenGeneration(generation) = *response.extensions().get().unwrap();
    assert!(
        !layer.token_cache().invalidate(generation),
        "already invalidated"
    );
    let request = http::Request::post(&url).body(streamed(5, 1000)).unwrap();
    assert_eq!(api.oneshot(request).await.unwrap().status(), StatusCode::OK);
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_in_memory_body_over_the_cap_is_not_replayed_either() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server).max_replay_body_bytes(8);
    let api = api(&layer);
    let url = server.api_url("/v1/orders");
    status_of(api.clone(), get(&url)).await.unwrap();
    age_and_revoke_tokens(&server).await;
    let request = http::Request::post(&url)
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    assert_eq!(
        status_of(api.clone(), request).await.unwrap(),
        StatusCode::UNAUTHORIZED
    );
    let request = http::Request::post(&url)
        .body(Full::new(Bytes::from_static(b"01234567")))
        .unwrap();
    assert_eq!(status_of(api, request).await.unwrap(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn non_401_responses_are_never_retried() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    // 405 from the token path acting as an "API" route is not a 401: returned once.
    let status = status_of(api, get(&server.token_endpoint())).await.unwrap();
    assert_ne!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(layer.token_cache().unauthorized_retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_401_that_ends_a_rejection_backoff_causes_exactly_one_refresh() {
    let server = server(Duration::from_secs(3600)).await;
    server.reject_all_api_requests(true);
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    // The first token is rejected and replayed; the second, rejected too, starts the backoff.
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(server.token_requests(), 2);
    // Until the backoff ends, 401s come back as they are, without a token request.
    tokio::time::advance(nuvy_oauth2::REJECTED_GENERATION_BACKOFF - Duration::from_millis(1)).await;
    status_of(api.clone(), get(&url)).await.unwrap();
    assert_eq!(server.token_requests(), 2);
    assert_eq!(
        layer.token_cache().status().generation,
        2,
        "the token is kept"
    );
    // At the end of the backoff, a burst of 401s brings one new token.
    tokio::time::advance(Duration::from_millis(1)).await;
    let mut calls = JoinSet::new();
    for _ in 0..10 {
        calls.spawn(status_of(api.clone(), get(&url)));
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(server.token_requests(), 3);
}

/// A service below the retry layer that is never ready.
#[derive(Clone, Debug)]
struct NeverReady;

impl tower::Service<http::Request<Full<Bytes>>> for NeverReady {
    type Response = http::Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Pending
    }

    fn call(&mut self, _: http::Request<Full<Bytes>>) -> Self::Future {
        unreachable!("never ready, so never called")
    }
}

#[tokio::test]
async fn the_retry_layer_is_ready_only_when_the_service_below_is() {
    use tower::Layer;
    let server = server(Duration::from_secs(3600)).await;
    let mut service = layer(&server).with_retry().layer(NeverReady);
    let mut ready = tokio_test::task::spawn(ServiceExt::<http::Request<Full<Bytes>>>::ready(
        &mut service,
    ));
    tokio_test::assert_pending!(ready.poll());
}

#[tokio::test]
async fn the_retry_layer_and_its_future_say_what_they_are_in_debug_without_the_token() {
    use tower::{Layer, Service};
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let url = server.api_url("/v1/ping");
    status_of(api(&layer), get(&url)).await.unwrap();
    let token = layer.token_cache().access_token().unwrap();
    let mut service = layer.with_idempotent_retry().layer(http_client().clone());
    let debug = format!("{service:?}");
    assert!(debug.starts_with("RetryOnUnauthorized"), "{debug}");
    assert!(debug.contains("max_replay_body_bytes: 65536"), "{debug}");
    assert!(debug.contains("idempotent_only: true"), "{debug}");
    assert!(!debug.contains(token.expose_secret()));
    ServiceExt::<http::Request<Full<Bytes>>>::ready(&mut service)
        .await
        .unwrap();
    let future = service.call(get(&url));
    let debug = format!("{future:?}");
    assert!(debug.contains("first attempt"), "{debug}");
    assert!(!debug.contains(token.expose_secret()));
    assert_eq!(future.await.unwrap().status(), StatusCode::OK);
}
