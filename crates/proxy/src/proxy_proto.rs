//! PROXY protocol headers (v1 text, v2 binary) that the `proxy_proto` handler prepends.

use std::net::SocketAddr;

const V2_SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];

/// The header announcing a connection from `client` to `local`.
pub fn encode(client: SocketAddr, local: SocketAddr, v2: bool) -> Vec<u8> {
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    if v2 {
        encode_v2(client, local)
    } else {
        encode_v1(client, local)
    }
}

fn encode_v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            c.ip(),
            l.ip(),
            c.port(),
            l.port()
        )
        .into_bytes(),
        (SocketAddr::V6(c), SocketAddr::V6(l)) => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            c.ip(),
            l.ip(),
            c.port(),
            l.port()
        )
        .into_bytes(),
        _ => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

fn encode_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY command
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
        _ => {
            out.push(0x00); // UNSPEC
            out.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_text() {
        let h = encode(
            "10.0.0.1:5555".parse().unwrap(),
            "10.0.0.2:443".parse().unwrap(),
            false,
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.2 5555 443\r\n");
        let h = encode(
            "[::1]:5555".parse().unwrap(),
            "[::2]:443".parse().unwrap(),
            false,
        );
        assert_eq!(h, b"PROXY TCP6 ::1 ::2 5555 443\r\n");
    }

    #[test]
    fn v2_binary() {
        let h = encode(
            "10.0.0.1:5555".parse().unwrap(),
            "10.0.0.2:443".parse().unwrap(),
            true,
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[10, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 5555);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 443);
    }
}
