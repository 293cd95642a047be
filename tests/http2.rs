//! API calls over HTTP/2 through `with_retry()`: hyper-util's client with h2c prior knowledge
//! (`http2_only(true)` over a plain `HttpConnector`) and with h2 negotiated by ALPN over TLS
//! (hyper-rustls), and the 401 replay over both. The embedded server serves HTTP/1.1 and
//! HTTP/2 on one port and counts the API requests that came over HTTP/2; the crate's own token
//! requests stay HTTP/1.1.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::tls::{TestCa, TlsFront};
use common::*;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::channel::Channel;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nuvy_oauth2::rustls;
use nuvy_oauth2::{ClientCredentials, OAuth2Config, OAuth2Layer, OAuth2RetryService};
use tower::{BoxError, ServiceBuilder, ServiceExt};

/// hyper-util's client speaking HTTP/2 with prior knowledge (h2c, RFC 9113 §3.3), under
/// `with_retry()`.
fn h2c_api<B>(layer: &OAuth2Layer) -> OAuth2RetryService<Client<HttpConnector, B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut http = HttpConnector::new();
    // HTTP/2 writes frames separately; without this, one may wait out the server's delayed ACK
    // (Nagle), real time during which paused Tokio time jumps to the token's refresh point.
    http.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(http);
    ServiceBuilder::new()
        .layer(layer.clone().with_retry())
        .service(client)
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The embedded server behind the TLS front (ALPN `h2`, `http/1.1`), with the layer's token
/// endpoint behind the same front (the API's origin), trusted through the private CA.
struct Tls {
    server: NuvyServer,
    ca: TestCa,
    front: TlsFront,
    layer: OAuth2Layer,
}

async fn tls() -> Tls {
    let server = NuvyServer::start().await.expect("bind 127.0.0.1");
    let ca = TestCa::new();
    let front = TlsFront::start(server.addr(), ca.server_config()).await;
    let config = OAuth2Config::builder(ClientCredentials::new(
        server.client_id(),
        server.client_secret(),
    ))
    .token_endpoint(front.token_endpoint())
    .tls_root_certificates_pem(ca.pem())
    .no_proxy()
    .build()
    .expect("config");
    let layer = OAuth2Layer::new(config).expect("layer");
    Tls {
        server,
        ca,
        front,
        layer,
    }
}

/// hyper-util's client over hyper-rustls offering `h2` and `http/1.1` by ALPN (what a user
/// gets with `.enable_all_versions()`), trusting the private CA, under `with_retry()`.
fn tls_api(tls: &Tls) -> OAuth2RetryService<HttpsClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.ca.der()).expect("CA certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_all_versions()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new()).build(https);
    ServiceBuilder::new()
        .layer(tls.layer.clone().with_retry())
        .service(client)
}

/// The status, the HTTP version of the response, and the API's JSON (`method`, `path`,
/// `body_bytes`, and `version`: the HTTP version the server received the request over).
async fn answer<B>(response: Response<B>) -> (StatusCode, Version, serde_json::Value)
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let (status, version) = (response.status(), response.version());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or_default();
    (status, version, json)
}

#[tokio::test(start_paused = true)]
async fn h2c_with_prior_knowledge_carries_api_calls_over_http2() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = h2c_api::<Full<Bytes>>(&layer);
    for _ in 0..3 {
        let response = api.clone().oneshot(get(&server.api_url("/v1/ping"))).await;
        let (status, version, json) = answer(response.unwrap()).await;
        assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
        assert_eq!(json["version"], "HTTP/2.0", "the version the server saw");
    }
    assert_eq!(server.api_requests(), 3);
    assert_eq!(server.api_requests_over_http2(), 3);
    assert_eq!(server.token_requests(), 1);
}

#[tokio::test]
async fn h2_negotiated_by_alpn_over_tls_carries_api_calls_while_token_requests_stay_http1() {
    let tls = tls().await;
    let api = tls_api(&tls);
    for _ in 0..2 {
        let request = Request::get(tls.front.api_url("/v1/ping"))
            .body(Full::default())
            .unwrap();
        let (status, version, json) = answer(api.clone().oneshot(request).await.unwrap()).await;
        assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
        assert_eq!(json["version"], "HTTP/2.0", "the version the server saw");
    }
    assert_eq!(tls.server.api_requests_over_http2(), 2);
    assert_eq!(tls.server.token_requests(), 1);
    // One connection for the token request, on which the crate's HTTP/1.1-only transport
    // offered no ALPN (hyper-rustls offers one only with HTTP/2 enabled), so it spoke HTTP/1.1;
    // then one connection, `h2` by ALPN, that carried both API calls.
    assert_eq!(
        tls.front.negotiated_protocols(),
        [None, Some("h2".to_owned())]
    );
}

#[tokio::test(start_paused = true)]
async fn a_401_over_h2c_is_replayed_once_with_its_body_over_http2() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = h2c_api::<Full<Bytes>>(&layer);
    let url = server.api_url("/v1/orders");
    api.clone().oneshot(get(&url)).await.unwrap();
    age_and_revoke_tokens(&server).await;

    let request = Request::post(&url)
        .body(Full::new(Bytes::from_static(b"{\"qty\":3}")))
        .unwrap();
    let (status, version, json) = answer(api.oneshot(request).await.unwrap()).await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    assert_eq!(json["method"], "POST");
    assert_eq!(json["body_bytes"], 9, "the replay carried the body");
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(
        server.token_requests(),
        2,
        "exactly one extra token request"
    );
    assert_eq!(server.api_unauthorized(), 1);
    assert_eq!(
        server.api_requests(),
        3,
        "the first call, the 401, the replay"
    );
    assert_eq!(server.api_requests_over_http2(), 3);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

type Streaming = UnsyncBoxBody<Bytes, BoxError>;

/// A body of `chunks` frames of `chunk_len` bytes, no size known in advance, sent by a task
/// one frame at a time while the request is already on its way (an upload being forwarded).
fn streamed(chunks: usize, chunk_len: usize) -> Streaming {
    let (mut sender, body) = Channel::<Bytes, BoxError>::new(1);
    tokio::spawn(async move {
        for _ in 0..chunks {
            let chunk = Bytes::from(vec![b'x'; chunk_len]);
            if sender.send(Frame::data(chunk)).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    body.boxed_unsync()
}

/// A first small streamed upload (its token fetched and accepted), then every token revoked
/// once it is past the rejection window: the next upload meets a 401.
async fn upload_then_revoke(
    server: &NuvyServer,
    api: &OAuth2RetryService<Client<HttpConnector, Streaming>>,
    url: &str,
) {
    let request = Request::post(url).body(streamed(1, 10)).unwrap();
    assert_eq!(
        api.clone().oneshot(request).await.unwrap().status(),
        StatusCode::OK
    );
    age_and_revoke_tokens(server).await;
}

#[tokio::test(start_paused = true)]
async fn a_small_streamed_body_over_h2c_is_replayed_from_the_bytes_kept_while_it_streamed() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server);
    let api = h2c_api::<Streaming>(&layer);
    let url = server.api_url("/v1/upload");
    upload_then_revoke(&server, &api, &url).await;

    // 3 frames of 1,000 bytes: well under the 64 KiB cap.
    let request = Request::post(&url).body(streamed(3, 1000)).unwrap();
    let (status, version, json) = answer(api.oneshot(request).await.unwrap()).await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    assert_eq!(
        json["body_bytes"], 3000,
        "the replay carried the whole body"
    );
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(server.token_requests(), 2);
    assert_eq!(server.api_requests(), 3, "one success, the 401, the replay");
    assert_eq!(server.api_requests_over_http2(), 3);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_over_the_cap_over_h2c_is_sent_once_and_its_401_returned() {
    let server = server(Duration::from_secs(3600)).await;
    let layer = layer(&server).max_replay_body_bytes(4096);
    let api = h2c_api::<Streaming>(&layer);
    let url = server.api_url("/v1/upload");
    upload_then_revoke(&server, &api, &url).await;

    // 5 frames of 1,000 bytes: over the 4,096-byte cap.
    let request = Request::post(&url).body(streamed(5, 1000)).unwrap();
    let response = api.clone().oneshot(request).await.unwrap();
    assert_eq!(
        (response.status(), response.version()),
        (StatusCode::UNAUTHORIZED, Version::HTTP_2)
    );
    assert_eq!(server.api_requests(), 2, "never replayed");
    assert_eq!(layer.token_cache().unauthorized_retries(), 0);
    // The rejected token was invalidated all the same: the next request gets a new one.
    let request = Request::post(&url).body(streamed(5, 1000)).unwrap();
    assert_eq!(api.oneshot(request).await.unwrap().status(), StatusCode::OK);
    assert_eq!(server.token_requests(), 2);
    assert_eq!(server.api_requests_over_http2(), 3);
}

#[tokio::test]
async fn a_401_over_tls_h2_is_replayed_once_over_http2() {
    let tls = tls().await;
    let api = tls_api(&tls);
    let url = tls.front.api_url("/v1/orders");
    let request = Request::get(&url).body(Full::default()).unwrap();
    api.clone().oneshot(request).await.unwrap();
    // A revocation right after issue: one rejection of a generation is always replayed.
    tls.server.revoke_all_tokens();

    let request = Request::post(&url)
        .body(Full::new(Bytes::from_static(b"{\"qty\":3}")))
        .unwrap();
    let (status, version, json) = answer(api.oneshot(request).await.unwrap()).await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    assert_eq!(json["body_bytes"], 9, "the replay carried the body");
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(
        tls.server.token_requests(),
        2,
        "exactly one extra token request"
    );
    assert_eq!(tls.server.api_unauthorized(), 1);
    assert_eq!(tls.server.api_requests(), 3);
    assert_eq!(tls.server.api_requests_over_http2(), 3);
    assert_eq!(tls.layer.token_cache().unauthorized_retries(), 1);
}
