//! Credential hygiene and configuration that can only fail (RFC 6749 Appendix A and §3.3,
//! RFC 7617 §2): refused when the configuration is built, with an error that names the setting
//! or variable and the position, never the value. Alone in its binary because it sets
//! environment variables.

mod common;

use common::*;
use nuvy_oauth2::{ClientAuthentication, ClientCredentials, ErrorKind, OAuth2Config};
use std::time::Duration;

const MARKER: &str = "Zq9MARKERq9Z";

fn build(
    id: &str,
    secret: &str,
    style: Option<ClientAuthentication>,
) -> Result<OAuth2Config, nuvy_oauth2::Error> {
    let mut builder = OAuth2Config::builder(ClientCredentials::new(id, secret))
        .token_endpoint("https://auth.example/oauth2/token");
    if let Some(style) = style {
        builder = builder.client_authentication(style);
    }
    builder.build()
}

/// (client_id, client_secret, setting named, 1-based position named)
#[test]
fn credentials_outside_printable_ascii_are_refused_naming_setting_and_position() {
    let cases: &[(&str, &str, &str, Option<usize>)] = &[
        ("id", "", "client_secret", None),
        ("", "secret", "client_id", None),
        ("id", "s3cret\n", "client_secret", Some(7)),
        ("id", "s3cret\r\n", "client_secret", Some(7)),
        ("id", "\ns3cret", "client_secret", Some(1)),
        ("id", "s3\tcret", "client_secret", Some(3)),
        ("id", "s3cr\u{0}t", "client_secret", Some(5)),
        ("id", "s3cr\u{7f}t", "client_secret", Some(5)),
        ("id", "sécret", "client_secret", Some(2)),
        ("id", "secret\u{a0}", "client_secret", Some(7)),
        ("id", "secret\u{200b}", "client_secret", Some(7)),
        ("id", "🔑secret", "client_secret", Some(1)),
        ("id\n", "secret", "client_id", Some(3)),
        ("cliént", "secret", "client_id", Some(4)),
        ("id\u{1b}[31m", "secret", "client_id", Some(3)),
        ("   ", "secret", "client_id", None),
    ];
    for &(id, secret, setting, position) in cases {
        for style in [
            ClientAuthentication::BasicRaw,
            ClientAuthentication::BasicFormEncoded,
            ClientAuthentication::RequestBody,
        ] {
            // The marker after the value: it shifts no position and must never be printed.
            let marked = match secret {
                "" => String::new(),
                secret => format!("{secret}{MARKER}"),
            };
            let error = build(id, &marked, Some(style)).map(|_| ()).unwrap_err();
            match error.kind() {
                ErrorKind::InvalidCredential {
                    setting: named,
                    position: at,
                    ..
                } => {
                    assert_eq!(*named, setting, "{id:?}/{secret:?}: {error}");
                    assert_eq!(*at, position, "{id:?}/{secret:?}: {error}");
                }
                other => panic!("{id:?}/{secret:?}: {other:?}"),
            }
            let text = format!("{error} {error:?}");
            assert!(text.contains(setting), "{text}");
            assert!(!text.contains(MARKER), "the value leaked: {text}");
            assert!(!text.contains("s3c"), "{text}");
        }
    }
    // Only spaces: printable, but blank, in either value.
    for (id, secret, setting) in [
        ("id", " ", "client_secret"),
        ("id", "    ", "client_secret"),
        ("   ", "secret", "client_id"),
    ] {
        let error = build(id, secret, None).map(|_| ()).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                ErrorKind::InvalidCredential { setting: named, position: None, .. } if *named == setting
            ),
            "{id:?}/{secret:?}: {error:?}"
        );
    }
    // Every printable ASCII character is fine, in both values, in every style but BasicRaw's
    // colon rule.
    let printable: String = (0x20u8..=0x7e).map(char::from).collect();
    build("id", &printable, Some(ClientAuthentication::BasicRaw)).unwrap();
    build(
        &printable,
        &printable,
        Some(ClientAuthentication::BasicFormEncoded),
    )
    .unwrap();
    build(
        &printable,
        &printable,
        Some(ClientAuthentication::RequestBody),
    )
    .unwrap();
}

#[test]
fn a_colon_in_the_client_id_is_refused_for_raw_basic_only() {
    for (id, position) in [
        ("urn:client", 4),
        (":leading", 1),
        ("trailing:", 9),
        ("a:b:c", 2),
    ] {
        let error = build(id, "secret", Some(ClientAuthentication::BasicRaw)).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                ErrorKind::InvalidCredential {
                    setting: "client_id",
                    position: Some(at),
                    ..
                } if *at == position
            ),
            "{id}: {error:?}"
        );
        assert!(error.to_string().contains("BasicFormEncoded"), "{error}");
        // The Nuvy environments default to BasicRaw: refused there too.
        let error = OAuth2Config::builder(ClientCredentials::new(id, "secret"))
            .build()
            .unwrap_err();
        assert!(matches!(error.kind(), ErrorKind::InvalidCredential { .. }));
        build(id, "secret", Some(ClientAuthentication::BasicFormEncoded)).unwrap();
        build(id, "secret", Some(ClientAuthentication::RequestBody)).unwrap();
        build(id, "secret", None).unwrap(); // custom endpoint: form-encoded by default
    }
    // A colon in the secret is fine: only the first colon splits (RFC 7617 §2).
    build("id", "se:cr:et", Some(ClientAuthentication::BasicRaw)).unwrap();
}

#[test]
fn scopes_that_break_rfc_6749_section_3_3_are_refused() {
    let with_scope = |scope: &str| {
        OAuth2Config::builder(ClientCredentials::new("id", "secret"))
            .token_endpoint("https://auth.example/oauth2/token")
            .scope(scope)
            .build()
    };
    for scope in [
        "",
        " ",
        "read ",
        " read",
        "read  write",
        "read\twrite",
        "read\nwrite",
        "read\"",
        "read\\write",
        "lecture:é",
        "\u{0}",
    ] {
        let error = with_scope(scope).unwrap_err();
        assert!(
            matches!(error.kind(), ErrorKind::InvalidConfig(text) if text.contains("scope")),
            "{scope:?}: {error:?}"
        );
    }
    for scope in [
        "read",
        "read write",
        "api:read api:write",
        "https://api.example/.default",
        "!#$%&'()*+,-./:;<=>?@[]^_`{|}~",
    ] {
        with_scope(scope).unwrap_or_else(|error| panic!("{scope:?}: {error}"));
    }
    for (audience, resource) in [(Some(""), None), (None, Some("")), (None, Some("relative"))] {
        let mut builder = OAuth2Config::builder(ClientCredentials::new("id", "secret"));
        if let Some(audience) = audience {
            builder = builder.audience(audience);
        }
        if let Some(resource) = resource {
            builder = builder.resource(resource);
        }
        assert!(matches!(
            builder.build().unwrap_err().kind(),
            ErrorKind::InvalidConfig(_)
        ));
    }
    let error = OAuth2Config::builder(ClientCredentials::new("id", "secret"))
        .extra_parameter("", "x")
        .build()
        .unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::InvalidConfig(_)));
}

/// Environment variables are process-wide: one test covers them all, in sequence. Trailing line
/// breaks are removed; the request then authenticates against the embedded server.
#[tokio::test]
async fn trailing_line_breaks_from_the_environment_or_a_file_are_removed() {
    let server = server(Duration::from_secs(60)).await;
    std::env::remove_var("NUVY_CLIENT_SECRET_FILE");
    let dir = std::env::temp_dir().join(format!("nuvy-oauth2-hygiene-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for suffix in ["\n", "\r\n", "\n\n", "\r", ""] {
        std::env::set_var("NUVY_CLIENT_ID", format!("{}{suffix}", server.client_id()));
        // From the variable.
        std::env::set_var(
            "NUVY_CLIENT_SECRET",
            format!("{}{suffix}", server.client_secret()),
        );
        let from_var = ClientCredentials::from_env().unwrap();
        // From a file, as `echo secret > file` writes it.
        std::env::remove_var("NUVY_CLIENT_SECRET");
        let file = dir.join("secret");
        std::fs::write(&file, format!("{}{suffix}", server.client_secret())).unwrap();
        std::env::set_var("NUVY_CLIENT_SECRET_FILE", &file);
        let from_file = ClientCredentials::from_env().unwrap();
        std::env::remove_var("NUVY_CLIENT_SECRET_FILE");
        for credentials in [from_var, from_file] {
            assert_eq!(credentials.client_id(), server.client_id());
            assert_eq!(
                credentials.client_secret().expose_secret(),
                server.client_secret()
            );
            let config = OAuth2Config::builder(credentials)
                .token_endpoint(server.token_endpoint())
                .allow_insecure_http(true)
                .build()
                .unwrap();
            let layer = nuvy_oauth2::OAuth2Layer::new(config).unwrap();
            let status = status_of(api(&layer), get(&server.api_url("/v1/ping")))
                .await
                .unwrap();
            assert_eq!(status, 200, "suffix {suffix:?}");
        }
    }
    // Anything but a trailing line break stays, and is refused naming the variable.
    std::env::set_var("NUVY_CLIENT_SECRET", format!("{MARKER}\tx\n"));
    let error = OAuth2Config::from_env().unwrap_err();
    assert!(
        matches!(
            error.kind(),
            ErrorKind::InvalidCredential {
                setting: "NUVY_CLIENT_SECRET",
                position: Some(13),
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!format!("{error} {error:?}").contains(MARKER));
    std::env::set_var("NUVY_CLIENT_SECRET", "\n");
    let error = ClientCredentials::from_env().unwrap_err();
    assert_eq!(
        error.kind(),
        &ErrorKind::MissingEnvVar {
            name: "NUVY_CLIENT_SECRET"
        }
    );
    std::env::remove_var("NUVY_CLIENT_SECRET");
    std::env::set_var("NUVY_CLIENT_SECRET_FILE", dir.join("absent"));
    let error = ClientCredentials::from_env().unwrap_err();
    assert!(matches!(
        error.kind(),
        ErrorKind::InvalidEnvVar {
            name: "NUVY_CLIENT_SECRET_FILE",
            ..
        }
    ));
    // A value that is not even UTF-8 (a Latin-1 export) is a character outside printable
    // ASCII too: named by variable and position, not reported as "not set".
    #[cfg(unix)]
    {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let invalid_credential = |error: nuvy_oauth2::Error| match error.kind() {
            ErrorKind::InvalidCredential {
                setting, position, ..
            } => {
                assert!(!format!("{error} {error:?}").contains("s3c"), "{error}");
                (*setting, *position)
            }
            other => panic!("{other:?}"),
        };
        std::env::remove_var("NUVY_CLIENT_SECRET_FILE");
        std::env::set_var("NUVY_CLIENT_SECRET", OsStr::from_bytes(b"s3c\xe9ret"));
        assert_eq!(
            invalid_credential(ClientCredentials::from_env().unwrap_err()),
            ("NUVY_CLIENT_SECRET", Some(4))
        );
        std::env::remove_var("NUVY_CLIENT_SECRET");
        let file = dir.join("latin1");
        std::fs::write(&file, b"s3cr\xe9t\n").unwrap();
        std::env::set_var("NUVY_CLIENT_SECRET_FILE", &file);
        assert_eq!(
            invalid_credential(ClientCredentials::from_env().unwrap_err()),
            ("NUVY_CLIENT_SECRET_FILE", Some(5))
        );
        std::env::set_var("NUVY_CLIENT_ID", OsStr::from_bytes(b"\xffid"));
        assert_eq!(
            invalid_credential(ClientCredentials::from_env().unwrap_err()),
            ("NUVY_CLIENT_ID", Some(1))
        );
        std::env::remove_var("NUVY_CLIENT_SECRET_FILE");
        std::env::remove_var("NUVY_CLIENT_ID");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
