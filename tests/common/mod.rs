//! Shared helpers: every test talks HTTP to the embedded server on loopback.
//!
//! **How a test gets the embedded server:** `mod common;` then `use common::*;` (or
//! `use common::{NuvyServer, ScriptedResponse};`). Never `nuvy_oauth2::test_util`: the
//! crate has no dev-dependency on itself (`cargo package` would drop it, and the packaged
//! tests would not compile). Instead `src/test_util/` is compiled into each test binary by
//! `#[path]` below; it uses only the crate's public API (through `nuvy_oauth2::` paths, never
//! `crate::`), so the same files also build as the public `nuvy_oauth2::test_util` module
//! (feature `test-util`) for users. Examples and benches include it the same way.
#![allow(dead_code, unreachable_pub, unused_imports)]

#[path = "../../src/test_util/mod.rs"]
pub mod test_util;

/// A private CA and a TLS front for the embedded server (HTTPS on loopback).
pub mod tls;

/// An HTTP CONNECT proxy on loopback that records what it was asked.
pub mod proxy;

/// A `tracing` writer that keeps what the crate logged.
pub mod logs;
pub use logs::CapturedLogs;

pub use test_util::{NuvyServer, NuvyServerBuilder, RecordedRequest, ScriptedResponse};

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nuvy_oauth2::{
    ClientCredentials, OAuth2Config, OAuth2ConfigBuilder, OAuth2Layer, OAuth2RetryService,
};
use tower::{BoxError, ServiceBuilder, ServiceExt};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;
pub type Api = OAuth2RetryService<HttpClient>;

pub async fn server(lifetime: Duration) -> NuvyServer {
    NuvyServer::builder()
        .token_lifetime(lifetime)
        .start()
        .await
        .expect("bind 127.0.0.1")
}

pub fn config_builder(server: &NuvyServer) -> OAuth2ConfigBuilder {
    OAuth2Config::builder(ClientCredentials::new(
        server.client_id(),
        server.client_secret(),
    ))
    .token_endpoint(server.token_endpoint())
    .allow_insecure_http(true)
}

pub fn layer(server: &NuvyServer) -> OAuth2Layer {
    OAuth2Layer::new(config_builder(server).build().expect("config")).expect("layer")
}

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The usual stack: 401 retry outside the auth service, hyper-util's client inside.
pub fn api(layer: &OAuth2Layer) -> Api {
    ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(http_client())
}

pub fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).expect("request")
}

pub async fn status_of(api: Api, request: Request<Full<Bytes>>) -> Result<StatusCode, BoxError> {
    let response: Response<_> = api.oneshot(request).await?;
    Ok(response.status())
}

/// `per_layer` concurrent GETs of `/v1/ping` through each layer's [`api`] stack, a clone per
/// request (as users send); every one must answer 200.
pub async fn ping_all_at_once(server: &NuvyServer, layers: &[OAuth2Layer], per_layer: usize) {
    let mut calls = tokio::task::JoinSet::new();
    for layer in layers {
        let api = api(layer);
        for _ in 0..per_layer {
            calls.spawn(status_of(api.clone(), get(&server.api_url("/v1/ping"))));
        }
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.expect("task").expect("call"), StatusCode::OK);
    }
}

/// Lets the cached token age past `REJECTED_GENERATION_WINDOW`, then revokes every token on
/// the server: the next API call meets a lone 401 that warrants one refresh and one replay.
pub async fn age_and_revoke_tokens(server: &NuvyServer) {
    tokio::time::advance(nuvy_oauth2::REJECTED_GENERATION_WINDOW).await;
    server.revoke_all_tokens();
}

/// The crate's error inside a service error.
pub fn crate_error(error: &BoxError) -> &nuvy_oauth2::Error {
    error
        .downcast_ref::<nuvy_oauth2::Error>()
        .unwrap_or_else(|| panic!("not a nuvy_oauth2::Error: {error}"))
}
