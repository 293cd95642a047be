//! Allocation check (deterministic): with a warm token, one call through our service (and through
//! `with_retry()`) allocates no more than one call through tower-http's static-header layer, in
//! every usage pattern: reused, a clone per request, `oneshot` on a clone of a never-called
//! service, `BoxCloneService`, `Buffer`; for a request with headers, `with_retry()` allocates
//! the copy of its header map for a possible replay on top (see `REPLAY_COPY_ALLOCATIONS`).
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
use tower::buffer::Buffer;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;

thread_local! {
    /// Whether `request()` adds the headers a real request carries.
    static WITH_HEADERS: Cell<bool> = const { Cell::new(false) };
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
    if WITH_HEADERS.with(Cell::get) {
        let headers = request.headers_mut();
        headers.insert("accept", HeaderValue::from_static("application/json"));
        headers.insert("user-agent", HeaderValue::from_static("nuvy-client/1.0"));
        headers.insert("x-request-id", HeaderValue::from_static("4f0c2b1e"));
    }
    request
}

/// Polls a future whose result is immediate.
fn now_or_never<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the warm path completes at once"),
    }
}

/// `poll_ready` + `call` + one poll of the response, which is dropped.
fn call_now<S>(service: &mut S, request: Request<()>)
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    now_or_never(std::future::poll_fn(|cx| service.poll_ready(cx))).unwrap();
    drop(now_or_never(service.call(request)).unwrap());
}

/// Allocations made per request by `send` (request construction excluded), after a warm-up
/// (first clones promote shared buffers, a thread's first `ArcSwap` load registers it).
fn allocations_per_call(mut send: impl FnMut(Request<()>), calls: usize) -> f64 {
    for _ in 0..3 {
        send(request());
    }
    let mut total = 0;
    for _ in 0..calls {
        let request = request();
        ALLOCATIONS.with(|n| n.set(0));
        COUNTING.with(|c| c.set(true));
        send(request);
        COUNTING.with(|c| c.set(false));
        total += ALLOCATIONS.with(Cell::get);
    }
    total as f64 / calls as f64
}

#[test]
fn a_warm_call_allocates_no_more_than_the_static_header_layer_in_every_pattern() {
    every_pattern_against_the_static_header(false);
}

/// With headers, `with_retry()` also copies them for a possible replay (tower's `Retry` does
/// the same): the header map's two buffers, plus one for each header name or value whose bytes
/// are shared for the first time (`bytes` promotes a buffer to a reference-counted one on its
/// first clone): here `x-request-id`, a custom name. Everything else as above.
const REPLAY_COPY_ALLOCATIONS: f64 = 3.0;

#[test]
fn with_headers_only_the_replay_copy_of_with_retry_allocates_more() {
    every_pattern_against_the_static_header(true);
}

fn every_pattern_against_the_static_header(with_headers: bool) {
    WITH_HEADERS.with(|h| h.set(with_headers));
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
    runtime
        .block_on(layer.layer(Trivial).oneshot(request()))
        .unwrap();
    let token = layer.token_cache().access_token().unwrap();
    let mut header = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).unwrap();
    header.set_sensitive(true);
    let static_header = SetRequestHeaderLayer::overriding(AUTHORIZATION, header).layer(Trivial);
    // Never called before the patterns below.
    let ours = layer.layer(Trivial);
    let ours_with_retry = layer.clone().with_retry().layer(Trivial);

    let _context = runtime.enter();
    let calls = 500;
    let mut measured = Vec::new();
    macro_rules! every_pattern {
        ($variant:literal, $service:expr) => {{
            let mut reused = $service.clone();
            let per_call = allocations_per_call(|r| call_now(&mut reused, r), calls);
            measured.push(($variant, per_call));
            let never_called = $service.clone();
            let per_call = allocations_per_call(|r| call_now(&mut never_called.clone(), r), calls);
            measured.push(($variant, per_call));
            let per_call = allocations_per_call(
                |r| drop(now_or_never(never_called.clone().oneshot(r)).unwrap()),
                calls,
            );
            measured.push(($variant, per_call));
            let boxed = BoxCloneService::new(ServiceExt::<Request<()>>::map_err(
                $service.clone(),
                BoxError::from,
            ));
            let per_call = allocations_per_call(|r| call_now(&mut boxed.clone(), r), calls);
            measured.push(($variant, per_call));
            let buffer = Buffer::new($service.clone(), 64);
            let per_call = allocations_per_call(
                |r| drop(runtime.block_on(buffer.clone().oneshot(r)).unwrap()),
                calls,
            );
            measured.push(($variant, per_call));
        }};
    }
    every_pattern!("static header", static_header);
    every_pattern!("ours", ours);
    every_pattern!("ours with_retry", ours_with_retry);

    let names = [
        "reused",
        "clone per request",
        "oneshot on a clone",
        "BoxCloneService",
        "Buffer",
    ];
    for (index, pattern) in names.iter().enumerate() {
        let (_, baseline) = measured[index];
        for (variant, per_call) in [
            measured[names.len() + index],
            measured[2 * names.len() + index],
        ] {
            println!(
                "{pattern} (headers: {with_headers}): {variant} {per_call} allocations per \
                 warm call, static header {baseline}"
            );
            let allowance = if with_headers && variant == "ours with_retry" {
                REPLAY_COPY_ALLOCATIONS
            } else {
                0.0
            };
            assert!(
                per_call <= baseline + allowance,
                "{pattern}: {variant} {per_call} > static header {baseline} + {allowance}"
            );
        }
    }
    assert_eq!(server.token_requests(), 1);
}
