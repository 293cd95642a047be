//! [`RetryOnUnauthorized`]: answers a token rejection from the API by sending the request once
//! more with a fresh token (the Nuvy authentication documentation: "Handle 401 responses by
//! requesting a fresh token and retrying the request").

use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::request::Parts;
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
/// **Per request**, when a replay is possible: a clone of the request head (method, URI,
/// version, headers, extensions: the header map and the extensions allocate when they hold
/// anything) and one of the inner service, both kept by the response future until it is
/// dropped. The first attempt's future is dropped before a replay waits for the service to be
/// ready, so a concurrency limit below does not hold the replay up.
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

    #[inline]
    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let wanted = !self.idempotent_only || is_idempotent(&parts.method);
        let (body, replay) = if wanted {
            body.prepare(self.max_replay_body_bytes)
        } else {
            (body.into_sent(), Replay::none())
        };
        if !replay.is_possible() {
            let future = self.inner.call(Request::from_parts(parts, body));
            return ResponseFuture {
                attempt: Attempt::Sent { future },
                retry: Retry::Off,
                done: false,
            };
        }
        // The head is cloned, the first attempt sent, then the copy built in the returned
        // future (in this order the compiler moves the least). The polled-ready service sends
        // the first attempt; a clone is made ready for the replay.
        let head = parts.clone();
        let future = self.inner.call(Request::from_parts(parts, body));
        ResponseFuture {
            attempt: Attempt::Sent { future },
            retry: Retry::Armed(Pending {
                head,
                replay,
                service: self.inner.clone(),
                cache: self.cache,
            }),
            done: false,
        }
    }
}

/// What a replay needs: the request head, the body copy, a service and the cache.
struct Pending<S, B> {
    head: Parts,
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
        // Side by side, not one state enum holding the future, and marked done rather than
        // emptied: the common case (the first attempt answered, not rejected) moves and drops
        // nothing when it completes; what is left goes with this future.
        #[pin]
        attempt: Attempt<S::Future, S::Response>,
        retry: Retry<S, B>,
        // The output was returned: polled again, the future stays pending.
        done: bool,
    }
}

pin_project! {
    /// The attempt in flight, or the rejection the replay is being prepared for.
    #[project = AttemptProj]
    enum Attempt<F, R> {
        /// The first attempt, then the replay.
        Sent {
            #[pin]
            future: F,
        },
        /// The first attempt's rejection (its future dropped, with anything it held, a
        /// concurrency permit say): returned as it is when the replay cannot be made.
        Rejected {
            response: Option<R>,
        },
        /// The replay is being made, or the replay machinery returned the output.
        Idle,
    }
}

/// Where a [`ResponseFuture`] stands, besides its [`Attempt`].
enum Retry<S, B>
where
    S: Service<Request<B>>,
{
    /// The first attempt is out and can be replayed.
    Armed(Pending<S, B>),
    /// The first attempt is out and will not be replayed (a body over the cap, or a method
    /// that `idempotent_only` leaves out).
    Off,
    /// The first attempt was rejected: waiting for its body to finish going out.
    WaitingForBody {
        pending: Option<Pending<S, B>>,
        // Made only when the body is not complete at once.
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    },
    /// The replay is built: waiting for the service to be ready.
    ReadyToReplay {
        request: Option<Request<B>>,
        service: S,
    },
    /// The replay is out: its outcome is returned as it is.
    Replaying,
    /// The replay machinery returned the output.
    Done,
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if *this.done {
            return Poll::Pending;
        }
        // The hot path, kept small: an attempt in flight (most often the first) answered, and
        // not a rejection to replay. The replay machinery is out of line, marked cold.
        let AttemptProj::Sent { future } = this.attempt.as_mut().project() else {
            let poll = poll_replay(this.attempt, this.retry, cx);
            *this.done = poll.is_ready();
            return poll;
        };
        let poll = future.poll(cx);
        if let Poll::Ready(output) = &poll {
            if let (Ok(response), Retry::Armed(_)) = (output, &*this.retry) {
                if response.extensions().get::<UsedTokenGeneration>().is_some() {
                    let poll = rejected(this.attempt, this.retry, poll, cx);
                    *this.done = poll.is_ready();
                    return poll;
                }
            }
            // What is left (the completed future, the copy kept for a replay) is dropped with
            // this future.
            *this.done = true;
        }
        poll
    }
}

/// The first attempt was rejected and can be replayed: drops its future and prepares the
/// replay.
#[cold]
#[inline(never)]
fn rejected<S, B, ResBody>(
    mut attempt: Pin<&mut Attempt<S::Future, S::Response>>,
    retry: &mut Retry<S, B>,
    first: Poll<Result<Response<ResBody>, S::Error>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<ResBody>, S::Error>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    // Only an armed retry's rejection gets here; anything else is returned as it is.
    let Retry::Armed(pending) = mem::replace(retry, Retry::Done) else {
        attempt.set(Attempt::Idle);
        return first;
    };
    let response = match first {
        Poll::Ready(Ok(response)) => response,
        other => {
            attempt.set(Attempt::Idle);
            return other;
        }
    };
    attempt.set(Attempt::Rejected {
        response: Some(response),
    });
    *retry = Retry::WaitingForBody {
        pending: Some(pending),
        deadline: None,
    };
    poll_replay(attempt, retry, cx)
}

/// After a rejection: waits for the first attempt's body (at most [`MAX_REPLAY_BODY_WAIT`]),
/// then for the service, sends the replay and polls it.
#[cold]
#[inline(never)]
fn poll_replay<S, B, ResBody>(
    mut attempt: Pin<&mut Attempt<S::Future, S::Response>>,
    retry: &mut Retry<S, B>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<ResBody>, S::Error>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    loop {
        if let AttemptProj::Sent { future } = attempt.as_mut().project() {
            let output = ready!(future.poll(cx));
            attempt.set(Attempt::Idle);
            *retry = Retry::Done;
            return Poll::Ready(output);
        }
        match retry {
            Retry::WaitingForBody { pending, deadline } => {
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
                let rejected = match attempt.as_mut().project() {
                    AttemptProj::Rejected { response } => response.take(),
                    _ => None,
                };
                // The rejected response is dropped before the replay goes out.
                attempt.set(Attempt::Idle);
                let (Some(body), Some(pending)) = (body, pending.take()) else {
                    // Too large, failed, or still not sent: the rejection as it is.
                    *retry = Retry::Done;
                    return match rejected {
                        Some(response) => Poll::Ready(Ok(response)),
                        None => Poll::Pending,
                    };
                };
                drop(rejected);
                if let Some(cache) = pending.cache.cache() {
                    cache.record_unauthorized_retry();
                }
                *retry = Retry::ReadyToReplay {
                    request: Some(Request::from_parts(pending.head, body)),
                    service: pending.service,
                };
            }
            Retry::ReadyToReplay { request, service } => {
                if let Err(error) = ready!(service.poll_ready(cx)) {
                    *retry = Retry::Done;
                    return Poll::Ready(Err(error));
                }
                let Some(request) = request.take() else {
                    return Poll::Pending;
                };
                let future = service.call(request);
                attempt.set(Attempt::Sent { future });
                *retry = Retry::Replaying;
            }
            Retry::Armed(_) | Retry::Off | Retry::Replaying | Retry::Done => {
                return Poll::Pending;
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.retry {
            _ if self.done => "done",
            Retry::Armed(_) | Retry::Off => "first attempt",
            Retry::WaitingForBody { .. } => "waiting for the first body to go out",
            Retry::ReadyToReplay { .. } => "waiting for the service to be ready",
            Retry::Replaying => "replaying",
            Retry::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
