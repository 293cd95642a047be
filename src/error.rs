//! The crate's one error type, [`Error`], and what it can be, [`ErrorKind`].
//!
//! An `Error` is `Clone` (its content sits behind an `Arc`) so that one failed token request can be
//! handed to every caller that was waiting on it. No `Error` ever holds the `client_secret`, the
//! Basic credentials, an access token or a raw response body: its message is built only from
//! status codes, content types, field names and the RFC 6749 §5.2 error fields.
//!
//! Through [`crate::OAuth2Service`] an `Error` arrives as a [`tower::BoxError`]; get it back with
//! `err.downcast_ref::<nuvy_oauth2::Error>()`.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// Longest server-supplied text (an `error_description`, a `token_type`) kept in an error, in
/// characters. A longer text is cut; control characters are replaced, so a hostile server cannot
/// forge log lines through our errors.
pub const MAX_SERVER_TEXT_CHARS: usize = 200;

/// The error this crate returns. Match on [`Error::kind`]; see [`ErrorKind`] for each case.
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    source: Option<Box<dyn StdError + Send + Sync>>,
    /// The token endpoint a failed token request went to, without userinfo or query.
    endpoint: Option<Box<str>>,
}

/// The RFC 6749 §5.2 error fields of a token endpoint's error response, each present only when
/// the body carried it as a string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenErrorFields {
    /// `error`: an ASCII code such as `invalid_client`, `invalid_request`,
    /// `unsupported_grant_type` (RFC 6749 §5.2).
    pub error: Option<String>,
    /// `error_description`: human-readable text from the server, cut to
    /// [`MAX_SERVER_TEXT_CHARS`].
    pub error_description: Option<String>,
    /// `error_uri`: a page describing the error.
    pub error_uri: Option<String>,
}

/// What went wrong. `#[non_exhaustive]`: new cases may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An environment variable is unset or empty (it is named; its value is never shown).
    MissingEnvVar {
        /// The variable, e.g. `NUVY_CLIENT_ID`.
        name: &'static str,
    },
    /// An environment variable holds a value outside the accepted set (e.g. `NUVY_ENVIRONMENT`
    /// other than `qa` or `production`).
    InvalidEnvVar {
        /// The variable.
        name: &'static str,
        /// What it may hold.
        expected: &'static str,
    },
    /// A `client_id` or `client_secret` that can never authenticate: empty, with a character
    /// outside printable ASCII %x20-7E (RFC 6749 Appendix A), or a `:` in the `client_id` sent
    /// with raw HTTP Basic (RFC 7617 §2). Refused when the configuration is built; the value is
    /// never shown.
    InvalidCredential {
        /// The setting (`client_id`, `client_secret`) or the environment variable the value came
        /// from (`NUVY_CLIENT_SECRET`, ...).
        setting: &'static str,
        /// 1-based position (in characters) of the offending character; `None` for an empty
        /// value.
        position: Option<usize>,
        /// What is wrong, and the remedy when there is one.
        reason: &'static str,
    },
    /// The configuration is unusable (empty client_id or client_secret, an unparsable token
    /// endpoint URL, a zero timeout, ...). The text says which setting.
    InvalidConfig(String),
    /// A builder setting lies outside its documented valid range (see
    /// [`crate::OAuth2ConfigBuilder`]); nothing was built.
    SettingOutOfRange {
        /// The builder method, e.g. `"token_request_timeout"`.
        setting: &'static str,
        /// The valid range, e.g. `"1 ms to 10 min"`.
        valid: &'static str,
    },
    /// A URL uses plain `http` while [`crate::OAuth2ConfigBuilder::allow_insecure_http`] is off
    /// (and, with [`crate::OAuth2ConfigBuilder::allow_insecure_http_on_loopback`], its host is
    /// not loopback).
    /// The Nuvy authentication documentation requires HTTPS for all requests; nothing was sent.
    InsecureScheme {
        /// `"token endpoint"` or `"API request"`.
        target: &'static str,
    },
    /// A request's URI names an origin (scheme, host, port) the bearer token may not go to
    /// (RFC 6750 §5.3): not the token endpoint's origin, nor one added with
    /// [`crate::OAuth2ConfigBuilder::allow_origin`]. Typically a redirect followed by a layer
    /// outside the auth layer. Nothing was sent.
    OriginNotAllowed {
        /// The refused origin, `scheme://host:port` (never a path, query or userinfo).
        origin: String,
    },
    /// The token endpoint refused the request with an OAuth2 error (RFC 6749 §5.2): any 400 or
    /// 401; another 4xx (but 408 and 429) whose JSON body has an `error` field; or a 2xx body
    /// that carries an `error` field.
    TokenRequestRejected {
        /// The HTTP status of the token response.
        status: StatusCode,
        /// The RFC 6749 §5.2 fields found in the body.
        fields: TokenErrorFields,
    },
    /// The token endpoint answered with a status that is neither success nor 400/401 (a 3xx
    /// redirect, which is never followed, 429, 5xx, ...).
    UnexpectedStatus {
        /// The HTTP status.
        status: StatusCode,
        /// The `Content-Type` of the body, if any.
        content_type: Option<String>,
        /// The `Retry-After` delay in seconds, when the response carried one (429, 503).
        retry_after: Option<Duration>,
    },
    /// The token response came with a `Content-Encoding` (e.g. `gzip`) although the request
    /// asked for `identity` only (RFC 9110 §12.5.3): a gateway's fault, so transient; the body
    /// is not read.
    UnexpectedContentEncoding {
        /// The HTTP status of the token response.
        status: StatusCode,
        /// The content coding received, cut to [`MAX_SERVER_TEXT_CHARS`].
        encoding: String,
    },
    /// A token response could not be used: not JSON, missing or empty `access_token`, an
    /// `expires_in` that is zero, negative or not a number, an access token that is not a valid
    /// header value. The body is never echoed.
    InvalidTokenResponse {
        /// The field at fault, or `"body"` when the body as a whole is unusable.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
        /// The `Content-Type` of the body, if any.
        content_type: Option<String>,
    },
    /// The token response named a `token_type` other than `Bearer` (RFC 6750), which this crate
    /// never sends as a bearer token.
    UnsupportedTokenType {
        /// The `token_type` received, cut to [`MAX_SERVER_TEXT_CHARS`].
        token_type: String,
    },
    /// The token response body exceeded the configured limit (in bytes); reading stopped there.
    ResponseTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The token request did not complete within the token request timeout. `Display` names
    /// the endpoint ([`Error::token_endpoint`]).
    Timeout {
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The token request failed in transport (DNS, connect, TLS, proxy, I/O). `Display` names
    /// the endpoint ([`Error::token_endpoint`]) and the innermost cause in short form
    /// ([`Error::cause`]); the whole chain is in [`std::error::Error::source`].
    Transport,
    /// The token refresh ended without a result (its task panicked or the runtime shut down).
    RefreshAborted,
    /// No Tokio runtime is running; the token refresh needs one to run in.
    NoRuntime,
    /// The Tokio runtime was built without its time driver (no `enable_time()` or
    /// `enable_all()`); the token request timeout and the refresh deadlines need it.
    NoTimeDriver,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                source: None,
                endpoint: None,
            }),
        }
    }

    /// A token request to `endpoint` (already stripped of userinfo and query, see
    /// [`crate::cause::endpoint_for_display`]) that failed in transport or timed out.
    pub(crate) fn at_endpoint(
        kind: ErrorKind,
        endpoint: &str,
        source: Option<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                source,
                endpoint: Some(endpoint.into()),
            }),
        }
    }

    #[allow(dead_code)] // no caller since transport errors carry their endpoint (at_endpoint)
    pub(crate) fn with_source(kind: ErrorKind, source: Box<dyn StdError + Send + Sync>) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                source: Some(source),
                endpoint: None,
            }),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// The token endpoint of a token request that failed in transport or timed out
    /// ([`ErrorKind::Transport`], [`ErrorKind::Timeout`]): scheme, host, port and path, never
    /// userinfo or query. `None` for other errors.
    pub fn token_endpoint(&self) -> Option<&str> {
        self.inner.endpoint.as_deref()
    }

    /// The innermost cause of a transport error in short form ("connection refused",
    /// "dns error: no such host", "invalid peer certificate: UnknownIssuer"), as `Display`
    /// shows it. `None` when the error has no source.
    pub fn cause(&self) -> Option<String> {
        self.inner
            .source
            .as_deref()
            .map(|source| crate::cause::short_cause(source as &(dyn StdError + 'static)))
    }

    /// The token endpoint's HTTP status, when the error comes from a token response.
    pub fn status(&self) -> Option<StatusCode> {
        match &self.inner.kind {
            ErrorKind::TokenRequestRejected { status, .. }
            | ErrorKind::UnexpectedStatus { status, .. }
            | ErrorKind::UnexpectedContentEncoding { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The RFC 6749 §5.2 fields of a rejected token request.
    pub fn token_error_fields(&self) -> Option<&TokenErrorFields> {
        match &self.inner.kind {
            ErrorKind::TokenRequestRejected { fields, .. } => Some(fields),
            _ => None,
        }
    }

    /// True when the token endpoint rejected the client credentials: a 401, or
    /// `error=invalid_client` (RFC 6749 §5.2; the Nuvy authentication documentation: "401 Invalid credentials").
    pub fn is_invalid_client(&self) -> bool {
        match &self.inner.kind {
            ErrorKind::TokenRequestRejected { status, fields } => {
                *status == StatusCode::UNAUTHORIZED
                    || fields.error.as_deref() == Some("invalid_client")
            }
            _ => false,
        }
    }

    /// The `Retry-After` delay the token endpoint asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match &self.inner.kind {
            ErrorKind::UnexpectedStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when a later token request may succeed without a configuration change (timeouts,
    /// transport errors, 5xx, 429); false for rejected credentials or grant and for unusable
    /// token responses.
    pub fn is_transient(&self) -> bool {
        crate::cache::is_transient(self)
    }

    /// True for a token request timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self.inner.kind, ErrorKind::Timeout { .. })
    }
}

/// Cuts server text to [`MAX_SERVER_TEXT_CHARS`] and replaces control characters.
pub(crate) fn sanitize_server_text(text: &str) -> String {
    text.chars()
        .take(MAX_SERVER_TEXT_CHARS)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// One line of advice for a rejected token request, chosen by the RFC 6749 §5.2 `error` code
/// (every code of §5.2, RFC 8707's `invalid_target`, the §4.1.2.1 server-fault codes, and a
/// neutral line for any other code), else, without a code, by the status as the Nuvy
/// authentication documentation's error table does (400: the grant type; 401: the
/// credentials).
fn remedy(status: StatusCode, error: Option<&str>) -> &'static str {
    match error {
        // The Nuvy documentation's advice for a 400.
        Some("invalid_request" | "unsupported_grant_type") => {
            "check that the request sends grant_type=client_credentials"
        }
        Some("invalid_client") => {
            "verify client_id and client_secret, and that the server accepts this client \
             authentication style (ClientAuthentication)"
        }
        Some("invalid_grant") => {
            "the server refused the client_credentials grant for this client; ask its \
             administrator whether the client is enabled"
        }
        Some("unauthorized_client") => {
            "this client is not allowed to use the client_credentials grant; ask the \
             authorization server's administrator to enable it"
        }
        Some("invalid_scope") => {
            "the requested scope (or audience/resource) is unknown or not granted to this \
             client; check .scope(), .audience() and .resource()"
        }
        // RFC 8707 §2: the resource indicator's own code.
        Some("invalid_target") => {
            "the requested resource (RFC 8707) is unknown or not allowed for this client; check \
             .resource() and .audience()"
        }
        // RFC 6749 §4.1.2.1 codes some token endpoints send too: the server's own fault.
        Some("server_error" | "temporarily_unavailable") => {
            "the authorization server reports a fault of its own; try again later"
        }
        Some(_) => {
            "the server's error code is none of RFC 6749 §5.2; see its error_description and \
             documentation"
        }
        _ => match status {
            StatusCode::BAD_REQUEST => "check that the request sends grant_type=client_credentials",
            StatusCode::UNAUTHORIZED => "verify client_id and client_secret",
            _ => "check the token endpoint and the client credentials",
        },
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.kind {
            ErrorKind::MissingEnvVar { name } => {
                write!(f, "environment variable {name} is not set or is empty")
            }
            ErrorKind::InvalidEnvVar { name, expected } => {
                write!(f, "environment variable {name} must be {expected}")
            }
            ErrorKind::InvalidCredential {
                setting,
                position,
                reason,
            } => {
                write!(f, "invalid OAuth2 configuration: {setting} {reason}")?;
                if let Some(position) = position {
                    write!(f, " (at character {position}; the value is not shown)")?;
                }
                Ok(())
            }
            ErrorKind::InvalidConfig(what) => write!(f, "invalid OAuth2 configuration: {what}"),
            ErrorKind::SettingOutOfRange { setting, valid } => write!(
                f,
                "invalid OAuth2 configuration: {setting} must be within {valid}"
            ),
            ErrorKind::InsecureScheme { target } => write!(
                f,
                "refusing to use plain http for the {target}: HTTPS is required \
                 (allow_insecure_http is off; allow_insecure_http_on_loopback allows loopback \
                 hosts only)"
            ),
            ErrorKind::OriginNotAllowed { origin } => write!(
                f,
                "refusing to send the access token to {origin}: not an allowed origin (add it \
                 with allow_origin if it is yours); nothing was sent"
            ),
            ErrorKind::TokenRequestRejected { status, fields } => {
                write!(f, "token endpoint rejected the request with {status}")?;
                if let Some(error) = &fields.error {
                    write!(f, " (error={error}")?;
                    if let Some(description) = &fields.error_description {
                        write!(f, ": {description}")?;
                    }
                    f.write_str(")")?;
                }
                write!(f, "; {}", remedy(*status, fields.error.as_deref()))
            }
            ErrorKind::UnexpectedStatus {
                status,
                content_type,
                ..
            } => {
                write!(f, "token endpoint answered {status}")?;
                if let Some(content_type) = content_type {
                    write!(f, " with content-type {content_type}")?;
                }
                Ok(())
            }
            ErrorKind::UnexpectedContentEncoding { status, encoding } => write!(
                f,
                "token endpoint answered {status} with content-encoding {encoding:?}, which was \
                 not asked for (the request sends Accept-Encoding: identity); a gateway may be \
                 compressing the reply"
            ),
            ErrorKind::InvalidTokenResponse {
                field,
                reason,
                content_type,
            } => {
                write!(f, "invalid token response: `{field}` {reason}")?;
                if let Some(content_type) = content_type {
                    write!(f, " (content-type {content_type})")?;
                }
                Ok(())
            }
            ErrorKind::UnsupportedTokenType { token_type } => write!(
                f,
                "unsupported token type {token_type:?}: only Bearer tokens (RFC 6750) are sent"
            ),
            ErrorKind::ResponseTooLarge { limit } => {
                write!(f, "token response body exceeds the {limit}-byte limit")
            }
            ErrorKind::Timeout { after } => {
                f.write_str("token request")?;
                if let Some(endpoint) = &self.inner.endpoint {
                    write!(f, " to {endpoint}")?;
                }
                write!(f, " timed out after {after:?}")
            }
            ErrorKind::Transport => {
                f.write_str("token request")?;
                if let Some(endpoint) = &self.inner.endpoint {
                    write!(f, " to {endpoint}")?;
                }
                match self.cause() {
                    Some(cause) => write!(f, " failed: {cause}"),
                    None => f.write_str(" failed in transport"),
                }
            }
            ErrorKind::RefreshAborted => f.write_str("token refresh ended without a result"),
            ErrorKind::NoRuntime => {
                f.write_str("no Tokio runtime: the token refresh must run inside one")
            }
            ErrorKind::NoTimeDriver => f.write_str(
                "the Tokio runtime has no time driver: build it with enable_time() or enable_all()",
            ),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Error");
        debug.field("kind", &self.inner.kind);
        if let Some(endpoint) = &self.inner.endpoint {
            debug.field("endpoint", endpoint);
        }
        if let Some(source) = &self.inner.source {
            debug.field("source", &format_args!("{source}"));
            debug.field("cause", &self.cause().unwrap_or_default());
        }
        debug.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}
