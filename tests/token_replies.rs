//! Replies from real token endpoints, judged by the RFCs: `Retry-After` in every form
//! (RFC 9110 §10.2.3, §5.6.7), success decided by RFC 6749 §5.1 whatever the `error` field
//! holds, content codings that were not asked for (RFC 9110 §12.5.3), and advice that fits the
//! RFC 6749 §5.2 error code. Every case runs against the embedded server on loopback.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::ErrorKind;

/// The server's clock, sent as `Date`: the `Retry-After` date is counted from it.
const DATE: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

#[tokio::test(start_paused = true)]
async fn retry_after_is_read_in_every_form_rfc_9110_requires() {
    // (Retry-After value, the delay it means)
    let cases: &[(&str, Option<Duration>)] = &[
        ("5", Some(Duration::from_secs(5))),
        (" 5 ", Some(Duration::from_secs(5))),
        ("0", Some(Duration::ZERO)),
        // IMF-fixdate, 5 s after DATE.
        (
            "Sun, 06 Nov 1994 08:49:42 GMT",
            Some(Duration::from_secs(5)),
        ),
        // Obsolete RFC 850 form.
        (
            "Sunday, 06-Nov-94 08:49:42 GMT",
            Some(Duration::from_secs(5)),
        ),
        // ANSI C asctime() form.
        ("Sun Nov  6 08:49:42 1994", Some(Duration::from_secs(5))),
        // 2 minutes later, crossing an hour boundary.
        (
            "Sun, 06 Nov 1994 08:51:37 GMT",
            Some(Duration::from_secs(120)),
        ),
        (
            "Sun, 06 Nov 1994 08:59:00 GMT",
            Some(Duration::from_secs(563)),
        ),
        // In the past: zero.
        ("Sun, 06 Nov 1994 08:49:30 GMT", Some(Duration::ZERO)),
        ("Thu, 01 Jan 1970 00:00:00 GMT", Some(Duration::ZERO)),
        // Not a Retry-After at all: ignored.
        ("5.5", None),
        ("-1", None),
        ("+5", None),
        ("soon", None),
        ("Sun, 06 Nov 1994 25:49:42 GMT", None),
        ("Sun, 32 Nov 1994 08:49:42 GMT", None),
    ];
    for &(value, expected) in cases {
        let server = server(Duration::from_secs(60)).await;
        server.push_token_response(
            ScriptedResponse::status(503)
                .header("date", DATE)
                .header("retry-after", value),
        );
        let layer = layer(&server);
        let api = api(&layer);
        let url = server.api_url("/v1/ping");
        let error = status_of(api.clone(), get(&url)).await.unwrap_err();
        let error = crate_error(&error);
        assert_eq!(error.retry_after(), expected, "Retry-After: {value}");
        assert!(error.is_transient());
        if let Some(delay) = expected.filter(|delay| *delay >= Duration::from_secs(1)) {
            // Nothing is sent before the delay is over; the first call after it succeeds.
            tokio::time::advance(delay - Duration::from_millis(100)).await;
            assert!(status_of(api.clone(), get(&url)).await.is_err(), "{value}");
            assert_eq!(server.token_requests(), 1, "Retry-After: {value}");
            tokio::time::advance(Duration::from_millis(200)).await;
        } else {
            // Zero or ignored: the ordinary backoff (at most MIN_FAILURE_BACKOFF) applies.
            tokio::time::advance(nuvy_oauth2::MIN_FAILURE_BACKOFF).await;
        }
        assert_eq!(
            status_of(api, get(&url)).await.unwrap(),
            StatusCode::OK,
            "Retry-After: {value}"
        );
        assert_eq!(server.token_requests(), 2, "Retry-After: {value}");
    }
}

#[tokio::test]
async fn success_is_decided_by_a_usable_access_token_whatever_error_holds() {
    // The `error` member of a 2xx body with a usable token: none of these is an error code
    // (RFC 6749 Appendix A.7: an error code is 1*NQSCHAR).
    for error in [
        None,
        Some("null"),
        Some(r#""""#),
        Some(r#""   ""#),
        Some("0"),
        Some("false"),
        Some("{}"),
        Some("[]"),
        Some(r#"{"code":"x"}"#),
    ] {
        let server = server(Duration::from_secs(60)).await;
        let member = error.map_or(String::new(), |error| format!(r#","error":{error}"#));
        server.push_token_response(ScriptedResponse::json(
            200,
            format!(r#"{{"access_token":"granted-token","token_type":"Bearer","expires_in":60{member}}}"#),
        ));
        let layer = layer(&server);
        // The embedded API does not know this token (it answers 401), but it was sent. No 401
        // retry in this stack: the replay would carry a token of the server's own.
        let _ = tower::ServiceExt::oneshot(
            tower::Layer::layer(&layer, http_client()),
            get(&server.api_url("/v1/ping")),
        )
        .await;
        assert_eq!(
            server.last_api_authorization().unwrap(),
            "Bearer granted-token",
            "error member {error:?}"
        );
        assert!(layer.token_cache().status().last_error.is_none() || server.api_requests() > 0);
    }
    // A non-empty error code is an error, with or without a token; no usable token and an
    // empty error is an unusable reply naming access_token.
    for (body, rejected) in [
        (r#"{"error":"invalid_client"}"#, true),
        (r#"{"access_token":"t","error":"invalid_scope"}"#, true),
        (r#"{"error":""}"#, false),
        (r#"{"error":null,"access_token":""}"#, false),
        (r#"{"error":0,"access_token":null}"#, false),
    ] {
        let server = server(Duration::from_secs(60)).await;
        server.push_token_response(ScriptedResponse::json(200, body));
        let layer = layer(&server);
        let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap_err();
        let kind = crate_error(&error).kind();
        if rejected {
            assert!(
                matches!(kind, ErrorKind::TokenRequestRejected { .. }),
                "{body}: {kind:?}"
            );
        } else {
            assert!(
                matches!(
                    kind,
                    ErrorKind::InvalidTokenResponse {
                        field: "access_token",
                        ..
                    }
                ),
                "{body}: {kind:?}"
            );
        }
        assert_eq!(server.api_requests(), 0, "{body}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_content_coding_not_asked_for_is_a_transient_error_naming_it() {
    for (encoding, named) in [
        ("gzip", "gzip"),
        ("GZIP", "GZIP"),
        ("x-gzip", "x-gzip"),
        ("br", "br"),
        ("deflate", "deflate"),
        ("zstd", "zstd"),
        ("compress", "compress"),
        ("identity, gzip", "gzip"),
        ("gzip, br", "gzip"),
    ] {
        let server = server(Duration::from_secs(60)).await;
        // A gzip member header and garbage: whatever the bytes, they are not read as JSON.
        server.push_token_response(
            ScriptedResponse::json(200, "")
                .body(&b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03secret-ish"[..])
                .header("content-encoding", encoding),
        );
        let layer = layer(&server);
        let api = api(&layer);
        let url = server.api_url("/v1/ping");
        let error = status_of(api.clone(), get(&url)).await.unwrap_err();
        let error = crate_error(&error);
        assert_eq!(
            error.kind(),
            &ErrorKind::UnexpectedContentEncoding {
                status: StatusCode::OK,
                encoding: named.to_owned(),
            },
            "{encoding}"
        );
        assert!(error.is_transient(), "{encoding}");
        assert!(error.to_string().contains(named), "{error}");
        let sent = server.last_token_request().unwrap();
        assert_eq!(sent.headers["accept-encoding"], "identity");
        // Transient: a short backoff, not the 30 s pause of a rejection.
        tokio::time::advance(nuvy_oauth2::MIN_FAILURE_BACKOFF).await;
        assert_eq!(status_of(api, get(&url)).await.unwrap(), StatusCode::OK);
    }
    // `identity` is what was asked for.
    let server = server(Duration::from_secs(60)).await;
    server.push_token_response(ScriptedResponse::normal().header("content-encoding", "identity"));
    let layer = layer(&server);
    assert_eq!(
        status_of(api(&layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_advice_of_a_rejection_fits_its_rfc_6749_error_code() {
    const GRANT_TYPE: &str = "grant_type=client_credentials";
    // (status, error code, a phrase of the advice that must appear)
    let cases: &[(u16, Option<&str>, &str)] = &[
        (400, Some("invalid_request"), GRANT_TYPE),
        (400, Some("unsupported_grant_type"), GRANT_TYPE),
        (
            400,
            Some("invalid_client"),
            "verify client_id and client_secret",
        ),
        (
            401,
            Some("invalid_client"),
            "verify client_id and client_secret",
        ),
        (
            400,
            Some("invalid_grant"),
            "refused the client_credentials grant",
        ),
        (
            400,
            Some("unauthorized_client"),
            "not allowed to use the client_credentials grant",
        ),
        (400, Some("invalid_scope"), "check .scope()"),
        (400, None, GRANT_TYPE),
        (400, Some(""), GRANT_TYPE),
        (401, None, "verify client_id and client_secret"),
        (403, Some("invalid_scope"), "check .scope()"),
        // Codes outside §5.2: advice that fits, never the grant type.
        (400, Some("invalid_target"), "check .resource()"),
        (400, Some("server_error"), "try again later"),
        (400, Some("temporarily_unavailable"), "try again later"),
        (400, Some("access_denied"), "none of RFC 6749 §5.2"),
        (400, Some("INVALID_CLIENT"), "none of RFC 6749 §5.2"),
        (401, Some("custom_code"), "none of RFC 6749 §5.2"),
    ];
    for &(status, code, advice) in cases {
        let server = server(Duration::from_secs(60)).await;
        let body = match code {
            Some(code) => format!(r#"{{"error":"{code}"}}"#),
            None => "{}".to_owned(),
        };
        server.push_token_response(ScriptedResponse::json(status, body));
        let layer = layer(&server);
        let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap_err();
        let text = crate_error(&error).to_string();
        assert!(text.contains(advice), "{status} {code:?}: {text}");
        if advice != GRANT_TYPE {
            assert!(!text.contains(GRANT_TYPE), "{status} {code:?}: {text}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_gzipped_oversized_or_cut_off_error_page_keeps_its_status_and_retry_after() {
    let gzip = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03junk".to_vec();
    let huge = vec![b'x'; nuvy_oauth2::DEFAULT_MAX_TOKEN_RESPONSE_BYTES + 1];
    // (status, Content-Encoding, body): the status and Retry-After are the whole answer.
    let cases: Vec<(u16, Option<&str>, Vec<u8>)> = vec![
        (503, Some("gzip"), gzip.clone()),
        (429, Some("br"), gzip.clone()),
        (408, Some("gzip"), gzip.clone()),
        (502, Some("deflate"), gzip.clone()),
        (503, None, huge.clone()),
        (429, Some("gzip"), huge),
    ];
    for (status, encoding, body) in cases {
        let server = server(Duration::from_secs(60)).await;
        let mut reply = ScriptedResponse::status(status)
            .header("retry-after", "120")
            .body(body);
        if let Some(encoding) = encoding {
            reply = reply.header("content-encoding", encoding);
        }
        server.push_token_response(reply);
        let layer = layer(&server);
        let api = api(&layer);
        let url = server.api_url("/v1/ping");
        let error = status_of(api.clone(), get(&url)).await.unwrap_err();
        let error = crate_error(&error);
        assert!(
            matches!(error.kind(), ErrorKind::UnexpectedStatus { status: got, .. } if got.as_u16() == status),
            "{status} {encoding:?}: {error:?}"
        );
        let retry_after = error.retry_after().unwrap();
        assert!(
            retry_after > Duration::from_secs(119) && retry_after <= Duration::from_secs(120),
            "{status} {encoding:?}: {retry_after:?}"
        );
        tokio::time::advance(Duration::from_secs(118)).await;
        assert!(status_of(api.clone(), get(&url)).await.is_err());
        assert_eq!(server.token_requests(), 1, "{status} {encoding:?}");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(status_of(api, get(&url)).await.unwrap(), StatusCode::OK);
    }
    // A 4xx body is read (its `error` may be a rejection), so a coding there is still named.
    let server = server(Duration::from_secs(60)).await;
    server.push_token_response(
        ScriptedResponse::json(403, "")
            .body(gzip)
            .header("content-encoding", "gzip"),
    );
    let layer = layer(&server);
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert!(matches!(
        crate_error(&error).kind(),
        ErrorKind::UnexpectedContentEncoding { encoding, .. } if encoding == "gzip"
    ));
}
