//! [`SealingKey`]: tokens at rest in a shared store are encrypted and authenticated.

use std::fmt;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::error::{Error, ErrorKind};

/// Marks a sealed value (version 1: ChaCha20-Poly1305, random 96-bit nonce).
const SEALED: &[u8] = b"s1";
/// Marks a plaintext value (a store built with `plaintext(true)`).
const PLAIN: &[u8] = b"p1";

/// The key that seals tokens stored in Redis: 32 bytes for ChaCha20-Poly1305 (RFC 8439, from
/// `ring`). Each value gets a random 96-bit nonce, and the Redis key it is stored under is
/// authenticated with it, so a value copied to another key does not open. Every process of a
/// fleet needs the same key; generate one with `openssl rand -base64 32`. `Debug` never shows
/// it.
#[derive(Clone)]
pub struct SealingKey {
    bytes: [u8; 32],
}

impl SealingKey {
    /// Exactly 32 bytes.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for any other length (the key itself is never printed).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::new(ErrorKind::InvalidConfig(format!(
                "a token store sealing key must be 32 bytes, not {}",
                bytes.len()
            )))
        })?;
        Ok(Self { bytes })
    }

    /// 32 bytes in standard base64 (RFC 4648 §4, padded), as `openssl rand -base64 32`
    /// prints them; surrounding whitespace is ignored.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] if it is not base64 or not 32 bytes.
    pub fn from_base64(encoded: &str) -> Result<Self, Error> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| {
                Error::new(ErrorKind::InvalidConfig(
                    "a token store sealing key must be base64 (RFC 4648 §4)".to_owned(),
                ))
            })?;
        Self::from_bytes(&bytes)
    }

    fn key(&self) -> LessSafeKey {
        // 32 bytes is ChaCha20-Poly1305's key length: this cannot fail.
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.bytes).expect("32-byte key"))
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

/// How values are kept: sealed with a key, or plaintext (chosen explicitly).
#[derive(Clone, Debug)]
pub(crate) enum Sealing {
    Key(SealingKey),
    Plaintext,
}

impl Sealing {
    /// The value to store for `plain` under the store key `context`. `None` if the system's
    /// random generator failed (nothing is stored then).
    pub(crate) fn seal(&self, context: &str, plain: &[u8]) -> Option<Vec<u8>> {
        match self {
            Sealing::Plaintext => Some([PLAIN, plain].concat()),
            Sealing::Key(key) => {
                let mut nonce = [0u8; NONCE_LEN];
                SystemRandom::new().fill(&mut nonce).ok()?;
                let mut in_out = plain.to_vec();
                key.key()
                    .seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(context.as_bytes()),
                        &mut in_out,
                    )
                    .ok()?;
                Some([SEALED, &nonce[..], &in_out].concat())
            }
        }
    }

    /// The plaintext of a stored value, or `None` (logged at WARN) if it does not open: made
    /// with another key (a key rotation), tampered with, or plaintext where a key is set.
    pub(crate) fn open(&self, context: &str, stored: &[u8]) -> Option<Vec<u8>> {
        let opened = match self {
            Sealing::Plaintext => stored.strip_prefix(PLAIN).map(<[u8]>::to_vec),
            Sealing::Key(key) => stored.strip_prefix(SEALED).and_then(|sealed| {
                let (nonce, ciphertext) = sealed.split_at_checked(NONCE_LEN)?;
                let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
                let mut in_out = ciphertext.to_vec();
                let plain = key
                    .key()
                    .open_in_place(nonce, Aad::from(context.as_bytes()), &mut in_out)
                    .ok()?;
                Some(plain.to_vec())
            }),
        };
        if opened.is_none() {
            tracing::warn!(
                "a token in the token store does not open with this process's sealing \
                 settings (another key, or plaintext): ignored"
            );
        }
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() {
        let key = Sealing::Key(SealingKey::from_bytes(&[7; 32]).unwrap());
        let other = Sealing::Key(SealingKey::from_bytes(&[8; 32]).unwrap());
        let sealed = key.seal("k1", b"token").unwrap();
        assert!(!sealed.windows(5).any(|window| window == b"token"));
        assert_eq!(key.open("k1", &sealed).unwrap(), b"token");
        assert!(key.open("k2", &sealed).is_none(), "bound to its key name");
        assert!(other.open("k1", &sealed).is_none(), "another key");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(key.open("k1", &tampered).is_none());
        let plain = Sealing::Plaintext.seal("k1", b"token").unwrap();
        assert!(
            key.open("k1", &plain).is_none(),
            "no plaintext where a key is set"
        );
        assert!(Sealing::Plaintext.open("k1", &sealed).is_none());
        assert_eq!(Sealing::Plaintext.open("k1", &plain).unwrap(), b"token");
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert!(SealingKey::from_bytes(&[0; 31]).is_err());
        assert!(SealingKey::from_base64("not base64!").is_err());
        let encoded = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let key = SealingKey::from_base64(&format!(" {encoded}\n")).unwrap();
        assert_eq!(format!("{key:?}"), "SealingKey(<redacted>)");
    }
}
