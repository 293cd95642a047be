//! Plain http for loopback hosts only (`allow_insecure_http_on_loopback`, the quickstart's
//! `--allow-http-loopback`): a development server or a sidecar on the same machine, never
//! anything beyond it.

mod common;

use std::time::Duration;

use common::*;
use nuvy_oauth2::{ClientCredentials, ErrorKind, OAuth2Config, OAuth2Layer};

#[test]
fn only_loopback_hosts_may_use_plain_http() {
    // (host as written in the URL, is it loopback by itself?)
    let hosts: &[(&str, bool)] = &[
        ("127.0.0.1", true),
        ("127.0.0.1:8080", true),
        ("127.1.2.3", true),
        ("127.255.255.254:1", true),
        ("[::1]", true),
        ("[::1]:9000", true),
        ("[0:0:0:0:0:0:0:1]", true),
        ("localhost", true),
        ("LocalHost:3000", true),
        ("128.0.0.1", false),
        ("126.255.255.255", false),
        ("0.0.0.0", false),
        ("10.0.0.1", false),
        ("192.168.1.10", false),
        ("[::ffff:127.0.0.1]", false),
        ("[::2]", false),
        ("[fe80::1]", false),
        ("localhost.example.com", false),
        ("app.localhost", false),
        ("127.0.0.1.nip.io", false),
        ("localhost.", false),
        ("example.com", false),
        ("prd.api.nuvy.ai", false),
    ];
    for &(host, loopback) in hosts {
        let endpoint = format!("http://{host}/oauth2/token");
        let built = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .token_endpoint(&endpoint)
            .allow_insecure_http_on_loopback(true)
            .build();
        match built {
            Ok(config) => {
                assert!(loopback, "{host} was allowed");
                assert!(config.allows_insecure_http());
            }
            Err(error) => {
                assert!(!loopback, "{host}: {error}");
                assert_eq!(
                    error.kind(),
                    &ErrorKind::InsecureScheme {
                        target: "token endpoint"
                    },
                    "{host}"
                );
            }
        }
        // The same rule for an allowed API origin next to an https token endpoint.
        let built = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .token_endpoint("https://auth.example/oauth2/token")
            .allow_insecure_http_on_loopback(true)
            .allow_origin(format!("http://{host}/v1"))
            .build();
        assert_eq!(built.is_ok(), loopback, "origin {host}");
        // Without the flag, plain http is refused for every host.
        let error = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .token_endpoint(&endpoint)
            .build()
            .unwrap_err();
        assert!(matches!(error.kind(), ErrorKind::InsecureScheme { .. }));
    }
}

#[tokio::test]
async fn a_loopback_server_is_reachable_over_plain_http_and_nothing_else_is() {
    let server = server(Duration::from_secs(60)).await;
    let config = OAuth2Config::builder(ClientCredentials::new(
        server.client_id(),
        server.client_secret(),
    ))
    .token_endpoint(server.token_endpoint())
    .allow_insecure_http_on_loopback(true)
    .build()
    .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let status = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, 200);
    // An http request elsewhere is refused before anything is sent.
    let error = status_of(api(&layer), get("http://192.0.2.1/v1/ping"))
        .await
        .unwrap_err();
    assert!(matches!(
        crate_error(&error).kind(),
        ErrorKind::OriginNotAllowed { .. }
    ));
}
