//! The token-rejection retry as a `tower::retry::Policy` (`OAuth2Layer::retry_policy`) in a
//! stack built by hand with `tower::retry::RetryLayer`: one refresh, one retry, never a loop.

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use tower::retry::RetryLayer;
use tower::{ServiceBuilder, ServiceExt};

async fn status_through_policy(
    layer: &nuvy_oauth2::OAuth2Layer,
    policy: nuvy_oauth2::UnauthorizedRetryPolicy,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> StatusCode {
    let api = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .layer(layer.clone())
        .service(http_client());
    api.oneshot(request).await.expect("response").status()
}

#[tokio::test(start_paused = true)]
async fn the_policy_recovers_from_a_revoked_token_with_one_refresh_and_one_retry() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let url = server.api_url("/v1/ping");
    let first = status_through_policy(&layer, layer.retry_policy(), get(&url)).await;
    assert_eq!(first, StatusCode::OK);

    age_and_revoke_tokens(&server).await;
    let status = status_through_policy(&layer, layer.retry_policy(), get(&url)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.token_requests(), 2);
    assert_eq!(server.api_unauthorized(), 1);
    assert_eq!(server.api_requests(), 3);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_policy_retries_once_and_returns_a_persistent_401() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let url = server.api_url("/v1/ping");
    status_through_policy(&layer, layer.retry_policy(), get(&url)).await;
    tokio::time::advance(nuvy_oauth2::REJECTED_GENERATION_WINDOW).await;
    server.reject_all_api_requests(true);
    let status = status_through_policy(&layer, layer.retry_policy(), get(&url)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        server.api_requests(),
        3,
        "one success, the original, one retry"
    );
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_idempotent_only_policy_returns_the_401_of_a_post() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let url = server.api_url("/v1/ping");
    status_through_policy(&layer, layer.retry_policy(), get(&url)).await;
    age_and_revoke_tokens(&server).await;
    let mut post = get(&url);
    *post.method_mut() = Method::POST;
    let policy = layer.retry_policy().idempotent_only();
    let status = status_through_policy(&layer, policy, post).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.api_requests(), 2, "one success, the POST sent once");
    assert_eq!(layer.token_cache().unauthorized_retries(), 0);
}
