//! iamproxy: a reverse-proxy gateway in front of a legacy OAuth server (Rails) that moves
//! OAuth traffic to an IAM Auth Service one client application at a time, and fails open
//! to Rails whenever IAM or the routing backend misbehaves.
//!
//! The folders follow a request through the gateway:
//! - [`server`] binds the listeners, accepts connections, serves the admin listener and
//!   drains on shutdown;
//! - [`proxy`] runs one request's phases in order: classify, buffer, decide, forward,
//!   record;
//! - [`classify`] says what a request is: its endpoint, its query and form body, who
//!   issued its codes and tokens, which client application it belongs to;
//! - [`decision`] says where it goes: the decision and its reasons, the `[routing]`
//!   controls, the pre-authorize client, the decision cache and its fleet-wide
//!   invalidation;
//! - [`forward`] builds and sends the upstream requests: headers, upgrades, the pooled
//!   clients, the IAM breaker;
//! - [`respond`] makes the gateway's own responses and maps errors to statuses;
//! - [`observe`] writes it down: metrics, logs and traces.
//!
//! [`config`] reads the TOML file; [`state`] holds what every request shares and swaps it
//! on reload.
#![forbid(unsafe_code)]

pub mod classify;
pub mod config;
pub mod decision;
pub mod forward;
pub mod observe;
pub mod proxy;
pub mod respond;
pub mod server;
pub mod state;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use server::systemd::Notifier;

pub use config::Config;
pub use server::{Gateway, StartError};
pub use state::Reloader;

/// The version reported by `--version` and sent to the pre-authorize backend.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from (short hash), or `unknown` (see `build.rs`).
pub const COMMIT: &str = env!("IAMPROXY_GIT_COMMIT");

/// `--version`'s text after the name: the version and the commit, `0.1.0 (1a2b3c4)`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("IAMPROXY_GIT_COMMIT"),
    ")"
);

/// Binds the listeners and serves until `shutdown` resolves and in-flight requests drain.
/// SIGHUP re-reads `config_path` and swaps the new configuration in (see
/// [`Reloader::apply`]); an invalid file is logged and the running configuration stays.
/// `log_level` is the process's log handle from [`observe::logging::init`], if it owns one.
/// Started by systemd (`NOTIFY_SOCKET`), it reports readiness, reloads, shutdown and the
/// watchdog's keep-alives ([`server::systemd`]).
pub async fn run(
    config_path: &Path,
    config: Config,
    log_level: Option<observe::logging::LogLevel>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before serving: SIGHUP's default action would end the process.
    let hangups = signal(SignalKind::hangup());
    let log_config = config.log.clone();
    let gateway = Gateway::bind(config).await?;
    let notify = Arc::new(Notifier::from_env());
    let mut reloader = gateway.reloader();
    if let Some(level) = log_level {
        reloader = reloader.with_logs(level, &log_config);
    }
    let reloads = match hangups {
        Ok(hangups) => Some(tokio::spawn(reload_on_sighup(
            config_path.to_owned(),
            hangups,
            reloader,
            notify.clone(),
        ))),
        Err(error) => {
            tracing::warn!(error = %error, "cannot install the SIGHUP handler: no config reload");
            None
        }
    };
    let watchdog = server::systemd::watchdog_interval_from_env()
        .filter(|_| notify.is_enabled())
        .map(|every| tokio::spawn(keep_watchdog_fed(notify.clone(), every)));
    // Every listener is bound: connections queue in their backlogs from here on.
    notify.ready();
    let shutdown = {
        let notify = notify.clone();
        async move {
            shutdown.await;
            notify.stopping();
        }
    };
    gateway.serve(shutdown).await;
    for task in [reloads, watchdog].into_iter().flatten() {
        task.abort();
    }
    Ok(())
}

async fn reload_on_sighup(
    path: PathBuf,
    mut hangups: tokio::signal::unix::Signal,
    reloader: Reloader,
    notify: Arc<Notifier>,
) {
    while hangups.recv().await.is_some() {
        notify.reloading();
        reloader.reload(&path);
        // Serving either way: with the new configuration, or the old one after a failure.
        notify.ready();
    }
}

/// `WATCHDOG=1` every `every` (half of `WatchdogSec=`) from a task on the runtime, so a
/// runtime that stops running tasks stops feeding it and systemd restarts the service.
async fn keep_watchdog_fed(notify: Arc<Notifier>, every: std::time::Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        notify.watchdog();
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled, so call it before the listeners report ready: a
/// signal in between would otherwise kill the process instead of draining it.
/// Must be called inside the tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let (mut terminate, mut interrupt) = match (terminate, interrupt) {
            (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(error = %error, "cannot install signal handlers");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
}
