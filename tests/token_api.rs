//! The token API for clients that are not a tower stack: `token().await` through the same
//! single flight and cache, and a rejection that names the token it rejects.

mod common;

use std::time::Duration;

use common::*;
use tokio::task::JoinSet;

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_token_calls_on_a_cold_cache_make_one_token_request() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let mut calls = JoinSet::new();
    for _ in 0..1000 {
        let layer = layer.clone();
        calls.spawn(async move { layer.token().await });
    }
    let mut tokens = Vec::new();
    while let Some(result) = calls.join_next().await {
        tokens.push(result.unwrap().expect("a token"));
    }
    assert_eq!(tokens.len(), 1000);
    assert!(
        tokens.iter().all(|token| *token == tokens[0]),
        "one token for all"
    );
    assert_eq!(server.token_requests(), 1);
    assert_eq!(layer.token_cache().token_requests(), 1);
    // Cached from now on, and it is the token the API accepts.
    let token = layer.token_cache().token().await.unwrap();
    assert_eq!(token, tokens[0]);
    assert_eq!(server.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn rejecting_a_token_drops_that_token_only_and_the_next_call_gets_a_new_one() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let cache = layer.token_cache();
    let first = cache.token().await.unwrap();

    server.revoke_all_tokens();
    assert!(cache.reject_token(&first));
    assert!(
        !cache.reject_token(&first),
        "a second report of the same token does nothing"
    );
    let second = cache.token().await.unwrap();
    assert_ne!(second, first);
    assert_eq!(server.token_requests(), 2);

    // A late report of the old token never discards the new one, even once the new one is
    // old enough that a rejection of it would not be held back as a storm.
    tokio::time::advance(nuvy_oauth2::REJECTED_GENERATION_WINDOW).await;
    assert!(!cache.reject_token(&first));
    assert_eq!(cache.token().await.unwrap(), second);
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn every_response_carries_the_generation_it_was_sent_with() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = api(&layer);
    let url = server.api_url("/v1/ping");
    let response = tower::ServiceExt::oneshot(api.clone(), get(&url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body().token_generation(), 1);

    layer
        .token_cache()
        .invalidate(response.body().token_generation());
    let response = tower::ServiceExt::oneshot(api, get(&url)).await.unwrap();
    assert_eq!(response.body().token_generation(), 2);
    assert_eq!(server.token_requests(), 2);
}
