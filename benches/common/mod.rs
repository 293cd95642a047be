//! What the token-endpoint benchmarks share: the trivial inner service and the loopback setup.
//! (The warm-path benchmarks live in the workspace member benches/warm-path.)
#![allow(dead_code)]

// The embedded server, compiled in by path (see tests/common/mod.rs for why).
#[path = "../../src/test_util/mod.rs"]
#[allow(unused_imports)]
pub mod test_util;

pub use test_util::NuvyServer;

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use http::{Request, Response};
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2ConfigBuilder};
use tower::Service;

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
