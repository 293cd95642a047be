//! The main job: the whole OAuth2 client-credentials flow through a tower client stack.
//!
//! ```text
//! cargo run --example quickstart                      # against the embedded server (offline)
//! cargo run --example quickstart -- --env qa --api-url https://qa.api.nuvy.ai/<path>
//! cargo run --example quickstart -- --token-endpoint https://auth.example/token --api-url https://api.example/x
//! cargo run --example quickstart -- --allow-http-loopback \
//!     --token-endpoint http://127.0.0.1:8080/oauth2/token --api-url http://127.0.0.1:8080/v1/ping
//! ```
//!
//! `--allow-http-loopback` allows plain http for loopback hosts only (127.0.0.0/8, `[::1]`,
//! `localhost`): a development server or a sidecar. Any other http host is refused. The token
//! goes only to the token endpoint's origin and the `--api-url` origin.
//!
//! Offline it starts the embedded Nuvy-compatible server with 3-second tokens, then
//! (a) fires 1,000 concurrent API calls on a cold cache, (b) waits past the token lifetime and
//! fires another 1,000, (c) revokes the token on the server and makes one call that succeeds
//! through the 401 retry. Against a real deployment (credentials from `NUVY_CLIENT_ID` and
//! `NUVY_CLIENT_SECRET`) it runs (a) and (b) only: (c) needs server-side revocation.
//!
//! Exits non-zero if any call failed or a burst caused more than one token request.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nuvy_oauth2::{
    ClientCredentials, Environment, OAuth2Config, OAuth2Layer, OAuth2RetryService, OAuth2Service,
};
use tokio::task::JoinSet;
use tower::{BoxError, ServiceBuilder, ServiceExt};

// The embedded server. In your own code: `nuvy_oauth2::test_util::NuvyServer` with the
// crate's `test-util` feature. This repository compiles the same file in by path, so that
// `cargo run --example quickstart` needs no feature flag, also in the packaged crate.
#[path = "../src/test_util/mod.rs"]
#[allow(dead_code, unused_imports)]
mod test_util;
use test_util::NuvyServer;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;
type Api = OAuth2RetryService<HttpsClient>;

const BURST: usize = 1_000;
const EMBEDDED_TOKEN_LIFETIME: Duration = Duration::from_secs(3);

struct Target {
    config: OAuth2Config,
    api_url: String,
    server: Option<NuvyServer>,
}

#[derive(Default)]
struct Report {
    api_calls: u64,
    successes: u64,
    failures: Vec<String>,
    oversized_bursts: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("quickstart failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, BoxError> {
    let target = target_from_args().await?;
    let auth = OAuth2Layer::new(target.config.clone())?;
    // An explicit provider: `with_webpki_roots()` would panic if rustls had two compiled in
    // (this crate's `aws-lc-rs` feature next to the dev-dependencies' ring).
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(nuvy_oauth2::rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .build();
    let client: HttpsClient = Client::builder(TokioExecutor::new()).build(https);
    let api: Api = ServiceBuilder::new()
        .layer(auth.clone().with_retry())
        .service(client);
    let cache = auth.token_cache();
    let mut report = Report::default();

    println!(
        "token endpoint {}, API {}",
        target.config.token_endpoint(),
        target.api_url
    );

    // (a) A burst on a cold cache.
    burst("a: cold cache", &api, &target, &mut report).await;

    // (b) Wait past the token lifetime, then another burst.
    let wait = cache
        .status()
        .token_expires_in
        .unwrap_or(EMBEDDED_TOKEN_LIFETIME)
        + Duration::from_millis(200);
    println!("waiting {wait:.1?} for the token to expire");
    tokio::time::sleep(wait).await;
    burst("b: after expiry", &api, &target, &mut report).await;

    // (c) The server revokes the token; one call recovers through the 401 retry.
    if let Some(server) = &target.server {
        server.revoke_all_tokens();
        let before = cache.token_requests();
        let retries_before = cache.unauthorized_retries();
        report.api_calls += 1;
        match call(api.clone(), &target.api_url).await {
            Ok(()) => report.successes += 1,
            Err(error) => report.failures.push(format!("c: {error}")),
        }
        let token_requests = cache.token_requests() - before;
        println!(
            "c: revoked token  -> 1 call, {} token request(s), {} 401 retry(ies)",
            token_requests,
            cache.unauthorized_retries() - retries_before
        );
        if token_requests != 1 {
            report
                .oversized_bursts
                .push(format!("c: {token_requests} token requests"));
        }
    } else {
        println!("c: skipped (needs server-side revocation; embedded server only)");
    }

    println!();
    println!("API calls        {}", report.api_calls);
    println!("successes        {}", report.successes);
    println!("token requests   {} (client side)", cache.token_requests());
    if let Some(server) = &target.server {
        println!(
            "                 {} (embedded server)",
            server.token_requests()
        );
    }
    println!("401 retries      {}", cache.unauthorized_retries());
    let mut ok = report.failures.is_empty() && report.oversized_bursts.is_empty();
    if let Some(server) = &target.server {
        if server.token_requests() != cache.token_requests() {
            println!(
                "MISMATCH: the server saw {} token requests, the client counted {}",
                server.token_requests(),
                cache.token_requests()
            );
            ok = false;
        }
    }
    for failure in report.failures.iter().take(5) {
        println!("FAILED: {failure}");
    }
    for burst in &report.oversized_bursts {
        println!("TOO MANY TOKEN REQUESTS: {burst}");
    }
    println!("{}", if ok { "OK" } else { "FAILED" });
    Ok(ok)
}

async fn burst(name: &str, api: &Api, target: &Target, report: &mut Report) {
    let cache = token_cache(api);
    let before = cache.token_requests();
    let replays_before = cache.unauthorized_retries();
    let mut calls = JoinSet::new();
    for _ in 0..BURST {
        calls.spawn(call(api.clone(), &target.api_url));
    }
    let mut successes = 0;
    while let Some(result) = calls.join_next().await {
        report.api_calls += 1;
        match result {
            Ok(Ok(())) => successes += 1,
            Ok(Err(error)) => report.failures.push(format!("{name}: {error}")),
            Err(error) => report.failures.push(format!("{name}: task: {error}")),
        }
    }
    report.successes += successes;
    let token_requests = cache.token_requests() - before;
    let replays = cache.unauthorized_retries() - replays_before;
    println!(
        "{name:<17} -> {BURST} concurrent calls, {successes} ok, {token_requests} token request(s), \
         {replays} 401 replay(s)"
    );
    if token_requests > 1 {
        report
            .oversized_bursts
            .push(format!("{name}: {token_requests} token requests"));
    }
}

fn token_cache(api: &Api) -> nuvy_oauth2::TokenCache {
    let service: &OAuth2Service<HttpsClient> = api.get_ref();
    service.token_cache().clone()
}

fn call(api: Api, url: &str) -> impl std::future::Future<Output = Result<(), BoxError>> {
    let request = http::Request::get(url).body(Empty::new());
    async move {
        let response = api.oneshot(request?).await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("API answered {}", response.status()).into())
        }
    }
}

async fn target_from_args() -> Result<Target, BoxError> {
    let mut args = std::env::args().skip(1);
    let mut environment = None;
    let mut token_endpoint = None;
    let mut api_url = None;
    let mut allow_http_loopback = false;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--env" => environment = Some(value()?.parse::<Environment>()?),
            "--token-endpoint" => token_endpoint = Some(value()?),
            "--api-url" => api_url = Some(value()?),
            "--allow-http-loopback" => allow_http_loopback = true,
            "-h" | "--help" => {
                println!(
                    "usage: quickstart [--env qa|production | --token-endpoint URL] --api-url URL \
                     [--allow-http-loopback]\n\
                     with no arguments, runs against the embedded server; \
                     --allow-http-loopback allows plain http to 127.0.0.0/8, [::1] and localhost only"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if environment.is_none() && token_endpoint.is_none() {
        let server = NuvyServer::builder()
            .token_lifetime(EMBEDDED_TOKEN_LIFETIME)
            .start()
            .await?;
        let config = OAuth2Config::builder(ClientCredentials::new(
            server.client_id(),
            server.client_secret(),
        ))
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true)
        .build()?;
        return Ok(Target {
            config,
            api_url: server.api_url("/v1/ping"),
            server: Some(server),
        });
    }
    let api_url = api_url.ok_or("--api-url is required against a real deployment")?;
    let builder = OAuth2Config::builder(ClientCredentials::from_env()?);
    let builder = match token_endpoint {
        Some(url) => builder.token_endpoint(url),
        None => builder.environment(environment.unwrap_or(Environment::Production)),
    };
    // The token goes only to allowed origins (RFC 6750 §5.3): the token endpoint's, and the
    // API's named here.
    let builder = builder
        .allow_origin(api_url.clone())
        .allow_insecure_http_on_loopback(allow_http_loopback);
    Ok(Target {
        config: builder.build()?,
        api_url,
        server: None,
    })
}
