//! The Nuvy authentication documentation's curl generator, in Rust: prints an access token, or
//! with `--curl URL` a ready `curl -H "Authorization: Bearer …" URL` command line.
//!
//! ```text
//! NUVY_CLIENT_ID=… NUVY_CLIENT_SECRET=… cargo run --example token -- --env qa
//! NUVY_CLIENT_ID=… NUVY_CLIENT_SECRET=… cargo run --example token -- --curl https://prd.api.nuvy.ai/v1/ping
//! cargo run --example token   # no credentials: against the embedded server (as CI runs it)
//! ```
//!
//! The token goes to stdout only because you asked for it; nothing is logged.

use std::process::ExitCode;

use nuvy_oauth2::{ClientCredentials, Environment, OAuth2Config, OAuth2Layer};

// The embedded server, compiled in by path as the other examples do (feature `test-util` for
// users of the published crate).
#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../src/test_util/mod.rs"]
mod test_util;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), tower::BoxError> {
    let mut args = std::env::args().skip(1);
    let mut environment = Environment::Production;
    let mut curl_url = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--env" => {
                environment = match args.next().as_deref() {
                    Some("qa") => Environment::Qa,
                    Some("production") => Environment::Production,
                    _ => return Err("--env takes qa or production".into()),
                }
            }
            "--curl" => curl_url = Some(args.next().ok_or("--curl takes a URL")?),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }

    let from_env = std::env::var_os(nuvy_oauth2::CLIENT_ID_ENV_VAR).is_some()
        || std::env::var_os(nuvy_oauth2::CLIENT_SECRET_ENV_VAR).is_some();
    let mut _embedded = None;
    let config = if from_env {
        OAuth2Config::builder(ClientCredentials::from_env()?)
            .environment(environment)
            .build()?
    } else {
        eprintln!("no NUVY_CLIENT_ID/NUVY_CLIENT_SECRET: using the embedded test server");
        let server = test_util::NuvyServer::start().await?;
        let config = OAuth2Config::builder(ClientCredentials::new(
            server.client_id(),
            server.client_secret(),
        ))
        .token_endpoint(server.token_endpoint())
        .allow_insecure_http(true)
        .build()?;
        _embedded = Some(server);
        config
    };
    let token = OAuth2Layer::new(config)?.token().await?;
    match curl_url {
        Some(url) => println!(
            "curl -H \"Authorization: Bearer {}\" '{}'",
            token.expose_secret(),
            url.replace('\'', "'\\''")
        ),
        None => println!("{}", token.expose_secret()),
    }
    Ok(())
}
