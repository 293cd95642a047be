//! [`ResponseFuture`] of [`crate::OAuth2Service`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{BoxError, Service};

use crate::cache::{RefreshWait, TokenCache};
use crate::error::Error;
use crate::service::UsedTokenGeneration;

pin_project! {
    /// Response future of [`crate::OAuth2Service`]: waits for the token when it has to, then
    /// for the inner service, and tags a 401 response with the token generation it was
    /// answered for ([`UsedTokenGeneration`]).
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
            cache: TokenCache,
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
    cache: TokenCache,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, generation: u64, cache: TokenCache) -> Self {
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
        cache: TokenCache,
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
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::WaitingForToken { waiting } => {
                    let Some(pending) = waiting.as_mut() else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    let local = ready!(pending.token.as_mut().poll(cx))?;
                    let Some(waiting) = waiting.take() else {
                        return Poll::Ready(Err(polled_after_completion()));
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
                    this.state.set(State::Calling {
                        future,
                        generation: local.generation,
                        cache,
                    });
                }
                StateProj::Calling {
                    future,
                    generation,
                    cache,
                } => {
                    let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                    if response.status() == StatusCode::UNAUTHORIZED
                        && is_token_rejection(response.headers())
                        // Whether or not the request is replayed, the next one gets a new token.
                        && cache.reject(*generation, Instant::now()).allows_replay()
                    {
                        response
                            .extensions_mut()
                            .insert(UsedTokenGeneration(*generation));
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(error) => error.into(),
                        None => polled_after_completion(),
                    }));
                }
            }
        }
    }
}

/// Whether a 401 is about the access token (RFC 6750 §3): no `WWW-Authenticate` at all (the
/// Nuvy docs treat any 401 as "get a fresh token"), or a `Bearer` challenge whose `error` is
/// `invalid_token` or absent. A `Bearer` challenge with another error (`invalid_request`,
/// `insufficient_scope`) or only non-Bearer challenges are not: a new token would not help.
pub(crate) fn is_token_rejection(headers: &HeaderMap) -> bool {
    let mut challenges = headers.get_all(WWW_AUTHENTICATE).iter().peekable();
    if challenges.peek().is_none() {
        return true;
    }
    challenges
        .filter_map(|value| value.to_str().ok())
        .any(|value| match bearer_error(value) {
            Some(error) => error.is_none_or(|error| error.eq_ignore_ascii_case("invalid_token")),
            None => false,
        })
}

/// For a header value holding a `Bearer` challenge: `Some(error attribute)`; `None` if there is
/// no Bearer challenge.
fn bearer_error(value: &str) -> Option<Option<&str>> {
    let start = value
        .char_indices()
        .find(|&(index, _)| {
            value[index..]
                .get(..6)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer"))
                && (index == 0 || value[..index].trim_end().ends_with(','))
                && value[index + 6..]
                    .chars()
                    .next()
                    .is_none_or(|next| next == ' ' || next == ',')
        })
        .map(|(index, _)| index)?;
    let params = &value[start + 6..];
    let error = params.split(',').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("error")
            .then(|| value.trim().trim_matches('"'))
    });
    Some(error)
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
    use super::is_token_rejection;
    use http::{HeaderMap, HeaderValue};

    fn rejected(challenges: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for challenge in challenges {
            headers.append(
                "www-authenticate",
                HeaderValue::from_str(challenge).unwrap(),
            );
        }
        is_token_rejection(&headers)
    }

    #[test]
    fn only_401s_about_the_token_count_as_token_rejections() {
        assert!(rejected(&[]));
        assert!(rejected(&["Bearer"]));
        assert!(rejected(&[r#"Bearer realm="nuvy""#]));
        assert!(rejected(&[r#"Bearer realm="nuvy", error="invalid_token""#]));
        assert!(rejected(&[r#"bearer error=invalid_token"#]));
        assert!(rejected(&[
            r#"Basic realm="x", Bearer error="invalid_token""#
        ]));
        assert!(rejected(&["Basic realm=\"x\"", "Bearer"]));
        assert!(!rejected(&[
            r#"Bearer error="insufficient_scope", scope="admin""#
        ]));
        assert!(!rejected(&[r#"Bearer error="invalid_request""#]));
        assert!(!rejected(&[r#"Basic realm="x""#]));
        assert!(!rejected(&[r#"BearerX realm="x""#]));
    }
}
