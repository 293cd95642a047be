//! Secrets never leak: not through `Debug`, `Display`, errors or `tracing` output at TRACE
//! level. Alone in its binary because it installs the global `tracing` subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use nuvy_oauth2::{ClientCredentials, ClientSecret, OAuth2Config, OAuth2Layer};
use tower::ServiceExt;

const SECRET: &str = "s3cr3t-p@ss:w+rd/%=";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_clean(text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(!text.contains(secret), "leaked {secret:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn no_debug_display_error_or_trace_output_shows_a_secret_or_a_token() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Global, not scoped: callsite interest is cached process-wide, and this binary has no
    // other test that could race it.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let server = NuvyServer::builder()
        .client_secret(SECRET)
        .token_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let credentials = ClientCredentials::new(server.client_id(), SECRET);
    let builder = OAuth2Config::builder(credentials.clone())
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true);
    let config = builder.clone().build().unwrap();
    let layer = OAuth2Layer::new(config.clone()).unwrap();
    let api = api(&layer);
    let url = server.api_url("/v1/ping");

    // Success, a 401 replay, and failed token requests of several kinds.
    status_of(api.clone(), get(&url)).await.unwrap();
    age_and_revoke_tokens(&server).await;
    status_of(api.clone(), get(&url)).await.unwrap();
    let token = layer.token_cache().access_token().unwrap();
    let old_token = server.last_token_request().unwrap();
    let mut errors = Vec::new();
    for scripted in [
        ScriptedResponse::json(401, r#"{"error":"invalid_client"}"#),
        ScriptedResponse::json(
            200,
            format!(r#"{{"access_token":"{SECRET}","expires_in":"x"}}"#),
        ),
        ScriptedResponse::status(502)
            .header("content-type", "text/html")
            .body(format!("<html>{SECRET}</html>")),
    ] {
        layer
            .token_cache()
            .invalidate(layer.token_cache().current_generation());
        server.push_token_response(scripted);
        errors.push(status_of(api.clone(), get(&url)).await.unwrap_err());
        tokio::time::advance(nuvy_oauth2::PERMANENT_FAILURE_PAUSE).await;
    }
    let wrong = OAuth2Layer::new(
        OAuth2Config::builder(ClientCredentials::new(server.client_id(), "wrong-secret"))
            .token_endpoint(server.token_endpoint())
            .allow_insecure_http(true)
            .build()
            .unwrap(),
    )
    .unwrap();
    errors.push(status_of(common::api(&wrong), get(&url)).await.unwrap_err());

    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        server.client_id(),
        SECRET
    ));
    let basic_encoded = old_token.headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut printed = String::new();
    let mut print = |text: String| {
        printed.push_str(&text);
        printed.push('\n');
    };
    print(format!("{:?}", ClientSecret::new(SECRET)));
    print(format!("{:?}", NuvyServer::builder().client_secret(SECRET)));
    print(format!("{server:?}"));
    print(format!("{credentials:?}"));
    print(format!("{builder:?}"));
    print(format!("{config:?}"));
    print(format!("{layer:?}"));
    print(format!("{:?}", layer.clone().with_retry()));
    print(format!("{api:?}"));
    print(format!("{:?}", layer.token_cache()));
    print(format!("{:?}", layer.token_cache().status()));
    print(format!("{:?}", layer.retry_policy()));
    print(format!("{token:?}"));
    let future = api.clone().oneshot(get(&url));
    print(format!("{future:?}"));
    drop(future);
    for error in &errors {
        print(format!("{error} {error:?}"));
        let mut source = std::error::Error::source(error.as_ref());
        while let Some(cause) = source {
            print(format!("{cause} {cause:?}"));
            source = cause.source();
        }
    }
    // Refresh-ahead and expiry, so every token request reason shows up in the trace.
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::advance(Duration::from_secs(3060)).await; // 85 %: refresh-ahead
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    tokio::time::advance(Duration::from_secs(3600)).await; // past expiry
    status_of(api.clone(), get(&url)).await.unwrap();

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("access token obtained"),
        "tracing is on: {logs}"
    );
    for reason in ["initial", "after-401", "refresh-ahead", "expired"] {
        assert!(
            logs.contains(&format!("reason=\"{reason}\"")),
            "no token request traced with reason {reason}: {logs}"
        );
    }
    assert!(logs.contains("lifetime_secs=") && logs.contains("elapsed_ms="));
    let secrets = [
        SECRET,
        "wrong-secret",
        basic.as_str(),
        basic_encoded.trim_start_matches("Basic "),
        token.expose_secret(),
    ];
    assert_clean(&printed, &secrets);
    assert_clean(&logs, &secrets);
}
