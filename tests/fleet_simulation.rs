//! The fleet simulation: N gateway processes (the real binary) on loopback sharing one
//! `redis-server` and one counting pre-authorize backend, requests for many client ids
//! spread at random over the gateways for a few cache lifetimes. With `shared_cache` the
//! backend is asked about once per id per lifetime whatever N; without, once per id per
//! gateway that saw it. Redis stopped mid-run and started again costs no request: the
//! calls rise while it is down and fall back after.
//!
//! This test runs a short version (3 gateways, 50 ids, 2 s lifetimes); `benches/fleet/run.sh`
//! runs the full one (1, 4 and 16 gateways, 500 ids, 5 s lifetimes, a release build)
//! through the same code, with these variables:
//! `FLEET_SIZES` ("3"), `FLEET_IDS` (50), `FLEET_TTL_SECS` (2), `FLEET_RATE` (requests a
//! second over the fleet, 300), `FLEET_PREAUTH_MS` (the backend's answer time, 10),
//! `FLEET_REDIS_TIMEOUT` ("200ms": a debug build on a busy machine; the bench uses the
//! default 50ms). The two tests take turns: each is a fleet of processes loading the CPUs.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use support::process::{free_addr, Iamproxy, TempFile};
use support::redis::RedisServer;
use support::{FakeUpstream, Reply, SecretFile};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Held by each test for its whole run.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a run is made of.
#[derive(Clone, Debug)]
struct Plan {
    ids: usize,
    ttl: Duration,
    /// Requests a second over the whole fleet.
    rate: u64,
    preauth_delay: Duration,
    redis_timeout: String,
}

impl Plan {
    fn from_env() -> Plan {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Plan {
            ids: var("FLEET_IDS", 50) as usize,
            ttl: Duration::from_secs(var("FLEET_TTL_SECS", 2)),
            rate: var("FLEET_RATE", 300),
            preauth_delay: Duration::from_millis(var("FLEET_PREAUTH_MS", 10)),
            redis_timeout: std::env::var("FLEET_REDIS_TIMEOUT").unwrap_or_else(|_| "200ms".into()),
        }
    }

    fn sizes() -> Vec<usize> {
        std::env::var("FLEET_SIZES")
            .unwrap_or_else(|_| "3".into())
            .split_whitespace()
            .map(|n| n.parse().expect("FLEET_SIZES: numbers"))
            .collect()
    }
}

/// The fakes every gateway talks to, and the one Redis.
struct World {
    rails: FakeUpstream,
    iam: FakeUpstream,
    preauth: FakeUpstream,
    secret: SecretFile,
    redis: RedisServer,
}

impl World {
    async fn start(plan: &Plan) -> World {
        let (rails, iam, preauth) = (
            FakeUpstream::start("rails").await,
            FakeUpstream::start("iam").await,
            FakeUpstream::start("preauthorize").await,
        );
        for fake in [&rails, &iam, &preauth] {
            fake.count_only();
        }
        preauth.always(Reply::destination("iam").after(plan.preauth_delay));
        World {
            rails,
            iam,
            preauth,
            secret: SecretFile::new(),
            redis: RedisServer::start(free_addr().port()).await,
        }
    }
}

/// One gateway process.
struct Member {
    addr: SocketAddr,
    admin: SocketAddr,
    process: Iamproxy,
    _config: TempFile,
}

async fn start_member(world: &World, plan: &Plan, shared: bool) -> Member {
    let (addr, admin) = (free_addr(), free_addr());
    let config = format!(
        "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n\
         [rails]\nurl = \"{rails}\"\n[iam]\nurl = \"{iam}\"\n\
         [preauthorize]\nurl = \"{preauth}/-/oauth/iam_routing\"\nsecret_file = \"{secret}\"\n\
         [cache]\nttl = \"{ttl}s\"\n\
         [redis]\nurl = \"{redis}\"\nshared_cache = {shared}\ntimeout = \"{timeout}\"\n\
         [log]\nlevel = \"error\"\n",
        rails = world.rails.url(),
        iam = world.iam.url(),
        preauth = world.preauth.url(),
        secret = world.secret.path().display(),
        ttl = plan.ttl.as_secs(),
        redis = world.redis.url(),
        timeout = plan.redis_timeout,
    );
    let config = TempFile::new(&config);
    let process = Iamproxy::start(&["--config", config.path()]);
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.exited() {
            panic!("iamproxy exited with {status}: {}", process.stderr());
        }
        let ready = get(&client, admin, "/-/readiness").await;
        if ready == Some(StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "iamproxy never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Member {
        addr,
        admin,
        process,
        _config: config,
    }
}

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The status, or `None` when the request failed or took over 10 s.
async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Option<StatusCode> {
    let request = hyper::Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .ok()?;
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let status = response.status();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}

/// What the clients saw, and the backend's call count sampled over time.
#[derive(Default)]
struct Tally {
    requests: AtomicUsize,
    failures: AtomicUsize,
    /// (seconds since the start, calls so far), every 100 ms.
    calls: Mutex<Vec<(f64, usize)>>,
}

impl Tally {
    /// Backend calls between `from` and `to` seconds into the run.
    fn calls_between(&self, from: f64, to: f64) -> usize {
        let samples = self.calls.lock().unwrap();
        let at = |t: f64| {
            samples
                .iter()
                .take_while(|(when, _)| *when <= t)
                .last()
                .map_or(0, |(_, calls)| *calls)
        };
        at(to) - at(from)
    }
}

/// A small xorshift: the load needs spread, not quality.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Random {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(seed);
        Random(hasher.finish() | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Requests at `plan.rate` a second, each for a random id at a random member, for
/// `length`; `outage` (from, to) seconds: Redis killed, then started again.
async fn run(
    world: &mut World,
    members: &[Member],
    plan: &Plan,
    length: Duration,
    outage: Option<(f64, f64)>,
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let calls_at_start = world.preauth.count();
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(members.iter().map(|m| m.addr).collect());
    const WORKERS: u64 = 32;
    let sent = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let (tally, addrs, sent, ids, rate) = (
            tally.clone(),
            addrs.clone(),
            sent.clone(),
            plan.ids,
            plan.rate,
        );
        workers.spawn(async move {
            let client = http_client();
            let mut random = Random::new(worker);
            loop {
                // Paced over the fleet: request n leaves at n / rate seconds.
                let n = sent.fetch_add(1, Ordering::Relaxed);
                let at = started + Duration::from_secs_f64(n as f64 / rate as f64);
                if at >= started + length {
                    return;
                }
                tokio::time::sleep_until(at.into()).await;
                let addr = addrs[random.below(addrs.len())];
                let id = random.below(ids);
                let path = format!("/oauth/authorize?client_id=app-{id}");
                tally.requests.fetch_add(1, Ordering::Relaxed);
                if get(&client, addr, &path).await != Some(StatusCode::OK) {
                    tally.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let sampler = {
        let (tally, preauth) = (tally.clone(), world.preauth.clone());
        tokio::spawn(async move {
            loop {
                let calls = preauth.count() - calls_at_start;
                tally
                    .calls
                    .lock()
                    .unwrap()
                    .push((started.elapsed().as_secs_f64(), calls));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    if let Some((down, up)) = outage {
        tokio::time::sleep_until((started + Duration::from_secs_f64(down)).into()).await;
        world.redis.kill();
        tokio::time::sleep_until((started + Duration::from_secs_f64(up)).into()).await;
        world.redis.restart().await;
    }
    workers.join_all().await;
    // The last sample, after every request.
    tokio::time::sleep(Duration::from_millis(150)).await;
    sampler.abort();
    tally
}

/// One row of the table: N members, with or without the shared cache, `lifetimes` cache
/// lifetimes of traffic.
async fn measure(world: &mut World, plan: &Plan, size: usize, shared: bool) -> (f64, usize, usize) {
    let mut members = Vec::new();
    for _ in 0..size {
        members.push(start_member(world, plan, shared).await);
    }
    let lifetimes = 2;
    let tally = run(world, &members, plan, plan.ttl * lifetimes, None).await;
    let calls = tally.calls_between(0.0, f64::MAX);
    let per_lifetime = calls as f64 / f64::from(lifetimes);
    let (requests, failures) = (
        tally.requests.load(Ordering::Relaxed),
        tally.failures.load(Ordering::Relaxed),
    );
    let outcomes = shared_outcomes(&members).await;
    println!(
        "fleet: N={size:<3} shared_cache={shared:<5} ids={} ttl={}s requests={requests} failed={failures} pre-authorize calls={calls} per lifetime={per_lifetime:.0} ({:.2} x ids) redis lookups {outcomes}",
        plan.ids,
        plan.ttl.as_secs(),
        per_lifetime / plan.ids as f64
    );
    stop(members);
    // A fresh cache for the next row: nothing of this one's survives in Redis.
    let _: () = world.redis.cmd(&["FLUSHALL"]).await;
    (per_lifetime, requests, failures)
}

/// The members' shared cache lookups by outcome, summed.
async fn shared_outcomes(members: &[Member]) -> String {
    let mut text = String::new();
    for outcome in ["hit", "miss", "error", "timeout"] {
        let mut sum = 0.0;
        for member in members {
            sum += support::metrics::scrape(member.admin).await.value(
                "iamproxy_shared_cache_lookups_total",
                &[("outcome", outcome)],
            );
        }
        text.push_str(&format!("{outcome}={sum} "));
    }
    text
}

fn stop(members: Vec<Member>) {
    for member in members {
        member.process.sigterm();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_cache_keeps_preauthorize_calls_per_fleet_not_per_gateway() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let plan = Plan::from_env();
    let mut world = World::start(&plan).await;
    for size in Plan::sizes() {
        let (shared, _, failed) = measure(&mut world, &plan, size, true).await;
        assert_eq!(failed, 0, "N={size}: every request answered");
        assert!(
            shared <= plan.ids as f64 * 1.05,
            "N={size}: {shared} calls per lifetime for {} ids",
            plan.ids
        );
        let (alone, _, failed) = measure(&mut world, &plan, size, false).await;
        assert_eq!(failed, 0);
        if size > 1 {
            assert!(
                alone > shared * 1.5,
                "N={size}: without {alone}, with {shared}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_started_mid_run_fails_no_request() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let plan = Plan::from_env();
    let mut world = World::start(&plan).await;
    let size = *Plan::sizes().last().unwrap();
    let mut members = Vec::new();
    for _ in 0..size {
        members.push(start_member(&world, &plan, true).await);
    }
    // One lifetime healthy, one with Redis down, two after it is back (empty: it keeps
    // nothing on disk).
    let ttl = plan.ttl.as_secs_f64();
    let tally = run(
        &mut world,
        &members,
        &plan,
        plan.ttl * 4,
        Some((ttl, 2.0 * ttl)),
    )
    .await;
    let (requests, failures) = (
        tally.requests.load(Ordering::Relaxed),
        tally.failures.load(Ordering::Relaxed),
    );
    let rate = |from: f64, to: f64| tally.calls_between(from, to) as f64 / (to - from);
    // After: the first lifetime refills the empty Redis, the second is back to normal.
    let (before, down, refill, after) = (
        rate(0.0, ttl),
        rate(ttl, 2.0 * ttl),
        rate(2.0 * ttl, 3.0 * ttl),
        rate(3.0 * ttl, 4.0 * ttl),
    );
    println!(
        "fleet: N={size} ids={} ttl={ttl}s, redis stopped at {ttl}s and started at {}s: requests={requests} failed={failures}; pre-authorize calls/s: before={before:.1} down={down:.1} refill={refill:.1} after={after:.1}",
        plan.ids,
        2.0 * ttl
    );
    stop(members);
    assert_eq!(failures, 0, "of {requests}");
    assert!(
        down > before * 1.3,
        "calls rise while Redis is down: {down} vs {before}"
    );
    assert!(down > after * 1.3, "and fall back after: {down} vs {after}");
}
