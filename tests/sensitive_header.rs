//! The injected `Authorization` header is marked sensitive on every path.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::test(start_paused = true)]
async fn the_injected_authorization_header_is_marked_sensitive() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let seen = Arc::new(AtomicUsize::new(0));
    let all_sensitive = Arc::new(AtomicBool::new(true));
    let (seen_in, sensitive_in) = (Arc::clone(&seen), Arc::clone(&all_sensitive));
    let api = ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .map_request(move |request: Request<Full<Bytes>>| {
            seen_in.fetch_add(1, Ordering::SeqCst);
            let sensitive = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .is_some_and(http::HeaderValue::is_sensitive);
            if !sensitive {
                sensitive_in.store(false, Ordering::SeqCst);
            }
            request
        })
        .service(http_client());
    let url = server.api_url("/v1/ping");
    // Cold path, warm path, and the replay after a 401.
    api.clone().oneshot(get(&url)).await.unwrap();
    api.clone().oneshot(get(&url)).await.unwrap();
    age_and_revoke_tokens(&server).await;
    api.clone().oneshot(get(&url)).await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 4);
    assert!(all_sensitive.load(Ordering::SeqCst));
    // The token request's Basic header too.
    let recorded = server.last_token_request().unwrap();
    assert!(recorded.headers.contains_key("authorization"));
}
