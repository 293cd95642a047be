//! Secrets never leak: not through `Debug`, `Display`, errors or `tracing` output at TRACE
//! level. Alone in its binary because it installs the global `tracing` subscriber.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use nuvy_oauth2::{ClientCredentials, ClientSecret, ErrorKind, OAuth2Config, OAuth2Layer};
use tower::ServiceExt;

const SECRET: &str = "s3cr3t-p@ss:w+rd/%=";
/// Put in every other secret-bearing place: URL userinfo and query, extra parameter values.
const MARKER: &str = "M4rk3r-9xQ";

fn assert_clean(text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(!text.contains(secret), "leaked {secret:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn no_debug_display_error_or_trace_output_shows_a_secret_or_a_token() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Global, not scoped: callsite interest is cached process-wide, and this binary has no
    // other test that could race it.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let server = NuvyServer::builder()
        .client_secret(SECRET)
        .token_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let credentials = ClientCredentials::new(server.client_id(), SECRET);
    let builder = OAuth2Config::builder(credentials.clone())
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true);
    let config = builder.clone().build().unwrap();
    let layer = OAuth2Layer::new(config.clone()).unwrap();
    let api = api(&layer);
    let url = server.api_url("/v1/ping");

    // Success, a 401 replay, and failed token requests of several kinds.
    status_of(api.clone(), get(&url)).await.unwrap();
    age_and_revoke_tokens(&server).await;
    status_of(api.clone(), get(&url)).await.unwrap();
    let token = layer.token_cache().access_token().unwrap();
    let old_token = server.last_token_request().unwrap();
    let mut errors = Vec::new();
    for scripted in [
        ScriptedResponse::json(401, r#"{"error":"invalid_client"}"#),
        ScriptedResponse::json(
            200,
            format!(r#"{{"access_token":"{SECRET}","expires_in":"x"}}"#),
        ),
        ScriptedResponse::status(502)
            .header("content-type", "text/html")
            .body(format!("<html>{SECRET}</html>")),
    ] {
        layer
            .token_cache()
            .invalidate(layer.token_cache().current_generation());
        server.push_token_response(scripted);
        errors.push(status_of(api.clone(), get(&url)).await.unwrap_err());
        tokio::time::advance(nuvy_oauth2::PERMANENT_FAILURE_PAUSE).await;
    }
    let wrong = OAuth2Layer::new(
        OAuth2Config::builder(ClientCredentials::new(server.client_id(), "wrong-secret"))
            .token_endpoint(server.token_endpoint())
            .allow_insecure_http(true)
            .build()
            .unwrap(),
    )
    .unwrap();
    errors.push(status_of(common::api(&wrong), get(&url)).await.unwrap_err());

    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        server.client_id(),
        SECRET
    ));
    let basic_encoded = old_token.headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut printed = String::new();
    let mut print = |text: String| {
        printed.push_str(&text);
        printed.push('\n');
    };
    print(format!("{:?}", ClientSecret::new(SECRET)));
    print(format!("{:?}", NuvyServer::builder().client_secret(SECRET)));
    print(format!("{server:?}"));
    print(format!("{credentials:?}"));
    print(format!("{builder:?}"));
    print(format!("{config:?}"));
    print(format!("{layer:?}"));
    print(format!("{:?}", layer.clone().with_retry()));
    print(format!("{api:?}"));
    print(format!("{:?}", layer.token_cache()));
    print(format!("{:?}", layer.token_cache().status()));
    print(format!("{:?}", layer.retry_layer()));
    print(format!("{token:?}"));
    let future = api.clone().oneshot(get(&url));
    print(format!("{future:?}"));
    drop(future);
    for error in &errors {
        print(format!("{error} {error:?}"));
        let mut source = std::error::Error::source(error.as_ref());
        while let Some(cause) = source {
            print(format!("{cause} {cause:?}"));
            source = cause.source();
        }
    }
    // The same again with MARKER in every secret-bearing place: the secret, the token
    // endpoint's userinfo and query, an extra parameter (an RFC 7523 client_assertion), an
    // allowed origin's userinfo and query, the proxy's credentials, and a request URL's
    // userinfo. Every token request and API request is printed with `Debug` on its way out,
    // as a careless user might.
    let marked_builder = OAuth2Config::builder(ClientCredentials::new(server.client_id(), MARKER))
        .token_endpoint(format!(
            "http://user:{MARKER}@{}/oauth2/token?key={MARKER}",
            server.addr()
        ))
        .allow_insecure_http(true)
        .extra_parameter("client_assertion", MARKER)
        .allow_origin(format!("http://user:{MARKER}@127.0.0.2:1/?{MARKER}"))
        .proxy(format!("http://user:{MARKER}@127.0.0.4:3128"))
        .scope("read");
    print(format!("{marked_builder:?}"));
    // Userinfo in the token endpoint is refused (RFC 9110 §4.2.4): transports log authorities.
    let error = marked_builder.clone().build().unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::InvalidConfig(_)),
        "{error}"
    );
    print(format!("{error} {error:?}"));
    // A password written with an unencoded '/', '?' or '#' ends the authority early (`http`
    // reads host `user` and port MARKER): refused wherever a URL is given, and `Debug` of the
    // builder shows nothing up to the last '@'.
    for password in [
        format!("{MARKER}/{MARKER}"),
        format!("{MARKER}?{MARKER}"),
        format!("{MARKER}#{MARKER}"),
        format!("1/{MARKER}"),
    ] {
        let url = format!("https://user:{password}@auth.example:8443/oauth2/token");
        let base = || {
            OAuth2Config::builder(ClientCredentials::new(server.client_id(), SECRET))
                .token_endpoint(server.token_endpoint())
                .allow_insecure_http(true)
        };
        for builder in [
            base().token_endpoint(&url),
            base().allow_origin(&url),
            base().proxy(url.replace("https:", "http:")),
        ] {
            print(format!("{builder:?}"));
            let error = builder.build().unwrap_err();
            assert!(
                matches!(error.kind(), ErrorKind::InvalidConfig(_)),
                "{password}: {error}"
            );
            print(format!("{error} {error:?}"));
        }
    }
    let marked_builder = marked_builder.token_endpoint(format!(
        "http://{}/oauth2/token?key={MARKER}",
        server.addr()
    ));
    print(format!("{marked_builder:?}"));
    let marked_config = marked_builder.clone().build().unwrap();
    print(format!("{marked_config:?}"));
    print(format!("{:?}", marked_config.credentials()));
    // The built-in transport (TLS, proxy) as configured.
    print(format!(
        "{:?}",
        OAuth2Layer::new(marked_config.clone()).unwrap()
    ));
    let requests_seen = Arc::new(Mutex::new(String::new()));
    let seen = Arc::clone(&requests_seen);
    let transport =
        http_client().map_request(move |request: nuvy_oauth2::TokenTransportRequest| {
            seen.lock().unwrap().push_str(&format!("{request:?}\n"));
            request
        });
    let marked_layer = OAuth2Layer::with_token_transport(marked_config, transport).unwrap();
    print(format!("{marked_layer:?}"));
    let seen = Arc::clone(&requests_seen);
    let printing_client = http_client().map_request(move |request: http::Request<_>| {
        seen.lock().unwrap().push_str(&format!("{request:?}\n"));
        request
    });
    let marked_api = tower::ServiceBuilder::new()
        .layer(marked_layer.clone().with_retry())
        .service(printing_client);
    print(format!("{marked_api:?}"));
    for url in [
        url.clone(),
        format!("http://user:{MARKER}@127.0.0.3:1/v1/ping?{MARKER}"),
    ] {
        let error = marked_api.clone().oneshot(get(&url)).await.unwrap_err();
        print(format!("{error} {error:?}"));
        let mut source = std::error::Error::source(error.as_ref());
        while let Some(cause) = source {
            print(format!("{cause} {cause:?}"));
            source = cause.source();
        }
    }
    print(format!("{:?}", marked_layer.token_cache().status()));
    print(format!(
        "{:?} {:?} {:?} {:?}",
        nuvy_oauth2::Environment::Qa,
        nuvy_oauth2::ClientAuthentication::BasicRaw,
        nuvy_oauth2::UsedTokenGeneration(1),
        nuvy_oauth2::RefreshReason::Initial
    ));
    // And a request that carries the real token, printed by the inner service.
    let layer_seen = Arc::clone(&requests_seen);
    let printing_api = tower::ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(http_client().map_request(move |request: http::Request<_>| {
            layer_seen
                .lock()
                .unwrap()
                .push_str(&format!("{request:?}\n"));
            request
        }));
    let response = printing_api.oneshot(get(&url)).await.unwrap();
    print(format!("{response:?}"));
    // `http::Request`'s own Debug shows the URI and body it was given (the marked URL and
    // client_assertion are the caller's own data there), but every header this crate sets is
    // sensitive: neither the Basic value nor the bearer token shows.
    let requests_seen = requests_seen.lock().unwrap().clone();
    assert_eq!(
        requests_seen
            .matches(r#""authorization": Sensitive"#)
            .count(),
        requests_seen.matches("authorization").count(),
        "{requests_seen}"
    );
    assert!(requests_seen.contains("Bearer") || requests_seen.contains("Sensitive"));
    let requests_seen_clean = [SECRET, token.expose_secret()];
    assert_clean(&requests_seen, &requests_seen_clean);

    // Refresh-ahead and expiry, so every token request reason shows up in the trace.
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::advance(Duration::from_secs(3060)).await; // 85 %: refresh-ahead
    status_of(api.clone(), get(&url)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    tokio::time::advance(Duration::from_secs(3600)).await; // past expiry
    status_of(api.clone(), get(&url)).await.unwrap();

    let logs = logs.take();
    assert!(
        logs.contains("access token obtained"),
        "tracing is on: {logs}"
    );
    for reason in ["initial", "rejected", "refresh-ahead", "expired"] {
        assert!(
            logs.contains(&format!("reason=\"{reason}\"")),
            "no token request traced with reason {reason}: {logs}"
        );
    }
    assert!(
        logs[logs.find("reason=\"").unwrap()..].starts_with("reason=\"initial\""),
        "the first token request is the initial one: {logs}"
    );
    assert!(logs.contains("lifetime_secs=") && logs.contains("elapsed_ms="));
    let secrets = [
        SECRET,
        "wrong-secret",
        basic.as_str(),
        basic_encoded.trim_start_matches("Basic "),
        token.expose_secret(),
        MARKER,
    ];
    assert_clean(&printed, &secrets);
    assert_clean(&logs, &secrets);
}
