//! An axum 0.8 handler that calls the Nuvy API through the layered client held in the router's
//! state, forwarding its inbound body (`axum::body::Body`, replayed after a 401 when it fits
//! the 64 KiB cap), against the embedded server.
//!
//! ```text
//! cargo run --features axum --example axum_outbound
//! ```

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer, OAuth2RetryService};
use tower::{ServiceBuilder, ServiceExt};

#[path = "../src/test_util/mod.rs"]
#[allow(dead_code, unused_imports, unreachable_pub)]
mod test_util;

/// The outbound client: the usual stack over hyper-util's client, sending axum's body.
type Api = OAuth2RetryService<Client<HttpConnector, axum::body::Body>>;

#[derive(Clone)]
struct AppState {
    api: Api,
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

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let nuvy = test_util::NuvyServer::start().await?;
    let config = OAuth2Config::builder(ClientCredentials::new(
        nuvy.client_id(),
        nuvy.client_secret(),
    ))
    .token_endpoint(nuvy.token_endpoint())
    .allow_insecure_http(true) // loopback only
    .build()?;
    let auth = OAuth2Layer::new(config)?;
    let api = ServiceBuilder::new()
        .layer(auth.clone().with_retry())
        .service(Client::builder(TokioExecutor::new()).build_http());
    let app = Router::new()
        .route("/forward", post(forward))
        .with_state(AppState {
            api,
            api_url: nuvy.api_url("/v1/orders"),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/forward", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let caller = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let post = || Request::post(&url).body(Full::from(r#"{"qty":3}"#));
    let first = caller.request(post()?).await?.status();
    nuvy.revoke_all_tokens();
    let after_revocation = caller.request(post()?).await?.status();
    let token_requests = auth.token_cache().token_requests();
    println!("{first} then {after_revocation} after a revocation; {token_requests} token requests");
    if first != StatusCode::OK || after_revocation != StatusCode::OK || token_requests != 2 {
        return Err("the forwarded body was not replayed as expected".into());
    }
    Ok(())
}
