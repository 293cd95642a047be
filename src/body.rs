//! [`ResponseBody`]: the body of every response from [`crate::OAuth2Service`]. It tells which
//! token generation the request was sent with, and watches gRPC trailers for UNAUTHENTICATED.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::cache::CacheId;

/// `grpc-status`: the gRPC status code of a call, in the response headers (a Trailers-Only
/// response) or in the trailers (gRPC over HTTP/2, "Responses").
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `headers` carry gRPC status UNAUTHENTICATED (16): "the request does not have valid
/// authentication credentials". Every other code (PERMISSION_DENIED, 7, included) is not a
/// token rejection: a new token would not help.
pub(crate) fn is_grpc_unauthenticated(headers: &HeaderMap) -> bool {
    headers
        .get(GRPC_STATUS)
        .is_some_and(|status| status.as_bytes().trim_ascii() == b"16")
}

pin_project! {
    /// The body of a response from [`crate::OAuth2Service`]: the inner service's body, its
    /// frames unchanged, plus
    ///
    /// - [`token_generation`](Self::token_generation): the generation of the access token the
    ///   request was sent with (1 for a cache's first token), on every response, at no cost
    ///   (a field, not an `http::Extensions` entry, so the warm path allocates nothing);
    /// - gRPC: when trailers with `grpc-status: 16` (UNAUTHENTICATED) are read, that token
    ///   generation is invalidated, so the next call gets a fresh token (the call itself is
    ///   not replayed: its response has been streamed).
    ///
    /// Errors: the inner body's, unchanged.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        generation: u64,
        // Taken when gRPC UNAUTHENTICATED trailers are read (one rejection per response).
        cache: Option<CacheId>,
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: B, generation: u64, cache: CacheId) -> Self {
        Self {
            inner,
            generation,
            cache: Some(cache),
        }
    }

    /// The generation of the access token the request was sent with: pass it to
    /// [`TokenCache::invalidate`](crate::TokenCache::invalidate) to report a rejection this
    /// crate did not recognise.
    pub fn token_generation(&self) -> u64 {
        self.generation
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The inner body, unwrapped.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let Some(trailers) = frame.trailers_ref() {
                if is_grpc_unauthenticated(trailers) {
                    if let Some(cache) = this.cache.take().and_then(CacheId::cache) {
                        cache.reject(*this.generation, Instant::now());
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("token_generation", &self.generation)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::is_grpc_unauthenticated;
    use http::HeaderMap;

    #[test]
    fn only_grpc_status_16_is_a_token_rejection() {
        let status = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-status", value.parse().unwrap());
            is_grpc_unauthenticated(&headers)
        };
        assert!(status("16"));
        assert!(status(" 16 "));
        assert!(!status("7"), "PERMISSION_DENIED");
        assert!(!status("0"));
        assert!(!status("160"));
        assert!(!status("1"));
        assert!(!is_grpc_unauthenticated(&HeaderMap::new()));
    }
}
