//! Parsing a token response: RFC 6749 §5.1 (success) and §5.2 (error), leniently where real
//! servers differ and strictly where a mistake would be unsafe. No error built here ever holds
//! the body or the token.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64_URL;
use base64::Engine as _;
use http::header::{CONTENT_ENCODING, DATE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::{DEFAULT_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME};
use crate::error::{sanitize_server_text, Error, ErrorKind, TokenErrorFields};
use crate::secret::AccessToken;

/// What a successful token response grants.
pub(crate) struct TokenGrant {
    pub(crate) access_token: AccessToken,
    /// `Bearer <access_token>`, marked sensitive.
    pub(crate) authorization: HeaderValue,
    /// How long the token lives, clamped to [`MAX_TOKEN_LIFETIME`].
    pub(crate) lifetime: Duration,
    /// The `scope` member (RFC 6749 §5.1), scope tokens separated by single spaces; `None`
    /// when absent, empty or neither a string nor an array of strings.
    pub(crate) scope: Option<String>,
}

/// Longest granted `scope` kept, in characters; the rest is cut.
const MAX_SCOPE_CHARS: usize = 4096;

/// The granted `scope`: a space-delimited string (RFC 6749 §3.3) or, leniently, an array of
/// strings as some servers send; whitespace runs become single spaces, control characters are
/// dropped.
fn granted_scope(value: Option<&Value>) -> Option<String> {
    let tokens: Vec<&str> = match value? {
        Value::String(scope) => scope.split_whitespace().collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .flat_map(str::split_whitespace)
            .collect(),
        _ => return None,
    };
    let scope: String = tokens
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_SCOPE_CHARS)
        .collect();
    (!scope.is_empty()).then_some(scope)
}

/// The delay a `Retry-After` header asks for (RFC 9110 §10.2.3), for a response that arrived
/// at `arrived` (wall clock):
/// - `delay-seconds` (`1*DIGIT`): that many seconds; more digits than a `u64` holds saturate
///   (the cache caps the delay at [`crate::MAX_RETRY_AFTER`]);
/// - an HTTP-date in any of the three formats RFC 9110 §5.6.7 requires recipients to parse
///   (IMF-fixdate, obsolete RFC 850, ANSI C `asctime`), read by the `httpdate` crate: the time
///   from the response's `Date` header (the server's own clock, so client clock skew does not
///   matter) or, without a usable `Date`, from `arrived`, to that date; a date in the past is
///   zero.
///
/// `None` when there is no `Retry-After` or none of its values is one of these forms (a
/// negative, fractional or signed number, a malformed date).
pub(crate) fn retry_after_delay(headers: &HeaderMap, arrived: SystemTime) -> Option<Duration> {
    headers.get_all(RETRY_AFTER).iter().find_map(|value| {
        let value = value.to_str().ok()?.trim();
        if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
            return Some(Duration::from_secs(
                value.parse::<u64>().unwrap_or(u64::MAX),
            ));
        }
        let date = httpdate::parse_http_date(value).ok()?;
        let base = headers
            .get(DATE)
            .and_then(|date| date.to_str().ok())
            .and_then(|date| httpdate::parse_http_date(date.trim()).ok())
            .unwrap_or(arrived);
        Some(date.duration_since(base).unwrap_or(Duration::ZERO))
    })
}

/// The first content coding of a response other than `identity` (RFC 9110 §8.4), cut and
/// cleaned for an error message. The token request sends `Accept-Encoding: identity`, so any
/// other coding is a gateway's doing and the body cannot be read as JSON.
pub(crate) fn unexpected_content_encoding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .map(|coding| coding.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"))
        .map(|coding| sanitize_server_text(&coding))
}

/// Whether the body of a token response with this status carries no meaning: a 3xx, 5xx, 408
/// or 429 is an [`ErrorKind::UnexpectedStatus`] whatever it holds, so neither its content
/// coding nor its size nor a failure while reading it may hide the status and its
/// `Retry-After`.
pub(crate) fn body_is_ignored(status: StatusCode) -> bool {
    let read_for_an_error_code = status.is_client_error()
        && status != StatusCode::TOO_MANY_REQUESTS
        && status != StatusCode::REQUEST_TIMEOUT;
    !status.is_success() && !read_for_an_error_code
}

/// Turns a complete token response into a grant or a typed error. `retry_after` is the
/// delay [`retry_after_delay`] read from the headers, counted from when the response arrived.
pub(crate) fn parse_token_response(
    status: StatusCode,
    content_type: Option<&str>,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<TokenGrant, Error> {
    let content_type_owned = || content_type.map(sanitize_server_text);
    let json = parse_json_object(body);

    if status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED {
        return Err(rejected(status, json.as_ref()));
    }
    if !status.is_success() {
        if let Some(json) = json.as_ref().filter(|json| error_code(json).is_some()) {
            if !body_is_ignored(status) {
                return Err(rejected(status, Some(json)));
            }
        }
        return Err(Error::new(ErrorKind::UnexpectedStatus {
            status,
            content_type: content_type_owned(),
            retry_after,
        }));
    }

    let invalid = |field: &'static str, reason: &'static str| {
        Error::new(ErrorKind::InvalidTokenResponse {
            field,
            reason,
            content_type: content_type_owned(),
        })
    };
    let Some(json) = json else {
        return Err(invalid("body", "is not a JSON object"));
    };
    // RFC 6749 §5.1 decides success: a usable access_token. An `error` counts only as a
    // non-empty string (Appendix A.7: an error code is 1*NQSCHAR); `null`, `""`, a number or
    // an object in that field is noise some servers send alongside a good token.
    if error_code(&json).is_some() {
        return Err(rejected(status, Some(&json)));
    }

    let access_token = match json.get("access_token") {
        Some(Value::String(token)) if !token.is_empty() => token.as_str(),
        Some(Value::String(_)) => return Err(invalid("access_token", "is empty")),
        None | Some(Value::Null) => return Err(invalid("access_token", "is missing")),
        Some(_) => return Err(invalid("access_token", "is not a string")),
    };
    if !access_token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(invalid(
            "access_token",
            "contains characters not allowed in a header (space, control or non-ASCII)",
        ));
    }

    match json.get("token_type") {
        None | Some(Value::Null) => {} // Missing: taken as Bearer (documented).
        // Empty is no type name (RFC 6749 §7.1): as missing. Surrounding spaces are noise.
        Some(Value::String(token_type)) if token_type.trim().is_empty() => {}
        Some(Value::String(token_type)) if token_type.trim().eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(token_type)) => {
            return Err(Error::new(ErrorKind::UnsupportedTokenType {
                token_type: sanitize_server_text(token_type),
            }))
        }
        Some(_) => return Err(invalid("token_type", "is not a string")),
    }

    let lifetime = match json.get("expires_in") {
        None | Some(Value::Null) => jwt_lifetime(access_token, SystemTime::now())
            .map_err(|reason| invalid("access_token", reason))?
            .unwrap_or(DEFAULT_TOKEN_LIFETIME),
        Some(value) => parse_expires_in(value).map_err(|reason| invalid("expires_in", reason))?,
    };

    let mut authorization = HeaderValue::try_from(format!("Bearer {access_token}"))
        .map_err(|_| invalid("access_token", "is not a valid header value"))?;
    authorization.set_sensitive(true);
    Ok(TokenGrant {
        access_token: AccessToken::new(access_token.to_owned()),
        authorization,
        lifetime: lifetime.min(MAX_TOKEN_LIFETIME),
        scope: granted_scope(json.get("scope")),
    })
}

/// The body as a JSON object, or `None`. A number too large for `f64` (`1e400`), which
/// serde_json refuses, is read as `u64::MAX` (or `-1` when negative) so that a huge `expires_in`
/// is clamped like any other instead of failing the whole body.
///
/// A leading UTF-8 byte order mark, which RFC 8259 §8.1 lets parsers ignore (and some servers
/// send), is skipped.
fn parse_json_object(body: &[u8]) -> Option<Map<String, Value>> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if let Ok(object) = serde_json::from_slice(body) {
        return Some(object);
    }
    let raw: HashMap<String, &RawValue> = serde_json::from_slice(body).ok()?;
    let mut object = Map::new();
    for (name, value) in raw {
        let text = value.get();
        let value = match serde_json::from_str::<Value>(text) {
            Ok(value) => value,
            Err(_) if text.starts_with('-') => Value::from(-1),
            Err(_) if text.starts_with(|c: char| c.is_ascii_digit()) => Value::from(u64::MAX),
            Err(_) => continue,
        };
        object.insert(name, value);
    }
    Some(object)
}

/// The RFC 6749 §5.2 `error` code of a body: a non-empty string only.
fn error_code(json: &Map<String, Value>) -> Option<&str> {
    json.get("error")
        .and_then(Value::as_str)
        .filter(|code| !code.trim().is_empty())
}

fn rejected(status: StatusCode, json: Option<&Map<String, Value>>) -> Error {
    let text = |name: &str| {
        json.and_then(|json| json.get(name))
            .and_then(Value::as_str)
            .filter(|text| !text.trim().is_empty())
            .map(sanitize_server_text)
    };
    Error::new(ErrorKind::TokenRequestRejected {
        status,
        fields: TokenErrorFields {
            error: text("error"),
            error_description: text("error_description"),
            error_uri: text("error_uri"),
        },
    })
}

/// `expires_in` (RFC 6749 §5.1, seconds) as a JSON number or a numeric string. Zero, negative,
/// non-finite or non-numeric is an error; a huge value is clamped.
fn parse_expires_in(value: &Value) -> Result<Duration, &'static str> {
    let seconds = match value {
        Value::Number(number) => number_seconds(number.as_u64(), number.as_f64()),
        Value::String(text) => {
            let text = text.trim();
            // Plain decimal only: `f64::from_str` would also take "inf", "NaN" and "1e3".
            let decimal = text.strip_prefix('-').unwrap_or(text);
            let is_decimal = !decimal.is_empty()
                && decimal
                    .bytes()
                    .all(|byte| byte.is_ascii_digit() || byte == b'.')
                && decimal.bytes().filter(|&byte| byte == b'.').count() <= 1
                && decimal
                    .bytes()
                    .next()
                    .is_some_and(|byte| byte.is_ascii_digit());
            if !is_decimal {
                return Err("is not a number");
            }
            number_seconds(text.parse::<u64>().ok(), text.parse::<f64>().ok())
        }
        _ => Err("is not a number"),
    }?;
    Ok(seconds)
}

fn number_seconds(integer: Option<u64>, float: Option<f64>) -> Result<Duration, &'static str> {
    if let Some(seconds) = integer {
        return if seconds == 0 {
            Err("is zero")
        } else {
            Ok(Duration::from_secs(
                seconds.min(MAX_TOKEN_LIFETIME.as_secs()),
            ))
        };
    }
    match float {
        Some(seconds) if seconds.is_nan() => Err("is not a number"),
        Some(seconds) if seconds < 0.0 => Err("is negative"),
        Some(seconds) if seconds < 1.0 => Err("is zero"),
        Some(seconds) => Ok(Duration::from_secs_f64(
            seconds.min(MAX_TOKEN_LIFETIME.as_secs_f64()),
        )),
        None => Err("is not a number"),
    }
}

/// When the token is a JWT with a numeric `exp` claim, its remaining lifetime at `now` (wall
/// clock, as `exp` is: RFC 7519 §4.1.4). `Ok(None)` when it is not a JWT or has no usable `exp`.
fn jwt_lifetime(token: &str, now: SystemTime) -> Result<Option<Duration>, &'static str> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ok(None);
    };
    let Ok(payload) = BASE64_URL.decode(payload.trim_end_matches('=')) else {
        return Ok(None);
    };
    let Ok(claims) = serde_json::from_slice::<Map<String, Value>>(&payload) else {
        return Ok(None);
    };
    let Some(exp) = claims.get("exp").and_then(Value::as_f64) else {
        return Ok(None);
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let remaining = exp - now;
    if !remaining.is_finite() || remaining < 1.0 {
        return Err("is a JWT whose `exp` has passed (and `expires_in` is missing)");
    }
    Ok(Some(Duration::from_secs_f64(
        remaining.min(MAX_TOKEN_LIFETIME.as_secs_f64()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> TokenGrant {
        parse_token_response(
            StatusCode::OK,
            Some("application/json"),
            None,
            body.as_bytes(),
        )
        .unwrap_or_else(|error| panic!("{error}"))
    }

    fn err(status: u16, content_type: Option<&str>, body: &str) -> Error {
        match parse_token_response(
            StatusCode::from_u16(status).unwrap(),
            content_type,
            None,
            body.as_bytes(),
        ) {
            Ok(_) => panic!("expected an error for {body}"),
            Err(error) => error,
        }
    }

    #[test]
    fn bearer_is_matched_case_insensitively_and_written_canonically() {
        for token_type in ["Bearer", "bearer", "BEARER"] {
            let grant = ok(&format!(
                r#"{{"access_token":"abc","token_type":"{token_type}","expires_in":60}}"#
            ));
            assert_eq!(grant.authorization, "Bearer abc");
            assert!(grant.authorization.is_sensitive());
        }
    }

    #[test]
    fn missing_token_type_is_taken_as_bearer() {
        assert_eq!(
            ok(r#"{"access_token":"abc","expires_in":60}"#).authorization,
            "Bearer abc"
        );
    }

    #[test]
    fn odd_but_harmless_replies_are_read() {
        for body in [
            r#"{"access_token":"abc","token_type":""}"#,
            r#"{"access_token":"abc","token_type":" Bearer "}"#,
            r#"{"access_token":"abc","token_type":"bEaReR"}"#,
            "\u{feff}{\"access_token\":\"abc\"}",
            "\u{feff}{\"access_token\":\"abc\",\"expires_in\":1e400}",
            r#"{"access_token":"abc","error":[]}"#,
        ] {
            assert_eq!(ok(body).authorization, "Bearer abc", "{body}");
        }
        for token_type in [r#""mac""#, r#""Bearer2""#, r#""Bear er""#] {
            let body = format!(r#"{{"access_token":"abc","token_type":{token_type}}}"#);
            let error = err(200, None, &body);
            assert!(
                matches!(error.kind(), ErrorKind::UnsupportedTokenType { .. }),
                "{body}"
            );
        }
    }

    #[test]
    fn other_token_types_are_refused() {
        let error = err(200, None, r#"{"access_token":"abc","token_type":"mac"}"#);
        assert!(matches!(
            error.kind(),
            ErrorKind::UnsupportedTokenType { .. }
        ));
    }

    #[test]
    fn expires_in_accepts_numbers_and_numeric_strings() {
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":3600}"#)
                .lifetime
                .as_secs(),
            3600
        );
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":"3600"}"#)
                .lifetime
                .as_secs(),
            3600
        );
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":59.9}"#)
                .lifetime
                .as_millis(),
            59900
        );
    }

    #[test]
    fn expires_in_zero_negative_or_text_names_the_field() {
        for value in [
            "0", "-5", "\"abc\"", "\"-1\"", "true", "0.2", "[]", "\"inf\"", "\"NaN\"", "\"1e3\"",
            "\"\"",
        ] {
            let body = format!(r#"{{"access_token":"secret-token","expires_in":{value}}}"#);
            let error = err(200, Some("application/json"), &body);
            assert!(
                matches!(
                    error.kind(),
                    ErrorKind::InvalidTokenResponse {
                        field: "expires_in",
                        ..
                    }
                ),
                "{value}: {error:?}"
            );
            assert!(!format!("{error} {error:?}").contains("secret-token"));
        }
    }

    #[test]
    fn huge_expires_in_is_clamped() {
        for value in [
            "18446744073709551615",
            "1e300",
            "1e400",
            "\"99999999999999999999999\"",
        ] {
            let body = format!(r#"{{"access_token":"a","expires_in":{value}}}"#);
            assert_eq!(ok(&body).lifetime, MAX_TOKEN_LIFETIME);
        }
    }

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            BASE64_URL.encode(r#"{"alg":"none"}"#),
            BASE64_URL.encode(claims)
        )
    }

    #[test]
    fn missing_expires_in_uses_the_jwt_exp_claim_or_the_default() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = jwt(&format!(r#"{{"exp":{}}}"#, now + 1200));
        let lifetime = ok(&format!(r#"{{"access_token":"{token}"}}"#))
            .lifetime
            .as_secs();
        assert!((1195..=1200).contains(&lifetime), "{lifetime}");
        assert_eq!(
            ok(r#"{"access_token":"opaque"}"#).lifetime,
            DEFAULT_TOKEN_LIFETIME
        );
        let expired = jwt(&format!(r#"{{"exp":{}}}"#, now - 10));
        let error = err(200, None, &format!(r#"{{"access_token":"{expired}"}}"#));
        assert!(matches!(
            error.kind(),
            ErrorKind::InvalidTokenResponse { .. }
        ));
    }

    #[test]
    fn a_hugely_negative_expires_in_is_still_an_error() {
        let error = err(200, None, r#"{"access_token":"a","expires_in":-1e400}"#);
        assert!(matches!(
            error.kind(),
            ErrorKind::InvalidTokenResponse {
                field: "expires_in",
                ..
            }
        ));
    }

    #[test]
    fn unknown_and_null_fields_are_ignored() {
        let grant = ok(
            r#"{"access_token":"a","expires_in":60,"scope":["x","y"],"refresh_token":null,"error":null,"x":{}}"#,
        );
        assert_eq!(grant.lifetime.as_secs(), 60);
    }

    #[test]
    fn a_token_that_is_not_a_header_value_is_refused() {
        for token in ["a\\r\\nX-Injected: 1", "a b", "caf\u{e9}", "a\\u0000"] {
            let error = err(
                200,
                None,
                &format!(r#"{{"access_token":"{token}","expires_in":60}}"#),
            );
            assert!(matches!(
                error.kind(),
                ErrorKind::InvalidTokenResponse {
                    field: "access_token",
                    ..
                }
            ));
        }
    }

    #[test]
    fn success_status_with_error_field_or_empty_token_is_an_error() {
        let error = err(200, None, r#"{"error":"invalid_client"}"#);
        assert_eq!(
            error.token_error_fields().unwrap().error.as_deref(),
            Some("invalid_client")
        );
        let error = err(200, None, r#"{"access_token":""}"#);
        assert!(matches!(
            error.kind(),
            ErrorKind::InvalidTokenResponse {
                field: "access_token",
                ..
            }
        ));
    }

    #[test]
    fn rejections_carry_rfc_6749_fields_and_the_nuvy_docs_remedy() {
        let error = err(
            400,
            Some("application/json;charset=UTF-8"),
            r#"{"error":"unsupported_grant_type","error_description":"grant_type must be client_credentials","error_uri":"https://x/e"}"#,
        );
        let fields = error.token_error_fields().unwrap();
        assert_eq!(fields.error.as_deref(), Some("unsupported_grant_type"));
        assert_eq!(
            fields.error_description.as_deref(),
            Some("grant_type must be client_credentials")
        );
        assert_eq!(fields.error_uri.as_deref(), Some("https://x/e"));
        assert!(error.to_string().contains("grant_type=client_credentials"));

        let error = err(401, None, r#"{"error":"invalid_client"}"#);
        assert!(error.is_invalid_client());
        assert!(error
            .to_string()
            .contains("verify client_id and client_secret"));
        let error = err(401, Some("text/plain"), "nope");
        assert!(error.is_invalid_client());
        assert_eq!(error.status(), Some(StatusCode::UNAUTHORIZED));
    }

    #[test]
    fn the_granted_scope_is_read_from_a_string_or_an_array_as_single_spaced_tokens() {
        let scope = |value: &str| {
            ok(&format!(
                r#"{{"access_token":"a","expires_in":60,"scope":{value}}}"#
            ))
            .scope
        };
        assert_eq!(
            scope(r#"" read  write\tadmin ""#).as_deref(),
            Some("read write admin")
        );
        assert_eq!(
            scope(r#"["read", "write admin", 7, null, " "]"#).as_deref(),
            Some("read write admin")
        );
        // Control characters are dropped, not turned into separators.
        assert_eq!(
            scope(r#""re\u0007ad write""#).as_deref(),
            Some("read write")
        );
        for nothing in [r#""""#, r#"" \t ""#, "[]", "[1, true]", "42", "{}", "null"] {
            assert_eq!(scope(nothing), None, "{nothing}");
        }
        assert_eq!(ok(r#"{"access_token":"a","expires_in":60}"#).scope, None);
        let long = "s".repeat(MAX_SCOPE_CHARS + 10);
        assert_eq!(
            scope(&format!(r#""{long}""#)).map(|scope| scope.len()),
            Some(MAX_SCOPE_CHARS)
        );
    }

    #[test]
    fn only_a_2xx_or_a_4xx_other_than_408_and_429_has_a_body_worth_reading() {
        for (status, ignored) in [
            (200, false),
            (204, false),
            (400, false),
            (401, false),
            (403, false),
            (404, false),
            (408, true),
            (429, true),
            (302, true),
            (500, true),
            (503, true),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(body_is_ignored(status), ignored, "{status}");
        }
    }

    #[test]
    fn an_error_code_makes_a_4xx_a_rejection_but_a_3xx_5xx_408_or_429_stays_its_status() {
        let body = r#"{"error":"access_denied","error_description":"no"}"#;
        for status in [403, 404, 409] {
            let error = err(status, Some("application/json"), body);
            assert_eq!(
                error
                    .token_error_fields()
                    .and_then(|fields| fields.error.as_deref()),
                Some("access_denied"),
                "{status}"
            );
            assert_eq!(error.status(), StatusCode::from_u16(status).ok());
        }
        for status in [302, 408, 429, 500, 503] {
            let error = err(status, Some("application/json"), body);
            assert!(
                matches!(
                    error.kind(),
                    ErrorKind::UnexpectedStatus { status: got, .. } if got.as_u16() == status
                ),
                "{status}: {error:?}"
            );
        }
        // Without an error code a 4xx other than 400 and 401 is its status too.
        assert!(matches!(
            err(403, Some("text/html"), "<html>no</html>").kind(),
            ErrorKind::UnexpectedStatus { .. }
        ));
    }

    #[test]
    fn each_unusable_expires_in_is_refused_with_its_reason() {
        let reason = |value: &str| {
            let body = format!(r#"{{"access_token":"a","expires_in":{value}}}"#);
            match err(200, None, &body).kind() {
                ErrorKind::InvalidTokenResponse {
                    field: "expires_in",
                    reason,
                    ..
                } => *reason,
                other => panic!("{value}: {other:?}"),
            }
        };
        for (value, expected) in [
            ("-5", "is negative"),
            ("-0.5", "is negative"),
            ("\"-5\"", "is negative"),
            ("-1e400", "is negative"),
            ("0", "is zero"),
            ("0.0", "is zero"),
            ("-0.0", "is zero"),
            ("\"0.0\"", "is zero"),
            ("0.999", "is zero"),
            ("\"abc\"", "is not a number"),
            ("\"1e3\"", "is not a number"),
            ("true", "is not a number"),
        ] {
            assert_eq!(reason(value), expected, "{value}");
        }
        // One second is the shortest lifetime, in every notation.
        for value in ["1", "1.0", "\"1\"", "\"1.0\""] {
            let body = format!(r#"{{"access_token":"a","expires_in":{value}}}"#);
            assert_eq!(ok(&body).lifetime, Duration::from_secs(1), "{value}");
        }
    }

    #[test]
    fn seconds_that_are_not_a_number_are_refused_not_clamped() {
        assert_eq!(number_seconds(None, Some(f64::NAN)), Err("is not a number"));
        assert_eq!(number_seconds(None, None), Err("is not a number"));
        assert_eq!(
            number_seconds(None, Some(f64::INFINITY)),
            Ok(MAX_TOKEN_LIFETIME)
        );
        assert_eq!(
            number_seconds(None, Some(f64::NEG_INFINITY)),
            Err("is negative")
        );
    }

    #[test]
    fn a_jwt_with_one_second_left_is_used_and_one_with_less_is_refused() {
        let at = |seconds: f64| UNIX_EPOCH + Duration::from_secs_f64(seconds);
        let token = jwt(r#"{"exp":1000}"#);
        assert_eq!(
            jwt_lifetime(&token, at(999.0)),
            Ok(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            jwt_lifetime(&token, at(400.0)),
            Ok(Some(Duration::from_secs(600)))
        );
        assert!(jwt_lifetime(&token, at(999.5)).is_err());
        assert!(jwt_lifetime(&token, at(1000.0)).is_err());
        assert!(jwt_lifetime(&token, at(2000.0)).is_err());
        for not_a_jwt in ["opaque", "a.b", "a.b.c.d", "a.!!!.c"] {
            assert_eq!(jwt_lifetime(not_a_jwt, at(0.0)), Ok(None), "{not_a_jwt}");
        }
        for claims in [r#"{"exp":"1000"}"#, r#"{"sub":"x"}"#, "[1000]"] {
            assert_eq!(jwt_lifetime(&jwt(claims), at(0.0)), Ok(None), "{claims}");
        }
    }

    #[test]
    fn a_field_too_deeply_nested_to_read_counts_as_absent() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(
            ok(&format!(r#"{{"access_token":"a","expires_in":{deep}}}"#)).lifetime,
            DEFAULT_TOKEN_LIFETIME
        );
        assert_eq!(
            ok(&format!(
                r#"{{"access_token":"a","expires_in":60,"x":{deep}}}"#
            ))
            .lifetime,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn a_non_json_error_page_reports_status_and_type_but_not_the_body() {
        let error = err(502, Some("text/html"), "<html>secret-token</html>");
        let text = format!("{error} {error:?}");
        assert!(text.contains("502") && text.contains("text/html"), "{text}");
        assert!(!text.contains("secret-token") && !text.contains("<html>"));
        let error = err(200, Some("text/html"), "<html>secret-token</html>");
        assert!(matches!(
            error.kind(),
            ErrorKind::InvalidTokenResponse { field: "body", .. }
        ));
        assert!(!format!("{error} {error:?}").contains("secret-token"));
    }

    #[test]
    fn retry_after_dates_count_from_the_arrival_without_a_date_header() {
        let arrived = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let delay = |values: &[&str], date: Option<&str>| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            }
            if let Some(date) = date {
                headers.insert(DATE, HeaderValue::from_str(date).unwrap());
            }
            retry_after_delay(&headers, arrived)
        };
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(delay(&["Sun, 06 Nov 1994 08:49:42 GMT"], None), secs(5));
        assert_eq!(delay(&["Sunday, 06-Nov-94 08:49:47 GMT"], None), secs(10));
        assert_eq!(delay(&["Sun Nov  6 08:50:37 1994"], None), secs(60));
        assert_eq!(delay(&["Sun, 06 Nov 1994 08:49:00 GMT"], None), secs(0));
        // A Date header (the server's clock) wins over the local arrival time.
        assert_eq!(
            delay(
                &["Sun, 06 Nov 1994 08:49:42 GMT"],
                Some("Sun, 06 Nov 1994 08:49:40 GMT")
            ),
            secs(2)
        );
        // An unusable Date falls back to the arrival time.
        assert_eq!(
            delay(&["Sun, 06 Nov 1994 08:49:42 GMT"], Some("yesterday")),
            secs(5)
        );
        assert_eq!(delay(&["99999999999999999999999"], None), secs(u64::MAX));
        assert_eq!(delay(&["nonsense", "3"], None), secs(3));
        for bad in [
            "",
            "1.5",
            "-3",
            "0x10",
            "Sun, 06 Nov 1994",
            "Mon, 99 Foo 1994 08:49:42 GMT",
        ] {
            assert_eq!(delay(&[bad], None), None, "{bad:?}");
        }
        assert_eq!(retry_after_delay(&HeaderMap::new(), arrived), None);
    }

    #[test]
    fn only_identity_is_an_expected_content_coding() {
        let coding = |values: &[&[u8]]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(CONTENT_ENCODING, HeaderValue::from_bytes(value).unwrap());
            }
            unexpected_content_encoding(&headers)
        };
        assert_eq!(coding(&[]), None);
        assert_eq!(coding(&[b"identity"]), None);
        assert_eq!(coding(&[b"IDENTITY"]), None);
        assert_eq!(coding(&[b" , identity ,"]), None);
        assert_eq!(coding(&[b"gzip"]).as_deref(), Some("gzip"));
        assert_eq!(coding(&[b"identity", b"br"]).as_deref(), Some("br"));
        assert_eq!(coding(&[b"aes128gcm, gzip"]).as_deref(), Some("aes128gcm"));
        let long = "x".repeat(1000);
        assert_eq!(
            coding(&[long.as_bytes()]).map(|coding| coding.chars().count()),
            Some(crate::error::MAX_SERVER_TEXT_CHARS)
        );
        assert_eq!(coding(&[b"gz\xffip"]).as_deref(), Some("gz\u{fffd}ip"));
    }
}
