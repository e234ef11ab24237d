//! The guest's network: its interface up with the addresses and routes of its routed
//! link, set with the classic ioctls (no `ip` binary in the initramfs or the image).

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::InitError;
use crate::vm::channel::GuestNetwork;

fn sys(what: String) -> impl FnOnce(std::io::Error) -> InitError {
    move |e| InitError::Sys {
        what,
        source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

struct Socket(libc::c_int);

impl Socket {
    fn new(family: libc::c_int) -> std::io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, argument: &mut T) -> std::io::Result<()> {
        // SAFETY: `argument` is the structure the request expects.
        if unsafe { libc::ioctl(self.0, request as _, argument as *mut T) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *slot = byte as libc::c_char;
    }
    request
}

fn sockaddr_v4(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the API is used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn set_up(socket: &Socket, name: &str) -> Result<(), InitError> {
    let mut request = ifreq(name);
    socket
        .ioctl(libc::SIOCGIFFLAGS, &mut request)
        .map_err(sys(format!("reading the flags of {name}")))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    socket
        .ioctl(libc::SIOCSIFFLAGS, &mut request)
        .map_err(sys(format!("bringing {name} up")))
}

fn interface_index(name: &str) -> Result<u32, InitError> {
    let c_name =
        CString::new(name).map_err(|_| InitError::Invalid(format!("interface {name:?}")))?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(InitError::Invalid(format!(
            "the machine has no network interface {name} (is virtio_net loaded?)"
        )));
    }
    Ok(index)
}

fn parse_cidr(text: &str) -> Result<(IpAddr, u8), InitError> {
    let invalid = || InitError::Invalid(format!("network address {text:?}"));
    let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
    let address: IpAddr = address.parse().map_err(|_| invalid())?;
    let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(invalid());
    }
    Ok((address, prefix))
}

fn add_ipv4(socket: &Socket, name: &str, address: Ipv4Addr, prefix: u8) -> Result<(), InitError> {
    let mut request = ifreq(name);
    request.ifr_ifru.ifru_addr = sockaddr_v4(address);
    socket
        .ioctl(libc::SIOCSIFADDR, &mut request)
        .map_err(sys(format!("setting {address} on {name}")))?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    let mut request = ifreq(name);
    request.ifr_ifru.ifru_netmask = sockaddr_v4(Ipv4Addr::from(mask));
    socket
        .ioctl(libc::SIOCSIFNETMASK, &mut request)
        .map_err(sys(format!("setting the netmask of {name}")))
}

fn add_ipv6(index: u32, name: &str, address: Ipv6Addr, prefix: u8) -> Result<(), InitError> {
    let socket = Socket::new(libc::AF_INET6).map_err(sys("an IPv6 socket".into()))?;
    let mut request = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: address.octets(),
        },
        ifr6_prefixlen: u32::from(prefix),
        ifr6_ifindex: index as libc::c_int,
    };
    socket
        .ioctl(libc::SIOCSIFADDR, &mut request)
        .map_err(sys(format!("setting {address}/{prefix} on {name}")))
}

fn add_ipv4_default_route(socket: &Socket, gateway: Ipv4Addr) -> Result<(), InitError> {
    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_v4(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    socket
        .ioctl(libc::SIOCADDRT, &mut route)
        .map_err(sys(format!("adding the default route via {gateway}")))
}

/// The kernel's `struct in6_rtmsg` (SIOCADDRT on an IPv6 socket).
#[repr(C)]
struct In6Rtmsg {
    dst: [u8; 16],
    src: [u8; 16],
    gateway: [u8; 16],
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn add_ipv6_route(index: u32, destination: &str, gateway: Ipv6Addr) -> Result<(), InitError> {
    let (address, prefix) = parse_cidr(destination)?;
    let IpAddr::V6(address) = address else {
        return Err(InitError::Invalid(format!("IPv6 route {destination:?}")));
    };
    let socket = Socket::new(libc::AF_INET6).map_err(sys("an IPv6 socket".into()))?;
    let mut route = In6Rtmsg {
        dst: address.octets(),
        src: [0; 16],
        gateway: gateway.octets(),
        kind: 0,
        dst_len: u16::from(prefix),
        src_len: 0,
        metric: 1,
        info: 0,
        flags: (libc::RTF_UP | libc::RTF_GATEWAY) as u32,
        ifindex: index as libc::c_int,
    };
    socket
        .ioctl(libc::SIOCADDRT, &mut route)
        .map_err(sys(format!("adding the route {destination} via {gateway}")))
}

/// Brings `lo` and the machine's interface up with its addresses and routes.
pub fn configure(network: &GuestNetwork) -> Result<(), InitError> {
    let socket = Socket::new(libc::AF_INET).map_err(sys("an IPv4 socket".into()))?;
    set_up(&socket, "lo")?;
    if network.interface.is_empty() {
        return Ok(());
    }
    let name = network.interface.as_str();
    let index = interface_index(name)?;
    // Addresses are ours alone on a point-to-point link: no duplicate detection, so IPv6
    // works the moment the program starts.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_dad"), "0");
    set_up(&socket, name)?;
    for cidr in &network.addresses {
        match parse_cidr(cidr)? {
            (IpAddr::V4(address), prefix) => add_ipv4(&socket, name, address, prefix)?,
            (IpAddr::V6(address), prefix) => add_ipv6(index, name, address, prefix)?,
        }
    }
    if let Some(gateway) = &network.ipv4_gateway {
        let gateway: Ipv4Addr = gateway
            .parse()
            .map_err(|_| InitError::Invalid(format!("IPv4 gateway {gateway:?}")))?;
        add_ipv4_default_route(&socket, gateway)?;
    }
    if let Some(gateway) = &network.ipv6_gateway {
        let gateway: Ipv6Addr = gateway
            .parse()
            .map_err(|_| InitError::Invalid(format!("IPv6 gateway {gateway:?}")))?;
        for destination in &network.ipv6_routes {
            add_ipv6_route(index, destination, gateway)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_cidr("172.19.0.2/30").unwrap(),
            (IpAddr::V4(Ipv4Addr::new(172, 19, 0, 2)), 30)
        );
        assert!(parse_cidr("fdaa::2/112").is_ok());
        assert!(
            parse_cidr("172.19.0.2/33")
                .unwrap_err()
                .to_string()
                .contains("172.19.0.2/33")
        );
        assert!(parse_cidr("nonsense").is_err());
    }
}
