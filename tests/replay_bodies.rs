//! `with_retry()` over every body type users send: in-memory bodies are replayed from a copy,
//! streaming ones (tonic's, axum's, boxed, `Incoming`, any body in `ReplayBody`) from the bytes
//! kept while they streamed.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nuvy_oauth2::{OAuth2Layer, OAuth2RetryService, ReplayBody};
use tower::{BoxError, ServiceBuilder, ServiceExt};

fn over<B>(layer: &OAuth2Layer) -> OAuth2RetryService<Client<HttpConnector, B>>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(Client::builder(TokioExecutor::new()).build_http::<B>())
}

/// Sends `request` after a server-side revocation; returns the status and the body size the
/// API saw.
async fn after_revocation<S, B>(
    server: &NuvyServer,
    api: S,
    request: Request<B>,
) -> (StatusCode, u64)
where
    S: tower::Service<
        Request<B>,
        Response = http::Response<nuvy_oauth2::ResponseBody<hyper::body::Incoming>>,
    >,
    S::Error: std::fmt::Debug,
{
    age_and_revoke_tokens(server).await;
    let response = api.oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (status, json["body_bytes"].as_u64().unwrap_or(0))
}

#[tokio::test(start_paused = true)]
async fn every_common_body_type_is_replayed_after_a_revocation() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let url = server.api_url("/v1/orders");
    status_of(api(&layer), get(&url)).await.unwrap();

    let api = over::<Empty<Bytes>>(&layer);
    let request = Request::get(&url).body(Empty::new()).unwrap();
    assert_eq!(
        after_revocation(&server, api, request).await,
        (StatusCode::OK, 0)
    );

    let api = over::<String>(&layer);
    let request = Request::post(&url).body("hello".to_owned()).unwrap();
    assert_eq!(
        after_revocation(&server, api, request).await,
        (StatusCode::OK, 5)
    );

    let api = over::<Full<Bytes>>(&layer);
    let request = Request::post(&url).body(Full::from("abc")).unwrap();
    assert_eq!(
        after_revocation(&server, api, request).await,
        (StatusCode::OK, 3)
    );

    type Boxed = UnsyncBoxBody<Bytes, BoxError>;
    let api = over::<Boxed>(&layer);
    let body = Full::from("boxed").map_err(Into::into).boxed_unsync();
    let request = Request::post(&url).body(body).unwrap();
    assert_eq!(
        after_revocation(&server, api, request).await,
        (StatusCode::OK, 5)
    );

    let replays = 5 + u64::from(cfg!(feature = "axum"));
    #[cfg(feature = "axum")]
    {
        let api = over::<axum::body::Body>(&layer);
        let body = axum::body::Body::from("axum");
        let request = Request::post(&url).body(body).unwrap();
        let seen = after_revocation(&server, api, request).await;
        assert_eq!(seen, (StatusCode::OK, 4));
    }

    // Any other body type, wrapped in `ReplayBody::new`.
    type Custom = Limited<Full<Bytes>>;
    let api = over::<ReplayBody<Custom>>(&layer);
    let body = ReplayBody::new(Limited::new(Full::from("limited"), 100));
    let request = Request::post(&url).body(body).unwrap();
    assert_eq!(
        after_revocation(&server, api, request).await,
        (StatusCode::OK, 7)
    );

    assert_eq!(layer.token_cache().unauthorized_retries(), replays);
    assert_eq!(server.token_requests(), replays + 1);
}

fn is_service<S: tower::Service<Request<B>>, B>(_: &S) {}

/// Compile-time check: a forwarded `hyper::body::Incoming` reaches the client as
/// `ReplayBody<Incoming>`.
#[allow(dead_code)]
fn forwarding_incoming_compiles(layer: OAuth2Layer) {
    let forwarding = over::<ReplayBody<hyper::body::Incoming>>(&layer);
    is_service::<_, hyper::body::Incoming>(&forwarding);
}

/// Compile-time check (feature `tonic`): `ServiceBuilder::new().layer(auth.with_retry())
/// .service(channel)` is a gRPC service for tonic's generated clients.
#[cfg(feature = "tonic")]
#[allow(dead_code)]
fn tonic_channel_stack_compiles(layer: OAuth2Layer) {
    let channel = tonic::transport::Channel::from_static("http://127.0.0.1:1").connect_lazy();
    let grpc = ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(channel);
    is_service::<_, tonic::body::Body>(&grpc);
    let _health = tonic_health::pb::health_client::HealthClient::new(grpc);
}
