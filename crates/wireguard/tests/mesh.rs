//! Two hosts as network namespaces joined by a veth (their "datacenter network"), each
//! with a mesh: a TCP connection between a machine address of one and of the other
//! crosses the mesh; a host that speaks for another host's addresses, and a key that is
//! no peer, are refused and counted.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener};
use std::time::Duration;

use aloft_api::sixpn;
use aloft_testkit::netns::{self, Netns};
use aloft_wireguard::{Mesh, MeshConfig, Peer, PrivateKey};

const NETWORK: u32 = 7;

fn missing_prerequisite() -> Option<String> {
    if let Some(reason) = netns::missing_root() {
        return Some(format!("the mesh test {reason}"));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("the mesh test needs /dev/net/tun".into());
    }
    None
}

fn machine(host: u32) -> Ipv6Addr {
    sixpn::machine_address(NETWORK, host, 1)
}

/// Connects from `from` to `to` inside `ns`, sends a line and reads the echo.
fn exchange(ns: &Netns, from: Ipv6Addr, to: SocketAddrV6) -> Result<String, String> {
    ns.on_thread(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        socket
            .bind(&SocketAddr::from(SocketAddrV6::new(from, 0, 0, 0)).into())
            .map_err(|e| format!("bind {from}: {e}"))?;
        socket
            .connect_timeout(&SocketAddr::from(to).into(), Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        let mut stream: std::net::TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"over the mesh\n")
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| e.to_string())?;
        Ok(answer)
    })
}

#[test]
fn hosts_reach_each_others_machines_and_refuse_what_is_not_theirs() {
    if let Some(reason) = missing_prerequisite() {
        aloft_testkit::skip(reason);
        return;
    }
    let (a, b, c) = (
        Netns::new("mesha"),
        Netns::new("meshb"),
        Netns::new("meshc"),
    );
    // The datacenter network: a bridge in B, with A and C attached by veths.
    b.run(&["ip", "link", "add", "dc", "type", "bridge"]);
    b.run(&["ip", "link", "set", "dc", "up"]);
    b.run(&["ip", "addr", "add", "10.77.0.2/24", "dev", "dc"]);
    for (ns, port, address) in [(&a, "pa", "10.77.0.1/24"), (&c, "pc", "10.77.0.3/24")] {
        b.veth_to(port, ns, "uplink");
        b.run(&["ip", "link", "set", port, "master", "dc"]);
        ns.run(&["ip", "addr", "add", address, "dev", "uplink"]);
    }
    // A "machine" address of each host on its loopback (the agent's veths stand in here).
    a.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/128", machine(1)),
        "dev",
        "lo",
    ]);
    b.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/128", machine(2)),
        "dev",
        "lo",
    ]);
    // A speaks for host 3's addresses too, which it must not.
    a.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/128", machine(3)),
        "dev",
        "lo",
    ]);
    c.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/128", machine(3)),
        "dev",
        "lo",
    ]);

    let (key_a, key_b, key_c) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let endpoint = |last: u8| SocketAddr::from(([10, 77, 0, last], 51820));
    let mesh = |ns: &Netns, key: &PrivateKey, host: u32, last: u8, peers: Vec<Peer>| {
        let config = MeshConfig {
            private_key: key.clone(),
            host,
            listen: endpoint(last),
            tun_name: "mesh0".into(),
            routes: vec!["fdaa::/16".into()],
            peers,
        };
        ns.on_thread(move || Mesh::start(config).expect("mesh starts"))
    };
    let mesh_a = mesh(
        &a,
        &key_a,
        1,
        1,
        vec![Peer {
            host: 2,
            public_key: key_b.public_key(),
            endpoint: endpoint(2),
        }],
    );
    let mesh_b = mesh(
        &b,
        &key_b,
        2,
        2,
        vec![Peer {
            host: 1,
            public_key: key_a.public_key(),
            endpoint: endpoint(1),
        }],
    );
    // C knows B, but B does not know C.
    let mesh_c = mesh(
        &c,
        &key_c,
        3,
        3,
        vec![Peer {
            host: 2,
            public_key: key_b.public_key(),
            endpoint: endpoint(2),
        }],
    );

    let service = SocketAddrV6::new(machine(2), 7000, 0, 0);
    let listener = b.on_thread(move || TcpListener::bind(service).expect("listen in B"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut line = [0u8; 64];
            let n = stream.read(&mut line).unwrap_or(0);
            let peer = stream
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = stream.write_all(
                format!("{} from {peer}", String::from_utf8_lossy(&line[..n]).trim()).as_bytes(),
            );
        }
    });

    let answer = exchange(&a, machine(1), service).expect("A's machine reaches B's over the mesh");
    assert_eq!(answer, format!("over the mesh from {}", machine(1)));
    assert!(mesh_a.stats().packets_sent > 0 && mesh_b.stats().packets_received > 0);
    assert_eq!(mesh_b.stats().refused_address, 0);

    // A sends from a host-3 address: B refuses it (A speaks only for its own machines).
    let spoofed = exchange(&a, machine(3), service);
    assert!(spoofed.is_err(), "{spoofed:?}");
    assert!(mesh_b.stats().refused_address > 0, "{:?}", mesh_b.stats());

    // C's key is no peer of B: its handshakes are refused, nothing gets through.
    let stranger = exchange(&c, machine(3), service);
    assert!(stranger.is_err(), "{stranger:?}");
    assert!(
        mesh_b.stats().refused_unknown_key > 0,
        "{:?}",
        mesh_b.stats()
    );

    // Once B knows C, C's machine gets through too; A's session is kept meanwhile.
    mesh_b
        .set_peers(vec![
            Peer {
                host: 1,
                public_key: key_a.public_key(),
                endpoint: endpoint(1),
            },
            Peer {
                host: 3,
                public_key: key_c.public_key(),
                endpoint: endpoint(3),
            },
        ])
        .expect("new peers");
    let answer = exchange(&c, machine(3), service).expect("C is a peer now");
    assert_eq!(answer, format!("over the mesh from {}", machine(3)));
    assert!(exchange(&a, machine(1), service).is_ok());

    // A host that re-keys is a new peer: the old key no longer gets in.
    let rekeyed = PrivateKey::generate();
    mesh_b
        .set_peers(vec![Peer {
            host: 1,
            public_key: rekeyed.public_key(),
            endpoint: endpoint(1),
        }])
        .expect("re-keyed peer");
    let refused_before = mesh_b.stats().refused_unknown_key;
    drop(mesh_a);
    let mesh_a = mesh(
        &a,
        &key_a,
        1,
        1,
        vec![Peer {
            host: 2,
            public_key: key_b.public_key(),
            endpoint: endpoint(2),
        }],
    );
    assert!(exchange(&a, machine(1), service).is_err());
    assert!(mesh_b.stats().refused_unknown_key > refused_before);
    drop((mesh_a, mesh_b, mesh_c));
}

#[test]
fn bad_peer_sets_are_refused_naming_the_host() {
    if let Some(reason) = missing_prerequisite() {
        aloft_testkit::skip(reason);
        return;
    }
    let ns = Netns::new("meshbad");
    let key = PrivateKey::generate();
    let other = PrivateKey::generate().public_key();
    let peer = |host: u32, public_key| Peer {
        host,
        public_key,
        endpoint: SocketAddr::from(([127, 0, 0, 1], 9)),
    };
    let config = MeshConfig {
        private_key: key.clone(),
        host: 1,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tun_name: "almesh".into(),
        routes: vec![],
        peers: vec![],
    };
    let err = ns.on_thread(move || Mesh::start(config).err().map(|e| e.to_string()));
    assert!(err.is_some_and(|e| e.contains("machines' links")));
    let config = MeshConfig {
        private_key: key,
        host: 1,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tun_name: "mesh0".into(),
        routes: vec![],
        peers: vec![],
    };
    let mesh = ns.on_thread(move || Mesh::start(config).expect("mesh"));
    for (peers, wanted) in [
        (
            vec![peer(1, other)],
            "host 1: that is this host's own number",
        ),
        (
            vec![peer(2, other), peer(2, PrivateKey::generate().public_key())],
            "host 2: two peers claim this host number",
        ),
        (vec![peer(2, other), peer(3, other)], "is another peer's"),
    ] {
        let err = mesh.set_peers(peers).expect_err("refused");
        assert!(err.to_string().contains(wanted), "{err}");
    }
}
