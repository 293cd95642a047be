//! A private certificate authority (rcgen) and a TLS front (tokio-rustls) that puts the
//! embedded server behind HTTPS on loopback, for tests of TLS trust and of errors.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A host name that resolves nowhere: only a proxy (see `common::proxy`) can reach it.
pub const PROXIED_HOST: &str = "auth.nuvy.test";

/// A certificate authority that exists only in this test process.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, "nuvy-oauth2 test CA");
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        Self { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server configuration whose certificate (for `localhost`, 127.0.0.1 and
    /// [`PROXIED_HOST`]) this CA signed.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let key = KeyPair::generate().expect("server key");
        let names = ["localhost", "127.0.0.1", PROXIED_HOST].map(str::to_owned);
        let params = CertificateParams::new(names.to_vec()).expect("server params");
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), self.der()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        Arc::new(config)
    }
}

/// TLS on 127.0.0.1 in front of a plain-TCP backend (the embedded server). Stops when dropped.
pub struct TlsFront {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsFront {
    pub async fn start(backend: SocketAddr, config: Arc<ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Ok(mut plain) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        Self { addr, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The backend's token endpoint, through this front, by host name `localhost`.
    pub fn token_endpoint(&self) -> String {
        format!("https://localhost:{}/oauth2/token", self.port())
    }

    /// A path on the backend's API, through this front.
    pub fn api_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port())
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
