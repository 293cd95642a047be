//! Configuration: which token endpoint, which client credentials, and the token lifecycle
//! settings. Every default is a named constant with its rationale.
//!
//! # Example
//!
//! ```
//! use nuvy_oauth2::{ClientCredentials, Environment, OAuth2Config};
//!
//! let config = OAuth2Config::builder(ClientCredentials::new("my-client-id", "my-client-secret"))
//!     .environment(Environment::Production)
//!     .scope("read write")
//!     .build()
//!     .expect("valid configuration");
//! assert_eq!(config.token_endpoint(), "https://prd.api.nuvy.ai/oauth2/token");
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::Uri;

use crate::error::{Error, ErrorKind};
use crate::origin::AllowedOrigins;
use crate::secret::ClientSecret;
use crate::transport::TransportOptions;

/// Environment variable holding the `client_id` (the Nuvy authentication documentation: "Store credentials in environment
/// variables or a secrets manager").
pub const CLIENT_ID_ENV_VAR: &str = "NUVY_CLIENT_ID";
/// Environment variable holding the `client_secret`.
pub const CLIENT_SECRET_ENV_VAR: &str = "NUVY_CLIENT_SECRET";
/// Environment variable holding the path of a file whose content is the `client_secret`
/// (a mounted Kubernetes or Docker secret), read by [`ClientCredentials::from_env`] when
/// [`CLIENT_SECRET_ENV_VAR`] is unset. Trailing line breaks of the file are removed.
pub const CLIENT_SECRET_FILE_ENV_VAR: &str = "NUVY_CLIENT_SECRET_FILE";
/// Optional environment variable choosing the environment: `qa` or `production`
/// (case-insensitive; unset means production).
pub const ENVIRONMENT_ENV_VAR: &str = "NUVY_ENVIRONMENT";

/// The QA token endpoint (the Nuvy authentication documentation, table "Environment | Token Endpoint").
pub const QA_TOKEN_ENDPOINT: &str = "https://qa.api.nuvy.ai/oauth2/token";
/// The production token endpoint (the Nuvy authentication documentation, table "Environment | Token Endpoint").
pub const PRODUCTION_TOKEN_ENDPOINT: &str = "https://prd.api.nuvy.ai/oauth2/token";

/// Default timeout of one token request: 10 s. A token reply is small and fast; past 10 s the
/// endpoint is better treated as failing than waited on, and the timeout runs independently of
/// any caller's own deadline.
pub const DEFAULT_TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a token response body: 64 KiB. A token reply is a few KiB at most; an
/// endless body must not exhaust memory.
pub const DEFAULT_MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest token request timeout [`OAuth2ConfigBuilder::token_request_timeout`] accepts:
/// 10 min. A token endpoint slower than that is down; the valid range is 1 ms to 10 min.
pub const MAX_TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Shortest token request timeout accepted: 1 ms (zero would fail every request).
pub const MIN_TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_millis(1);
/// Largest token response body cap [`OAuth2ConfigBuilder::max_token_response_bytes`] accepts:
/// 16 MiB. The valid range is 1 byte to 16 MiB.
pub const MAX_TOKEN_RESPONSE_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Upper bound of the refresh margin: a token is treated as expired (callers wait for a new one)
/// this long before its `expires_in` runs out, or 10 % of its lifetime when that is shorter
/// ([`REFRESH_MARGIN_PERCENT`]). 60 s covers clock skew and the time a request spends in flight.
pub const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The refresh margin as a share of the token lifetime, in percent, when that is shorter than
/// [`MAX_REFRESH_MARGIN`]: a 5-second token is refreshed 0.5 s early, not "always expired".
pub const REFRESH_MARGIN_PERCENT: u32 = 10;
/// Lifetime assumed when a token response has no `expires_in` and the token is not a JWT with an
/// `exp` claim: 300 s. Never "forever", and never "refetch on every call".
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Longest lifetime a token is cached for, whatever `expires_in` says: 24 h. A huge `expires_in`
/// (even `u64::MAX`) is clamped to this rather than overflowing; refreshing once a day is cheap.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// A Nuvy deployment, each with its token endpoint (the Nuvy authentication documentation: "Environment | Token Endpoint").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    /// QA: [`QA_TOKEN_ENDPOINT`].
    Qa,
    /// Production: [`PRODUCTION_TOKEN_ENDPOINT`].
    Production,
}

impl Environment {
    /// The environment's token endpoint URL.
    pub fn token_endpoint(self) -> &'static str {
        match self {
            Environment::Qa => QA_TOKEN_ENDPOINT,
            Environment::Production => PRODUCTION_TOKEN_ENDPOINT,
        }
    }

    /// Reads [`ENVIRONMENT_ENV_VAR`] (`NUVY_ENVIRONMENT`): `qa` or `production`, any case; unset
    /// or empty means [`Environment::Production`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidEnvVar`] for any other value (the value is not shown).
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var(ENVIRONMENT_ENV_VAR) {
            Ok(value) if !value.is_empty() => value.parse(),
            _ => Ok(Environment::Production),
        }
    }
}

impl FromStr for Environment {
    type Err = Error;

    /// Parses `qa` or `production` (also `prd` and `prod`), ignoring ASCII case.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidEnvVar`] naming `NUVY_ENVIRONMENT` for anything else.
    fn from_str(value: &str) -> Result<Self, Error> {
        let value = value.trim();
        if value.eq_ignore_ascii_case("qa") {
            Ok(Environment::Qa)
        } else if ["production", "prd", "prod"]
            .iter()
            .any(|name| value.eq_ignore_ascii_case(name))
        {
            Ok(Environment::Production)
        } else {
            Err(Error::new(ErrorKind::InvalidEnvVar {
                name: ENVIRONMENT_ENV_VAR,
                expected: "`qa` or `production`",
            }))
        }
    }
}

/// How the client authenticates to the token endpoint. One style per request; the crate never
/// retries with another style, so the secret is never sent twice in two shapes.
///
/// For `client_id = "my client"` and `client_secret = "p@ss:w+rd/%="`:
///
/// | style | what is sent |
/// |---|---|
/// | [`BasicRaw`](Self::BasicRaw) | `Authorization: Basic base64("my client:p@ss:w+rd/%=")` = `Basic bXkgY2xpZW50OnBAc3M6dytyZC8lPQ==` |
/// | [`BasicFormEncoded`](Self::BasicFormEncoded) | `Authorization: Basic base64("my%20client:p%40ss%3Aw%2Brd%2F%25%3D")` = `Basic bXklMjBjbGllbnQ6cCU0MHNzJTNBdyUyQnJkJTJGJTI1JTNE` |
/// | [`RequestBody`](Self::RequestBody) | body `grant_type=client_credentials&client_id=my+client&client_secret=p%40ss%3Aw%2Brd%2F%25%3D` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientAuthentication {
    /// HTTP Basic over the raw `client_id:client_secret`, as the Nuvy docs and `curl -u` do
    /// (the Nuvy authentication documentation: "Basic {base64(client_id:client_secret)}"). Default for [`Environment`]s.
    BasicRaw,
    /// HTTP Basic over the RFC 6749 §2.3.1 encoded values: every byte outside
    /// `A-Z a-z 0-9 - . _ ~` percent-encoded, space as `%20`. Servers that form-decode and
    /// servers that only percent-decode read it the same. Default for custom token endpoints.
    BasicFormEncoded,
    /// `client_secret_post` (RFC 6749 §2.3.1): `client_id` and `client_secret` in the form body,
    /// no `Authorization` header.
    RequestBody,
}

/// The client credentials the authorization server issued (RFC 6749 §2.3; the Nuvy authentication documentation: "Nuvy will
/// provide you with a pair of credentials"). `Debug` shows the `client_id` only.
#[derive(Clone)]
pub struct ClientCredentials {
    client_id: String,
    client_secret: ClientSecret,
    /// Where each value came from, to name it in errors: the setting (`client_id`) or the
    /// environment variable.
    client_id_origin: &'static str,
    client_secret_origin: &'static str,
    /// Where the secret is read again from when it may have changed.
    secret_source: Option<crate::rotation::SecretSource>,
}

impl ClientCredentials {
    /// Credentials whose `client_secret` comes from `source` and may change without a restart
    /// (a file Kubernetes updates, a secrets manager): see [`crate::SecretSource`]. The secret
    /// is read now, trailing line breaks removed.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] when the file cannot be read as UTF-8 text or the callback
    /// fails; [`ErrorKind::InvalidCredential`] for an empty secret or one with characters
    /// outside printable ASCII (named by position, never shown).
    pub fn with_secret_source(
        client_id: impl Into<String>,
        source: crate::rotation::SecretSource,
    ) -> Result<Self, Error> {
        let (secret, _) = source.read()?;
        Ok(Self {
            secret_source: Some(source),
            ..Self::new(client_id, secret)
        })
    }

    /// The source of a secret that may change, if any.
    pub(crate) fn secret_source(&self) -> Option<&crate::rotation::SecretSource> {
        self.secret_source.as_ref()
    }

    /// Credentials given in code (for instance read from a secrets manager), taken as they
    /// are. They are checked when the configuration is built
    /// ([`OAuth2ConfigBuilder::build`]): empty values and characters outside printable ASCII
    /// (%x20-7E, RFC 6749 Appendix A), a trailing newline included, are refused there.
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<ClientSecret>) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            client_id_origin: "client_id",
            client_secret_origin: "client_secret",
            secret_source: None,
        }
    }

    /// Reads [`CLIENT_ID_ENV_VAR`] (`NUVY_CLIENT_ID`) and [`CLIENT_SECRET_ENV_VAR`]
    /// (`NUVY_CLIENT_SECRET`); when `NUVY_CLIENT_SECRET` is unset, the content of the file named
    /// by [`CLIENT_SECRET_FILE_ENV_VAR`] (`NUVY_CLIENT_SECRET_FILE`). Trailing line breaks
    /// (`\n`, `\r\n`, as `echo secret > file` or a secrets manager export leave them) are
    /// removed from every value; anything else is kept, and checked by
    /// [`OAuth2ConfigBuilder::build`], whose errors name the variable.
    ///
    /// # Errors
    /// - [`ErrorKind::MissingEnvVar`] naming the first variable that is unset or empty (after
    ///   the line breaks are removed).
    /// - [`ErrorKind::InvalidCredential`] naming the variable and the 1-based position of the
    ///   first character outside printable ASCII when a value (or the file's content) is not
    ///   UTF-8 at all (a Latin-1 export, say).
    /// - [`ErrorKind::InvalidEnvVar`] naming `NUVY_CLIENT_SECRET_FILE` when that file cannot be
    ///   read.
    ///
    /// No value is ever shown.
    pub fn from_env() -> Result<Self, Error> {
        let client_id = read_required_env(CLIENT_ID_ENV_VAR)?;
        let (client_secret, client_secret_origin) = match read_required_env(CLIENT_SECRET_ENV_VAR) {
            Ok(secret) => (secret, CLIENT_SECRET_ENV_VAR),
            Err(missing) if matches!(missing.kind(), ErrorKind::MissingEnvVar { .. }) => {
                match std::env::var_os(CLIENT_SECRET_FILE_ENV_VAR) {
                    Some(path) if !path.is_empty() => {
                        let content = std::fs::read(path).map_err(|_| {
                            Error::new(ErrorKind::InvalidEnvVar {
                                name: CLIENT_SECRET_FILE_ENV_VAR,
                                expected: "the path of a readable file",
                            })
                        })?;
                        let content = String::from_utf8(content).map_err(|error| {
                            not_printable_ascii(error.as_bytes(), CLIENT_SECRET_FILE_ENV_VAR)
                        })?;
                        let secret = trim_line_breaks(&content);
                        if secret.is_empty() {
                            return Err(Error::new(ErrorKind::MissingEnvVar {
                                name: CLIENT_SECRET_FILE_ENV_VAR,
                            }));
                        }
                        (secret.to_owned(), CLIENT_SECRET_FILE_ENV_VAR)
                    }
                    _ => return Err(missing),
                }
            }
            Err(error) => return Err(error),
        };
        Ok(Self {
            client_id,
            client_secret: ClientSecret::new(client_secret),
            client_id_origin: CLIENT_ID_ENV_VAR,
            client_secret_origin,
            secret_source: None,
        })
    }

    /// The `client_id`. Not a secret (RFC 6749 §2.2).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The `client_secret`, still wrapped.
    pub fn client_secret(&self) -> &ClientSecret {
        &self.client_secret
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .finish()
    }
}

fn read_required_env(name: &'static str) -> Result<String, Error> {
    let missing = || Error::new(ErrorKind::MissingEnvVar { name });
    let value = std::env::var_os(name)
        .ok_or_else(missing)?
        .into_string()
        .map_err(|value| not_printable_ascii(value.as_encoded_bytes(), name))?;
    if value.trim().is_empty() {
        return Err(missing());
    }
    Ok(trim_line_breaks(&value).to_owned())
}

const NOT_PRINTABLE_ASCII: &str =
    "has a character outside printable ASCII (%x20-7E, RFC 6749 Appendix A)";

/// The error for a credential that is not even UTF-8: its first byte outside %x20-7E is named
/// by position (every byte before it is one ASCII character, so bytes and characters count
/// alike there).
fn not_printable_ascii(bytes: &[u8], setting: &'static str) -> Error {
    let index = bytes
        .iter()
        .position(|byte| !(0x20..=0x7e).contains(byte))
        .unwrap_or(0);
    Error::new(ErrorKind::InvalidCredential {
        setting,
        position: Some(index + 1),
        reason: NOT_PRINTABLE_ASCII,
    })
}

/// Removes trailing `\r` and `\n` only: every other character is part of the value.
pub(crate) fn trim_line_breaks(value: &str) -> &str {
    value.trim_end_matches(['\r', '\n'])
}

/// RFC 6749 Appendix A.1/A.2: `client_id` and `client_secret` are `*VSCHAR` (%x20-7E).
/// Refuses an empty value, names the 1-based position of the first character outside that
/// range, and refuses a blank value (only spaces: no issuer makes one, an unfilled template
/// does); never shows the value.
pub(crate) fn check_credential(value: &str, setting: &'static str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::new(ErrorKind::InvalidCredential {
            setting,
            position: None,
            reason: "is empty",
        }));
    }
    match value.chars().position(|c| !(' '..='~').contains(&c)) {
        Some(index) => Err(Error::new(ErrorKind::InvalidCredential {
            setting,
            position: Some(index + 1),
            reason: NOT_PRINTABLE_ASCII,
        })),
        None if value.trim().is_empty() => Err(Error::new(ErrorKind::InvalidCredential {
            setting,
            position: None,
            reason: "is blank (only spaces)",
        })),
        None => Ok(()),
    }
}

/// RFC 6749 §3.3: `scope = scope-token *( SP scope-token )`,
/// `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`. An empty scope (`scope=`) is not a scope.
fn check_scope(scope: &str) -> Result<(), Error> {
    let invalid = |what: String| Err(Error::new(ErrorKind::InvalidConfig(what)));
    if scope.is_empty() {
        return invalid(
            "scope is empty (RFC 6749 §3.3 has no empty scope); leave .scope() out to get the \
             server's default scope"
                .to_owned(),
        );
    }
    let mut previous = ' ';
    for (index, c) in scope.chars().enumerate() {
        let position = index + 1;
        if c == ' ' {
            if previous == ' ' {
                return invalid(format!(
                    "scope has an empty scope token at position {position} (a leading, \
                     trailing or doubled space; RFC 6749 §3.3)"
                ));
            }
        } else if !matches!(c, '\x21' | '\x23'..='\x5B' | '\x5D'..='\x7E') {
            return invalid(format!(
                "scope has a character not allowed in a scope token at position {position} \
                 (RFC 6749 §3.3)"
            ));
        }
        previous = c;
    }
    if previous == ' ' {
        return invalid(format!(
            "scope has an empty scope token at position {} (a trailing space; RFC 6749 §3.3)",
            scope.chars().count()
        ));
    }
    Ok(())
}

/// A complete, validated configuration. Build one with [`OAuth2Config::builder`] or
/// [`OAuth2Config::from_env`]; hand it to [`crate::OAuth2Layer::new`].
///
/// `Debug` shows no secret: the `client_secret` is redacted, so are the userinfo and query of
/// the token endpoint URL and the values of extra parameters (an RFC 7523
/// `client_assertion`, say).
#[derive(Clone)]
pub struct OAuth2Config {
    pub(crate) token_endpoint: Uri,
    pub(crate) credentials: ClientCredentials,
    pub(crate) client_authentication: ClientAuthentication,
    pub(crate) scope: Option<String>,
    pub(crate) audience: Option<String>,
    pub(crate) resource: Option<String>,
    pub(crate) extra_parameters: Vec<(String, String)>,
    pub(crate) allow_insecure_http: bool,
    /// Where the bearer token may go: the token endpoint's origin and those added.
    pub(crate) allowed_origins: AllowedOrigins,
    pub(crate) token_request_timeout: Duration,
    pub(crate) max_token_response_bytes: usize,
    /// TLS and proxy options of the built-in token transport (src/transport/).
    pub(crate) transport: TransportOptions,
}

impl OAuth2Config {
    /// Starts a builder for these credentials, aimed at [`Environment::Production`] until told
    /// otherwise.
    pub fn builder(credentials: ClientCredentials) -> OAuth2ConfigBuilder {
        OAuth2ConfigBuilder {
            endpoint: Endpoint::Environment(Environment::Production),
            credentials,
            client_authentication: None,
            scope: None,
            audience: None,
            resource: None,
            extra_parameters: Vec::new(),
            allow_insecure_http: false,
            allow_insecure_http_on_loopback: false,
            allowed_origins: Vec::new(),
            token_request_timeout: DEFAULT_TOKEN_REQUEST_TIMEOUT,
            max_token_response_bytes: DEFAULT_MAX_TOKEN_RESPONSE_BYTES,
            transport: TransportOptions::default(),
        }
    }

    /// Everything from the environment: credentials from `NUVY_CLIENT_ID` and
    /// `NUVY_CLIENT_SECRET`, the environment from `NUVY_ENVIRONMENT` (default production), every
    /// other setting at its default.
    ///
    /// # Errors
    /// [`ErrorKind::MissingEnvVar`] or [`ErrorKind::InvalidEnvVar`] naming the variable.
    pub fn from_env() -> Result<Self, Error> {
        Self::builder(ClientCredentials::from_env()?)
            .environment(Environment::from_env()?)
            .build()
    }

    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        self.token_endpoint.to_string()
    }

    /// The client credentials.
    pub fn credentials(&self) -> &ClientCredentials {
        &self.credentials
    }

    /// This configuration with another `client_secret` (a rotated one, already checked).
    pub(crate) fn with_client_secret(&self, secret: ClientSecret) -> Self {
        let mut config = self.clone();
        config.credentials.client_secret = secret;
        config
    }

    /// Whether plain `http` is allowed for the token endpoint and for API requests.
    pub fn allows_insecure_http(&self) -> bool {
        self.allow_insecure_http
    }
}

#[derive(Clone)]
enum Endpoint {
    Environment(Environment),
    Custom(String),
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Environment(environment) => write!(f, "{environment:?}"),
            Endpoint::Custom(url) => write!(f, "{:?}", redacted_url(url)),
        }
    }
}

/// A URL as `Debug` may show it: userinfo and query replaced by `<redacted>`, since either may
/// carry a credential (`https://user:pass@host/token`, `?api_key=`). Everything up to the last
/// `@` counts as userinfo, wherever it is: a password written with an unencoded `/`, `?` or
/// `#` (`https://user:pa/ss@host`) ends the authority early. Text that does not start with a
/// URI scheme and `://` is redacted whole.
pub(crate) fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".to_owned();
    };
    // RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
    let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"+-.".contains(&byte));
    if !is_scheme {
        return "<redacted>".to_owned();
    }
    let (userinfo, rest) = match rest.rfind('@') {
        Some(at) => ("<redacted>@", &rest[at + 1..]),
        None => ("", rest),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (host, tail) = rest.split_at(authority_end);
    let path = match tail.find(['?', '#']) {
        Some(query) => format!("{}?<redacted>", &tail[..query]),
        None => tail.to_owned(),
    };
    format!("{scheme}://{userinfo}{host}{path}")
}

/// Whether a URI host (as [`Uri::host`] gives it, IPv6 in brackets) is loopback by itself,
/// without a resolver: `localhost`, `127.0.0.0/8`, `::1`.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(ipv6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return ipv6
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    }
    host.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Extra parameters as `Debug` shows them: names only.
struct RedactedParameters<'a>(&'a [(String, String)]);

impl fmt::Debug for RedactedParameters<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, _)| (name, "<redacted>")))
            .finish()
    }
}

impl fmt::Debug for OAuth2Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Config")
            .field(
                "token_endpoint",
                &redacted_url(&self.token_endpoint.to_string()),
            )
            .field("credentials", &self.credentials)
            .field("client_authentication", &self.client_authentication)
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .field("resource", &self.resource)
            .field(
                "extra_parameters",
                &RedactedParameters(&self.extra_parameters),
            )
            .field("allow_insecure_http", &self.allow_insecure_http)
            .field("allowed_origins", &self.allowed_origins)
            .field("token_request_timeout", &self.token_request_timeout)
            .field("max_token_response_bytes", &self.max_token_response_bytes)
            .field("transport", &self.transport)
            .finish()
    }
}

impl fmt::Debug for OAuth2ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origins: Vec<String> = self
            .allowed_origins
            .iter()
            .map(|url| redacted_url(url))
            .collect();
        f.debug_struct("OAuth2ConfigBuilder")
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .field("client_authentication", &self.client_authentication)
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .field("resource", &self.resource)
            .field(
                "extra_parameters",
                &RedactedParameters(&self.extra_parameters),
            )
            .field("allow_insecure_http", &self.allow_insecure_http)
            .field(
                "allow_insecure_http_on_loopback",
                &self.allow_insecure_http_on_loopback,
            )
            .field("allowed_origins", &origins)
            .field("token_request_timeout", &self.token_request_timeout)
            .field("max_token_response_bytes", &self.max_token_response_bytes)
            .field("transport", &self.transport)
            .finish()
    }
}

/// Builder of an [`OAuth2Config`]. Every setting has a default; [`build`](Self::build) checks
/// them all. `Debug` redacts as [`OAuth2Config`]'s does.
#[derive(Clone)]
pub struct OAuth2ConfigBuilder {
    endpoint: Endpoint,
    credentials: ClientCredentials,
    client_authentication: Option<ClientAuthentication>,
    scope: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    extra_parameters: Vec<(String, String)>,
    allow_insecure_http: bool,
    allow_insecure_http_on_loopback: bool,
    allowed_origins: Vec<String>,
    token_request_timeout: Duration,
    max_token_response_bytes: usize,
    /// TLS and proxy options (methods in src/transport/options.rs).
    pub(crate) transport: TransportOptions,
}

impl OAuth2ConfigBuilder {
    /// Uses a Nuvy environment's token endpoint, with [`ClientAuthentication::BasicRaw`] as
    /// the Nuvy authentication documentation specifies.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.endpoint = Endpoint::Environment(environment);
        self
    }

    /// Uses any RFC 6749 token endpoint (an absolute `https` URL; `http` only with
    /// [`allow_insecure_http`](Self::allow_insecure_http)). Client authentication defaults to
    /// [`ClientAuthentication::BasicFormEncoded`].
    pub fn token_endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Endpoint::Custom(url.into());
        self
    }

    /// Chooses how the client authenticates (default: see [`ClientAuthentication`]).
    pub fn client_authentication(mut self, style: ClientAuthentication) -> Self {
        self.client_authentication = Some(style);
        self
    }

    /// Requests a `scope` (RFC 6749 §3.3): scope tokens separated by single spaces, sent as
    /// given. An empty scope, a leading, trailing or doubled space, or a character outside
    /// `%x21 / %x23-5B / %x5D-7E` is refused by [`build`](Self::build): leave this out to get
    /// the server's default scope.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Sends an `audience` parameter (used by Auth0, Okta and others).
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// Sends a `resource` indicator (RFC 8707).
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Adds one more form parameter to the token request body. `grant_type`, `client_id` and
    /// `client_secret` cannot be overridden this way (refused by [`build`](Self::build)).
    pub fn extra_parameter(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_parameters.push((name.into(), value.into()));
        self
    }

    /// Allows plain `http` for the token endpoint and lets the bearer token be attached to
    /// plain-`http` API requests. Off by default: the Nuvy authentication documentation requires HTTPS for all requests.
    /// Turn it on only for loopback tests and the embedded test server.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.allow_insecure_http = allow;
        self
    }

    /// Allows plain `http` for loopback hosts only: `127.0.0.0/8`, `[::1]` and `localhost` (any
    /// case), for a development server or a sidecar on the same machine. The token endpoint and
    /// every [`allow_origin`](Self::allow_origin) may then be `http` if their host is one of
    /// these; any other `http` host is still refused by [`build`](Self::build) with
    /// [`ErrorKind::InsecureScheme`], and API requests go only to allowed origins, so plain http
    /// never leaves the machine. Other names that may resolve to loopback
    /// (`*.localhost`, IPv4-mapped IPv6) are not trusted. Off by default. Once built, the
    /// configuration reports [`OAuth2Config::allows_insecure_http`] as `true`.
    pub fn allow_insecure_http_on_loopback(mut self, allow: bool) -> Self {
        self.allow_insecure_http_on_loopback = allow;
        self
    }

    /// Allows the bearer token on requests to one more origin (RFC 6454: scheme, host and port;
    /// a default port when the URL has none), given as an absolute `https` URL (`http` only with
    /// [`allow_insecure_http`](Self::allow_insecure_http)); its path, query and userinfo are
    /// ignored. Call once per origin. An IPv6 literal matches any spelling of the same address
    /// (`[::1]`, `[0:0::1]`).
    ///
    /// By default the token goes only to the origin of the token endpoint, which is where the
    /// Nuvy API lives (`https://prd.api.nuvy.ai`, `https://qa.api.nuvy.ai`). A request to any
    /// other absolute URL fails with [`ErrorKind::OriginNotAllowed`] before anything is sent
    /// (RFC 6750 §5.3), so a redirect followed by a layer outside this one never carries the
    /// token elsewhere. A URI without scheme and authority (tonic's `/package.Service/Method`)
    /// is left to the transport, which chose where it connects.
    pub fn allow_origin(mut self, url: impl Into<String>) -> Self {
        self.allowed_origins.push(url.into());
        self
    }

    /// Timeout of each token request, counted from the start of its refresh (default
    /// [`DEFAULT_TOKEN_REQUEST_TIMEOUT`], 10 s). Valid range: [`MIN_TOKEN_REQUEST_TIMEOUT`]
    /// (1 ms) to [`MAX_TOKEN_REQUEST_TIMEOUT`] (10 min); [`build`](Self::build) refuses
    /// anything else with [`ErrorKind::SettingOutOfRange`]. Callers waiting for a token give up
    /// 1 s after it.
    pub fn token_request_timeout(mut self, timeout: Duration) -> Self {
        self.token_request_timeout = timeout;
        self
    }

    /// Cap on the token response body, in bytes (default
    /// [`DEFAULT_MAX_TOKEN_RESPONSE_BYTES`], 64 KiB). Valid range: 1 to
    /// [`MAX_TOKEN_RESPONSE_BYTES_LIMIT`] (16 MiB); [`build`](Self::build) refuses anything
    /// else with [`ErrorKind::SettingOutOfRange`].
    pub fn max_token_response_bytes(mut self, limit: usize) -> Self {
        self.max_token_response_bytes = limit;
        self
    }

    /// Checks and freezes the configuration.
    ///
    /// # Errors
    /// - [`ErrorKind::InvalidCredential`], naming the setting (`client_id`, `client_secret`) or
    ///   the environment variable it came from, and the 1-based character position, never the
    ///   value: an empty value; a character outside printable ASCII %x20-7E (RFC 6749
    ///   Appendix A), a line break included; a `:` in the `client_id` with
    ///   [`ClientAuthentication::BasicRaw`] (RFC 7617 §2: it can never authenticate).
    /// - [`ErrorKind::InvalidConfig`]: a token endpoint that is not an absolute `http`/`https`
    ///   URL, that has userinfo (`user:password@`, RFC 9110 §4.2.4) or an `@` anywhere else
    ///   (a password with an unencoded `/`, `?` or `#`; write a literal `@` as `%40`), or a
    ///   port that is not a number from 0 to 65535; a `scope` that is empty or breaks the RFC 6749 §3.3
    ///   grammar; an empty `audience`; a `resource` that is not an absolute URI (RFC 8707 §2);
    ///   an extra parameter with an empty name or that would override `grant_type`,
    ///   `client_id`, `client_secret`, `scope`, `audience` or `resource`.
    /// - [`ErrorKind::InvalidConfig`] too for an [`allow_origin`](Self::allow_origin) URL that
    ///   is not an absolute `http`/`https` URL with a host, whose port is not a number from 0
    ///   to 65535, or with an `@` after its host; and for a [`proxy`](Self::proxy) URL with
    ///   either fault.
    /// - [`ErrorKind::SettingOutOfRange`] naming the setting: a token request timeout outside
    ///   1 ms to 10 min, a body cap outside 1 byte to 16 MiB.
    /// - [`ErrorKind::InsecureScheme`]: an `http` token endpoint or allowed origin without
    ///   [`allow_insecure_http`](Self::allow_insecure_http).
    pub fn build(self) -> Result<OAuth2Config, Error> {
        let invalid = |what: &str| Err(Error::new(ErrorKind::InvalidConfig(what.to_owned())));
        self.transport.check()?;
        let credentials = &self.credentials;
        check_credential(&credentials.client_id, credentials.client_id_origin)?;
        check_credential(
            credentials.client_secret.expose_secret(),
            credentials.client_secret_origin,
        )?;
        if let Some(scope) = &self.scope {
            check_scope(scope)?;
        }
        if self.audience.as_deref() == Some("") {
            return invalid("audience is empty; leave .audience() out instead");
        }
        if let Some(resource) = &self.resource {
            // RFC 8707 §2: an absolute URI without a fragment.
            let absolute = resource
                .parse::<Uri>()
                .is_ok_and(|uri| uri.scheme().is_some());
            if !absolute || resource.contains('#') {
                return invalid(
                    "resource must be an absolute URI without a fragment (RFC 8707 §2)",
                );
            }
        }
        if self
            .extra_parameters
            .iter()
            .any(|(name, _)| name.is_empty())
        {
            return invalid("an extra parameter has an empty name");
        }
        if !(MIN_TOKEN_REQUEST_TIMEOUT..=MAX_TOKEN_REQUEST_TIMEOUT)
            .contains(&self.token_request_timeout)
        {
            return Err(Error::new(ErrorKind::SettingOutOfRange {
                setting: "token_request_timeout",
                valid: "1 ms to 10 min",
            }));
        }
        if !(1..=MAX_TOKEN_RESPONSE_BYTES_LIMIT).contains(&self.max_token_response_bytes) {
            return Err(Error::new(ErrorKind::SettingOutOfRange {
                setting: "max_token_response_bytes",
                valid: "1 byte to 16 MiB",
            }));
        }
        if let Some((name, _)) = self.extra_parameters.iter().find(|(name, _)| {
            matches!(
                name.as_str(),
                "grant_type" | "client_id" | "client_secret" | "scope" | "audience" | "resource"
            )
        }) {
            return Err(Error::new(ErrorKind::InvalidConfig(format!(
                "extra parameter `{name}` is reserved; use its own setting"
            ))));
        }
        let (url, default_style) = match &self.endpoint {
            Endpoint::Environment(environment) => {
                (environment.token_endpoint(), ClientAuthentication::BasicRaw)
            }
            Endpoint::Custom(url) => (url.as_str(), ClientAuthentication::BasicFormEncoded),
        };
        let token_endpoint: Uri = match url.parse() {
            Ok(uri) => uri,
            Err(_) => return invalid("token endpoint is not a valid URL"),
        };
        match token_endpoint.scheme_str() {
            Some("https") => {}
            Some("http") if self.allow_insecure_http => {}
            Some("http")
                if self.allow_insecure_http_on_loopback
                    && token_endpoint.host().is_some_and(is_loopback_host) => {}
            Some("http") => {
                return Err(Error::new(ErrorKind::InsecureScheme {
                    target: "token endpoint",
                }))
            }
            _ => return invalid("token endpoint must be an absolute https URL"),
        }
        if token_endpoint.host().is_none_or(str::is_empty) {
            return invalid("token endpoint has no host");
        }
        if url.contains('@') {
            // RFC 9110 §4.2.4: never sent in a request target; and transports log authorities.
            // An `@` after the authority is refused too: it is most likely a password with an
            // unencoded `/`, `?` or `#` (`https://user:pa/ss@host`), which `http` reads as host
            // `user` and a path, and which would then be shown in errors and logs.
            return invalid(
                "token endpoint URL has userinfo (user:password@), which RFC 9110 §4.2.4 forbids \
                 in a request, or an '@' elsewhere (write it as %40); give the credentials with \
                 ClientCredentials",
            );
        }
        if !token_endpoint
            .authority()
            .is_some_and(|authority| crate::origin::port_is_valid(authority.as_str()))
        {
            return invalid("token endpoint URL has a port that is not a number from 0 to 65535");
        }
        let mut extra_origins = Vec::with_capacity(self.allowed_origins.len());
        for url in &self.allowed_origins {
            let uri: Uri = url.parse().map_err(|_| {
                Error::new(ErrorKind::InvalidConfig(
                    "an allowed origin is not a valid URL".to_owned(),
                ))
            })?;
            if crate::origin::has_at_outside_authority(url, &uri) {
                // A password with an unencoded `/`, `?` or `#` (`https://user:pa/ss@host`):
                // `http` would read host `user`, and the origin would name part of it.
                return invalid(
                    "an allowed origin URL has an '@' after its host (a password with an \
                     unencoded '/', '?' or '#'?); give the origin alone, e.g. \
                     https://api.example:8443",
                );
            }
            if uri
                .scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("http"))
                && !self.allow_insecure_http
                && !(self.allow_insecure_http_on_loopback
                    && uri.host().is_some_and(is_loopback_host))
            {
                return Err(Error::new(ErrorKind::InsecureScheme {
                    target: "allowed origin",
                }));
            }
            extra_origins.push(uri);
        }
        let allowed_origins =
            AllowedOrigins::from_urls(std::iter::once(&token_endpoint).chain(&extra_origins))?;
        let client_authentication = self.client_authentication.unwrap_or(default_style);
        if client_authentication == ClientAuthentication::BasicRaw {
            // RFC 7617 §2: the user-id ends at the first colon, so the server would read a
            // shorter client_id and a longer secret: this can never authenticate.
            if let Some(index) = self.credentials.client_id.chars().position(|c| c == ':') {
                return Err(Error::new(ErrorKind::InvalidCredential {
                    setting: self.credentials.client_id_origin,
                    position: Some(index + 1),
                    reason: "has a ':', which raw HTTP Basic cannot carry (RFC 7617 §2); use \
                             .client_authentication(ClientAuthentication::BasicFormEncoded) or \
                             ClientAuthentication::RequestBody",
                }));
            }
        }
        Ok(OAuth2Config {
            token_endpoint,
            credentials: self.credentials,
            client_authentication,
            scope: self.scope,
            audience: self.audience,
            resource: self.resource,
            extra_parameters: self.extra_parameters,
            // Every http origin was checked to be loopback above, and the origin check keeps API
            // requests to allowed origins: plain http can then reach loopback only.
            allow_insecure_http: self.allow_insecure_http || self.allow_insecure_http_on_loopback,
            allowed_origins,
            token_request_timeout: self.token_request_timeout,
            max_token_response_bytes: self.max_token_response_bytes,
            transport: self.transport,
        })
    }
}
