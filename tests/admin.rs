//! The admin API: off (404) without `admin.token_file`, 401 for a missing or wrong token,
//! and with the right one: inspect a client's cached decision, invalidate one, invalidate
//! all, each invalidation making the next request ask the pre-authorize backend again.

mod support;

use std::hash::{BuildHasher, Hasher};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request};
use serde_json::Value;
use support::process::TempFile;
use support::{gateway, Answer, Reply, TestClient, TestGateway};

/// 32 hex digits, made fresh for each test.
fn random_token() -> String {
    let half = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u8(0);
        hasher.finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

async fn call(gw: &TestGateway, method: Method, path: &str, token: Option<&str>) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.admin));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    TestClient::new()
        .send(request.body(Full::<Bytes>::default()).unwrap())
        .await
}

fn json(answer: &Answer) -> Value {
    assert_eq!(answer.headers["content-type"], "application/json");
    serde_json::from_slice(&answer.body).expect("a JSON body")
}

async fn authorize(gw: &TestGateway, client_id: &str) -> String {
    TestClient::new()
        .get(&gw.url(&format!("/oauth/authorize?client_id={client_id}")))
        .await
        .served_by()
}

/// A gateway with the admin API on, pre-authorize sending everyone to IAM.
async fn with_admin(token: &str, routing: &str) -> (TestGateway, TempFile) {
    let token_file = TempFile::new(&format!("{token}\n"));
    let gw = gateway()
        .set("admin", &format!("token_file = \"{}\"", token_file.path()))
        .set("routing", routing)
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    (gw, token_file)
}

#[tokio::test]
async fn without_a_token_file_the_admin_api_is_not_there() {
    let gw = gateway().start().await;
    for (method, path) in [
        (Method::GET, "/-/admin/decisions/app"),
        (Method::DELETE, "/-/admin/decisions/app"),
        (Method::DELETE, "/-/admin/decisions"),
    ] {
        let answer = call(&gw, method, path, Some("anything-at-all-123")).await;
        assert_eq!(answer.status, 404, "{path}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_401_and_changes_nothing() {
    let token = random_token();
    let (gw, _file) = with_admin(&token, "").await;
    assert_eq!(authorize(&gw, "app").await, "iam");
    let wrong = random_token();
    for offered in [None, Some(wrong.as_str()), Some(&token[..token.len() - 1])] {
        let answer = call(&gw, Method::DELETE, "/-/admin/decisions", offered).await;
        assert_eq!(answer.status, 401, "{offered:?}");
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
        assert_eq!(json(&answer)["error"], "unauthorized");
    }
    assert_eq!(authorize(&gw, "app").await, "iam");
    assert_eq!(gw.preauth.count(), 1, "the cached decision is still there");
    gw.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_accepted_in_any_case_and_the_token_is_not() {
    let token = random_token().to_uppercase();
    let (gw, _file) = with_admin(&token, "").await;
    let client = TestClient::new();
    let delete = |authorization: String| {
        let request = Request::delete(format!("http://{}/-/admin/decisions", gw.admin))
            .header("authorization", authorization)
            .body(Full::<Bytes>::default())
            .unwrap();
        client.send(request)
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let answer = delete(format!("{scheme} {token}")).await;
        assert_eq!(answer.status, 200, "{scheme}");
    }
    let lower = delete(format!("Bearer {}", token.to_lowercase())).await;
    assert_eq!(lower.status, 401, "the token itself is compared exactly");
    assert_eq!(delete(format!("Basic {token}")).await.status, 401);
    gw.stop().await;
}

#[tokio::test]
async fn inspect_shows_the_cached_decision_with_its_age_and_lifetime_and_the_rule() {
    let token = random_token();
    let (gw, _file) = with_admin(&token, "force_rails = [\"legacy/app\"]").await;
    assert_eq!(authorize(&gw, "app").await, "iam");

    let answer = call(&gw, Method::GET, "/-/admin/decisions/app", Some(&token)).await;
    assert_eq!(answer.status, 200);
    let body = json(&answer);
    assert_eq!(body["client_id"], "app");
    assert_eq!(body["cached"]["destination"], "iam");
    assert_eq!(body["cached"]["reason"], "preauthorize");
    let age = body["cached"]["age_seconds"].as_f64().unwrap();
    let left = body["cached"]["expires_in_seconds"].as_f64().unwrap();
    assert!((0.0..5.0).contains(&age), "{body}");
    assert!(
        (age + left - 60.0).abs() < 0.01,
        "cache.ttl is 60 s: {body}"
    );
    assert_eq!(body["rule"], Value::Null);

    let answer = call(
        &gw,
        Method::GET,
        "/-/admin/decisions/legacy%2Fapp",
        Some(&token),
    )
    .await;
    let body = json(&answer);
    assert_eq!(body["client_id"], "legacy/app", "the id is percent-decoded");
    assert_eq!(body["cached"], Value::Null);
    assert_eq!(body["rule"]["destination"], "rails");
    assert_eq!(body["rule"]["reason"], "force_rails");
    gw.stop().await;
}

#[tokio::test]
async fn invalidating_one_client_or_all_makes_the_next_requests_ask_again() {
    let token = random_token();
    let (gw, _file) = with_admin(&token, "").await;
    for id in ["a", "b", "c"] {
        assert_eq!(authorize(&gw, id).await, "iam");
    }
    assert_eq!(gw.preauth.count(), 3);

    let answer = call(&gw, Method::DELETE, "/-/admin/decisions/a", Some(&token)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        json(&answer),
        serde_json::json!({"client_id": "a", "invalidated": true, "published": null, "shared": null}),
        "no [redis]: nothing to publish, no shared cache"
    );
    gw.preauth.always(Reply::destination("rails"));
    assert_eq!(authorize(&gw, "a").await, "rails", "asked again");
    assert_eq!(authorize(&gw, "b").await, "iam", "still cached");
    assert_eq!(gw.preauth.count(), 4);

    let answer = call(&gw, Method::DELETE, "/-/admin/decisions", Some(&token)).await;
    assert_eq!(
        json(&answer),
        serde_json::json!({"invalidated": 3, "published": null, "shared": null})
    );
    assert_eq!(authorize(&gw, "b").await, "rails");
    assert_eq!(authorize(&gw, "c").await, "rails");
    assert_eq!(gw.preauth.count(), 6);

    let again = call(&gw, Method::DELETE, "/-/admin/decisions/zzz", Some(&token)).await;
    assert_eq!(json(&again)["invalidated"], false, "nothing was cached");
    let post = call(&gw, Method::POST, "/-/admin/decisions", Some(&token)).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.headers["allow"], "DELETE");
    gw.stop().await;
}

#[tokio::test]
async fn an_invalidation_drops_the_stale_decision_too() {
    let token = random_token();
    let (gw, _file) = with_admin(&token, "").await;
    gw.preauth.always(
        Reply::destination("iam").with_header("cache-control", "max-age=1, stale-if-error=600"),
    );
    assert_eq!(authorize(&gw, "app").await, "iam");
    gw.preauth.always(Reply::status(500));
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(authorize(&gw, "app").await, "iam", "served stale");

    let answer = call(&gw, Method::DELETE, "/-/admin/decisions/app", Some(&token)).await;
    assert_eq!(
        json(&answer)["invalidated"],
        false,
        "nothing fresh was held"
    );
    assert_eq!(
        authorize(&gw, "app").await,
        "rails",
        "no stale decision left"
    );
    assert_eq!(gw.preauth.count(), 3);
    gw.stop().await;
}
