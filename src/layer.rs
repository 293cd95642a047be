//! [`OAuth2Layer`]: the entry point. Owns one [`TokenCache`] and wraps services in
//! [`OAuth2Service`].

use bytes::Bytes;
use http::Response;
use http_body::Body;
use tower::layer::util::Stack;
use tower::{BoxError, Layer, Service};

use crate::cache::TokenCache;
use crate::config::OAuth2Config;
use crate::error::Error;
use crate::replay::DEFAULT_MAX_REPLAY_BODY_BYTES;
use crate::retry::{RetryOnUnauthorized, RetryOnUnauthorizedLayer};
use crate::service::OAuth2Service;
use crate::token::{TokenFetcher, TokenTransportRequest};

/// Layer that authenticates requests with OAuth2 client credentials (RFC 6749 §4.4).
///
/// Every service it makes (and every clone of those) shares one [`TokenCache`]: one token, at
/// most one token request in flight. `Clone` is cheap and shares the cache too.
///
/// # Example
///
/// ```no_run
/// use http_body_util::Empty;
/// use bytes::Bytes;
/// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
/// use nuvy_oauth2::{Environment, OAuth2Config, OAuth2Layer, ClientCredentials};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # async fn run() -> Result<(), tower::BoxError> {
/// let config = OAuth2Config::builder(ClientCredentials::from_env()?)
///     .environment(Environment::Production)
///     .build()?;
/// let https = hyper_rustls::HttpsConnectorBuilder::new()
///     .with_webpki_roots()
///     .https_only()
///     .enable_http1()
///     .build();
/// let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(https);
///
/// let api = ServiceBuilder::new()
///     .layer(OAuth2Layer::new(config)?.with_retry())
///     .service(client);
/// let response = api
///     .oneshot(http::Request::get("https://prd.api.nuvy.ai/v1/ping").body(Empty::new())?)
///     .await?;
/// println!("{}", response.status());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct OAuth2Layer {
    cache: TokenCache,
    allow_insecure_http: bool,
    /// Which shared token this configuration uses in a token store.
    store_key: crate::store::StoreKey,
    max_replay_body_bytes: usize,
}

/// [`OAuth2Layer`] with [`RetryOnUnauthorized`] outside it, as [`OAuth2Layer::with_retry`]
/// builds it.
pub type OAuth2RetryLayer = Stack<OAuth2Layer, RetryOnUnauthorizedLayer>;

/// The service [`OAuth2RetryLayer`] makes: `RetryOnUnauthorized<OAuth2Service<S>>`.
pub type OAuth2RetryService<S> = RetryOnUnauthorized<OAuth2Service<S>>;

impl OAuth2Layer {
    /// A layer whose token requests go over hyper-util's client with rustls (HTTPS, webpki
    /// roots; plain http only if the configuration allows it). Needs no runtime to build; the
    /// first request must run inside a Tokio runtime.
    ///
    /// # Errors
    /// [`crate::ErrorKind::InvalidConfig`] if the TLS setup or the token request cannot be built.
    pub fn new(config: OAuth2Config) -> Result<Self, Error> {
        let fetcher = TokenFetcher::with_default_transport(&config)?;
        Ok(Self::from_parts(&config, fetcher))
    }

    /// A layer whose token requests go through `transport`, any tower service that sends an
    /// `http::Request<Full<Bytes>>` and returns the response (a hyper-util client with your own
    /// connector, a client with a proxy, ...). The token endpoint is never called through the
    /// stack this layer builds.
    ///
    /// # Errors
    /// [`crate::ErrorKind::InvalidConfig`] if the token request cannot be built.
    pub fn with_token_transport<T, B>(config: OAuth2Config, transport: T) -> Result<Self, Error>
    where
        T: Service<TokenTransportRequest, Response = Response<B>> + Clone + Send + Sync + 'static,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let fetcher = TokenFetcher::with_transport(&config, transport)?;
        Ok(Self::from_parts(&config, fetcher))
    }

    fn from_parts(config: &OAuth2Config, fetcher: TokenFetcher) -> Self {
        Self {
            cache: TokenCache::new(fetcher),
            allow_insecure_http: config.allow_insecure_http,
            store_key: crate::store::StoreKey::for_config(config),
            max_replay_body_bytes: DEFAULT_MAX_REPLAY_BODY_BYTES,
        }
    }

    /// Sets how many request body bytes the retry keeps, while the body streams, to replay it
    /// after a token rejection (default [`DEFAULT_MAX_REPLAY_BODY_BYTES`], 64 KiB). A body over
    /// this is sent once; its rejection is returned as it is. `0` replays empty bodies only.
    pub fn max_replay_body_bytes(mut self, bytes: usize) -> Self {
        self.max_replay_body_bytes = bytes;
        self
    }

    /// This layer with its token shared through `store` ([`crate::store`]): a
    /// [`crate::store::MemoryTokenStore`] between layers of one process, a `RedisTokenStore`
    /// (feature `redis`) between the processes of a fleet. Layers whose configurations have
    /// the same [`crate::store::StoreKey`] (token endpoint, `client_id`, scope, audience,
    /// resource, extra parameters) share one token and make one token request per token
    /// lifetime between them.
    ///
    /// The store is consulted only inside a refresh (cold start, refresh-ahead or refresh
    /// point, after a 401), never for a request that finds a valid token in this layer; a
    /// store that fails never fails a request (the layer then requests its own token).
    ///
    /// Call it before making services: it starts this layer (and its clones made from now on)
    /// with a new, empty cache.
    pub fn with_token_store(mut self, store: impl crate::store::TokenStore) -> Self {
        let store: std::sync::Arc<dyn crate::store::TokenStore> = std::sync::Arc::new(store);
        let fleet = crate::store::Fleet::new(store, self.store_key.clone());
        self.cache = TokenCache::with_fleet(self.cache.fetcher().clone(), Some(fleet));
        self
    }

    /// A valid access token for a client that is not a tower stack: see [`TokenCache::token`]
    /// (same cache, single flight, refresh-ahead and backoff as the services of this layer).
    /// Report a rejected token with [`TokenCache::reject_token`].
    ///
    /// # Errors
    /// As [`TokenCache::token`].
    pub async fn token(&self) -> Result<crate::AccessToken, Error> {
        self.cache.token().await
    }

    /// The token cache shared by every service of this layer: token request count, status
    /// snapshot, explicit invalidation.
    pub fn token_cache(&self) -> &TokenCache {
        &self.cache
    }

    /// The retry layer alone, bound to this layer's cache, for building the stack by hand with
    /// other layers in between:
    /// `ServiceBuilder::new().layer(auth.retry_layer()).layer(other).layer(auth)`.
    /// The retry must sit outside the auth layer so the replay gets the fresh token.
    pub fn retry_layer(&self) -> RetryOnUnauthorizedLayer {
        RetryOnUnauthorizedLayer::new(self.cache.id(), self.max_replay_body_bytes)
    }

    /// The token-rejection retry as a [`tower::retry::Policy`], bound to this layer's cache,
    /// for stacks built by hand around `tower::retry::RetryLayer`:
    /// `ServiceBuilder::new().layer(RetryLayer::new(auth.retry_policy())).layer(auth)`.
    /// Needs a `Clone` request body (the in-memory bodies); for streaming bodies use
    /// [`with_retry`](Self::with_retry) or [`retry_layer`](Self::retry_layer).
    pub fn retry_policy(&self) -> crate::UnauthorizedRetryPolicy {
        crate::UnauthorizedRetryPolicy::new(self.cache.id())
    }

    /// This layer with [`RetryOnUnauthorized`] outside it: the usual stack in one layer. Makes
    /// an [`OAuth2RetryService`]. A request rejected for its token is sent once more, with any
    /// method and any body type ([`crate::ReplayableBody`]) that fits the replay cap.
    pub fn with_retry(self) -> OAuth2RetryLayer {
        let retry = self.retry_layer();
        Stack::new(self, retry)
    }

    /// As [`with_retry`](Self::with_retry), but replaying idempotent methods only
    /// ([`RetryOnUnauthorizedLayer::idempotent_only`]).
    pub fn with_idempotent_retry(self) -> OAuth2RetryLayer {
        let retry = self.retry_layer().idempotent_only();
        Stack::new(self, retry)
    }
}

impl<S> Layer<S> for OAuth2Layer {
    type Service = OAuth2Service<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OAuth2Service::new(inner, self.cache.clone(), self.allow_insecure_http)
    }
}
