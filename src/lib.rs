//! OAuth2 client credentials (RFC 6749 §4.4) as tower middleware, for the Nuvy API and any
//! RFC 6749 authorization server.
//!
//! [`OAuth2Layer`] wraps any `Service<http::Request<B>>` (hyper-util's client, a tonic
//! channel, an axum handler's outbound client) in an [`OAuth2Service`] that attaches
//! `Authorization: Bearer <access token>` to every request. The caller never sees a token:
//!
//! - the token is cached and reused, refreshed in the background before `expires_in` runs out,
//!   and waited for only when it is absent or about to expire;
//! - however many requests arrive at once, at most one token request is in flight;
//! - a 401 from the API invalidates exactly the token it rejected, and
//!   [`RetryOnUnauthorized`] sends the request once more, whatever its body type
//!   ([`ReplayBody`] keeps up to 64 KiB of it while it streams);
//! - the token goes only to allowed origins (by default the token endpoint's; RFC 6750 §5.3),
//!   whatever layers sit around the auth layer;
//! - secrets never appear in `Debug`, errors or logs, and the injected header is sensitive.
//!
//! # Example
//!
//! Against the embedded Nuvy-compatible server (feature `test-util`), so it runs offline:
//!
//! ```
//! # #[cfg(feature = "test-util")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::Empty;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use nuvy_oauth2::test_util::NuvyServer;
//! use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let server = NuvyServer::start().await?;
//! let config = OAuth2Config::builder(ClientCredentials::new(server.client_id(), server.client_secret()))
//!     .token_endpoint(server.token_endpoint())
//!     .allow_insecure_http(true) // loopback only
//!     .build()?;
//! let auth = OAuth2Layer::new(config)?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
//! let api = ServiceBuilder::new().layer(auth.clone().with_retry()).service(client);
//!
//! let request = http::Request::get(server.api_url("/v1/ping")).body(Empty::new())?;
//! let response = api.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(auth.token_cache().token_requests(), 1);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "test-util"))]
//! # fn main() {}
//! ```
//!
//! # Errors
//!
//! Services return `tower::BoxError`; the crate's own [`Error`] is inside it
//! (`err.downcast_ref::<nuvy_oauth2::Error>()`), with a matchable [`ErrorKind`].

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// Lets `nuvy_oauth2::…` paths resolve inside this crate too, so src/test_util/ (public API
// only) compiles both here and when tests, examples and benches include it by `#[path]`.
#[allow(unused_extern_crates)]
extern crate self as nuvy_oauth2;

mod body;
mod cache;
mod cause;
mod challenge;
mod config;
mod error;
mod future;
mod layer;
mod origin;
mod replay;
mod retry;
mod retry_policy;
mod rotation;
mod secret;
mod service;
pub mod store;
mod telemetry;
mod token;
mod transport;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod test_util;

pub use body::ResponseBody;
pub use cache::{
    RefreshReason, TokenCache, TokenCacheStatus, MAX_FAILURE_BACKOFF, MAX_RETRY_AFTER,
    MIN_FAILURE_BACKOFF, PERMANENT_FAILURE_PAUSE, REFRESH_AHEAD_JITTER_PERCENT,
    REFRESH_AHEAD_PERCENT, REJECTED_GENERATION_BACKOFF, REJECTED_GENERATION_WINDOW,
};
pub use config::{
    ClientAuthentication, ClientCredentials, Environment, OAuth2Config, OAuth2ConfigBuilder,
    CLIENT_ID_ENV_VAR, CLIENT_SECRET_ENV_VAR, CLIENT_SECRET_FILE_ENV_VAR,
    DEFAULT_MAX_TOKEN_RESPONSE_BYTES, DEFAULT_TOKEN_LIFETIME, DEFAULT_TOKEN_REQUEST_TIMEOUT,
    ENVIRONMENT_ENV_VAR, MAX_REFRESH_MARGIN, MAX_TOKEN_LIFETIME, MAX_TOKEN_REQUEST_TIMEOUT,
    MAX_TOKEN_RESPONSE_BYTES_LIMIT, MIN_TOKEN_REQUEST_TIMEOUT, PRODUCTION_TOKEN_ENDPOINT,
    QA_TOKEN_ENDPOINT, REFRESH_MARGIN_PERCENT,
};
pub use error::{Error, ErrorKind, TokenErrorFields, MAX_SERVER_TEXT_CHARS};
pub use future::ResponseFuture;
pub use layer::{OAuth2Layer, OAuth2RetryLayer, OAuth2RetryService};
pub use replay::{Recorded, Replay, ReplayBody, ReplayableBody, DEFAULT_MAX_REPLAY_BODY_BYTES};
pub use retry::{RetryOnUnauthorized, RetryOnUnauthorizedLayer, MAX_REPLAY_BODY_WAIT};
pub use retry_policy::UnauthorizedRetryPolicy;
pub use rotation::SecretSource;
pub use secret::{AccessToken, ClientSecret};
pub use service::{OAuth2Service, UsedTokenGeneration};
pub use telemetry::{
    METRIC_TOKEN_REMAINING_LIFETIME, METRIC_TOKEN_REQUESTS, METRIC_TOKEN_REQUEST_DURATION,
    METRIC_UNAUTHORIZED_REPLAYS,
};
pub use token::{TokenTransportBody, TokenTransportRequest};

/// The rustls version this crate builds on, for
/// [`OAuth2ConfigBuilder::tls_client_config`] (a `rustls::ClientConfig` of the same version).
pub use rustls;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
