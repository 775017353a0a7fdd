//! The decision cache: one pre-authorize answer per client id, bounded, each entry with
//! its own lifetime, and one backend call per client id however many requests miss at once.
//!
//! Expiry is checked when an entry is read, and expired entries are removed by a sweeper
//! thread, never by a request. moka's own per-entry expiry would remove every entry that
//! expired at once inside whichever request next touched the cache: after a burst of new
//! client ids that is ~100k removals and a table rehash, a stall of hundreds of
//! milliseconds for every request on that worker.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::ops::compute::Op;

use crate::config::CacheConfig;
use crate::decision::Destination;
use crate::preauth::{Answer, PreauthError};

/// The result of a lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Answered from the cache, or by a concurrent request's call this one waited for.
    Hit(Destination),
    /// This request made the backend call.
    Fetched(Destination),
    /// The backend call failed; nothing was cached.
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
}

/// What the cache holds for one client, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub destination: Destination,
    pub age: Duration,
    pub expires_in: Duration,
}

/// How often the sweeper looks for expired entries: an eighth of `cache.ttl`, between a
/// quarter of a second and ten seconds. Expired entries are never served in between;
/// they only hold memory, within `cache.max_entries`.
fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 8).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

#[derive(Clone)]
pub struct DecisionCache {
    cache: Arc<Cache<String, Entry>>,
    /// Counts invalidations. A pre-authorize call that was in flight across one may carry
    /// the answer the invalidation meant to drop: it serves the requests waiting for it but
    /// is not kept.
    invalidations: Arc<AtomicU64>,
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
            // Without a sweeper, expired entries are still never served; they are
            // removed when read or evicted at `max_entries`.
            tracing::warn!(%error, "decision cache sweeper not started");
        }
        DecisionCache {
            cache,
            invalidations: Arc::default(),
        }
    }

    /// Looks `client_id` up, calling `fetch` on a miss. Concurrent misses for one id share
    /// a single `fetch`; its error reaches all of them and is not cached. An answer with a
    /// zero lifetime (`no-store`) serves the requests that waited for it, then expires.
    pub async fn lookup<F>(&self, client_id: &str, fetch: F) -> Lookup
    where
        F: Future<Output = Result<Answer, PreauthError>>,
    {
        // The hit path borrows the id: no key allocation unless we insert.
        if let Some(entry) = self.cache.get(client_id).await {
            if !entry.expired(Instant::now()) {
                return Lookup::Hit(entry.answer.destination);
            }
            remove_if_expired(&self.cache, client_id).await;
        }
        let invalidations = self.invalidations.load(Ordering::Acquire);
        let fetch = async {
            let mut answer = fetch.await?;
            if self.invalidations.load(Ordering::Acquire) != invalidations {
                answer.lifetime = Duration::ZERO;
            }
            Ok(Entry {
                answer,
                stored: Instant::now(),
            })
        };
        match self
            .cache
            .entry_by_ref(client_id)
            .or_try_insert_with(fetch)
            .await
        {
            Ok(entry) if entry.is_fresh() => Lookup::Fetched(entry.value().answer.destination),
            Ok(entry) => Lookup::Hit(entry.value().answer.destination),
            Err(error) => Lookup::Failed(error),
        }
    }

    /// The cached answer for `client_id`, if any, with its age and remaining lifetime.
    pub async fn inspect(&self, client_id: &str) -> Option<Cached> {
        let entry = self.cache.get(client_id).await?;
        let age = entry.stored.elapsed();
        (age < entry.answer.lifetime).then(|| Cached {
            destination: entry.answer.destination,
            age,
            expires_in: entry.answer.lifetime - age,
        })
    }

    /// Forgets `client_id`'s answer: its next request asks again. Whether there was one.
    pub async fn invalidate(&self, client_id: &str) -> bool {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        let removed = self.cache.remove(client_id).await;
        removed.is_some_and(|entry| !entry.expired(Instant::now()))
    }

    /// Forgets every answer; returns how many there were.
    pub async fn invalidate_all(&self) -> u64 {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        let held = self.settled_entry_count().await;
        self.cache.invalidate_all();
        self.cache.run_pending_tasks().await;
        held
    }

    /// Approximate number of cached answers (expired ones count until swept).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The exact number of cached answers, once pending evictions have been applied.
    pub async fn settled_entry_count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    #[cfg(test)]
    async fn settle(&self) {
        self.cache.run_pending_tasks().await;
    }
}

/// Removes `client_id`'s entry if it is still the expired one: a concurrent request may
/// have replaced it with a fresh answer already, which must stay.
async fn remove_if_expired(cache: &Cache<String, Entry>, client_id: &str) {
    cache
        .entry_by_ref(client_id)
        .and_compute_with(|held| async move {
            match held {
                Some(held) if held.value().expired(Instant::now()) => Op::Remove,
                _ => Op::Nop,
            }
        })
        .await;
}

/// The sweeper thread's loop: every `interval`, remove the entries that have expired and
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

/// One pass: collect the expired keys, then remove each unless it was refreshed meanwhile.
async fn sweep(cache: &Cache<String, Entry>) {
    let now = Instant::now();
    let expired: Vec<Arc<String>> = cache
        .iter()
        .filter(|(_, entry)| entry.expired(now))
        .map(|(key, _)| key)
        .collect();
    // Apply each small batch of removals here, so that no request finds a backlog of
    // them to apply.
    for batch in expired.chunks(128) {
        for key in batch {
            remove_if_expired(cache, key).await;
        }
        cache.run_pending_tasks().await;
    }
    cache.run_pending_tasks().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache(max_entries: u64) -> DecisionCache {
        DecisionCache::new(&CacheConfig {
            ttl: Duration::from_secs(60),
            max_entries,
        })
    }

    fn answer(destination: Destination, lifetime: Duration) -> Result<Answer, PreauthError> {
        Ok(Answer {
            destination,
            lifetime,
        })
    }

    #[tokio::test]
    async fn second_lookup_is_a_hit() {
        let cache = cache(10);
        let long = Duration::from_secs(60);
        let first = cache
            .lookup("app", async { answer(Destination::Iam, long) })
            .await;
        assert!(matches!(first, Lookup::Fetched(Destination::Iam)));
        let second = cache
            .lookup("app", async { panic!("must not fetch on a hit") })
            .await;
        assert!(matches!(second, Lookup::Hit(Destination::Iam)));
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let cache = cache(10);
        let failed = cache
            .lookup("app", async { Err(PreauthError::BadResponse("x")) })
            .await;
        assert!(matches!(failed, Lookup::Failed(_)));
        let retried = cache
            .lookup("app", async {
                answer(Destination::Rails, Duration::from_secs(60))
            })
            .await;
        assert!(matches!(retried, Lookup::Fetched(Destination::Rails)));
    }

    #[tokio::test]
    async fn zero_lifetime_answers_are_asked_again() {
        let cache = cache(10);
        for _ in 0..2 {
            let got = cache
                .lookup("app", async { answer(Destination::Iam, Duration::ZERO) })
                .await;
            assert!(matches!(got, Lookup::Fetched(Destination::Iam)));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_share_one_fetch() {
        let cache = cache(10);
        let calls = Arc::new(AtomicUsize::new(0));
        let lookups = (0..200).map(|_| {
            let cache = cache.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                cache
                    .lookup("app", async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        answer(Destination::Iam, Duration::from_secs(60))
                    })
                    .await
            })
        });
        let mut fetched = 0;
        for lookup in lookups.collect::<Vec<_>>() {
            match lookup.await.unwrap() {
                Lookup::Fetched(Destination::Iam) => fetched += 1,
                Lookup::Hit(Destination::Iam) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(fetched, 1);
    }

    #[tokio::test]
    async fn inspect_and_invalidate_one_or_all() {
        let cache = cache(10);
        let long = Duration::from_secs(60);
        for id in ["a", "b", "c"] {
            cache
                .lookup(id, async { answer(Destination::Iam, long) })
                .await;
        }
        let seen = cache.inspect("a").await.expect("cached");
        assert_eq!(seen.destination, Destination::Iam);
        assert!(seen.age < Duration::from_secs(5));
        assert_eq!(seen.age + seen.expires_in, long);
        assert_eq!(cache.inspect("zzz").await, None);

        assert!(cache.invalidate("a").await);
        assert!(!cache.invalidate("a").await, "already gone");
        assert_eq!(cache.inspect("a").await, None);
        let again = cache
            .lookup("a", async { answer(Destination::Rails, long) })
            .await;
        assert!(
            matches!(again, Lookup::Fetched(Destination::Rails)),
            "asked again"
        );

        assert_eq!(cache.invalidate_all().await, 3);
        assert_eq!(cache.settled_entry_count().await, 0);
        let b = cache
            .lookup("b", async { answer(Destination::Rails, long) })
            .await;
        assert!(matches!(b, Lookup::Fetched(Destination::Rails)));
    }

    #[tokio::test]
    async fn an_answer_is_served_for_its_lifetime_then_asked_again() {
        let cache = cache(10);
        let short = Duration::from_millis(200);
        let first = cache
            .lookup("app", async { answer(Destination::Iam, short) })
            .await;
        assert!(matches!(first, Lookup::Fetched(Destination::Iam)));
        let within = cache
            .lookup("app", async {
                panic!("must not fetch within the lifetime")
            })
            .await;
        assert!(matches!(within, Lookup::Hit(Destination::Iam)));
        tokio::time::sleep(short).await;
        assert_eq!(cache.inspect("app").await, None, "expired is not shown");
        let after = cache
            .lookup("app", async {
                answer(Destination::Rails, Duration::from_secs(60))
            })
            .await;
        assert!(matches!(after, Lookup::Fetched(Destination::Rails)));
        let cached = cache.inspect("app").await.expect("the new answer");
        assert_eq!(cached.destination, Destination::Rails);
    }

    #[tokio::test]
    async fn the_sweeper_removes_expired_entries_and_keeps_live_ones() {
        // ttl 1s: the sweeper runs every 250 ms.
        let cache = DecisionCache::new(&CacheConfig {
            ttl: Duration::from_secs(1),
            max_entries: 10_000,
        });
        for i in 0..1_000 {
            let id = format!("short-{i}");
            cache
                .lookup(&id, async {
                    answer(Destination::Iam, Duration::from_millis(50))
                })
                .await;
        }
        cache
            .lookup("long", async {
                answer(Destination::Rails, Duration::from_secs(60))
            })
            .await;
        assert_eq!(cache.settled_entry_count().await, 1_001);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.settled_entry_count().await > 1 {
            assert!(Instant::now() < deadline, "expired entries not swept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(cache.inspect("long").await.is_some(), "live entry kept");
    }

    #[test]
    fn the_sweeper_ends_with_its_cache() {
        let cache = Arc::new(Cache::builder().max_capacity(10).build());
        let weak = Arc::downgrade(&cache);
        let sweeper =
            std::thread::spawn(move || sweep_until_dropped(&weak, Duration::from_millis(10)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!sweeper.is_finished(), "sweeps while the cache lives");
        drop(cache);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sweeper.is_finished() {
            assert!(Instant::now() < deadline, "sweeper outlived its cache");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn an_answer_fetched_across_an_invalidation_is_served_but_not_kept() {
        for all in [false, true] {
            let cache = cache(10);
            let (answered, answer_rx) = tokio::sync::oneshot::channel();
            let (started, started_rx) = tokio::sync::oneshot::channel();
            let waiting = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .lookup("app", async move {
                            started.send(()).unwrap();
                            answer_rx.await.unwrap();
                            answer(Destination::Iam, Duration::from_secs(60))
                        })
                        .await
                })
            };
            started_rx.await.unwrap();
            // The invalidation lands while the pre-authorize call is in flight.
            if all {
                cache.invalidate_all().await;
            } else {
                cache.invalidate("app").await;
            }
            answered.send(()).unwrap();
            let served = waiting.await.unwrap();
            assert!(
                matches!(served, Lookup::Fetched(Destination::Iam)),
                "{served:?}"
            );
            let next = cache
                .lookup("app", async {
                    answer(Destination::Rails, Duration::from_secs(60))
                })
                .await;
            assert!(
                matches!(next, Lookup::Fetched(Destination::Rails)),
                "all={all}: asked again, {next:?}"
            );
        }
    }

    #[tokio::test]
    async fn stays_within_max_entries() {
        let cache = cache(100);
        for i in 0..1_000 {
            let id = format!("client-{i}");
            cache
                .lookup(&id, async {
                    answer(Destination::Rails, Duration::from_secs(60))
                })
                .await;
        }
        cache.settle().await;
        assert!(cache.entry_count() <= 100, "{}", cache.entry_count());
    }
}
