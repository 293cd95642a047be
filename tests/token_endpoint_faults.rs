//! Misbehaving token endpoints: redirects and oversized bodies.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
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

/// The cap counts the body's bytes, whether the length is announced (`Content-Length`) or only
/// known once read (chunked): exactly the cap is read, one byte more is refused.
#[tokio::test]
async fn a_body_of_exactly_the_cap_is_read_and_one_byte_more_is_refused() {
    const CAP: usize = 256;
    let body_of_length = |length: usize| {
        let json = r#"{"access_token":"capped-token","expires_in":60}"#;
        format!("{json}{}", " ".repeat(length - json.len()))
    };
    for framing in ["content-length", "chunked"] {
        for (length, fits) in [(CAP, true), (CAP + 1, false)] {
            let server = server(Duration::from_secs(60)).await;
            let mut response = ScriptedResponse::json(200, body_of_length(length));
            if framing == "chunked" {
                response = response.header("transfer-encoding", "chunked");
            }
            server.push_token_response(response);
            let config = config_builder(&server)
                .max_token_response_bytes(CAP)
                .build()
                .unwrap();
            let layer = nuvy_oauth2::OAuth2Layer::new(config).unwrap();
            let result = layer.token().await;
            let case = format!("{length} bytes, {framing}");
            if fits {
                assert_eq!(
                    result.expect(&case).expose_secret(),
                    "capped-token",
                    "{case}"
                );
            } else {
                assert_eq!(
                    result.map(|_| ()).expect_err(&case).kind(),
                    &ErrorKind::ResponseTooLarge { limit: CAP },
                    "{case}"
                );
            }
            assert_eq!(server.token_requests(), 1, "{case}");
        }
    }
}

#[tokio::test]
async fn a_success_status_with_an_error_field_or_an_empty_token_never_reaches_the_api() {
    for body in [r#"{"error":"invalid_client"}"#, r#"{"access_token":""}"#] {
        let server = server(Duration::from_secs(60)).await;
        server.push_token_response(ScriptedResponse::json(200, body));
        let layer = layer(&server);
        let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap_err();
        crate_error(&error);
        assert_eq!(server.api_requests(), 0, "{body}");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_429_holds_the_next_token_request_back() {
    let server = server(Duration::from_secs(60)).await;
    server.push_token_response(
        ScriptedResponse::json(429, r#"{"error":"slow_down"}"#).header("retry-after", "7"),
    );
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    let error = status_of(api.clone(), get(&url)).await.unwrap_err();
    assert_eq!(
        crate_error(&error).retry_after(),
        Some(Duration::from_secs(7))
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(status_of(api.clone(), get(&url)).await.is_err());
    assert_eq!(
        server.token_requests(),
        1,
        "nothing sent before Retry-After"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(status_of(api, get(&url)).await.unwrap(), StatusCode::OK);
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_400_temporarily_unavailable_is_backed_off_like_a_503_not_paused_for_30_s() {
    let server = server(Duration::from_secs(60)).await;
    server.push_token_response(ScriptedResponse::json(
        400,
        r#"{"error":"temporarily_unavailable"}"#,
    ));
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    let error = status_of(api.clone(), get(&url)).await.unwrap_err();
    assert_eq!(
        crate_error(&error)
            .token_error_fields()
            .and_then(|fields| fields.error.as_deref()),
        Some("temporarily_unavailable")
    );
    // The first transient backoff is at most MIN_FAILURE_BACKOFF (200 ms), far below the 30 s
    // PERMANENT_FAILURE_PAUSE a bad credential gets.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(status_of(api, get(&url)).await.unwrap(), StatusCode::OK);
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failing_refresh_ahead_keeps_requests_succeeding_and_shows_in_the_status() {
    let server = server(Duration::from_secs(1000)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    status_of(api.clone(), get(&url)).await.unwrap();
    let first = server.last_api_authorization().unwrap();
    tokio::time::advance(Duration::from_secs(850)).await;
    server.fail_next_token_requests(1, 503);
    for _ in 0..10 {
        assert_eq!(
            status_of(api.clone(), get(&url)).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(server.last_api_authorization().unwrap(), first);
    }
    let status = layer.token_cache().status();
    assert_eq!(status.consecutive_failures, 1);
    assert_eq!(
        status.last_error.unwrap().status(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(status.token_valid_for.is_some());
    assert_eq!(server.token_requests(), 2);
}
