//! No panic from any configuration or runtime, and a token request that survives a dead
//! pooled connection.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::{ErrorKind, OAuth2Config, OAuth2Layer};

#[tokio::test(start_paused = true)]
async fn a_token_request_on_a_dead_pooled_connection_is_sent_again_on_a_new_one() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    // The first token request leaves its keep-alive connection in the pool.
    status_of(api.clone(), get(&url)).await.unwrap();
    // Long idle: the server has dropped that connection, so the next token request sent on it
    // gets no response byte. The 401 replay waiting for that token must still succeed.
    server.close_next_reused_token_connection();
    age_and_revoke_tokens(&server).await;
    assert_eq!(
        status_of(api.clone(), get(&url)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(
        server.token_requests(),
        3,
        "the lost request, then the same request on a new connection"
    );
    let status = layer.token_cache().status();
    assert_eq!(status.token_requests, 2, "counted as one attempt");
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(status.generation, 2);
}

fn builder() -> nuvy_oauth2::OAuth2ConfigBuilder {
    OAuth2Config::builder(nuvy_oauth2::ClientCredentials::new("id", "secret"))
}

#[test]
fn every_duration_and_size_out_of_range_is_refused_by_build_naming_the_setting() {
    let cases = [
        (
            builder().token_request_timeout(Duration::MAX),
            "token_request_timeout",
        ),
        (
            builder().token_request_timeout(Duration::ZERO),
            "token_request_timeout",
        ),
        (
            builder().token_request_timeout(
                nuvy_oauth2::MAX_TOKEN_REQUEST_TIMEOUT + Duration::from_nanos(1),
            ),
            "token_request_timeout",
        ),
        (
            builder().token_request_timeout(Duration::from_micros(999)),
            "token_request_timeout",
        ),
        (
            builder().max_token_response_bytes(0),
            "max_token_response_bytes",
        ),
        (
            builder().max_token_response_bytes(usize::MAX),
            "max_token_response_bytes",
        ),
        (
            builder().max_token_response_bytes(nuvy_oauth2::MAX_TOKEN_RESPONSE_BYTES_LIMIT + 1),
            "max_token_response_bytes",
        ),
    ];
    for (builder, expected) in cases {
        let error = builder.build().unwrap_err();
        match error.kind() {
            ErrorKind::SettingOutOfRange { setting, .. } => assert_eq!(*setting, expected),
            other => panic!("{other:?}"),
        }
        assert!(error.to_string().contains(expected), "{error}");
    }
    // The bounds themselves are valid.
    for builder in [
        builder().token_request_timeout(nuvy_oauth2::MIN_TOKEN_REQUEST_TIMEOUT),
        builder().token_request_timeout(nuvy_oauth2::MAX_TOKEN_REQUEST_TIMEOUT),
        builder().max_token_response_bytes(1),
        builder().max_token_response_bytes(nuvy_oauth2::MAX_TOKEN_RESPONSE_BYTES_LIMIT),
    ] {
        builder.build().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn the_longest_timeout_never_overflows_a_deadline() {
    let server = server(Duration::from_secs(3600)).await;
    let config = config_builder(&server)
        .token_request_timeout(nuvy_oauth2::MAX_TOKEN_REQUEST_TIMEOUT)
        .build()
        .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    server.push_token_response(ScriptedResponse::hang());
    let started = tokio::time::Instant::now();
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert!(crate_error(&error).is_timeout());
    assert_eq!(started.elapsed(), nuvy_oauth2::MAX_TOKEN_REQUEST_TIMEOUT);
}

#[test]
fn a_runtime_without_the_time_driver_gets_a_typed_error_not_a_panic() {
    let server_runtime = tokio::runtime::Runtime::new().unwrap();
    let server = server_runtime.block_on(server(Duration::from_secs(3600)));
    let layer = layer(&server);
    let url = server.api_url("/v1/ping");
    let no_timers = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let error = no_timers
        .block_on(status_of(api(&layer), get(&url)))
        .unwrap_err();
    assert!(
        matches!(crate_error(&error).kind(), ErrorKind::NoTimeDriver),
        "{error}"
    );
    assert_eq!(server.token_requests(), 0);
    // A waiter on such a runtime, joining a refresh started elsewhere (and kept in flight by
    // a token endpoint that never answers), is told the same.
    server.push_token_response(ScriptedResponse::hang());
    #[allow(clippy::async_yields_async)]
    let mut started = server_runtime.block_on(async {
        let mut first = tokio_test::task::spawn(status_of(api(&layer), get(&url)));
        tokio_test::assert_pending!(first.poll());
        first
    });
    let error = no_timers
        .block_on(status_of(api(&layer), get(&url)))
        .unwrap_err();
    assert!(matches!(
        crate_error(&error).kind(),
        ErrorKind::NoTimeDriver
    ));
    let _ = started.poll();
}

/// A token transport over the embedded server whose first send fails with `first_error`.
fn failing_once(
    server: &NuvyServer,
    first_error: std::io::ErrorKind,
) -> (OAuth2Layer, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt as _;
    let sends = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&sends);
    let client = http_client();
    let transport = tower::service_fn(move |request: nuvy_oauth2::TokenTransportRequest| {
        let send = counted.fetch_add(1, Ordering::SeqCst);
        let client = client.clone();
        async move {
            if send == 0 {
                let error: tower::BoxError = Box::new(std::io::Error::from(first_error));
                return Err(error);
            }
            client.oneshot(request).await.map_err(tower::BoxError::from)
        }
    });
    let config = config_builder(server).build().unwrap();
    let layer = OAuth2Layer::with_token_transport(config, transport).unwrap();
    (layer, sends)
}

#[tokio::test]
async fn a_connection_reset_before_any_response_byte_is_sent_once_more() {
    let server = server(Duration::from_secs(3600)).await;
    let (layer, sends) = failing_once(&server, std::io::ErrorKind::ConnectionReset);
    let status = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sends.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(layer.token_cache().status().consecutive_failures, 0);
}

#[tokio::test]
async fn other_transport_errors_are_not_sent_twice() {
    let server = server(Duration::from_secs(3600)).await;
    let (layer, sends) = failing_once(&server, std::io::ErrorKind::ConnectionRefused);
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert!(matches!(crate_error(&error).kind(), ErrorKind::Transport));
    assert_eq!(sends.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(server.token_requests(), 0);
}
