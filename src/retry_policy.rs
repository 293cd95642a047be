//! [`UnauthorizedRetryPolicy`]: the token-rejection retry as a `tower::retry::Policy`, for
//! stacks built by hand around `tower::retry::RetryLayer` (the Nuvy authentication
//! documentation: "Handle 401 responses by requesting a fresh token and retrying the request").

use std::future::{ready, Ready};

use http::{Request, Response};
use tower::retry::Policy;

use crate::cache::CacheId;
use crate::retry::is_idempotent;
use crate::service::UsedTokenGeneration;

/// Retries a request once when the API rejected the token it carried, as a
/// [`tower::retry::Policy`] for `tower::retry::RetryLayer`. Made by
/// [`crate::OAuth2Layer::retry_policy`].
///
/// A response is retried when it carries [`UsedTokenGeneration`]: [`crate::OAuth2Service`]
/// puts it there, after invalidating that token generation, on a 401 about the token (RFC 6750
/// §3: no challenge, or `error="invalid_token"`) and on gRPC UNAUTHENTICATED; never on a 403,
/// `insufficient_scope` or another gRPC status. The retry waits for the fresh token through
/// the same single flight. At most one retry per request: a second rejection is returned to
/// the caller as it is.
///
/// **Bodies.** `tower::retry` copies the request before sending it, so the body type must be
/// `Clone`: the in-memory bodies (`Full<Bytes>`, `Empty<Bytes>`, `String`, `Bytes`,
/// `Vec<u8>`), whose clone is a reference-count bump or a copy. Streaming bodies
/// (`hyper::body::Incoming`, `axum::body::Body`, `tonic::body::Body`, boxed bodies) cannot be
/// copied before they are sent: use [`crate::OAuth2Layer::with_retry`] (or
/// [`crate::OAuth2Layer::retry_layer`]) instead, which records the bytes while they stream.
///
/// Place the `RetryLayer` outside the auth layer so the retry gets the fresh token:
///
/// ```
/// # fn stack(auth: nuvy_oauth2::OAuth2Layer) {
/// use tower::{retry::RetryLayer, ServiceBuilder};
/// let layers = ServiceBuilder::new()
///     .layer(RetryLayer::new(auth.retry_policy())) // outside: sees the rejection
///     .layer(auth);                                // inside: adds the token
/// # let _ = layers;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct UnauthorizedRetryPolicy {
    // By id: tower's `Retry` clones the policy per request.
    cache: CacheId,
    retried: bool,
    idempotent_only: bool,
}

impl UnauthorizedRetryPolicy {
    pub(crate) fn new(cache: CacheId) -> Self {
        Self {
            cache,
            retried: false,
            idempotent_only: false,
        }
    }

    /// Retries only idempotent methods (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT,
    /// DELETE). By default every method is retried: a token rejection means the server refused
    /// the request before processing it.
    pub fn idempotent_only(mut self) -> Self {
        self.idempotent_only = true;
        self
    }
}

impl<B, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for UnauthorizedRetryPolicy
where
    B: Clone,
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
        // Present only on a rejection about the token; the service already invalidated it.
        result
            .as_ref()
            .ok()?
            .extensions()
            .get::<UsedTokenGeneration>()?;
        if let Some(cache) = self.cache.cache() {
            cache.record_unauthorized_retry();
        }
        self.retried = true;
        Some(ready(()))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        if self.retried || (self.idempotent_only && !is_idempotent(request.method())) {
            return None;
        }
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}
