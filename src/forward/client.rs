//! The upstream clients: one keep-alive pool per upstream (over TCP, TLS or a Unix
//! socket), driving hyper's HTTP/1.1 client connections directly, and the upstreams'
//! names.
//!
//! A pool knows its one upstream, so a checkout is a pop off a short stack: no host
//! hashing, no URI rebuilding, no task spawned per request. A connection goes back on the
//! stack when its response body has been read to the end ([`UpstreamBody`]); a body
//! dropped early takes its connection with it. A request that finds no idle connection
//! opens one, and takes whichever comes first: its own, or one another exchange returns
//! meanwhile (so a burst does not wait on a burst of connects; the connect it did not
//! need then joins the stack). A request that finds its
//! pooled connection closed by the upstream before a byte was sent is sent again on
//! another one.
//!
//! At most `max_connections` connections are open per upstream, idle ones included: a
//! request that finds none idle and none left to open waits up to the connect timeout for
//! one to come back, then fails with [`SendError::Saturated`].
//!
//! A caller that goes away mid-exchange (an HTTP/2 client resetting its stream, a client
//! disconnecting) does not throw the connection away when the rest of the exchange is
//! short: whatever is left of the response (headers, then the body) is read in the
//! background for at most [`ABANDONED_GRACE`] and [`ABANDONED_BYTES`], and the connection
//! goes back to the pool. A request whose body was cut mid-way leaves its connection
//! unusable, and it is closed.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::TrySendError;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::RequestBody;
use crate::config::UpstreamAddress;

/// The upstreams the gateway talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Iam,
    Rails,
    Preauthorize,
}

impl Upstream {
    pub const ALL: [Upstream; 3] = [Upstream::Iam, Upstream::Rails, Upstream::Preauthorize];

    /// The `upstream` label of `iamproxy_upstream_connection_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::Iam => "iam",
            Upstream::Rails => "rails",
            Upstream::Preauthorize => "preauthorize",
        }
    }
}

/// How long an idle upstream connection stays pooled.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream; one more returned closes the oldest.
const MAX_IDLE: usize = 1024;
/// Longest the rest of an abandoned exchange is waited for, to keep its connection.
pub const ABANDONED_GRACE: Duration = Duration::from_secs(2);
/// Most response bytes read and thrown away to keep an abandoned exchange's connection.
pub const ABANDONED_BYTES: usize = 256 * 1024;

/// Why an upstream exchange failed before response headers.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("tcp connect error: {0}")]
    Connect(std::io::Error),
    #[error("unix socket connect error: unix:{}: {}", .0.display(), .1)]
    UnixConnect(PathBuf, std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("tls handshake error: {0}")]
    Tls(std::io::Error),
    #[error("all {0} connections busy for the connect timeout")]
    Saturated(usize),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// How many connections a [`Pool`] may open, and how long a request waits for one.
#[derive(Debug, Clone)]
pub struct PoolLimits {
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Incremented for each request that found no connection in time.
    pub saturated: IntCounter,
}

/// Keep-alive connections to one upstream. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

struct Shared {
    target: Target,
    connect_timeout: Duration,
    /// One permit per open connection, held by its task.
    connections: Arc<Semaphore>,
    max_connections: usize,
    /// Counts requests that waited in vain for a free connection.
    saturated: IntCounter,
    slots: Mutex<Slots>,
}

/// Where a pool's connections go.
enum Target {
    Tcp {
        /// `host:port`, resolved at each connect.
        addr: String,
        /// `Some` for `https`: the connector and the name the certificate must carry
        /// (`None` if the host is not a name a certificate can carry).
        tls: Option<(TlsConnector, Option<ServerName<'static>>)>,
    },
    /// A Unix socket file: cleartext.
    Unix(PathBuf),
}

#[derive(Default)]
struct Slots {
    /// Oldest first; checkouts take the newest, which is the least likely to have been
    /// closed by the upstream.
    idle: VecDeque<Idle>,
    /// Requests opening a connection, oldest first, that take a returned one instead.
    waiting: VecDeque<oneshot::Sender<SendRequest<RequestBody>>>,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut f = f.debug_struct("Pool");
        match &self.0.target {
            Target::Tcp { addr, tls } => f.field("addr", addr).field("tls", &tls.is_some()),
            Target::Unix(path) => f.field("unix", path),
        }
        .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool to the upstream at `address` (an `http` or `https` URL, whose path is the
    /// caller's, or a Unix socket). `tls` decides which certificates an `https` upstream
    /// may present; `connect_timeout` bounds the wait for a free connection, and then name
    /// resolution and the connect; the TLS handshake counts against the request's own
    /// timeout.
    pub fn new(address: &UpstreamAddress, tls: &Arc<ClientConfig>, limits: PoolLimits) -> Pool {
        let PoolLimits {
            connect_timeout,
            max_connections,
            saturated,
        } = limits;
        let target = match address {
            UpstreamAddress::Url(url) => tcp_target(url, tls),
            UpstreamAddress::Unix(path) => Target::Unix(path.clone()),
        };
        Pool(Arc::new(Shared {
            target,
            connect_timeout,
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            saturated,
            slots: Mutex::default(),
        }))
    }

    /// Sends `request` (origin-form URI, `Host` set) on a pooled connection or a new one,
    /// and resolves with the response headers.
    ///
    /// Not an `async fn`: one would keep `request` twice in its state (the argument and the
    /// local it is moved into), and every request's future is moved a few times.
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + '_ {
        async move {
            loop {
                let (mut sender, reused) = match self.checkout().await {
                    Some(sender) => (sender, true),
                    // Boxed: the connect's state is large, and a request that reuses a
                    // connection should not carry (and move) it.
                    None => Box::pin(self.connect_or_returned()).await?,
                };
                let mut exchange = Exchange {
                    response: Box::pin(sender.try_send_request(request)),
                    sender: Some(sender),
                    pool: self,
                };
                let sent = exchange.response.as_mut().await;
                let sender = exchange.finished();
                match sent {
                    Ok(response) => return Ok(self.pooled(response, sender)),
                    Err(mut failed) => match failed.take_message() {
                        // The upstream closed an idle connection as we picked it: nothing was
                        // sent, so the request goes out again, on another connection.
                        Some(unsent) if reused => request = unsent,
                        _ => return Err(SendError::Http(failed.into_error())),
                    },
                }
            }
        }
    }

    /// Connections this pool opens at most.
    pub fn max_connections(&self) -> usize {
        self.0.max_connections
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.0.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest idle connection that is still open and ready for a request.
    async fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        loop {
            let mut sender = {
                let mut slots = self.slots();
                let newest = slots.idle.pop_back()?;
                if newest.since.elapsed() >= POOL_IDLE_TIMEOUT {
                    // Everything older has expired too.
                    slots.idle.clear();
                    return None;
                }
                newest.sender
            };
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// A new connection, or one returned while it was being opened (then `true`: reused).
    /// A connect that loses goes on in the background and joins the idle stack.
    async fn connect_or_returned(&self) -> Result<(SendRequest<RequestBody>, bool), SendError> {
        let (tx, mut returned) = oneshot::channel();
        {
            let mut slots = self.slots();
            // Requests that connected first left their places behind.
            while slots
                .waiting
                .front()
                .is_some_and(oneshot::Sender::is_closed)
            {
                slots.waiting.pop_front();
            }
            slots.waiting.push_back(tx);
        }
        // Owned, so that it can finish without this request.
        let pool = self.clone();
        let mut connect = Box::pin(async move { pool.connect().await });
        tokio::select! {
            biased;
            Ok(mut sender) = &mut returned => {
                if sender.ready().await.is_ok() {
                    self.keep_when_connected(connect);
                    return Ok((sender, true));
                }
                // Closed meanwhile: only our own connect is left to wait for.
                Ok((connect.await?, false))
            }
            connected = &mut connect => Ok((connected?, false)),
        }
    }

    /// A connect that lost to a returned connection: it finishes in the background, within
    /// one more connect timeout, and its connection is checked in. Were it abandoned, a
    /// pool one connection short of its load (the upstream closed one: nginx after 1,000
    /// requests, Puma when idle) would stay short, and every request finding the stack
    /// empty would open a connection only to close it (4% of requests with 4 clients).
    fn keep_when_connected<F>(&self, connect: Pin<Box<F>>)
    where
        F: Future<Output = Result<SendRequest<RequestBody>, SendError>> + Send + 'static,
    {
        let (pool, timeout) = (self.clone(), self.0.connect_timeout);
        tokio::spawn(async move {
            if let Ok(Ok(sender)) = tokio::time::timeout(timeout, connect).await {
                pool.checkin(sender);
            }
        });
    }

    /// Returns a connection whose exchange is over: to the oldest request still opening
    /// one, else to the idle stack.
    fn checkin(&self, mut sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut slots = self.slots();
        while let Some(waiting) = slots.waiting.pop_front() {
            match waiting.send(sender) {
                Ok(()) => return,
                Err(unsent) => sender = unsent,
            }
        }
        let now = Instant::now();
        while slots
            .idle
            .front()
            .is_some_and(|oldest| now - oldest.since >= POOL_IDLE_TIMEOUT)
        {
            slots.idle.pop_front();
        }
        if slots.idle.len() >= MAX_IDLE {
            slots.idle.pop_front();
        }
        slots.idle.push_back(Idle { sender, since: now });
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let shared = &self.0;
        let permit = match shared.connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let free = shared.connections.clone().acquire_owned();
                match tokio::time::timeout(shared.connect_timeout, free).await {
                    Ok(Ok(permit)) => permit,
                    // Closed never happens: the semaphore is ours.
                    Ok(Err(_)) | Err(_) => {
                        shared.saturated.inc();
                        return Err(SendError::Saturated(shared.max_connections));
                    }
                }
            }
        };
        let timeout = shared.connect_timeout;
        let (addr, tls) = match &shared.target {
            Target::Tcp { addr, tls } => (addr, tls),
            Target::Unix(path) => {
                let unix = tokio::time::timeout(timeout, UnixStream::connect(path))
                    .await
                    .map_err(|_| SendError::ConnectTimeout(timeout))?
                    .map_err(|error| SendError::UnixConnect(path.clone(), error))?;
                return handshake(unix, permit).await;
            }
        };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(&**addr))
            .await
            .map_err(|_| SendError::ConnectTimeout(timeout))?
            .map_err(SendError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => handshake(tcp, permit).await,
            Some((connector, name)) => {
                let name = name.clone().ok_or_else(|| {
                    SendError::Tls(std::io::Error::other("not a valid TLS server name"))
                })?;
                let tls = connector.connect(name, tcp).await.map_err(SendError::Tls)?;
                handshake(tls, permit).await
            }
        }
    }

    /// The response, with a body that returns `sender` here once read to the end. A
    /// switched-protocols response's connection belongs to the tunnel.
    fn pooled(
        &self,
        response: Response<Incoming>,
        sender: SendRequest<RequestBody>,
    ) -> Response<UpstreamBody> {
        let reusable = response.status() != StatusCode::SWITCHING_PROTOCOLS;
        response.map(|inner| {
            let mut body = UpstreamBody {
                inner,
                checkin: reusable.then(|| (sender, self.clone())),
            };
            if body.inner.is_end_stream() {
                body.finish();
            }
            body
        })
    }
}

/// Where a pool for `url` (`http` or `https`) connects: the host and port, and for
/// `https` how.
fn tcp_target(url: &Uri, tls: &Arc<ClientConfig>) -> Target {
    let https = url.scheme_str() == Some("https");
    // Config validation guarantees a host; the default ports follow the scheme.
    let host = url.host().unwrap_or("localhost");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tls = https.then(|| {
        let mut config = ClientConfig::clone(tls);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(name.to_owned()).ok();
        (TlsConnector::from(Arc::new(config)), name)
    });
    Target::Tcp {
        addr: format!("{host}:{port}"),
        tls,
    }
}

/// Starts an HTTP/1.1 connection on `io`; it runs in a task of its own, holding its place
/// among the pool's connections (`permit`), until the upstream or the pool closes it. Its
/// errors reach the request in flight, if any.
async fn handshake<I>(
    io: I,
    permit: OwnedSemaphorePermit,
) -> Result<SendRequest<RequestBody>, SendError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
        drop(permit);
    });
    Ok(sender)
}

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>> + Send>,
>;

/// A request sent on `sender`, waiting for its response headers. Dropped before they came
/// (the caller went away), it finishes in the background: see [`finish_abandoned`].
struct Exchange<'a> {
    response: ResponseFuture,
    /// `None` once the response (or its error) has been taken.
    sender: Option<SendRequest<RequestBody>>,
    pool: &'a Pool,
}

impl Exchange<'_> {
    /// The response has come: the connection is the caller's again.
    fn finished(&mut self) -> SendRequest<RequestBody> {
        // `send` calls this once, right after the response resolved.
        self.sender.take().expect("the exchange's connection")
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        // No runtime: the process is exiting, and the connection with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let response = std::mem::replace(&mut self.response, Box::pin(std::future::pending()));
            runtime.spawn(finish_abandoned(response, sender, self.pool.clone()));
        }
    }
}

/// The rest of an exchange nobody waits for: read for at most [`ABANDONED_GRACE`] and
/// [`ABANDONED_BYTES`] of body, then its connection goes back to the pool; else closed.
async fn finish_abandoned(response: ResponseFuture, sender: SendRequest<RequestBody>, pool: Pool) {
    let finish = async {
        let response = response.await.ok()?;
        let mut body = pool.pooled(response, sender).into_body();
        let mut read = 0;
        while let Some(frame) = body.frame().await {
            read += frame.ok()?.data_ref().map_or(0, Bytes::len);
            if read > ABANDONED_BYTES {
                return None;
            }
        }
        // Read to the end: the body has returned the connection.
        Some(())
    };
    let _ = tokio::time::timeout(ABANDONED_GRACE, finish).await;
}

/// An upstream response body: gives its connection back to the pool at end of stream.
pub struct UpstreamBody {
    inner: Incoming,
    checkin: Option<(SendRequest<RequestBody>, Pool)>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn finish(&mut self) {
        if let Some((sender, pool)) = self.checkin.take() {
            pool.checkin(sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            // A broken body leaves the connection unusable: it is dropped with `checkin`.
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
