//! Reading processes from /proc: a machine's processes for `ps` (shared with init, which
//! lists a microVM's from inside), the children of a process, interface counters.

use std::path::Path;

pub use aloft_init::procfs::{listen_sockets, process_stat};

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
    aloft_init::procfs::rss_of(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_counters_come_from_the_namespace_table() {
        let table = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:    1234      10    0    0    0     0          0         0     1234      10    0    0    0     0       0          0\nal0123: 500 5 0 0 0 0 0 0 700 7 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(table, "al0123"), Some((500, 700)));
        assert_eq!(parse_net_dev(table, "lo"), Some((1234, 1234)));
        assert_eq!(parse_net_dev(table, "eth9"), None);
        assert!(interface_bytes("lo").is_some());
    }
}
