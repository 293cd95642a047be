//! A tonic client over a `Channel` wrapped by the layer with retry, calling a health service
//! whose interceptor accepts exactly the tokens the embedded Nuvy server accepts; after a
//! server-side revocation the next call recovers (one token request, no error seen).
//!
//! ```text
//! cargo run --features tonic --example tonic_channel
//! ```

use std::sync::Arc;

use http::HeaderValue;
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Endpoint;
use tonic::{Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceBuilder;

#[path = "../src/test_util/mod.rs"]
#[allow(dead_code, unused_imports, unreachable_pub)]
mod test_util;

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    // The API side: the embedded Nuvy server issues and revokes tokens; the gRPC service
    // checks each call's bearer token against it and answers UNAUTHENTICATED otherwise.
    let nuvy = Arc::new(test_util::NuvyServer::start().await?);
    let check = Arc::clone(&nuvy);
    let interceptor = move |request: Request<()>| {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| HeaderValue::from_bytes(value.as_bytes()).ok());
        match check.accepts_authorization(authorization.as_ref()) {
            true => Ok(request),
            false => Err(Status::unauthenticated("invalid token")),
        }
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?;
    let addr = incoming.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                health,
                interceptor,
            ))
            .serve_with_incoming(incoming),
    );

    // The client: the usual stack, one line around the channel.
    let config = OAuth2Config::builder(ClientCredentials::new(
        nuvy.client_id(),
        nuvy.client_secret(),
    ))
    .token_endpoint(nuvy.token_endpoint())
    .allow_insecure_http(true) // loopback only
    .build()?;
    let auth = OAuth2Layer::new(config)?;
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(
        ServiceBuilder::new()
            .layer(auth.clone().with_retry())
            .service(channel),
    );

    let request = || HealthCheckRequest {
        service: String::new(),
    };
    let mut failed = 0;
    for _ in 0..3 {
        failed += usize::from(client.check(request()).await.is_err());
    }
    nuvy.revoke_all_tokens();
    for _ in 0..3 {
        failed += usize::from(client.check(request()).await.is_err());
    }
    let token_requests = auth.token_cache().token_requests();
    let replays = auth.token_cache().unauthorized_retries();
    println!("6 calls, {failed} failed, {token_requests} token requests, {replays} replay(s)");
    if failed != 0 || token_requests != 2 || replays != 1 {
        return Err("the revocation was not recovered as expected".into());
    }
    Ok(())
}
