//! [`TokenFetcher`]: sends one token request over its own transport (never through the
//! `OAuth2Service` stack it serves), under its own timeout and body cap, and parses the reply.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};

use super::request::TokenRequestTemplate;
use super::response::{
    body_is_ignored, parse_token_response, retry_after_delay, unexpected_content_encoding,
};
use crate::config::OAuth2Config;
use crate::error::{Error, ErrorKind};
use crate::origin::AllowedOrigins;

/// The request type a token transport receives: a complete `POST` with a form body.
pub type TokenTransportRequest = Request<Full<Bytes>>;
/// The response body type a token transport's responses are boxed into.
pub type TokenTransportBody = UnsyncBoxBody<Bytes, BoxError>;

type Transport = BoxCloneSyncService<TokenTransportRequest, Response<TokenTransportBody>, BoxError>;

/// A token the endpoint granted, with the moment its request was sent.
pub(crate) struct FetchedToken {
    pub(crate) access_token: crate::secret::AccessToken,
    pub(crate) authorization: http::HeaderValue,
    pub(crate) lifetime: Duration,
    /// The scope of the token: the response's `scope`, or the requested one when the response
    /// has none (RFC 6749 §5.1: then it is identical); `None` when neither.
    pub(crate) granted_scope: Option<Arc<str>>,
    /// When the token request was sent: expiry counts from here (RFC 6749 §5.1 `expires_in`
    /// is relative to the response, which is later; counting from the request is the safe side).
    pub(crate) requested_at: Instant,
    /// Taken from a token store (another process requested it), not from the token endpoint.
    pub(crate) from_store: bool,
}

/// Sends token requests. Cheap to clone.
#[derive(Clone)]
pub(crate) struct TokenFetcher {
    transport: Transport,
    template: Arc<TokenRequestTemplate>,
    /// The template of a secret that may change ([`crate::SecretSource`]), instead of
    /// `template`.
    rotation: Option<Arc<crate::rotation::Rotation>>,
    timeout: Duration,
    max_body_bytes: usize,
    /// The `scope` requested, if any.
    requested_scope: Option<Arc<str>>,
    /// Endpoint host, client_id and requested scope for logs and metrics.
    labels: Arc<crate::telemetry::Labels>,
    /// The origins the token obtained here may be sent to (kept here because the fetcher is
    /// the one part of the configuration every service reaches through its cache).
    allowed_origins: Arc<AllowedOrigins>,
    /// The token endpoint as errors name it (no userinfo, no query).
    endpoint: Arc<str>,
}

impl TokenFetcher {
    /// Over the built-in transport (src/transport/): hyper-util's client with rustls, the
    /// configuration's TLS and proxy options. Redirects are never followed.
    pub(crate) fn with_default_transport(config: &OAuth2Config) -> Result<Self, Error> {
        Self::with_transport(config, crate::transport::default_transport(config)?)
    }

    /// Over any tower service that sends an HTTP request and returns the response.
    pub(crate) fn with_transport<T, B>(config: &OAuth2Config, transport: T) -> Result<Self, Error>
    where
        T: Service<TokenTransportRequest, Response = Response<B>> + Clone + Send + Sync + 'static,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let transport = transport
            .map_response(|response: Response<B>| {
                response.map(|body| body.map_err(Into::into).boxed_unsync())
            })
            .map_err(Into::into);
        let template = Arc::new(TokenRequestTemplate::from_config(config)?);
        Ok(Self {
            transport: BoxCloneSyncService::new(transport),
            template: template.clone(),
            rotation: crate::rotation::Rotation::new(config, template).map(Arc::new),
            timeout: config.token_request_timeout,
            max_body_bytes: config.max_token_response_bytes,
            allowed_origins: Arc::new(config.allowed_origins.clone()),
            requested_scope: config.scope.as_deref().map(Arc::from),
            labels: Arc::new(crate::telemetry::Labels::new(
                &config.token_endpoint,
                config.credentials.client_id(),
                config.scope.as_deref(),
            )),
            endpoint: crate::cause::endpoint_for_display(&config.token_endpoint).into(),
        })
    }

    /// Sends one token request and parses the reply, all by `deadline` (the flight's start
    /// plus the token request timeout). Nothing is sent once the deadline has passed.
    ///
    /// A request whose connection closes before any response byte arrives (a pooled
    /// keep-alive connection the server had already closed) is sent once more: a token
    /// request is safe to repeat, and the pool has dropped the dead connection by then. Both
    /// sends count as one attempt.
    ///
    /// With a [`crate::SecretSource`], a rejected client (`invalid_client`, RFC 6749 §5.2)
    /// reads the source again; if the secret changed, the request is sent once more at once
    /// with the new one, by the same deadline.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] at the deadline; [`ErrorKind::Transport`];
    /// [`ErrorKind::ResponseTooLarge`]; and every error of the response parser.
    pub(crate) async fn fetch(&self, deadline: Instant) -> Result<FetchedToken, Error> {
        let result = self.fetch_once(deadline).await;
        match (&result, &self.rotation) {
            // The secret was rotated under us: read it again, and if it changed, ask again at
            // once (same deadline) instead of pausing.
            (Err(error), Some(rotation)) if error.is_invalid_client() && rotation.reload() => {
                tracing::info!(
                    "the token endpoint rejected the client and the client secret has \
                     changed: sending the token request again with the new one"
                );
                self.fetch_once(deadline).await
            }
            _ => result,
        }
    }

    /// One token request (see [`TokenFetcher::fetch`]).
    async fn fetch_once(&self, deadline: Instant) -> Result<FetchedToken, Error> {
        let timed_out = || self.timeout_error();
        if Instant::now() >= deadline {
            return Err(timed_out());
        }
        let mut requested_at = Instant::now();
        let exchange = async {
            let response = match self.send().await {
                Err(error) if closed_before_response(&*error) => {
                    tracing::debug!(
                        "token request connection closed before any response byte; \
                         sending it once more"
                    );
                    requested_at = Instant::now();
                    self.send().await
                }
                sent => sent,
            }
            .map_err(|error| self.transport_error(error))?;
            let arrived = Instant::now();
            let (parts, body) = response.into_parts();
            let retry_after = retry_after_delay(&parts.headers, std::time::SystemTime::now());
            // A 503 or 429 means its status (and Retry-After) whatever its body: a gzipped,
            // oversized or cut-off error page must not turn it into another error.
            let ignored = body_is_ignored(parts.status);
            let body = match read_capped(body, self.max_body_bytes).await {
                Ok(body) => body,
                Err(_) if ignored => Vec::new(),
                Err(ReadError::TooLarge(error)) => return Err(error),
                Err(ReadError::Transport(error)) => return Err(self.transport_error(error)),
            };
            if !ignored && !body.is_empty() {
                if let Some(encoding) = unexpected_content_encoding(&parts.headers) {
                    return Err(Error::new(ErrorKind::UnexpectedContentEncoding {
                        status: parts.status,
                        encoding,
                    }));
                }
            }
            let content_type = parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok());
            // Counted from the response's arrival, not from when its body was read.
            let retry_after = retry_after.map(|delay| delay.saturating_sub(arrived.elapsed()));
            parse_token_response(parts.status, content_type, retry_after, &body)
        };
        let grant = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| timed_out())??;
        let granted_scope = match grant.scope {
            Some(granted) => {
                self.warn_if_scope_missing(&granted);
                Some(Arc::from(granted))
            }
            None => self.requested_scope.clone(),
        };
        Ok(FetchedToken {
            granted_scope,
            access_token: grant.access_token,
            authorization: grant.authorization,
            lifetime: grant.lifetime,
            requested_at,
            from_store: false,
        })
    }

    /// The error of a token request that missed its deadline.
    pub(crate) fn timeout_error(&self) -> Error {
        Error::at_endpoint(
            ErrorKind::Timeout {
                after: self.timeout,
            },
            &self.endpoint,
            None,
        )
    }

    async fn send(&self) -> Result<Response<TokenTransportBody>, BoxError> {
        let request = match &self.rotation {
            Some(rotation) => rotation.template().build(),
            None => self.template.build(),
        };
        self.transport.clone().oneshot(request).await
    }
}

/// Whether a transport error means the connection closed before any response byte: hyper's
/// "connection closed before message completed" or "request canceled", or a reset, aborted or
/// broken connection, anywhere in the error's source chain.
fn closed_before_response(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_canceled() {
                return true;
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        next = error.source();
    }
    false
}

enum ReadError {
    TooLarge(Error),
    Transport(BoxError),
}

/// Reads a whole body, failing with [`ErrorKind::ResponseTooLarge`] as soon as it passes
/// `limit` bytes (or announces more than that up front), so memory stays bounded.
async fn read_capped(mut body: TokenTransportBody, limit: usize) -> Result<Vec<u8>, ReadError> {
    let too_large = || ReadError::TooLarge(Error::new(ErrorKind::ResponseTooLarge { limit }));
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Transport)?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                return Err(too_large());
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected)
}

impl TokenFetcher {
    /// A transport error of a token request to this fetcher's endpoint.
    fn transport_error(&self, error: BoxError) -> Error {
        Error::at_endpoint(ErrorKind::Transport, &self.endpoint, Some(error))
    }

    /// What identifies this fetcher's token traffic in logs and metrics.
    pub(crate) fn labels(&self) -> &crate::telemetry::Labels {
        &self.labels
    }

    /// The timeout of one token request.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// RFC 6749 §3.3: the server may grant less than asked. Logged at WARN once per token
    /// (this runs once per token response) with the scope tokens that are missing; scope
    /// tokens are case-sensitive.
    fn warn_if_scope_missing(&self, granted: &str) {
        let Some(requested) = &self.requested_scope else {
            return;
        };
        let missing: Vec<&str> = requested
            .split(' ')
            .filter(|wanted| !granted.split(' ').any(|got| got == *wanted))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                requested = %requested,
                granted = %granted,
                missing = %missing.join(" "),
                "the token endpoint granted less scope than requested (RFC 6749 §3.3)"
            );
        }
    }

    /// The origins the token may be sent to.
    pub(crate) fn allowed_origins(&self) -> &AllowedOrigins {
        &self.allowed_origins
    }
}

impl fmt::Debug for TokenFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFetcher")
            .field("request", &self.template)
            .field("timeout", &self.timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientAuthentication, ClientCredentials};
    use http_body::Frame;
    use http_body_util::channel::Channel;

    /// A body of these data frames with no length announced (as a chunked response).
    fn unannounced(frames: &[usize]) -> TokenTransportBody {
        let (mut sender, body) = Channel::<Bytes, BoxError>::new(frames.len() + 1);
        for &length in frames {
            sender
                .try_send(Frame::data(Bytes::from(vec![b'x'; length])))
                .unwrap();
        }
        body.boxed_unsync()
    }

    #[tokio::test]
    async fn every_frame_counts_against_the_cap_when_no_length_is_announced() {
        for (frames, fits) in [
            (&[8, 8][..], true),
            (&[16][..], true),
            (&[17][..], false),
            (&[16, 1][..], false),
            (&[1; 17][..], false),
        ] {
            match read_capped(unannounced(frames), 16).await {
                Ok(body) if fits => {
                    assert_eq!(body.len(), frames.iter().sum::<usize>(), "{frames:?}")
                }
                Err(ReadError::TooLarge(error)) if !fits => {
                    assert_eq!(error.kind(), &ErrorKind::ResponseTooLarge { limit: 16 });
                }
                Ok(_) => panic!("{frames:?}: read although over the cap"),
                Err(_) => panic!("{frames:?}: refused although within the cap"),
            }
        }
    }

    #[test]
    fn debug_shows_the_endpoint_timeout_and_cap_but_never_the_credentials() {
        for style in [
            ClientAuthentication::RequestBody,
            ClientAuthentication::BasicRaw,
        ] {
            let config = OAuth2Config::builder(ClientCredentials::new(
                "debug-client",
                "debug-secret-marker",
            ))
            .token_endpoint("https://auth.example/oauth2/token?tenant=query-marker")
            .client_authentication(style)
            .token_request_timeout(Duration::from_secs(7))
            .max_token_response_bytes(1234)
            .build()
            .unwrap();
            let fetcher = TokenFetcher::with_default_transport(&config).unwrap();
            let debug = format!("{fetcher:?}");
            for shown in [
                "TokenFetcher",
                "TokenRequestTemplate",
                "https://auth.example/oauth2/token?<redacted>",
                "timeout: 7s",
                "max_body_bytes: 1234",
            ] {
                assert!(debug.contains(shown), "{shown} missing from {debug}");
            }
            let basic = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                "debug-client:debug-secret-marker",
            );
            for hidden in ["debug-secret-marker", "query-marker", basic.as_str()] {
                assert!(!debug.contains(hidden), "{hidden} in {debug}");
            }
        }
    }
}
