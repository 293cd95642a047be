//! Secret rotation without a restart: a secret file re-read when it changes, a callback read
//! again after `invalid_client`, and a server that accepts several secrets during the rotation.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::{ClientCredentials, ClientSecret, OAuth2Config, OAuth2Layer, SecretSource};

const NEW_SECRET: &str = "nuvy-test-secret-rotated";

fn layer_with(server: &NuvyServer, credentials: ClientCredentials) -> OAuth2Layer {
    let config = OAuth2Config::builder(credentials)
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true)
        .build()
        .unwrap();
    OAuth2Layer::new(config).unwrap()
}

/// A file of this test's own in the temporary directory, removed on drop.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn new(name: &str, content: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "nuvy-oauth2-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&path, content).unwrap();
        Self(path)
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn used_secret(server: &NuvyServer) -> bool {
    // BasicFormEncoded: the new secret, percent-encoded, in the Basic credentials.
    use base64::Engine as _;
    let request = server.last_token_request().unwrap();
    let value = request.headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim_start_matches("Basic "))
        .unwrap();
    String::from_utf8(decoded).unwrap().ends_with(NEW_SECRET)
}

#[tokio::test(start_paused = true)]
async fn rotating_the_secret_on_disk_and_on_the_server_fails_no_request() {
    let server = server(Duration::from_secs(600)).await;
    let file = SecretFile::new("secret", &format!("{}\n", server.client_secret()));
    let credentials =
        ClientCredentials::with_secret_source(server.client_id(), SecretSource::file(&file.0))
            .unwrap();
    let layer = layer_with(&server, credentials);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    let old = server.client_secret().to_owned();
    for step in 0..40 {
        match step {
            // The rotation, as an operator does it: the server accepts both, the file gets the
            // new secret, the server drops the old one.
            10 => server.set_client_secrets(&[&old, NEW_SECRET]),
            15 => std::fs::write(&file.0, format!("{NEW_SECRET}\n")).unwrap(),
            20 => server.set_client_secrets(&[NEW_SECRET]),
            _ => {}
        }
        let status = status_of(api.clone(), get(&url)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "step {step}");
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert!(
        used_secret(&server),
        "the last token request used the new secret"
    );
    assert_eq!(layer.token_cache().status().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn invalid_client_reads_the_callback_again_and_retries_at_once() {
    let server = server(Duration::from_secs(600)).await;
    let current = Arc::new(Mutex::new(server.client_secret().to_owned()));
    let source = {
        let current = current.clone();
        SecretSource::callback(move || Ok(ClientSecret::new(current.lock().unwrap().clone())))
    };
    let credentials = ClientCredentials::with_secret_source(server.client_id(), source).unwrap();
    let layer = layer_with(&server, credentials);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );

    // The secret is rotated in the secrets manager and on the server at once; the old token
    // expires.
    *current.lock().unwrap() = NEW_SECRET.to_owned();
    server.set_client_secrets(&[NEW_SECRET]);
    tokio::time::advance(Duration::from_secs(601)).await;
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    // The old secret was refused once, then the new one sent at once: no pause.
    assert_eq!(server.token_requests(), 3);
    assert!(used_secret(&server));
}

#[tokio::test(start_paused = true)]
async fn invalid_client_with_an_unchanged_secret_is_reported_as_before() {
    let server = server(Duration::from_secs(600)).await;
    let secret = server.client_secret().to_owned();
    let source = SecretSource::callback(move || Ok(ClientSecret::new(secret.clone())));
    let credentials = ClientCredentials::with_secret_source(server.client_id(), source).unwrap();
    let layer = layer_with(&server, credentials);
    server.set_client_secrets(&[NEW_SECRET]);
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert!(crate_error(&error).is_invalid_client());
    assert_eq!(server.token_requests(), 1, "no retry with the same secret");
}

#[test]
fn an_unreadable_or_unusable_source_is_refused_at_once() {
    let missing = ClientCredentials::with_secret_source(
        "id",
        SecretSource::file("/nonexistent/nuvy-oauth2/secret"),
    );
    assert!(missing.is_err());
    let file = SecretFile::new("bad", "bad\u{7}secret\n");
    let error =
        ClientCredentials::with_secret_source("id", SecretSource::file(&file.0)).unwrap_err();
    assert!(!error.to_string().contains("bad"));
    let failing = SecretSource::callback(|| Err("vault sealed".into()));
    assert!(ClientCredentials::with_secret_source("id", failing).is_err());
}
