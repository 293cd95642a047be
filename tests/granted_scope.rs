//! The granted scope is kept and shown (RFC 6749 §3.3, §5.1): servers may grant less than
//! asked, and the crate says so at WARN, once per token.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const WARNING: &str = "granted less scope than requested";

/// (requested scope, the response's `scope` member, status shows, missing scopes warned)
type Case = (
    Option<&'static str>,
    Option<Value>,
    Option<&'static str>,
    Option<&'static str>,
);

#[tokio::test(flavor = "current_thread")]
async fn the_granted_scope_is_shown_and_a_missing_one_warned_about_once_per_token() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // This thread only; the refresh task runs on it too (current_thread runtime).
    let _guard = tracing::subscriber::set_default(subscriber);

    let cases: &[Case] = &[
        (
            Some("api:read api:write"),
            Some(json!("api:read")),
            Some("api:read"),
            Some("api:write"),
        ),
        (
            Some("api:read api:write"),
            Some(json!("api:write api:read")),
            Some("api:write api:read"),
            None,
        ),
        (
            Some("api:read api:write"),
            Some(json!("api:read api:write admin")),
            Some("api:read api:write admin"),
            None,
        ),
        (Some("a b c"), Some(json!("a   c")), Some("a c"), Some("b")),
        (Some("a b c"), Some(json!("")), Some("a b c"), None),
        (
            Some("Read"),
            Some(json!("read")),
            Some("read"),
            Some("Read"),
        ),
        (
            Some("read write"),
            Some(json!(["read"])),
            Some("read"),
            Some("write"),
        ),
        (
            Some("read write"),
            Some(json!(42)),
            Some("read write"),
            None,
        ),
        (Some("api:read"), None, Some("api:read"), None),
        (Some("api:read"), Some(Value::Null), Some("api:read"), None),
        (
            None,
            Some(json!("default-scope")),
            Some("default-scope"),
            None,
        ),
        (None, None, None, None),
    ];
    for (requested, granted, shown, missing) in cases {
        let server = server(Duration::from_secs(3600)).await;
        server.set_granted_scope(granted.clone());
        let mut builder = config_builder(&server);
        if let Some(requested) = requested {
            builder = builder.scope(*requested);
        }
        let layer = nuvy_oauth2::OAuth2Layer::new(builder.build().unwrap()).unwrap();
        let api = api(&layer);
        let url = server.api_url("/v1/ping");
        for _ in 0..5 {
            assert_eq!(status_of(api.clone(), get(&url)).await.unwrap(), 200);
        }
        let case = format!("requested {requested:?}, granted {granted:?}");
        assert_eq!(
            layer.token_cache().status().granted_scope.as_deref(),
            *shown,
            "{case}"
        );
        let logged = logs.take();
        match missing {
            Some(missing) => {
                assert_eq!(logged.matches(WARNING).count(), 1, "{case}: {logged}");
                assert!(
                    logged.contains(&format!("missing={missing}")),
                    "{case}: {logged}"
                );
            }
            None => assert!(!logged.contains(WARNING), "{case}: {logged}"),
        }
        // A new token: warned about again, once.
        layer
            .token_cache()
            .invalidate(layer.token_cache().current_generation());
        for _ in 0..3 {
            assert_eq!(status_of(api.clone(), get(&url)).await.unwrap(), 200);
        }
        let expected = usize::from(missing.is_some());
        assert_eq!(logs.take().matches(WARNING).count(), expected, "{case}");
    }
}
