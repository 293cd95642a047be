//! Starts like a real application: builds nuvy-oauth2's layer (no process-wide TLS provider
//! installed yet, so the crate uses the one its feature chose), then the README's hyper-rustls
//! connector (`with_webpki_roots()`, which panicked when the crate had compiled a second
//! provider into rustls), calls the embedded server's API through both, then builds a second
//! layer now that hyper-rustls installed the process default (the crate uses that one).

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use nuvy_oauth2::test_util::NuvyServer;
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer};
use tower::{BoxError, ServiceBuilder, ServiceExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let server = NuvyServer::start().await?;
    let config = || {
        OAuth2Config::builder(ClientCredentials::new(
            server.client_id(),
            server.client_secret(),
        ))
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true) // loopback only
        .build()
    };
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    let auth = OAuth2Layer::new(config()?)?;
    // An https token endpoint: the crate builds its rustls configuration here.
    let https_endpoint = OAuth2Config::builder(ClientCredentials::new("app", "secret"))
        .token_endpoint("https://auth.example/oauth2/token")
        .build()?;
    OAuth2Layer::new(https_endpoint)?;

    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(https);
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());

    let second = OAuth2Layer::new(config()?)?;
    for auth in [auth, second] {
        let api = ServiceBuilder::new()
            .layer(auth.clone().with_retry())
            .service(client.clone());
        let request = http::Request::get(server.api_url("/v1/ping")).body(Empty::new())?;
        let response = api.oneshot(request).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(auth.token_cache().token_requests(), 1);
    }
    println!(
        "ok: hyper-rustls and nuvy-oauth2 share one rustls provider; {} token requests",
        server.token_requests()
    );
    Ok(())
}
