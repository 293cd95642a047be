//! The built-in token transport: hyper-util's client over rustls, with the TLS trust and proxy
//! options of [`crate::OAuth2ConfigBuilder`] (`tls_*`, `proxy`, `no_proxy`).
//!
//! - **HTTP/1.1 only** (no ALPN offered): one small request per token lifetime gains nothing
//!   from HTTP/2, and every token endpoint speaks HTTP/1.1. So the library's own hyper,
//!   hyper-util and hyper-rustls dependencies have only their `http1` features; the API calls
//!   under the layer may use HTTP/2 all the same (the user's client, its own features).
//! - **TLS** ([`tls`]): the crate builds its own `rustls::ClientConfig` with an explicit crypto
//!   provider: the process-wide default when the application installed one, else the one the
//!   `ring` (default) or `aws-lc-rs` feature compiled in. It never relies on rustls choosing a
//!   provider from crate features, which panics when both are compiled in.
//! - **Proxy** ([`proxy`]): `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` / `NO_PROXY` (read by
//!   hyper-util's `Matcher::from_env` when the layer is built), or an explicit proxy URL; the
//!   token request then goes through an HTTP `CONNECT` tunnel (hyper-util's `Tunnel`), and TLS
//!   runs end to end through it.

mod options;
mod proxy;
mod tls;

pub(crate) use options::TransportOptions;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;

use crate::config::OAuth2Config;
use crate::error::Error;
use crate::token::TokenTransportRequest;

/// The built-in transport, boxed: its connector type depends on whether a proxy is used.
pub(crate) type DefaultTransport = BoxCloneSyncService<
    TokenTransportRequest,
    Response<Incoming>,
    hyper_util::client::legacy::Error,
>;

/// Builds the built-in transport for `config`: TLS per its `tls_*` options, through the proxy
/// its `proxy` options (or the environment) choose. HTTPS only unless the configuration allows
/// plain http. Redirects are never followed (hyper never does).
///
/// # Errors
/// [`crate::ErrorKind::InvalidConfig`] when no TLS crypto provider is available, the
/// operating system's certificate store has no usable certificate
/// ([`crate::OAuth2ConfigBuilder::tls_native_roots`]), or a proxy from the environment is not
/// an `http://` URL.
pub(crate) fn default_transport(config: &OAuth2Config) -> Result<DefaultTransport, Error> {
    let tls = tls::client_config(&config.transport)?;
    let route = proxy::route(&config.transport.proxy, &config.token_endpoint)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let builder = if config.allow_insecure_http {
        builder.https_or_http()
    } else {
        builder.https_only()
    };
    // HTTP/1.1 only: see the module docs.
    let builder = builder.enable_http1();
    let client = Client::builder(TokioExecutor::new());
    Ok(match route {
        None => {
            BoxCloneSyncService::new(client.build::<_, Full<Bytes>>(builder.wrap_connector(http)))
        }
        Some(route) => {
            tracing::debug!(proxy = %route.display, "token requests go through a CONNECT proxy");
            let mut tunnel = Tunnel::new(route.proxy, http);
            if let Some(auth) = route.authorization {
                tunnel = tunnel.with_auth(auth);
            }
            BoxCloneSyncService::new(client.build::<_, Full<Bytes>>(builder.wrap_connector(tunnel)))
        }
    })
}
