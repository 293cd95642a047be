use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64_URL};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

const TOKEN_PATH: &str = "/oauth2/token";
const DEFAULT_CLIENT_ID: &str = "nuvy-test-client";
const DEFAULT_CLIENT_SECRET: &str = "nuvy-test-secret";
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// Builder of a [`NuvyServer`]. `Debug` does not show the client secret.
#[derive(Clone)]
pub struct NuvyServerBuilder {
    client_id: String,
    client_secret: String,
    token_lifetime: Duration,
}

impl fmt::Debug for NuvyServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NuvyServerBuilder")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("token_lifetime", &self.token_lifetime)
            .finish()
    }
}

impl NuvyServerBuilder {
    /// The one registered `client_id` (default `nuvy-test-client`).
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// The one registered `client_secret` (default `nuvy-test-secret`).
    pub fn client_secret(mut self, client_secret: impl Into<String>) -> Self {
        self.client_secret = client_secret.into();
        self
    }

    /// Lifetime of issued tokens, sent as `expires_in` in whole seconds (default 3600 s;
    /// at least 1 s is sent).
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// Binds `127.0.0.1:0` and starts serving in a task of the current Tokio runtime.
    ///
    /// # Errors
    /// The `bind` error, if the port cannot be had.
    pub async fn start(self) -> std::io::Result<NuvyServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ServerState {
            client_id: self.client_id,
            client_secret: self.client_secret,
            knobs: Mutex::new(Knobs {
                token_lifetime: self.token_lifetime,
                script: VecDeque::new(),
                tokens: HashMap::new(),
                last_token_request: None,
                last_api_authorization: None,
                reject_all_api_requests: false,
                granted_scope: None,
                client_secrets: None,
            }),
            token_requests: AtomicU64::new(0),
            token_requests_in_flight: AtomicU64::new(0),
            max_token_requests_in_flight: AtomicU64::new(0),
            close_next_reused_token_connection: AtomicBool::new(false),
            tokens_issued: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
            api_unauthorized: AtomicU64::new(0),
            api_requests_over_http2: AtomicU64::new(0),
        });
        let accept_state = Arc::clone(&state);
        let accept_loop = tokio::spawn(async move {
            // HTTP/1.1, and HTTP/2 when a connection opens with the HTTP/2 preface (h2c with
            // prior knowledge, RFC 9113 §3.3; h2 negotiated by ALPN in front of this server).
            let http = auto::Builder::new(TokioExecutor::new());
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // No Nagle delay: an HTTP/2 response goes out as several small writes (HEADERS,
                // DATA), and the second must not wait for the client's delayed ACK (tests on
                // paused Tokio time would see the clock jump meanwhile).
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&accept_state);
                let http = http.clone();
                connections.spawn(async move {
                    // Requests served on this connection so far.
                    let served = Arc::new(AtomicU64::new(0));
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = Arc::clone(&state);
                        let reused = served.fetch_add(1, Ordering::SeqCst) > 0;
                        async move {
                            if reused
                                && request.uri().path() == TOKEN_PATH
                                && state
                                    .close_next_reused_token_connection
                                    .swap(false, Ordering::SeqCst)
                            {
                                state.token_requests.fetch_add(1, Ordering::SeqCst);
                                // An error from the service makes hyper close the connection
                                // without writing a response.
                                return Err(std::io::Error::other("connection closed on reuse"));
                            }
                            Ok(state.handle(request).await)
                        }
                    });
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                });
                // Reap finished connections so the set does not grow without bound.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(NuvyServer {
            addr,
            state,
            accept_loop,
        })
    }
}

/// One token response to play instead of the normal behaviour, queued with
/// [`NuvyServer::push_token_response`].
#[derive(Debug, Clone)]
pub struct ScriptedResponse {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    delay: Duration,
    hang: bool,
    issue_token: bool,
}

impl ScriptedResponse {
    /// A response with this status and an empty body.
    pub fn status(status: u16) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            headers: Vec::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
            hang: false,
            issue_token: false,
        }
    }

    /// A JSON response: this status, `Content-Type: application/json`, this body.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::status(status)
            .header("content-type", "application/json")
            .body(body.into())
    }

    /// The normal behaviour (credentials checked, a token issued), after [`delay`](Self::delay).
    pub fn normal() -> Self {
        Self {
            issue_token: true,
            ..Self::status(200)
        }
    }

    /// Never answers: the request hangs until the client gives up.
    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::status(200)
        }
    }

    /// Adds a header (ignored if the name or value is invalid).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let (Ok(name), Ok(value)) = (name.parse(), HeaderValue::from_str(value)) {
            self.headers.push((name, value));
        }
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Waits this long (Tokio time) before answering.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A token request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The method.
    pub method: Method,
    /// The path and query.
    pub path: String,
    /// All headers, the `Authorization` value included: this is test data.
    pub headers: HeaderMap,
    /// The body as received.
    pub body: Bytes,
}

struct IssuedToken {
    expires_at: Instant,
    revoked: bool,
}

struct Knobs {
    token_lifetime: Duration,
    script: VecDeque<ScriptedResponse>,
    tokens: HashMap<String, IssuedToken>,
    last_token_request: Option<RecordedRequest>,
    last_api_authorization: Option<HeaderValue>,
    reject_all_api_requests: bool,
    granted_scope: Option<serde_json::Value>,
    /// The valid secrets when rotated (`set_client_secrets`); `None`: the registered one.
    client_secrets: Option<Vec<String>>,
}

struct ServerState {
    client_id: String,
    client_secret: String,
    knobs: Mutex<Knobs>,
    token_requests: AtomicU64,
    token_requests_in_flight: AtomicU64,
    max_token_requests_in_flight: AtomicU64,
    close_next_reused_token_connection: AtomicBool,
    tokens_issued: AtomicU64,
    api_requests: AtomicU64,
    api_unauthorized: AtomicU64,
    api_requests_over_http2: AtomicU64,
}

/// The embedded Nuvy-compatible server. See the [module docs](crate::test_util).
///
/// Dropping it stops the accept loop and closes every connection.
pub struct NuvyServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl NuvyServer {
    /// A server with the default client (`nuvy-test-client` / `nuvy-test-secret`) and 3600 s
    /// tokens.
    ///
    /// # Errors
    /// The `bind` error.
    pub async fn start() -> std::io::Result<Self> {
        Self::builder().start().await
    }

    /// A builder for non-default credentials or token lifetime.
    pub fn builder() -> NuvyServerBuilder {
        NuvyServerBuilder {
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            client_secret: DEFAULT_CLIENT_SECRET.to_owned(),
            token_lifetime: DEFAULT_LIFETIME,
        }
    }

    /// The socket address the server listens on (127.0.0.1, OS-assigned port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The registered `client_id`.
    pub fn client_id(&self) -> &str {
        &self.state.client_id
    }

    /// The registered `client_secret`.
    pub fn client_secret(&self) -> &str {
        &self.state.client_secret
    }

    /// `http://127.0.0.1:<port>/oauth2/token`.
    pub fn token_endpoint(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// `http://127.0.0.1:<port><path>`, a URL of the protected API.
    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the valid `client_secret`s of the client (a rotation: accept the old and the
    /// new one, then the new one only). Token requests with any other secret get 401
    /// `invalid_client`. Tokens already issued stay valid.
    pub fn set_client_secrets(&self, secrets: &[&str]) {
        self.state.knobs().client_secrets =
            Some(secrets.iter().map(|secret| (*secret).to_owned()).collect());
    }

    /// Requests received on the token endpoint, answered or not.
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// The most token requests the server was handling at the same time so far (received,
    /// not yet answered or abandoned). A client that keeps a single flight never exceeds 1.
    pub fn max_concurrent_token_requests(&self) -> u64 {
        self.state
            .max_token_requests_in_flight
            .load(Ordering::SeqCst)
    }

    /// Token requests being handled now (received, not yet answered or abandoned).
    pub fn token_requests_in_flight(&self) -> u64 {
        self.state.token_requests_in_flight.load(Ordering::SeqCst)
    }

    /// Fault: the next token request that arrives on a connection that already served a
    /// request (a pooled keep-alive connection) is read, counted in
    /// [`token_requests`](Self::token_requests), and answered by closing the connection
    /// without a response byte, as a server that dropped an idle connection does. (Meant for
    /// HTTP/1.1 token requests, as the crate's transport sends them; over HTTP/2 only that
    /// request's stream is reset.)
    pub fn close_next_reused_token_connection(&self) {
        self.state
            .close_next_reused_token_connection
            .store(true, Ordering::SeqCst);
    }

    /// Tokens issued.
    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens_issued.load(Ordering::SeqCst)
    }

    /// Requests received by the protected API.
    pub fn api_requests(&self) -> u64 {
        self.state.api_requests.load(Ordering::SeqCst)
    }

    /// API requests answered 401.
    pub fn api_unauthorized(&self) -> u64 {
        self.state.api_unauthorized.load(Ordering::SeqCst)
    }

    /// Requests received by the protected API over HTTP/2 (h2c with prior knowledge, or h2
    /// negotiated by ALPN at a TLS front), 401s included; the others of
    /// [`api_requests`](Self::api_requests) came over HTTP/1.1.
    pub fn api_requests_over_http2(&self) -> u64 {
        self.state.api_requests_over_http2.load(Ordering::SeqCst)
    }

    /// Changes the lifetime of tokens issued from now on (whole seconds; at least 1 s is sent).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state.knobs().token_lifetime = lifetime;
    }

    /// Revokes every token issued so far: the API answers 401 to them.
    pub fn revoke_all_tokens(&self) {
        for token in self.state.knobs().tokens.values_mut() {
            token.revoked = true;
        }
    }

    /// Revokes one token (given without the `Bearer ` prefix). Returns whether it was known.
    pub fn revoke_token(&self, token: &str) -> bool {
        match self.state.knobs().tokens.get_mut(token) {
            Some(issued) => {
                issued.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Queues a scripted answer for a coming token request; queued answers are played in order
    /// before normal behaviour resumes.
    pub fn push_token_response(&self, response: ScriptedResponse) {
        self.state.knobs().script.push_back(response);
    }

    /// The next `count` token requests fail with `status` and an RFC 6749 §5.2 body
    /// (`server_error`, or `invalid_client` for 401, `invalid_request` for 400).
    pub fn fail_next_token_requests(&self, count: usize, status: u16) {
        let error = match status {
            400 => "invalid_request",
            401 => "invalid_client",
            _ => "server_error",
        };
        for _ in 0..count {
            self.push_token_response(ScriptedResponse::json(
                status,
                format!(r#"{{"error":"{error}"}}"#),
            ));
        }
    }

    /// The next `count` token requests are answered normally, after `delay` (Tokio time).
    pub fn delay_next_token_requests(&self, count: usize, delay: Duration) {
        for _ in 0..count {
            self.push_token_response(ScriptedResponse::normal().delay(delay));
        }
    }

    /// The `scope` member of every normal token response from now on (RFC 6749 §5.1): `None`
    /// leaves it out (the default), otherwise this JSON value as it is (a string such as
    /// `"api:read"`, or anything else to test leniency). The server grants what it says here,
    /// whatever was requested.
    pub fn set_granted_scope(&self, scope: Option<serde_json::Value>) {
        self.state.knobs().granted_scope = scope;
    }

    /// While `true`, the API answers 401 `invalid_token` to every request, even with a valid
    /// token (a server that rejects fresh tokens).
    pub fn reject_all_api_requests(&self, reject: bool) {
        self.state.knobs().reject_all_api_requests = reject;
    }

    /// The most recent token request as received.
    pub fn last_token_request(&self) -> Option<RecordedRequest> {
        self.state.knobs().last_token_request.clone()
    }

    /// The `Authorization` header of the most recent API request.
    pub fn last_api_authorization(&self) -> Option<HeaderValue> {
        self.state.knobs().last_api_authorization.clone()
    }

    /// The API's token check, for another server (a gRPC service, say) that should accept
    /// exactly what this server's API accepts: whether `authorization` is `Bearer <token>` for
    /// a token issued here, neither revoked nor expired (and
    /// [`reject_all_api_requests`](Self::reject_all_api_requests) is off).
    pub fn accepts_authorization(&self, authorization: Option<&HeaderValue>) -> bool {
        self.state.accepts(&self.state.knobs(), authorization)
    }
}

impl Drop for NuvyServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl fmt::Debug for NuvyServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NuvyServer")
            .field("addr", &self.addr)
            .field("client_id", &self.state.client_id)
            .field("token_requests", &self.token_requests())
            .field("api_requests", &self.api_requests())
            .finish_non_exhaustive()
    }
}

type ServerResponse = Response<Full<Bytes>>;

/// API path answering `302 Found` with `Location` set to the `to` query parameter
/// (`/v1/redirect?to=<percent-encoded URL>`), whatever the token: a redirect as real APIs send.
pub const REDIRECT_PATH: &str = "/v1/redirect";

fn redirect(uri: &http::Uri) -> ServerResponse {
    let target = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(name, _)| name == "to")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(location) = HeaderValue::from_str(&target) {
        response
            .headers_mut()
            .insert(http::header::LOCATION, location);
    }
    response
}

/// Counts a token request out of flight when its handling ends, answered or dropped.
struct InFlightGuard<'a>(&'a AtomicU64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn json_response(status: StatusCode, body: String) -> ServerResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> ServerResponse {
    let body = serde_json::json!({ "error": error, "error_description": description });
    let mut response = json_response(status, body.to_string());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"nuvy\""),
        );
    }
    response
}

impl ServerState {
    fn knobs(&self) -> MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> ServerResponse {
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "body too large")
            }
        };
        if parts.uri.path() == TOKEN_PATH {
            self.token_endpoint(parts, body).await
        } else {
            self.protected_api(parts, body)
        }
    }

    async fn token_endpoint(&self, parts: http::request::Parts, body: Bytes) -> ServerResponse {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let in_flight = self.token_requests_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_token_requests_in_flight
            .fetch_max(in_flight, Ordering::SeqCst);
        let _in_flight = InFlightGuard(&self.token_requests_in_flight);
        let scripted = {
            let mut knobs = self.knobs();
            knobs.last_token_request = Some(RecordedRequest {
                method: parts.method.clone(),
                path: parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
            knobs.script.pop_front()
        };
        if let Some(scripted) = scripted {
            if scripted.hang {
                std::future::pending::<()>().await;
            }
            if !scripted.delay.is_zero() {
                tokio::time::sleep(scripted.delay).await;
            }
            if !scripted.issue_token {
                let mut response = Response::new(Full::new(scripted.body));
                *response.status_mut() = scripted.status;
                for (name, value) in scripted.headers {
                    response.headers_mut().append(name, value);
                }
                return response;
            }
        }
        if parts.method != Method::POST {
            return oauth_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "the token endpoint accepts POST only",
            );
        }
        let form_content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                value
                    .split(';')
                    .next()
                    .is_some_and(|mime| mime.trim() == "application/x-www-form-urlencoded")
            });
        if !form_content_type {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Content-Type must be application/x-www-form-urlencoded",
            );
        }
        let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
        match form.get("grant_type").map(String::as_str) {
            Some("client_credentials") => {}
            None => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "grant_type is missing",
                )
            }
            Some(_) => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "grant_type must be client_credentials",
                )
            }
        }
        let Some(client_id) = self.authenticate_client(&parts.headers, &form) else {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            );
        };
        self.issue_token(&client_id)
    }

    /// RFC 6749 §2.3.1: HTTP Basic (raw values, or each value percent-encoded) or the
    /// credentials in the body. Returns the authenticated client_id.
    fn authenticate_client(
        &self,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
    ) -> Option<String> {
        let secrets = self.knobs().client_secrets.clone();
        let matches = |id: &str, secret: &str| {
            id == self.client_id
                && match &secrets {
                    Some(secrets) => secrets.iter().any(|valid| valid == secret),
                    None => secret == self.client_secret,
                }
        };
        if let Some(value) = headers.get(AUTHORIZATION) {
            let encoded = value.to_str().ok()?.strip_prefix("Basic ")?;
            let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
            let (id, secret) = decoded.split_once(':')?;
            let percent_decoded = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8()
                    .ok()
                    .map(|text| text.into_owned())
            };
            let raw = matches(id, secret);
            let encoded = match (percent_decoded(id), percent_decoded(secret)) {
                (Some(id), Some(secret)) => matches(&id, &secret),
                _ => false,
            };
            return (raw || encoded).then(|| self.client_id.clone());
        }
        let id = form.get("client_id")?;
        let secret = form.get("client_secret")?;
        matches(id, secret).then(|| self.client_id.clone())
    }

    fn issue_token(&self, client_id: &str) -> ServerResponse {
        let serial = self.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut knobs = self.knobs();
        let lifetime = knobs.token_lifetime;
        let expires_in = lifetime.as_secs().max(1);
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let header = BASE64_URL.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": "nuvy-test-server",
            "sub": client_id,
            "iat": now_unix,
            "exp": now_unix + expires_in,
            "jti": serial,
        });
        let claims = BASE64_URL.encode(claims.to_string());
        let signature: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        let token = format!("{header}.{claims}.{}", BASE64_URL.encode(signature));
        knobs.tokens.insert(
            token.clone(),
            IssuedToken {
                expires_at: Instant::now() + Duration::from_secs(expires_in),
                revoked: false,
            },
        );
        let granted_scope = knobs.granted_scope.clone();
        drop(knobs);
        let mut body = serde_json::json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": expires_in,
        });
        if let Some(scope) = granted_scope {
            body["scope"] = scope;
        }
        json_response(StatusCode::OK, body.to_string())
    }

    fn accepts(&self, knobs: &Knobs, authorization: Option<&HeaderValue>) -> bool {
        !knobs.reject_all_api_requests
            && authorization
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .and_then(|token| knobs.tokens.get(token))
                .is_some_and(|issued| !issued.revoked && Instant::now() < issued.expires_at)
    }

    fn protected_api(&self, parts: http::request::Parts, body: Bytes) -> ServerResponse {
        self.api_requests.fetch_add(1, Ordering::SeqCst);
        if parts.version == Version::HTTP_2 {
            self.api_requests_over_http2.fetch_add(1, Ordering::SeqCst);
        }
        let authorization = parts.headers.get(AUTHORIZATION);
        if parts.uri.path() == REDIRECT_PATH {
            self.knobs().last_api_authorization = authorization.cloned();
            return redirect(&parts.uri);
        }
        let valid = {
            let mut knobs = self.knobs();
            knobs.last_api_authorization = authorization.cloned();
            self.accepts(&knobs, authorization)
        };
        if !valid {
            self.api_unauthorized.fetch_add(1, Ordering::SeqCst);
            let body = serde_json::json!({
                "error": "invalid_token",
                "error_description": "the access token is missing, unknown, revoked or expired",
            });
            let mut response = json_response(StatusCode::UNAUTHORIZED, body.to_string());
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "Bearer realm=\"nuvy\", error=\"invalid_token\", \
                     error_description=\"the access token is missing, unknown, revoked or expired\"",
                ),
            );
            return response;
        }
        let body = serde_json::json!({
            "ok": true,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "body_bytes": body.len(),
            "version": format!("{:?}", parts.version),
        });
        json_response(StatusCode::OK, body.to_string())
    }
}
