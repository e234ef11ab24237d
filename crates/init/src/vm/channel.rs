//! The agent channel of a microVM: framed messages on the virtio-serial port `fly.agent`
//! between `init` in the guest and the machine's supervisor on the host.
//!
//! A frame is `u32 length` (big endian, of what follows), `u32 stream`, `u8 kind`, then the
//! payload. Stream 0 carries the machine's own messages (boot config, ready, signals, exit);
//! every `exec` gets a stream of its own, so several commands can run at once.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use aloft_api::internal::InitConfig;
use serde::{Deserialize, Serialize};

/// The name of the virtio-serial port the guest looks for.
pub const PORT_NAME: &str = "fly.agent";
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;
const HEADER: usize = 9;

/// Guest → host, stream 0: init is up in the initramfs and wants its config.
pub const HELLO: u8 = 1;
/// Guest → host, stream 0: the main program runs.
pub const READY: u8 = 2;
/// Guest → host, stream 0: the machine ended ([`GuestExit`] as JSON); poweroff follows.
pub const EXIT: u8 = 3;
/// Host → guest, stream 0: [`BootConfig`] as JSON.
pub const BOOT: u8 = 10;
/// Host → guest: a signal (i32, big endian) for the main program (stream 0) or for an
/// exec'd command (its stream).
pub const SIGNAL: u8 = 11;
/// Host → guest: start a command ([`ExecRequest`] as JSON) on a new stream.
pub const EXEC: u8 = 20;
pub const STDIN: u8 = 21;
pub const STDIN_EOF: u8 = 22;
/// Host → guest: the terminal's new size (u16 cols, u16 rows, big endian).
pub const RESIZE: u8 = 23;
/// Host → guest: list the guest's processes on a new stream; the guest answers
/// [`PROCESSES`] then [`EXEC_EXIT`] there.
pub const PS: u8 = 24;
pub const STDOUT: u8 = 30;
pub const STDERR: u8 = 31;
/// Guest → host: the command ended (i32 exit code, big endian).
pub const EXEC_EXIT: u8 = 32;
/// Guest → host: the command could not be started (text).
pub const EXEC_ERROR: u8 = 33;
/// Guest → host: its processes (`Vec<aloft_api::internal::ProcessStat>` as JSON).
pub const PROCESSES: u8 = 34;

/// What the host tells init at boot. Secrets are in `init.env`: this travels only over
/// the channel, never on the kernel command line or a disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BootConfig {
    pub init: InitConfig,
    pub network: GuestNetwork,
    /// The block device holding the root filesystem.
    pub root_device: String,
    /// A swap file of this size on the root filesystem (0: none).
    #[serde(default)]
    pub swap_size_mb: u32,
    /// Volumes: disks to mount (ext4) at their paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<GuestVolume>,
}

/// A volume as the guest sees it: the virtio-blk disk with this serial, mounted at
/// `destination`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVolume {
    pub serial: String,
    pub destination: String,
}

/// The guest's side of its routed link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub interface: String,
    /// Addresses in CIDR form (`172.19.0.2/30`, `fdaa:0:1:a7b:1::2/112`).
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_gateway: Option<String>,
    /// IPv6 next hop (link-local), and the destinations routed through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_gateway: Option<String>,
    #[serde(default)]
    pub ipv6_routes: Vec<String>,
}

/// How the machine ended, as init saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestExit {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    /// Why the machine could not even start its program (boot or setup failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A command to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Run on a terminal of this size (cols, rows); pipes otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<(u16, u16)>,
}

/// One message on the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub stream: u32,
    pub kind: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(stream: u32, kind: u8, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            stream,
            kind,
            payload: payload.into(),
        }
    }

    pub fn json(stream: u32, kind: u8, value: &impl Serialize) -> Self {
        Self::new(stream, kind, serde_json::to_vec(value).unwrap_or_default())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 4 + self.payload.len());
        out.extend_from_slice(&((self.payload.len() + 5) as u32).to_be_bytes());
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.push(self.kind);
        out.extend_from_slice(&self.payload);
        out
    }

    /// The payload as a big-endian i32 (signals, exit codes).
    pub fn int(&self) -> Option<i32> {
        let bytes: [u8; 4] = self.payload.get(..4)?.try_into().ok()?;
        Some(i32::from_be_bytes(bytes))
    }
}

/// Takes one whole frame off the front of `buffer`, if there is one. A length that no
/// frame may have is an error (the stream is out of step and cannot be trusted).
pub fn decode(buffer: &mut Vec<u8>) -> io::Result<Option<Frame>> {
    if buffer.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
    if !(5..=MAX_PAYLOAD + 5).contains(&length) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("channel frame of {length} bytes"),
        ));
    }
    if buffer.len() < 4 + length {
        return Ok(None);
    }
    let stream = u32::from_be_bytes([buffer[4], buffer[5], buffer[6], buffer[7]]);
    let kind = buffer[8];
    let payload = buffer[HEADER..4 + length].to_vec();
    buffer.drain(..4 + length);
    Ok(Some(Frame {
        stream,
        kind,
        payload,
    }))
}

/// Reads exactly one frame (blocking).
pub fn read_frame(source: &mut impl Read) -> io::Result<Frame> {
    let mut header = [0u8; HEADER];
    source.read_exact(&mut header)?;
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(5..=MAX_PAYLOAD + 5).contains(&length) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("channel frame of {length} bytes"),
        ));
    }
    let mut payload = vec![0u8; length - 5];
    source.read_exact(&mut payload)?;
    Ok(Frame {
        stream: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
        kind: header[8],
        payload,
    })
}

pub fn write_frame(sink: &mut impl Write, frame: &Frame) -> io::Result<()> {
    sink.write_all(&frame.encode())?;
    sink.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whole_and_in_pieces() {
        let a = Frame::new(0, HELLO, Vec::new());
        let b = Frame::new(7, STDOUT, b"hello".to_vec());
        let mut wire = a.encode();
        wire.extend(b.encode());
        let mut buffer = Vec::new();
        let mut seen = Vec::new();
        for byte in wire {
            buffer.push(byte);
            while let Some(frame) = decode(&mut buffer).unwrap() {
                seen.push(frame);
            }
        }
        assert_eq!(seen, vec![a, b.clone()]);
        assert!(buffer.is_empty());
        let mut reader = std::io::Cursor::new(b.encode());
        assert_eq!(read_frame(&mut reader).unwrap(), b);
        assert_eq!(Frame::new(1, EXEC_EXIT, 3i32.to_be_bytes()).int(), Some(3));
    }

    #[test]
    fn impossible_lengths_are_refused() {
        let mut buffer = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1];
        assert!(decode(&mut buffer).is_err());
        let mut buffer = vec![0, 0, 0, 1, 0];
        assert!(decode(&mut buffer).is_err());
    }

    #[test]
    fn boot_config_carries_secrets_in_init_env() {
        let mut config = BootConfig::default();
        config.init.env.insert("SECRET".into(), "s3cr3t".into());
        let frame = Frame::json(0, BOOT, &config);
        let back: BootConfig = serde_json::from_slice(&frame.payload).unwrap();
        assert_eq!(back.init.env["SECRET"], "s3cr3t");
    }
}
