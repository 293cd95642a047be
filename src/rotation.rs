//! Client secrets that change without a restart: [`SecretSource`], and the token request
//! template that follows it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tower::BoxError;

use crate::config::{check_credential, trim_line_breaks, OAuth2Config};
use crate::error::{Error, ErrorKind};
use crate::secret::ClientSecret;
use crate::token::TokenRequestTemplate;

type Callback = dyn Fn() -> Result<ClientSecret, BoxError> + Send + Sync;

/// Where a `client_secret` that may change comes from (the Nuvy authentication documentation
/// asks to rotate it periodically). Use it with [`crate::ClientCredentials::with_secret_source`].
///
/// - [`SecretSource::file`]: the content of a file (trailing line breaks removed), the way
///   Kubernetes mounts secrets. Read when the credentials are made; before each token request
///   the file's modification time and length are compared (one `stat`, never on the warm path)
///   and the file is read again when either changed.
/// - [`SecretSource::callback`]: your function (a secrets manager's cached value). Called when
///   the credentials are made.
///
/// Both are read again when the token endpoint rejects the client (`invalid_client`, RFC 6749
/// §5.2): if the secret changed, the token request is sent again at once with the new one,
/// within the same timeout, instead of pausing ([`crate::PERMANENT_FAILURE_PAUSE`]). A new
/// value that is empty or has characters outside printable ASCII is not used (logged at WARN);
/// the previous secret stays. `Debug` shows the file's path, never a secret.
#[derive(Clone)]
pub struct SecretSource {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    File(Arc<Path>),
    Callback(Arc<Callback>),
}

impl SecretSource {
    /// The secret is the content of the file at `path`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            kind: Kind::File(Arc::from(path.into())),
        }
    }

    /// The secret is what `callback` returns. It runs on the task that sends the token
    /// request, so it must not block for long.
    pub fn callback<F>(callback: F) -> Self
    where
        F: Fn() -> Result<ClientSecret, BoxError> + Send + Sync + 'static,
    {
        Self {
            kind: Kind::Callback(Arc::new(callback)),
        }
    }

    /// Reads the secret now, checked (non-empty, printable ASCII).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] when the file cannot be read as UTF-8 text or the callback
    /// fails (neither the path's content nor the callback's error text is shown, the error
    /// is kept as the source); [`ErrorKind::InvalidCredential`] for an unusable value.
    pub(crate) fn read(&self) -> Result<(ClientSecret, Option<FileStamp>), Error> {
        let (secret, stamp) = match &self.kind {
            Kind::File(path) => {
                let stamp = FileStamp::of(path);
                let content = std::fs::read_to_string(path).map_err(|error| {
                    Error::with_source(
                        ErrorKind::InvalidConfig(
                            "the client secret file cannot be read as UTF-8 text".to_owned(),
                        ),
                        Box::new(error),
                    )
                })?;
                (trim_line_breaks(&content).to_owned(), stamp)
            }
            Kind::Callback(callback) => {
                let secret = callback().map_err(|error| {
                    Error::with_source(
                        ErrorKind::InvalidConfig("the client secret callback failed".to_owned()),
                        error,
                    )
                })?;
                (secret.expose_secret().to_owned(), None)
            }
        };
        check_credential(&secret, "client_secret")?;
        Ok((ClientSecret::new(secret), stamp))
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::File(path) => f.debug_tuple("SecretSource::File").field(path).finish(),
            Kind::Callback(_) => f.write_str("SecretSource::Callback"),
        }
    }
}

/// What tells a changed file: its modification time and length.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: metadata.modified().ok(),
            len: metadata.len(),
        })
    }
}

/// The token request template of a configuration whose secret has a [`SecretSource`]:
/// rebuilt whenever the secret changes.
pub(crate) struct Rotation {
    source: SecretSource,
    config: OAuth2Config,
    state: Mutex<State>,
    template: ArcSwap<TokenRequestTemplate>,
}

struct State {
    secret: ClientSecret,
    stamp: Option<FileStamp>,
}

impl Rotation {
    /// `None` when the configuration's secret has no source.
    pub(crate) fn new(config: &OAuth2Config, template: Arc<TokenRequestTemplate>) -> Option<Self> {
        let source = config.credentials().secret_source()?.clone();
        let stamp = match &source.kind {
            Kind::File(path) => FileStamp::of(path),
            Kind::Callback(_) => None,
        };
        Some(Self {
            source,
            config: config.clone(),
            state: Mutex::new(State {
                secret: config.credentials().client_secret().clone(),
                stamp,
            }),
            template: ArcSwap::new(template),
        })
    }

    /// The template for the next token request: a file source whose file changed is read
    /// again first.
    pub(crate) fn template(&self) -> Arc<TokenRequestTemplate> {
        if let Kind::File(path) = &self.source.kind {
            let stamp = FileStamp::of(path);
            let changed = stamp.is_some() && self.lock().stamp != stamp;
            if changed {
                self.reload();
            }
        }
        self.template.load_full()
    }

    /// Reads the source again; returns whether the secret changed (and the template with it).
    pub(crate) fn reload(&self) -> bool {
        let (secret, stamp) = match self.source.read() {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(error = %error, "client secret source unusable; keeping the previous secret");
                return false;
            }
        };
        let mut state = self.lock();
        state.stamp = stamp;
        if state.secret.expose_secret() == secret.expose_secret() {
            return false;
        }
        match TokenRequestTemplate::from_config(&self.config.with_client_secret(secret.clone())) {
            Ok(template) => {
                self.template.store(Arc::new(template));
                state.secret = secret;
                tracing::info!("client secret changed: token requests use the new one");
                true
            }
            Err(error) => {
                tracing::warn!(error = %error, "new client secret unusable; keeping the previous one");
                false
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
