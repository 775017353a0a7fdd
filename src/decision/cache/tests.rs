//! The decision cache's tests: lifetimes, stale serving, single flight, invalidation and
//! the sweeper, on tokio's paused clock where time matters.

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
    let sweeper = std::thread::spawn(move || sweep_until_dropped(&weak, Duration::from_millis(10)));
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
