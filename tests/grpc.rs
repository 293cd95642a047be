//! gRPC: a real tonic server (tonic-health's health service) whose interceptor applies the
//! embedded server's token check. UNAUTHENTICATED (16) is a token rejection: in a Trailers-Only
//! response it is replayed like a 401; in trailers after a streamed body it invalidates the
//! token when the trailers are read. PERMISSION_DENIED (7) is never a token rejection.
//! Feature `tonic`.
#![cfg(feature = "tonic")]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tonic::body::Body as GrpcBody;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::{Service, ServiceBuilder};

type Client = HealthClient<nuvy_oauth2::OAuth2RetryService<Channel>>;

#[derive(Default)]
struct Counters {
    unauthenticated: AtomicU64,
    calls: AtomicU64,
}

/// Ends every `Watch` stream after its first message with `grpc-status: 16` in the trailers
/// (as a server does that notices a revoked token mid-stream).
#[derive(Clone)]
struct WatchEndsUnauthenticated<S>(S);

impl<S: NamedService> NamedService for WatchEndsUnauthenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<GrpcBody>> for WatchEndsUnauthenticated<S>
where
    S: Service<http::Request<GrpcBody>, Response = http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = http::Response<GrpcBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<GrpcBody>) -> Self::Future {
        let watch = request.uri().path().ends_with("/Watch");
        let future = self.0.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| {
                let body = GrpcBody::new(body);
                if watch {
                    GrpcBody::new(FirstThenUnauthenticated(Some(body), false))
                } else {
                    body
                }
            }))
        })
    }
}

/// The first data frame of the inner body, then UNAUTHENTICATED trailers.
struct FirstThenUnauthenticated(Option<GrpcBody>, bool);

impl http_body::Body for FirstThenUnauthenticated {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(body) = self.0.as_mut() {
            let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
            self.0 = None;
            if let Some(Ok(frame)) = frame {
                if frame.is_data() {
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
        if std::mem::replace(&mut self.1, true) {
            return Poll::Ready(None);
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("16"));
        trailers.insert("grpc-message", HeaderValue::from_static("token revoked"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

/// Starts the health service on loopback behind an interceptor that accepts exactly the
/// tokens the embedded server's API accepts (UNAUTHENTICATED otherwise), and answers
/// PERMISSION_DENIED to calls carrying `x-deny`.
async fn start_grpc(server: Arc<NuvyServer>, counters: Arc<Counters>) -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let interceptor = move |request: Request<()>| {
        counters.calls.fetch_add(1, Ordering::SeqCst);
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| HeaderValue::from_bytes(value.as_bytes()).ok());
        if !server.accepts_authorization(authorization.as_ref()) {
            counters.unauthenticated.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unauthenticated("invalid token"));
        }
        if request.metadata().contains_key("x-deny") {
            return Err(Status::permission_denied("not for you"));
        }
        Ok(request)
    };
    let service = WatchEndsUnauthenticated(tonic::service::interceptor::InterceptedService::new(
        health,
        interceptor,
    ));
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    addr
}

async fn setup() -> (
    Arc<NuvyServer>,
    Arc<Counters>,
    nuvy_oauth2::OAuth2Layer,
    Client,
) {
    let server = Arc::new(server(Duration::from_secs(3600)).await);
    let counters = Arc::new(Counters::default());
    let addr = start_grpc(Arc::clone(&server), Arc::clone(&counters)).await;
    let layer = layer(&server);
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = HealthClient::new(
        ServiceBuilder::new()
            .layer(layer.clone().with_retry())
            .service(channel),
    );
    (server, counters, layer, client)
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_server_side_revocation_no_unary_call_fails() {
    let (server, counters, layer, mut client) = setup().await;
    for _ in 0..5 {
        client.check(check()).await.unwrap();
    }
    assert_eq!(server.token_requests(), 1);

    age_and_revoke_tokens(&server).await;
    let mut failed = 0;
    for _ in 0..30 {
        if client.check(check()).await.is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "failed unary calls seen by the client");
    assert_eq!(
        server.token_requests(),
        2,
        "one token request after the revocation"
    );
    assert_eq!(counters.unauthenticated.load(Ordering::SeqCst), 1);
    assert_eq!(layer.token_cache().unauthorized_retries(), 1);
    assert_eq!(counters.calls.load(Ordering::SeqCst), 36);
}

#[tokio::test(start_paused = true)]
async fn permission_denied_is_not_a_token_rejection() {
    let (server, _counters, layer, mut client) = setup().await;
    client.check(check()).await.unwrap();
    let generation = layer.token_cache().current_generation();
    tokio::time::advance(Duration::from_secs(5)).await;

    let mut request = Request::new(check());
    request
        .metadata_mut()
        .insert("x-deny", "1".parse().unwrap());
    let status = client.check(request).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        layer.token_cache().current_generation(),
        generation,
        "token kept"
    );
    assert_eq!(layer.token_cache().unauthorized_retries(), 0);
    assert_eq!(server.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn unauthenticated_in_trailers_invalidates_the_token_when_they_are_read() {
    let (server, _counters, layer, mut client) = setup().await;
    let mut stream = client.watch(check()).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("the first status");
    assert_eq!(layer.token_cache().current_generation(), 1);
    tokio::time::advance(Duration::from_secs(5)).await;

    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        layer.token_cache().current_generation(),
        0,
        "invalidated when the trailers were read"
    );
    client.check(check()).await.unwrap();
    assert_eq!(
        server.token_requests(),
        2,
        "the next call got a fresh token"
    );
}
