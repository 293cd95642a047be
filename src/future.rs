//! [`ResponseFuture`] of [`crate::OAuth2Service`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{BoxError, Service};

use crate::body::{is_grpc_unauthenticated, ResponseBody};
use crate::cache::{CacheId, RefreshWait};
use crate::error::Error;
use crate::service::UsedTokenGeneration;

pin_project! {
    /// Response future of [`crate::OAuth2Service`]: waits for the token when it has to, then
    /// for the inner service; wraps the body in [`ResponseBody`] (which carries the token
    /// generation) and tags a token rejection with [`UsedTokenGeneration`].
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
        WaitingForToken {
            // Boxed so the warm path's future stays as small as the inner future.
            waiting: Option<Box<Waiting<S, B>>>,
        },
        Calling {
            #[pin]
            future: S::Future,
            generation: u64,
            // The cache by id, not by `Arc`: the warm path writes no shared reference count.
            cache: CacheId,
        },
        Failed {
            error: Option<Error>,
        },
    }
}

/// What a request waiting for the token holds: the refresh, the inner service that was
/// polled ready, and the request.
struct Waiting<S, B> {
    token: RefreshWait,
    inner: S,
    request: Request<B>,
    cache: CacheId,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, generation: u64, cache: CacheId) -> Self {
        Self {
            state: State::Calling {
                future,
                generation,
                cache,
            },
        }
    }

    pub(crate) fn waiting(
        token: RefreshWait,
        inner: S,
        request: Request<B>,
        cache: CacheId,
    ) -> Self {
        Self {
            state: State::WaitingForToken {
                waiting: Some(Box::new(Waiting {
                    token,
                    inner,
                    request,
                    cache,
                })),
            },
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            // The warm path's case, kept small: the inner service was called at once.
            if let StateProj::Calling {
                future,
                generation,
                cache,
            } = state.as_mut().project()
            {
                let response = ready!(future.poll(cx)).map_err(Into::into)?;
                return Poll::Ready(Ok(answered(response, *generation, *cache)));
            }
            if let Some(outcome) = poll_cold(state.as_mut(), cx) {
                return outcome;
            }
        }
    }
}

/// The states before the inner service is called: waiting for the token, or failed. `None`
/// when the state is now `Calling`: poll again.
#[inline(never)]
fn poll_cold<S, B, ResBody>(
    mut state: Pin<&mut State<S, B>>,
    cx: &mut Context<'_>,
) -> Option<Poll<Result<Response<ResponseBody<ResBody>>, BoxError>>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    let failed = |error: BoxError| Some(Poll::Ready(Err(error)));
    match state.as_mut().project() {
        StateProj::WaitingForToken { waiting } => {
            let Some(pending) = waiting.as_mut() else {
                return failed(polled_after_completion());
            };
            let local = match pending.token.as_mut().poll(cx) {
                Poll::Pending => return Some(Poll::Pending),
                Poll::Ready(Err(error)) => return failed(error.into()),
                Poll::Ready(Ok(local)) => local,
            };
            let Some(waiting) = waiting.take() else {
                return failed(polled_after_completion());
            };
            let Waiting {
                mut inner,
                mut request,
                cache,
                ..
            } = *waiting;
            request
                .headers_mut()
                .insert(AUTHORIZATION, local.authorization.clone());
            let future = inner.call(request);
            state.set(State::Calling {
                future,
                generation: local.generation,
                cache,
            });
            None
        }
        StateProj::Calling { .. } => None,
        StateProj::Failed { error } => failed(match error.take() {
            Some(error) => error.into(),
            None => polled_after_completion(),
        }),
    }
}

/// The inner service's response, its body wrapped in [`ResponseBody`]; a token rejection
/// (a 401 about the token, or gRPC UNAUTHENTICATED in the headers: a Trailers-Only response,
/// how gRPC servers refuse a call) invalidates the token `generation` and, when a replay is
/// allowed, is tagged with [`UsedTokenGeneration`].
#[inline]
fn answered<ResBody>(
    mut response: Response<ResBody>,
    generation: u64,
    cache: CacheId,
) -> Response<ResponseBody<ResBody>> {
    // A response without headers cannot carry `grpc-status`: only a 401 needs a look then.
    if response.status() == StatusCode::UNAUTHORIZED || !response.headers().is_empty() {
        tag_token_rejection(&mut response, generation, cache);
    }
    response.map(|body| ResponseBody::new(body, generation, cache))
}

#[inline(never)]
fn tag_token_rejection<ResBody>(response: &mut Response<ResBody>, generation: u64, cache: CacheId) {
    let rejected = if response.status() == StatusCode::UNAUTHORIZED {
        crate::challenge::is_token_rejection(response.headers())
    } else {
        is_grpc_unauthenticated(response.headers())
    };
    // Whether or not the request is replayed, the next one gets a new token. (A cache whose
    // every clone is gone has nothing left to invalidate.)
    let replay = rejected
        && cache
            .cache()
            .is_some_and(|cache| cache.reject(generation, Instant::now()).allows_replay());
    if replay {
        response
            .extensions_mut()
            .insert(UsedTokenGeneration(generation));
    }
}

fn polled_after_completion() -> BoxError {
    "nuvy_oauth2::ResponseFuture polled after completion".into()
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::WaitingForToken { .. } => "waiting for token",
            State::Calling { .. } => "calling inner service",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, Response, StatusCode};

    use super::answered;
    use crate::cache::TokenCache;
    use crate::config::OAuth2Config;
    use crate::service::UsedTokenGeneration;
    use crate::token::TokenFetcher;
    use crate::ClientCredentials;

    /// Whether `response` comes out of `answered` tagged for a replay (the cache holds no token
    /// of generation 1, so any rejection of it may be replayed).
    fn tagged(response: Response<()>) -> bool {
        let config = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .build()
            .unwrap();
        let cache = TokenCache::new(TokenFetcher::with_default_transport(&config).unwrap());
        let answered = answered(response, 1, cache.id());
        assert_eq!(answered.body().token_generation(), 1);
        answered.extensions().get::<UsedTokenGeneration>() == Some(&UsedTokenGeneration(1))
    }

    fn response(status: StatusCode, headers: &[(&'static str, &'static str)]) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = status;
        for (name, value) in headers {
            response
                .headers_mut()
                .insert(*name, HeaderValue::from_static(value));
        }
        response
    }

    #[tokio::test]
    async fn token_rejections_are_tagged_with_or_without_headers() {
        assert!(tagged(response(StatusCode::UNAUTHORIZED, &[])), "bare 401");
        assert!(tagged(response(
            StatusCode::UNAUTHORIZED,
            &[("www-authenticate", "Bearer error=\"invalid_token\"")]
        )));
        assert!(tagged(response(StatusCode::OK, &[("grpc-status", "16")])));
        assert!(tagged(response(
            StatusCode::OK,
            &[("content-type", "application/grpc"), ("grpc-status", "16")]
        )));
    }

    #[tokio::test]
    async fn other_responses_are_not_tagged() {
        assert!(!tagged(response(StatusCode::OK, &[])));
        assert!(!tagged(response(StatusCode::FORBIDDEN, &[])));
        assert!(!tagged(response(StatusCode::OK, &[("grpc-status", "7")])));
        assert!(!tagged(response(
            StatusCode::UNAUTHORIZED,
            &[("www-authenticate", "Bearer error=\"insufficient_scope\"")]
        )));
    }
}
