//! The fleet's decision cache in Redis (`redis.shared_cache`), against Debian's real
//! `redis-server` and `redis-sentinel` on loopback: gateways that share one Redis and one
//! pre-authorize backend make one call per client between them at any concurrency; a
//! Redis hit lives for what is left of the answer's lifetime; `no-store` answers and
//! errors are not written; invalidations reach Redis; a dead or hung Redis costs no
//! request and at most `redis.timeout`; TLS, AUTH and a Sentinel failover.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::Value;
use support::logs::Captured;
use support::metrics::scrape;
use support::process::{free_addr, TempFile, PATIENCE};
use support::redis::{RedisOptions, RedisServer, SentinelSetup};
use support::tls::Ca;
use support::{gateway, until, FakeUpstream, GatewayFakes, Reply, TestClient, TestGateway};

const TOKEN: &str = "shared-cache-test-token-0123456789";
/// `preauthorize.timeout`, and so how long members wait for another's call.
const PREAUTH_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the backend takes where a test needs calls in flight together.
const SLOW: Duration = Duration::from_millis(2000);

/// Each test starts gateways, Redis servers and sentinels of its own: run one at a time,
/// so that eight of them on a loaded two-CPU machine do not stretch a burst past the
/// backend's answer, which the lock tests need every member to wait for.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Gateways sharing one Redis and one set of fakes, so the pre-authorize fake counts the
/// fleet's calls.
struct Fleet {
    members: Vec<TestGateway>,
    preauth: FakeUpstream,
    _token: TempFile,
}

impl Fleet {
    /// `size` gateways whose `[redis]` table is `redis` plus `shared_cache = true`.
    async fn start(size: usize, redis: &str) -> Fleet {
        let token = TempFile::new(&format!("{TOKEN}\n"));
        let fakes = GatewayFakes::start().await;
        let mut members = Vec::new();
        for _ in 0..size {
            let member = member(&fakes, redis, &token).await;
            connected(&member).await;
            members.push(member);
        }
        Fleet {
            members,
            preauth: fakes.preauth,
            _token: token,
        }
    }

    async fn stop(self) {
        for member in self.members {
            member.stop().await;
        }
    }
}

async fn member(fakes: &GatewayFakes, redis: &str, token: &TempFile) -> TestGateway {
    gateway()
        .set("redis", &format!("{redis}\nshared_cache = true"))
        // Long enough that slow backend answers (below) are not timeouts, and that every
        // member's first lookup lands while the first call is in flight on a busy machine.
        .set(
            "preauthorize",
            &format!("timeout = \"{}ms\"", PREAUTH_TIMEOUT.as_millis()),
        )
        .set("admin", &format!("token_file = \"{}\"", token.path()))
        .start_with(GatewayFakes {
            rails: fakes.rails.clone(),
            iam: fakes.iam.clone(),
            preauth: fakes.preauth.clone(),
        })
        .await
}

/// Waits until `member`'s shared cache has its Redis connection, which it makes in the
/// background: until then its lookups go straight to the backend, which would add calls
/// the lock tests count. An admin invalidation of an id no test asks for says whether
/// Redis took it.
async fn connected(member: &TestGateway) {
    until(PATIENCE, "the member's shared cache connected", || async {
        let answer = member
            .admin_json(Method::DELETE, "/-/admin/decisions/fleet-warm-up", TOKEN)
            .await;
        answer["shared"] == Value::Bool(true)
    })
    .await;
}

/// `[redis]` for a plain server; a generous timeout, as a loaded machine running debug
/// builds is slow, except where the test is about the timeout.
fn plain(redis: &RedisServer) -> String {
    format!("url = \"{}\"\ntimeout = \"500ms\"", redis.url())
}

async fn authorize(gw: &TestGateway, client_id: &str) -> String {
    let answer = TestClient::new()
        .get(&gw.url(&format!("/oauth/authorize?client_id={client_id}")))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.served_by()
}

/// Every member asks for every client `per_member` times, all at once.
async fn burst(fleet: &Fleet, clients: &[String], per_member: usize) -> Vec<String> {
    let mut requests = tokio::task::JoinSet::new();
    for member in &fleet.members {
        for client in clients {
            for _ in 0..per_member {
                let url = member.url(&format!("/oauth/authorize?client_id={client}"));
                requests.spawn(async move {
                    let answer = TestClient::new().get(&url).await;
                    assert_eq!(answer.status, 200, "{}", answer.text());
                    answer.served_by()
                });
            }
        }
    }
    requests.join_all().await
}

async fn lookups(gw: &TestGateway, outcome: &str) -> f64 {
    scrape(gw.admin).await.value(
        "iamproxy_shared_cache_lookups_total",
        &[("outcome", outcome)],
    )
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_preauthorize_call_per_client_across_the_fleet_at_any_concurrency() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start(free_addr().port()).await;
    let fleet = Fleet::start(3, &plain(&redis)).await;
    // Slow enough that every member misses while the first call is in flight.
    fleet.preauth.always(Reply::destination("iam").after(SLOW));
    let clients = ids("app", 8);

    let served = burst(&fleet, &clients, 4).await;
    assert!(served.iter().all(|by| by == "iam"), "{served:?}");
    assert_eq!(fleet.preauth.count(), clients.len(), "one call per client");
    until(Duration::from_secs(2), "every answer written", || async {
        redis.keys("iamproxy:decision:*").await.len() >= clients.len()
    })
    .await;
    let keys = redis.keys("iamproxy:decision:*").await;
    assert_eq!(keys.len(), clients.len(), "{keys:?}");
    assert!(keys.contains(&"iamproxy:decision:0:app-0".to_string()));
    let fills = || async {
        let mut fills = 0.0;
        for member in &fleet.members {
            fills += scrape(member.admin)
                .await
                .value("iamproxy_shared_cache_fills_total", &[]);
        }
        fills
    };
    until(Duration::from_secs(2), "every fill counted", || async {
        fills().await >= clients.len() as f64
    })
    .await;
    assert_eq!(fills().await, clients.len() as f64);

    // A member that has not seen a client reads it from Redis: a hit, no call.
    let late = ids("late", 1);
    assert_eq!(authorize(&fleet.members[0], &late[0]).await, "iam");
    assert_eq!(authorize(&fleet.members[2], &late[0]).await, "iam");
    assert_eq!(fleet.preauth.count(), clients.len() + 1);
    assert!(lookups(&fleet.members[2], "hit").await >= 1.0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_hit_lives_for_what_is_left_of_the_answers_lifetime() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start(free_addr().port()).await;
    let fleet = Fleet::start(2, &plain(&redis)).await;
    fleet
        .preauth
        .always(Reply::destination("iam").with_header("cache-control", "max-age=3"));
    let (one, two) = (&fleet.members[0], &fleet.members[1]);

    let fetched = Instant::now();
    assert_eq!(authorize(one, "app").await, "iam");
    // Written after the answer went out: the request does not wait for it.
    until(Duration::from_secs(1), "written", || async {
        redis.keys("iamproxy:decision:*").await.len() == 1
    })
    .await;
    let pttl: i64 = redis.cmd(&["PTTL", "iamproxy:decision:0:app"]).await;
    assert!(
        (2000..=3000).contains(&pttl),
        "Redis expires it: PTTL {pttl}"
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(authorize(two, "app").await, "iam");
    assert_eq!(fleet.preauth.count(), 1, "a Redis hit");
    let cached = two
        .admin_json(Method::GET, "/-/admin/decisions/app", TOKEN)
        .await;
    let left = cached["cached"]["expires_in_seconds"].as_f64().unwrap();
    let should = 3.0 - fetched.elapsed().as_secs_f64();
    assert!(
        left <= should + 0.05 && left > 0.2,
        "kept {left}s locally, {should}s were left"
    );

    // Expired everywhere: the next request asks again.
    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(fetched.elapsed()) + Duration::from_millis(100),
    )
    .await;
    assert_eq!(authorize(two, "app").await, "iam");
    assert_eq!(fleet.preauth.count(), 2);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_answers_are_handed_to_the_waiters_but_never_written() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start(free_addr().port()).await;
    let fleet = Fleet::start(3, &plain(&redis)).await;
    fleet.preauth.always(
        Reply::destination("iam")
            .with_header("cache-control", "no-store")
            .after(SLOW),
    );

    let served = burst(&fleet, &ids("ns", 1), 3).await;
    assert!(served.iter().all(|by| by == "iam"), "{served:?}");
    assert_eq!(
        fleet.preauth.count(),
        1,
        "the waiters got the holder's answer"
    );
    assert!(redis.keys("iamproxy:decision:*").await.is_empty());

    // Not kept anywhere: the next request asks again.
    fleet
        .preauth
        .always(Reply::destination("iam").with_header("cache-control", "no-store"));
    assert_eq!(authorize(&fleet.members[1], "ns-0").await, "iam");
    assert_eq!(fleet.preauth.count(), 2);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preauthorize_errors_are_never_written_and_each_member_fails_open_as_alone() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start(free_addr().port()).await;
    let fleet = Fleet::start(3, &plain(&redis)).await;
    fleet.preauth.always(Reply::status(500).after(SLOW));

    let served = burst(&fleet, &ids("err", 1), 2).await;
    assert!(served.iter().all(|by| by == "rails"), "{served:?}");
    assert!(redis.keys("iamproxy:decision:*").await.is_empty());
    // The holder's error is handed on: each member then asks once for its own requests,
    // as it would without a shared cache, rather than waiting for another holder.
    assert_eq!(fleet.preauth.count(), fleet.members.len());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_redis_from_the_admin_api_and_from_bare_messages() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start(free_addr().port()).await;
    let fleet = Fleet::start(2, &plain(&redis)).await;
    fleet.preauth.always(Reply::destination("iam"));
    let (one, two) = (&fleet.members[0], &fleet.members[1]);
    until(Duration::from_secs(10), "both subscribed", || async {
        let (_, n): (String, i64) = redis.cmd(&["PUBSUB", "NUMSUB", "iamproxy:decisions"]).await;
        n == 2
    })
    .await;

    assert_eq!(authorize(one, "app").await, "iam");
    assert_eq!(authorize(two, "app").await, "iam");
    assert_eq!(fleet.preauth.count(), 1);

    // One client, from the admin API: gone from Redis, and asked again anywhere.
    let answer = two
        .admin_json(Method::DELETE, "/-/admin/decisions/app", TOKEN)
        .await;
    assert_eq!(answer["shared"], true);
    assert_eq!(answer["published"], true);
    assert!(redis.keys("iamproxy:decision:*").await.is_empty());
    until(
        Duration::from_secs(5),
        "forgotten on the other member",
        || async {
            one.admin_json(Method::GET, "/-/admin/decisions/app", TOKEN)
                .await["cached"]
                .is_null()
        },
    )
    .await;
    assert_eq!(authorize(one, "app").await, "iam");
    assert_eq!(fleet.preauth.count(), 2);

    // Everything: one INCR of the generation, no key scan; the old keys expire by themselves.
    let answer = one
        .admin_json(Method::DELETE, "/-/admin/decisions", TOKEN)
        .await;
    assert_eq!(answer["shared"], true);
    until(
        Duration::from_secs(5),
        "forgotten on the other member",
        || async {
            two.admin_json(Method::GET, "/-/admin/decisions/app", TOKEN)
                .await["cached"]
                .is_null()
        },
    )
    .await;
    let generation: String = redis.cmd(&["GET", "iamproxy:generation"]).await;
    assert_eq!(generation, "1", "bumped once, by the admin API only");
    assert_eq!(authorize(two, "app").await, "iam");
    assert_eq!(fleet.preauth.count(), 3);
    let both = ["iamproxy:decision:0:app", "iamproxy:decision:1:app"].map(String::from);
    until(
        Duration::from_secs(2),
        "the old generation's key and the new",
        || async { redis.keys("iamproxy:decision:*").await == both },
    )
    .await;

    // A bare message, as Rails would publish after a flag change: the members forget the
    // shared answer too, or they would read it back.
    let _: i64 = redis
        .cmd(&["PUBLISH", "iamproxy:decisions", r#"{"client_id": "app"}"#])
        .await;
    until(Duration::from_secs(5), "deleted from redis", || async {
        redis.keys("iamproxy:decision:*").await == both[..1]
    })
    .await;
    let _: i64 = redis
        .cmd(&["PUBLISH", "iamproxy:decisions", r#"{"all": true}"#])
        .await;
    until(Duration::from_secs(5), "the generation bumped", || async {
        let generation: String = redis.cmd(&["GET", "iamproxy:generation"]).await;
        generation.parse::<i64>().unwrap() >= 2
    })
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hung_redis_costs_no_request_and_at_most_its_timeout() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let logs = Captured::global();
    let mut redis = RedisServer::start(free_addr().port()).await;
    let fleet = Fleet::start(2, &format!("url = \"{}\"\ntimeout = \"50ms\"", redis.url())).await;
    fleet.preauth.always(Reply::destination("iam"));
    let (one, two) = (&fleet.members[0], &fleet.members[1]);
    assert_eq!(authorize(one, "warm").await, "iam");
    until(Duration::from_secs(5), "a shared hit", || async {
        authorize(two, "warm").await == "iam" && lookups(two, "hit").await >= 1.0
    })
    .await;

    for episode in ["hung", "dead"] {
        let before = logs
            .text()
            .matches("redis unavailable: shared decision cache bypassed")
            .count();
        match episode {
            "hung" => redis.pause(),
            _ => redis.kill(),
        }
        let (calls, timeouts) = (fleet.preauth.count(), lookups(one, "timeout").await);
        let mut slowest = Duration::ZERO;
        for n in 0..40 {
            let started = Instant::now();
            assert_eq!(authorize(one, &format!("{episode}-{n}")).await, "iam");
            slowest = slowest.max(started.elapsed());
        }
        assert_eq!(fleet.preauth.count(), calls + 40, "each asked the backend");
        // The fake answers at once: what is left is the Redis timeout, if any, plus a
        // debug build's own time on a busy machine.
        assert!(
            slowest < Duration::from_millis(50 + 250),
            "{episode}: {slowest:?}"
        );
        let timed_out = lookups(one, "timeout").await - timeouts;
        assert!(
            timed_out <= 3.0,
            "{episode}: {timed_out} timeouts: the backoff skips Redis"
        );
        assert!(lookups(one, "error").await >= 1.0);
        let logged = logs
            .text()
            .matches("redis unavailable: shared decision cache bypassed")
            .count();
        assert!(
            (1..=2).contains(&(logged - before)),
            "{episode}: logged {} times, once per member and episode",
            logged - before
        );

        match episode {
            "hung" => redis.resume(),
            _ => redis.restart().await,
        }
        // Back by itself: a client one member fetched is a Redis hit on the other.
        let round = AtomicUsize::new(0);
        until(Duration::from_secs(15), "the shared cache back", || async {
            let client = format!("{episode}-back-{}", round.fetch_add(1, Ordering::Relaxed));
            authorize(one, &client).await;
            let hits = lookups(two, "hit").await;
            authorize(two, &client).await;
            lookups(two, "hit").await > hits
        })
        .await;
    }
    assert!(logs
        .text()
        .contains("redis answers again: shared decision cache resumed"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_acl_users_from_the_url_or_a_password_file() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let ca = Ca::new("redis test CA");
    let admin_password = format!("admin-{}", std::process::id());
    let password = format!(
        "{:x}",
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 7)
    );
    let redis = RedisServer::with(
        free_addr().port(),
        RedisOptions {
            requirepass: Some(admin_password),
            users: vec![format!("iamproxy on >{password} ~iamproxy:* &* +@all")],
            ..RedisOptions::default()
        }
        .tls(&ca),
    )
    .await;
    let port = redis.port;
    let ca_file = ca.file.toml();
    let password_file = TempFile::new(&format!("{password}\n"));
    let token = TempFile::new(&format!("{TOKEN}\n"));
    let fakes = GatewayFakes::start().await;
    fakes.preauth.always(Reply::destination("iam").after(SLOW));
    let in_url = format!(
        "url = \"rediss://iamproxy:{password}@127.0.0.1:{port}/\"\nca_file = \"{ca_file}\"\ntimeout = \"500ms\""
    );
    let in_file = format!(
        "url = \"rediss://iamproxy@127.0.0.1:{port}/\"\nca_file = \"{ca_file}\"\npassword_file = \"{}\"\ntimeout = \"500ms\"",
        password_file.path()
    );
    let wrong_password = TempFile::new("not-the-password\n");
    let refused = format!(
        "url = \"rediss://iamproxy@127.0.0.1:{port}/\"\nca_file = \"{ca_file}\"\npassword_file = \"{}\"",
        wrong_password.path()
    );
    let fleet = Fleet {
        members: vec![
            member(&fakes, &in_url, &token).await,
            member(&fakes, &in_file, &token).await,
        ],
        preauth: fakes.preauth.clone(),
        _token: token,
    };
    until(
        Duration::from_secs(10),
        "both subscribed over TLS",
        || async {
            let (_, n): (String, i64) =
                redis.cmd(&["PUBSUB", "NUMSUB", "iamproxy:decisions"]).await;
            n == 2
        },
    )
    .await;
    let clients = ids("tls", 3);
    let served = burst(&fleet, &clients, 2).await;
    assert!(served.iter().all(|by| by == "iam"), "{served:?}");
    assert_eq!(
        fleet.preauth.count(),
        clients.len(),
        "shared over TLS with AUTH"
    );
    until(Duration::from_secs(2), "every answer written", || async {
        redis.keys("iamproxy:decision:*").await.len() == clients.len()
    })
    .await;

    // Refused AUTH: Redis is bypassed, the requests are served as without it.
    let token = TempFile::new(&format!("{TOKEN}\n"));
    let outsider = member(&fakes, &refused, &token).await;
    assert_eq!(authorize(&outsider, "tls-0").await, "iam");
    assert_eq!(fleet.preauth.count(), clients.len() + 1, "no shared answer");
    assert!(lookups(&outsider, "error").await >= 1.0);
    outsider.stop().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sentinel_the_fleet_follows_the_master_through_a_failover() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut setup = SentinelSetup::start().await;
    let dead_sentinel = free_addr();
    let redis = format!(
        "sentinels = [\"{dead_sentinel}\", \"{}\"]\nsentinel_master = \"{}\"\ntimeout = \"500ms\"",
        setup.sentinel.addr(),
        setup.name
    );
    let fleet = Fleet::start(2, &redis).await;
    fleet.preauth.always(Reply::destination("iam"));
    let (one, two) = (&fleet.members[0], &fleet.members[1]);
    // A new client each round: the members connect through the sentinel in the
    // background, and a round before that is cached locally on both.
    let round = AtomicUsize::new(0);
    until(
        Duration::from_secs(10),
        "a shared hit through the sentinel",
        || async {
            let client = format!("before-{}", round.fetch_add(1, Ordering::Relaxed));
            authorize(one, &client).await;
            authorize(two, &client).await;
            lookups(two, "hit").await >= 1.0
        },
    )
    .await;
    assert!(!setup.master.keys("iamproxy:decision:*").await.is_empty());

    // The master goes away; the sentinel promotes the replica.
    let old = setup.master.port;
    setup.master.kill();
    let round = AtomicUsize::new(0);
    until(
        Duration::from_secs(30),
        "the sentinel promoted the replica",
        || async {
            // Requests keep being served meanwhile.
            let client = format!("during-{}", round.fetch_add(1, Ordering::Relaxed));
            assert_eq!(authorize(one, &client).await, "iam");
            setup.master_port().await != old
        },
    )
    .await;
    assert_eq!(setup.master_port().await, setup.replica.port);

    // The members follow: a client one fetches is a hit on the other, written to the new
    // master.
    let round = AtomicUsize::new(0);
    until(
        Duration::from_secs(20),
        "the fleet on the new master",
        || async {
            let client = format!("after-{}", round.fetch_add(1, Ordering::Relaxed));
            let hits = lookups(two, "hit").await;
            authorize(one, &client).await;
            authorize(two, &client).await;
            lookups(two, "hit").await > hits
        },
    )
    .await;
    let last = format!(
        "iamproxy:decision:0:after-{}",
        round.load(Ordering::Relaxed) - 1
    );
    let keys = setup.replica.keys("iamproxy:decision:*").await;
    assert!(keys.contains(&last), "{last} not in {keys:?}");
    fleet.stop().await;
}
