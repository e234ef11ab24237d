//! Curve25519 keys in WireGuard's text form (base64 of the 32 bytes, as `wg` prints them).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;

#[derive(Debug, thiserror::Error)]
#[error("{what} is not a WireGuard key (base64 of 32 bytes, as `wg genkey` prints)")]
pub struct KeyError {
    what: String,
}

fn decode(text: &str, what: &str) -> Result<[u8; 32], KeyError> {
    STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| KeyError {
            what: what.to_string(),
        })
}

/// A host's private key. Its text form is a secret: keep it in files only its owner reads.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        Self(x25519::StaticSecret::from(bytes))
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode(text, "the private key").map(|bytes| Self(x25519::StaticSecret::from(bytes)))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }

    pub(crate) fn secret(&self) -> &x25519::StaticSecret {
        &self.0
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

/// A host's public key: what other hosts know it by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub(crate) [u8; 32]);

impl PublicKey {
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode(text, "the public key").map(Self)
    }

    pub(crate) fn dalek(&self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_base64(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_text_form() {
        let private = PrivateKey::generate();
        let again = PrivateKey::from_base64(&private.to_base64()).unwrap();
        assert_eq!(again.public_key(), private.public_key());
        let public = private.public_key().to_string();
        assert_eq!(public.len(), 44);
        assert_eq!(public.parse::<PublicKey>().unwrap(), private.public_key());
    }

    #[test]
    fn a_malformed_key_names_what_it_was_meant_to_be() {
        let err = PublicKey::from_base64("bm90IGEga2V5").unwrap_err();
        assert!(err.to_string().contains("the public key"), "{err}");
        assert!(PrivateKey::from_base64("!!").is_err());
    }
}
