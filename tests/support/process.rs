//! The `iamproxy` binary as a child process, with its output collected as it arrives, the
//! temp files and loopback ports it is started with, and probes that poll it from outside.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use super::Answer;

/// Longest any step may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running `iamproxy`: stdout and stderr collected as they arrive, exit status published
/// when it exits. Dropping it kills the process if it is still running, so a failing test
/// leaves nothing behind.
pub struct Iamproxy {
    pub pid: u32,
    pub stdout: watch::Receiver<String>,
    pub stderr: watch::Receiver<String>,
    pub exit: watch::Receiver<Option<ExitStatus>>,
}

impl Iamproxy {
    pub fn start(args: &[&str]) -> Iamproxy {
        Iamproxy::start_filtered(args, |_| true)
    }

    /// Like [`Iamproxy::start`], but keeps only the stderr lines `keep` returns true for:
    /// a long run's access log would otherwise pile up in the test's memory. `keep` sees
    /// every line, in order, on the reading thread, so it can count them too; it must be
    /// quick, as a slow reader ends up blocking the gateway's log writes.
    pub fn start_filtered(
        args: &[&str],
        keep: impl FnMut(&str) -> bool + Send + 'static,
    ) -> Iamproxy {
        Iamproxy::start_in(args, &[], keep)
    }

    /// Like [`Iamproxy::start`], with `env` added to its environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Iamproxy {
        Iamproxy::start_in(args, env, |_| true)
    }

    /// Runs to completion with `env` added to its environment.
    pub async fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (Iamproxy, ExitStatus) {
        let mut process = Iamproxy::start_with_env(args, env);
        let status = process.exit_status(PATIENCE).await;
        (process, status)
    }

    fn start_in(
        args: &[&str],
        env: &[(&str, &str)],
        keep: impl FnMut(&str) -> bool + Send + 'static,
    ) -> Iamproxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_iamproxy"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start iamproxy");
        let stdout = collect(child.stdout.take(), |_| true);
        let stderr = collect(child.stderr.take(), keep);
        let (exited, exit) = watch::channel(None);
        let pid = child.id();
        std::thread::spawn(move || {
            let status = child.wait().expect("wait for iamproxy");
            // All output is in once the status is published.
            let _ = stdout.1.join();
            let _ = stderr.1.join();
            exited.send_replace(Some(status));
        });
        Iamproxy {
            pid,
            stdout: stdout.0,
            stderr: stderr.0,
            exit,
        }
    }

    /// Runs to completion: `iamproxy --version`, `--check`, …
    pub async fn run(args: &[&str]) -> (Iamproxy, ExitStatus) {
        let mut process = Iamproxy::start(args);
        let status = process.exit_status(PATIENCE).await;
        (process, status)
    }

    pub fn stdout(&self) -> String {
        self.stdout.borrow().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.borrow().clone()
    }

    /// The exit status, or `None` while it runs.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name} {} failed", self.pid);
    }

    /// Waits for the process to exit, failing the test after `within`.
    pub async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let exited = tokio::time::timeout(within, self.exit.wait_for(Option::is_some)).await;
        match exited.map(|status| status.map(|status| status.expect("published"))) {
            Ok(Ok(status)) => status,
            _ => panic!(
                "iamproxy still running after {within:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Waits for the process to exit and asserts it exited 0.
    pub async fn assert_exits_cleanly(&mut self) {
        let status = self.exit_status(PATIENCE).await;
        assert!(status.success(), "{status}; stderr:\n{}", self.stderr());
    }

    /// Waits until stdout holds `needle`, and returns all of stdout.
    pub async fn stdout_containing(&mut self, needle: &str) -> String {
        let found = self.stdout.wait_for(|out| out.contains(needle));
        match tokio::time::timeout(PATIENCE, found)
            .await
            .map(|out| out.map(|out| out.clone()))
        {
            Ok(Ok(out)) => out,
            _ => panic!(
                "stdout never contained {needle:?}; stdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            ),
        }
    }
}

impl Drop for Iamproxy {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.pid.to_string())
                .status();
        }
    }
}

/// Reads a pipe line by line on its own thread, publishing the lines `keep` wants so far.
fn collect(
    pipe: Option<impl Read + Send + 'static>,
    mut keep: impl FnMut(&str) -> bool + Send + 'static,
) -> (watch::Receiver<String>, std::thread::JoinHandle<()>) {
    let pipe = pipe.expect("piped");
    let (sender, receiver) = watch::channel(String::new());
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if !keep(&line) {
                continue;
            }
            sender.send_modify(|text| {
                text.push_str(&line);
                text.push('\n');
            });
        }
    });
    (receiver, reader)
}

/// A file under the temp dir, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(contents: &str) -> TempFile {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "iamproxy-file-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A loopback address that was free a moment ago: the binary cannot report a port 0 choice.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A `kB` field of `/proc/<process>/status` (`VmRSS`, `VmHWM`, …), in bytes; `process` is
/// a pid or `"self"`.
pub fn status_bytes(process: impl std::fmt::Display, field: &str) -> u64 {
    let path = format!("/proc/{process}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in {path}"));
    match value.split_whitespace().collect::<Vec<_>>()[..] {
        [kib, "kB"] => kib.parse::<u64>().map(|kib| kib * 1024).ok(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{path}: {field}:{value}, want a count of kB"))
}

/// Resident memory (`VmRSS`) of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// Resident memory (`VmRSS`) of this test process, where an in-process gateway runs, in
/// bytes.
pub fn own_rss() -> u64 {
    status_bytes("self", "VmRSS")
}

/// Peak resident memory (`VmHWM`) of this test process, in bytes.
pub fn own_peak_rss() -> u64 {
    status_bytes("self", "VmHWM")
}

/// `GET path` on a fresh connection, or `None` when there is no (complete) answer.
pub async fn try_get(addr: SocketAddr, path: &str) -> Option<Answer> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri = format!("http://{addr}{path}").parse().unwrap();
    let (parts, body) = client.get(uri).await.ok()?.into_parts();
    Some(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.ok()?.to_bytes(),
    })
}

/// The status of `GET path` on a fresh connection, or `None` when there is no answer
/// within a second.
pub async fn probe(addr: SocketAddr, path: &str) -> Option<StatusCode> {
    let answer = tokio::time::timeout(Duration::from_secs(1), try_get(addr, path)).await;
    answer.ok().flatten().map(|answer| answer.status)
}

/// [`super::until`] with the patience a process test allows itself.
pub async fn poll_until<F>(what: &str, condition: impl FnMut() -> F)
where
    F: std::future::Future<Output = bool>,
{
    super::until(PATIENCE, what, condition).await;
}

/// The commit the binary under test was built from, found independently of its build
/// script: `IAMPROXY_GIT_COMMIT` when the build was given one, else `git rev-parse --short
/// HEAD` in the crate, else `unknown` (no git).
pub fn git_commit() -> String {
    if let Some(commit) = std::env::var("IAMPROXY_GIT_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
    {
        return commit.trim().to_owned();
    }
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|commit| commit.trim().to_owned())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
