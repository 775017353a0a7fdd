//! The standard process gauges (`process_resident_memory_bytes`, `process_open_fds`,
//! `process_cpu_seconds_total`), read from `/proc/self` at scrape time (Linux only).

use prometheus::{IntGauge, Registry};

use super::family::register;

/// Standard process gauges, read from `/proc/self` at scrape time (Linux only).
pub(super) struct ProcessGauges {
    resident_memory: IntGauge,
    open_fds: IntGauge,
    cpu_seconds: prometheus::Counter,
}

impl ProcessGauges {
    pub(super) fn register(registry: &Registry) -> Option<ProcessGauges> {
        read_resident_memory()?;
        Some(ProcessGauges {
            resident_memory: register(
                registry,
                IntGauge::new(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                ),
            ),
            open_fds: register(
                registry,
                IntGauge::new("process_open_fds", "Number of open file descriptors."),
            ),
            cpu_seconds: register(
                registry,
                prometheus::Counter::new(
                    "process_cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                ),
            ),
        })
    }

    pub(super) fn update(&self) {
        if let Some(bytes) = read_resident_memory() {
            self.resident_memory
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds
                .set(i64::try_from(fds.count()).unwrap_or(i64::MAX));
        }
        // The kernel keeps the running total; the counter catches up with it.
        if let Some(seconds) = read_cpu_seconds() {
            let behind = seconds - self.cpu_seconds.get();
            if behind > 0.0 {
                self.cpu_seconds.inc_by(behind);
            }
        }
    }
}

/// `VmRSS` from `/proc/self/status`, in bytes.
fn read_resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// utime + stime from `/proc/self/stat`, in seconds (Linux counts them in USER_HZ, 100
/// on every architecture Rust targets).
fn read_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}
