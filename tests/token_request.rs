//! The token request as the Nuvy authentication documentation specifies it, and the typed errors of the token endpoint.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use http::StatusCode;
use nuvy_oauth2::{ClientAuthentication, ClientCredentials, ErrorKind, OAuth2Config, OAuth2Layer};

#[tokio::test]
async fn token_request_has_the_documented_method_headers_and_body() {
    let server = server(Duration::from_secs(60)).await;
    let layer = OAuth2Layer::new(
        config_builder(&server)
            .client_authentication(ClientAuthentication::BasicRaw)
            .build()
            .unwrap(),
    )
    .unwrap();
    let status = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    let recorded = server.last_token_request().expect("a token request");
    assert_eq!(recorded.method, http::Method::POST);
    assert_eq!(recorded.path, "/oauth2/token");
    let expected_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            server.client_id(),
            server.client_secret()
        ))
    );
    assert_eq!(recorded.headers["authorization"], expected_basic.as_str());
    assert_eq!(
        recorded.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(recorded.headers["accept"], "application/json");
    assert_eq!(&recorded.body[..], b"grant_type=client_credentials");
}

#[tokio::test]
async fn scope_is_added_to_the_body_when_set() {
    let server = server(Duration::from_secs(60)).await;
    let layer =
        OAuth2Layer::new(config_builder(&server).scope("read write").build().unwrap()).unwrap();
    status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    let recorded = server.last_token_request().unwrap();
    assert_eq!(
        &recorded.body[..],
        b"grant_type=client_credentials&scope=read+write"
    );
}

#[tokio::test]
async fn the_api_sees_exactly_bearer_and_the_token() {
    let server = server(Duration::from_secs(60)).await;
    let layer = layer(&server);
    status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    let authorization = server.last_api_authorization().unwrap();
    let token = layer.token_cache().access_token().unwrap();
    assert_eq!(
        authorization.to_str().unwrap(),
        format!("Bearer {}", token.expose_secret())
    );
}

#[tokio::test]
async fn wrong_credentials_give_a_typed_401_error_with_rfc_fields_and_the_remedy() {
    let server = server(Duration::from_secs(60)).await;
    let config = OAuth2Config::builder(ClientCredentials::new(server.client_id(), "wrong-secret"))
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true)
        .build()
        .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    let error = crate_error(&error);
    assert_eq!(error.status(), Some(StatusCode::UNAUTHORIZED));
    assert!(error.is_invalid_client());
    let fields = error.token_error_fields().unwrap();
    assert_eq!(fields.error.as_deref(), Some("invalid_client"));
    assert!(fields.error_description.is_some());
    let message = error.to_string();
    assert!(
        message.contains("verify client_id and client_secret"),
        "{message}"
    );
    assert!(!message.contains("wrong-secret"));
    assert_eq!(
        server.api_requests(),
        0,
        "the API is never called without a token"
    );
}

#[tokio::test]
async fn a_400_from_the_token_endpoint_is_a_typed_error_with_rfc_fields() {
    let server = server(Duration::from_secs(60)).await;
    server.push_token_response(ScriptedResponse::json(
        400,
        r#"{"error":"unsupported_grant_type","error_description":"grant_type must be client_credentials","error_uri":"https://docs.nuvy.ai/errors"}"#,
    ));
    let layer = layer(&server);
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    let error = crate_error(&error);
    assert!(matches!(
        error.kind(),
        ErrorKind::TokenRequestRejected { status, .. } if *status == StatusCode::BAD_REQUEST
    ));
    let fields = error.token_error_fields().unwrap();
    assert_eq!(fields.error.as_deref(), Some("unsupported_grant_type"));
    assert_eq!(
        fields.error_description.as_deref(),
        Some("grant_type must be client_credentials")
    );
    assert_eq!(
        fields.error_uri.as_deref(),
        Some("https://docs.nuvy.ai/errors")
    );
    assert!(error.to_string().contains("grant_type=client_credentials"));
}

#[tokio::test]
async fn the_embedded_server_rejects_a_wrong_grant_type_and_content_type() {
    let server = NuvyServer::start().await.unwrap();
    let client = http_client();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        server.client_id(),
        server.client_secret()
    ));
    let token_request = |content_type: &str, body: &'static str| {
        http::Request::post(server.token_endpoint())
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", content_type)
            .body(http_body_util::Full::from(body))
            .unwrap()
    };
    let form = "application/x-www-form-urlencoded";
    for (content_type, body, status) in [
        (form, "grant_type=password", 400),
        (form, "", 400),
        ("application/json", "grant_type=client_credentials", 400),
        (form, "grant_type=client_credentials", 200),
    ] {
        let response = client
            .request(token_request(content_type, body))
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{content_type} {body}");
    }
}

#[tokio::test]
async fn plain_http_is_refused_without_the_opt_in() {
    let server = NuvyServer::start().await.unwrap();
    let credentials = ClientCredentials::new(server.client_id(), server.client_secret());
    let error = OAuth2Config::builder(credentials.clone())
        .token_endpoint(server.token_endpoint())
        .build()
        .unwrap_err();
    assert!(matches!(
        error.kind(),
        ErrorKind::InsecureScheme {
            target: "token endpoint"
        }
    ));

    // An https token endpoint, but an http API URL: refused before anything is sent.
    let config = OAuth2Config::builder(credentials)
        .token_endpoint("https://127.0.0.1:9/oauth2/token")
        .build()
        .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let error = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap_err();
    assert!(matches!(
        crate_error(&error).kind(),
        ErrorKind::InsecureScheme {
            target: "API request"
        }
    ));
    assert_eq!(server.api_requests(), 0);
    assert_eq!(server.token_requests(), 0);
    assert_eq!(layer.token_cache().token_requests(), 0);
}

#[test]
fn environments_carry_the_documented_token_endpoints() {
    use nuvy_oauth2::Environment;
    let credentials = ClientCredentials::new("id", "secret");
    for (environment, url) in [
        (Environment::Qa, "https://qa.api.nuvy.ai/oauth2/token"),
        (
            Environment::Production,
            "https://prd.api.nuvy.ai/oauth2/token",
        ),
    ] {
        let config = OAuth2Config::builder(credentials.clone())
            .environment(environment)
            .build()
            .unwrap();
        assert_eq!(config.token_endpoint(), url);
    }
    assert_eq!("QA".parse::<Environment>().unwrap(), Environment::Qa);
    assert_eq!(
        "production".parse::<Environment>().unwrap(),
        Environment::Production
    );
    assert!("staging".parse::<Environment>().is_err());
}

#[test]
fn empty_credentials_and_bad_urls_are_config_errors() {
    let build = |id: &str, secret: &str, url: &str| {
        OAuth2Config::builder(ClientCredentials::new(id, secret))
            .token_endpoint(url)
            .build()
    };
    for (id, secret, url) in [
        ("", "s", "https://a.example/token"),
        ("id", "", "https://a.example/token"),
        ("id", "s", "not a url"),
        ("id", "s", "ftp://a.example/token"),
        ("id", "s", "/relative/token"),
    ] {
        let error = build(id, secret, url).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                ErrorKind::InvalidConfig(_) | ErrorKind::InvalidCredential { .. }
            ),
            "{id} {url}: {error}"
        );
    }
}

/// Environment variables are process-wide: one test covers them all, in sequence.
#[test]
fn credentials_from_the_environment_name_the_missing_variable_and_never_the_value() {
    std::env::remove_var("NUVY_CLIENT_ID");
    std::env::remove_var("NUVY_CLIENT_SECRET");
    std::env::remove_var("NUVY_ENVIRONMENT");
    let error = ClientCredentials::from_env().unwrap_err();
    assert_eq!(
        error.kind(),
        &ErrorKind::MissingEnvVar {
            name: "NUVY_CLIENT_ID"
        }
    );
    assert!(error.to_string().contains("NUVY_CLIENT_ID"));

    std::env::set_var("NUVY_CLIENT_ID", "env-client");
    std::env::set_var("NUVY_CLIENT_SECRET", "");
    let error = ClientCredentials::from_env().unwrap_err();
    assert_eq!(
        error.kind(),
        &ErrorKind::MissingEnvVar {
            name: "NUVY_CLIENT_SECRET"
        }
    );

    std::env::set_var("NUVY_CLIENT_SECRET", "env-secret-value");
    std::env::set_var("NUVY_ENVIRONMENT", "nonsense-env-value");
    let error = OAuth2Config::from_env().unwrap_err();
    assert!(matches!(
        error.kind(),
        ErrorKind::InvalidEnvVar {
            name: "NUVY_ENVIRONMENT",
            ..
        }
    ));
    assert!(!format!("{error} {error:?}").contains("nonsense-env-value"));

    std::env::set_var("NUVY_ENVIRONMENT", "qa");
    let config = OAuth2Config::from_env().unwrap();
    assert_eq!(
        config.token_endpoint(),
        "https://qa.api.nuvy.ai/oauth2/token"
    );
    assert_eq!(config.credentials().client_id(), "env-client");
    assert!(!format!("{config:?}").contains("env-secret-value"));

    std::env::remove_var("NUVY_ENVIRONMENT");
    let config = OAuth2Config::from_env().unwrap();
    assert_eq!(
        config.token_endpoint(),
        "https://prd.api.nuvy.ai/oauth2/token"
    );
}

#[tokio::test]
async fn a_caller_supplied_token_transport_carries_the_token_request() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tower::ServiceExt as _;

    let server = server(Duration::from_secs(60)).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&sent);
    let transport =
        http_client().map_request(move |request: nuvy_oauth2::TokenTransportRequest| {
            counted.fetch_add(1, Ordering::SeqCst);
            request
        });
    let layer =
        OAuth2Layer::with_token_transport(config_builder(&server).build().unwrap(), transport)
            .unwrap();
    let status = status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(server.token_requests(), 1);
}

#[tokio::test]
async fn the_embedded_server_stops_serving_when_dropped() {
    let server = NuvyServer::start().await.unwrap();
    let addr = server.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    drop(server);
    tokio::task::yield_now().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
