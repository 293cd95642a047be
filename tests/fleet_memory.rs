//! Token stores in one process: independent layers sharing a `MemoryTokenStore` make one
//! token request per token lifetime between them, and a 401 is handled fleet-wide.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use nuvy_oauth2::store::MemoryTokenStore;
use nuvy_oauth2::OAuth2Layer;

/// `count` layers built independently (as `count` processes would be), sharing `store`.
fn fleet(server: &NuvyServer, store: &MemoryTokenStore, count: usize) -> Vec<OAuth2Layer> {
    (0..count)
        .map(|_| layer(server).with_token_store(store.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_layers_with_a_hundred_cold_calls_each_make_one_token_request() {
    let server = server(Duration::from_secs(3600)).await;
    // A slow token endpoint widens the window in which the fleet piles up.
    server.delay_next_token_requests(1, Duration::from_millis(100));
    let store = MemoryTokenStore::new();
    let layers = fleet(&server, &store, 50);
    ping_all_at_once(&server, &layers, 100).await;
    assert_eq!(server.token_requests(), 1);
    let sent: u64 = layers
        .iter()
        .map(|layer| layer.token_cache().token_requests())
        .sum();
    assert_eq!(sent, 1, "one layer requested the token, the others took it");
    assert!(layers
        .iter()
        .all(|layer| layer.token_cache().status().generation == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_each_layer_requests_its_own_token() {
    let server = server(Duration::from_secs(3600)).await;
    let layers: Vec<_> = (0..10).map(|_| layer(&server)).collect();
    for layer in &layers {
        let status = status_of(api(layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(server.token_requests(), 10);
}

/// Steady traffic on every layer for three token lifetimes, on the paused clock.
async fn steady_traffic(server: &NuvyServer, layers: &[OAuth2Layer], lifetime: Duration) {
    let step = lifetime / 50;
    let mut elapsed = Duration::ZERO;
    while elapsed < lifetime * 3 {
        for layer in layers {
            let status = status_of(api(layer), get(&server.api_url("/v1/ping")))
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
        }
        tokio::time::advance(step).await;
        elapsed += step;
    }
}

#[tokio::test(start_paused = true)]
async fn over_three_token_lifetimes_a_fleet_requests_as_often_as_one_layer() {
    let lifetime = Duration::from_secs(1000);
    let server = server(lifetime).await;
    let store = MemoryTokenStore::new();
    let layers = fleet(&server, &store, 20);
    steady_traffic(&server, &layers, lifetime).await;
    // Refresh-ahead comes at 70-80 % of the lifetime: over three lifetimes one layer alone
    // makes 4 or 5 token requests (the first, then one per 0.7-0.8 lifetimes).
    let fleet_requests = server.token_requests();
    assert!(
        (4..=5).contains(&fleet_requests),
        "{fleet_requests} token requests for 20 layers over three lifetimes"
    );

    let alone = self::server(lifetime).await;
    steady_traffic(&alone, &[layer(&alone)], lifetime).await;
    assert!(
        fleet_requests <= alone.token_requests() + 1,
        "fleet {fleet_requests}, one layer {}",
        alone.token_requests()
    );
}

#[tokio::test(start_paused = true)]
async fn a_401_is_handled_once_for_the_fleet() {
    let server = server(Duration::from_secs(3600)).await;
    let store = MemoryTokenStore::new();
    let layers = fleet(&server, &store, 5);
    for layer in &layers {
        let status = status_of(api(layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(server.token_requests(), 1);
    age_and_revoke_tokens(&server).await;
    for layer in &layers {
        let status = status_of(api(layer), get(&server.api_url("/v1/ping")))
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "replayed with the fleet's new token"
        );
    }
    // The first layer to meet the 401 removed the rejected token and requested a new one;
    // the others, rejected too, found the new one in the store.
    assert_eq!(server.token_requests(), 2);
    assert!(layers
        .iter()
        .all(|layer| layer.token_cache().status().generation == 2));
}
