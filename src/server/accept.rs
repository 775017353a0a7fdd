//! Accepting connections on a listener: one permit per connection, each connection served
//! with the TLS acceptor and timeouts current when it was accepted, and each holding a
//! drain token so shutdown can wait for it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::connection::{self, Conn, Draining, Timeouts};
use crate::config::ServerConfig;

/// What a connection is served with: read from the configuration current at accept, so
/// a reload changes them for the next connections.
pub struct Settings {
    pub tls: Option<TlsAcceptor>,
    pub timeouts: Timeouts,
}

/// How many connections a listener serves at once, how large a request head may be, and
/// how many streams an HTTP/2 connection may open.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Request line plus headers; larger gets 431.
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
}

impl Limits {
    /// The main listener's, from `[server]`.
    pub fn of(server: &ServerConfig) -> Limits {
        Limits {
            max_connections: server.max_connections,
            max_header_bytes: server.max_header_bytes,
            h2_max_concurrent_streams: server.h2_max_concurrent_streams,
        }
    }
}

/// How one listener's connections are accepted and served.
pub struct Accept<M> {
    builder: auto::Builder<TokioExecutor>,
    settings: Box<dyn Fn() -> Settings + Send + Sync>,
    /// Every connection holds one of its tokens; see [`Draining::drain`].
    pub draining: Draining,
    /// One permit per open connection: when none is left, accepting waits and new
    /// connections queue in the kernel's backlog.
    connections: Arc<Semaphore>,
    /// Builds the service of each connection.
    make: M,
}

impl<M, S, B> Accept<M>
where
    M: Fn(Arc<Conn>) -> S + Clone + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(
        limits: Limits,
        settings: impl Fn() -> Settings + Send + Sync + 'static,
        make: M,
    ) -> Accept<M> {
        Accept {
            builder: connection_builder(limits),
            settings: Box::new(settings),
            draining: Draining::default(),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            make,
        }
    }

    /// Accepts connections until `stop` resolves.
    pub async fn until(&self, listener: &TcpListener, stop: impl Future) {
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                permit = self.connections.clone().acquire_owned() => match permit {
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
            let Settings { tls, timeouts } = (self.settings)();
            let serving = connection::serve(
                stream,
                peer,
                tls,
                self.builder.clone(),
                timeouts,
                self.draining.token(),
                self.make.clone(),
            );
            tokio::spawn(async move {
                serving.await;
                drop(permit);
            });
        }
    }
}

/// The connection timeouts from the configuration.
pub fn timeouts(server: &ServerConfig) -> Timeouts {
    Timeouts {
        handshake_and_header_read: server.header_read_timeout,
        idle: server.idle_timeout,
        write: server.write_timeout,
    }
}

/// HTTP/1.1, and HTTP/2 (by ALPN over TLS, by prior knowledge in cleartext). Headers over
/// `max_header_bytes` (or more than hyper's 100 fields) get 431; an HTTP/2 client may open
/// `h2_max_concurrent_streams` streams at once (nginx's default is 128). The header read and idle
/// timeouts are [`connection`]'s, not hyper's: hyper's header timer also runs while a
/// keep-alive connection waits for its next request, which would make the two one.
pub(super) fn connection_builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}
