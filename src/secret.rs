//! Newtypes for the two secrets this crate handles: the `client_secret` (RFC 6749 §2.3.1) and the
//! access token (RFC 6749 §1.4). Neither prints its value in `Debug`; neither implements `Display`.

use std::fmt;
use std::sync::Arc;

/// The `client_secret` issued by the authorization server (RFC 6749 §2.3.1; the Nuvy authentication documentation: "Your
/// application's secret key").
///
/// `Debug` prints `ClientSecret(<redacted>)`; there is no `Display`. Read the value only with
/// [`ClientSecret::expose_secret`], which the token request is the one caller of in this crate.
/// Cloning is cheap (the value sits behind an `Arc`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(Arc<str>);

impl ClientSecret {
    /// Wraps a `client_secret`. Any string is accepted here; an empty one is refused when the
    /// configuration is built ([`crate::ErrorKind::InvalidConfig`]).
    pub fn new(secret: impl Into<String>) -> Self {
        Self(Arc::from(secret.into()))
    }

    /// The secret itself. Never log or format the returned value.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(<redacted>)")
    }
}

impl From<String> for ClientSecret {
    fn from(secret: String) -> Self {
        Self::new(secret)
    }
}

impl From<&str> for ClientSecret {
    fn from(secret: &str) -> Self {
        Self::new(secret)
    }
}

/// An OAuth2 access token (RFC 6749 §1.4; for Nuvy a JWT), as received in the `access_token`
/// field of a token response (RFC 6749 §5.1).
///
/// `Debug` prints `AccessToken(<redacted>)`; there is no `Display`. Cloning is cheap.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    pub(crate) fn new(token: String) -> Self {
        Self(Arc::from(token))
    }

    /// The token itself. Never log or format the returned value.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}
