//! Shutdown as connections and tunnels see it: a token each, which shutdown waits for,
//! and a cheap look at whether it has begun each time a connection's task runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

/// Starts shutdown and waits for every [`Drain`] token to be dropped: one per connection,
/// and one per tunnel a connection became.
#[derive(Debug)]
pub struct Draining {
    tokens: watch::Sender<bool>,
    begun: Arc<Begun>,
}

/// Held by whatever shutdown must wait for; tells its holder when shutdown has begun.
#[derive(Debug, Clone)]
pub struct Drain {
    token: watch::Receiver<bool>,
    begun: Arc<Begun>,
}

/// Whether shutdown has begun, and the connection tasks to wake when it does. A
/// connection looks at the flag each time its task runs, which is one atomic load,
/// rather than polling a notification (a lock) on every wake-up; see [`DrainWatch`].
#[derive(Debug, Default)]
struct Begun {
    flag: AtomicBool,
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    wakers: HashMap<u64, Waker>,
}

impl Default for Draining {
    fn default() -> Draining {
        Draining {
            tokens: watch::Sender::new(false),
            begun: Arc::default(),
        }
    }
}

impl Draining {
    pub fn token(&self) -> Drain {
        Drain {
            token: self.tokens.subscribe(),
            begun: self.begun.clone(),
        }
    }

    /// Connections and tunnels still open.
    pub fn count(&self) -> usize {
        self.tokens.receiver_count()
    }

    /// Tells every holder to finish up, and resolves once all have.
    pub async fn drain(&self) {
        self.begun.flag.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut self.begun.waiting().wakers);
        wakers.into_values().for_each(Waker::wake);
        self.tokens.send_replace(true);
        self.tokens.closed().await;
    }
}

impl Begun {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drain {
    /// Resolves once shutdown has begun.
    pub async fn started(&mut self) {
        // An error means the gateway is gone, which is shutdown too.
        let _ = self.token.wait_for(|started| *started).await;
    }

    /// Shutdown's beginning as a connection's task sees it, each time it runs.
    pub(super) fn watch(&self) -> DrainWatch {
        DrainWatch {
            begun: self.begun.clone(),
            registered: None,
        }
    }
}

/// See [`Drain::watch`]: the task's waker is left with [`Begun`] once, and again only if
/// the task's waker changes.
pub(super) struct DrainWatch {
    begun: Arc<Begun>,
    /// The waker left, and under which key.
    registered: Option<(u64, Waker)>,
}

impl DrainWatch {
    pub(super) fn poll_begun(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.begun.flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|(_, waker)| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let mut waiting = self.begun.waiting();
        // Looked at again under the lock, which `drain` takes after setting the flag.
        if self.begun.flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let key = match &self.registered {
            Some((key, _)) => *key,
            None => {
                waiting.next += 1;
                waiting.next
            }
        };
        waiting.wakers.insert(key, cx.waker().clone());
        self.registered = Some((key, cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        if let Some((key, _)) = self.registered.take() {
            self.begun.waiting().wakers.remove(&key);
        }
    }
}
