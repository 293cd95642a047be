//! An embedded, Nuvy-compatible authorization server and protected API for offline tests,
//! examples and benchmarks (feature `test-util`).
//!
//! [`NuvyServer`] is a real hyper server on `127.0.0.1` with an OS-assigned port. It speaks
//! HTTP/1.1 and HTTP/2 on the same port (hyper-util's `auto` connection builder): a connection
//! that opens with the HTTP/2 connection preface is served as HTTP/2 (h2c with prior
//! knowledge, RFC 9113 §3.3), any other as HTTP/1.1. Put a TLS terminator that forwards the
//! bytes in front of it and h2 negotiated by ALPN works the same way. The feature `test-util`
//! therefore enables hyper's and hyper-util's `http2` features; the crate's own token transport
//! stays HTTP/1.1.
//!
//! - `POST /oauth2/token` behaves as the Nuvy docs describe: HTTP Basic credentials (raw or
//!   RFC 6749 §2.3.1 encoded) or `client_secret_post`, `Content-Type:
//!   application/x-www-form-urlencoded`, `grant_type=client_credentials`; 400 and 401 with RFC
//!   6749 §5.2 JSON bodies; JWT-shaped access tokens with a configurable `expires_in`.
//! - `GET /v1/redirect?to=<URL>` answers `302 Found` to that URL ([`REDIRECT_PATH`]).
//! - Every other path is the protected API: 200 JSON for a valid bearer token
//!   (`{"ok":true,"method":…,"path":…,"body_bytes":…,"version":…}`: the request's method,
//!   path, body length in bytes, and the HTTP version it came over, `"HTTP/1.1"` or
//!   `"HTTP/2.0"`), 401 with `WWW-Authenticate: Bearer error="invalid_token"` for a missing,
//!   unknown, revoked or expired one.
//!
//! It counts requests, can revoke tokens, can play scripted token responses (status, headers,
//! body, delay, or a hang), and shuts down when dropped.
//!
//! This module uses only the crate's public API (as `nuvy_oauth2::…`, never `crate::…`): the
//! crate's own tests, examples and benches compile these same files in by `#[path]` (see
//! `tests/common/mod.rs`), so they work in the published package without this feature.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use nuvy_oauth2::test_util::NuvyServer;
//! use std::time::Duration;
//!
//! let server = NuvyServer::builder().token_lifetime(Duration::from_secs(5)).start().await?;
//! assert!(server.token_endpoint().ends_with("/oauth2/token"));
//! assert_eq!(server.token_requests(), 0);
//! # Ok(())
//! # }
//! ```

mod server;

pub use server::{NuvyServer, NuvyServerBuilder, RecordedRequest, ScriptedResponse, REDIRECT_PATH};
