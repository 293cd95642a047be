//! [`RetryOnUnauthorized`]: answers a token rejection from the API by sending the request once
//! more with a fresh token (the Nuvy authentication documentation: "Handle 401 responses by
//! requesting a fresh token and retrying the request").

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::cache::CacheId;
use crate::replay::{Replay, ReplayableBody};
use crate::service::UsedTokenGeneration;

/// How long a replay waits, after the rejection came back, for the first attempt's body to
/// finish going out (a server may answer before it read the whole body): 10 s. After that the
/// rejection is returned as it is.
pub const MAX_REPLAY_BODY_WAIT: Duration = Duration::from_secs(10);

/// Layer of [`RetryOnUnauthorized`]; made by [`crate::OAuth2Layer::retry_layer`] (and put
/// outside the auth layer by [`crate::OAuth2Layer::with_retry`]).
#[derive(Debug, Clone)]
pub struct RetryOnUnauthorizedLayer {
    cache: CacheId,
    max_replay_body_bytes: usize,
    idempotent_only: bool,
}

impl RetryOnUnauthorizedLayer {
    pub(crate) fn new(cache: CacheId, max_replay_body_bytes: usize) -> Self {
        Self {
            cache,
            max_replay_body_bytes,
            idempotent_only: false,
        }
    }

    /// Replays only idempotent methods (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT,
    /// DELETE). By default every method is replayed: a token rejection means the server refused
    /// the request before processing it, and the Nuvy docs ask for the retry without exception.
    pub fn idempotent_only(mut self) -> Self {
        self.idempotent_only = true;
        self
    }
}

impl<S> Layer<S> for RetryOnUnauthorizedLayer {
    type Service = RetryOnUnauthorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryOnUnauthorized {
            inner,
            cache: self.cache,
            max_replay_body_bytes: self.max_replay_body_bytes,
            idempotent_only: self.idempotent_only,
        }
    }
}

/// Sends a request once more when the API rejected the token it carried.
///
/// A response is replayed when it carries [`UsedTokenGeneration`] in its extensions:
/// [`crate::OAuth2Service`] puts it there, after invalidating that token generation, on a 401
/// about the token (never on a 403 or `insufficient_scope`). The replay waits for the fresh
/// token through the same single flight (a burst of rejections of one token causes one
/// refresh). A second rejection is returned to the caller as it is: never a loop.
///
/// **Any body.** The request body is prepared by [`ReplayableBody`]: in-memory bodies are
/// copied (a reference-count bump for `Full<Bytes>`), streaming bodies are sent as
/// [`crate::ReplayBody`], which keeps the bytes it sends up to the cap
/// ([`crate::DEFAULT_MAX_REPLAY_BODY_BYTES`], 64 KiB, by default). Nothing is buffered before
/// sending. A body over the cap is sent once and its rejection returned as it is (the token
/// was invalidated all the same, so the next request gets a new one). If the rejection arrives
/// before the body finished going out, the replay waits for it (at most
/// [`MAX_REPLAY_BODY_WAIT`]).
///
/// Errors: the inner service's, unchanged.
pub struct RetryOnUnauthorized<S> {
    inner: S,
    // By id: cloning the service per request writes no shared reference count.
    cache: CacheId,
    max_replay_body_bytes: usize,
    idempotent_only: bool,
}

impl<S> RetryOnUnauthorized<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for RetryOnUnauthorized<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cache: self.cache,
            max_replay_body_bytes: self.max_replay_body_bytes,
            idempotent_only: self.idempotent_only,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RetryOnUnauthorized<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryOnUnauthorized")
            .field("inner", &self.inner)
            .field("max_replay_body_bytes", &self.max_replay_body_bytes)
            .field("idempotent_only", &self.idempotent_only)
            .finish_non_exhaustive()
    }
}

pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl<S, B, ResBody> Service<Request<B>> for RetryOnUnauthorized<S>
where
    B: ReplayableBody,
    S: Service<Request<B::Sent>, Response = Response<ResBody>> + Clone,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B::Sent>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let wanted = !self.idempotent_only || is_idempotent(&parts.method);
        let (body, replay) = if wanted {
            body.prepare(self.max_replay_body_bytes)
        } else {
            (body.into_sent(), Replay::none())
        };
        let request = Request::from_parts(parts, body);
        let pending = replay.is_possible().then(|| {
            let mut head = Request::new(());
            *head.method_mut() = request.method().clone();
            *head.uri_mut() = request.uri().clone();
            *head.version_mut() = request.version();
            *head.headers_mut() = request.headers().clone();
            *head.extensions_mut() = request.extensions().clone();
            Pending {
                head,
                replay,
                service: self.inner.clone(),
                cache: self.cache,
            }
        });
        // The polled-ready service sends the first attempt; the clone is made ready for the
        // replay, if there is one.
        let future = self.inner.call(request);
        ResponseFuture {
            state: State::First { future, pending },
        }
    }
}

/// What a replay needs: the request head, the body copy, a service and the cache.
struct Pending<S, B> {
    head: Request<()>,
    replay: Replay<B>,
    service: S,
    cache: CacheId,
}

pin_project! {
    /// Response future of [`RetryOnUnauthorized`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        First {
            #[pin]
            future: S::Future,
            pending: Option<Pending<S, B>>,
        },
        WaitingForBody {
            rejected: Option<S::Response>,
            pending: Option<Pending<S, B>>,
            // Made only when the body is not complete at once.
            deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        ReadyToReplay {
            request: Option<Request<B>>,
            service: S,
        },
        Replaying {
            #[pin]
            future: S::Future,
        },
        Done,
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::First { future, pending } => {
                    let response = ready!(future.poll(cx))?;
                    let rejected = response.extensions().get::<UsedTokenGeneration>().is_some();
                    match pending.take() {
                        Some(pending) if rejected => {
                            this.state.set(State::WaitingForBody {
                                rejected: Some(response),
                                pending: Some(pending),
                                deadline: None,
                            });
                        }
                        _ => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response));
                        }
                    }
                }
                StateProj::WaitingForBody {
                    rejected,
                    pending,
                    deadline,
                } => {
                    let Some(waiting) = pending.as_mut() else {
                        return Poll::Pending;
                    };
                    let body = match waiting.replay.poll_body(cx) {
                        Poll::Ready(body) => body,
                        Poll::Pending => {
                            let deadline = deadline.get_or_insert_with(|| {
                                Box::pin(tokio::time::sleep(MAX_REPLAY_BODY_WAIT))
                            });
                            ready!(deadline.as_mut().poll(cx));
                            None
                        }
                    };
                    let (Some(body), Some(pending)) = (body, pending.take()) else {
                        // Too large, failed, or still not sent: the rejection as it is.
                        let response = rejected.take();
                        this.state.set(State::Done);
                        return match response {
                            Some(response) => Poll::Ready(Ok(response)),
                            None => Poll::Pending,
                        };
                    };
                    // The rejected response is dropped before the replay goes out.
                    drop(rejected.take());
                    if let Some(cache) = pending.cache.cache() {
                        cache.record_unauthorized_retry();
                    }
                    this.state.set(State::ReadyToReplay {
                        request: Some(pending.head.map(|()| body)),
                        service: pending.service,
                    });
                }
                StateProj::ReadyToReplay { request, service } => {
                    ready!(service.poll_ready(cx))?;
                    let Some(request) = request.take() else {
                        return Poll::Pending;
                    };
                    let future = service.call(request);
                    this.state.set(State::Replaying { future });
                }
                StateProj::Replaying { future } => {
                    let result = ready!(future.poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                StateProj::Done => return Poll::Pending,
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::First { .. } => "first attempt",
            State::WaitingForBody { .. } => "waiting for the first body to go out",
            State::ReadyToReplay { .. } => "waiting for the service to be ready",
            State::Replaying { .. } => "replaying",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
