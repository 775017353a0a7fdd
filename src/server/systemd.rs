//! systemd's service notifications (`sd_notify(3)`) for a `Type=notify` unit: `READY=1`
//! once every listener is bound, `RELOADING=1` then `READY=1` around a SIGHUP reload,
//! `STOPPING=1` when draining starts, and `WATCHDOG=1` keep-alives when the unit has
//! `WatchdogSec=`. Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.
//!
//! The protocol is one datagram per notification to the `AF_UNIX` socket systemd names in
//! `NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`): std's
//! `UnixDatagram` is all it takes.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends notifications to systemd, or nothing when the process was not started with a
/// notification socket. Sending never blocks and never fails the caller: a notification
/// that cannot be sent is logged.
#[derive(Debug)]
pub struct Notifier(Option<Socket>);

#[derive(Debug)]
struct Socket {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, as systemd sets it for a `Type=notify` service.
    pub fn from_env() -> Notifier {
        Notifier::new(std::env::var_os("NOTIFY_SOCKET").as_deref())
    }

    /// For the socket `notify_socket` names; `None` (or an unusable name, which is
    /// logged) sends nothing.
    pub fn new(notify_socket: Option<&std::ffi::OsStr>) -> Notifier {
        let Some(name) = notify_socket.filter(|name| !name.is_empty()) else {
            return Notifier(None);
        };
        match connect(name) {
            Ok(socket) => Notifier(Some(socket)),
            Err(error) => {
                tracing::warn!(
                    notify_socket = %name.to_string_lossy(),
                    error = %error,
                    "cannot use NOTIFY_SOCKET: systemd will not hear from this process"
                );
                Notifier(None)
            }
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Every listener is bound (or the reload is over, failed or not): the service is up.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A reload begins. systemd wants the time it began on `CLOCK_MONOTONIC`, so it can
    /// tell this reload's `READY=1` from an earlier one's.
    pub fn reloading(&self) {
        if self.is_enabled() {
            let now = monotonic_usec();
            self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
        }
    }

    /// Draining has begun: the service is on its way out.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// The watchdog's keep-alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, state: &str) {
        let Some(Socket { socket, addr }) = &self.0 else {
            return;
        };
        if let Err(error) = socket.send_to_addr(state.as_bytes(), addr) {
            tracing::warn!(state, error = %error, "cannot notify systemd");
        }
    }
}

fn connect(name: &std::ffi::OsStr) -> io::Result<Socket> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => abstract_addr(abstract_name)?,
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(name)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@…)",
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    // A full queue on systemd's side must not stall the runtime thread that notifies.
    socket.set_nonblocking(true)?;
    Ok(Socket { socket, addr })
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names are Linux only",
    ))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd reads `MONOTONIC_USEC` on.
pub fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec / 1000).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// advises, when the variable is set and `WATCHDOG_PID` is unset or names this process
/// (`own_pid`); `None` otherwise.
pub fn watchdog_interval(
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    own_pid: u32,
) -> Option<Duration> {
    let usec: u64 = watchdog_usec?
        .trim()
        .parse()
        .ok()
        .filter(|&usec| usec > 0)?;
    if let Some(pid) = watchdog_pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// [`watchdog_interval`] from this process's environment.
pub fn watchdog_interval_from_env() -> Option<Duration> {
    let var = |name| std::env::var(name).ok();
    watchdog_interval(
        var("WATCHDOG_USEC").as_deref(),
        var("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_socket_name_nothing_is_enabled() {
        assert!(!Notifier::new(None).is_enabled());
        assert!(!Notifier::new(Some("".as_ref())).is_enabled());
        assert!(!Notifier::new(Some("relative/path".as_ref())).is_enabled());
        assert!(Notifier::new(Some("/run/systemd/notify".as_ref())).is_enabled());
    }

    #[test]
    fn notifications_arrive_as_one_datagram_each() {
        let dir = std::env::temp_dir().join(format!("iamproxy-notify-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier::new(Some(path.as_os_str()));
        notifier.ready();
        let before = monotonic_usec();
        notifier.reloading();
        let after = monotonic_usec();
        notifier.stopping();
        let mut buffer = [0u8; 256];
        let mut next = || {
            let n = receiver.recv(&mut buffer).unwrap();
            String::from_utf8(buffer[..n].to_vec()).unwrap()
        };
        assert_eq!(next(), "READY=1");
        let reloading = next();
        let usec: u64 = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{reloading:?}"))
            .parse()
            .unwrap();
        assert!(
            (before..=after).contains(&usec),
            "{before} <= {usec} <= {after}"
        );
        assert_eq!(next(), "STOPPING=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_watchdog_runs_at_half_its_timeout_for_this_process_only() {
        let half = Some(Duration::from_millis(1500));
        assert_eq!(watchdog_interval(Some("3000000"), None, 42), half);
        assert_eq!(watchdog_interval(Some("3000000"), Some("42"), 42), half);
        assert_eq!(watchdog_interval(Some("3000000"), Some("41"), 42), None);
        assert_eq!(watchdog_interval(Some("3000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval(None, Some("42"), 42), None);
        assert_eq!(watchdog_interval(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 42), None);
    }

    #[test]
    fn the_monotonic_clock_moves_forward_in_microseconds() {
        let first = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        let second = monotonic_usec();
        assert!(second >= first + 2_000, "{first} then {second}");
    }
}
