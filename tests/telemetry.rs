//! What an operator sees: one INFO line per token obtained (endpoint host, client_id, requested
//! and granted scope, generation, reason, elapsed, lifetime), a WARN line with the cause per
//! failure, nothing secret, and a token-request span with no parent that follows from the
//! request that triggered it. Alone in its binary because it installs the global subscriber.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer};
use tracing::span::{Attributes, Id};
use tracing::{Instrument as _, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span as recorded: its name, whether it has a parent, and what it follows from.
#[derive(Debug, Clone)]
struct SpanRecord {
    name: &'static str,
    parent: Option<&'static str>,
    follows_from: Vec<&'static str>,
}

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<HashMap<u64, SpanRecord>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = if attrs.is_root() {
            None
        } else if let Some(parent) = attrs.parent() {
            ctx.span(parent).map(|span| span.name())
        } else {
            ctx.lookup_current().map(|span| span.name())
        };
        self.0.lock().unwrap().insert(
            id.into_u64(),
            SpanRecord {
                name: attrs.metadata().name(),
                parent,
                follows_from: Vec::new(),
            },
        );
    }

    fn on_follows_from(&self, span: &Id, follows: &Id, ctx: Context<'_, S>) {
        let name = ctx.span(follows).map(|span| span.name()).unwrap_or("?");
        if let Some(record) = self.0.lock().unwrap().get_mut(&span.into_u64()) {
            record.follows_from.push(name);
        }
    }
}

impl Spans {
    fn named(&self, name: &str) -> Vec<SpanRecord> {
        let spans = self.0.lock().unwrap();
        spans
            .values()
            .filter(|span| span.name == name)
            .cloned()
            .collect()
    }
}

fn info_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|line| line.contains(" INFO ")).collect()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn one_info_line_per_token_request_with_who_where_why_and_how_long() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .with(spans.clone());
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let server = server(Duration::from_secs(3600)).await;
    server.set_granted_scope(Some("read".into()));
    let config = OAuth2Config::builder(ClientCredentials::new(
        server.client_id(),
        server.client_secret(),
    ))
    .token_endpoint(server.token_endpoint())
    .allow_insecure_http(true)
    .scope("read write")
    .build()
    .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let api = api(&layer);
    let endpoint = format!("endpoint={}", server.addr());
    let client_id = format!("client_id={}", server.client_id());
    logs.take();

    // Initial, inside a user's request span.
    let user_span = tracing::info_span!("user_request");
    let status = status_of(api.clone(), get(&server.api_url("/v1/ping")))
        .instrument(user_span)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let log = logs.take();
    let lines = info_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    let line = lines[0];
    for field in [
        "access token obtained",
        endpoint.as_str(),
        client_id.as_str(),
        "reason=\"initial\"",
        "requested_scope=\"read write\"",
        "granted_scope=\"read\"",
        "generation=1",
        "elapsed_ms=",
        "lifetime_secs=3600",
        "source=\"token endpoint\"",
    ] {
        assert!(line.contains(field), "{field} missing from: {line}");
    }
    assert!(
        !line.contains("user_request"),
        "nested in the user's span: {line}"
    );
    let token_spans = spans.named("oauth2_token_request");
    assert_eq!(token_spans.len(), 1, "{token_spans:?}");
    assert_eq!(token_spans[0].parent, None, "{token_spans:?}");
    assert_eq!(token_spans[0].follows_from, vec!["user_request"]);

    // Invalidated by the user.
    assert!(layer.token_cache().invalidate(1));
    status_of(api.clone(), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    let log = logs.take();
    let lines = info_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("reason=\"invalidated by the user\""),
        "{log}"
    );
    assert!(lines[0].contains("generation=2"), "{log}");

    // Rejected: a 401 for an aged token.
    age_and_revoke_tokens(&server).await;
    status_of(api.clone(), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    let log = logs.take();
    let lines = info_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("reason=\"rejected\""), "{log}");

    // Expired: past the refresh margin.
    tokio::time::advance(Duration::from_secs(3600)).await;
    status_of(api.clone(), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    let log = logs.take();
    assert!(
        info_lines(&log)
            .iter()
            .any(|line| line.contains("reason=\"expired\"")),
        "{log}"
    );

    // A failure: WARN with the cause, no INFO.
    server.fail_next_token_requests(1, 503);
    tokio::time::advance(Duration::from_secs(3600)).await;
    let _ = status_of(api.clone(), get(&server.api_url("/v1/ping"))).await;
    let log = logs.take();
    assert!(info_lines(&log).is_empty(), "{log}");
    let warn = log
        .lines()
        .find(|line| line.contains(" WARN ") && line.contains("token request failed"))
        .unwrap_or_else(|| panic!("no WARN: {log}"));
    assert!(warn.contains("503"), "{warn}");
    assert!(warn.contains(&client_id), "{warn}");

    // Nothing secret anywhere.
    let all = format!("{log}{:?}", layer.token_cache().status());
    assert!(!all.contains(server.client_secret()));

    // A token taken from a token store says so: this process sent no token request.
    let store = nuvy_oauth2::store::MemoryTokenStore::new();
    let first = common::layer(&server).with_token_store(store.clone());
    let second = common::layer(&server).with_token_store(store);
    for layer in [&first, &second] {
        status_of(common::api(layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap();
    }
    let log = logs.take();
    let lines = info_lines(&log);
    assert_eq!(lines.len(), 2, "{log}");
    assert!(lines[0].contains("source=\"token endpoint\""), "{log}");
    assert!(lines[1].contains("source=\"token store\""), "{log}");
    assert_eq!(second.token_cache().token_requests(), 0);
}
