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
//! - [`observe`] writes it down: metrics and logs.
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

pub use config::Config;
pub use server::{Gateway, StartError};
pub use state::Reloader;

/// The version reported by `--version` and sent to the pre-authorize backend.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Binds the listeners and serves until `shutdown` resolves and in-flight requests drain.
/// SIGHUP re-reads `config_path` and swaps the new configuration in (see
/// [`Reloader::apply`]); an invalid file is logged and the running configuration stays.
/// `log_level` is the process's log handle from [`observe::logging::init`], if it owns one.
pub async fn run(
    config_path: &Path,
    config: Config,
    log_level: Option<observe::logging::LogLevel>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before serving: SIGHUP's default action would end the process.
    let hangups = signal(SignalKind::hangup());
    let log_format = config.log.format;
    let gateway = Gateway::bind(config).await?;
    let mut reloader = gateway.reloader();
    if let Some(level) = log_level {
        reloader = reloader.with_logs(level, log_format);
    }
    let reloads = match hangups {
        Ok(hangups) => Some(tokio::spawn(reload_on_sighup(
            config_path.to_owned(),
            hangups,
            reloader,
        ))),
        Err(error) => {
            tracing::warn!(error = %error, "cannot install the SIGHUP handler: no config reload");
            None
        }
    };
    gateway.serve(shutdown).await;
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    Ok(())
}

async fn reload_on_sighup(
    path: PathBuf,
    mut hangups: tokio::signal::unix::Signal,
    reloader: Reloader,
) {
    while hangups.recv().await.is_some() {
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(
                    path = %path.display(),
                    error = %error,
                    "config reload failed: the running configuration stays"
                );
                continue;
            }
        };
        for key in reloader.apply(config) {
            tracing::warn!(
                key,
                "config reload: this key keeps its old value until a restart"
            );
        }
        tracing::info!(path = %path.display(), "config reloaded");
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
