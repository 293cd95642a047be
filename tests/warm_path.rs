//! The warm path takes no lock in any usage pattern: with a valid token cached and the cache's
//! lock held by another thread, requests still complete in every way users call the service.

mod common;

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use tower::buffer::Buffer;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};

/// Answers at once with the `Authorization` header it received.
#[derive(Clone, Copy, Debug)]
struct Echo;

impl Service<Request<()>> for Echo {
    type Response = Response<Option<HeaderValue>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        ready(Ok(Response::new(
            request.headers().get(AUTHORIZATION).cloned(),
        )))
    }
}

fn request() -> Request<()> {
    Request::get("https://prd.api.nuvy.ai/v1/ping")
        .body(())
        .unwrap()
}

async fn send<S>(service: S) -> String
where
    S: Service<Request<()>, Response = Response<Option<HeaderValue>>>,
    S::Error: Into<BoxError>,
{
    let response = service
        .oneshot(request())
        .await
        .map_err(Into::into)
        .unwrap();
    let header = response.into_body().expect("the request carried a token");
    assert!(header.is_sensitive());
    header.to_str().unwrap().to_owned()
}

#[test]
fn a_never_called_clone_gets_the_token_without_the_cache_lock_in_every_pattern() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(common::server(Duration::from_secs(3600)));
    // The token may go to the origin of request().
    let config = common::config_builder(&server)
        .allow_origin("https://prd.api.nuvy.ai")
        .build()
        .unwrap();
    let layer = nuvy_oauth2::OAuth2Layer::new(config).unwrap();
    // One request through a throwaway service fetches the token; the services below never
    // made a request before the lock is taken.
    let expected = runtime.block_on(send(layer.layer(Echo)));
    let api = layer.layer(Echo);
    let api_with_retry = layer.clone().with_retry().layer(Echo);

    let held = layer.token_cache().hold_lock_for_test();
    let (done, finished) = mpsc::channel();
    let handle = runtime.handle().clone();
    std::thread::spawn(move || {
        let served = handle.block_on(async move {
            let mut served = Vec::new();
            // The README's usage: `oneshot` on a clone of a service that was never called.
            served.push(("oneshot on a clone", send(api.clone()).await));
            // A clone per request, called with ready + call.
            for _ in 0..3 {
                let mut clone = api.clone();
                let response = clone.ready().await.unwrap().call(request()).await.unwrap();
                served.push((
                    "clone per request",
                    response.into_body().unwrap().to_str().unwrap().to_owned(),
                ));
            }
            // One instance reused: the first calls read the published token, later ones its copy.
            let mut reused = api.clone();
            for _ in 0..3 {
                let response = reused.ready().await.unwrap().call(request()).await.unwrap();
                served.push((
                    "reused",
                    response.into_body().unwrap().to_str().unwrap().to_owned(),
                ));
            }
            // tower's Buffer: the worker task owns a clone that was never called.
            let buffer = Buffer::new(api.clone(), 8);
            for _ in 0..3 {
                served.push(("Buffer", send(buffer.clone()).await));
            }
            // BoxCloneService, cloned per request.
            let boxed = BoxCloneService::new(api.clone());
            for _ in 0..3 {
                served.push(("BoxCloneService", send(boxed.clone()).await));
            }
            // with_retry: tower's Retry clones the service per call.
            for _ in 0..3 {
                served.push(("with_retry", send(api_with_retry.clone()).await));
            }
            served
        });
        let _ = done.send(served);
    });
    // A liveness bound, not a timing assertion: a request that took the lock would never end.
    let served = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("a warm request waited for the cache lock");
    drop(held);
    assert_eq!(served.len(), 16);
    for (pattern, header) in served {
        assert_eq!(header, expected, "{pattern}");
    }
    assert_eq!(server.token_requests(), 1);
}
