//! Accepting connections on a listener: one permit per connection, each connection served
//! with the TLS acceptor and timeouts current when it was accepted, and each holding a
//! drain token so shutdown can wait for it. What happens at the limit is the listener's
//! choice ([`WhenFull`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::connection::{self, Conn, Draining, Timeouts};
use super::listener::{Listen, Listener};
use crate::config::ServerConfig;

/// What a connection is served with: read from the configuration current at accept, so
/// a reload changes them for the next connections.
pub struct Settings {
    pub tls: Option<TlsAcceptor>,
    pub timeouts: Timeouts,
}

/// How many connections a listener serves at once, what it does when they are all taken,
/// how large a request head may be, and how many streams an HTTP/2 connection may open.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub when_full: WhenFull,
    /// Request line plus headers; larger gets 431.
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
}

impl Limits {
    /// The main listener's, from `[server]`.
    pub fn of(server: &ServerConfig) -> Limits {
        Limits {
            max_connections: server.max_connections,
            when_full: WhenFull::Wait,
            max_header_bytes: server.max_header_bytes,
            h2_max_concurrent_streams: server.h2_max_concurrent_streams,
        }
    }
}

/// What a listener does with a new connection when `max_connections` are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop accepting: new connections wait in the kernel's backlog until one closes. For
    /// the main listener, whose clients retry and whose open connections are real work.
    Wait,
    /// Accept, and close the open connection that has gone longest without a request in
    /// flight to make room (nginx does the same with idle keep-alive connections when it
    /// runs out). For the admin listener: a liveness or readiness probe must answer even
    /// when someone holds every connection open doing nothing, or the orchestrator restarts
    /// a healthy gateway. Only when every connection is serving a request does the new one
    /// wait. A request whose first bytes arrive just as its idle connection is chosen is
    /// cut off; under that pressure, that is the price of the probes answering.
    CloseOldestIdle,
}

/// How one listener's connections are accepted and served.
pub struct Accept<M> {
    builder: auto::Builder<TokioExecutor>,
    settings: Box<dyn Fn() -> Settings + Send + Sync>,
    /// Every connection holds one of its tokens; see [`Draining::drain`].
    pub draining: Draining,
    /// One permit per open connection: when none is left, see `when_full`.
    connections: Arc<Semaphore>,
    max_connections: usize,
    when_full: WhenFull,
    /// With [`WhenFull::CloseOldestIdle`], the connections that may be open: what to choose
    /// from when full. Only the accept loop touches it.
    open: Mutex<Vec<Tracked>>,
    /// Builds the service of each connection.
    make: M,
}

/// An accepted connection as [`WhenFull::CloseOldestIdle`] sees it.
struct Tracked {
    accepted: Instant,
    /// Filled in once the connection is served (after a TLS handshake, if any).
    conn: Arc<OnceLock<Weak<Conn>>>,
    task: AbortHandle,
}

impl Tracked {
    /// Since when it has had no request in flight; `None` while it has one, or once closed.
    fn idle_since(&self) -> Option<Instant> {
        if self.task.is_finished() {
            return None;
        }
        match self.conn.get() {
            Some(conn) => conn.upgrade()?.idle_since(),
            // Still in its handshake: idle since accept.
            None => Some(self.accepted),
        }
    }
}

/// Which of `idle` (each connection's `idle_since`) has been idle longest.
fn oldest_idle(idle: impl IntoIterator<Item = Option<Instant>>) -> Option<usize> {
    idle.into_iter()
        .enumerate()
        .filter_map(|(i, since)| Some((since?, i)))
        .min()
        .map(|(_, i)| i)
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
            max_connections: limits.max_connections,
            when_full: limits.when_full,
            open: Mutex::new(Vec::new()),
            make,
        }
    }

    /// Accepts connections on either kind of listener until `stop` resolves.
    pub async fn on(&self, listener: &Listener, stop: impl Future) {
        match listener {
            Listener::Tcp(tcp) => self.until(tcp, stop).await,
            Listener::Unix(unix) => self.until(unix, stop).await,
        }
    }

    /// Accepts connections until `stop` resolves.
    pub async fn until<L: Listen + Sync>(&self, listener: &L, stop: impl Future) {
        tokio::pin!(stop);
        loop {
            let waited = match self.when_full {
                WhenFull::Wait => tokio::select! {
                    permit = self.permit() => Some(permit),
                    _ = &mut stop => return,
                },
                // Accept first: whether to make room depends on there being someone waiting.
                WhenFull::CloseOldestIdle => None,
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
            let permit = match waited {
                Some(permit) => permit,
                None => tokio::select! {
                    permit = self.make_room() => permit,
                    _ = &mut stop => return,
                },
            };
            let Settings { tls, timeouts } = (self.settings)();
            // Only a listener that may close a connection to make room keeps an eye on them.
            let slot = (self.when_full == WhenFull::CloseOldestIdle)
                .then(|| Arc::new(OnceLock::<Weak<Conn>>::new()));
            let make = {
                let (make, slot) = (self.make.clone(), slot.clone());
                move |conn: Arc<Conn>| {
                    if let Some(slot) = slot {
                        let _ = slot.set(Arc::downgrade(&conn));
                    }
                    make(conn)
                }
            };
            let (builder, drain) = (self.builder.clone(), self.draining.token());
            // The connection's future is made inside the task's: made outside and moved in,
            // it would be kept twice in the task, and copied whole at each spawn.
            let task = tokio::spawn(async move {
                connection::serve(stream, peer, tls, builder, timeouts, drain, make).await;
                drop(permit);
            });
            if let Some(slot) = slot {
                self.track(Tracked {
                    accepted: Instant::now(),
                    conn: slot,
                    task: task.abort_handle(),
                });
            }
        }
    }

    async fn permit(&self) -> OwnedSemaphorePermit {
        match self.connections.clone().acquire_owned().await {
            Ok(permit) => permit,
            // Closed: never happens, the semaphore is ours and never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// A permit for a connection just accepted: a free one, or the one the connection idle
    /// longest gives back when it is closed (its task aborted, which drops the stream and
    /// the permit); if every connection has a request in flight, the next to close.
    async fn make_room(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.connections.clone().try_acquire_owned() {
            return permit;
        }
        {
            let open = self
                .open
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(i) = oldest_idle(open.iter().map(Tracked::idle_since)) {
                tracing::debug!(
                    connections = open.len(),
                    "listener full: closing the connection idle longest"
                );
                open[i].task.abort();
            }
        }
        self.permit().await
    }

    fn track(&self, tracked: Tracked) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // At most `max_connections` are open, so pruning at twice that keeps the list
        // bounded and costs each connection a bounded number of looks.
        if open.len() >= 2 * self.max_connections {
            open.retain(|tracked| !tracked.task.is_finished());
        }
        open.push(tracked);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_connection_idle_longest_is_chosen_and_busy_ones_never() {
        let t0 = Instant::now();
        let at = |secs| Some(t0 + Duration::from_secs(secs));
        assert_eq!(oldest_idle([at(5), at(2), None, at(9)]), Some(1));
        assert_eq!(oldest_idle([None, at(7)]), Some(1));
        assert_eq!(
            oldest_idle([None, None]),
            None,
            "all busy: nobody is closed"
        );
        assert_eq!(oldest_idle([]), None);
    }
}
