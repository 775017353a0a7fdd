//! The decision cache: one pre-authorize answer per client id, bounded, each entry with
//! its own lifetime, and one backend call per client id however many requests miss at once.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

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

/// What the cache holds for one client, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub destination: Destination,
    pub age: Duration,
    pub expires_in: Duration,
}

/// Each entry lives as long as its answer said (`Cache-Control`), capped by `cache.ttl`.
struct AnswerLifetime;

impl Expiry<String, Entry> for AnswerLifetime {
    fn expire_after_create(&self, _: &String, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.answer.lifetime)
    }
}

#[derive(Clone)]
pub struct DecisionCache {
    cache: Cache<String, Entry>,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl DecisionCache {
    pub fn new(config: &CacheConfig) -> DecisionCache {
        DecisionCache {
            cache: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(AnswerLifetime)
                .build(),
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
            return Lookup::Hit(entry.answer.destination);
        }
        let fetch = async {
            let answer = fetch.await?;
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
        Some(Cached {
            destination: entry.answer.destination,
            age,
            expires_in: entry.answer.lifetime.saturating_sub(age),
        })
    }

    /// Forgets `client_id`'s answer: its next request asks again. Whether there was one.
    pub async fn invalidate(&self, client_id: &str) -> bool {
        self.cache.remove(client_id).await.is_some()
    }

    /// Forgets every answer; returns how many there were.
    pub async fn invalidate_all(&self) -> u64 {
        let held = self.settled_entry_count().await;
        self.cache.invalidate_all();
        self.cache.run_pending_tasks().await;
        held
    }

    /// Approximate number of cached answers.
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
