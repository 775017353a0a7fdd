//! iamproxy: a reverse-proxy gateway in front of a legacy OAuth server (Rails) that moves
//! OAuth traffic to an IAM Auth Service one client application at a time, and fails open
//! to Rails whenever IAM or the routing backend misbehaves.
//!
//! The modules follow a request through the gateway:
//! [`server`] accepts it, [`classify`] names the endpoint, [`params`] reads its query and
//! form body once, [`classify`] sends codes and tokens back to their issuer, [`identify`]
//! finds the client application, [`rollout`] applies the rules before the cache, [`cache`]
//! and [`preauth`] decide where the rest goes, [`forward`] and [`headers`] build the upstream request, [`fallback`] replays it to
//! Rails when IAM fails, [`respond`] maps errors to statuses, and [`logging`] and [`metrics`]
//! write it down.
//! [`proxy`] runs those steps in order.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod classify;
pub mod config;
pub mod connection;
pub mod decision;
pub mod demo;
pub mod fallback;
pub mod fleet;
pub mod forward;
pub mod headers;
pub mod identify;
pub mod log_writer;
pub mod logging;
pub mod metrics;
pub mod params;
pub mod preauth;
pub mod proxy;
pub mod respond;
pub mod rollout;
pub mod server;
pub mod state;
pub mod tls;
pub mod upgrade;

use std::future::Future;
use std::path::{Path, PathBuf};

pub use config::Config;
pub use server::{Gateway, StartError};

/// The version reported by `--version` and sent to the pre-authorize backend.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Binds the listeners and serves until `shutdown` resolves and in-flight requests drain.
/// SIGHUP re-reads `config_path` and swaps the new configuration in (see
/// [`server::Reloader::apply`]); an invalid file is logged and the running configuration
/// stays. `log_level` is the process's log handle from [`logging::init`], if it owns one.
pub async fn run(
    config_path: &Path,
    config: Config,
    log_level: Option<logging::LogLevel>,
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
    reloader: server::Reloader,
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
