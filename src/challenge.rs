//! `WWW-Authenticate` challenges, parsed by the RFC 9110 §11.6.1 grammar, and the one question
//! this crate asks of them: is a 401 about the access token (RFC 6750 §3)?
//!
//! ```text
//! WWW-Authenticate = #challenge
//! challenge   = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
//! auth-scheme = token
//! auth-param  = token BWS "=" BWS ( token / quoted-string )
//! token68     = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
//! ```
//!
//! Several challenges may share one header line, and a response may carry several lines.
//! Scheme and parameter names are case-insensitive; quoted strings may hold commas, `=` and
//! quoted-pairs (`\"`). The parser works on bytes (obs-text is allowed in quoted strings), never
//! panics, and refuses a malformed line as a whole.

use std::borrow::Cow;

use http::header::WWW_AUTHENTICATE;
use http::HeaderMap;

/// One challenge: its scheme and either a token68 or its parameters (names lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge<'a> {
    pub(crate) scheme: &'a str,
    pub(crate) token68: Option<&'a str>,
    pub(crate) params: Vec<(String, Cow<'a, str>)>,
}

impl Challenge<'_> {
    /// The value of a parameter, by case-insensitive name.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_ref())
    }
}

/// Whether a 401 is about the access token (RFC 6750 §3), so a new token may help:
/// - no `WWW-Authenticate` at all, or none that parses (the Nuvy authentication documentation
///   treats any 401 as "get a fresh token"): yes, a plain 401;
/// - a `Bearer` challenge (any case) whose `error` is `invalid_token` (any case) or absent: yes;
///   an empty or blank `error=""` is no error code (RFC 6750 §3: `1*( %x20-21 / %x23-5B /
///   %x5D-7E )`), so it counts as absent;
/// - otherwise (a `Bearer` challenge with `insufficient_scope` or `invalid_request`, only
///   non-Bearer challenges): no, a new token would not help.
///
/// A malformed header line is ignored as if it were absent.
pub(crate) fn is_token_rejection(headers: &HeaderMap) -> bool {
    let mut any_challenge = false;
    for value in headers.get_all(WWW_AUTHENTICATE) {
        let Ok(challenges) = parse(value.as_bytes()) else {
            continue;
        };
        for challenge in &challenges {
            any_challenge = true;
            if challenge.scheme.eq_ignore_ascii_case("bearer")
                && challenge
                    .param("error")
                    .map(str::trim)
                    .filter(|error| !error.is_empty())
                    .is_none_or(|error| error.eq_ignore_ascii_case("invalid_token"))
            {
                return true;
            }
        }
    }
    !any_challenge
}

/// The line is not a list of challenges by the RFC 9110 §11.6.1 grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Parses one `WWW-Authenticate` field line into its challenges (empty list elements are
/// skipped, RFC 9110 §5.6.1). A duplicate parameter name within a challenge is malformed
/// (RFC 9110 §11.2: each parameter name only once).
pub(crate) fn parse(line: &[u8]) -> Result<Vec<Challenge<'_>>, Malformed> {
    let mut parser = Parser { line, pos: 0 };
    let mut challenges = Vec::new();
    loop {
        parser.skip_list_separators();
        if parser.at_end() {
            return Ok(challenges);
        }
        let scheme = parser.token().ok_or(Malformed)?;
        let mut challenge = Challenge {
            scheme,
            token68: None,
            params: Vec::new(),
        };
        let spaces = parser.skip(|byte| byte == b' ');
        match parser.peek() {
            None | Some(b',') => {
                challenges.push(challenge);
                continue;
            }
            _ if spaces == 0 => return Err(Malformed),
            _ => {}
        }
        if let Some(token68) = parser.token68() {
            challenge.token68 = Some(token68);
            challenges.push(challenge);
            continue;
        }
        // #auth-param: parameters until the next element that is not `name =`.
        loop {
            let (name, value) = parser.auth_param().ok_or(Malformed)?;
            let name = name.to_ascii_lowercase();
            if challenge.params.iter().any(|(key, _)| *key == name) {
                return Err(Malformed);
            }
            challenge.params.push((name, value));
            parser.skip_ows();
            if parser.at_end() {
                break;
            }
            if parser.peek() != Some(b',') {
                return Err(Malformed);
            }
            parser.skip_list_separators();
            if parser.at_end() || !parser.next_is_auth_param() {
                break;
            }
        }
        challenges.push(challenge);
    }
}

struct Parser<'a> {
    line: &'a [u8],
    pos: usize,
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn is_token68_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~+/".contains(&byte)
}

impl<'a> Parser<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.line.len()
    }

    fn peek(&self) -> Option<u8> {
        self.line.get(self.pos).copied()
    }

    fn skip(&mut self, mut matches: impl FnMut(u8) -> bool) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(&mut matches) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn skip_ows(&mut self) {
        self.skip(|byte| byte == b' ' || byte == b'\t');
    }

    fn skip_list_separators(&mut self) {
        self.skip(|byte| byte == b' ' || byte == b'\t' || byte == b',');
    }

    /// `token`: ASCII only, so the slice is valid UTF-8.
    fn token(&mut self) -> Option<&'a str> {
        let start = self.pos;
        if self.skip(is_tchar) == 0 {
            return None;
        }
        std::str::from_utf8(&self.line[start..self.pos]).ok()
    }

    /// `token68`, only when it is the whole rest of the challenge (followed by OWS and a comma
    /// or the end); otherwise the position is left unchanged.
    fn token68(&mut self) -> Option<&'a str> {
        let start = self.pos;
        if self.skip(is_token68_char) == 0 {
            return None;
        }
        self.skip(|byte| byte == b'=');
        let end = self.pos;
        self.skip_ows();
        if self.at_end() || self.peek() == Some(b',') {
            return std::str::from_utf8(&self.line[start..end]).ok();
        }
        self.pos = start;
        None
    }

    /// Whether the next list element is `token BWS "="` (a parameter of the current
    /// challenge) rather than the scheme of a new challenge. Leaves the position unchanged.
    fn next_is_auth_param(&mut self) -> bool {
        let start = self.pos;
        let is_param = self.token().is_some() && {
            self.skip_ows();
            self.peek() == Some(b'=')
        };
        self.pos = start;
        is_param
    }

    /// `token BWS "=" BWS ( token / quoted-string )`.
    fn auth_param(&mut self) -> Option<(&'a str, Cow<'a, str>)> {
        let name = self.token()?;
        self.skip_ows();
        if self.peek() != Some(b'=') {
            return None;
        }
        self.pos += 1;
        self.skip_ows();
        let value = if self.peek() == Some(b'"') {
            self.quoted_string()?
        } else {
            Cow::Borrowed(self.token()?)
        };
        Some((name, value))
    }

    /// `DQUOTE *( qdtext / quoted-pair ) DQUOTE`, unescaped. obs-text bytes are kept (read
    /// lossily as UTF-8).
    fn quoted_string(&mut self) -> Option<Cow<'a, str>> {
        self.pos += 1; // the opening quote
        let start = self.pos;
        let mut escaped = false;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.pos += 1;
                    let quoted = self.peek()?;
                    if !(quoted == b'\t' || quoted >= 0x20) || quoted == 0x7f {
                        return None;
                    }
                    self.pos += 1;
                }
                byte if byte == b'\t' || (byte >= 0x20 && byte != 0x7f) => self.pos += 1,
                _ => return None,
            }
        }
        let raw = &self.line[start..self.pos];
        self.pos += 1; // the closing quote
        if !escaped {
            return Some(String::from_utf8_lossy(raw));
        }
        let mut unescaped = Vec::with_capacity(raw.len());
        let mut bytes = raw.iter();
        while let Some(&byte) = bytes.next() {
            match byte {
                b'\\' => unescaped.extend(bytes.next()),
                byte => unescaped.push(byte),
            }
        }
        Some(Cow::Owned(String::from_utf8_lossy(&unescaped).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn rejected(lines: &[&[u8]]) -> bool {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(WWW_AUTHENTICATE, HeaderValue::from_bytes(line).unwrap());
        }
        is_token_rejection(&headers)
    }

    /// (header lines, is the 401 about the token?)
    const REJECTIONS: &[(&[&[u8]], bool)] = &[
        (&[], true),
        (&[b"Bearer"], true),
        (&[b"bearer"], true),
        (&[b"BEARER realm=\"nuvy\""], true),
        (&[b"Bearer realm=\"nuvy\", error=\"invalid_token\""], true),
        (&[b"Bearer error=invalid_token"], true),
        (&[b"Bearer ERROR=\"invalid_token\""], true),
        (&[b"Bearer error = \"invalid_token\""], true),
        (&[b"Bearer error=\"insufficient_scope\", scope=\"admin\""], false),
        (&[b"Bearer error=\"invalid_request\""], false),
        // An empty error is no error code: as if absent.
        (&[b"Bearer error=\"\""], true),
        (&[b"Bearer realm=\"x\", error=\" \""], true),
        (&[b"Bearer error=\"\", Basic realm=\"x\""], true),
        (&[b"Bearer error=\" invalid_token \""], true),
        (&[b"Bearer error=\"\xff\""], false),
        (&[b"Bearer abc=, error=\"insufficient_scope\""], true),
        (&[b"Negotiate abc=, Bearer error=\"insufficient_scope\""], false),
        (&[b"Bearer error=invalid_token, Bearer error=insufficient_scope"], true),
        (&[b"Bearer realm=\"a\"error=\"insufficient_scope\""], true),
        (&[b" ,\t, "], true),
        // A comma and `error=` inside a quoted string are text, not a parameter.
        (&[b"Bearer realm=\"a, error=x\", error=\"invalid_token\""], true),
        (&[b"Bearer realm=\"a, error=invalid_token\", error=\"insufficient_scope\""], false),
        (&[b"Bearer realm=\"a\\\", error=invalid_token\", error=\"invalid_request\""], false),
        (&[b"Bearer error=\"in\\valid_token\""], true),
        // Several challenges on one line, and across lines.
        (&[b"Basic realm=\"x\", Bearer error=\"invalid_token\""], true),
        (&[b"Basic realm=\"x\", Bearer"], true),
        (&[b"Bearer error=\"insufficient_scope\", Basic realm=\"x\""], false),
        (&[b"Basic realm=\"x\"", b"Bearer"], true),
        (&[b"Basic realm=\"x\"", b"Bearer error=\"insufficient_scope\""], false),
        (&[b"Newauth realm=\"apps\", type=1, title=\"Login to \\\"apps\\\"\", Basic realm=\"simple\""], false),
        (&[b"Negotiate abc==, Bearer error=invalid_token"], true),
        (&[b"Basic dXNlcjpwYXNz", b"Bearer realm=x"], true),
        (&[b"Basic realm=\"x\""], false),
        (&[b"BearerX realm=\"x\""], false),
        (&[b"DPoP error=\"invalid_token\""], false),
        (&[b", , Bearer ,"], true),
        (&[b"Bearer realm=\"caf\xe9\""], true),
        // Malformed lines: ignored, so with nothing else they are a plain 401.
        (&[b"Bearer realm=\"unterminated"], true),
        (&[b"Bearer error=\"insufficient_scope"], true),
        (&[b"Bearer error=\"insufficient_scope\" garbage"], true),
        (&[b"Bearer =x"], true),
        (&[b"=Bearer"], true),
        (&[b"\"Bearer\""], true),
        (&[b"Bearer error=\"insufficient_scope\", error=\"invalid_token\""], true),
        (&[b"Bearer error="], true),
        (&[b"Bearer,,error=\"insufficient_scope\""], true),
        (&[b"Bearer\terror=\"insufficient_scope\""], true),
        (&[b"Bearer realm=\"x\\"], true),
        (&[b"{}"], true),
        (&[b"Basic realm=\"x\"", b"Bearer error=\"insufficient_scope"], false),
        (&[b"Bearer error=\"insufficient_scope\"", b"Bearer realm=\"x"], false),
    ];

    #[test]
    fn challenges_follow_the_rfc_9110_grammar() {
        assert!(REJECTIONS.len() >= 20);
        for (lines, expected) in REJECTIONS {
            let printable: Vec<_> = lines
                .iter()
                .map(|line| String::from_utf8_lossy(line))
                .collect();
            assert_eq!(rejected(lines), *expected, "{printable:?}");
        }
    }

    #[test]
    fn parameters_and_token68_are_read_exactly() {
        let challenges = parse(
            b"Newauth realm=\"apps\", type=1, title=\"Login to \\\"apps\\\"\", Basic realm=\"simple\"",
        )
        .unwrap();
        assert_eq!(challenges.len(), 2);
        assert_eq!(challenges[0].scheme, "Newauth");
        assert_eq!(challenges[0].param("REALM"), Some("apps"));
        assert_eq!(challenges[0].param("type"), Some("1"));
        assert_eq!(challenges[0].param("title"), Some("Login to \"apps\""));
        assert_eq!(challenges[1].scheme, "Basic");
        assert_eq!(challenges[1].param("realm"), Some("simple"));

        let challenges = parse(b"Negotiate a87421000492aa874209af8bc028==, Bearer").unwrap();
        assert_eq!(
            challenges[0].token68,
            Some("a87421000492aa874209af8bc028==")
        );
        assert!(challenges[0].params.is_empty());
        assert_eq!(challenges[1].scheme, "Bearer");

        let challenges = parse(b"Bearer realm=\"a, error=x\", error=\"invalid_token\"").unwrap();
        assert_eq!(challenges.len(), 1);
        assert_eq!(challenges[0].param("realm"), Some("a, error=x"));
        assert_eq!(challenges[0].param("error"), Some("invalid_token"));
        assert_eq!(parse(b"").unwrap(), Vec::new());
    }

    #[test]
    fn no_input_panics_the_parser() {
        // Every short line over an alphabet of the grammar's delimiters.
        let alphabet: &[u8] = b"Ba =\",\\ \t\x80";
        let mut line = Vec::new();
        for length in 0..=6u32 {
            for mut index in 0..alphabet.len().pow(length) {
                line.clear();
                for _ in 0..length {
                    line.push(alphabet[index % alphabet.len()]);
                    index /= alphabet.len();
                }
                let _ = parse(&line);
            }
        }
    }
}
