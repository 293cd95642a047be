//! An axum 0.8 handler forwarding its inbound body (`axum::body::Body`) to the API through the
//! layered client held in the router's state: a 401 on a small body is replayed; a body over
//! the cap is sent once and its 401 returned, with the token invalidated. Feature `axum`.
#![cfg(feature = "axum")]

mod common;

use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nuvy_oauth2::OAuth2RetryService;
use tower::{ServiceBuilder, ServiceExt};

type Outbound = OAuth2RetryService<Client<HttpConnector, axum::body::Body>>;

#[derive(Clone)]
struct AppState {
    api: Outbound,
    api_url: String,
}

async fn forward(
    State(state): State<AppState>,
    body: axum::body::Body,
) -> Result<axum::response::Response, StatusCode> {
    let request = Request::post(&state.api_url)
        .body(body)
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let response = state
        .api
        .oneshot(request)
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    Ok(response.map(axum::body::Body::new))
}

/// Starts the axum app on loopback; returns its URL.
async fn start_app(api: Outbound, api_url: String) -> String {
    let app = Router::new()
        .route("/forward", post(forward))
        .with_state(AppState { api, api_url });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/forward")
}

async fn post_bytes(url: &str, len: usize) -> (StatusCode, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(url)
        .body(Full::new(Bytes::from(vec![b'x'; len])))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test(start_paused = true)]
async fn an_axum_handler_forwarding_its_body_gets_small_bodies_replayed_and_large_ones_sent_once() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server).max_replay_body_bytes(16 * 1024);
    let api = ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(Client::builder(TokioExecutor::new()).build_http());
    let app = start_app(api, server.api_url("/v1/orders")).await;

    let (status, _) = post_bytes(&app, 100).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.token_requests(), 1);

    // A small body after a server-side revocation: replayed, the caller sees a 200.
    age_and_revoke_tokens(&server).await;
    let (status, body) = post_bytes(&app, 2000).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["body_bytes"], 2000);
    assert_eq!(server.token_requests(), 2);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
    let api_requests = server.api_requests();

    // A body over the cap after a revocation: sent once, its 401 returned, the token dropped.
    age_and_revoke_tokens(&server).await;
    let (status, _) = post_bytes(&app, 64 * 1024).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.api_requests(), api_requests + 1, "sent once");
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
    assert_eq!(
        layer.token_cache().current_generation(),
        0,
        "the rejected token was invalidated"
    );
    let (status, _) = post_bytes(&app, 64 * 1024).await;
    assert_eq!(status, StatusCode::OK, "the next request gets a new token");
    assert_eq!(server.token_requests(), 3);
}
