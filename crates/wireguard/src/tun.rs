//! A TUN device (layer 3, no packet information header) opened through /dev/net/tun.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub(crate) struct Tun {
    file: File,
}

impl Tun {
    /// Creates (or attaches to) TUN interface `name` in the calling thread's network
    /// namespace.
    pub(crate) fn create(name: &str) -> std::io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name:?} is not an interface name (1 to 15 characters)"),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `request` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut request) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { file })
    }

    /// The next packet, waiting up to `timeout` only when none is queued (a busy device
    /// costs one read per packet, not a poll and a read); `Ok(0)` when none came.
    pub(crate) fn read_timeout(&self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        match (&self.file).read(buf) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            other => return other,
        }
        let mut poll = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready <= 0 {
            return Ok(0);
        }
        match (&self.file).read(buf) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }

    pub(crate) fn write(&self, packet: &[u8]) -> std::io::Result<()> {
        (&self.file).write(packet).map(|_| ())
    }
}
