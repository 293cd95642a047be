//! [`OAuth2Service`]: attaches `Authorization: Bearer <access token>` to every request.

use std::fmt;
use std::mem;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::uri::Scheme;
use http::{Request, Response};
use tokio::time::Instant;
use tower::{BoxError, Service};

use crate::body::ResponseBody;
use crate::cache::{generation_of, phase_of, LocalToken, Lookup, TokenCache, FRESH, STALE};
use crate::error::{Error, ErrorKind};
use crate::future::ResponseFuture;

/// Middleware that authenticates each request with the cached access token (RFC 6750 §2.1).
/// Made by [`crate::OAuth2Layer`].
///
/// - **Warm path** (a valid token), in every usage pattern (one reused instance, a clone per
///   request, `oneshot` on a clone of a service that was never called, `Buffer`,
///   `BoxCloneService`): one atomic load of the token's generation and phase (or one more
///   lock-free `ArcSwap` load when this instance holds no copy of the token yet), the origin
///   check, the header insert; no clock read (two Tokio timers per token, backed by a timer
///   thread of the process, mark its refresh-ahead and refresh points), no lock, no allocation
///   beyond the header insert, and the inner service is called at once. A token is served
///   past its refresh point only for as long as that thread takes to wake at it (the operating
///   system's wake-up latency: microseconds to a few milliseconds), and the refresh point comes
///   the refresh margin (at least 10 % of the lifetime) before its expiry.
/// - **Cold path** (no token, or inside its refresh margin): the request waits for the single
///   shared refresh, then goes to the inner service that was polled ready.
/// - **Errors**: `tower::BoxError`. Token failures are a [`crate::Error`] inside it
///   (`err.downcast_ref::<nuvy_oauth2::Error>()`); the inner service's errors pass through
///   unchanged in the box. A request whose URI says `http://` without
///   [`allow_insecure_http`](crate::OAuth2ConfigBuilder::allow_insecure_http) fails with
///   [`ErrorKind::InsecureScheme`] before anything is sent; so does a request for an absolute
///   URL whose origin is not allowed ([`ErrorKind::OriginNotAllowed`]; RFC 6750 §5.3, see
///   [`allow_origin`](crate::OAuth2ConfigBuilder::allow_origin)), whatever layer made it
///   (a redirect followed outside this service, say).
/// - **Responses** come with a [`ResponseBody`], whose
///   [`token_generation`](ResponseBody::token_generation) is the generation of the token the
///   request was sent with.
/// - A **token rejection** (a 401 with no `WWW-Authenticate`, or a `Bearer` challenge with
///   `error="invalid_token"` or no error; or gRPC status UNAUTHENTICATED, `grpc-status: 16`, in
///   the response headers) invalidates the token it was answered for, whether or
///   not the request is replayed, and carries [`UsedTokenGeneration`] in its extensions for
///   [`crate::RetryOnUnauthorized`]; except while consecutive generations are being rejected
///   shortly after issue (a server rejecting every token): then the 401 is returned untagged
///   and the token stays until the [`crate::REJECTED_GENERATION_BACKOFF`] step ends.
///
/// `Clone` is cheap: an `Arc` bump and the inner service's clone (the clone reads the token the
/// lock-free way until its second call).
pub struct OAuth2Service<S> {
    inner: S,
    cache: TokenCache,
    /// This clone's copy of the current token; refreshed from the cache when its generation
    /// changes, so the warm path touches shared memory read-only.
    local: Option<LocalToken>,
    /// Whether this instance already served a request from the published token (see `call`).
    calls_from_published: bool,
    /// Requests this instance sent down the cold path (see `cold_path_calls_for_test`).
    cold_path_calls: u64,
    allow_insecure_http: bool,
}

/// The generation of the access token a request was sent with (1 for the first token of a
/// cache). Put into the extensions of token rejections that warrant a replay only (so other
/// responses allocate nothing; every response has the generation in
/// [`ResponseBody::token_generation`]); [`crate::RetryOnUnauthorized`] replays exactly those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedTokenGeneration(pub u64);

impl<S> OAuth2Service<S> {
    pub(crate) fn new(inner: S, cache: TokenCache, allow_insecure_http: bool) -> Self {
        Self {
            inner,
            cache,
            local: None,
            calls_from_published: false,
            cold_path_calls: 0,
            allow_insecure_http,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Records a request served from the published token. Keeps a copy only from the second
    /// such call of this instance on: a service used for one request (`oneshot` on a clone)
    /// would pay for the copy and never use it.
    #[inline]
    fn served_from_published(&mut self, token: &LocalToken) {
        if self.calls_from_published {
            self.local = Some(token.clone());
        } else {
            self.calls_from_published = true;
        }
    }

    /// How many requests this instance sent down the cold path (everything but a fresh token
    /// for an allowed origin as written), so tests can show which requests take the warm one.
    /// Test support, not part of the API.
    #[doc(hidden)]
    pub fn cold_path_calls_for_test(&self) -> u64 {
        self.cold_path_calls
    }

    /// The token cache this service shares with its layer and every clone.
    pub fn token_cache(&self) -> &TokenCache {
        &self.cache
    }
}

impl<S, B, ResBody> Service<Request<B>> for OAuth2Service<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The warm path, kept small: an allowed origin as written, a fresh token (one atomic
        // load says which generation is current and that no timer has marked its refresh-ahead
        // point yet; no clock read, see `cache::snapshot`), this service's copy of it or the
        // published one. Everything else (a refresh due, a request to refuse, no token) is
        // decided by `call_cold`.
        if !self
            .cache
            .allowed_origins()
            .admits_as_written(request.uri(), self.allow_insecure_http)
        {
            return self.call_cold(request);
        }
        let word = self.cache.published_word();
        if phase_of(word) != FRESH {
            return self.call_cold(request);
        }
        let generation = generation_of(word);
        let authorization = match &self.local {
            Some(local) if local.generation == generation => local.authorization.clone(),
            Some(_) => return self.call_cold(request),
            None => {
                // No copy yet (a clone of a service that was never called: `oneshot` on
                // `api.clone()`, Buffer, BoxCloneService): the published token, lock-free.
                let published = self.cache.published_token();
                let Some(token) = published
                    .as_deref()
                    .filter(|token| token.generation == generation)
                else {
                    drop(published);
                    return self.call_cold(request);
                };
                self.served_from_published(token);
                token.authorization.clone()
            }
        };
        request.headers_mut().insert(AUTHORIZATION, authorization);
        let future = self.inner.call(request);
        ResponseFuture::called(future, generation, self.cache.id())
    }
}

impl<S> OAuth2Service<S> {
    /// Every request the warm path of `call` did not send: checks the destination in full,
    /// then serves the token in any phase (starting the background refresh when it is due),
    /// or waits for the refresh.
    #[inline(never)]
    fn call_cold<B>(&mut self, mut request: Request<B>) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        self.cold_path_calls = self.cold_path_calls.wrapping_add(1);
        // A URI without a scheme (tonic's `/package.Service/Method`) leaves the connection's
        // security to the transport below, which chose it; an explicit `http` is refused.
        if !self.allow_insecure_http && request.uri().scheme() == Some(&Scheme::HTTP) {
            return ResponseFuture::failed(Error::new(ErrorKind::InsecureScheme {
                target: "API request",
            }));
        }
        if let Err(error) = self.cache.allowed_origins().check(request.uri()) {
            return ResponseFuture::failed(error);
        }
        // The token in any phase but stale: one atomic load says which generation is current
        // and its phase (a timer per generation keeps it; see cache::snapshot).
        let word = self.cache.published_word();
        let phase = phase_of(word);
        if phase != STALE {
            let generation = generation_of(word);
            if let Some(local) = self.local.as_ref().filter(|l| l.generation == generation) {
                // This service's own copy: shared memory touched read-only.
                if local.usable(phase, &self.cache) {
                    request
                        .headers_mut()
                        .insert(AUTHORIZATION, local.authorization.clone());
                    let future = self.inner.call(request);
                    return ResponseFuture::called(future, generation, self.cache.id());
                }
            } else {
                // No copy yet (a clone of a service that was never called: `oneshot` on
                // `api.clone()`, Buffer, BoxCloneService) or an old one: the published token,
                // lock-free. (Without this, `lookup` below would hand out the same token under
                // the lock: the generation test is about speed, which is why a mutant of it
                // passes every test.)
                let published = self.cache.published_token();
                if let Some(token) = published.as_deref().filter(|token| {
                    token.generation == generation && token.usable(phase, &self.cache)
                }) {
                    request
                        .headers_mut()
                        .insert(AUTHORIZATION, token.authorization.clone());
                    self.served_from_published(token);
                    drop(published);
                    let future = self.inner.call(request);
                    return ResponseFuture::called(future, generation, self.cache.id());
                }
            }
        }
        match self.cache.lookup(Instant::now()) {
            Ok(Lookup::Ready(local)) => {
                let generation = local.generation;
                request
                    .headers_mut()
                    .insert(AUTHORIZATION, local.authorization.clone());
                self.local = Some(local);
                let future = self.inner.call(request);
                ResponseFuture::called(future, generation, self.cache.id())
            }
            Ok(Lookup::Wait(token)) => {
                // Keep the service that was polled ready; leave a fresh clone in its place.
                let clone = self.inner.clone();
                let ready_inner = mem::replace(&mut self.inner, clone);
                ResponseFuture::waiting(token, ready_inner, request, self.cache.id())
            }
            Err(error) => ResponseFuture::failed(error),
        }
    }
}

impl<S: Clone> Clone for OAuth2Service<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cache: self.cache.clone(),
            // Left behind: a clone serves its first calls from the published token (lock-free),
            // so cloning per request (`with_retry()`'s replay copy, `oneshot` on a clone) writes
            // no reference count of the header value.
            local: None,
            calls_from_published: false,
            cold_path_calls: 0,
            allow_insecure_http: self.allow_insecure_http,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for OAuth2Service<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Service")
            .field("inner", &self.inner)
            .field("cache", &self.cache)
            .field(
                "local_generation",
                &self.local.as_ref().map(|local| local.generation),
            )
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}
