//! Access tokens: Ed25519-signed (user, device, expiry), verifiable by any
//! shard without a lookup, naming the key that signed them so keys can be
//! rotated.
//!
//! Wire form: base64url (no padding) of 89 bytes:
//!
//! ```text
//! version:1 (=2) | key_id:u32 LE | user_id:u64 LE | device_id:u32 LE | expires_at_s:u64 LE | signature:64
//! ```
//!
//! The signature covers the first 25 bytes. `key_id` is the first four bytes
//! (LE) of the SHA-256 of the signing key's public key. The current signing
//! key lives in `<data-dir>/keys/token-signing.key` (32 raw bytes, mode
//! 0600), created on first start; `irisd rotate-token-key` replaces it and
//! keeps the old public key in `<data-dir>/keys/token-retired/<key_id>.pub`,
//! so tokens it signed still verify until an operator deletes that file.
//! Version 1 tokens (no key id) are refused.

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::path::Path;

const TOKEN_VERSION: u8 = 2;
const CLAIMS_BYTES: usize = 25;
const TOKEN_BYTES: usize = CLAIMS_BYTES + 64;
/// Longest base64 token text accepted; anything longer is refused unparsed.
pub const TOKEN_TEXT_BYTES_MAX: usize = 128;
/// Retired public keys a verifier accepts besides the current one: enough
/// for a rotation every day with 30-day tokens, few enough that a lookup
/// is a short scan.
pub const RETIRED_KEYS_MAX: usize = 64;

/// The id a token carries for the key that signed it.
pub fn key_id(key: &VerifyingKey) -> u32 {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let bytes: [u8; 4] = digest.as_ref()[..4].try_into().expect("SHA-256 has 32 bytes");
    u32::from_le_bytes(bytes)
}

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The user the token was minted for.
    pub user_id: u64,
    /// The device of that user.
    pub device_id: u32,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at_s: u64,
}

/// Why a token was refused. All are caused by the client.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// Not base64url, wrong length or wrong version.
    #[error("token is malformed")]
    Malformed,
    /// The signature does not verify with this server's key.
    #[error("token signature is invalid")]
    BadSignature,
    /// Signed by a key this server does not know (or no longer accepts).
    #[error("token signed by unknown key {key_id:08x}")]
    UnknownKey {
        /// The key id the token names.
        key_id: u32,
    },
    /// The expiry has passed.
    #[error("token expired at {expires_at_s}")]
    Expired {
        /// When it expired, seconds since the Unix epoch.
        expires_at_s: u64,
    },
}

/// Errors loading or creating the key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing the key file failed.
    #[error("token key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not 32 bytes.
    #[error("token key file {0} is not a 32-byte Ed25519 key")]
    BadKey(String),
    /// More retired keys than [`RETIRED_KEYS_MAX`].
    #[error("{dir} holds more than {RETIRED_KEYS_MAX} retired token keys; delete those older than the longest token lifetime")]
    TooManyRetired {
        /// The directory of retired keys.
        dir: String,
    },
}

/// Mints tokens (`irisd token`, tests). Holds the secret key: the shards
/// get only a [`TokenVerifier`] (decision 0005).
#[derive(Debug, Clone)]
pub struct TokenAuthority {
    /// Secret key (zeroed on drop by ed25519-dalek).
    signing_key: SigningKey,
    /// The verifier for the derived public key.
    verifier: TokenVerifier,
}

/// Verifies tokens; what every shard holds. Public keys only: the current
/// one and retired ones still accepted.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    /// (key id, public key), current first.
    keys: Vec<(u32, VerifyingKey)>,
}

impl TokenAuthority {
    /// Loads the key at `path`, creating it if `create` and it does not exist.
    pub fn load_or_create(path: &Path, create: bool) -> Result<(TokenAuthority, bool), KeyFileError> {
        match crate::files::load_or_create_secret(path, create) {
            Ok((secret, created)) => Ok((TokenAuthority::from_secret(secret), created)),
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                Err(KeyFileError::BadKey(path.display().to_string()))
            }
            Err(source) => Err(KeyFileError::Io { path: path.display().to_string(), source }),
        }
    }

    /// An authority from a raw secret key.
    pub fn from_secret(secret: [u8; 32]) -> TokenAuthority {
        let signing_key = SigningKey::from_bytes(&secret);
        let current = signing_key.verifying_key();
        let verifier = TokenVerifier { keys: vec![(key_id(&current), current)] };
        TokenAuthority { signing_key, verifier }
    }

    /// Also accepts tokens signed by the retired keys in `dir`
    /// (`<key_id>.pub`, 32 raw bytes each); a missing directory is none.
    pub fn accept_retired(&mut self, dir: &Path) -> Result<usize, KeyFileError> {
        let io = |source| KeyFileError::Io { path: dir.display().to_string(), source };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(io(error)),
        };
        let mut added = 0;
        for entry in entries {
            let path = entry.map_err(io)?.path();
            if path.extension().is_none_or(|extension| extension != "pub") {
                continue;
            }
            let bad = || KeyFileError::BadKey(path.display().to_string());
            let bytes =
                std::fs::read(&path).map_err(|source| KeyFileError::Io { path: path.display().to_string(), source })?;
            let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| bad())?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
            let id = key_id(&key);
            if self.verifier.keys.iter().any(|(known, _)| *known == id) {
                continue;
            }
            if self.verifier.keys.len() > RETIRED_KEYS_MAX {
                return Err(KeyFileError::TooManyRetired { dir: dir.display().to_string() });
            }
            self.verifier.keys.push((id, key));
            added += 1;
        }
        Ok(added)
    }

    /// The id of the current signing key.
    pub fn key_id(&self) -> u32 {
        self.verifier.keys[0].0
    }

    /// The current public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing_key.verifying_key().to_bytes()
    }

    /// The verifier for this authority's tokens (no secret in it).
    pub fn verifier(&self) -> TokenVerifier {
        self.verifier.clone()
    }

    /// Verifies `token` at `now_s` (see [`TokenVerifier::verify`]).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        self.verifier.verify(token, now_s)
    }

    /// Mints a token for `claims`.
    pub fn mint(&self, claims: Claims) -> String {
        let mut bytes = Vec::with_capacity(TOKEN_BYTES);
        bytes.push(TOKEN_VERSION);
        bytes.extend_from_slice(&self.key_id().to_le_bytes());
        bytes.extend_from_slice(&claims.user_id.to_le_bytes());
        bytes.extend_from_slice(&claims.device_id.to_le_bytes());
        bytes.extend_from_slice(&claims.expires_at_s.to_le_bytes());
        let signature = self.signing_key.sign(&bytes);
        bytes.extend_from_slice(&signature.to_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}

impl TokenVerifier {
    /// Verifies `token` at wall-clock time `now_s` (seconds since the epoch).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        if token.len() > TOKEN_TEXT_BYTES_MAX {
            return Err(TokenError::Malformed);
        }
        let bytes =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| TokenError::Malformed)?;
        if bytes.len() != TOKEN_BYTES || bytes[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        let (claims_bytes, signature_bytes) = bytes.split_at(CLAIMS_BYTES);
        let field = |range: std::ops::Range<usize>| &claims_bytes[range];
        // Lengths are fixed by the check on TOKEN_BYTES above.
        let key_id = u32::from_le_bytes(field(1..5).try_into().expect("4 bytes"));
        let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == key_id) else {
            return Err(TokenError::UnknownKey { key_id });
        };
        let signature = Signature::from_slice(signature_bytes).map_err(|_| TokenError::Malformed)?;
        key.verify_strict(claims_bytes, &signature).map_err(|_| TokenError::BadSignature)?;
        let claims = Claims {
            user_id: u64::from_le_bytes(field(5..13).try_into().expect("8 bytes")),
            device_id: u32::from_le_bytes(field(13..17).try_into().expect("4 bytes")),
            expires_at_s: u64::from_le_bytes(field(17..25).try_into().expect("8 bytes")),
        };
        if claims.expires_at_s <= now_s {
            return Err(TokenError::Expired { expires_at_s: claims.expires_at_s });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_reject_tampering_expiry_and_foreign_keys() {
        let authority = TokenAuthority::from_secret([7; 32]);
        let claims = Claims { user_id: 42, device_id: 3, expires_at_s: 1000 };
        let token = authority.mint(claims);
        assert_eq!(authority.verify(&token, 999), Ok(claims));
        assert_eq!(authority.verify(&token, 1000), Err(TokenError::Expired { expires_at_s: 1000 }));
        let other = TokenAuthority::from_secret([8; 32]);
        assert_eq!(other.verify(&token, 1), Err(TokenError::UnknownKey { key_id: authority.key_id() }));
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&token).unwrap();
        // Another key's id on this token: that key's check fails.
        raw[1..5].copy_from_slice(&other.key_id().to_le_bytes());
        let relabelled = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(other.verify(&relabelled, 1), Err(TokenError::BadSignature));
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[6] ^= 1;
        let tampered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(authority.verify(&tampered, 1), Err(TokenError::BadSignature));
        assert_eq!(authority.verify("not a token!", 1), Err(TokenError::Malformed));
        assert_eq!(authority.verify(&"A".repeat(500), 1), Err(TokenError::Malformed));
        // A version 1 token (no key id) of the same key.
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&42u64.to_le_bytes());
        v1.extend_from_slice(&3u32.to_le_bytes());
        v1.extend_from_slice(&1000u64.to_le_bytes());
        v1.extend_from_slice(&authority.signing_key.sign(&v1).to_bytes());
        let v1 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v1);
        assert_eq!(authority.verify(&v1, 1), Err(TokenError::Malformed));
    }

    #[test]
    fn a_rotated_key_keeps_its_tokens_valid_until_its_public_key_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let retired = dir.path().join("token-retired");
        let old = TokenAuthority::from_secret([1; 32]);
        let claims = Claims { user_id: 5, device_id: 1, expires_at_s: 100 };
        let old_token = old.mint(claims);
        std::fs::create_dir(&retired).unwrap();
        std::fs::write(retired.join(format!("{:08x}.pub", old.key_id())), old.public_key()).unwrap();
        let mut new = TokenAuthority::from_secret([2; 32]);
        assert_eq!(new.accept_retired(&retired).unwrap(), 1);
        let new_token = new.mint(claims);
        assert_eq!(new.verifier().verify(&old_token, 1), Ok(claims), "a token of the retired key");
        assert_eq!(new.verifier().verify(&new_token, 1), Ok(claims));
        // Retirement ends when the operator deletes the public key.
        std::fs::remove_file(retired.join(format!("{:08x}.pub", old.key_id()))).unwrap();
        let mut fresh = TokenAuthority::from_secret([2; 32]);
        assert_eq!(fresh.accept_retired(&retired).unwrap(), 0);
        assert_eq!(fresh.verify(&old_token, 1), Err(TokenError::UnknownKey { key_id: old.key_id() }));
        // A file that is not a public key is refused with its name.
        std::fs::write(retired.join("bad.pub"), [0u8; 5]).unwrap();
        let error = fresh.accept_retired(&retired).unwrap_err().to_string();
        assert!(error.contains("bad.pub"), "{error}");
    }
}
