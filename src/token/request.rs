//! The token request (RFC 6749 §4.4.2), built once from the configuration and cloned per send.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::{ClientAuthentication, OAuth2Config};
use crate::error::{Error, ErrorKind};

/// RFC 6749 §2.3.1 / Appendix B: everything but `A-Z a-z 0-9 - . _ ~` is percent-encoded, so
/// space becomes `%20` (never `+`), which form-decoding and percent-decoding servers read alike.
const CLIENT_CREDENTIAL_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const FORM_CONTENT_TYPE: HeaderValue =
    HeaderValue::from_static("application/x-www-form-urlencoded");
const JSON_ACCEPT: HeaderValue = HeaderValue::from_static("application/json");
/// RFC 9110 §12.5.3: without `Accept-Encoding` any coding is acceptable, and a gateway may gzip
/// the JSON reply. Only the identity coding is read.
const IDENTITY_ONLY: HeaderValue = HeaderValue::from_static("identity");

/// The parts of a token request that never change: computed once, cloned per request.
#[derive(Clone)]
pub(crate) struct TokenRequestTemplate {
    uri: Uri,
    /// `Basic ...`, marked sensitive; `None` for `client_secret_post`.
    authorization: Option<HeaderValue>,
    /// The form body; holds the `client_secret` for `client_secret_post`.
    body: Bytes,
}

impl TokenRequestTemplate {
    pub(crate) fn from_config(config: &OAuth2Config) -> Result<Self, Error> {
        let credentials = &config.credentials;
        let client_id = credentials.client_id();
        let client_secret = credentials.client_secret().expose_secret();

        let basic = |user: &str, password: &str| -> Result<Option<HeaderValue>, Error> {
            let encoded = BASE64.encode(format!("{user}:{password}"));
            let mut value = HeaderValue::try_from(format!("Basic {encoded}")).map_err(|_| {
                Error::new(ErrorKind::InvalidConfig(
                    "client credentials do not form a valid header".to_owned(),
                ))
            })?;
            value.set_sensitive(true);
            Ok(Some(value))
        };
        let form_encode =
            |value: &str| utf8_percent_encode(value, CLIENT_CREDENTIAL_ENCODE_SET).to_string();

        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        let authorization = match config.client_authentication {
            ClientAuthentication::BasicRaw => basic(client_id, client_secret)?,
            ClientAuthentication::BasicFormEncoded => {
                basic(&form_encode(client_id), &form_encode(client_secret))?
            }
            ClientAuthentication::RequestBody => {
                form.append_pair("client_id", client_id);
                form.append_pair("client_secret", client_secret);
                None
            }
        };
        if let Some(scope) = &config.scope {
            form.append_pair("scope", scope);
        }
        if let Some(audience) = &config.audience {
            form.append_pair("audience", audience);
        }
        if let Some(resource) = &config.resource {
            form.append_pair("resource", resource);
        }
        for (name, value) in &config.extra_parameters {
            form.append_pair(name, value);
        }
        Ok(Self {
            uri: config.token_endpoint.clone(),
            authorization,
            body: Bytes::from(form.finish()),
        })
    }

    /// A fresh token request: `POST`, form body, `Accept: application/json`,
    /// `Accept-Encoding: identity`, the client authentication of the configured style.
    pub(crate) fn build(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, FORM_CONTENT_TYPE);
        headers.insert(ACCEPT, JSON_ACCEPT);
        headers.insert(ACCEPT_ENCODING, IDENTITY_ONLY);
        if let Some(authorization) = &self.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        request
    }
}

impl std::fmt::Debug for TokenRequestTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequestTemplate")
            .field("uri", &crate::config::redacted_url(&self.uri.to_string()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientCredentials, OAuth2Config};

    fn request_for(style: ClientAuthentication) -> Request<Full<Bytes>> {
        let config = OAuth2Config::builder(ClientCredentials::new("my client", "p@ss:w+rd/%="))
            .token_endpoint("https://auth.example/oauth2/token")
            .client_authentication(style)
            .build()
            .unwrap();
        TokenRequestTemplate::from_config(&config).unwrap().build()
    }

    fn body(request: &Request<Full<Bytes>>) -> String {
        use http_body::Body as _;
        let frame = std::pin::pin!(request.body().clone())
            .poll_frame(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        match frame {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
            }
            _ => String::new(),
        }
    }

    #[test]
    fn each_client_authentication_style_sends_the_documented_bytes() {
        let raw = request_for(ClientAuthentication::BasicRaw);
        assert_eq!(
            raw.headers()[AUTHORIZATION],
            "Basic bXkgY2xpZW50OnBAc3M6dytyZC8lPQ=="
        );
        assert!(raw.headers()[AUTHORIZATION].is_sensitive());
        assert_eq!(body(&raw), "grant_type=client_credentials");

        let encoded = request_for(ClientAuthentication::BasicFormEncoded);
        assert_eq!(
            encoded.headers()[AUTHORIZATION],
            "Basic bXklMjBjbGllbnQ6cCU0MHNzJTNBdyUyQnJkJTJGJTI1JTNE"
        );
        assert_eq!(body(&encoded), "grant_type=client_credentials");

        let post = request_for(ClientAuthentication::RequestBody);
        assert!(post.headers().get(AUTHORIZATION).is_none());
        assert_eq!(
            body(&post),
            "grant_type=client_credentials&client_id=my+client&client_secret=p%40ss%3Aw%2Brd%2F%25%3D"
        );
    }

    #[test]
    fn debug_names_the_endpoint_without_its_query_and_never_the_credentials() {
        for style in [
            ClientAuthentication::RequestBody,
            ClientAuthentication::BasicRaw,
            ClientAuthentication::BasicFormEncoded,
        ] {
            let config =
                OAuth2Config::builder(ClientCredentials::new("my client", "s3cret-marker"))
                    .token_endpoint("https://auth.example/oauth2/token?key=query-marker")
                    .client_authentication(style)
                    .build()
                    .unwrap();
            let template = TokenRequestTemplate::from_config(&config).unwrap();
            let debug = format!("{template:?}");
            assert!(
                debug.starts_with("TokenRequestTemplate")
                    && debug.contains("https://auth.example/oauth2/token?<redacted>"),
                "{debug}"
            );
            let sent = template.build();
            let authorization = sent
                .headers()
                .get(AUTHORIZATION)
                .map(|value| value.to_str().unwrap().to_owned());
            for hidden in ["s3cret-marker", "query-marker", "Basic", "client_secret"]
                .into_iter()
                .chain(authorization.as_deref())
            {
                assert!(!debug.contains(hidden), "{hidden} in {debug}");
            }
        }
    }

    #[test]
    fn nuvy_environments_use_raw_basic_and_custom_endpoints_rfc_encoding() {
        let credentials = ClientCredentials::new("a b", "c");
        let nuvy = OAuth2Config::builder(credentials.clone()).build().unwrap();
        assert_eq!(nuvy.client_authentication, ClientAuthentication::BasicRaw);
        let custom = OAuth2Config::builder(credentials)
            .token_endpoint("https://auth.example/token")
            .build()
            .unwrap();
        assert_eq!(
            custom.client_authentication,
            ClientAuthentication::BasicFormEncoded
        );
    }
}
