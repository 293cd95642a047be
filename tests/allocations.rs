//! Allocation check (deterministic): with a warm token, one call through our service allocates
//! no more than one call through tower-http's static-header layer.
//!
//! Alone in its binary: the counting allocator is global to the process.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::NuvyServer;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer};
use tower::{Layer, Service, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

struct CountingAllocator;

// SAFETY: forwards every call to the system allocator unchanged; only counts on this thread.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count() {
    let _ = COUNTING.try_with(|counting| {
        if counting.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[derive(Clone, Copy)]
struct Trivial;

impl Service<Request<()>> for Trivial {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

fn request() -> Request<()> {
    let mut request = Request::new(());
    *request.uri_mut() = http::Uri::from_static("https://prd.api.nuvy.ai/v1/ping");
    request
}

/// Allocations made by `calls` warm calls (request construction excluded).
fn allocations_per_call<S>(service: &mut S, calls: usize) -> f64
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut total = 0;
    for _ in 0..calls {
        let request = request();
        ALLOCATIONS.with(|n| n.set(0));
        COUNTING.with(|c| c.set(true));
        assert!(matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        {
            let mut future = pin!(service.call(request));
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(Ok(response)) => drop(response),
                _ => panic!("the warm path completes at once"),
            }
        }
        COUNTING.with(|c| c.set(false));
        total += ALLOCATIONS.with(Cell::get);
    }
    total as f64 / calls as f64
}

#[test]
fn a_warm_call_allocates_no_more_than_the_static_header_layer() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(NuvyServer::start()).unwrap();
    let config = OAuth2Config::builder(ClientCredentials::new(
        server.client_id(),
        server.client_secret(),
    ))
    .token_endpoint(server.token_endpoint())
    .allow_insecure_http(true)
    .allow_origin("https://prd.api.nuvy.ai") // the origin of request()
    .build()
    .unwrap();
    let layer = OAuth2Layer::new(config).unwrap();
    let mut ours = layer.layer(Trivial);
    runtime
        .block_on(async { ours.ready().await.unwrap().call(request()).await })
        .unwrap();
    let token = layer.token_cache().access_token().unwrap();
    let mut header = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).unwrap();
    header.set_sensitive(true);
    let mut static_header = SetRequestHeaderLayer::overriding(AUTHORIZATION, header).layer(Trivial);

    let _context = runtime.enter();
    // Warm both once more (first clones may promote shared buffers), then count.
    allocations_per_call(&mut ours, 3);
    allocations_per_call(&mut static_header, 3);
    let ours_per_call = allocations_per_call(&mut ours, 1000);
    let static_per_call = allocations_per_call(&mut static_header, 1000);
    println!("allocations per warm call: ours {ours_per_call}, static header {static_per_call}");
    assert!(
        ours_per_call <= static_per_call,
        "ours {ours_per_call} > static header {static_per_call}"
    );
    assert_eq!(server.token_requests(), 1);
}
