//! Which proxy, if any, the token request goes through.

use std::net::IpAddr;

use http::{HeaderValue, Uri};
use hyper_util::client::proxy::matcher::Matcher;

use super::options::ProxyChoice;
use crate::error::{Error, ErrorKind};

/// A proxy to tunnel through: its URI (no userinfo), the `Proxy-Authorization` its userinfo
/// makes (sensitive), and how logs name it.
pub(crate) struct Route {
    pub(crate) proxy: Uri,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) display: String,
}

/// The proxy for token requests to `endpoint`: none for a loopback endpoint or with
/// [`ProxyChoice::Off`]; the explicit URL; else what `HTTPS_PROXY` / `HTTP_PROXY` /
/// `ALL_PROXY` / `NO_PROXY` (and their lowercase forms) say, read now.
///
/// # Errors
/// [`ErrorKind::InvalidConfig`] for a proxy that is not `http://` (SOCKS and TLS-to-proxy are
/// not supported), naming where it came from.
pub(crate) fn route(choice: &ProxyChoice, endpoint: &Uri) -> Result<Option<Route>, Error> {
    if is_loopback(endpoint) {
        return Ok(None);
    }
    let (matcher, source) = match choice {
        ProxyChoice::Off => return Ok(None),
        ProxyChoice::FromEnv => (
            Matcher::from_env(),
            "the environment (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY)",
        ),
        ProxyChoice::Url(url) => (Matcher::builder().all(url.expose()).build(), "proxy()"),
    };
    let Some(intercept) = matcher.intercept(endpoint) else {
        return Ok(None);
    };
    let proxy = intercept.uri().clone();
    let display = format!(
        "{}://{}",
        proxy.scheme_str().unwrap_or("http"),
        proxy.host().unwrap_or_default()
    ) + &proxy
        .port_u16()
        .map(|port| format!(":{port}"))
        .unwrap_or_default();
    if proxy.scheme_str() != Some("http") {
        return Err(Error::new(ErrorKind::InvalidConfig(format!(
            "proxy {display} from {source}: only http:// proxies (HTTP CONNECT) are supported"
        ))));
    }
    Ok(Some(Route {
        proxy,
        authorization: intercept.basic_auth().cloned(),
        display,
    }))
}

/// `localhost`, 127.0.0.0/8 and `::1`: never sent to a proxy, which could not reach them.
fn is_loopback(uri: &Uri) -> bool {
    match uri.host() {
        Some(host) if host.eq_ignore_ascii_case("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::options::ProxyUrl;

    fn uri(text: &str) -> Uri {
        text.parse().unwrap()
    }

    #[test]
    fn explicit_proxy_with_credentials_and_loopback_bypass() {
        let choice = ProxyChoice::Url(ProxyUrl::parse("http://u:p@proxy.internal:3128").unwrap());
        let route = route(&choice, &uri("https://auth.example/oauth2/token"))
            .unwrap()
            .unwrap();
        assert_eq!(route.proxy.host(), Some("proxy.internal"));
        assert_eq!(route.display, "http://proxy.internal:3128");
        let authorization = route.authorization.unwrap();
        assert_eq!(authorization, "Basic dTpw");
        for loopback in [
            "https://localhost:8443/t",
            "https://127.0.0.1/t",
            "https://[::1]:9/t",
        ] {
            assert!(route_is_none(&choice, loopback), "{loopback}");
        }
        assert!(route_is_none(
            &ProxyChoice::Off,
            "https://auth.example/oauth2/token"
        ));
    }

    fn route_is_none(choice: &ProxyChoice, endpoint: &str) -> bool {
        route(choice, &uri(endpoint)).unwrap().is_none()
    }
}
