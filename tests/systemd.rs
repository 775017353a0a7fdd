//! systemd: the real binary's notifications, received on a real datagram socket as systemd
//! would receive them (`READY=1` once the listeners are bound, `RELOADING=1` with
//! `MONOTONIC_USEC` then `READY=1` around each SIGHUP, `STOPPING=1` when draining starts,
//! `WATCHDOG=1` at half of `WATCHDOG_USEC`), and the unit file in `packaging/` checked by
//! `systemd-analyze verify`.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iamproxy::server::systemd::monotonic_usec;
use support::process::{free_addr, Iamproxy, TempFile, PATIENCE};
use support::FakeUpstream;
use tokio::net::UnixDatagram;

/// A notification socket in a temp dir of its own, as systemd binds one.
struct NotifySocket {
    socket: UnixDatagram,
    /// What `NOTIFY_SOCKET` is set to: the path, or `@` and the abstract name.
    name: String,
    dir: Option<PathBuf>,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl NotifySocket {
    fn in_temp_dir() -> NotifySocket {
        let dir = std::env::temp_dir().join(format!(
            "iamproxy-notify-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            socket,
            name: path.to_str().unwrap().to_owned(),
            dir: Some(dir),
        }
    }

    /// An abstract socket (`@name`), the kind systemd itself uses for its own notify socket.
    fn abstract_name() -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "iamproxy-notify-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_nonblocking(true).unwrap();
        NotifySocket {
            socket: UnixDatagram::from_std(socket).unwrap(),
            name: format!("@{name}"),
            dir: None,
        }
    }

    /// The next notification, or `None` when none arrives `within`.
    async fn next_within(&self, within: Duration) -> Option<String> {
        let mut buffer = vec![0u8; 4096];
        let received = tokio::time::timeout(within, self.socket.recv(&mut buffer)).await;
        let n = received.ok()?.expect("recv on the notify socket");
        Some(String::from_utf8(buffer[..n].to_vec()).expect("notifications are text"))
    }

    async fn next(&self, process: &Iamproxy) -> String {
        match self.next_within(PATIENCE).await {
            Some(message) => message,
            None => panic!(
                "no notification within {PATIENCE:?}; stderr:\n{}",
                process.stderr()
            ),
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn config(addr: SocketAddr, admin: SocketAddr, rails: &FakeUpstream, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n{extra}\n\
         [rails]\nurl = \"{}\"\n\n[log]\nlevel = \"warn\"\n",
        rails.url()
    )
}

/// The `MONOTONIC_USEC` of a `RELOADING=1` notification.
fn reloading_usec(message: &str) -> u64 {
    message
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|usec| usec.parse().ok())
        .unwrap_or_else(|| panic!("want RELOADING=1 and MONOTONIC_USEC, got {message:?}"))
}

#[tokio::test]
async fn notifies_ready_once_bound_reloading_then_ready_around_each_sighup_and_stopping_on_sigterm()
{
    let rails = FakeUpstream::start("rails").await;
    let notify = NotifySocket::in_temp_dir();
    let (addr, admin) = (free_addr(), free_addr());
    let file = TempFile::new(&config(addr, admin, &rails, ""));
    let mut process = Iamproxy::start_with_env(
        &["--config", file.path()],
        &[("NOTIFY_SOCKET", &notify.name)],
    );

    assert_eq!(notify.next(&process).await, "READY=1");
    // Ready means bound: both listeners take connections from this moment.
    TcpStream::connect(addr).expect("the main listener is bound at READY=1");
    TcpStream::connect(admin).expect("the admin listener is bound at READY=1");

    // A good reload, then a failed one: each is RELOADING=1 at the time it began, then
    // READY=1 (the gateway serves either way).
    for extra in ["max_body_bytes = 4096", "max_body_bytes = 0"] {
        std::fs::write(&file.0, config(addr, admin, &rails, extra)).unwrap();
        let before = monotonic_usec();
        process.signal("HUP");
        let usec = reloading_usec(&notify.next(&process).await);
        let after = monotonic_usec();
        assert!(
            (before..=after).contains(&usec),
            "MONOTONIC_USEC {usec} is when the reload began, on CLOCK_MONOTONIC: \
             between {before} and {after} ({extra})"
        );
        assert_eq!(notify.next(&process).await, "READY=1", "{extra}");
    }
    // The log line is written by the log thread, about a millisecond later.
    let logged = process
        .stderr
        .wait_for(|stderr| stderr.contains("config reload failed"));
    assert!(
        tokio::time::timeout(PATIENCE, logged).await.is_ok(),
        "the failed reload is logged"
    );

    process.sigterm();
    assert_eq!(notify.next(&process).await, "STOPPING=1");
    process.assert_exits_cleanly().await;
    assert_eq!(
        notify.next_within(Duration::from_millis(200)).await,
        None,
        "nothing after STOPPING=1"
    );
}

#[tokio::test]
async fn an_abstract_notify_socket_gets_the_notifications_too() {
    let rails = FakeUpstream::start("rails").await;
    let notify = NotifySocket::abstract_name();
    let (addr, admin) = (free_addr(), free_addr());
    let file = TempFile::new(&config(addr, admin, &rails, ""));
    let mut process = Iamproxy::start_with_env(
        &["--config", file.path()],
        &[("NOTIFY_SOCKET", &notify.name)],
    );
    assert_eq!(notify.next(&process).await, "READY=1");
    process.sigterm();
    assert_eq!(notify.next(&process).await, "STOPPING=1");
    process.assert_exits_cleanly().await;
}

/// Starts the binary with `WATCHDOG_*` set and counts the `WATCHDOG=1` notifications in the
/// `window` after `READY=1`.
async fn watchdog_pings(env: &[(&str, &str)], window: Duration) -> usize {
    let rails = FakeUpstream::start("rails").await;
    let notify = NotifySocket::in_temp_dir();
    let (addr, admin) = (free_addr(), free_addr());
    let file = TempFile::new(&config(addr, admin, &rails, ""));
    let mut vars = vec![("NOTIFY_SOCKET", notify.name.as_str())];
    vars.extend_from_slice(env);
    let mut process = Iamproxy::start_with_env(&["--config", file.path()], &vars);
    let mut pings = 0;
    let mut ready = false;
    let mut until = Instant::now() + PATIENCE;
    while let Some(message) = notify
        .next_within(until.saturating_duration_since(Instant::now()))
        .await
    {
        match message.as_str() {
            "READY=1" if !ready => {
                ready = true;
                until = Instant::now() + window;
            }
            "WATCHDOG=1" => pings += 1,
            other => panic!("unexpected notification {other:?}"),
        }
    }
    assert!(ready, "no READY=1; stderr:\n{}", process.stderr());
    process.sigterm();
    process.assert_exits_cleanly().await;
    pings
}

#[tokio::test]
async fn the_watchdog_is_fed_every_half_watchdog_usec_when_it_is_ours() {
    // 100 ms: a ping every 50 ms, so about 12 in 600 ms; a loaded machine may lose a few.
    let pings = watchdog_pings(&[("WATCHDOG_USEC", "100000")], Duration::from_millis(600)).await;
    assert!((4..=20).contains(&pings), "{pings} pings in 600 ms");
}

#[tokio::test]
async fn the_watchdog_of_another_process_is_left_alone() {
    let pings = watchdog_pings(
        &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")],
        Duration::from_millis(400),
    )
    .await;
    assert_eq!(pings, 0, "WATCHDOG_PID names another process");
}

// ---- The unit file ------------------------------------------------------------------------

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/iamproxy.service")
}

#[test]
fn unit_file_is_type_notify_hardened_and_reloads_with_sighup() {
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/iamproxy --config /etc/iamproxy/iamproxy.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=iamproxy",
        "RuntimeDirectory=iamproxy",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
    ] {
        assert!(lines.contains(&line), "the unit has no line {line:?}");
    }
    assert!(
        lines.iter().any(|line| line.starts_with("WatchdogSec=")),
        "the unit sets WatchdogSec"
    );
}

/// `systemd-analyze verify` checks every directive and that the commands exist, so it runs
/// on a copy whose commands are the binary this test run built.
#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let built = env!("CARGO_BIN_EXE_iamproxy");
    assert!(unit.contains("/usr/bin/iamproxy "), "unit changed shape");
    let dir = std::env::temp_dir().join(format!(
        "iamproxy-unit-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("iamproxy.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/iamproxy ", &format!("{built} ")),
    )
    .unwrap();
    let output = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "systemd-analyze is not on PATH ({error}); run scripts/test.sh, which installs \
             Debian's systemd package"
        ),
        Err(error) => panic!("cannot run systemd-analyze: {error}"),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown keys and unparsable values are warnings: exit 0, but said on stderr.
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        output.status
    );
}
