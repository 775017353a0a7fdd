//! Listeners: accepting connections (HTTP/1.1 and HTTP/2 on one port, over TLS when
//! `[server.tls]` is set), the admin endpoints, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::{service_fn, Service};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::config::{Config, LogFormat, RedisConfig, ServerConfig};
use crate::connection::{self, Conn, Draining, Timeouts};
use crate::fleet;
use crate::forward::ResponseBody;
use crate::logging::LogLevel;
use crate::metrics;
use crate::proxy;
use crate::respond::text_response;
use crate::state::AppState;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
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
    main: TcpListener,
    admin: TcpListener,
}

/// What every request reads first: the current state, swapped whole by a reload, so a
/// request sees one configuration from start to end.
pub struct Live {
    state: ArcSwap<AppState>,
    /// Readiness: false once shutdown has begun.
    ready: AtomicBool,
}

impl Live {
    pub fn current(&self) -> Arc<AppState> {
        self.state.load_full()
    }
}

impl Gateway {
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let main = bind("server.listen", config.server.listen).await?;
        let admin = bind("server.admin_listen", config.server.admin_listen).await?;
        Ok(Gateway {
            started: config.server.clone(),
            redis: config.redis.clone(),
            live: Arc::new(Live {
                state: ArcSwap::from_pointee(AppState::new(config)),
                ready: AtomicBool::new(true),
            }),
            main,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.main.local_addr().unwrap_or(self.started.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.started.admin_listen)
    }

    pub fn state(&self) -> Arc<AppState> {
        self.live.current()
    }

    /// Applies new configurations to this gateway while it serves.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            live: self.live.clone(),
            started: self.started.clone(),
            redis: self.redis.clone(),
            log: None,
        }
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
        let subscription = redis.map(|redis| fleet::subscribe(live.clone(), redis));
        let builder = connection_builder(&started);
        let draining = Draining::default();
        let connections = Arc::new(Semaphore::new(started.max_connections));
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_builder = connection_builder(&started);
        let admin_task = tokio::spawn(serve_admin(admin, live.clone(), admin_builder, async {
            let _ = admin_stopped.await;
        }));

        // Each connection is served with the configuration current when it was accepted:
        // a reload changes the certificate and the timeouts for the next ones.
        let listener = || {
            let state = live.current();
            let server = &state.config.server;
            // The listener keeps the scheme it started with; see `listener_changes`.
            let tls = started
                .tls
                .as_ref()
                .map(|started| server.tls.as_ref().unwrap_or(started))
                .map(|tls| TlsAcceptor::from(tls.config.clone()));
            (tls, timeouts(server))
        };
        let proxy_service = {
            let live = live.clone();
            move |conn: Arc<Conn>| {
                let live = live.clone();
                service_fn(move |request| {
                    let state = live.current();
                    let conn = conn.clone();
                    async move {
                        let _in_flight = conn.request_started();
                        Ok::<_, Infallible>(proxy::handle(&state, &conn, request).await)
                    }
                })
            }
        };

        tokio::pin!(shutdown);
        accept_until(
            &main,
            (&builder, &listener),
            &draining,
            &connections,
            proxy_service.clone(),
            shutdown,
        )
        .await;
        live.ready.store(false, Ordering::Release);
        let server = live.current().config.server.clone();
        tracing::info!(
            delay_ms = millis(server.graceful_shutdown_delay),
            "shutting down: readiness reports 503"
        );
        let delay = tokio::time::sleep(server.graceful_shutdown_delay);
        accept_until(
            &main,
            (&builder, &listener),
            &draining,
            &connections,
            proxy_service,
            delay,
        )
        .await;
        drop(main);

        let in_flight = draining.count();
        tracing::info!(
            connections = in_flight,
            "listener closed, draining connections and tunnels"
        );
        match tokio::time::timeout(server.shutdown_timeout, draining.drain()).await {
            Ok(()) => tracing::info!("drained, exiting"),
            Err(_) => tracing::warn!(
                timeout_ms = millis(server.shutdown_timeout),
                "requests still in flight at shutdown_timeout, exiting anyway"
            ),
        }
        let _ = stop_admin.send(());
        let _ = admin_task.await;
        if let Some(subscription) = subscription {
            subscription.abort();
        }
    }
}

/// Swaps a new configuration into a serving gateway.
#[derive(Clone)]
pub struct Reloader {
    live: Arc<Live>,
    started: ServerConfig,
    redis: Option<RedisConfig>,
    /// The process's logs, when this gateway owns them: their level reloads, their format
    /// does not.
    log: Option<(LogLevel, LogFormat)>,
}

impl Reloader {
    /// Also applies `log.level` to the process's logs, started with `format`.
    pub fn with_logs(mut self, level: LogLevel, format: LogFormat) -> Reloader {
        self.log = Some((level, format));
        self
    }

    /// Swaps `config` in: requests that start from now on use it, requests in flight
    /// finish with the one they started with, and no connection is dropped. Settings the
    /// listeners were built with cannot change without a restart; their keys are
    /// returned, and they keep their old values.
    pub fn apply(&self, config: Config) -> Vec<&'static str> {
        let mut needs_restart = listener_changes(&self.started, &config.server);
        if self.redis != config.redis {
            needs_restart.push("redis");
        }
        if let Some((level, format)) = &self.log {
            level.set(config.log.level);
            if *format != config.log.format {
                needs_restart.push("log.format");
            }
        }
        let next = self.live.current().reloaded(config);
        self.live.state.store(Arc::new(next));
        needs_restart
    }
}

/// The keys whose values the listeners were built with and so keep until a restart.
fn listener_changes(started: &ServerConfig, new: &ServerConfig) -> Vec<&'static str> {
    [
        ("server.listen", started.listen != new.listen),
        (
            "server.admin_listen",
            started.admin_listen != new.admin_listen,
        ),
        ("server.tls", started.tls.is_some() != new.tls.is_some()),
        (
            "server.max_connections",
            started.max_connections != new.max_connections,
        ),
        (
            "server.max_header_bytes",
            started.max_header_bytes != new.max_header_bytes,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

/// HTTP/1.1, and HTTP/2 (by ALPN over TLS, by prior knowledge in cleartext). Headers over
/// `max_header_bytes` (or more than hyper's 100 fields) get 431. The header read and idle
/// timeouts are [`connection`]'s, not hyper's: hyper's header timer also runs while a
/// keep-alive connection waits for its next request, which would make the two one.
fn connection_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(server.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

fn timeouts(server: &ServerConfig) -> Timeouts {
    Timeouts {
        handshake_and_header_read: server.header_read_timeout,
        idle: server.idle_timeout,
    }
}

/// Accepts connections until `stop` resolves, serving each with the service `make`
/// builds for it, with the TLS acceptor and timeouts `settings` gives at accept. Every
/// connection holds a token of `draining`, so a later `draining.drain()` lets its
/// in-flight requests finish. Each connection holds one of `connections`' permits; when
/// none is left, accepting waits and new connections queue in the kernel's backlog.
pub async fn accept_until<M, S, B>(
    listener: &TcpListener,
    (builder, settings): (
        &auto::Builder<TokioExecutor>,
        &(dyn Fn() -> (Option<TlsAcceptor>, Timeouts) + Sync),
    ),
    draining: &Draining,
    connections: &Arc<Semaphore>,
    make: M,
    stop: impl Future,
) where
    M: Fn(Arc<Conn>) -> S + Clone + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // closed: never happens, the semaphore is ours
            },
            _ = &mut stop => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let _ = stream.set_nodelay(true);
        let (tls, timeouts) = settings();
        let serving = connection::serve(
            stream,
            peer,
            tls,
            builder.clone(),
            timeouts,
            draining.token(),
            make.clone(),
        );
        tokio::spawn(async move {
            serving.await;
            drop(permit);
        });
    }
}

/// `/-/liveness`, `/-/readiness` and `/metrics` on the admin listener.
async fn serve_admin(
    listener: TcpListener,
    live: Arc<Live>,
    builder: auto::Builder<TokioExecutor>,
    stop: impl Future,
) {
    let draining = Draining::default();
    let connections = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let settings = || (None, timeouts(&live.current().config.server));
    let make = {
        let live = live.clone();
        move |conn: Arc<Conn>| {
            let live = live.clone();
            service_fn(move |request: Request<Incoming>| {
                let live = live.clone();
                let conn = conn.clone();
                async move {
                    let _in_flight = conn.request_started();
                    Ok::<_, Infallible>(admin_response(&live, &request).await)
                }
            })
        }
    };
    accept_until(
        &listener,
        (&builder, &settings),
        &draining,
        &connections,
        make,
        stop,
    )
    .await;
}

/// Scrapers and probes need few connections; a flood of them must not starve the process.
const ADMIN_CONNECTIONS: usize = 64;

async fn admin_response(live: &Live, request: &Request<Incoming>) -> Response<ResponseBody> {
    let path = request.uri().path();
    if path.starts_with(admin::PREFIX) {
        let state = live.current();
        return admin::respond(&state, request.method(), path, request.headers()).await;
    }
    match path {
        "/-/liveness" => text_response(StatusCode::OK, "ok\n"),
        "/-/readiness" if live.ready.load(Ordering::Acquire) => {
            text_response(StatusCode::OK, "ready\n")
        }
        "/-/readiness" => text_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        "/metrics" => {
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(
                live.current().render_metrics().await,
            ))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(extra: &str) -> ServerConfig {
        Config::from_toml(&format!(
            "[server]\n{extra}\n[rails]\nurl = \"http://127.0.0.1:1\"\n"
        ))
        .unwrap()
        .server
    }

    #[test]
    fn only_listener_bound_keys_are_reported_as_needing_a_restart() {
        let started = server("");
        assert!(listener_changes(&started, &server("max_body_bytes = 10")).is_empty());
        let changed = server("listen = \"127.0.0.1:1\"\nmax_connections = 5");
        assert_eq!(
            listener_changes(&started, &changed),
            ["server.listen", "server.max_connections"]
        );
    }
}
