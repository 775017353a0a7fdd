//! A client body streamed upstream (pass-through traffic, never buffered): it cuts a client
//! that goes silent for `server.body_idle_timeout`, which aborts the upstream exchange, and
//! tells the exchange when it ended and whether the client was to blame ([`Progress`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// A client body streamed upstream; see the module's documentation.
#[derive(Debug)]
pub struct Streamed {
    inner: Incoming,
    progress: Progress,
    idle: Duration,
    /// Armed the first time the client keeps us waiting; re-armed after each frame.
    silence: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since `silence` was armed.
    moved: bool,
}

/// Why a client's body ended the upstream exchange; see [`Progress::client_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFailure {
    /// It broke off or was malformed (e.g. a bad chunk).
    Broken,
    /// It sent nothing for `server.body_idle_timeout`.
    Silent,
}

/// The states of [`Shared::state`].
const SENDING: u8 = 0;
const SENT: u8 = 1;
const BROKEN: u8 = 2;
const SILENT: u8 = 3;

/// The client body died with this error: it sent nothing for `server.body_idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no body bytes for {0:?}")]
pub struct BodyIdle(Duration);

/// How a [`Streamed`] body is getting on, for the exchange that sends it: one allocation
/// the body (polled by the upstream connection) and the request share. Nothing wakes the
/// request when the body ends: the request looks when its own clock fires.
#[derive(Debug, Clone)]
pub struct Progress(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    state: AtomicU8,
    /// When the body ended, completely or not.
    ended: Mutex<Option<Instant>>,
}

impl Progress {
    /// When a response-header clock of `timeout` that starts once the body has ended runs
    /// out, as far as is known now: the body still being sent, `timeout` from now.
    pub fn clock_end(&self, timeout: Duration) -> Instant {
        let ended = *self.0.ended.lock().unwrap_or_else(PoisonError::into_inner);
        ended.unwrap_or_else(Instant::now) + timeout
    }

    /// The client's body ended the exchange: a failed upstream exchange is then the
    /// client's doing, not the upstream's.
    pub fn client_failure(&self) -> Option<ClientFailure> {
        match self.0.state.load(Ordering::Acquire) {
            BROKEN => Some(ClientFailure::Broken),
            SILENT => Some(ClientFailure::Silent),
            _ => None,
        }
    }
}

impl Streamed {
    pub fn new(inner: Incoming, idle: Duration) -> (Streamed, Progress) {
        let progress = Progress(Arc::new(Shared {
            state: AtomicU8::new(SENDING),
            ended: Mutex::new(None),
        }));
        let body = Streamed {
            inner,
            progress: progress.clone(),
            idle,
            silence: None,
            moved: false,
        };
        (body, progress)
    }

    fn ended(&mut self, state: u8) {
        let shared = &self.progress.0;
        if shared.state.load(Ordering::Acquire) == SENDING {
            *shared.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            shared.state.store(state, Ordering::Release);
        }
    }

    /// Ready once the client has been silent for `idle` since its last frame.
    fn poll_silence(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let idle = self.idle;
        let silence = self
            .silence
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if std::mem::take(&mut self.moved) {
            silence.as_mut().reset(Instant::now() + idle);
        }
        silence.as_mut().poll(cx)
    }
}

impl Drop for Streamed {
    /// A body hyper drops unfinished has ended too, as far as the clock goes.
    fn drop(&mut self) {
        self.ended(SENT);
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                std::task::ready!(this.poll_silence(cx));
                this.ended(SILENT);
                Poll::Ready(Some(Err(Box::new(BodyIdle(this.idle)))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.moved = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.ended(BROKEN);
                Poll::Ready(Some(Err(Box::new(error))))
            }
            Poll::Ready(None) => {
                this.ended(SENT);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
