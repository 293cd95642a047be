//! A token request that fails in transport says why, in one line: the endpoint (never its
//! userinfo or query, never a secret) and the innermost cause in short form. The error's
//! `Display`, `TokenCache::status().last_error` and the WARN log line all show the same text.
//! Alone in its binary because it installs the global `tracing` subscriber.

mod common;

use std::time::Duration;

use common::tls::{TestCa, TlsFront};
use common::*;
use nuvy_oauth2::{ClientCredentials, ErrorKind, OAuth2Config, OAuth2Layer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const CLIENT_ID: &str = "ops-client";
const SECRET: &str = "ops-s3cr3t";

/// A port on 127.0.0.1 where nothing listens.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// Accepts one connection, reads the request, then resets the connection (RST, not FIN).
async fn resetting_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer).await;
            #[allow(deprecated)] // SO_LINGER 0 is the point: close with a reset.
            stream.set_linger(Some(Duration::ZERO)).unwrap();
            drop(stream);
        }
    });
    port
}

/// One token request to `endpoint` through a fresh layer; returns its error, the error in
/// `status().last_error` and the captured log.
async fn fail(endpoint: &str, insecure: bool, logs: &CapturedLogs) -> (nuvy_oauth2::Error, String) {
    let config = OAuth2Config::builder(ClientCredentials::new(CLIENT_ID, SECRET))
        .token_endpoint(endpoint)
        .allow_insecure_http(insecure)
        .token_request_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    logs.take();
    let url = endpoint.replace("/oauth2/token", "/v1/ping");
    let error = status_of(api(&layer), get(&url)).await.unwrap_err();
    let error = crate_error(&error).clone();
    let last = layer.token_cache().status().last_error.expect("last_error");
    assert_eq!(last.to_string(), error.to_string(), "status().last_error");
    (error, logs.take())
}

#[tokio::test(flavor = "current_thread")]
async fn transport_failures_say_why_in_one_line_with_the_endpoint() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let refused = format!("http://127.0.0.1:{}/oauth2/token", closed_port().await);
    let reset = format!("http://127.0.0.1:{}/oauth2/token", resetting_server().await);
    let server = NuvyServer::start().await.unwrap();
    let unknown_ca = TlsFront::start(server.addr(), TestCa::new().server_config()).await;

    // (case, endpoint as configured, plain http allowed, endpoint as shown, expected cause)
    let table: [(&str, String, bool, String, &[&str]); 4] = [
        (
            "refused connection",
            format!("{refused}?tenant=a"),
            true,
            refused.clone(),
            &["connection refused"],
        ),
        (
            "unknown host",
            "https://nuvy-token.invalid/oauth2/token".to_owned(),
            false,
            "https://nuvy-token.invalid/oauth2/token".to_owned(),
            // "no such host" where a resolver answers; the lookup's own words where none does.
            &["dns error: "],
        ),
        (
            "TLS failure (unknown CA)",
            unknown_ca.token_endpoint(),
            false,
            unknown_ca.token_endpoint(),
            &["invalid peer certificate: UnknownIssuer"],
        ),
        (
            "reset",
            reset.clone(),
            true,
            reset.clone(),
            // A reset read as such, or seen by hyper as the connection ending mid-reply.
            &[
                "connection reset by peer",
                "connection closed before message completed",
            ],
        ),
    ];
    for (case, endpoint, insecure, shown, causes) in table {
        let (error, log) = fail(&endpoint, insecure, &logs).await;
        let text = error.to_string();
        assert_eq!(error.kind(), &ErrorKind::Transport, "{case}: {text}");
        let prefix = format!("token request to {shown} failed: ");
        assert!(text.starts_with(&prefix), "{case}: {text}");
        let cause = &text[prefix.len()..];
        assert!(
            causes.iter().any(|expected| cause.starts_with(expected)),
            "{case}: {text}"
        );
        assert_eq!(error.cause().as_deref(), Some(cause), "{case}");
        assert_eq!(error.token_endpoint(), Some(shown.as_str()), "{case}");
        assert!(
            !text.contains('\n') && !text.contains("tenant"),
            "{case}: {text}"
        );
        assert!(!text.contains(SECRET), "{case}: {text}");
        let warn = log
            .lines()
            .find(|line| line.contains("WARN"))
            .unwrap_or_else(|| panic!("{case}: no WARN line in:\n{log}"));
        assert!(
            warn.contains(&text),
            "{case}: WARN line without the error:\n{warn}"
        );
        assert!(!log.contains(SECRET), "{case}: secret in the log:\n{log}");
        assert!(
            format!("{error:?}").contains(cause),
            "{case}: Debug {error:?}"
        );
    }

    // Timeout: the endpoint accepts the request and never answers.
    tokio::time::pause();
    server.push_token_response(ScriptedResponse::hang());
    let (error, log) = fail(&server.token_endpoint(), true, &logs).await;
    assert_eq!(
        error.to_string(),
        format!(
            "token request to {} timed out after 5s",
            server.token_endpoint()
        )
    );
    assert!(error.is_timeout());
    assert!(log
        .lines()
        .any(|line| line.contains("WARN") && line.contains(&error.to_string())));
}
