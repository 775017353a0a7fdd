//! `[rails.headers]`, `[iam.headers]` and `[preauthorize.headers]`: each upstream gets its
//! own set on every request, replacing a client's value of the same name; a replay to
//! Rails gets Rails' set, not IAM's; a reload changes them for the next request.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use support::{gateway, send, Recorded, Reply, TestGateway};

async fn headers_gateway() -> TestGateway {
    let gw = gateway()
        .set("iam.headers", "\"X-Gitlab-Svc\" = \"iam-auth-http\"")
        .set("rails.headers", "\"X-Rails-Pool\" = \"oauth\"")
        .set("preauthorize.headers", "\"X-Preauth-Key\" = \"k1\"")
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw
}

/// An OAuth request for `app` carrying its own, forged values of the static headers.
fn authorize(gw: &TestGateway) -> Request<Full<Bytes>> {
    Request::get(gw.url("/oauth/authorize?client_id=app&response_type=code"))
        .header("x-gitlab-svc", "forged")
        .header("x-gitlab-svc", "forged-again")
        .header("x-rails-pool", "forged")
        .body(Full::default())
        .unwrap()
}

fn values(recorded: &Recorded, name: &str) -> Vec<String> {
    recorded
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn each_upstream_gets_its_own_headers_replacing_the_clients() {
    let gw = headers_gateway().await;
    let answer = send(authorize(&gw)).await;
    assert_eq!(answer.served_by(), "iam");

    let iam = gw.iam.last();
    assert_eq!(values(&iam, "x-gitlab-svc"), ["iam-auth-http"]);
    assert_eq!(
        values(&iam, "x-rails-pool"),
        ["forged"],
        "Rails' set is Rails'"
    );
    assert!(values(&iam, "x-preauth-key").is_empty());

    let preauth = gw.preauth.last();
    assert_eq!(values(&preauth, "x-preauth-key"), ["k1"]);
    assert!(values(&preauth, "x-gitlab-svc").is_empty());
    assert_eq!(
        values(&preauth, "accept"),
        ["application/vnd.gitlab-workhorse+json"]
    );

    let pass = send(
        Request::get(gw.url("/api/v4/projects"))
            .header("x-rails-pool", "forged")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(pass.served_by(), "rails");
    let rails = gw.rails.last();
    assert_eq!(values(&rails, "x-rails-pool"), ["oauth"]);
    assert!(values(&rails, "x-gitlab-svc").is_empty());
}

#[tokio::test]
async fn a_replay_to_rails_gets_rails_headers_not_iams() {
    let gw = headers_gateway().await;
    gw.iam.always(Reply::status(503));
    let answer = send(authorize(&gw)).await;
    assert_eq!(answer.served_by(), "rails");

    assert_eq!(values(&gw.iam.last(), "x-gitlab-svc"), ["iam-auth-http"]);
    let replayed = gw.rails.last();
    assert_eq!(values(&replayed, "x-rails-pool"), ["oauth"]);
    assert_eq!(
        values(&replayed, "x-gitlab-svc"),
        ["forged", "forged-again"],
        "the client's own values, as a direct Rails request carries them"
    );
}

#[tokio::test]
async fn a_reload_changes_the_headers_for_the_next_request() {
    let gw = headers_gateway().await;
    send(authorize(&gw)).await;
    assert_eq!(values(&gw.iam.last(), "x-gitlab-svc"), ["iam-auth-http"]);

    let text = gw
        .toml
        .replace("\"iam-auth-http\"", "\"iam-auth-grpc\"")
        .replace("\"X-Rails-Pool\" = \"oauth\"", "");
    let config = iamproxy::Config::from_toml(&text).unwrap();
    assert!(gw.reloader.apply(config).is_empty());

    gw.iam.always(Reply::status(503));
    send(authorize(&gw)).await;
    assert_eq!(values(&gw.iam.last(), "x-gitlab-svc"), ["iam-auth-grpc"]);
    assert_eq!(values(&gw.rails.last(), "x-rails-pool"), ["forged"]);
}
