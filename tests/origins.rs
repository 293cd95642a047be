//! A bearer token goes only to the origins the configuration allows (RFC 6750 §5.3), whatever
//! layers sit around the auth layer: here tower-http's `FollowRedirectLayer` outside it, and
//! real 302s from the embedded API to a second loopback server.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::{ErrorKind, OAuth2Config, OAuth2Layer};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_http::follow_redirect::FollowRedirectLayer;

fn redirect_url(from: &NuvyServer, to: &str) -> String {
    let to: String = form_urlencoded::byte_serialize(to.as_bytes()).collect();
    from.api_url(&format!("{}?to={to}", test_util::REDIRECT_PATH))
}

/// The stack the issue found unsafe: redirects followed outside the auth layer.
async fn follow(layer: &OAuth2Layer, url: &str) -> Result<StatusCode, BoxError> {
    let api = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(layer.clone())
        .service(http_client());
    Ok(api.oneshot(get(url)).await?.status())
}

#[tokio::test]
async fn a_redirect_to_another_origin_never_carries_the_token() {
    let api_server = server(Duration::from_secs(60)).await;
    let other = server(Duration::from_secs(60)).await;
    let layer = layer(&api_server);
    let other_origin = format!("http://{}", other.addr());
    // Every way of naming another origin than the token endpoint's.
    for target in [
        other.api_url("/v1/ping"),
        other.api_url("/v1/ping?token=1"),
        format!("http://user:pass@{}/v1/ping", other.addr()),
        format!("http://localhost:{}/v1/ping", other.addr().port()),
        format!("https://{}/v1/ping", api_server.addr()),
        format!("http://{}/v1/ping", other.addr()).to_uppercase(),
    ] {
        let error = follow(&layer, &redirect_url(&api_server, &target))
            .await
            .unwrap_err();
        let error = crate_error(&error);
        let ErrorKind::OriginNotAllowed { origin } = error.kind() else {
            panic!("{target}: {error:?}");
        };
        assert!(
            !origin.contains("/v1") && !origin.contains("pass"),
            "{origin}"
        );
        let token = layer.token_cache().access_token().unwrap();
        assert!(!format!("{error} {error:?}").contains(token.expose_secret()));
        // The first hop carried the token; the second was never sent.
        assert!(api_server.last_api_authorization().is_some(), "{target}");
        assert_eq!(other.api_requests(), 0, "{target}");
        assert!(other.last_api_authorization().is_none(), "{target}");
    }
    let error = follow(
        &layer,
        &redirect_url(&api_server, &other.api_url("/v1/ping")),
    )
    .await
    .unwrap_err();
    assert_eq!(
        crate_error(&error).kind(),
        &ErrorKind::OriginNotAllowed {
            origin: other_origin
        }
    );
}

#[tokio::test]
async fn same_origin_redirects_and_explicitly_allowed_origins_keep_the_token() {
    let api_server = server(Duration::from_secs(60)).await;
    let other = server(Duration::from_secs(60)).await;
    let layer = layer(&api_server);
    let status = follow(
        &layer,
        &redirect_url(&api_server, &api_server.api_url("/v1/ping")),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);

    // An origin added on the builder gets the token (this token is not valid there: 401,
    // but it was sent, as the configuration asked).
    let config: OAuth2Config = config_builder(&api_server)
        .allow_origin(other.api_url("/"))
        .build()
        .unwrap();
    let allowing = OAuth2Layer::new(config).unwrap();
    let stack = ServiceBuilder::new()
        .layer(allowing.clone())
        .service(http_client());
    // The token is read before it goes to the other origin: that origin's 401 invalidates it.
    let on_api = stack
        .clone()
        .oneshot(get(&api_server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(on_api.status(), StatusCode::OK);
    let token = allowing.token_cache().access_token().unwrap();
    let status = stack
        .oneshot(get(&other.api_url("/v1/ping")))
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        other.last_api_authorization().unwrap(),
        format!("Bearer {}", token.expose_secret())
    );
}

#[tokio::test]
async fn a_direct_request_to_another_origin_fails_before_anything_is_sent() {
    let api_server = server(Duration::from_secs(60)).await;
    let other = server(Duration::from_secs(60)).await;
    let layer = layer(&api_server);
    let error = status_of(api(&layer), get(&other.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert_eq!(
        crate_error(&error).kind(),
        &ErrorKind::OriginNotAllowed {
            origin: format!("http://{}", other.addr())
        }
    );
    assert_eq!(other.api_requests(), 0);
    assert_eq!(
        api_server.token_requests(),
        0,
        "refused before any token request"
    );
    // Allowed origins must be absolute URLs, and http ones need allow_insecure_http.
    for (url, insecure) in [
        ("/relative", true),
        ("ftp://x.example", true),
        ("http://x.example", false),
        // A port that is not a TCP port (`http` parses it as "no port", i.e. the default).
        ("https://x.example:65536", false),
        ("https://x.example:99999999999999999999", false),
        ("https://x.example:abc/", false),
        // A password with an unencoded '/' or '#': `http` would read host `user`, port 1.
        ("https://user:1/pass@x.example", false),
        ("https://user:1#pass@x.example", false),
    ] {
        let error = config_builder(&api_server)
            .allow_insecure_http(insecure)
            .token_endpoint("https://auth.example/token")
            .allow_origin(url)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                error.kind(),
                ErrorKind::InvalidConfig(_) | ErrorKind::InsecureScheme { .. }
            ),
            "{url}: {error:?}"
        );
    }
}

#[tokio::test]
async fn with_redirects_followed_inside_the_auth_layer_the_other_origin_gets_no_token() {
    // The recommended order (README): auth layer outside, FollowRedirectLayer inside. The
    // token is added once; tower-http drops Authorization when the redirect leaves the origin.
    let api_server = server(Duration::from_secs(60)).await;
    let other = server(Duration::from_secs(60)).await;
    let layer = layer(&api_server);
    let api = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(FollowRedirectLayer::new())
        .service(http_client());
    let response = api
        .oneshot(get(&redirect_url(&api_server, &other.api_url("/v1/ping"))))
        .await
        .unwrap();
    // The other server saw the hop, without a token, and answered 401 to it.
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(api_server.last_api_authorization().is_some());
    assert_eq!(other.api_requests(), 1);
    assert!(other.last_api_authorization().is_none());
}

#[test]
fn a_token_endpoint_with_an_invalid_port_or_an_at_after_its_host_is_refused() {
    let credentials = || nuvy_oauth2::ClientCredentials::new("id", "secret");
    for url in [
        "https://auth.example:65536/token",
        "https://auth.example:99999999999999999999/token",
        "https://auth.example:abc/token",
        "https://auth.example:443x/token",
        "https://user:1/Pw9z@auth.example/token",
        "https://user:1?Pw9z@auth.example/token",
        "https://user:1#Pw9z@auth.example/token",
        "https://user:Pw/9z@auth.example/token",
        "https://auth.example/tenant@x/token",
    ] {
        let error = OAuth2Config::builder(credentials())
            .token_endpoint(url)
            .build()
            .unwrap_err();
        assert!(
            matches!(error.kind(), ErrorKind::InvalidConfig(_)),
            "{url}: {error:?}"
        );
        let text = format!("{error} {error:?}");
        assert!(
            !text.contains("Pw9z") && !text.contains("Pw/") && !text.contains("abc"),
            "{text}"
        );
    }
    for url in [
        "https://auth.example:443/token",
        "https://auth.example:0443/token",
        "https://auth.example:/token",
        "https://AUTH.example:8443/token",
        "https://[::1]:8443/token",
    ] {
        OAuth2Config::builder(credentials())
            .token_endpoint(url)
            .build()
            .unwrap_or_else(|error| panic!("{url}: {error}"));
    }
}
