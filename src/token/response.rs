//! Parsing a token response: RFC 6749 §5.1 (success) and §5.2 (error), leniently where real
//! servers differ and strictly where a mistake would be unsafe. No error built here ever holds
//! the body or the token.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64_URL;
use base64::Engine as _;
use http::{HeaderValue, StatusCode};
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
}

/// Turns a complete token response into a grant or a typed error.
pub(crate) fn parse_token_response(
    status: StatusCode,
    content_type: Option<&str>,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<TokenGrant, Error> {
    let content_type_owned = || content_type.map(sanitize_server_text);
    let json = parse_json_object(body);

    if status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED {
        return Err(rejected(status, json.as_ref()));
    }
    if !status.is_success() {
        if let Some(json) = json.as_ref().filter(|json| json.contains_key("error")) {
            if status.is_client_error()
                && status != StatusCode::TOO_MANY_REQUESTS
                && status != StatusCode::REQUEST_TIMEOUT
            {
                return Err(rejected(status, Some(json)));
            }
        }
        return Err(Error::new(ErrorKind::UnexpectedStatus {
            status,
            content_type: content_type_owned(),
            retry_after: retry_after
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
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
    if json.get("error").is_some_and(|error| !error.is_null()) {
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
        Some(Value::String(token_type)) if token_type.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(token_type)) => {
            return Err(Error::new(ErrorKind::UnsupportedTokenType {
                token_type: sanitize_server_text(token_type),
            }))
        }
        Some(_) => return Err(invalid("token_type", "is not a string")),
    }

    let lifetime = match json.get("expires_in") {
        None | Some(Value::Null) => jwt_lifetime(access_token)
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
    })
}

/// The body as a JSON object, or `None`. A number too large for `f64` (`1e400`), which
/// serde_json refuses, is read as `u64::MAX` (or `-1` when negative) so that a huge `expires_in`
/// is clamped like any other instead of failing the whole body.
fn parse_json_object(body: &[u8]) -> Option<Map<String, Value>> {
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

fn rejected(status: StatusCode, json: Option<&Map<String, Value>>) -> Error {
    let text = |name: &str| {
        json.and_then(|json| json.get(name))
            .and_then(Value::as_str)
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

/// When the token is a JWT with a numeric `exp` claim, its remaining lifetime. `Ok(None)` when
/// it is not a JWT or has no usable `exp`.
fn jwt_lifetime(token: &str) -> Result<Option<Duration>, &'static str> {
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
    let now = SystemTime::now()
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
    fn rejections_carry_rfc_6749_fields_and_the_seed_remedy() {
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
}
