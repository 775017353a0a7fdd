//! Upstream connections on real sockets: each upstream's `max_connections` caps what the
//! gateway opens, a request past it waits for a free one within the connect timeout and
//! then fails as documented (Rails: 503 with `Retry-After`; IAM: replay to Rails), and a
//! client that resets its HTTP/2 streams does not cost a new Rails connection each time, and
//! a connect a request did not need in the end is kept.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use support::metrics::scrape;
use support::tls::{Ca, TlsFront};
use support::{gateway, send, GatewayFakes, Reply, TestClient};

/// How long the fake upstreams below keep a request.
const HELD: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn past_rails_max_connections_a_request_gets_503_with_retry_after_and_nothing_more_is_opened()
{
    let gw = gateway()
        .set("rails", "max_connections = 2\nconnect_timeout = \"300ms\"")
        .start()
        .await;
    gw.rails.always(Reply::text(200, "slow").after(HELD));
    let client = TestClient::new();
    let held: Vec<_> = (0..2)
        .map(|i| {
            let (client, url) = (client.clone(), gw.url(&format!("/api/v4/held/{i}")));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    // Both are with Rails once it has accepted two connections.
    let waited = Instant::now();
    while gw.rails.count() < 2 && waited.elapsed() < HELD {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let refused = client.get(&gw.url("/api/v4/third")).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.headers["retry-after"], "1");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "waited {waited:?}");
    for request in held {
        assert_eq!(request.await.unwrap().status, 200);
    }
    assert_eq!(gw.rails.connections(), 2, "no third connection to Rails");
    let metrics = scrape(gw.admin).await;
    assert_eq!(
        metrics.value(
            "iamproxy_upstream_saturated_total",
            &[("upstream", "rails")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_request_past_max_connections_takes_the_connection_freed_within_the_connect_timeout() {
    let gw = gateway()
        .set("rails", "max_connections = 1\nconnect_timeout = \"5s\"")
        .start()
        .await;
    gw.rails
        .always(Reply::text(200, "ok").after(Duration::from_millis(200)));
    let client = TestClient::new();
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let (client, url) = (client.clone(), gw.url(&format!("/api/v4/queued/{i}")));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().status, 200);
    }
    assert_eq!(gw.rails.connections(), 1, "all four shared one connection");
}

#[tokio::test]
async fn past_iam_max_connections_an_iam_bound_request_is_replayed_to_rails_without_tripping_the_breaker(
) {
    let gw = gateway()
        .set(
            "iam",
            "max_connections = 1\nconnect_timeout = \"200ms\"\ntimeout = \"5s\"",
        )
        .set("iam.circuit_breaker", "consecutive_failures = 1")
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw.iam.always(Reply::text(200, "iam").after(HELD));
    let url = gw.url("/oauth/token");
    let form = "grant_type=client_credentials&client_id=app-1";
    let first = {
        let url = url.clone();
        tokio::spawn(async move { TestClient::new().post_form(&url, form).await })
    };
    let waited = Instant::now();
    while gw.iam.count() < 1 && waited.elapsed() < HELD {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = TestClient::new().post_form(&url, form).await;
    assert_eq!(second.served_by(), "rails");
    assert_eq!(first.await.unwrap().text(), "iam");
    let metrics = scrape(gw.admin).await;
    assert_eq!(
        metrics.value("iamproxy_fallbacks_total", &[("reason", "saturated")]),
        1.0
    );
    assert_eq!(
        metrics.value("iamproxy_iam_breaker_opens_total", &[]),
        0.0,
        "the gateway's own limit is not an IAM failure"
    );
    // With the breaker closed, the next request goes to IAM again.
    gw.iam.always(Reply::text(200, "iam"));
    assert_eq!(TestClient::new().post_form(&url, form).await.text(), "iam");
}

#[tokio::test]
async fn http2_streams_reset_before_rails_answers_do_not_cost_a_connection_each() {
    let gw = gateway().start().await;
    gw.rails
        .always(Reply::text(200, "late").after(Duration::from_millis(100)));
    let client: Client<HttpConnector, Full<Bytes>> = support::h2c_client();
    const RESETS: usize = 40;
    for i in 0..RESETS {
        let request = Request::get(gw.url(&format!("/api/v4/reset/{i}")))
            .body(Full::default())
            .unwrap();
        // Dropping the response future resets the stream.
        let reset = tokio::time::timeout(Duration::from_millis(20), client.request(request)).await;
        assert!(reset.is_err(), "stream {i} answered before its reset");
        // Rails answers the abandoned request; its connection goes back to the pool.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let answer = send(
        Request::get(gw.url("/api/v4/after"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(gw.rails.count(), RESETS + 1);
    assert!(
        gw.rails.connections() <= 2,
        "{} Rails connections for {RESETS} resets",
        gw.rails.connections()
    );
}

/// A request that finds no idle connection opens one, and takes a connection returned
/// meanwhile if that comes first; the connect it started still joins the pool. Abandoned,
/// a pool one connection short of its load stays short, and requests open connections
/// only to close them.
#[tokio::test]
async fn a_connect_that_loses_to_a_returned_connection_joins_the_pool() {
    const HANDSHAKE: Duration = Duration::from_millis(1000);
    const SLOW: Duration = Duration::from_millis(300);
    let ca = Ca::new("upstream CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let fakes = GatewayFakes::start().await;
    fakes.rails.respond(|request| {
        let reply = Reply::text(200, "rails");
        if request.uri.starts_with("/slow") {
            reply.after(SLOW)
        } else {
            reply
        }
    });
    // Every connect to Rails takes a second: longer than a slow request.
    let front = TlsFront::start_slow(&leaf, fakes.rails.addr, HANDSHAKE).await;
    let gw = gateway()
        .set(
            "rails",
            &format!(
                "url = \"{}\"\nca_file = \"{}\"",
                front.url(),
                ca.file.toml()
            ),
        )
        .start_with(fakes)
        .await;
    let client = TestClient::new();
    assert_eq!(client.get(&gw.url("/warm")).await.status, 200);
    assert_eq!(gw.rails.connections(), 1);

    // The slow request holds the one connection; the next finds none idle, starts a
    // connect, and is served on the slow one's connection when it comes back.
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), gw.url("/slow/a"));
        async move { client.get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert_eq!(client.get(&gw.url("/next")).await.status, 200);
    let waited = started.elapsed();
    assert!(
        waited < HANDSHAKE - Duration::from_millis(100),
        "waited {waited:?}"
    );
    assert_eq!(slow.await.unwrap().status, 200);

    // Its connect finishes anyway, and the connection is kept.
    let deadline = Instant::now() + 3 * HANDSHAKE;
    while gw.rails.connections() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        gw.rails.connections(),
        2,
        "the connect nobody needed was kept"
    );
    assert!(
        front.refused().is_empty(),
        "abandoned handshakes: {:?}",
        front.refused()
    );

    // So two overlapping requests find two idle connections and open none.
    let (b, c) = (gw.url("/slow/b"), gw.url("/slow/c"));
    let started = Instant::now();
    let (a, b) = tokio::join!(client.get(&b), client.get(&c));
    assert_eq!([a.status, b.status], [200, 200]);
    let waited = started.elapsed();
    assert!(
        waited < HANDSHAKE - Duration::from_millis(100),
        "waited {waited:?}"
    );
    assert_eq!(gw.rails.connections(), 2);
}
