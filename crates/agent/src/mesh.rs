//! This host's place in the WireGuard mesh that carries the 6PN between hosts: a fresh key
//! at every agent start (registered with the control plane, so re-joining re-keys), the
//! `mesh0` TUN device with `fdaa::/16` routed into it, the host's own backhaul address,
//! and the peer set kept current from the control plane's `GET /v1/hosts/mesh`.
//!
//! The private key lives in memory only: nothing on disk outlives the process, and the
//! next start registers a new key, which replaces the old one at every peer.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::MeshPeerInfo;
use aloft_api::sixpn;
use aloft_wireguard::{Mesh, MeshConfig, MeshError, MeshStats, Peer, PrivateKey, PublicKey};

use crate::Agent;

/// The mesh's TUN device (not `al*`: the packet filter reserves that for machines' links).
pub const TUN_NAME: &str = "mesh0";
/// What the mesh carries: every 6PN address. Machines' own /112 routes are more specific
/// and stay local.
pub const MESH_ROUTE: &str = "fdaa::/16";
/// How often the peer set is read from the control plane.
const PEERS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum HostMeshError {
    #[error(
        "--mesh-listen {0}: give the address other hosts reach this one at (e.g. 10.0.0.2:51820), not an unspecified address or port 0"
    )]
    Endpoint(SocketAddr),
    #[error(transparent)]
    Mesh(#[from] MeshError),
}

/// This run's mesh key and where the mesh listens (also what other hosts send to).
pub struct MeshIdentity {
    key: PrivateKey,
    pub endpoint: SocketAddr,
}

impl MeshIdentity {
    /// A fresh key for a mesh listening at `endpoint`.
    pub fn generate(endpoint: SocketAddr) -> Result<Self, HostMeshError> {
        if endpoint.ip().is_unspecified() || endpoint.port() == 0 {
            return Err(HostMeshError::Endpoint(endpoint));
        }
        Ok(Self {
            key: PrivateKey::generate(),
            endpoint,
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }
}

/// The running mesh of this host.
pub struct HostMesh {
    mesh: Mesh,
    host_number: u32,
}

fn ip(args: &[&str]) -> Result<(), HostMeshError> {
    Ok(aloft_wireguard::ip(args)?)
}

impl HostMesh {
    /// Starts the mesh of host `host_number` (known once the host has registered) in this
    /// process's network namespace: `mesh0`, the host's backhaul address on it, and
    /// `fdaa::/16` into it with that address as the source of what the host itself sends.
    pub fn start(identity: &MeshIdentity, host_number: u32) -> Result<Self, HostMeshError> {
        let mesh = Mesh::start(MeshConfig {
            private_key: identity.key.clone(),
            host: host_number,
            listen: identity.endpoint,
            tun_name: TUN_NAME.into(),
            routes: Vec::new(),
            peers: Vec::new(),
        })?;
        let own = sixpn::host_address(host_number);
        ip(&[
            "-6",
            "addr",
            "replace",
            &format!("{own}/128"),
            "dev",
            TUN_NAME,
            "nodad",
        ])?;
        ip(&[
            "-6",
            "route",
            "replace",
            MESH_ROUTE,
            "dev",
            TUN_NAME,
            "src",
            &own.to_string(),
        ])?;
        Ok(Self { mesh, host_number })
    }

    /// This host's own backhaul address.
    pub fn host_address(&self) -> Ipv6Addr {
        sixpn::host_address(self.host_number)
    }

    pub fn stats(&self) -> MeshStats {
        self.mesh.stats()
    }

    /// Keeps the peers those the control plane lists (hosts that are up, with the key
    /// they registered this run), for as long as the process runs.
    pub async fn follow_peers(self, agent: Arc<Agent>) {
        let client = agent.control_client();
        let mut current: Option<Vec<Peer>> = None;
        loop {
            match client.get::<Vec<MeshPeerInfo>>("/v1/hosts/mesh").await {
                Ok(listed) => {
                    let peers = peers_of(&listed, self.host_number);
                    if current.as_ref() != Some(&peers) {
                        match self.mesh.set_peers(peers.clone()) {
                            Ok(()) => {
                                tracing::info!(
                                    peers = ?peers.iter().map(|p| (p.host, p.endpoint)).collect::<Vec<_>>(),
                                    "mesh peers changed"
                                );
                                current = Some(peers);
                            }
                            Err(err) => tracing::warn!(error = %err, "setting the mesh's peers"),
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "reading the mesh's peers"),
            }
            tokio::time::sleep(PEERS_EVERY).await;
        }
    }
}

/// The other hosts of `listed` as mesh peers; entries that are not usable (a malformed key
/// or endpoint) are logged and left out.
fn peers_of(listed: &[MeshPeerInfo], own_number: u32) -> Vec<Peer> {
    let mut peers: Vec<Peer> = listed
        .iter()
        .filter(|p| p.number != own_number)
        .filter_map(|p| {
            let key = p.public_key.parse::<PublicKey>();
            let endpoint = p.endpoint.parse::<SocketAddr>();
            match (key, endpoint) {
                (Ok(public_key), Ok(endpoint)) => Some(Peer {
                    host: p.number,
                    public_key,
                    endpoint,
                }),
                _ => {
                    tracing::warn!(host = %p.id, key = %p.public_key, endpoint = %p.endpoint, "the control plane lists a mesh peer with a malformed key or endpoint; left out");
                    None
                }
            }
        })
        .collect();
    peers.sort_by_key(|p| p.host);
    peers
}

/// Starts the mesh once this host has registered (its number known) and follows its
/// peers; errors are logged (used when the control plane did not answer at start).
pub async fn start_when_registered(agent: Arc<Agent>) {
    let Some(identity) = agent.mesh_identity() else {
        return;
    };
    let number = loop {
        if let Some(number) = agent.host_number() {
            break number;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    match HostMesh::start(identity, number) {
        Ok(mesh) => mesh.follow_peers(agent).await,
        Err(err) => {
            tracing::error!(error = %err, "the mesh did not start: no traffic to other hosts' machines")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(number: u32, key: &str, endpoint: &str) -> MeshPeerInfo {
        MeshPeerInfo {
            id: format!("host-{number}"),
            number,
            public_key: key.into(),
            endpoint: endpoint.into(),
        }
    }

    #[test]
    fn peers_leave_out_this_host_and_malformed_entries() {
        let a = PrivateKey::generate().public_key().to_string();
        let b = PrivateKey::generate().public_key().to_string();
        let peers = peers_of(
            &[
                listed(3, &b, "10.0.0.3:51820"),
                listed(1, &a, "10.0.0.1:51820"),
                listed(2, "not a key", "10.0.0.2:51820"),
                listed(4, &a, "nowhere"),
                listed(
                    5,
                    &PrivateKey::generate().public_key().to_string(),
                    "10.0.0.5:51820",
                ),
            ],
            5,
        );
        assert_eq!(peers.iter().map(|p| p.host).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(peers[1].public_key.to_string(), b);
    }

    #[test]
    fn an_unspecified_endpoint_is_refused_naming_the_flag() {
        let err = MeshIdentity::generate("0.0.0.0:51820".parse().unwrap())
            .err()
            .unwrap();
        assert!(err.to_string().contains("--mesh-listen"), "{err}");
        let fresh = MeshIdentity::generate("10.0.0.1:51820".parse().unwrap()).unwrap();
        let again = MeshIdentity::generate("10.0.0.1:51820".parse().unwrap()).unwrap();
        assert_ne!(
            fresh.public_key(),
            again.public_key(),
            "a fresh key each start"
        );
    }
}
