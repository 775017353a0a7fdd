//! Fleet-wide invalidation through a real `redis-server` on loopback: two gateways share a
//! channel; an invalidation on one reaches both within a second; with Redis killed every
//! client request still succeeds; once Redis is back the gateways resubscribe, drop what
//! they cached meanwhile, and invalidation works again, from the admin API or from anyone
//! who publishes (as Rails would after a flag change).

mod support;

use std::time::{Duration, Instant};

use hyper::Method;
use support::process::{free_addr, TempFile};
use support::redis::RedisServer;
use support::{gateway, Reply, TestClient, TestGateway};

const CHANNEL: &str = "iamproxy:test-decisions";
const TOKEN: &str = "fleet-test-token-0123456789";

/// Gateways subscribed to the channel.
async fn subscribers(redis: &RedisServer) -> i64 {
    let (_, count): (String, i64) = redis.cmd(&["PUBSUB", "NUMSUB", CHANNEL]).await;
    count
}

async fn wait_for_subscribers(redis: &RedisServer, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while subscribers(redis).await != n {
        assert!(Instant::now() < deadline, "{n} gateways never subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish(redis: &RedisServer, message: &str) {
    let _: i64 = redis.cmd(&["PUBLISH", CHANNEL, message]).await;
}

async fn fleet_member(redis: &RedisServer, token_file: &TempFile) -> TestGateway {
    let gw = gateway()
        .set(
            "redis",
            &format!("url = \"{}\"\nchannel = \"{CHANNEL}\"", redis.url()),
        )
        .set("admin", &format!("token_file = \"{}\"", token_file.path()))
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw
}

async fn authorize(gw: &TestGateway, client_id: &str) -> String {
    let answer = TestClient::new()
        .get(&gw.url(&format!("/oauth/authorize?client_id={client_id}")))
        .await;
    assert_eq!(answer.status, 200);
    answer.served_by()
}

async fn is_cached(gw: &TestGateway, client_id: &str) -> bool {
    let body = gw
        .admin_json(
            Method::GET,
            &format!("/-/admin/decisions/{client_id}"),
            TOKEN,
        )
        .await;
    !body["cached"].is_null()
}

/// Waits until `client_id` is cached on none of `gateways`; returns how long it took.
async fn forgotten_everywhere(gateways: &[&TestGateway], client_id: &str) -> Duration {
    let started = Instant::now();
    loop {
        let mut cached = false;
        for gw in gateways {
            cached |= is_cached(gw, client_id).await;
        }
        if !cached {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{client_id} still cached after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_every_instance_and_redis_going_away_costs_no_request() {
    let token_file = TempFile::new(&format!("{TOKEN}\n"));
    let mut redis = RedisServer::start(free_addr().port()).await;
    let one = fleet_member(&redis, &token_file).await;
    let two = fleet_member(&redis, &token_file).await;
    wait_for_subscribers(&redis, 2).await;

    // One instance's admin API invalidates the decision on both.
    for gw in [&one, &two] {
        assert_eq!(authorize(gw, "app").await, "iam");
        assert!(is_cached(gw, "app").await);
    }
    let answer = one
        .admin_json(Method::DELETE, "/-/admin/decisions/app", TOKEN)
        .await;
    assert_eq!(answer["published"], true);
    let took = forgotten_everywhere(&[&one, &two], "app").await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(authorize(&two, "app").await, "iam");
    assert_eq!(two.preauth.count(), 2, "the next request asked again");

    // Redis goes away: every client request still succeeds.
    redis.kill();
    for n in 0..40 {
        let gw = if n % 2 == 0 { &one } else { &two };
        assert_eq!(authorize(gw, &format!("app-{}", n % 5)).await, "iam");
    }
    let answer = one
        .admin_json(Method::DELETE, "/-/admin/decisions/app-1", TOKEN)
        .await;
    assert_eq!(answer["invalidated"], true, "the local cache still works");
    assert_eq!(
        answer["published"], false,
        "but the fleet could not be told"
    );
    assert!(
        is_cached(&two, "app-2").await,
        "cached while Redis was away"
    );

    // Redis is back: both resubscribe, drop what they may have missed, and listen again.
    redis.restart().await;
    wait_for_subscribers(&redis, 2).await;
    forgotten_everywhere(&[&one, &two], "app-2").await;
    for gw in [&one, &two] {
        assert_eq!(authorize(gw, "after").await, "iam");
    }
    publish(&redis, r#"{"all": true}"#).await;
    let took = forgotten_everywhere(&[&one, &two], "after").await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    one.stop().await;
    two.stop().await;
}
