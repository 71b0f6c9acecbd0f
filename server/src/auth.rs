//! Access tokens: Ed25519-signed (user, device, expiry), verifiable by any
//! shard without a lookup.
//!
//! Wire form: base64url (no padding) of 85 bytes:
//!
//! ```text
//! version:1 (=1) | user_id:u64 LE | device_id:u32 LE | expires_at_s:u64 LE | signature:64
//! ```
//!
//! The signature covers the first 21 bytes. The signing key lives in
//! `<data-dir>/keys/token-signing.key` (32 raw bytes, mode 0600), created on
//! first start.

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::path::Path;

const TOKEN_VERSION: u8 = 1;
const CLAIMS_BYTES: usize = 21;
const TOKEN_BYTES: usize = CLAIMS_BYTES + 64;
/// Longest base64 token text accepted; anything longer is refused unparsed.
pub const TOKEN_TEXT_BYTES_MAX: usize = 128;

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
    #[error("token key file {0} is not a 32-byte Ed25519 secret key")]
    BadKey(String),
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

/// Verifies tokens; what every shard holds. Public key only.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    /// The public key tokens must be signed for.
    verifying_key: VerifyingKey,
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
        let verifier = TokenVerifier { verifying_key: signing_key.verifying_key() };
        TokenAuthority { signing_key, verifier }
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
        let signature = Signature::from_slice(signature_bytes).map_err(|_| TokenError::Malformed)?;
        self.verifying_key.verify_strict(claims_bytes, &signature).map_err(|_| TokenError::BadSignature)?;
        let field = |range: std::ops::Range<usize>| &claims_bytes[range];
        // Lengths are fixed by the check on TOKEN_BYTES above.
        let claims = Claims {
            user_id: u64::from_le_bytes(field(1..9).try_into().expect("8 bytes")),
            device_id: u32::from_le_bytes(field(9..13).try_into().expect("4 bytes")),
            expires_at_s: u64::from_le_bytes(field(13..21).try_into().expect("8 bytes")),
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
        assert_eq!(other.verify(&token, 1), Err(TokenError::BadSignature));
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[1] ^= 1;
        let tampered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(authority.verify(&tampered, 1), Err(TokenError::BadSignature));
        assert_eq!(authority.verify("not a token!", 1), Err(TokenError::Malformed));
        assert_eq!(authority.verify(&"A".repeat(500), 1), Err(TokenError::Malformed));
    }
}
