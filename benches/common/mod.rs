//! The variants every warm-path benchmark compares, all over the same trivial inner service.
#![allow(dead_code)]

// The embedded server, compiled in by path (see tests/common/mod.rs for why).
#[path = "../../src/test_util/mod.rs"]
#[allow(unused_imports)]
pub mod test_util;

pub use test_util::NuvyServer;

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use nuvy_oauth2::{
    ClientCredentials, OAuth2Config, OAuth2ConfigBuilder, OAuth2Layer, OAuth2RetryService,
    OAuth2Service,
};
use tower::{Layer, Service, ServiceExt};
use tower_http::set_header::{SetRequestHeader, SetRequestHeaderLayer};

pub type Req = Request<()>;
pub type Res = Response<()>;

pub const API_URL: &str = "https://prd.api.nuvy.ai/v1/ping";

/// The inner service: answers at once, allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct Trivial;

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

/// Go x/oauth2's approach: a mutex around the token, checked on every call.
#[derive(Clone)]
pub struct MutexCache<S> {
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

/// A header value the size of a Nuvy JWT, for the baselines.
pub fn bearer_like_ours(server_token: &str) -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {server_token}")).unwrap();
    value.set_sensitive(true);
    value
}

/// Every variant, warm.
pub struct Variants {
    pub server: NuvyServer,
    pub layer: OAuth2Layer,
    pub bare: Trivial,
    pub static_header: SetRequestHeader<Trivial, HeaderValue>,
    pub mutex_cache: MutexCache<Trivial>,
    pub ours: OAuth2Service<Trivial>,
    pub ours_with_retry: OAuth2RetryService<Trivial>,
}

impl Variants {
    /// Starts the embedded server and warms our cache with a real token request.
    pub async fn warm() -> Self {
        let server = NuvyServer::start().await.unwrap();
        let layer = OAuth2Layer::new(loopback_config(&server).build().unwrap()).unwrap();
        let mut ours = layer.layer(Trivial);
        let mut ours_with_retry = layer.clone().with_retry().layer(Trivial);
        ours.ready().await.unwrap().call(request()).await.unwrap();
        ours_with_retry
            .ready()
            .await
            .unwrap()
            .call(request())
            .await
            .unwrap();
        let token = layer.token_cache().access_token().unwrap();
        let header = bearer_like_ours(token.expose_secret());
        let static_header =
            SetRequestHeaderLayer::overriding(AUTHORIZATION, header.clone()).layer(Trivial);
        let mutex_cache = MutexCache {
            inner: Trivial,
            token: Arc::new(Mutex::new(Some((
                header,
                Instant::now() + Duration::from_secs(3600),
            )))),
        };
        assert_eq!(server.token_requests(), 1);
        Self {
            server,
            layer,
            bare: Trivial,
            static_header,
            mutex_cache,
            ours,
            ours_with_retry,
        }
    }
}

/// A configuration for the embedded server (plain http on loopback allowed).
pub fn loopback_config(server: &NuvyServer) -> OAuth2ConfigBuilder {
    OAuth2Config::builder(ClientCredentials::new(
        server.client_id(),
        server.client_secret(),
    ))
    .token_endpoint(server.token_endpoint())
    .allow_insecure_http(true)
    .allow_origin(API_URL)
}

pub fn request() -> Req {
    let mut request = Request::new(());
    *request.uri_mut() = http::Uri::from_static(API_URL);
    request
}

/// Calls a service whose readiness and response are immediate, without a runtime's overhead.
#[inline]
pub fn call_now<S>(service: &mut S, request: Req) -> S::Response
where
    S: Service<Req>,
    S::Error: Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        other => panic!("not ready: {:?}", other.map(|_| ())),
    }
    let mut future = pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        Poll::Ready(Err(error)) => panic!("{error:?}"),
        Poll::Pending => panic!("warm path must not wait"),
    }
}
