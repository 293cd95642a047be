//! A private certificate authority (rcgen) and a TLS front (tokio-rustls) that puts the
//! embedded server behind HTTPS on loopback, for tests of TLS trust, of errors and of HTTP/2.
//!
//! ALPN: the front offers `h2` and `http/1.1` (RFC 7301; `h2` per RFC 9113 §3.2) and forwards
//! the decrypted bytes to the embedded server, which serves whichever the client then speaks
//! (it tells HTTP/2 by its connection preface). A client that negotiated `h2` sends the
//! preface, one that negotiated `http/1.1` or nothing sends HTTP/1.1: backend and ALPN agree.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

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
    /// [`PROXIED_HOST`]) this CA signed; ALPN `h2`, then `http/1.1` (the server's preference
    /// order: a client offering both gets `h2`).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let key = KeyPair::generate().expect("server key");
        let names = ["localhost", "127.0.0.1", PROXIED_HOST].map(str::to_owned);
        let params = CertificateParams::new(names.to_vec()).expect("server params");
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), self.der()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// TLS on 127.0.0.1 in front of a plain-TCP backend (the embedded server). Stops when dropped.
pub struct TlsFront {
    addr: SocketAddr,
    task: JoinHandle<()>,
    negotiated: Arc<Mutex<Vec<Option<String>>>>,
}

impl TlsFront {
    pub async fn start(backend: SocketAddr, config: Arc<ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = TlsAcceptor::from(config);
        let negotiated = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&negotiated);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    // No Nagle delay on either leg (HTTP/2 writes frames separately).
                    let _ = tcp.set_nodelay(true);
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let protocol = tls
                        .get_ref()
                        .1
                        .alpn_protocol()
                        .map(|protocol| String::from_utf8_lossy(protocol).into_owned());
                    record
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(protocol);
                    if let Ok(mut plain) = TcpStream::connect(backend).await {
                        let _ = plain.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        Self {
            addr,
            task,
            negotiated,
        }
    }

    /// The ALPN protocol negotiated on each TLS connection accepted so far, in order of
    /// handshake (`Some("h2")`, `Some("http/1.1")`, or `None` when the client offered none).
    pub fn negotiated_protocols(&self) -> Vec<Option<String>> {
        self.negotiated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
