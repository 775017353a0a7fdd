//! The pre-authorize backend: single flight, Cache-Control lifetimes, fail-open on every
//! kind of error without caching it, and what the signed request carries and leaves out.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use support::{
    gateway, refused_addr, Answer, GatewayBuilder, Recorded, Reply, TestClient, TestGateway,
};
use tokio::net::TcpListener;
use tokio::time::timeout;

/// Upper bound for anything that should finish quickly; a hang fails the test instead.
const BOUND: Duration = Duration::from_secs(10);
const TOKEN_BODY: &str = "grant_type=client_credentials&client_id=app";

/// POSTs a client-credentials token request for client `app`, bounded by [`BOUND`].
async fn token_request(client: &TestClient, gw: &TestGateway) -> Answer {
    timeout(BOUND, client.post_form(&gw.url("/oauth/token"), TOKEN_BODY))
        .await
        .expect("gateway answered in time")
}

/// A 200 answer with the Workhorse content type and an arbitrary body.
fn workhorse_json(body: &str) -> Reply {
    Reply::Respond {
        status: StatusCode::OK,
        headers: vec![(
            "content-type",
            "application/vnd.gitlab-workhorse+json".into(),
        )],
        body: Bytes::from(body.to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_for_one_client_make_one_preauthorize_call() {
    let gw = gateway().start().await;
    // Slow enough that all requests miss the cache while the one call is in flight.
    gw.preauth
        .always(Reply::destination("iam").after(Duration::from_millis(200)));
    let client = TestClient::new();
    let url = gw.url("/oauth/token");
    let requests: Vec<_> = (0..500)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.post_form(&url, TOKEN_BODY).await })
        })
        .collect();
    for request in requests {
        let answer = timeout(Duration::from_secs(30), request)
            .await
            .expect("every request answered in time")
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.served_by(), "iam");
    }
    assert_eq!(gw.preauth.count(), 1, "exactly one pre-authorize call");
    assert_eq!(gw.iam.count(), 500);
    assert_eq!(gw.rails.count(), 0);
    gw.stop().await;
}

/// How many pre-authorize calls two back-to-back requests make, then how many in total
/// after a third request ~1.5 s later. The cache runs on wall-clock time, so this sleeps.
async fn calls_before_and_after_expiry(builder: GatewayBuilder, reply: Reply) -> (usize, usize) {
    let gw = builder.start().await;
    gw.preauth.always(reply);
    let client = TestClient::new();
    for _ in 0..2 {
        assert_eq!(token_request(&client, &gw).await.served_by(), "iam");
    }
    let back_to_back = gw.preauth.count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(token_request(&client, &gw).await.served_by(), "iam");
    let after = gw.preauth.count();
    gw.stop().await;
    (back_to_back, after)
}

#[tokio::test]
async fn max_age_keeps_the_answer_for_that_long_then_asks_again() {
    let reply = Reply::destination("iam").with_header("cache-control", "max-age=1");
    assert_eq!(
        calls_before_and_after_expiry(gateway(), reply).await,
        (1, 2)
    );
}

#[tokio::test]
async fn no_store_answers_are_asked_for_every_request() {
    let reply = Reply::destination("iam").with_header("cache-control", "no-store");
    assert_eq!(
        calls_before_and_after_expiry(gateway(), reply).await,
        (2, 3)
    );
}

#[tokio::test]
async fn without_cache_control_the_answer_expires_after_cache_ttl() {
    let ttl_1s = gateway().set("cache", "ttl = \"1s\"");
    let reply = Reply::destination("iam");
    assert_eq!(calls_before_and_after_expiry(ttl_1s, reply).await, (1, 2));
}

#[tokio::test]
async fn max_age_longer_than_cache_ttl_is_capped_by_it() {
    let ttl_1s = gateway().set("cache", "ttl = \"1s\"");
    let reply = Reply::destination("iam").with_header("cache-control", "max-age=3600");
    assert_eq!(calls_before_and_after_expiry(ttl_1s, reply).await, (1, 2));
}

/// A pre-authorize backend that fails in one way.
#[derive(Clone, Copy)]
enum Failure {
    /// The fake answers like this; built once the gateway (and its IAM fake) runs.
    Answers(fn(&TestGateway) -> Reply),
    /// The fake never answers; `preauthorize.timeout` is short.
    Hangs,
    /// Nothing listens at `preauthorize.url`.
    Refuses,
}

#[tokio::test]
async fn preauthorize_errors_fail_open_to_rails_and_are_not_cached() {
    let cases: [(&str, Failure); 7] = [
        (
            "status 500",
            Failure::Answers(|_| {
                Reply::status(500)
                    .with_header("content-type", "application/vnd.gitlab-workhorse+json")
            }),
        ),
        (
            "redirect to IAM",
            Failure::Answers(|gw| {
                Reply::status(302).with_header("location", &format!("{}/oauth/token", gw.iam.url()))
            }),
        ),
        (
            "text/html",
            Failure::Answers(|_| Reply::Respond {
                status: StatusCode::OK,
                headers: vec![("content-type", "text/html".into())],
                body: Bytes::from_static(br#"{"destination":"iam"}"#),
            }),
        ),
        (
            "bad JSON",
            Failure::Answers(|_| workhorse_json(r#"{"destination":"iam""#)),
        ),
        (
            "unknown destination",
            Failure::Answers(|_| Reply::destination("elsewhere")),
        ),
        ("timeout", Failure::Hangs),
        ("connection refused", Failure::Refuses),
    ];
    for (case, failure) in cases {
        // Only used by the `Refuses` case.
        let refused = refused_addr().await;
        let builder = gateway().set("preauthorize", "timeout = \"200ms\"");
        let builder = match failure {
            Failure::Refuses => builder.set(
                "preauthorize",
                &format!("url = \"http://{refused}/-/oauth/iam_routing\""),
            ),
            _ => builder,
        };
        let gw = builder.start().await;
        match failure {
            Failure::Answers(reply) => gw.preauth.always(reply(&gw)),
            Failure::Hangs => gw.preauth.always(Reply::Hang),
            Failure::Refuses => {}
        }
        let client = TestClient::new();

        let started = Instant::now();
        let answer = token_request(&client, &gw).await;
        let took = started.elapsed();
        assert_eq!(answer.status, StatusCode::OK, "{case}");
        assert_eq!(answer.served_by(), "rails", "{case}");
        assert!(took < Duration::from_secs(2), "{case}: took {took:?}");
        assert_eq!((gw.rails.count(), gw.iam.count()), (1, 0), "{case}");

        // Not cached: the next request asks the backend again.
        match failure {
            Failure::Refuses => {
                // Something listens there now; the gateway connecting to it is the new call.
                let listener = TcpListener::bind(refused).await.unwrap();
                let (asked, answer) = tokio::join!(
                    timeout(BOUND, listener.accept()),
                    token_request(&client, &gw)
                );
                assert!(
                    asked.is_ok_and(|accepted| accepted.is_ok()),
                    "{case}: asked again"
                );
                assert_eq!(answer.served_by(), "rails", "{case}");
            }
            _ => {
                assert_eq!(gw.preauth.count(), 1, "{case}");
                assert_eq!(
                    token_request(&client, &gw).await.served_by(),
                    "rails",
                    "{case}"
                );
                assert_eq!(gw.preauth.count(), 2, "{case}: asked again");
            }
        }
        assert_eq!(gw.iam.count(), 0, "{case}: never IAM");
        gw.stop().await;
    }
}

/// The pre-authorize fake answers `iam` with `cache_control`, is asked once, then fails
/// with a 503 from then on.
async fn answered_once_then_down(builder: GatewayBuilder, cache_control: &str) -> TestGateway {
    let gw = builder.set("cache", "ttl = \"1s\"").start().await;
    gw.preauth
        .always(Reply::destination("iam").with_header("cache-control", cache_control));
    let answer = token_request(&TestClient::new(), &gw).await;
    assert_eq!(answer.served_by(), "iam");
    gw.preauth.always(Reply::status(503));
    gw
}

async fn decisions(gw: &TestGateway, destination: &str, reason: &str) -> f64 {
    support::metrics::scrape(gw.admin).await.value(
        "iamproxy_routing_decisions_total",
        &[("destination", destination), ("reason", reason)],
    )
}

#[tokio::test]
async fn an_outage_serves_the_last_good_decision_within_its_stale_window_then_rails() {
    // Fresh for 1 s (cache.ttl), then served stale for 2 s more while the backend fails.
    let stored = Instant::now();
    let gw = answered_once_then_down(gateway(), "stale-if-error=2").await;
    let client = TestClient::new();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for asked in [2, 3] {
        let answer = token_request(&client, &gw).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.served_by(), "iam", "the last good decision");
        assert_eq!(gw.preauth.count(), asked, "each request asks again");
    }
    assert_eq!(decisions(&gw, "iam", "stale").await, 2.0);
    assert_eq!(decisions(&gw, "rails", "preauthorize_error").await, 0.0);

    tokio::time::sleep(
        (stored + Duration::from_millis(3300)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert_eq!(
        token_request(&client, &gw).await.served_by(),
        "rails",
        "window over"
    );
    assert_eq!(decisions(&gw, "rails", "preauthorize_error").await, 1.0);

    // The backend recovers: its answer is fresh again, and kept.
    gw.preauth.always(Reply::destination("iam"));
    assert_eq!(token_request(&client, &gw).await.served_by(), "iam");
    assert_eq!(token_request(&client, &gw).await.served_by(), "iam");
    assert_eq!(gw.preauth.count(), 5);
    assert_eq!(decisions(&gw, "iam", "cache").await, 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn the_stale_window_is_capped_by_cache_stale_if_error_and_0s_turns_it_off() {
    for (config, served_at_1_5s) in [("1s", "iam"), ("0s", "rails")] {
        let builder = gateway().set("cache", &format!("stale_if_error = \"{config}\""));
        let stored = Instant::now();
        let gw = answered_once_then_down(builder, "max-age=60, stale-if-error=3600").await;
        let client = TestClient::new();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let answer = token_request(&client, &gw).await;
        assert_eq!(
            answer.served_by(),
            served_at_1_5s,
            "stale_if_error = {config}"
        );
        if config == "1s" {
            tokio::time::sleep(
                (stored + Duration::from_millis(2300)).saturating_duration_since(Instant::now()),
            )
            .await;
            let answer = token_request(&client, &gw).await;
            assert_eq!(
                answer.served_by(),
                "rails",
                "capped at 1 s past the lifetime"
            );
        }
        gw.stop().await;
    }
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    iss: String,
    iat: u64,
}

/// Verifies a `Gitlab-Workhorse-Api-Request` JWT as Rails does.
fn verify(jwt: &str, secret: &[u8]) -> Result<Claims, jsonwebtoken::errors::Error> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["iss"]);
    validation.set_issuer(&["gitlab-workhorse"]);
    jsonwebtoken::decode::<Claims>(jwt, &DecodingKey::from_secret(secret), &validation)
        .map(|data| data.claims)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn preauthorize_request_is_a_signed_empty_post_for_the_client_id() {
    let gw = gateway().start().await;
    let answer = TestClient::new()
        .post_form(
            &gw.url("/oauth/token"),
            "grant_type=client_credentials&client_id=my+app",
        )
        .await;
    assert_eq!(answer.served_by(), "rails");
    let call = gw.preauth.last();

    assert_eq!(call.method, "POST");
    assert_eq!(call.uri.split('?').next(), Some("/-/oauth/iam_routing"));
    assert_eq!(call.query_values("client_id"), ["my app"]);
    let header = |name: &str| {
        call.headers
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        header("gitlab-workhorse"),
        concat!("iamproxy/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(header("accept"), "application/vnd.gitlab-workhorse+json");
    assert_eq!(
        header("x-request-id"),
        answer.headers["x-request-id"].to_str().unwrap()
    );
    assert!(call.body.is_empty());

    let claims = verify(&header("gitlab-workhorse-api-request"), &gw.secret.bytes)
        .expect("signed with the workhorse secret");
    assert_eq!(claims.iss, "gitlab-workhorse");
    assert!(
        claims.iat.abs_diff(now_secs()) <= 5,
        "iat {} is now",
        claims.iat
    );
    gw.stop().await;
}

#[tokio::test]
async fn workhorse_jwt_check_rejects_a_token_signed_with_another_key() {
    let secret = support::SecretFile::new();
    let other = support::SecretFile::new();
    let claims = serde_json::json!({ "iss": "gitlab-workhorse", "iat": now_secs() });
    let sign = |key: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    assert!(verify(&sign(&secret.bytes), &secret.bytes).is_ok());
    assert!(verify(&sign(&other.bytes), &secret.bytes).is_err());
}

#[tokio::test]
async fn client_cookie_authorization_and_body_never_reach_preauthorize() {
    let gw = gateway().start().await;
    let authorization = format!("Basic {}", STANDARD.encode("app:basic-secret"));
    let request = Request::post(gw.url("/oauth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", "_gitlab_session=secret-cookie")
        .header("authorization", &authorization)
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials&client_id=app&client_secret=form-secret",
        )))
        .unwrap();
    let answer = TestClient::new().send(request).await;
    assert_eq!(answer.served_by(), "rails");
    let call = gw.preauth.last();
    assert_eq!(call.query_values("client_id"), ["app"]);

    let leaked = |recorded: &Recorded, needle: &str| {
        recorded.uri.contains(needle)
            || String::from_utf8_lossy(&recorded.body).contains(needle)
            || recorded
                .headers
                .values()
                .any(|v| String::from_utf8_lossy(v.as_bytes()).contains(needle))
    };
    let secrets = [
        "secret-cookie",
        "_gitlab_session",
        authorization.as_str(),
        &authorization["Basic ".len()..],
        "basic-secret",
        "form-secret",
        "client_secret",
        "grant_type",
    ];
    for secret in secrets {
        assert!(
            !leaked(&call, secret),
            "{secret:?} reached the pre-authorize backend"
        );
    }
    assert!(call.headers.get("cookie").is_none());
    assert!(call.headers.get("authorization").is_none());
    assert!(call.body.is_empty());
    // Rails still got what the client sent: the test would catch a gateway that drops it.
    assert!(leaked(&gw.rails.last(), "form-secret"));
    gw.stop().await;
}

#[tokio::test]
async fn client_supplied_workhorse_headers_reach_neither_rails_nor_iam() {
    let gw = gateway().start().await;
    gw.preauth.respond(|call| {
        let to_iam = call.query_values("client_id") == ["iam-app"];
        Reply::destination(if to_iam { "iam" } else { "rails" })
    });
    let client = TestClient::new();
    let forged = |path: &str, body: &str| {
        Request::post(gw.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("gitlab-workhorse", "forged/1.0")
            .header("gitlab-workhorse-api-request", "forged.jwt.token")
            .header("gitlab-workhorse-extra", "forged")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    };
    let cases = [
        ("iam", forged("/oauth/token", "client_id=iam-app")),
        ("rails", forged("/oauth/token", "client_id=rails-app")),
        ("rails", forged("/api/v4/projects", "client_id=iam-app")),
    ];
    for (destination, request) in cases {
        let case = format!("{} to {destination}", request.uri());
        let answer = client.send(request).await;
        assert_eq!(answer.served_by(), destination, "{case}");
        let upstream = if destination == "iam" {
            &gw.iam
        } else {
            &gw.rails
        };
        let received = upstream.last();
        let forwarded: Vec<_> = received
            .headers
            .keys()
            .filter(|name| name.as_str().starts_with("gitlab-workhorse"))
            .collect();
        assert!(forwarded.is_empty(), "{case}: {forwarded:?} forwarded");
        assert!(
            received.headers.contains_key("content-type"),
            "{case}: other headers kept"
        );
    }
    gw.stop().await;
}
