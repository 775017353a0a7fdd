//! The decision cache: one pre-authorize answer per client id, bounded, each entry with
//! its own lifetime and stale window, and one backend call per client id however many
//! requests miss at once.
//!
//! An answer is served for its lifetime. After that the next request asks again; if the
//! backend fails and the answer expired no longer ago than its stale window (RFC 5861
//! `stale-if-error`), it is served once more, so a pre-authorize outage does not move
//! applications already on IAM back to Rails.
//!
//! Expiry is checked when an entry is read, and spent entries (past their stale window)
//! are removed by a sweeper thread, never by a request. moka's own per-entry expiry would
//! remove every entry that expired at once inside whichever request next touched the
//! cache: after a burst of new client ids that is ~100k removals and a table rehash, a
//! stall of hundreds of milliseconds for every request on that worker.
//!
//! With `redis.shared_cache`, a miss asks the fleet's cache in Redis ([`shared`]) before
//! the backend; a hit there fills this cache. A local hit never reaches it.
//!
//! Time is tokio's clock, so tests can pause it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use moka::future::Cache;
use moka::ops::compute::Op;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::decision::preauth::{Answer, PreauthError};
use crate::decision::Destination;
use flights::Flights;
use shared::Through;
pub use shared::{SharedCache, SharedCounters, SharedOutcome};

mod flights;
mod shared;

/// The result of a lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Answered from the cache, or by a concurrent request's call this one waited for.
    Hit(Destination),
    /// This request made the backend call.
    Fetched(Destination),
    /// The backend call failed; the client's last answer, expired but within its stale
    /// window, is served instead.
    Stale(Destination, Arc<PreauthError>),
    /// The backend call failed and there is no answer to fall back on.
    Failed(Arc<PreauthError>),
}

/// A cached answer and when it was stored.
#[derive(Debug, Clone)]
struct Entry {
    answer: Answer,
    stored: Instant,
}

impl Entry {
    /// Whether the answer's lifetime (`Cache-Control`, capped by `cache.ttl`) has run out.
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored) >= self.answer.lifetime
    }

    /// Whether its stale window has run out too: it can never be served again.
    fn spent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored)
            >= self.answer.lifetime + self.answer.stale_if_error
    }
}

/// What the cache holds for one client, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub destination: Destination,
    pub age: Duration,
    pub expires_in: Duration,
}

/// How often the sweeper looks for spent entries: an eighth of `cache.ttl`, between a
/// quarter of a second and ten seconds. Expired entries are never served in between
/// (but as stale answers); they only hold memory, within `cache.max_entries`.
fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 8).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

#[derive(Clone)]
pub struct DecisionCache {
    cache: Arc<Cache<String, Entry>>,
    flights: Arc<Flights>,
    /// Counts invalidations. A pre-authorize call that was in flight across one may carry
    /// the answer the invalidation meant to drop: it serves the requests waiting for it but
    /// is not kept, and no stale answer is served in its place.
    invalidations: Arc<AtomicU64>,
    /// The fleet's cache in Redis, asked on a miss before the backend.
    shared: Option<Arc<SharedCache>>,
    /// `cache.ttl` and `cache.stale_if_error`, which cap what the shared cache hands over.
    limits: (Duration, Duration),
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl DecisionCache {
    /// A cache and its sweeper thread, which ends once the cache is dropped (a reload
    /// that changes `[cache]` replaces it).
    pub fn new(config: &CacheConfig) -> DecisionCache {
        let cache = Arc::new(Cache::builder().max_capacity(config.max_entries).build());
        let weak = Arc::downgrade(&cache);
        let interval = sweep_interval(config.ttl);
        let spawned = std::thread::Builder::new()
            .name("iamproxy-cache-sweep".into())
            .spawn(move || sweep_until_dropped(&weak, interval));
        if let Err(error) = spawned {
            // Without a sweeper, spent entries are still never served; they are
            // replaced when their client asks again, or evicted at `max_entries`.
            tracing::warn!(%error, "decision cache sweeper not started");
        }
        DecisionCache {
            cache,
            flights: Arc::default(),
            invalidations: Arc::default(),
            shared: None,
            limits: (config.ttl, config.stale_if_error),
        }
    }

    /// Asks `shared` on a miss before the backend.
    pub fn with_shared(mut self, shared: Option<Arc<SharedCache>>) -> DecisionCache {
        self.shared = shared;
        self
    }

    /// The fleet's cache in Redis, when `redis.shared_cache` is on.
    pub fn shared(&self) -> Option<&Arc<SharedCache>> {
        self.shared.as_ref()
    }

    /// Looks `client_id` up, calling `fetch` when there is no fresh answer. Concurrent
    /// misses for one id share a single `fetch`, and its error reaches all of them. An
    /// answer with neither a lifetime nor a stale window (`no-store`) serves the requests
    /// that waited for it and is not kept.
    pub async fn lookup<F>(&self, client_id: &str, fetch: F) -> Lookup
    where
        F: Future<Output = Result<Answer, PreauthError>>,
    {
        // The hit path borrows the id: no key allocation unless we insert.
        let held = self.cache.get(client_id).await;
        if let Some(entry) = &held {
            if !entry.expired(Instant::now()) {
                return Lookup::Hit(entry.answer.destination);
            }
        }
        let invalidations = self.invalidations.load(Ordering::Acquire);
        let mut fetched = false;
        let call = async {
            // A call that landed since the read above has stored a fresh answer already.
            if let Some(entry) = self.cache.get(client_id).await {
                if !entry.expired(Instant::now()) {
                    return Ok(entry.answer);
                }
            }
            let answer = match &self.shared {
                None => {
                    fetched = true;
                    fetch.await?
                }
                Some(shared) => match shared.through(client_id, fetch).await {
                    // Another instance's answer: kept for what Redis has left of it.
                    Through::Shared(answer) => Answer {
                        lifetime: answer.lifetime.min(self.limits.0),
                        stale_if_error: answer.stale_if_error.min(self.limits.1),
                        ..answer
                    },
                    Through::Fetched(answer) => {
                        fetched = true;
                        answer?
                    }
                },
            };
            self.keep(client_id, answer, invalidations).await;
            Ok(answer)
        };
        // Boxed: the call (moka's futures and the pre-authorize exchange) is most of this
        // future's size, and a hit, which never makes it, should not carry and move it.
        match self.flights.join(client_id, Box::pin(call)).await {
            Ok(answer) if fetched => Lookup::Fetched(answer.destination),
            Ok(answer) => Lookup::Hit(answer.destination),
            Err(error) => {
                let invalidated = self.invalidations.load(Ordering::Acquire) != invalidations;
                match held.filter(|entry| !invalidated && !entry.spent(Instant::now())) {
                    Some(entry) => Lookup::Stale(entry.answer.destination, error),
                    None => Lookup::Failed(error),
                }
            }
        }
    }

    /// Stores a fresh answer in place of whatever the client had, unless an invalidation
    /// landed while it was being fetched or it may not be kept; then the client keeps
    /// nothing, not even an older answer to serve stale.
    async fn keep(&self, client_id: &str, answer: Answer, invalidations: u64) {
        let keepable = !(answer.lifetime + answer.stale_if_error).is_zero();
        if keepable && self.invalidations.load(Ordering::Acquire) == invalidations {
            let entry = Entry {
                answer,
                stored: Instant::now(),
            };
            self.cache.insert(client_id.to_owned(), entry).await;
        } else {
            self.cache.remove(client_id).await;
        }
    }

    /// The fresh answer for `client_id`, if any, with its age and remaining lifetime.
    pub async fn inspect(&self, client_id: &str) -> Option<Cached> {
        let entry = self.cache.get(client_id).await?;
        let age = Instant::now().saturating_duration_since(entry.stored);
        (age < entry.answer.lifetime).then(|| Cached {
            destination: entry.answer.destination,
            age,
            expires_in: entry.answer.lifetime - age,
        })
    }

    /// Forgets `client_id`'s answer, stale or not: its next request asks again, and a
    /// failure then sends it to Rails. Whether there was a fresh one.
    pub async fn invalidate(&self, client_id: &str) -> bool {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        let removed = self.cache.remove(client_id).await;
        removed.is_some_and(|entry| !entry.expired(Instant::now()))
    }

    /// Forgets every answer; returns how many there were (stale ones included).
    pub async fn invalidate_all(&self) -> u64 {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        let held = self.settled_entry_count().await;
        self.cache.invalidate_all();
        self.cache.run_pending_tasks().await;
        held
    }

    /// Approximate number of kept answers, stale ones included, until swept.
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The exact number of kept answers, once pending evictions have been applied.
    pub async fn settled_entry_count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    #[cfg(test)]
    async fn settle(&self) {
        self.cache.run_pending_tasks().await;
    }
}

/// Removes `client_id`'s entry if it is still the spent one: a concurrent request may
/// have replaced it with a fresh answer already, which must stay.
async fn remove_if_spent(cache: &Cache<String, Entry>, client_id: &str) {
    cache
        .entry_by_ref(client_id)
        .and_compute_with(|held| async move {
            match held {
                Some(held) if held.value().spent(Instant::now()) => Op::Remove,
                _ => Op::Nop,
            }
        })
        .await;
}

/// The sweeper thread's loop: every `interval`, remove the entries that are spent and
/// apply moka's pending housekeeping, so that requests find little of either to do.
fn sweep_until_dropped(cache: &Weak<Cache<String, Entry>>, interval: Duration) {
    // moka's futures need no reactor or timer; a bare current-thread runtime drives them.
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::warn!(%error, "decision cache sweeper stopped");
            return;
        }
    };
    loop {
        std::thread::sleep(interval);
        let Some(cache) = cache.upgrade() else { return };
        runtime.block_on(sweep(&cache));
    }
}

/// One pass: collect the spent keys, then remove each unless it was refreshed meanwhile.
async fn sweep(cache: &Cache<String, Entry>) {
    let now = Instant::now();
    let spent: Vec<Arc<String>> = cache
        .iter()
        .filter(|(_, entry)| entry.spent(now))
        .map(|(key, _)| key)
        .collect();
    // Apply each small batch of removals here, so that no request finds a backlog of
    // them to apply.
    for batch in spent.chunks(128) {
        for key in batch {
            remove_if_spent(cache, key).await;
        }
        cache.run_pending_tasks().await;
    }
    cache.run_pending_tasks().await;
}

#[cfg(test)]
mod tests;
