//! Reading processes from /proc: a machine's processes for `ps`, their listening sockets,
//! and the children of a process.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aloft_api::internal::{ListenSocket, ProcessStat};

/// The direct children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else {
        return Vec::new();
    };
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The pids listed in a cgroup's `cgroup.procs`.
pub fn cgroup_pids(procs_file: &Path) -> Vec<i32> {
    let Ok(text) = std::fs::read_to_string(procs_file) else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    pids.sort_unstable();
    pids
}

fn ticks_per_second() -> u64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// `utime` and `stime` (clock ticks) from `/proc/PID/stat`.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come: state(0) ppid(1) ... utime(11) stime(12).
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

fn rss_bytes(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// One process as `ps` shows it, or `None` if it is gone.
pub fn process_stat(pid: i32) -> Option<ProcessStat> {
    let base = format!("/proc/{pid}");
    let stat = std::fs::read_to_string(format!("{base}/stat")).ok()?;
    let (utime, stime) = cpu_ticks(&stat).unwrap_or((0, 0));
    let cmdline = std::fs::read(format!("{base}/cmdline")).unwrap_or_default();
    let command = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let directory = std::fs::read_link(format!("{base}/cwd"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let rss = std::fs::read_to_string(format!("{base}/status"))
        .map(|s| rss_bytes(&s))
        .unwrap_or(0);
    let ms = |ticks: u64| ticks * 1000 / ticks_per_second();
    Some(ProcessStat {
        pid,
        command,
        directory,
        cpu: utime + stime,
        rss,
        rtime: ms(utime),
        stime: ms(stime),
        listen_sockets: listen_sockets(pid),
    })
}

fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let text = target.to_string_lossy().into_owned();
            text.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The TCP sockets `pid` listens on, read from its network namespace's tables.
pub fn listen_sockets(pid: i32) -> Vec<ListenSocket> {
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut sockets = Vec::new();
    for (file, proto) in [("tcp", "tcp"), ("tcp6", "tcp")] {
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" || !inode.parse::<u64>().is_ok_and(|i| inodes.contains(&i)) {
                continue;
            }
            if let Some(address) = parse_socket_address(local) {
                sockets.push(ListenSocket {
                    proto: proto.to_string(),
                    address,
                });
            }
        }
    }
    sockets
}

/// `0100007F:1F90` → `127.0.0.1:8080`; the IPv6 form → `[::]:8080`.
fn parse_socket_address(text: &str) -> Option<String> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    match address.len() {
        8 => {
            let raw = u32::from_str_radix(address, 16).ok()?;
            Some(format!("{}:{port}", Ipv4Addr::from(raw.to_le_bytes())))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for word in 0..4 {
                let raw = u32::from_str_radix(&address[word * 8..word * 8 + 8], 16).ok()?;
                bytes[word * 4..word * 4 + 4].copy_from_slice(&raw.to_le_bytes());
            }
            Some(format!("[{}]:{port}", Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Received and sent bytes of a network interface in this process's network namespace
/// (from `/proc/self/net/dev`, which follows the namespace; `/sys/class/net` shows the
/// one sysfs was mounted in).
pub fn interface_bytes(interface: &str) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/self/net/dev").ok()?;
    parse_net_dev(&table, interface)
}

fn parse_net_dev(table: &str, interface: &str) -> Option<(u64, u64)> {
    table.lines().skip(2).find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != interface {
            return None;
        }
        let fields: Vec<u64> = counters
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        Some((*fields.first()?, *fields.get(8)?))
    })
}

/// Resident memory of `pid` in bytes.
pub fn rss_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| rss_bytes(&s))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_socket_addresses_read_as_text() {
        assert_eq!(
            parse_socket_address("0100007F:1F90").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            parse_socket_address("00000000:0050").as_deref(),
            Some("0.0.0.0:80")
        );
        assert_eq!(
            parse_socket_address("00000000000000000000000000000000:1F90").as_deref(),
            Some("[::]:8080")
        );
        assert_eq!(parse_socket_address("bogus"), None);
    }

    #[test]
    fn cpu_ticks_skip_command_names_with_spaces() {
        let stat = "42 (my app) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 100 1000 10";
        assert_eq!(cpu_ticks(stat), Some((7, 3)));
    }

    #[test]
    fn interface_counters_come_from_the_namespace_table() {
        let table = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:    1234      10    0    0    0     0          0         0     1234      10    0    0    0     0       0          0\nal0123: 500 5 0 0 0 0 0 0 700 7 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(table, "al0123"), Some((500, 700)));
        assert_eq!(parse_net_dev(table, "lo"), Some((1234, 1234)));
        assert_eq!(parse_net_dev(table, "eth9"), None);
        assert!(interface_bytes("lo").is_some());
    }

    #[test]
    fn this_process_is_readable() {
        let me = process_stat(std::process::id() as i32).unwrap();
        assert!(me.rss > 0);
        assert!(!me.command.is_empty());
    }
}
