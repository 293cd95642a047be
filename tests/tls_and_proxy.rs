//! The built-in token transport's TLS and proxy options, against a real TLS token endpoint on
//! loopback (the embedded server behind a TLS front whose certificate a private rcgen CA
//! signed) and a real HTTP CONNECT proxy on loopback.

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use common::proxy::{Connect, ConnectProxy};
use common::tls::{TestCa, TlsFront, PROXIED_HOST};
use common::*;
use http::{Request, Response};
use nuvy_oauth2::rustls;
use nuvy_oauth2::{
    ClientCredentials, Error, ErrorKind, OAuth2Config, OAuth2ConfigBuilder, OAuth2Layer,
};
use tower::{service_fn, BoxError, Layer, ServiceExt};

struct Setup {
    server: NuvyServer,
    ca: TestCa,
    front: TlsFront,
}

async fn setup() -> Setup {
    let server = NuvyServer::start().await.unwrap();
    let ca = TestCa::new();
    let front = TlsFront::start(server.addr(), ca.server_config()).await;
    Setup { server, ca, front }
}

fn builder(setup: &Setup, token_endpoint: &str) -> OAuth2ConfigBuilder {
    OAuth2Config::builder(ClientCredentials::new(
        setup.server.client_id(),
        setup.server.client_secret(),
    ))
    .token_endpoint(token_endpoint)
    .no_proxy()
}

/// One request through the layer over a trivial inner service: the layer must obtain a token
/// over the built-in transport first. The API URL has the token endpoint's origin.
async fn call(config: OAuth2Config, api_url: &str) -> Result<(), BoxError> {
    let inner = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let service = OAuth2Layer::new(config)?.layer(inner);
    service
        .oneshot(Request::get(api_url).body(()).unwrap())
        .await?;
    Ok(())
}

fn crate_err(error: &BoxError) -> &Error {
    error.downcast_ref::<Error>().expect("nuvy_oauth2::Error")
}

#[tokio::test]
async fn a_private_ca_is_trusted_with_one_builder_call() {
    let setup = setup().await;
    let endpoint = setup.front.token_endpoint();
    let api = setup.front.api_url("/v1/ping");

    // Without it: the bundled roots do not know the CA.
    let config = builder(&setup, &endpoint).build().unwrap();
    let error = call(config, &api).await.unwrap_err();
    assert!(
        crate_err(&error)
            .to_string()
            .ends_with("invalid peer certificate: UnknownIssuer"),
        "{error}"
    );
    assert_eq!(setup.server.token_requests(), 0);

    // With it.
    let config = builder(&setup, &endpoint)
        .tls_root_certificates_pem(setup.ca.pem())
        .build()
        .unwrap();
    call(config, &api).await.unwrap();
    assert_eq!(setup.server.token_requests(), 1);
}

#[tokio::test]
async fn bad_pem_is_a_typed_error_when_the_configuration_is_built() {
    let setup = setup().await;
    let endpoint = setup.front.token_endpoint();
    for (pem, says) in [
        ("", "no CERTIFICATE block"),
        ("not a pem at all", "no CERTIFICATE block"),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "certificate 1 is unusable",
        ),
    ] {
        let error = builder(&setup, &endpoint)
            .tls_root_certificates_pem(pem)
            .build()
            .unwrap_err();
        assert!(
            matches!(error.kind(), ErrorKind::InvalidConfig(text) if text.contains(says)),
            "{pem:?}: {error}"
        );
    }
}

#[tokio::test]
async fn a_whole_rustls_client_config_is_used_as_given() {
    let setup = setup().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(setup.ca.der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // hyper-rustls panics on a preset ALPN list; the crate replaces it instead.
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let config = builder(&setup, &setup.front.token_endpoint())
        .tls_client_config(tls)
        .build()
        .unwrap();
    call(config, &setup.front.api_url("/v1/ping"))
        .await
        .unwrap();
    assert_eq!(setup.server.token_requests(), 1);
}

#[tokio::test]
async fn the_operating_system_store_replaces_the_bundled_roots_and_combines_with_pem() {
    let setup = setup().await;
    let config = builder(&setup, &setup.front.token_endpoint())
        .tls_native_roots()
        .tls_root_certificates_pem(setup.ca.pem())
        .build()
        .unwrap();
    match OAuth2Layer::new(config.clone()) {
        // The machine has a certificate store: it is loaded, and the private CA added to it.
        Ok(_) => {
            call(config, &setup.front.api_url("/v1/ping"))
                .await
                .unwrap();
            assert_eq!(setup.server.token_requests(), 1);
        }
        // A machine without one (a bare container) gets a typed error, not a panic.
        Err(error) => assert!(
            matches!(error.kind(), ErrorKind::InvalidConfig(text) if text.contains("tls_native_roots")),
            "{error}"
        ),
    }
}

#[tokio::test]
async fn an_explicit_proxy_carries_the_token_request_through_connect() {
    let setup = setup().await;
    let proxy = ConnectProxy::start(setup.front.addr()).await;
    // A name that resolves nowhere: only the proxy can reach it.
    let endpoint = format!("https://{PROXIED_HOST}/oauth2/token");
    let proxy_url = proxy.url().replace("http://", "http://ops:pr0xy-pass@");
    let config = builder(&setup, &endpoint)
        .tls_root_certificates_pem(setup.ca.pem())
        .proxy(&proxy_url)
        .build()
        .unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("pr0xy-pass"), "{debug}");
    call(config, &format!("https://{PROXIED_HOST}/v1/ping"))
        .await
        .unwrap();
    assert_eq!(
        proxy.connects(),
        vec![Connect {
            target: format!("{PROXIED_HOST}:443"),
            // base64("ops:pr0xy-pass")
            authorization: Some("Basic b3BzOnByMHh5LXBhc3M=".to_owned()),
        }]
    );
    assert_eq!(setup.server.token_requests(), 1);
}

#[tokio::test]
async fn a_bad_or_unreachable_proxy_says_so() {
    let setup = setup().await;
    let endpoint = format!("https://{PROXIED_HOST}/oauth2/token");
    for url in ["socks5://127.0.0.1:1080", "http://", "not a url"] {
        let error = builder(&setup, &endpoint).proxy(url).build().unwrap_err();
        assert!(
            matches!(error.kind(), ErrorKind::InvalidConfig(text) if text.starts_with("proxy URL")),
            "{url}: {error}"
        );
    }
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let config = builder(&setup, &endpoint)
        .proxy(format!("http://{closed}"))
        .build()
        .unwrap();
    let error = call(config, &format!("https://{PROXIED_HOST}/v1/ping"))
        .await
        .unwrap_err();
    assert_eq!(
        crate_err(&error).to_string(),
        format!("token request to {endpoint} failed: proxy CONNECT failed: connection refused")
    );
}

#[tokio::test]
async fn a_loopback_token_endpoint_never_goes_through_the_proxy() {
    let setup = setup().await;
    let proxy = ConnectProxy::start(setup.front.addr()).await;
    let config = builder(&setup, &setup.front.token_endpoint())
        .tls_root_certificates_pem(setup.ca.pem())
        .proxy(proxy.url())
        .build()
        .unwrap();
    call(config, &setup.front.api_url("/v1/ping"))
        .await
        .unwrap();
    assert!(proxy.connects().is_empty());
    assert_eq!(setup.server.token_requests(), 1);
}
