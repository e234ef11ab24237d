//! The agent's `/metrics` (Prometheus text format): per machine CPU, memory, OOM kills,
//! network bytes and restarts, read from cgroups and the machine's host-side link at
//! scrape time; and the agent's own resident memory.

use std::fmt::Write;

use aloft_api::MachineState;

use crate::Agent;
use crate::network::MachineLink;

struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Agent {
    /// Renders every metric.
    pub fn render_metrics(&self) -> String {
        let mut up = Family::new("aloft_machine_up", "gauge", "1 while the machine runs.");
        let mut cpu = Family::new(
            "aloft_machine_cpu_seconds_total",
            "counter",
            "CPU time the machine used in its current run.",
        );
        let mut memory = Family::new(
            "aloft_machine_memory_bytes",
            "gauge",
            "Memory the machine uses (its cgroup's usage).",
        );
        let mut limit = Family::new(
            "aloft_machine_memory_limit_bytes",
            "gauge",
            "The machine's memory limit.",
        );
        let mut ooms = Family::new(
            "aloft_machine_oom_kills_total",
            "counter",
            "Processes the OOM killer ended in the machine's current run.",
        );
        let mut received = Family::new(
            "aloft_machine_net_receive_bytes_total",
            "counter",
            "Bytes the machine received on its link.",
        );
        let mut sent = Family::new(
            "aloft_machine_net_transmit_bytes_total",
            "counter",
            "Bytes the machine sent on its link.",
        );
        let mut restarts = Family::new(
            "aloft_machine_restarts_total",
            "counter",
            "Restarts made by the machine's restart policy.",
        );
        for record in self.store.machines().unwrap_or_default() {
            let id = &record.spec.id;
            let labels = format!(
                "app=\"{}\",machine=\"{}\",region=\"{}\"",
                escape(&record.spec.app),
                escape(id),
                escape(&self.config.region)
            );
            let running = record.state == MachineState::Started && record.shim_pid.is_some();
            up.samples
                .push((labels.clone(), if running { 1.0 } else { 0.0 }));
            restarts
                .samples
                .push((labels.clone(), record.restart_total as f64));
            if let Some(usage) = self.driver.usage(id, &self.machine_dir(id)) {
                cpu.samples
                    .push((labels.clone(), usage.cpu_nanoseconds as f64 / 1e9));
                memory
                    .samples
                    .push((labels.clone(), usage.memory_bytes as f64));
                limit
                    .samples
                    .push((labels.clone(), usage.memory_limit_bytes as f64));
                ooms.samples.push((labels.clone(), usage.oom_kills as f64));
            }
            if let Ok(link) = MachineLink::for_machine(id, record.slot) {
                // The host side's receive counter is what the machine sent, and back.
                if let Some((host_received, host_sent)) =
                    crate::procfs::interface_bytes(&link.host_interface)
                {
                    let (rx, tx) = (host_sent, host_received);
                    received.samples.push((labels.clone(), rx as f64));
                    sent.samples.push((labels, tx as f64));
                }
            }
        }
        let mut agent = Family::new(
            "aloft_agent_resident_memory_bytes",
            "gauge",
            "Resident memory of the process running the agent.",
        );
        agent.samples.push((
            String::new(),
            crate::procfs::rss_of(std::process::id() as i32) as f64,
        ));
        let mut out = String::new();
        for family in [
            up, cpu, memory, limit, ooms, received, sent, restarts, agent,
        ] {
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
            for (labels, value) in family.samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{} {value}", family.name);
                } else {
                    let _ = writeln!(out, "{}{{{labels}}} {value}", family.name);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
