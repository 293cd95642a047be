//! `HTTPS_PROXY` and `NO_PROXY` steer the built-in token transport with no code change.
//! Alone in its binary because it sets process environment variables.

mod common;

use std::convert::Infallible;

use common::proxy::ConnectProxy;
use common::tls::{TestCa, TlsFront, PROXIED_HOST};
use common::*;
use http::{Request, Response};
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer};
use tower::{service_fn, BoxError, Layer, ServiceExt};

async fn call(config: OAuth2Config) -> Result<(), BoxError> {
    let inner = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let service = OAuth2Layer::new(config)?.layer(inner);
    let url = format!("https://{PROXIED_HOST}/v1/ping");
    service.oneshot(Request::get(url).body(()).unwrap()).await?;
    Ok(())
}

#[tokio::test]
async fn https_proxy_from_the_environment_is_used_and_no_proxy_bypasses_it() {
    let server = NuvyServer::start().await.unwrap();
    let ca = TestCa::new();
    let front = TlsFront::start(server.addr(), ca.server_config()).await;
    let proxy = ConnectProxy::start(front.addr()).await;
    let config = || {
        OAuth2Config::builder(ClientCredentials::new(
            server.client_id(),
            server.client_secret(),
        ))
        .token_endpoint(format!("https://{PROXIED_HOST}/oauth2/token"))
        .tls_root_certificates_pem(ca.pem())
        .build()
        .unwrap()
    };
    for name in [
        "ALL_PROXY",
        "all_proxy",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ] {
        std::env::remove_var(name);
    }
    std::env::set_var("HTTPS_PROXY", proxy.url());
    std::env::set_var("NO_PROXY", "localhost,127.0.0.1");

    call(config()).await.unwrap();
    assert_eq!(proxy.connects().len(), 1);
    assert_eq!(proxy.connects()[0].target, format!("{PROXIED_HOST}:443"));
    assert_eq!(server.token_requests(), 1);

    // NO_PROXY naming the host: straight to it, where the name resolves nowhere.
    std::env::set_var("NO_PROXY", "localhost,.nuvy.test");
    let error = call(config()).await.unwrap_err();
    assert!(error.to_string().contains("dns error"), "{error}");
    assert_eq!(proxy.connects().len(), 1);
}
