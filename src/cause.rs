//! Why a token request failed, in one short line: the endpoint it went to (never its userinfo
//! or query) and the innermost cause of a transport error ("connection refused", "dns error:
//! no such host", "invalid peer certificate: UnknownIssuer"), as [`crate::Error`]'s `Display`,
//! `TokenCache::status().last_error` and the WARN log show them.

use std::error::Error as StdError;
use std::io;

use http::Uri;

use crate::error::sanitize_server_text;

/// The token endpoint as errors and logs name it: scheme, host, port and path. Userinfo and
/// query are left out, so a credential someone put in the URL never reaches a log.
pub(crate) fn endpoint_for_display(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("https");
    let host = uri.host().unwrap_or_default();
    let mut text = format!("{scheme}://{host}");
    if let Some(port) = uri.port_u16() {
        text.push(':');
        text.push_str(&port.to_string());
    }
    text.push_str(uri.path());
    text
}

/// The innermost cause of `error`, short: an OS error by its kind ("connection refused"), a
/// failed name lookup as "dns error: …", anything else by its own `Display` (control characters
/// replaced, cut to [`crate::MAX_SERVER_TEXT_CHARS`]).
pub(crate) fn short_cause(error: &(dyn StdError + 'static)) -> String {
    let mut in_dns = false;
    let mut in_tunnel = false;
    let mut innermost = error;
    let mut current = Some(error);
    while let Some(error) = current {
        let text = error.to_string();
        // hyper-util's connector labels a failed lookup "dns error" (its `ConnectError`), and
        // its proxy tunnel's errors "tunnel error: …" (`TunnelError`).
        in_dns |= text == "dns error";
        in_tunnel |= text.starts_with(TUNNEL_ERROR);
        innermost = error;
        current = error.source();
    }
    let text = describe(innermost);
    let text = match text.strip_prefix(TUNNEL_ERROR) {
        Some(rest) => rest.to_owned(),
        None => text,
    };
    if in_dns && !text.starts_with("dns error") {
        format!("dns error: {text}")
    } else if in_tunnel {
        format!("proxy CONNECT failed: {text}")
    } else {
        text
    }
}

const TUNNEL_ERROR: &str = "tunnel error: ";

fn describe(error: &(dyn StdError + 'static)) -> String {
    if let Some(io) = error.downcast_ref::<io::Error>() {
        if let Some(text) = io_kind_text(io) {
            return text.to_owned();
        }
    }
    let text = error.to_string();
    let text = strip_os_error_code(&text);
    // What getaddrinfo says for a name that does not exist (glibc, musl, BSD/macOS, Windows).
    let lookup = text
        .strip_prefix("failed to lookup address information: ")
        .unwrap_or(text);
    if [
        "Name or service not known",
        "No address associated with hostname",
        "nodename nor servname provided, or not known",
        "No such host is known",
        "Name does not resolve",
    ]
    .iter()
    .any(|phrase| lookup.starts_with(phrase))
    {
        return "no such host".to_owned();
    }
    let lookup = if lookup.len() < text.len() {
        lowercase_first(lookup)
    } else {
        lookup.to_owned()
    };
    sanitize_server_text(&lookup)
}

/// OS-level socket errors by kind, in the words an operator searches for.
fn io_kind_text(error: &io::Error) -> Option<&'static str> {
    // Only errors that carry no message of their own (an OS error or a bare kind).
    if error.get_ref().is_some() {
        return None;
    }
    Some(match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused",
        io::ErrorKind::ConnectionReset => "connection reset by peer",
        io::ErrorKind::ConnectionAborted => "connection aborted",
        io::ErrorKind::NotConnected => "not connected",
        io::ErrorKind::BrokenPipe => "connection closed by peer (broken pipe)",
        io::ErrorKind::TimedOut => "timed out",
        io::ErrorKind::HostUnreachable => "host unreachable",
        io::ErrorKind::NetworkUnreachable => "network unreachable",
        io::ErrorKind::AddrNotAvailable => "address not available",
        io::ErrorKind::UnexpectedEof => "connection closed early",
        _ => return None,
    })
}

/// "Connection refused (os error 111)" -> "Connection refused".
fn strip_os_error_code(text: &str) -> &str {
    match text.rfind(" (os error ") {
        Some(index) if text.ends_with(')') => &text[..index],
        _ => text,
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Labelled(&'static str, Option<io::Error>);

    impl std::fmt::Display for Labelled {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl StdError for Labelled {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_ref().map(|error| error as _)
        }
    }

    #[test]
    fn endpoint_drops_userinfo_and_query() {
        let uri: Uri = "https://id:secret@auth.example:8443/oauth2/token?key=secret"
            .parse()
            .unwrap();
        assert_eq!(
            endpoint_for_display(&uri),
            "https://auth.example:8443/oauth2/token"
        );
    }

    #[test]
    fn innermost_cause_in_short_form() {
        let refused = Labelled(
            "tcp connect error",
            Some(io::Error::from(io::ErrorKind::ConnectionRefused)),
        );
        assert_eq!(short_cause(&refused), "connection refused");
        let os = io::Error::from_raw_os_error(104);
        if os.kind() == io::ErrorKind::ConnectionReset {
            assert_eq!(short_cause(&os), "connection reset by peer");
        }
        let dns = Labelled(
            "dns error",
            Some(io::Error::other(
                "failed to lookup address information: Name or service not known",
            )),
        );
        assert_eq!(short_cause(&dns), "dns error: no such host");
        let dns = Labelled(
            "dns error",
            Some(io::Error::other(
                "failed to lookup address information: Temporary failure in name resolution",
            )),
        );
        assert_eq!(
            short_cause(&dns),
            "dns error: temporary failure in name resolution"
        );
        let tls = Labelled(
            "client error (Connect)",
            Some(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            )),
        );
        assert_eq!(short_cause(&tls), "invalid peer certificate: UnknownIssuer");
        let proxy = Labelled(
            "tunnel error: failed to create underlying connection",
            Some(io::Error::from(io::ErrorKind::ConnectionRefused)),
        );
        assert_eq!(
            short_cause(&proxy),
            "proxy CONNECT failed: connection refused"
        );
        let proxy = Labelled("tunnel error: proxy authorization required", None);
        assert_eq!(
            short_cause(&proxy),
            "proxy CONNECT failed: proxy authorization required"
        );
        let forged = Labelled("line one\nline two", None);
        assert_eq!(short_cause(&forged), "line one\u{FFFD}line two");
    }
}
