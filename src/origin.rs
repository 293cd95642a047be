//! The origins (scheme, host, port; RFC 6454) a bearer token may be sent to. RFC 6750 §5.3:
//! clients must not leak tokens, and a layer outside the auth layer (tower-http's
//! `FollowRedirectLayer`, say) may hand it a request for any URL.
//!
//! The default set is the origin of the token endpoint, where the Nuvy API lives
//! (`https://prd.api.nuvy.ai`, `https://qa.api.nuvy.ai`); more are added with
//! [`crate::OAuth2ConfigBuilder::allow_origin`]. The check runs on every request: it compares
//! the request URI's parts with a short list in place, without allocating.

use std::fmt;
use std::net::Ipv6Addr;

use http::Uri;

use crate::error::{Error, ErrorKind};

/// One allowed origin. `host` is lowercase, as [`Uri::host`] gives it (IPv6 in brackets, in
/// its canonical RFC 5952 text).
#[derive(Clone, PartialEq, Eq)]
struct Origin {
    https: bool,
    host: Box<str>,
    /// The address when `host` is an IPv6 literal: `[::1]` and `[0:0::1]` are one host.
    ipv6: Option<Ipv6Addr>,
    port: u16,
    /// The authorities that name this origin as URIs usually write it, precomputed for the
    /// fast path: `host:port`, and `host` alone when the port is the scheme's default.
    authority_with_port: Box<str>,
    authority_without_port: Option<Box<str>>,
}

impl Origin {
    fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme(), self.host, self.port)
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The set of origins a token may go to.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AllowedOrigins {
    origins: Box<[Origin]>,
}

impl AllowedOrigins {
    /// The origins of these absolute `http`/`https` URLs (their userinfo, path and query are
    /// ignored), without duplicates.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for a URL that is not absolute `http`/`https` with a host
    /// and, when it has one, a port from 0 to 65535; the URL is not echoed (it may hold
    /// userinfo).
    pub(crate) fn from_urls<'a>(urls: impl IntoIterator<Item = &'a Uri>) -> Result<Self, Error> {
        let mut origins: Vec<Origin> = Vec::new();
        for uri in urls {
            let origin = origin_of(uri).ok_or_else(|| {
                Error::new(ErrorKind::InvalidConfig(
                    "an allowed origin must be an absolute http or https URL with a host (and \
                     a port from 0 to 65535 if it has one)"
                        .to_owned(),
                ))
            })?;
            if !origins.contains(&origin) {
                origins.push(origin);
            }
        }
        Ok(Self {
            origins: origins.into_boxed_slice(),
        })
    }

    /// Whether a request for `uri` may carry the token:
    /// - an absolute `http`/`https` URI: only if its origin (scheme, host, port; default port
    ///   80 or 443 when absent; case-insensitive host; IPv6 literals compared as addresses) is
    ///   in the set; a port that is not a number from 0 to 65535 (`host:abc`, `host:65979`,
    ///   which `http` parses as "no port") is refused, never read as the default port;
    /// - a URI with neither scheme nor authority (tonic's `/package.Service/Method`, or `*`):
    ///   yes; the transport below chose where it connects and is trusted with it;
    /// - anything else (another scheme, an authority without a scheme): no.
    ///
    /// No allocation unless the request is refused.
    ///
    /// # Errors
    /// [`ErrorKind::OriginNotAllowed`] naming the request's origin (never its path, query or
    /// userinfo, never the token).
    pub(crate) fn check(&self, uri: &Uri) -> Result<(), Error> {
        // Fast path: the scheme (parsed case-insensitively by `http`) and the authority text as
        // written, compared with the precomputed forms. Only accepts; anything else (userinfo,
        // other case, no match) goes through the full comparison below.
        if self.admits_as_written(uri, true) {
            return Ok(());
        }
        self.check_parsed(uri)
    }

    /// The warm path's check: whether `uri` is absolute `https` (or `http` when
    /// `allow_http`) and its authority, as written, is one of the precomputed forms of an
    /// allowed origin, or has neither scheme nor authority (tonic's `/package.Service/Method`,
    /// accepted by [`check`](Self::check) too). One scheme comparison and a short text compare;
    /// `false` sends the request to [`check`](Self::check) and the scheme check, which decide
    /// (userinfo, another case, an IPv6 spelling: accepted or refused there).
    #[inline]
    pub(crate) fn admits_as_written(&self, uri: &Uri, allow_http: bool) -> bool {
        let (scheme, authority) = match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) => (scheme, authority),
            (None, None) => return true,
            _ => return false,
        };
        // `as_str` is inlined where `Scheme`'s `==` is a call; `http` spells the standard
        // schemes in lowercase (another spelling goes to the full check).
        let https = scheme.as_str() == "https";
        // (`allow_http` is all but redundant here: an `http` origin is only ever in the set when
        // the configuration allows http, which sets `allow_http`; a mutant of the `&&` below
        // survives for that reason.)
        if !(https || (allow_http && scheme.as_str() == "http")) {
            return false;
        }
        let authority = authority.as_str();
        self.origins.iter().any(|origin| {
            origin.https == https
                && (*origin.authority_with_port == *authority
                    || origin.authority_without_port.as_deref() == Some(authority))
        })
    }

    /// The full comparison: scheme, host and port parsed out of the URI.
    fn check_parsed(&self, uri: &Uri) -> Result<(), Error> {
        let Some(scheme) = uri.scheme_str() else {
            return match uri.authority() {
                None => Ok(()),
                Some(_) => Err(self.refused(uri)),
            };
        };
        let https = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return Err(self.refused(uri));
        };
        if !uri
            .authority()
            .is_some_and(|authority| port_is_valid(authority.as_str()))
        {
            return Err(self.refused(uri));
        }
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let ipv6 = ipv6_of(host);
        let allowed = self.origins.iter().any(|origin| {
            origin.https == https
                && origin.port == port
                && match ipv6 {
                    Some(ip) => origin.ipv6 == Some(ip),
                    None => origin.host.eq_ignore_ascii_case(host),
                }
        });
        if allowed {
            Ok(())
        } else {
            Err(self.refused(uri))
        }
    }

    #[cold]
    fn refused(&self, uri: &Uri) -> Error {
        let origin = match origin_of(uri) {
            Some(origin) => origin.to_string(),
            None => {
                let scheme = uri.scheme_str().unwrap_or("(no scheme)");
                let host = uri.host().unwrap_or("(no host)");
                let port_valid = uri
                    .authority()
                    .is_none_or(|authority| port_is_valid(authority.as_str()));
                match uri.port_u16() {
                    Some(port) => format!("{scheme}://{host}:{port}"),
                    // The port text is not shown: it may be part of a password whose
                    // unencoded `/` ended the authority early.
                    None if !port_valid => format!("{scheme}://{host}:(invalid port)"),
                    None => format!("{scheme}://{host}"),
                }
            }
        };
        Error::new(ErrorKind::OriginNotAllowed {
            origin: crate::error::sanitize_server_text(&origin),
        })
    }
}

/// Whether the port of an authority (`[userinfo@]host[:port]`), when written, is a number
/// from 0 to 65535 (RFC 3986 §3.2.3 `port = *DIGIT`; an empty port means the default). `http`
/// accepts any text there (`host:abc`, `host:65979`) and then reports no port at all, which
/// must not be read as the scheme's default port.
pub(crate) fn port_is_valid(authority: &str) -> bool {
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port);
    let port = match host_port.rfind(']') {
        Some(end) => host_port[end + 1..].strip_prefix(':'),
        None => host_port.split_once(':').map(|(_, port)| port),
    };
    match port {
        None | Some("") => true,
        Some(port) => port.bytes().all(|byte| byte.is_ascii_digit()) && port.parse::<u16>().is_ok(),
    }
}

/// Whether `url` (the text `uri` was parsed from) has an `@` outside the authority `http`
/// found: a password written with an unencoded `/`, `?` or `#` (`https://user:pa/ss@host`),
/// which `http` reads as host `user` and the rest as a path, so that the host, port or path
/// shown in errors and `Debug` would hold part of the password.
pub(crate) fn has_at_outside_authority(url: &str, uri: &Uri) -> bool {
    let in_authority = uri
        .authority()
        .map_or(0, |authority| authority.as_str().matches('@').count());
    url.matches('@').count() > in_authority
}

/// The address of an IPv6 literal host (`[::1]`, as [`Uri::host`] gives it); `None` for any
/// other host, a zone identifier included.
fn ipv6_of(host: &str) -> Option<Ipv6Addr> {
    host.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The origin of an absolute `http`/`https` URI with a host and a valid port, if any.
fn origin_of(uri: &Uri) -> Option<Origin> {
    let scheme = uri.scheme_str()?;
    let https = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return None;
    };
    if !port_is_valid(uri.authority()?.as_str()) {
        return None;
    }
    let host = uri.host().filter(|host| !host.is_empty())?;
    let ipv6 = ipv6_of(host);
    let host = match ipv6 {
        Some(ip) => format!("[{ip}]"),
        None => host.to_ascii_lowercase(),
    };
    let default_port = if https { 443 } else { 80 };
    let port = uri.port_u16().unwrap_or(default_port);
    Some(Origin {
        https,
        authority_with_port: format!("{host}:{port}").into_boxed_str(),
        authority_without_port: (port == default_port).then(|| host.clone().into_boxed_str()),
        host: host.into_boxed_str(),
        ipv6,
        port,
    })
}

impl fmt::Debug for AllowedOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.origins.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(urls: &[&str]) -> AllowedOrigins {
        let uris: Vec<Uri> = urls.iter().map(|url| url.parse().unwrap()).collect();
        AllowedOrigins::from_urls(&uris).unwrap()
    }

    #[test]
    fn only_the_allowed_origins_get_the_token() {
        let allowed = origins(&[
            "https://prd.api.nuvy.ai/oauth2/token",
            "https://user:pass@api.example:8443/base?x=1",
            "http://127.0.0.1:8080/",
            "http://[::1]:9000",
        ]);
        // (request URI, may it carry the token?)
        let cases: &[(&str, bool)] = &[
            ("https://prd.api.nuvy.ai/v1/ping", true),
            ("https://prd.api.nuvy.ai:443/v1/ping", true),
            ("HTTPS://PRD.API.NUVY.AI/v1/ping", true),
            ("https://Prd.Api.Nuvy.Ai", true),
            ("https://prd.api.nuvy.ai?q=1", true),
            ("https://someone@prd.api.nuvy.ai/v1", true),
            ("https://api.example:8443/other/path", true),
            ("http://127.0.0.1:8080/v1/ping", true),
            ("http://[::1]:9000/x", true),
            ("/package.Service/Method", true),
            ("*", true),
            // Other spellings of an allowed origin.
            ("https://prd.api.nuvy.ai:0443/v1/ping", true),
            ("https://prd.api.nuvy.ai:/v1/ping", true),
            ("https://@prd.api.nuvy.ai/v1/ping", true),
            ("http://[0:0:0:0:0:0:0:1]:9000/x", true),
            ("http://[0::0001]:9000/x", true),
            ("HTTP://127.0.0.1:08080/v1/ping", true),
            // A port that is not a TCP port is not the default port.
            ("https://prd.api.nuvy.ai:65979/v1/ping", false),
            ("https://prd.api.nuvy.ai:65536/v1/ping", false),
            (
                "https://prd.api.nuvy.ai:99999999999999999999/v1/ping",
                false,
            ),
            ("https://prd.api.nuvy.ai:abc/v1/ping", false),
            ("https://prd.api.nuvy.ai:443x/v1/ping", false),
            ("https://prd.api.nuvy.ai:+443/v1/ping", false),
            ("https://user:pass@prd.api.nuvy.ai:pass/v1/ping", false),
            ("http://[::1]:9000x/x", false),
            ("http://[::1]:x/x", false),
            // IPv6 addresses that are not the allowed one, or not plainly an address.
            ("http://[::ffff:127.0.0.1]:9000/x", false),
            ("http://[::1%25lo]:9000/x", false),
            ("http://[0:0:0:0:0:0:0:2]:9000/x", false),
            // Other origins.
            ("http://prd.api.nuvy.ai/v1/ping", false),
            ("https://prd.api.nuvy.ai:8443/v1/ping", false),
            ("https://qa.api.nuvy.ai/v1/ping", false),
            ("https://api.nuvy.ai/v1/ping", false),
            ("https://evil.prd.api.nuvy.ai/v1/ping", false),
            ("https://prd.api.nuvy.ai.evil.example/v1/ping", false),
            ("https://prd.api.nuvy.ai./v1/ping", false),
            ("https://evil.example/prd.api.nuvy.ai", false),
            ("https://prd.api.nuvy.ai@evil.example/v1/ping", false),
            ("https://api.example/other/path", false),
            ("https://api.example:443/", false),
            ("http://api.example:8443/", false),
            ("https://127.0.0.1:8080/v1/ping", false),
            ("http://127.0.0.1:8081/v1/ping", false),
            ("http://localhost:8080/v1/ping", false),
            ("http://127.0.0.2:8080/v1/ping", false),
            ("http://[::1]:9001/x", false),
            ("http://[::2]:9000/x", false),
            ("ftp://prd.api.nuvy.ai/file", false),
            ("ws://prd.api.nuvy.ai/socket", false),
            ("prd.api.nuvy.ai:443", false),
        ];
        for (uri, expected) in cases {
            let parsed: Uri = uri.parse().unwrap();
            let result = allowed.check(&parsed);
            assert_eq!(result.is_ok(), *expected, "{uri}");
            // The fast path only ever agrees with the full comparison.
            assert_eq!(allowed.check_parsed(&parsed).is_ok(), *expected, "{uri}");
            if let Err(error) = result {
                let ErrorKind::OriginNotAllowed { origin } = error.kind() else {
                    panic!("{uri}: {error:?}");
                };
                assert!(
                    !origin.contains("pass") && !origin.contains("/v1"),
                    "{origin}"
                );
                assert!(error.to_string().contains(origin.as_str()), "{error}");
            }
        }
    }

    #[test]
    fn the_refused_origin_is_named_with_its_port() {
        let allowed = origins(&["https://prd.api.nuvy.ai/oauth2/token"]);
        for (uri, named) in [
            ("http://127.0.0.1:4000/x?token=1", "http://127.0.0.1:4000"),
            ("https://evil.example/steal", "https://evil.example:443"),
            (
                "https://u:p@evil.example:8443/",
                "https://evil.example:8443",
            ),
            // The port text is never echoed (it may be half of a password).
            (
                "https://user:pa/ss@prd.api.nuvy.ai/",
                "https://user:(invalid port)",
            ),
            (
                "https://prd.api.nuvy.ai:65979/x",
                "https://prd.api.nuvy.ai:(invalid port)",
            ),
            ("http://[0::1]:80/", "http://[::1]:80"),
        ] {
            let error = allowed.check(&uri.parse().unwrap()).unwrap_err();
            assert_eq!(
                error.kind(),
                &ErrorKind::OriginNotAllowed {
                    origin: named.to_owned()
                }
            );
        }
        assert!(AllowedOrigins::from_urls(&["/relative".parse().unwrap()]).is_err());
        assert!(AllowedOrigins::from_urls(&["ftp://x.example".parse().unwrap()]).is_err());
        for invalid_port in [
            "https://x.example:99999",
            "https://x.example:abc",
            "http://[::1]:1x",
        ] {
            assert!(
                AllowedOrigins::from_urls(&[invalid_port.parse().unwrap()]).is_err(),
                "{invalid_port}"
            );
        }
        assert_eq!(
            format!(
                "{:?}",
                origins(&["https://u:p@A.example/x", "https://a.example:443"])
            ),
            "{https://a.example:443}"
        );
    }
}
