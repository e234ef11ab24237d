//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and incremental hashing.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use crate::RegistryError;

/// A digest algorithm the registry can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// A validated digest: a known algorithm and its lowercase hex encoding.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    alg: Algorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Digest of a byte slice.
    pub fn of(alg: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(alg);
        h.update(data);
        h.finish()
    }

    /// Whether `s` looks like a digest (`alg:encoded`), as opposed to a tag.
    pub fn looks_like_digest(s: &str) -> bool {
        s.contains(':')
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.name(), self.hex)
    }
}

impl FromStr for Digest {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| RegistryError::DigestInvalid(format!("not a digest: {s:?}")))?;
        let alg = Algorithm::from_name(alg).ok_or_else(|| {
            RegistryError::DigestInvalid(format!("unsupported digest algorithm {alg:?}"))
        })?;
        let valid = hex.len() == alg.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(RegistryError::DigestInvalid(format!(
                "invalid {} digest encoding: {s:?}",
                alg.name()
            )));
        }
        Ok(Digest {
            alg,
            hex: hex.to_string(),
        })
    }
}

/// Incremental hasher for one algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(alg: Algorithm) -> Hasher {
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest {
                alg: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                alg: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

/// Hashes a file from disk.
pub fn digest_file(alg: Algorithm, path: &std::path::Path) -> std::io::Result<(Digest, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::new(alg);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((h.finish(), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .expect("valid");
        assert_eq!(d, Digest::of(Algorithm::Sha256, b""));
        assert!("sha256:E3B0".parse::<Digest>().is_err());
        assert!(
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
                .parse::<Digest>()
                .is_err()
        );
        assert!("md5:abcd".parse::<Digest>().is_err());
        assert!("latest".parse::<Digest>().is_err());
        let s512 = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(s512.to_string().len(), 7 + 128);
        assert_eq!(s512.to_string().parse::<Digest>().expect("roundtrip"), s512);
    }
}
