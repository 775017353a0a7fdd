//! One client connection from accept to close: the optional TLS handshake, the timeouts
//! that bound a connection nobody is using or a client that stopped reading, and the drain
//! that shutdown waits on.
//!
//! Two clocks run while no request is in flight:
//! - **header read**: from the first byte of a request (or from accept, for the first
//!   one) its headers must arrive within `server.header_read_timeout`, else the
//!   connection is closed. Against slow-header clients; HTTP/1 only, since HTTP/2 clients
//!   legitimately send frames between requests.
//! - **idle**: a connection with no request for `server.idle_timeout` is closed
//!   gracefully (HTTP/2 gets a GOAWAY).
//!
//! A request is in flight from its head until its response body has been sent (or
//! dropped), so a long download is never idle; then whoever asked ([`OnSent`], the access
//! line) hears how many body bytes went out. While one is, a single clock runs:
//! - **write**: a response body that handed a frame to hyper which hyper then does not
//!   take the next one for `server.write_timeout` (the client accepts no bytes: its socket
//!   or its HTTP/2 window is full) closes the connection. The watchdog looks every
//!   `write_timeout`, so a stall is cut after between one and two of them (the first look
//!   comes at the idle deadline the connection had when the request began).
//!
//! A slow upstream is bounded by its own timeout.
//!
//! Nothing on the request path touches a timer: reads, requests and body frames only write
//! down what happened, and one sleep per connection ([`watch`]) looks at that when it
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

use bytes::Buf;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::HeaderValue;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

pub use drain::{Drain, Draining};

/// The timeouts of a connection with no request in flight; read from the configuration
/// current at accept.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake_and_header_read: Duration,
    pub idle: Duration,
    pub write: Duration,
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
    /// Marks a request in flight until the guard drops; services call it first, and hand
    /// it to the response body ([`Busy::until_sent`]).
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

/// A request in flight on a connection: its idle and header clocks stop until this drops.
/// See [`Conn::request_started`].
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Busy {
    /// `body`, keeping the request in flight until it has been sent or dropped, telling
    /// the write clock when it waits for the client, and then telling `on_sent` how many
    /// body bytes it handed to the connection.
    pub fn until_sent<B, S: OnSent>(self, body: B, on_sent: S) -> Sending<B, S> {
        Sending {
            inner: body,
            busy: self,
            handed: false,
            written: 0,
            on_sent: Some(on_sent),
        }
    }
}

/// Told when hyper is done with a response body — sent in full, or dropped because the
/// client went away — and how many body bytes it took: the access line is written then.
pub trait OnSent {
    fn sent(self, written: u64);
}

/// Nobody to tell.
impl OnSent for () {
    fn sent(self, _: u64) {}
}

/// A response body on its way to the client; see [`Busy::until_sent`].
#[derive(Debug)]
pub struct Sending<B, S: OnSent = ()> {
    inner: B,
    busy: Busy,
    /// The last poll handed hyper a frame and no poll has come since: the body waits for
    /// the client to take it.
    handed: bool,
    /// Body bytes handed to hyper so far.
    written: u64,
    /// Taken when the body is dropped.
    on_sent: Option<S>,
}

impl<B: Body + Unpin, S: OnSent + Unpin> Body for Sending<B, S> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let activity = &this.busy.0;
        if this.handed {
            // Hyper came back for more: the client took the last frame.
            this.handed = false;
            activity.waiting_on_client.fetch_sub(1, Ordering::AcqRel);
            activity.taken.fetch_add(1, Ordering::AcqRel);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.written += data.remaining() as u64;
            }
            if !this.inner.is_end_stream() {
                this.handed = true;
                activity.waiting_on_client.fetch_add(1, Ordering::AcqRel);
            }
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

impl<B, S: OnSent> Drop for Sending<B, S> {
    fn drop(&mut self) {
        if self.handed {
            self.busy.0.waiting_on_client.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(on_sent) = self.on_sent.take() {
            on_sent.sent(self.written);
        }
    }
}

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
    /// Response bodies waiting for the client to take the frame they handed hyper.
    waiting_on_client: AtomicUsize,
    /// Frames the client has taken: moves while responses flow.
    taken: AtomicU64,
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
            waiting_on_client: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
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
    /// The client took no response bytes for a whole `write_timeout`.
    Write,
}

/// What the watchdog saw at its last look while requests were in flight.
#[derive(Debug, Clone, Copy, Default)]
struct LastLook {
    /// A response body was waiting for the client.
    waiting: bool,
    /// [`Activity::taken`] then.
    taken: u64,
}

impl LastLook {
    /// Looks again: stalled if a body has waited since the last look and the client has
    /// taken nothing meanwhile.
    fn stalled(&mut self, activity: &Activity) -> bool {
        let now = LastLook {
            waiting: activity.waiting_on_client.load(Ordering::Acquire) > 0,
            taken: activity.taken.load(Ordering::Acquire),
        };
        let stalled = self.waiting && now.waiting && self.taken == now.taken;
        *self = now;
        stalled
    }
}

/// Ready when the connection has been idle, or slow sending headers, for too long.
///
/// `sleep` is armed at the earliest deadline known. A clock that starts earlier (a request
/// head) is seen here because the caller polls this after the connection, whose read
/// started it; a deadline that moves later (a request ended) just lets `sleep` fire early,
/// look again, and sleep on. So a request costs no timer work; a busy connection costs one
/// wake-up per idle timeout, or per write timeout while a request is in flight.
fn watch(
    cx: &mut Context<'_>,
    activity: &Activity,
    timeouts: Timeouts,
    mut sleep: Pin<&mut Sleep>,
    look: &mut LastLook,
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
            Some((at, _)) => {
                *look = LastLook::default();
                sleep.as_mut().reset(at);
            }
            // Requests in flight: only the write clock runs.
            None if look.stalled(activity) => return Poll::Ready(Expiry::Write),
            None => sleep.as_mut().reset(now + timeouts.write),
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

/// Serves one accepted connection (TCP or Unix socket) to the end: TLS first when `tls`
/// is set, then HTTP/1.1 or HTTP/2 with upgrades, under the idle and header-read clocks.
/// Shutdown (through `drain`) closes it gracefully: the request in flight finishes,
/// keep-alive ends.
pub async fn serve<I, M, S, B>(
    stream: I,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    drain: Drain,
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
    match tls {
        None => {
            let peer = Peer {
                addr: peer,
                https: false,
                http2: false,
            };
            run(stream, peer, builder, timeouts, drain, make).await;
        }
        // Boxed: a TLS connection's state is twice a cleartext one's, and a cleartext
        // connection's task, copied whole when spawned, should not carry it.
        Some(acceptor) => {
            Box::pin(async move {
                let handshake = acceptor.accept(stream);
                let clock = timeouts.handshake_and_header_read;
                let stream = match tokio::time::timeout(clock, handshake).await {
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
            })
            .await;
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
    drain: Drain,
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
    let mut begun = drain.watch();
    let first = activity
        .deadline(timeouts)
        .map_or(Instant::now(), |(at, _)| at);
    let sleep = tokio::time::sleep_until(first);
    tokio::pin!(sleep);
    let mut look = LastLook::default();
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
            expiry = std::future::poll_fn(|cx| watch(cx, &activity, timeouts, sleep.as_mut(), &mut look)) => match expiry {
                Expiry::Idle if !idle_closed => {
                    connection.as_mut().graceful_shutdown();
                    idle_closed = true;
                    activity.idle_since.store(activity.now(), Ordering::Release);
                }
                // Half a request head, a client that stopped reading, or a connection that
                // outstayed its close: nothing left to finish gracefully.
                _ => {
                    tracing::debug!(?expiry, "closing the connection");
                    return;
                }
            },
            () = std::future::poll_fn(|cx| begun.poll_begun(cx)), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

mod drain;
#[cfg(test)]
mod tests;
