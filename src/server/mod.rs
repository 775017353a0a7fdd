//! The gateway's listeners from bind to exit: the main listener (HTTP/1.1 and HTTP/2 on one
//! port or Unix socket, over TLS when `[server.tls]` is set) and the admin listener, served
//! until shutdown, then drained.

pub mod accept;
pub mod admin;
pub mod connection;
pub mod listener;
pub mod systemd;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ListenAddr, RedisConfig, ServerConfig};
use crate::decision::fleet;
use crate::proxy;
use crate::state::{AppState, Live, Reloader};
use accept::{timeouts, Accept, Limits, Settings};
use connection::{Conn, Draining};
use listener::Listener;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: ListenAddr,
        source: std::io::Error,
    },
}

/// A gateway whose listeners are bound but not yet serving. Binding first lets callers
/// (tests, the demo) learn the real addresses when they asked for port 0.
pub struct Gateway {
    live: Arc<Live>,
    /// What the listeners were started with; see [`Reloader::apply`].
    started: ServerConfig,
    /// What the Redis subscription was started with.
    redis: Option<RedisConfig>,
    main: Listener,
    admin: Listener,
}

impl Gateway {
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let server = &config.server;
        let main = Listener::bind("server.listen", &server.listen, server.socket_mode).await?;
        let admin = Listener::bind(
            "server.admin_listen",
            &server.admin_listen,
            server.socket_mode,
        )
        .await?;
        Ok(Gateway {
            started: config.server.clone(),
            redis: config.redis.clone(),
            live: Arc::new(Live::new(AppState::new(config))),
            main,
            admin,
        })
    }

    /// The main listener's address, with the port the OS chose for port 0.
    pub fn listen_addr(&self) -> ListenAddr {
        self.main
            .local_addr()
            .unwrap_or_else(|| self.started.listen.clone())
    }

    /// The admin listener's address, as [`Gateway::listen_addr`].
    pub fn admin_listen_addr(&self) -> ListenAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|| self.started.admin_listen.clone())
    }

    /// The main listener's TCP address; `0.0.0.0:0` for a Unix socket, which has none.
    pub fn local_addr(&self) -> SocketAddr {
        tcp_addr(self.listen_addr())
    }

    /// The admin listener's TCP address, as [`Gateway::local_addr`].
    pub fn admin_addr(&self) -> SocketAddr {
        tcp_addr(self.admin_listen_addr())
    }

    pub fn state(&self) -> Arc<AppState> {
        self.live.current()
    }

    /// Applies new configurations to this gateway while it serves.
    pub fn reloader(&self) -> Reloader {
        Reloader::new(self.live.clone(), self.started.clone(), self.redis.clone())
    }

    /// Serves until `shutdown` resolves, then: readiness turns 503; connections are still
    /// accepted for `graceful_shutdown_delay` so load balancers can notice; the listener
    /// closes; in-flight requests get `shutdown_timeout` to finish. Both durations are
    /// read from the configuration current when shutdown begins.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Gateway {
            live,
            started,
            redis,
            main,
            admin,
        } = self;
        let subscription = redis.map(|redis| {
            let live = live.clone();
            fleet::subscribe(redis, move || live.current().cache.clone())
        });
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn({
            let (live, started) = (live.clone(), started.clone());
            async move {
                admin::serve(admin, live, &started, async {
                    let _ = admin_stopped.await;
                })
                .await;
            }
        });
        // Each request is served with the configuration current when it arrived.
        let make = {
            let live = live.clone();
            move |conn: Arc<Conn>| {
                let live = live.clone();
                service_fn(move |request| {
                    let state = live.current();
                    let conn = conn.clone();
                    async move { Ok::<_, Infallible>(proxy::handle(&state, &conn, request).await) }
                })
            }
        };
        let settings = main_settings(&live, &started);
        let accept = Accept::new(Limits::of(&started), settings, make);

        accept.on(&main, shutdown).await;
        let server = begin_shutdown(&live);
        accept
            .on(&main, tokio::time::sleep(server.graceful_shutdown_delay))
            .await;
        // Closed, and a socket file removed, before the wait for what is in flight.
        drop(main);
        drain(&accept.draining, server.shutdown_timeout).await;
        // The last requests' spans, which would otherwise wait for their batch.
        live.current().tracer.flush().await;

        let _ = stop_admin.send(());
        let _ = admin_task.await;
        if let Some(subscription) = subscription {
            subscription.abort();
        }
    }
}

/// What each connection of the main listener is served with: the configuration current
/// when it was accepted, so a reload changes the certificate and the timeouts for the next
/// ones. The listener keeps the scheme it started with; see `listener_changes`.
fn main_settings(
    live: &Arc<Live>,
    started: &ServerConfig,
) -> impl Fn() -> Settings + Send + Sync + 'static {
    let (live, started_tls) = (live.clone(), started.tls.clone());
    move || {
        let state = live.current();
        let server = &state.config.server;
        let tls = started_tls
            .as_ref()
            .map(|started| server.tls.as_ref().unwrap_or(started))
            .map(|tls| TlsAcceptor::from(tls.config.clone()));
        Settings {
            tls,
            timeouts: timeouts(server),
        }
    }
}

/// Readiness turns 503; returns the configuration to drain with.
fn begin_shutdown(live: &Live) -> ServerConfig {
    live.shutting_down();
    let server = live.current().config.server.clone();
    tracing::info!(
        delay_ms = millis(server.graceful_shutdown_delay),
        "shutting down: readiness reports 503"
    );
    server
}

/// Lets the connections (and tunnels) still open finish, for at most `timeout`.
async fn drain(draining: &Draining, timeout: Duration) {
    tracing::info!(
        connections = draining.count(),
        "listener closed, draining connections and tunnels"
    );
    match tokio::time::timeout(timeout, draining.drain()).await {
        Ok(()) => tracing::info!("drained, exiting"),
        Err(_) => tracing::warn!(
            timeout_ms = millis(timeout),
            "requests still in flight at shutdown_timeout, exiting anyway"
        ),
    }
}

fn tcp_addr(addr: ListenAddr) -> SocketAddr {
    match addr {
        ListenAddr::Tcp(addr) => addr,
        ListenAddr::Unix(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
