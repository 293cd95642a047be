//! The rustls configuration of the built-in token transport, with an explicit crypto provider.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};

use super::options::{Roots, TransportOptions};
use crate::error::{Error, ErrorKind};

fn invalid(what: String) -> Error {
    Error::new(ErrorKind::InvalidConfig(what))
}

/// The crypto provider: the process-wide default when the application installed one (rustls'
/// `CryptoProvider::install_default`, or hyper-rustls doing it on first use), else the one this
/// crate's feature compiled in (`aws-lc-rs` when enabled, else `ring`).
///
/// # Errors
/// [`ErrorKind::InvalidConfig`] when neither exists (both features off, nothing installed).
pub(crate) fn crypto_provider() -> Result<Arc<CryptoProvider>, Error> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Ok(Arc::clone(installed));
    }
    built_in_provider().map(Arc::new).ok_or_else(|| {
        invalid(
            "no TLS crypto provider: enable the `ring` or `aws-lc-rs` feature of nuvy-oauth2, \
             or install a process-wide rustls CryptoProvider"
                .to_owned(),
        )
    })
}

#[cfg(feature = "aws-lc-rs")]
fn built_in_provider() -> Option<CryptoProvider> {
    Some(rustls::crypto::aws_lc_rs::default_provider())
}

#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
fn built_in_provider() -> Option<CryptoProvider> {
    Some(rustls::crypto::ring::default_provider())
}

#[cfg(not(any(feature = "ring", feature = "aws-lc-rs")))]
fn built_in_provider() -> Option<CryptoProvider> {
    None
}

/// The `ClientConfig` for token requests: the caller's own (ALPN cleared: the connector sets
/// it), else the chosen roots plus the extra PEM roots, with [`crypto_provider`].
///
/// # Errors
/// [`ErrorKind::InvalidConfig`]: no crypto provider; no usable certificate in the operating
/// system's store; a provider that supports no safe protocol version.
pub(crate) fn client_config(options: &TransportOptions) -> Result<ClientConfig, Error> {
    if let Some(config) = &options.client_config {
        let mut config = ClientConfig::clone(config);
        config.alpn_protocols.clear();
        return Ok(config);
    }
    let mut roots = RootCertStore::empty();
    match options.roots {
        Roots::WebPki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::Native => {
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                let reason = loaded
                    .errors
                    .first()
                    .map(|error| format!(": {error}"))
                    .unwrap_or_default();
                return Err(invalid(format!(
                    "tls_native_roots: no usable certificate in the operating system's \
                     certificate store{reason}"
                )));
            }
        }
    }
    for certificate in &options.extra_roots {
        // Checked when the configuration was built; cannot fail here.
        roots.add(certificate.clone()).map_err(|error| {
            invalid(format!(
                "tls_root_certificates_pem: unusable certificate: {error}"
            ))
        })?;
    }
    let config = ClientConfig::builder_with_provider(crypto_provider()?)
        .with_safe_default_protocol_versions()
        .map_err(|error| invalid(format!("TLS setup failed: {error}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
