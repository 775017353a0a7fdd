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
//! Time is tokio's clock, so tests can pause it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use moka::future::Cache;
use moka::ops::compute::Op;
use tokio::sync::OnceCell;
use tokio::time::Instant;

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
        }
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
            fetched = true;
            let answer = fetch.await?;
            self.keep(client_id, answer, invalidations).await;
            Ok(answer)
        };
        match self.flights.join(client_id, call).await {
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

type Shared = Result<Answer, Arc<PreauthError>>;

/// The pre-authorize calls in flight, one per client id: a miss joins the call in flight
/// for its client and shares its result, error included. Once a call has landed it is
/// forgotten, so the next miss calls again.
#[derive(Default)]
struct Flights {
    calls: Mutex<HashMap<String, Arc<OnceCell<Shared>>>>,
}

impl Flights {
    /// The result of the call for `client_id`: the one in flight, or `call` when there
    /// is none. If the request making the call goes away, a waiting one makes its own.
    async fn join<F>(&self, client_id: &str, call: F) -> Shared
    where
        F: Future<Output = Result<Answer, PreauthError>>,
    {
        let flight = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            let cell = calls.entry(client_id.to_owned()).or_default().clone();
            Flight {
                flights: self,
                client_id,
                cell,
            }
        };
        flight
            .cell
            .get_or_init(|| async { call.await.map_err(Arc::new) })
            .await
            .clone()
    }
}

/// One request's part in a call; forgets the call when it has landed, or when nobody
/// else waits for it.
struct Flight<'a> {
    flights: &'a Flights,
    client_id: &'a str,
    cell: Arc<OnceCell<Shared>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut calls = self
            .flights
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Clones are made under this lock, so the count cannot grow meanwhile: two means
        // the map's and ours.
        let done = self.cell.initialized() || Arc::strong_count(&self.cell) == 2;
        if done
            && calls
                .get(self.client_id)
                .is_some_and(|held| Arc::ptr_eq(held, &self.cell))
        {
            calls.remove(self.client_id);
        }
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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache(max_entries: u64) -> DecisionCache {
        DecisionCache::new(&CacheConfig {
            ttl: Duration::from_secs(60),
            max_entries,
            stale_if_error: Duration::from_secs(300),
        })
    }

    /// An answer with no stale window.
    fn answer(destination: Destination, lifetime: Duration) -> Result<Answer, PreauthError> {
        stale_after(destination, lifetime, Duration::ZERO)
    }

    fn stale_after(
        destination: Destination,
        lifetime: Duration,
        stale_if_error: Duration,
    ) -> Result<Answer, PreauthError> {
        Ok(Answer {
            destination,
            lifetime,
            stale_if_error,
        })
    }

    fn down() -> Result<Answer, PreauthError> {
        Err(PreauthError::Timeout(Duration::from_millis(500)))
    }

    fn served(lookup: &Lookup) -> Option<Destination> {
        match lookup {
            Lookup::Hit(d) | Lookup::Fetched(d) | Lookup::Stale(d, _) => Some(*d),
            Lookup::Failed(_) => None,
        }
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

    #[tokio::test(start_paused = true)]
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
            stale_if_error: Duration::ZERO,
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

    #[tokio::test]
    async fn the_sweeper_keeps_expired_entries_until_their_stale_window_ends() {
        let cache = DecisionCache::new(&CacheConfig {
            ttl: Duration::from_secs(1),
            max_entries: 10,
            stale_if_error: Duration::from_secs(60),
        });
        let (short, window) = (Duration::from_millis(50), Duration::from_millis(600));
        cache
            .lookup("stale", async {
                stale_after(Destination::Iam, short, window)
            })
            .await;
        cache
            .lookup("spent", async { answer(Destination::Iam, short) })
            .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.settled_entry_count().await > 1 {
            assert!(Instant::now() < deadline, "spent entry not swept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            cache.cache.get("stale").await.is_some(),
            "still within its window"
        );
        while cache.settled_entry_count().await > 0 {
            assert!(Instant::now() < deadline, "spent stale entry not swept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    /// A cache holding `app` → IAM for a minute, with a stale window of `window`.
    async fn holding_iam(window: Duration) -> DecisionCache {
        let cache = cache(10);
        let first = cache
            .lookup("app", async {
                stale_after(Destination::Iam, MINUTE, window)
            })
            .await;
        assert!(matches!(first, Lookup::Fetched(Destination::Iam)));
        cache
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_call_serves_the_last_answer_within_its_stale_window() {
        let cache = holding_iam(Duration::from_secs(300)).await;
        tokio::time::advance(MINUTE + Duration::from_secs(299)).await;
        let calls = AtomicUsize::new(0);
        let failing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            down()
        };
        let stale = cache.lookup("app", failing()).await;
        assert!(
            matches!(stale, Lookup::Stale(Destination::Iam, _)),
            "{stale:?}"
        );
        let again = cache.lookup("app", failing()).await;
        assert!(matches!(again, Lookup::Stale(Destination::Iam, _)));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "each request asks again");

        tokio::time::advance(Duration::from_secs(1)).await;
        let spent = cache.lookup("app", failing()).await;
        assert!(
            matches!(spent, Lookup::Failed(_)),
            "past the window: {spent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_good_answer_after_stale_ones_is_kept_again() {
        let cache = holding_iam(Duration::from_secs(300)).await;
        tokio::time::advance(MINUTE * 2).await;
        assert!(matches!(
            cache.lookup("app", async { down() }).await,
            Lookup::Stale(Destination::Iam, _)
        ));
        let fetched = cache
            .lookup("app", async { answer(Destination::Rails, MINUTE) })
            .await;
        assert!(matches!(fetched, Lookup::Fetched(Destination::Rails)));
        let hit = cache.lookup("app", async { down() }).await;
        assert!(matches!(hit, Lookup::Hit(Destination::Rails)));
    }

    #[tokio::test(start_paused = true)]
    async fn each_answer_keeps_its_own_stale_window() {
        let cache = cache(10);
        for (id, window) in [("short", 10), ("long", 100)] {
            let window = Duration::from_secs(window);
            cache
                .lookup(id, async { stale_after(Destination::Iam, MINUTE, window) })
                .await;
        }
        tokio::time::advance(MINUTE + Duration::from_secs(50)).await;
        let short = cache.lookup("short", async { down() }).await;
        let long = cache.lookup("long", async { down() }).await;
        assert!(matches!(short, Lookup::Failed(_)), "{short:?}");
        assert!(
            matches!(long, Lookup::Stale(Destination::Iam, _)),
            "{long:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_stale_window_a_failed_call_is_a_failure() {
        let cache = holding_iam(Duration::ZERO).await;
        tokio::time::advance(MINUTE).await;
        assert!(matches!(
            cache.lookup("app", async { down() }).await,
            Lookup::Failed(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_may_not_be_kept_drops_the_older_one() {
        let cache = holding_iam(Duration::from_secs(300)).await;
        tokio::time::advance(MINUTE).await;
        let no_store = cache
            .lookup("app", async { answer(Destination::Rails, Duration::ZERO) })
            .await;
        assert!(matches!(no_store, Lookup::Fetched(Destination::Rails)));
        let after = cache.lookup("app", async { down() }).await;
        assert!(matches!(after, Lookup::Failed(_)), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_drops_stale_answers_too() {
        for all in [false, true] {
            let cache = holding_iam(Duration::from_secs(300)).await;
            tokio::time::advance(MINUTE * 2).await;
            if all {
                assert_eq!(cache.invalidate_all().await, 1, "the stale one counts");
            } else {
                assert!(!cache.invalidate("app").await, "nothing fresh was held");
            }
            let after = cache.lookup("app", async { down() }).await;
            assert!(matches!(after, Lookup::Failed(_)), "all={all}: {after:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalidation_during_the_failing_call_serves_no_stale_answer() {
        let cache = holding_iam(Duration::from_secs(300)).await;
        tokio::time::advance(MINUTE * 2).await;
        let (fail, failed) = tokio::sync::oneshot::channel::<()>();
        let (started, call_started) = tokio::sync::oneshot::channel();
        let waiting = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .lookup("app", async move {
                        started.send(()).unwrap();
                        failed.await.unwrap();
                        down()
                    })
                    .await
            })
        };
        call_started.await.unwrap();
        cache.invalidate("app").await;
        fail.send(()).unwrap();
        let served = waiting.await.unwrap();
        assert!(matches!(served, Lookup::Failed(_)), "{served:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_for_a_stale_client_share_one_failing_call() {
        let cache = holding_iam(Duration::from_secs(300)).await;
        tokio::time::advance(MINUTE * 2).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let lookups: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .lookup("app", async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            down()
                        })
                        .await
                })
            })
            .collect();
        for lookup in lookups {
            let lookup = lookup.await.unwrap();
            assert!(
                matches!(lookup, Lookup::Stale(Destination::Iam, _)),
                "{lookup:?}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "single flight");
        assert!(
            cache.flights.calls.lock().unwrap().is_empty(),
            "call forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_makes_its_own_call_when_the_caller_goes_away() {
        let cache = cache(10);
        let calls = Arc::new(AtomicUsize::new(0));
        let lookup = |delay: Duration| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .lookup("app", async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        answer(Destination::Iam, MINUTE)
                    })
                    .await
            })
        };
        let first = lookup(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let second = lookup(Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(1)).await;
        first.abort();
        let second = second.await.unwrap();
        assert_eq!(served(&second), Some(Destination::Iam));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(cache.flights.calls.lock().unwrap().is_empty());

        // A caller that goes away with nobody waiting leaves nothing behind either.
        cache.invalidate_all().await;
        let alone = lookup(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(1)).await;
        alone.abort();
        let _ = alone.await;
        assert!(cache.flights.calls.lock().unwrap().is_empty());
    }
}
