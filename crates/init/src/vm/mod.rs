//! init inside QEMU microVMs: stage one in the initramfs ([`boot`]), stage two as the
//! ordinary init in the image's root with the agent channel ([`guest`]), the channel's
//! wire format ([`channel`], shared with the host side in the agent) and the guest's
//! network setup ([`net`]).

pub mod boot;
pub mod channel;
pub mod guest;
pub mod net;

/// The environment variable that tells stage two which descriptor is the channel.
pub const CHANNEL_ENV: &str = "ALOFT_VM_CHANNEL";
/// The descriptor stage one hands the channel on.
pub const CHANNEL_FD: std::os::fd::RawFd = 4;
