//! Processes as `ps` shows them, read from /proc: the agent's for a container's, init's
//! for a microVM's (from inside the guest).

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use aloft_api::internal::{ListenSocket, ProcessStat};

fn ticks_per_second() -> u64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// `utime` and `stime` (clock ticks) from `/proc/PID/stat`.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
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

/// Resident memory of `pid`, in bytes (0 if it is gone).
pub fn rss_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| rss_bytes(&s))
        .unwrap_or(0)
}

/// Every user process (kernel threads have no command line), in pid order.
pub fn all_processes() -> Vec<ProcessStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .filter_map(process_stat)
        .filter(|p| !p.command.is_empty())
        .collect()
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
    fn this_process_is_readable() {
        let me = process_stat(std::process::id() as i32).unwrap();
        assert!(me.rss > 0);
        assert!(!me.command.is_empty());
    }

    #[test]
    fn all_processes_include_this_one() {
        let me = std::process::id() as i32;
        assert!(all_processes().iter().any(|p| p.pid == me));
    }
}
