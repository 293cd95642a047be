//! warm_path: one request with a valid cached token, in every way users call the service, side
//! by side with the baselines, over a trivial inner service. The token comes from a real token
//! request to the embedded Nuvy server; the crate is compiled as a user's release build compiles
//! it (tokio without `test-util`, see the root's benches/warm_path.rs).
//!
//! Variants, each applied to the same pattern so that every ratio compares like with like:
//! - `static_header`: tower-http's `SetRequestHeader` with a token-sized, sensitive, refcounted
//!   value (not `from_static`): the baseline every ratio divides by;
//! - `mutex_cache`: Go x/oauth2's shape, a `Mutex<Option<(HeaderValue, Instant)>>` checked per
//!   call;
//! - `rwlock_headers`: google-cloud-auth's shape, an `RwLock<HeaderMap>` cloned per call;
//! - `ours`: `OAuth2Layer`; `ours_with_retry`: `OAuth2Layer::with_retry()`;
//! - `no_layer`: the inner service alone, the floor (building, sending and dropping a request
//!   and its response): what a layer adds is its figure minus this one.
//!
//! Patterns: `reused` (one instance, `ready` + `call`), `clone_per_request` (a clone of a
//! never-called service per request, `ready` + `call`), `oneshot` (the README's
//! `api.clone().oneshot(request)`), `box_clone_service` (a `BoxCloneService` cloned per
//! request), `buffer` (tower's `Buffer`, awaited from a task), and `contention_reused` /
//! `contention_clone` at 2, 8 and 64 tasks on a 2-worker runtime.
//!
//! **Interleaved, not criterion.** The machine this runs on is shared, and its load drifts over
//! seconds; measured one after the other, two variants would mostly compare two moments. So
//! every round measures every variant of a pattern back to back (under a millisecond each),
//! many rounds over. Reported per variant: the best round (the least disturbed one: other
//! processes only ever add time), the ratio of bests to the static header's, and the median and
//! quartiles of the per-round ratios. Requests are built before the timer starts.
//!
//! Arguments (after `cargo bench --bench warm_path --`): a substring filter on
//! `pattern/variant` (a trailing `$` anchors it at the end), `--rounds N` (default 31),
//! `--calls N` per measurement (default 4000), `--only` (the matching cases without the
//! static-header baseline: for counting instructions per call, see
//! `benches/warm-path/instructions.sh`).

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Request, Response};
use nuvy_oauth2::test_util::NuvyServer;
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer};
use tower::buffer::Buffer;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;

type Req = Request<()>;
type Res = Response<()>;

const API_URL: &str = "https://prd.api.nuvy.ai/v1/ping";

fn request() -> Req {
    let mut request = Request::new(());
    *request.uri_mut() = http::Uri::from_static(API_URL);
    request
}

/// The inner service: answers at once, allocates nothing.
#[derive(Clone, Copy, Debug)]
struct Trivial;

impl Service<Req> for Trivial {
    type Response = Res;
    type Error = Infallible;
    type Future = Ready<Result<Res, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Req) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

/// Go x/oauth2's shape: a mutex around the token and its expiry, checked on every call.
#[derive(Clone)]
struct MutexCache<S> {
    inner: S,
    token: Arc<Mutex<Option<(HeaderValue, Instant)>>>,
}

impl<S: Service<Req>> Service<Req> for MutexCache<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Req) -> S::Future {
        let header = {
            let guard = self.token.lock().unwrap();
            match &*guard {
                Some((value, expires_at)) if Instant::now() < *expires_at => value.clone(),
                _ => unreachable!("the benchmark keeps the token valid"),
            }
        };
        request.headers_mut().insert(AUTHORIZATION, header);
        self.inner.call(request)
    }
}

/// google-cloud-auth's shape: the headers to add live in an `RwLock<HeaderMap>`, cloned per call.
#[derive(Clone)]
struct RwLockHeaders<S> {
    inner: S,
    headers: Arc<RwLock<HeaderMap>>,
}

impl<S: Service<Req>> Service<Req> for RwLockHeaders<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Req) -> S::Future {
        let headers = self.headers.read().unwrap().clone();
        request.headers_mut().extend(headers);
        self.inner.call(request)
    }
}

/// Polls a future whose result is immediate, without a runtime's overhead.
#[inline]
fn now_or_never<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the warm path must not wait"),
    }
}

/// `poll_ready` + `call` + one poll of the response.
#[inline]
fn call_now<S>(service: &mut S, request: Req) -> S::Response
where
    S: Service<Req>,
    S::Error: Debug,
{
    now_or_never(std::future::poll_fn(|cx| service.poll_ready(cx))).unwrap();
    now_or_never(service.call(request)).unwrap()
}

fn requests(n: u64) -> Vec<Req> {
    (0..n).map(|_| request()).collect()
}

/// Starts the embedded server and warms a layer with one real token request.
struct Setup {
    server: NuvyServer,
    layer: OAuth2Layer,
    header: HeaderValue,
}

impl Setup {
    async fn warm() -> Self {
        let server = NuvyServer::start().await.unwrap();
        let config = OAuth2Config::builder(ClientCredentials::new(
            server.client_id(),
            server.client_secret(),
        ))
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true)
        .allow_origin(API_URL) // the token may go to the origin of request()
        .build()
        .unwrap();
        let layer = OAuth2Layer::new(config).unwrap();
        layer.layer(Trivial).oneshot(request()).await.unwrap();
        let token = layer.token_cache().access_token().unwrap();
        // Not `from_static`: a shared, refcounted value, as the token's header is.
        let mut header =
            HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).unwrap();
        header.set_sensitive(true);
        assert_eq!(server.token_requests(), 1);
        Self {
            server,
            layer,
            header,
        }
    }
}

/// One measurement: runs `calls` requests, returns the time they took.
type Measure = Box<dyn FnMut(u64) -> Duration>;

/// Every case of one pattern, measured back to back in each round.
struct Pattern {
    name: String,
    cases: Vec<(&'static str, Measure)>,
}

/// Runs `$body!(name, service)` for every variant, each a fresh, never-called service.
macro_rules! for_each_variant {
    ($setup:expr, $body:ident) => {{
        let setup = &$setup;
        $body!("no_layer", Trivial);
        $body!(
            "static_header",
            SetRequestHeaderLayer::overriding(AUTHORIZATION, setup.header.clone()).layer(Trivial)
        );
        $body!(
            "mutex_cache",
            MutexCache {
                inner: Trivial,
                token: Arc::new(Mutex::new(Some((
                    setup.header.clone(),
                    Instant::now() + Duration::from_secs(3600),
                )))),
            }
        );
        $body!(
            "rwlock_headers",
            RwLockHeaders {
                inner: Trivial,
                headers: Arc::new(RwLock::new(HeaderMap::from_iter([(
                    AUTHORIZATION,
                    setup.header.clone()
                )]))),
            }
        );
        $body!("ours", setup.layer.layer(Trivial));
        $body!(
            "ours_with_retry",
            setup.layer.clone().with_retry().layer(Trivial)
        );
    }};
}

fn single_thread_patterns(setup: &Setup, runtime: &Arc<tokio::runtime::Runtime>) -> Vec<Pattern> {
    let names = [
        "reused",
        "clone_per_request",
        "oneshot",
        "box_clone_service",
        "buffer",
    ];
    let mut patterns: Vec<Pattern> = names
        .iter()
        .map(|name| Pattern {
            name: format!("single_thread/{name}"),
            cases: Vec::new(),
        })
        .collect();
    macro_rules! cases {
        ($variant:literal, $service:expr) => {{
            let service = $service;
            let mut reused = service.clone();
            patterns[0].cases.push((
                $variant,
                Box::new(move |n| {
                    let requests = requests(n);
                    let start = Instant::now();
                    for r in requests {
                        black_box(call_now(&mut reused, r));
                    }
                    start.elapsed()
                }),
            ));
            let never_called = service.clone();
            patterns[1].cases.push((
                $variant,
                Box::new(move |n| {
                    let requests = requests(n);
                    let start = Instant::now();
                    for r in requests {
                        black_box(call_now(&mut never_called.clone(), r));
                    }
                    start.elapsed()
                }),
            ));
            let never_called = service.clone();
            patterns[2].cases.push((
                $variant,
                Box::new(move |n| {
                    let requests = requests(n);
                    let start = Instant::now();
                    for r in requests {
                        black_box(now_or_never(never_called.clone().oneshot(r)).unwrap());
                    }
                    start.elapsed()
                }),
            ));
            let boxed =
                BoxCloneService::new(ServiceExt::<Req>::map_err(service.clone(), BoxError::from));
            patterns[3].cases.push((
                $variant,
                Box::new(move |n| {
                    let requests = requests(n);
                    let start = Instant::now();
                    for r in requests {
                        black_box(call_now(&mut boxed.clone(), r));
                    }
                    start.elapsed()
                }),
            ));
            let buffer = {
                let _context = runtime.enter();
                Buffer::new(service.clone(), 1024)
            };
            let runtime = Arc::clone(runtime);
            patterns[4].cases.push((
                $variant,
                Box::new(move |n| {
                    let requests = requests(n);
                    let buffer = buffer.clone();
                    runtime.block_on(async move {
                        let start = Instant::now();
                        for r in requests {
                            black_box(buffer.clone().oneshot(r).await.unwrap());
                        }
                        start.elapsed()
                    })
                }),
            ));
        }};
    }
    for_each_variant!(setup, cases);
    patterns
}

/// `tasks` tasks share `calls` requests: each task sends with its own clone, reused
/// (`ready` + `call`), or with a clone per request (`oneshot`, the README's usage).
async fn drive<S>(service: &S, tasks: usize, calls: u64, clone_per_request: bool) -> Duration
where
    S: Service<Req> + Clone + Send + 'static,
    S::Response: Send,
    S::Future: Send,
    S::Error: Debug + Send,
{
    let per_task = calls.div_ceil(tasks as u64);
    let work: Vec<_> = (0..tasks)
        .map(|_| (service.clone(), requests(per_task)))
        .collect();
    let start = Instant::now();
    let handles: Vec<_> = work
        .into_iter()
        .map(|(mut service, requests)| {
            tokio::spawn(async move {
                for r in requests {
                    let response = if clone_per_request {
                        service.clone().oneshot(r).await
                    } else {
                        service.ready().await.unwrap().call(r).await
                    };
                    black_box(response.unwrap());
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    // Per requested call, so widths compare.
    start
        .elapsed()
        .mul_f64(calls as f64 / (per_task * tasks as u64) as f64)
}

fn contention_patterns(setup: &Setup, runtime: &Arc<tokio::runtime::Runtime>) -> Vec<Pattern> {
    let mut patterns = Vec::new();
    for (name, clone_per_request) in [("contention_reused", false), ("contention_clone", true)] {
        for tasks in [2usize, 8, 64] {
            let mut pattern = Pattern {
                name: format!("{name}/{tasks}"),
                cases: Vec::new(),
            };
            macro_rules! case {
                ($variant:literal, $service:expr) => {{
                    let service = $service;
                    let runtime = Arc::clone(runtime);
                    pattern.cases.push((
                        $variant,
                        Box::new(move |n| {
                            runtime.block_on(drive(&service, tasks, n, clone_per_request))
                        }),
                    ));
                }};
            }
            for_each_variant!(setup, case);
            patterns.push(pattern);
        }
    }
    patterns
}

/// The cost of reading a clock once, for the notes on where the time goes.
fn clock_pattern(runtime: &Arc<tokio::runtime::Runtime>) -> Pattern {
    let runtime = Arc::clone(runtime);
    let cases: Vec<(&'static str, Measure)> = vec![
        (
            "std_instant_now",
            Box::new(|n| {
                let start = Instant::now();
                for _ in 0..n {
                    black_box(Instant::now());
                }
                start.elapsed()
            }),
        ),
        (
            "coarsetime_instant_now",
            Box::new(|n| {
                let start = Instant::now();
                for _ in 0..n {
                    black_box(coarsetime::Instant::now());
                }
                start.elapsed()
            }),
        ),
        (
            "tokio_instant_now",
            Box::new(move |n| {
                let _context = runtime.enter();
                let start = Instant::now();
                for _ in 0..n {
                    black_box(tokio::time::Instant::now());
                }
                start.elapsed()
            }),
        ),
    ];
    Pattern {
        name: "clock".to_owned(),
        cases,
    }
}

struct Options {
    filter: Option<String>,
    /// `--only`: the matching cases without the baseline (for counting instructions per call
    /// under `valgrind --tool=callgrind`, see BENCHMARKS.md).
    only: bool,
    rounds: usize,
    calls: u64,
}

fn options() -> Options {
    let mut options = Options {
        filter: None,
        only: false,
        rounds: 31,
        calls: 4_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => options.rounds = args.next().and_then(|n| n.parse().ok()).unwrap(),
            "--calls" => options.calls = args.next().and_then(|n| n.parse().ok()).unwrap(),
            "--only" => options.only = true,
            // Passed by cargo bench / cargo test.
            "--bench" | "--test" | "--nocapture" => {}
            other if other.starts_with("--") => {}
            other => options.filter = Some(other.to_owned()),
        }
    }
    options
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn run(pattern: &mut Pattern, options: &Options) {
    // A filter keeps the cases it matches, and the baseline they are divided by.
    let filter = options.filter.as_deref().unwrap_or("");
    let name = pattern.name.clone();
    // A trailing `$` anchors the filter at the end: `reused/ours$` leaves out `ours_with_retry`.
    let matches = |variant: &str| {
        let case = format!("{name}/{variant}");
        match filter.strip_suffix('$') {
            Some(end) => case.ends_with(end),
            None => case.contains(filter),
        }
    };
    if !pattern.cases.iter().any(|(variant, _)| matches(variant)) {
        return;
    }
    pattern
        .cases
        .retain(|(variant, _)| matches(variant) || (!options.only && *variant == "static_header"));
    // Warm-up: every case once (first clones promote shared buffers, threads register).
    for (_, measure) in &mut pattern.cases {
        measure(options.calls / 10);
    }
    let mut per_call: Vec<Vec<f64>> = vec![Vec::new(); pattern.cases.len()];
    for _ in 0..options.rounds {
        for (index, (_, measure)) in pattern.cases.iter_mut().enumerate() {
            let elapsed = measure(options.calls);
            per_call[index].push(elapsed.as_nanos() as f64 / options.calls as f64);
        }
    }
    let baseline = pattern
        .cases
        .iter()
        .position(|(variant, _)| *variant == "static_header");
    let best = |index: usize| {
        per_call[index]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    };
    println!(
        "\n{} ({} rounds x {} calls)",
        pattern.name, options.rounds, options.calls
    );
    println!("| variant | best ns/call | ratio of bests | per-round ratio: median [quartiles] |");
    println!("|---|---|---|---|");
    for (index, (variant, _)) in pattern.cases.iter().enumerate() {
        let ratios = baseline.map(|base| {
            let mut ratios: Vec<f64> = per_call[index]
                .iter()
                .zip(&per_call[base])
                .map(|(ours, base)| ours / base)
                .collect();
            let mid = median(&mut ratios);
            let quartile = |q: usize| ratios[(ratios.len() - 1) * q / 4];
            (
                format!("{:.2}x", best(index) / best(base)),
                format!("{mid:.2}x [{:.2}-{:.2}]", quartile(1), quartile(3)),
            )
        });
        let (of_bests, per_round) = ratios.unwrap_or_default();
        println!(
            "| {variant} | {:.1} | {of_bests} | {per_round} |",
            best(index)
        );
    }
}

fn main() {
    let options = options();
    let single = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let multi = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    // The token is fetched, and its phase timers run, on the multi-thread runtime, as in an
    // application under `#[tokio::main]`.
    let setup = multi.block_on(Setup::warm());
    let context = single.enter();
    let mut patterns = single_thread_patterns(&setup, &single);
    drop(context);
    patterns.extend(contention_patterns(&setup, &multi));
    patterns.push(clock_pattern(&single));
    for pattern in &mut patterns {
        run(pattern, &options);
    }
    assert_eq!(
        setup.server.token_requests(),
        1,
        "the warm path never fetched"
    );
}
