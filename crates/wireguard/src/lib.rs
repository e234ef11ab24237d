//! The userspace WireGuard mesh between hosts that carries the 6PN. See README.md.

mod keys;
mod mesh;
mod tun;

pub use keys::{KeyError, PrivateKey, PublicKey};
pub use mesh::{Mesh, MeshConfig, MeshError, MeshStats, Peer, ip};
