//! Misbehaving token endpoints: redirects and oversized bodies.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::test_util::{NuvyServer, ScriptedResponse};
use nuvy_oauth2::ErrorKind;

#[tokio::test]
async fn a_redirect_is_an_error_and_nothing_is_sent_to_the_other_host() {
    let server = server(Duration::from_secs(60)).await;
    let other = NuvyServer::start().await.unwrap();
    server.push_token_response(
        ScriptedResponse::status(302).header("location", &other.token_endpoint()),
    );
    let layer = layer(&server);
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert!(matches!(
        crate_error(&error).kind(),
        ErrorKind::UnexpectedStatus { status, .. } if *status == StatusCode::FOUND
    ));
    assert_eq!(other.token_requests(), 0);
    assert_eq!(server.api_requests(), 0);
}

#[tokio::test]
async fn a_huge_token_response_stops_at_the_cap() {
    let server = server(Duration::from_secs(60)).await;
    let huge = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(10 * 1024 * 1024));
    server.push_token_response(ScriptedResponse::json(200, huge));
    let layer = layer(&server);
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert_eq!(
        crate_error(&error).kind(),
        &ErrorKind::ResponseTooLarge {
            limit: nuvy_oauth2::DEFAULT_MAX_TOKEN_RESPONSE_BYTES
        }
    );
}
