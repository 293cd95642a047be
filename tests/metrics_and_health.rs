//! Feature `metrics`: token requests by outcome, their duration, 401 replays and the remaining
//! token lifetime reach the installed `metrics` recorder. Feature `serde`: `TokenCacheStatus`
//! serialises for a health endpoint. Alone in its binary because it installs the global
//! metrics recorder. `.ci/run` runs it with `--all-features`.
#![cfg(any(feature = "metrics", feature = "serde"))]

mod common;

use std::time::Duration;

use common::*;

#[cfg(feature = "metrics")]
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn token_requests_replays_and_lifetime_reach_the_metrics_recorder() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use nuvy_oauth2::{
        METRIC_TOKEN_REMAINING_LIFETIME, METRIC_TOKEN_REQUESTS, METRIC_TOKEN_REQUEST_DURATION,
        METRIC_UNAUTHORIZED_REPLAYS,
    };

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    // The recorder is process-wide: a client_id of its own keeps the other tests' token
    // requests (run in parallel in this binary) out of the figures below.
    let server = NuvyServer::builder()
        .client_id("metrics-test-client")
        .token_lifetime(Duration::from_secs(600))
        .start()
        .await
        .expect("bind 127.0.0.1");
    let layer = layer(&server);
    let api = api(&layer);
    status_of(api.clone(), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    age_and_revoke_tokens(&server).await; // one 401, one replay
    status_of(api.clone(), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    server.fail_next_token_requests(1, 503);
    tokio::time::advance(Duration::from_secs(600)).await;
    let _ = status_of(api.clone(), get(&server.api_url("/v1/ping"))).await;

    let metrics = snapshotter.snapshot().into_vec();
    let find = |name: &str, labels: &[(&str, &str)]| -> Vec<&DebugValue> {
        metrics
            .iter()
            .filter(|(key, ..)| key.key().name() == name)
            .filter(|(key, ..)| {
                labels.iter().all(|(label, value)| {
                    key.key()
                        .labels()
                        .any(|l| l.key() == *label && l.value() == *value)
                })
            })
            .map(|(.., value)| value)
            .collect()
    };
    let client = ("client_id", server.client_id());
    let success = [client, ("outcome", "success")];
    let successes: u64 = find(METRIC_TOKEN_REQUESTS, &success)
        .iter()
        .map(|value| match value {
            DebugValue::Counter(count) => *count,
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(successes, 2);
    assert_eq!(
        find(
            METRIC_TOKEN_REQUESTS,
            &[
                client,
                ("outcome", "transient_failure"),
                ("reason", "expired")
            ]
        ),
        vec![&DebugValue::Counter(1)]
    );
    match &find(METRIC_TOKEN_REQUEST_DURATION, &[client])[..] {
        [DebugValue::Histogram(samples)] => assert_eq!(samples.len(), 3),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        find(METRIC_UNAUTHORIZED_REPLAYS, &[client]),
        vec![&DebugValue::Counter(1)]
    );
    // Installed at 600 s; then read from status(): 600 s later, nothing is left.
    let _ = layer.token_cache().status();
    let remaining = snapshotter.snapshot().into_vec();
    let gauge = remaining
        .iter()
        .find(|(key, ..)| key.key().name() == METRIC_TOKEN_REMAINING_LIFETIME)
        .map(|(.., value)| value);
    assert!(
        matches!(gauge, Some(DebugValue::Gauge(value)) if value.into_inner() < 600.0),
        "{gauge:?}"
    );
}

#[cfg(feature = "serde")]
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn token_cache_status_serialises_for_a_health_endpoint() {
    let server = server(Duration::from_secs(600)).await;
    let layer = layer(&server);
    let json = serde_json::to_value(layer.token_cache().status()).unwrap();
    assert_eq!(json["generation"], 0);
    assert_eq!(json["token_valid_for_secs"], serde_json::Value::Null);
    status_of(api(&layer), get(&server.api_url("/v1/ping")))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    let json = serde_json::to_value(layer.token_cache().status()).unwrap();
    assert_eq!(json["generation"], 1);
    assert_eq!(json["token_requests"], 1);
    assert_eq!(json["token_age_secs"], 10.0);
    assert_eq!(json["token_expires_in_secs"], 590.0);
    assert_eq!(json["last_error"], serde_json::Value::Null);
    assert_eq!(json["refresh_in_flight"], false);
    let text = json.to_string();
    assert!(!text.contains(server.client_secret()), "{text}");
}
