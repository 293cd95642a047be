//! The transport options of [`OAuth2ConfigBuilder`]: TLS trust (bundled roots, the operating
//! system's store, extra PEM roots, or a whole `rustls::ClientConfig`) and the proxy.

use std::fmt;
use std::sync::Arc;

use http::Uri;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::OAuth2ConfigBuilder;
use crate::error::{Error, ErrorKind};

/// Which root certificates the built-in transport trusts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Roots {
    /// Mozilla's roots as bundled by `webpki-roots`.
    #[default]
    WebPki,
    /// The operating system's store, loaded by `rustls-native-certs` when the layer is built.
    Native,
}

/// A proxy URL as given; it may hold credentials, so `Debug` shows scheme, host and port only.
#[derive(Clone)]
pub(crate) struct ProxyUrl {
    raw: String,
    shown: String,
}

impl ProxyUrl {
    /// Checks an explicit proxy URL: `http://[user:password@]host[:port]` (no scheme means
    /// `http`).
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let invalid = |what: &str| {
            Error::new(ErrorKind::InvalidConfig(format!(
                "proxy URL {what} (expected http://[user:password@]host[:port])"
            )))
        };
        let uri: Uri = url.parse().map_err(|_| invalid("is not a valid URL"))?;
        if crate::origin::has_at_outside_authority(url, &uri) {
            return Err(invalid(
                "has an '@' after its host (percent-encode '/', '?', '#' and '@' in a password)",
            ));
        }
        if !uri
            .authority()
            .is_some_and(|authority| crate::origin::port_is_valid(authority.as_str()))
        {
            return Err(invalid("has a port that is not a number from 0 to 65535"));
        }
        match uri.scheme_str() {
            None | Some("http") => {}
            Some(_) => {
                return Err(invalid(
                    "must use http:// (HTTP CONNECT; SOCKS and TLS to the proxy are not supported)",
                ))
            }
        }
        let host = uri.host().filter(|host| !host.is_empty());
        let host = host.ok_or_else(|| invalid("has no host"))?;
        let port = uri
            .port_u16()
            .map(|port| format!(":{port}"))
            .unwrap_or_default();
        Ok(Self {
            raw: url.to_owned(),
            shown: format!("http://{host}{port}"),
        })
    }

    pub(crate) fn expose(&self) -> &str {
        &self.raw
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Where token requests go: straight, or through a proxy.
#[derive(Clone, Debug, Default)]
pub(crate) enum ProxyChoice {
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` / `NO_PROXY`, read when the layer is built.
    #[default]
    FromEnv,
    /// Never through a proxy.
    Off,
    /// Always through this proxy (but never for a loopback token endpoint).
    Url(ProxyUrl),
}

/// The built-in transport's settings, carried from the builder to the configuration.
#[derive(Clone, Default)]
pub(crate) struct TransportOptions {
    pub(crate) roots: Roots,
    pub(crate) extra_roots: Vec<CertificateDer<'static>>,
    pub(crate) client_config: Option<Arc<rustls::ClientConfig>>,
    pub(crate) proxy: ProxyChoice,
    /// The first invalid option, reported by [`OAuth2ConfigBuilder::build`].
    error: Option<Error>,
}

impl TransportOptions {
    /// The first invalid transport option, if any.
    pub(crate) fn check(&self) -> Result<(), Error> {
        match &self.error {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn fail(&mut self, error: Error) {
        self.error.get_or_insert(error);
    }
}

impl fmt::Debug for TransportOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportOptions")
            .field("roots", &self.roots)
            .field("extra_roots", &self.extra_roots.len())
            .field("client_config", &self.client_config.is_some())
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// Parses every certificate of a PEM bundle and checks rustls can use each as a trust anchor.
fn parse_pem_roots(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let invalid = |what: String| {
        Error::new(ErrorKind::InvalidConfig(format!(
            "tls_root_certificates_pem: {what}"
        )))
    };
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(format!("malformed PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(invalid("no CERTIFICATE block in the PEM".to_owned()));
    }
    let mut check = rustls::RootCertStore::empty();
    for (index, certificate) in certificates.iter().enumerate() {
        check
            .add(certificate.clone())
            .map_err(|error| invalid(format!("certificate {} is unusable: {error}", index + 1)))?;
    }
    Ok(certificates)
}

/// TLS and proxy options of the built-in token transport (the one [`crate::OAuth2Layer::new`]
/// builds). They do not apply to a transport given to
/// [`crate::OAuth2Layer::with_token_transport`].
impl OAuth2ConfigBuilder {
    /// Trusts the operating system's certificate store (loaded with `rustls-native-certs` when
    /// the layer is built) instead of the Mozilla roots bundled by `webpki-roots` (the
    /// default). Combines with [`tls_root_certificates_pem`](Self::tls_root_certificates_pem).
    ///
    /// [`crate::OAuth2Layer::new`] fails with [`ErrorKind::InvalidConfig`] when the store
    /// holds no usable certificate.
    pub fn tls_native_roots(mut self) -> Self {
        self.transport.roots = Roots::Native;
        self
    }

    /// Also trusts the CA certificates in `pem` (one or more `-----BEGIN CERTIFICATE-----`
    /// blocks), e.g. a corporate or private CA, on top of the bundled roots (or the operating
    /// system's, with [`tls_native_roots`](Self::tls_native_roots)). May be called again to
    /// add more.
    ///
    /// [`build`](Self::build) fails with [`ErrorKind::InvalidConfig`] when `pem` holds no
    /// certificate, a malformed block, or a certificate rustls cannot use as a trust anchor.
    pub fn tls_root_certificates_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        match parse_pem_roots(pem.as_ref()) {
            Ok(certificates) => self.transport.extra_roots.extend(certificates),
            Err(error) => self.transport.fail(error),
        }
        self
    }

    /// Uses this rustls configuration for token requests, as it is: its crypto provider, root
    /// certificates or verifier, client certificate (mutual TLS) and protocol versions.
    /// Overrides [`tls_native_roots`](Self::tls_native_roots) and
    /// [`tls_root_certificates_pem`](Self::tls_root_certificates_pem). Its
    /// `alpn_protocols` are replaced by the transport's (`http/1.1`).
    pub fn tls_client_config(mut self, config: rustls::ClientConfig) -> Self {
        self.transport.client_config = Some(Arc::new(config));
        self
    }

    /// Sends token requests through this HTTP proxy, with an HTTP `CONNECT` tunnel (TLS runs
    /// end to end through it): `http://[user:password@]host[:port]`; userinfo becomes a
    /// `Proxy-Authorization: Basic` header (never logged). Overrides the proxy environment
    /// variables. A loopback token endpoint (`localhost`, 127.0.0.0/8, `::1`) is never
    /// proxied.
    ///
    /// Without this call the environment decides, as curl reads it: `HTTPS_PROXY` (or
    /// `HTTP_PROXY` for a plain-http endpoint, or `ALL_PROXY`) unless `NO_PROXY` matches the
    /// token endpoint's host, read when the layer is built.
    ///
    /// [`build`](Self::build) fails with [`ErrorKind::InvalidConfig`] for a URL that does not
    /// parse, has no host, or uses another scheme than `http`.
    pub fn proxy(mut self, url: impl AsRef<str>) -> Self {
        match ProxyUrl::parse(url.as_ref()) {
            Ok(url) => self.transport.proxy = ProxyChoice::Url(url),
            Err(error) => self.transport.fail(error),
        }
        self
    }

    /// Sends token requests straight to the token endpoint, whatever the proxy environment
    /// variables say.
    pub fn no_proxy(mut self) -> Self {
        self.transport.proxy = ProxyChoice::Off;
        self
    }
}
