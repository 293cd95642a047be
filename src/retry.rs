//! [`RetryOnUnauthorized`]: the `tower::retry::Policy` that answers a 401 from the API by
//! invalidating the rejected token and sending the request once more (the Nuvy authentication documentation: "Handle 401
//! responses by requesting a fresh token and retrying the request").

use std::future::{ready, Ready};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use tower::retry::Policy;

use crate::cache::TokenCache;
use crate::service::UsedTokenGeneration;

/// Retries a request once when the API answers 401 to the token it carried.
///
/// On a 401 whose response carries [`UsedTokenGeneration`] ([`crate::OAuth2Service`] puts it
/// there, and invalidates that token generation, only when the 401 is about the token; never
/// on 403 or `insufficient_scope`), the policy lets `tower::retry::Retry` send the saved copy
/// of the request again; the copy then waits for the fresh token through the same single
/// flight (a burst of 401s for one token causes one refresh). A second 401 is returned to the
/// caller as it is: never a loop.
///
/// **Replay needs a copy of the body.** The copy is taken before the request is sent, through
/// [`ReplayableBody`]. Bodies that cannot be copied (streams such as
/// `hyper::body::Incoming`, boxed bodies) are sent once, and their 401 comes back unchanged;
/// the token is invalidated all the same, so the next request gets a new one.
///
/// Place it outside the [`crate::OAuth2Service`] so the replay gets the new token:
/// [`crate::OAuth2Layer::with_retry`] does it in one layer.
#[derive(Debug, Clone)]
pub struct RetryOnUnauthorized {
    cache: TokenCache,
    retried: bool,
    idempotent_only: bool,
}

impl RetryOnUnauthorized {
    pub(crate) fn new(cache: TokenCache) -> Self {
        Self {
            cache,
            retried: false,
            idempotent_only: false,
        }
    }

    /// Replays only idempotent methods (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT,
    /// DELETE). By default every method is replayed: a 401 means the server refused the request
    /// before processing it, and the Nuvy docs ask for the retry without exception. Use this
    /// for servers that may act on a request and still answer 401.
    pub fn idempotent_only(mut self) -> Self {
        self.idempotent_only = true;
        self
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl<B, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for RetryOnUnauthorized
where
    B: ReplayableBody,
{
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        if self.retried {
            return None;
        }
        let response = result.as_ref().ok()?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return None;
        }
        // Present only on a 401 about the token; the service already invalidated it.
        response.extensions().get::<UsedTokenGeneration>()?;
        self.cache.record_unauthorized_retry();
        self.retried = true;
        Some(ready(()))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        if self.retried || (self.idempotent_only && !is_idempotent(request.method())) {
            return None;
        }
        let body = request.body().try_clone_body()?;
        let mut copy = Request::new(body);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

/// A request body that may be copied so the request can be sent again after a 401.
///
/// Implemented for the in-memory bodies (`Full`, `Empty`, `String`, `Vec<u8>`, `Bytes`, `()`),
/// which copy, and for streaming bodies (`hyper::body::Incoming`, the boxed bodies of
/// `http-body-util`), which return `None`: their request is sent once. Implement it for your own
/// body type to opt in.
pub trait ReplayableBody: Sized {
    /// A copy of the body to send again, or `None` when it cannot be replayed.
    fn try_clone_body(&self) -> Option<Self>;
}

macro_rules! replayable_by_clone {
    ($($body:ty),* $(,)?) => {
        $(impl ReplayableBody for $body {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        })*
    };
}

replayable_by_clone!(
    Full<Bytes>,
    Empty<Bytes>,
    String,
    Vec<u8>,
    Bytes,
    (),
    &'static str
);

macro_rules! not_replayable {
    ($($body:ty),* $(,)?) => {
        $(impl ReplayableBody for $body {
            fn try_clone_body(&self) -> Option<Self> {
                None
            }
        })*
    };
}

not_replayable!(
    hyper::body::Incoming,
    http_body_util::combinators::BoxBody<Bytes, tower::BoxError>,
    http_body_util::combinators::UnsyncBoxBody<Bytes, tower::BoxError>,
    http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
    http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>,
);
