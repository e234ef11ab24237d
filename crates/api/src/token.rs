//! Macaroon-style access tokens: an identifier, a chain of caveats, and a signature that
//! is HMAC-SHA256 chained over the identifier then each caveat in order. Anyone holding a
//! token can add caveats (attenuate it) offline; only the issuer, who knows the root key,
//! can verify it; nobody can remove a caveat without breaking the chain.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const TOKEN_PREFIX: &str = "fm1_";

/// A restriction carried by a token. Every caveat must hold for a request to pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Caveat {
    /// Only these apps (by name).
    Apps(Vec<String>),
    /// No writes.
    ReadOnly,
    /// Not valid at or after this Unix time (seconds).
    ExpiresAt(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Wire {
    #[serde(rename = "i")]
    id: String,
    #[serde(rename = "c", default)]
    caveats: Vec<Caveat>,
    #[serde(rename = "s")]
    signature: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub caveats: Vec<Caveat>,
    signature: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token signature is invalid")]
    BadSignature,
}

/// Whether two secrets (signatures, tokens, nonces) are equal, in time that depends only
/// on their lengths, so a caller can't learn a secret byte by byte from response times.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn chain(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn caveat_bytes(caveat: &Caveat) -> Vec<u8> {
    serde_json::to_vec(caveat).unwrap_or_default()
}

impl Token {
    /// Mints a token with `root_key` (known only to the issuer).
    pub fn mint(id: &str, root_key: &[u8], caveats: Vec<Caveat>) -> Self {
        let mut token = Token {
            id: id.to_string(),
            caveats: Vec::new(),
            signature: chain(root_key, id.as_bytes()),
        };
        for caveat in caveats {
            token = token.attenuate(caveat);
        }
        token
    }

    /// Adds a caveat; needs no key.
    pub fn attenuate(mut self, caveat: Caveat) -> Self {
        self.signature = chain(&self.signature, &caveat_bytes(&caveat));
        self.caveats.push(caveat);
        self
    }

    /// Checks the signature chain against the issuer's root key.
    pub fn verify(&self, root_key: &[u8]) -> Result<(), TokenError> {
        let mut signature = chain(root_key, self.id.as_bytes());
        for caveat in &self.caveats {
            signature = chain(&signature, &caveat_bytes(caveat));
        }
        if constant_time_eq(&signature, &self.signature) {
            Ok(())
        } else {
            Err(TokenError::BadSignature)
        }
    }

    pub fn encode(&self) -> String {
        let wire = Wire {
            id: self.id.clone(),
            caveats: self.caveats.clone(),
            signature: hex::encode(self.signature),
        };
        let json = serde_json::to_vec(&wire).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses a token as written by `encode`, with or without a `Bearer `/`FlyV1 ` scheme.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let text = text
            .strip_prefix("FlyV1 ")
            .or_else(|| text.strip_prefix("Bearer "))
            .unwrap_or(text);
        let body = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed("missing fm1_ prefix"))?;
        if body.len() > 16 * 1024 {
            return Err(TokenError::Malformed("too long"));
        }
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed("not base64url"))?;
        let wire: Wire = serde_json::from_slice(&json)
            .map_err(|_| TokenError::Malformed("not a token document"))?;
        let bytes = hex::decode(&wire.signature)
            .map_err(|_| TokenError::Malformed("signature is not hex"))?;
        let signature: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TokenError::Malformed("signature has the wrong length"))?;
        Ok(Token {
            id: wire.id,
            caveats: wire.caveats,
            signature,
        })
    }

    /// The app names the token is limited to (intersection of every `Apps` caveat), or
    /// `None` when no caveat limits apps.
    pub fn allowed_apps(&self) -> Option<Vec<String>> {
        let mut allowed: Option<Vec<String>> = None;
        for caveat in &self.caveats {
            if let Caveat::Apps(apps) = caveat {
                allowed = Some(match allowed {
                    None => apps.clone(),
                    Some(current) => current.into_iter().filter(|a| apps.contains(a)).collect(),
                });
            }
        }
        allowed
    }

    pub fn read_only(&self) -> bool {
        self.caveats.iter().any(|c| matches!(c, Caveat::ReadOnly))
    }

    /// The earliest expiry of any caveat.
    pub fn expires_at(&self) -> Option<i64> {
        self.caveats
            .iter()
            .filter_map(|c| {
                if let Caveat::ExpiresAt(t) = c {
                    Some(*t)
                } else {
                    None
                }
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_round_trip() {
        let token = Token::mint("tok1", b"root-key", vec![Caveat::Apps(vec!["web".into()])]);
        let decoded = Token::decode(&token.encode()).unwrap();
        assert_eq!(decoded, token);
        decoded.verify(b"root-key").unwrap();
        assert_eq!(decoded.verify(b"other-key"), Err(TokenError::BadSignature));
    }

    #[test]
    fn attenuation_works_offline_and_cannot_be_undone() {
        let token = Token::mint("tok1", b"k", vec![]);
        let narrowed = token
            .clone()
            .attenuate(Caveat::ReadOnly)
            .attenuate(Caveat::ExpiresAt(100));
        narrowed.verify(b"k").unwrap();
        assert!(narrowed.read_only());
        assert_eq!(narrowed.expires_at(), Some(100));
        let mut stripped = narrowed.clone();
        stripped.caveats.pop();
        assert_eq!(stripped.verify(b"k"), Err(TokenError::BadSignature));
        let mut swapped = narrowed;
        swapped.caveats[0] = Caveat::Apps(vec!["x".into()]);
        assert_eq!(swapped.verify(b"k"), Err(TokenError::BadSignature));
    }

    #[test]
    fn secrets_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn app_caveats_intersect() {
        let token = Token::mint(
            "t",
            b"k",
            vec![
                Caveat::Apps(vec!["a".into(), "b".into()]),
                Caveat::Apps(vec!["b".into(), "c".into()]),
            ],
        );
        assert_eq!(token.allowed_apps(), Some(vec!["b".to_string()]));
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        for text in [
            "",
            "fm1_",
            "fm1_!!!",
            "abc",
            "fm1_e30",
            "Bearer fm1_eyJpIjoxfQ",
        ] {
            assert!(Token::decode(text).is_err(), "{text}");
        }
    }
}
