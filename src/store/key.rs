//! [`StoreKey`]: which shared token a configuration uses.

use std::fmt;

use crate::config::OAuth2Config;

/// Identifies one shared token: the SHA-256 (hex, 64 characters) of everything that changes
/// the token a configuration gets: the token endpoint, the `client_id`, the `scope`,
/// `audience` and `resource`, and the extra parameters (names and values, in order). Two
/// layers with the same key share a token; the `client_secret` is never part of it (a rotated
/// secret still gets the same token), and nothing readable is.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey(String);

impl StoreKey {
    /// The key of `config`.
    pub fn for_config(config: &OAuth2Config) -> Self {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        // Length-prefixed fields, so that no two configurations hash the same input.
        let mut field = |tag: &str, value: Option<&str>| {
            digest.update(tag.as_bytes());
            match value {
                Some(value) => {
                    digest.update(&(value.len() as u64).to_be_bytes());
                    digest.update(value.as_bytes());
                }
                None => digest.update(b"-"),
            }
        };
        field(
            "v1 token_endpoint",
            Some(&config.token_endpoint.to_string()),
        );
        field("client_id", Some(config.credentials.client_id()));
        field("scope", config.scope.as_deref());
        field("audience", config.audience.as_deref());
        field("resource", config.resource.as_deref());
        for (name, value) in &config.extra_parameters {
            field("extra name", Some(name));
            field("extra value", Some(value));
        }
        let hash = digest.finish();
        Self(
            hash.as_ref()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect(),
        )
    }

    /// The key as 64 lowercase hex characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({})", self.0)
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientCredentials;

    fn key(secret: &str, scope: Option<&str>, extra: Option<(&str, &str)>) -> StoreKey {
        let mut builder = OAuth2Config::builder(ClientCredentials::new("client", secret))
            .token_endpoint("https://auth.example.com/token");
        if let Some(scope) = scope {
            builder = builder.scope(scope);
        }
        if let Some((name, value)) = extra {
            builder = builder.extra_parameter(name, value);
        }
        StoreKey::for_config(&builder.build().unwrap())
    }

    #[test]
    fn key_ignores_the_secret_and_changes_with_what_changes_the_token() {
        let base = key("secret-one", Some("read"), None);
        assert_eq!(base, key("secret-two", Some("read"), None));
        assert_ne!(base, key("secret-one", Some("write"), None));
        assert_ne!(base, key("secret-one", None, None));
        assert_ne!(base, key("secret-one", Some("read"), Some(("tenant", "a"))));
        assert_ne!(
            key("s", None, Some(("tenant", "a"))),
            key("s", None, Some(("tenant", "b")))
        );
        assert_eq!(base.as_str().len(), 64);
        assert!(!base.as_str().contains("client"));
    }
}
