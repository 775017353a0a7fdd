//! Failing open to Rails: every kind of IAM failure replays the byte-identical request to
//! Rails within `iam.timeout`, other IAM statuses reach the client, and the circuit breaker
//! opens, probes and closes.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use support::{gateway, refused_addr, send, Answer, Recorded, Reply, TestClient, TestGateway};

/// Longest any single request in this file may take before the test fails.
const BOUND: Duration = Duration::from_secs(5);

/// A gateway with a short IAM timeout and a breaker that stays out of the way (the breaker
/// tests configure their own).
async fn iam_gateway(iam_url: Option<String>) -> TestGateway {
    let builder = gateway()
        .set("iam", "timeout = \"300ms\"")
        .set("iam.circuit_breaker", "consecutive_failures = 100");
    match iam_url {
        Some(url) => builder.iam_url(url),
        None => builder,
    }
    .start()
    .await
}

/// The request every replay test sends: a token request with a query string, a form body
/// that needs percent-decoding, Basic credentials agreeing with it, and custom, repeated
/// headers. It carries no code or token, so the pre-authorize answer decides where it goes.
fn token_request(gw: &TestGateway) -> Request<Full<Bytes>> {
    let body = concat!(
        "grant_type=client_credentials&client_id=app-1",
        "&audience=c0de%2F%2B%3D&code_verifier=dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
        "&redirect_uri=https%3A%2F%2Fclient.example%2Fcb%3Fa%3D1%26b%3D%C3%A9",
        "&scope=read_user+api&note=%E2%9C%93+multi+%0D%0Aline"
    );
    Request::post(gw.url("/oauth/token?state=xyz&trace=on"))
        .header("host", "gitlab.example.com")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", "Basic YXBwLTE6c2VjcmV0")
        .header("accept", "application/json")
        .header("user-agent", "fallback-test/1.0")
        .header("cookie", "_gitlab_session=abc; other=1")
        .header("x-custom", "first")
        .header("x-custom", "second")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Routes the next requests' client to `destination`, uncached, so one test can send the
/// same request both ways.
fn route_uncached(gw: &TestGateway, destination: &str) {
    gw.preauth
        .always(Reply::destination(destination).with_header("cache-control", "no-store"));
}

/// Asserts the client got Rails' answer, not IAM's failure.
fn assert_served_by_rails(answer: &Answer) {
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.served_by(), "rails");
}

/// Sends the token request once straight to Rails (the reference), then IAM-bound, and
/// asserts the IAM-bound one was replayed to Rails exactly as the direct one arrived.
/// Returns how long the IAM-bound request took.
async fn assert_replayed_like_a_direct_request(gw: &TestGateway) -> Duration {
    route_uncached(gw, "rails");
    let iam_before = gw.iam.count();
    assert_served_by_rails(&send(token_request(gw)).await);
    assert_eq!(
        gw.iam.count(),
        iam_before,
        "the reference went to Rails only"
    );
    let reference = gw.rails.last();

    route_uncached(gw, "iam");
    let rails_before = gw.rails.count();
    let started = Instant::now();
    let answer = send(token_request(gw)).await;
    let elapsed = started.elapsed();
    assert_served_by_rails(&answer);
    assert_eq!(gw.rails.count(), rails_before + 1, "exactly one replay");
    let replay = gw.rails.last();
    assert_eq!(
        replay.headers["x-request-id"], answer.headers["x-request-id"],
        "the replay carries the client's correlation id"
    );
    assert_same_request(&reference, &replay);
    elapsed
}

/// Method, path and query, headers and body are equal; only the per-request correlation
/// id may differ.
fn assert_same_request(reference: &Recorded, replay: &Recorded) {
    let without_id = |recorded: &Recorded| {
        let mut headers = recorded.headers.clone();
        headers.remove("x-request-id");
        headers
    };
    assert_eq!(replay.method, reference.method);
    assert_eq!(replay.uri, reference.uri);
    assert_eq!(without_id(replay), without_id(reference));
    assert_eq!(replay.body, reference.body);
}

#[tokio::test]
async fn refused_iam_connection_replays_the_same_request_to_rails() {
    let gw = iam_gateway(Some(format!("http://{}", refused_addr().await))).await;
    assert_replayed_like_a_direct_request(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn iam_dropping_the_connection_replays_the_same_request_to_rails() {
    let gw = iam_gateway(None).await;
    gw.iam.always(Reply::Drop);
    assert_replayed_like_a_direct_request(&gw).await;
    assert_eq!(gw.iam.count(), 1, "IAM was tried once");
    gw.stop().await;
}

#[tokio::test]
async fn iam_hanging_past_its_timeout_replays_the_same_request_to_rails() {
    let gw = iam_gateway(None).await;
    gw.iam.always(Reply::Hang);
    assert_replayed_like_a_direct_request(&gw).await;
    assert_eq!(gw.iam.count(), 1, "IAM was tried once");
    gw.stop().await;
}

#[tokio::test]
async fn each_fallback_status_from_iam_replays_the_same_request_to_rails() {
    let gw = iam_gateway(None).await;
    for status in [500, 502, 503, 504] {
        gw.iam.always(Reply::text(status, "iam is unwell"));
        assert_replayed_like_a_direct_request(&gw).await;
    }
    assert_eq!(gw.iam.count(), 4, "IAM was tried once per status");
    gw.stop().await;
}

#[tokio::test]
async fn hanging_iam_costs_the_client_no_more_than_iam_timeout() {
    let gw = iam_gateway(None).await;
    gw.iam.always(Reply::Hang);
    let elapsed = assert_replayed_like_a_direct_request(&gw).await;
    assert!(
        elapsed >= Duration::from_millis(300),
        "waited for iam.timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "answered well under 2 s: {elapsed:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn non_fallback_iam_statuses_reach_the_client_without_replay() {
    let gw = iam_gateway(None).await;
    gw.preauth.always(Reply::destination("iam"));
    for status in [400, 401, 404] {
        gw.iam.always(Reply::text(status, "iam says no"));
        let answer = send(token_request(&gw)).await;
        assert_eq!(answer.status, status);
        assert_eq!(answer.text(), "iam says no");
    }
    assert_eq!(gw.iam.count(), 3);
    assert_eq!(gw.rails.count(), 0, "nothing was replayed");
    gw.stop().await;
}

/// A gateway whose breaker opens after 3 failures for 1 s, with IAM answering 503 and the
/// client routed (and cached) to IAM. `iam.timeout` keeps its default (10 s), well above
/// the slow probe below.
async fn breaker_gateway() -> TestGateway {
    let gw = gateway()
        .set("iam.circuit_breaker", "consecutive_failures = 3")
        .set("iam.circuit_breaker", "open_for = \"1s\"")
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw.iam.always(Reply::status(503));
    gw
}

/// Fails 3 IAM requests (each served by Rails), which opens the breaker.
async fn open_breaker(gw: &TestGateway) {
    for _ in 0..3 {
        assert_served_by_rails(&send(token_request(gw)).await);
    }
    assert_eq!(gw.iam.count(), 3);
    assert_eq!(gw.rails.count(), 3);
}

/// The breaker's `open_for` runs on the gateway's clock, which is real time here: there is
/// no event to await, so wait it out (1 s plus a margin).
async fn wait_out_open_for() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test]
async fn open_breaker_sends_iam_bound_requests_to_rails_without_trying_iam() {
    let gw = breaker_gateway().await;
    open_breaker(&gw).await;
    for _ in 0..5 {
        assert_served_by_rails(&send(token_request(&gw)).await);
    }
    assert_eq!(gw.iam.count(), 3, "IAM received nothing while open");
    assert_eq!(gw.rails.count(), 8);
    gw.stop().await;
}

#[tokio::test]
async fn after_open_for_one_probe_goes_to_iam_and_its_success_closes_the_breaker() {
    let gw = breaker_gateway().await;
    open_breaker(&gw).await;
    wait_out_open_for().await;
    // IAM has recovered but answers slowly, so the probe is still in flight while the
    // other two requests arrive: they must not reach IAM.
    gw.iam
        .respond(|_| Reply::text(200, r#"{"served_by":"iam"}"#).after(Duration::from_millis(500)));
    let client = TestClient::new();
    let concurrent: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            let request = token_request(&gw);
            tokio::spawn(async move { tokio::time::timeout(BOUND, client.send(request)).await })
        })
        .collect();
    let mut served_by = Vec::new();
    for task in concurrent {
        served_by.push(task.await.unwrap().expect("answered in time").served_by());
    }
    served_by.sort();
    assert_eq!(served_by, ["iam", "rails", "rails"], "exactly one probe");
    assert_eq!(gw.iam.count(), 4);

    gw.iam.always(Reply::text(200, r#"{"served_by":"iam"}"#));
    for _ in 0..3 {
        assert_eq!(send(token_request(&gw)).await.served_by(), "iam");
    }
    assert_eq!(gw.iam.count(), 7, "closed: every request goes to IAM again");
    assert_eq!(gw.rails.count(), 5);
    gw.stop().await;
}

#[tokio::test]
async fn a_failed_probe_reopens_the_breaker() {
    let gw = breaker_gateway().await;
    open_breaker(&gw).await;
    wait_out_open_for().await;
    assert_served_by_rails(&send(token_request(&gw)).await);
    assert_eq!(gw.iam.count(), 4, "the probe went to IAM");
    for _ in 0..3 {
        assert_served_by_rails(&send(token_request(&gw)).await);
    }
    assert_eq!(gw.iam.count(), 4, "reopened: IAM received nothing more");
    assert_eq!(gw.rails.count(), 7);
    gw.stop().await;
}
