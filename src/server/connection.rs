//! One client connection from accept to close: the optional TLS handshake, the timeouts
//! that bound a connection nobody is using, and the drain that shutdown waits on.
//!
//! Two clocks run while no request is in flight:
//! - **header read**: from the first byte of a request (or from accept, for the first
//!   one) its headers must arrive within `server.header_read_timeout`, else the
//!   connection is closed. Against slow-header clients; HTTP/1 only, since HTTP/2 clients
//!   legitimately send frames between requests.
//! - **idle**: a connection with no request for `server.idle_timeout` is closed
//!   gracefully (HTTP/2 gets a GOAWAY).
//!
//! A request in flight stops both: a slow upstream is bounded by its own timeout.
//!
//! Nothing on the request path touches a timer: reads and requests only write down when
//! they happened, and one sleep per connection ([`watch`]) looks at those times when it
//! fires or when the connection's task runs anyway. These are the only clocks: hyper's own
//! header timer is off.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::HeaderValue;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// Starts shutdown and waits for every [`Drain`] token to be dropped: one per connection,
/// and one per tunnel a connection became.
#[derive(Debug)]
pub struct Draining(watch::Sender<bool>);

/// Held by whatever shutdown must wait for; tells its holder when shutdown has begun.
#[derive(Debug, Clone)]
pub struct Drain(watch::Receiver<bool>);

impl Default for Draining {
    fn default() -> Draining {
        Draining(watch::Sender::new(false))
    }
}

impl Draining {
    pub fn token(&self) -> Drain {
        Drain(self.0.subscribe())
    }

    /// Connections and tunnels still open.
    pub fn count(&self) -> usize {
        self.0.receiver_count()
    }

    /// Tells every holder to finish up, and resolves once all have.
    pub async fn drain(&self) {
        self.0.send_replace(true);
        self.0.closed().await;
    }
}

impl Drain {
    /// Resolves once shutdown has begun.
    pub async fn started(&mut self) {
        // An error means the gateway is gone, which is shutdown too.
        let _ = self.0.wait_for(|started| *started).await;
    }
}

/// The timeouts of a connection with no request in flight; read from the configuration
/// current at accept.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake_and_header_read: Duration,
    pub idle: Duration,
}

/// What a request knows of the connection it arrived on.
#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    /// The peer's IP address as header text, for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    /// TLS on the client side: `X-Forwarded-Proto: https`.
    pub https: bool,
    activity: Arc<Activity>,
    drain: Drain,
}

impl Conn {
    /// Marks a request in flight until the guard drops; services call it first.
    pub fn request_started(&self) -> Busy {
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        self.activity.head_since.store(NONE, Ordering::Release);
        Busy(self.activity.clone())
    }

    /// A token that keeps shutdown waiting, for work that outlives the request (tunnels).
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Since when no request has been in flight (accept, or the end of the last request);
    /// `None` while one is. For a listener choosing which connection to give up.
    pub fn idle_since(&self) -> Option<Instant> {
        let activity = &self.activity;
        (activity.in_flight.load(Ordering::Acquire) == 0)
            .then(|| activity.at(activity.idle_since.load(Ordering::Acquire)))
    }
}

/// A request in flight on a connection: its clocks stop until this drops. See
/// [`Conn::request_started`].
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.idle_since.store(activity.now(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Milliseconds since the connection was accepted; `NONE` is "not running".
const NONE: u64 = u64::MAX;

#[derive(Debug)]
struct Activity {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// When the connection last had no request in flight.
    idle_since: AtomicU64,
    /// When the first byte of the next request arrived.
    head_since: AtomicU64,
    /// How many bytes of the HTTP/2 preface the connection began with: all of them is
    /// HTTP/2, [`HTTP1`] once a byte differed.
    preface: AtomicU8,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
const HTTP2: u8 = H2_PREFACE.len() as u8;
const HTTP1: u8 = u8::MAX;

impl Activity {
    fn new(http2: bool) -> Activity {
        Activity {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            preface: AtomicU8::new(if http2 { HTTP2 } else { 0 }),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, millis: u64) -> Instant {
        self.accepted + Duration::from_millis(millis)
    }

    /// Bytes arrived: if no request is in flight, a new one has begun.
    fn on_read(&self, bytes: &[u8]) {
        // Reads of one connection never overlap, so load-then-store is enough.
        let matched = self.preface.load(Ordering::Relaxed);
        if matched < HTTP2 {
            let rest = &H2_PREFACE[usize::from(matched)..];
            let n = bytes.len().min(rest.len());
            let next = if bytes[..n] == rest[..n] {
                // n <= 16, so this fits.
                matched + n as u8
            } else {
                HTTP1
            };
            self.preface.store(next, Ordering::Relaxed);
        }
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == NONE
        {
            self.head_since.store(self.now(), Ordering::Release);
        }
    }

    /// When this connection next expires, and why, given what it is doing now. `None`
    /// while a request is in flight.
    fn deadline(&self, timeouts: Timeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head_since = self.head_since.load(Ordering::Acquire);
        if head_since != NONE && self.preface.load(Ordering::Relaxed) != HTTP2 {
            let at = self.at(head_since) + timeouts.handshake_and_header_read;
            return Some((at, Expiry::HeaderRead));
        }
        let idle_since = self.idle_since.load(Ordering::Acquire);
        Some((self.at(idle_since) + timeouts.idle, Expiry::Idle))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    HeaderRead,
    Idle,
}

/// Ready when the connection has been idle, or slow sending headers, for too long.
///
/// `sleep` is armed at the earliest deadline known. A clock that starts earlier (a request
/// head) is seen here because the caller polls this after the connection, whose read
/// started it; a deadline that moves later (a request ended) just lets `sleep` fire early,
/// look again, and sleep on. So a request costs no timer work; a busy connection costs one
/// wake-up per idle timeout.
fn watch(
    cx: &mut Context<'_>,
    activity: &Activity,
    timeouts: Timeouts,
    mut sleep: Pin<&mut Sleep>,
) -> Poll<Expiry> {
    if let Some((at, _)) = activity.deadline(timeouts) {
        if at < sleep.deadline() {
            sleep.as_mut().reset(at);
        }
    }
    loop {
        std::task::ready!(sleep.as_mut().poll(cx));
        // It fired: the time is at least its deadline.
        let now = sleep.deadline();
        match activity.deadline(timeouts) {
            Some((at, why)) if at <= now => return Poll::Ready(why),
            Some((at, _)) => sleep.as_mut().reset(at),
            // A request in flight: nothing expires, look again later.
            None => sleep.as_mut().reset(now + timeouts.idle),
        }
    }
}

/// A stream that tells its [`Activity`] when bytes arrive.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one accepted connection to the end: TLS first when `tls` is set, then HTTP/1.1
/// or HTTP/2 with upgrades, under the idle and header-read clocks. Shutdown (through
/// `drain`) closes it gracefully: the request in flight finishes, keep-alive ends.
pub async fn serve<M, S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    drain: Drain,
    make: M,
) where
    M: FnOnce(Arc<Conn>) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tls {
        None => {
            let peer = Peer {
                addr: peer,
                https: false,
                http2: false,
            };
            run(stream, peer, builder, timeouts, drain, make).await;
        }
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            let stream =
                match tokio::time::timeout(timeouts.handshake_and_header_read, handshake).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(peer = %peer, error = %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer, "TLS handshake timed out");
                        return;
                    }
                };
            let peer = Peer {
                addr: peer,
                https: true,
                http2: stream.get_ref().1.alpn_protocol() == Some(b"h2"),
            };
            run(stream, peer, builder, timeouts, drain, make).await;
        }
    }
}

/// The other end of a connection, as the handshake left it.
#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: SocketAddr,
    /// It spoke TLS to us.
    https: bool,
    /// It chose HTTP/2 by ALPN.
    http2: bool,
}

/// Serves `stream` from `peer` to the end.
async fn run<I, M, S, B>(
    stream: I,
    peer: Peer,
    builder: auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    mut drain: Drain,
    make: M,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    M: FnOnce(Arc<Conn>) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new(peer.http2));
    let service = make(Arc::new(Conn {
        peer: peer.addr,
        peer_ip: crate::forward::headers::ip_value(peer.addr.ip()),
        https: peer.https,
        activity: activity.clone(),
        drain: drain.clone(),
    }));
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut draining = false;
    // Once closed for idleness, a connection gets one more clock to go: HTTP/1 keeps a
    // connection open that holds part of a request head.
    let mut idle_closed = false;
    let started = drain.started();
    tokio::pin!(started);
    let first = activity
        .deadline(timeouts)
        .map_or(Instant::now(), |(at, _)| at);
    let sleep = tokio::time::sleep_until(first);
    tokio::pin!(sleep);
    loop {
        // The connection first: the watchdog then sees the clocks its reads started.
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(error = %error, "connection ended with an error");
                }
                return;
            }
            expiry = std::future::poll_fn(|cx| watch(cx, &activity, timeouts, sleep.as_mut())) => match expiry {
                Expiry::Idle if !idle_closed => {
                    connection.as_mut().graceful_shutdown();
                    idle_closed = true;
                    activity.idle_since.store(activity.now(), Ordering::Release);
                }
                // Half a request head, or a connection that outstayed its close: nothing
                // left to finish gracefully.
                _ => {
                    tracing::debug!(?expiry, "closing a connection with no request in flight");
                    return;
                }
            },
            () = &mut started, if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        handshake_and_header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    /// A connection from loopback whose clocks are `activity`'s.
    fn conn_on(activity: &Arc<Activity>) -> Conn {
        Conn {
            peer: "127.0.0.1:1".parse().unwrap(),
            peer_ip: HeaderValue::from_static("127.0.0.1"),
            https: false,
            activity: activity.clone(),
            drain: Draining::default().token(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_must_send_headers_within_the_header_read_timeout() {
        let activity = Activity::new(false);
        let (at, why) = activity.deadline(TIMEOUTS).unwrap();
        assert_eq!(why, Expiry::HeaderRead);
        assert_eq!(at, activity.accepted + Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_request_the_idle_clock_runs_until_the_next_byte() {
        let activity = Arc::new(Activity::new(false));
        activity.on_read(b"GET / HTTP/1.1\r\n");
        let conn = conn_on(&activity);
        let request = conn.request_started();
        assert_eq!(activity.deadline(TIMEOUTS), None, "nothing runs in flight");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(request);
        let (at, why) = activity.deadline(TIMEOUTS).unwrap();
        assert_eq!(why, Expiry::Idle);
        assert_eq!(at, Instant::now() + Duration::from_secs(60));

        tokio::time::advance(Duration::from_secs(5)).await;
        activity.on_read(b"G");
        let (at, why) = activity.deadline(TIMEOUTS).unwrap();
        assert_eq!(why, Expiry::HeaderRead);
        assert_eq!(at, Instant::now() + Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_between_requests_do_not_start_the_header_clock() {
        let activity = Activity::new(false);
        activity.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let (_, why) = activity.deadline(TIMEOUTS).unwrap();
        assert_eq!(why, Expiry::Idle);
        activity.on_read(b"ping frame");
        assert_eq!(activity.deadline(TIMEOUTS).unwrap().1, Expiry::Idle);
    }

    /// Polls `future` once; `None` if it is pending.
    async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            output = future => Some(output),
            () = std::future::ready(()) => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_starts_while_the_watchdog_sleeps_on_the_idle_clock_is_cut_in_time() {
        let activity = Arc::new(Activity::new(false));
        activity.on_read(b"GET / HTTP/1.1\r\n\r\n");
        let conn = conn_on(&activity);
        drop(conn.request_started());
        let started = Instant::now();
        let sleep = tokio::time::sleep_until(started + Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut watchdog =
            std::future::poll_fn(|cx| watch(cx, &activity, TIMEOUTS, sleep.as_mut()));
        assert_eq!(poll_once(&mut watchdog).await, None, "idle for 0 s of 60");

        tokio::time::advance(Duration::from_secs(5)).await;
        activity.on_read(b"G");
        // The connection's task runs after a read: the watchdog looks again.
        assert_eq!(poll_once(&mut watchdog).await, None, "a head for 0 s of 10");
        assert_eq!(watchdog.await, Expiry::HeaderRead);
        assert_eq!(Instant::now(), started + Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_is_not_cut_and_its_idle_clock_starts_when_the_request_ends() {
        let activity = Arc::new(Activity::new(false));
        activity.on_read(b"GET / HTTP/1.1\r\n\r\n");
        let conn = conn_on(&activity);
        let request = conn.request_started();
        let started = Instant::now();
        let sleep = tokio::time::sleep_until(started + Duration::from_secs(10));
        tokio::pin!(sleep);
        let mut watchdog =
            std::future::poll_fn(|cx| watch(cx, &activity, TIMEOUTS, sleep.as_mut()));
        // Five minutes in flight: the watchdog wakes and sleeps on.
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(poll_once(&mut watchdog).await, None);
        drop(request);
        assert_eq!(watchdog.await, Expiry::Idle);
        assert_eq!(Instant::now(), started + Duration::from_secs(360));
    }

    #[tokio::test]
    async fn draining_waits_for_every_token() {
        let draining = Draining::default();
        let mut token = draining.token();
        assert_eq!(draining.count(), 1);
        let holder = tokio::spawn(async move {
            token.started().await;
            drop(token);
        });
        tokio::time::timeout(Duration::from_secs(5), draining.drain())
            .await
            .expect("drained once the token is dropped");
        holder.await.unwrap();
        assert_eq!(draining.count(), 0);
    }
}
