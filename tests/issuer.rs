//! Every code and token reaches the server that issued it: an application moved to IAM
//! keeps working for the users who hold Rails' codes and tokens, under every
//! `routing.mode`, for clients that authenticate with Basic or with a body `client_id`;
//! `routing.rails_issued = "decision"` hands those tokens to the application's decision;
//! and a body or query with invalid percent-encoding names no client.

mod support;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use support::metrics::scrape;
use support::{gateway, Reply, TestClient, TestGateway};

const FORM: &str = "application/x-www-form-urlencoded";
/// What Doorkeeper issues: hex, no prefix.
const RAILS_TOKEN: &str = "6b1f3c0e9a7d4e21b5c8f0a3d2e1c4b7a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4";
const IAM_TOKEN: &str = "giat_9f8e7d6c5b4a";

/// How the client authenticates.
#[derive(Debug, Clone, Copy)]
enum Client {
    Basic,
    Body,
}

/// One row of the table: a request that carries what Rails issued.
struct Row {
    name: &'static str,
    path: &'static str,
    form: String,
}

fn rails_issued_rows() -> Vec<Row> {
    let redirect = "redirect_uri=https%3A%2F%2Fapp.example%2Fcb";
    vec![
        Row {
            name: "refresh with a Rails refresh token",
            path: "/oauth/token",
            form: format!("grant_type=refresh_token&refresh_token={RAILS_TOKEN}"),
        },
        Row {
            name: "redeem a code Rails issued just before the flip",
            path: "/oauth/token",
            form: format!("grant_type=authorization_code&code={RAILS_TOKEN}&{redirect}"),
        },
        Row {
            name: "poll with a Rails device code",
            path: "/oauth/token",
            form: format!(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code={RAILS_TOKEN}"
            ),
        },
        Row {
            name: "revoke a Rails token",
            path: "/oauth/revoke",
            form: format!("token={RAILS_TOKEN}&token_type_hint=refresh_token"),
        },
        Row {
            name: "introspect a Rails token",
            path: "/oauth/introspect",
            form: format!("token={RAILS_TOKEN}"),
        },
    ]
}

/// `form` as `client` sends it: with Basic credentials, or with `client_id` (and a secret)
/// in the body.
fn request(
    gw: &TestGateway,
    path: &str,
    client: Client,
    client_id: &str,
    form: &str,
) -> Request<Full<Bytes>> {
    let builder = Request::post(gw.url(path)).header("content-type", FORM);
    let (builder, body) = match client {
        Client::Basic => {
            let credentials = STANDARD.encode(format!("{client_id}:s3cret"));
            let builder = builder.header("authorization", format!("Basic {credentials}"));
            (builder, form.to_owned())
        }
        Client::Body => (
            builder,
            format!("{form}&client_id={client_id}&client_secret=s3cret"),
        ),
    };
    builder.body(Full::new(Bytes::from(body))).unwrap()
}

/// A gateway whose pre-authorize backend has moved every application to IAM.
async fn moved_to_iam(routing: &str) -> TestGateway {
    let gw = gateway().set("routing", routing).start().await;
    gw.preauth.always(Reply::destination("iam"));
    gw
}

async fn decisions(gw: &TestGateway, destination: &str, reason: &str) -> f64 {
    scrape(gw.admin).await.value(
        "iamproxy_routing_decisions_total",
        &[("destination", destination), ("reason", reason)],
    )
}

#[tokio::test]
async fn rails_issued_codes_and_tokens_of_a_moved_application_reach_rails_under_every_mode() {
    let client = TestClient::new();
    for mode in ["preauthorize", "rails", "iam"] {
        let gw = moved_to_iam(&format!("mode = \"{mode}\"")).await;
        let mut sent = 0.0;
        for row in rails_issued_rows() {
            for how in [Client::Basic, Client::Body] {
                let case = format!("mode={mode}, {}, {how:?}", row.name);
                let answer = client
                    .send(request(&gw, row.path, how, "moved-app", &row.form))
                    .await;
                assert_eq!(answer.served_by(), "rails", "{case}");
                let forwarded = gw.rails.last();
                assert_eq!(forwarded.uri, row.path, "{case}");
                assert!(
                    String::from_utf8_lossy(&forwarded.body).contains(RAILS_TOKEN),
                    "{case}: the body reaches Rails as sent"
                );
                sent += 1.0;
            }
        }
        assert_eq!(gw.preauth.count(), 0, "mode={mode}: no pre-authorize call");
        assert_eq!(gw.iam.count(), 0, "mode={mode}: nothing at IAM");
        assert_eq!(
            decisions(&gw, "rails", "rails_issued").await,
            sent,
            "mode={mode}"
        );
        gw.stop().await;
    }
}

#[tokio::test]
async fn rails_issued_decision_lets_rails_tokens_follow_the_application() {
    let client = TestClient::new();
    // (mode, where a moved application's Rails tokens go, pre-authorize calls per client)
    for (mode, served_by, asks) in [
        ("preauthorize", "iam", 1),
        ("rails", "rails", 0),
        ("iam", "iam", 0),
    ] {
        let gw = moved_to_iam(&format!("mode = \"{mode}\"\nrails_issued = \"decision\"")).await;
        for row in rails_issued_rows() {
            for how in [Client::Basic, Client::Body] {
                let case = format!("mode={mode}, {}, {how:?}", row.name);
                let answer = client
                    .send(request(&gw, row.path, how, "moved-app", &row.form))
                    .await;
                assert_eq!(answer.served_by(), served_by, "{case}");
            }
        }
        assert_eq!(
            gw.preauth.count(),
            asks,
            "mode={mode}: the decision is cached once"
        );
        assert_eq!(
            decisions(&gw, "rails", "rails_issued").await,
            0.0,
            "mode={mode}"
        );
        gw.stop().await;
    }
}

#[tokio::test]
async fn an_iam_value_beside_a_plain_one_goes_to_iam() {
    let gw = moved_to_iam("mode = \"preauthorize\"").await;
    gw.preauth.always(Reply::destination("rails"));
    let client = TestClient::new();
    let cases = [
        (
            "/oauth/token",
            format!("grant_type=refresh_token&refresh_token={IAM_TOKEN}&code={RAILS_TOKEN}"),
        ),
        (
            "/oauth/revoke",
            format!("token={RAILS_TOKEN}&token={IAM_TOKEN}"),
        ),
        (
            "/oauth/introspect",
            format!("token={IAM_TOKEN}&token_type_hint=access_token&code={RAILS_TOKEN}"),
        ),
    ];
    for (path, form) in &cases {
        for how in [Client::Basic, Client::Body] {
            let answer = client.send(request(&gw, path, how, "app", form)).await;
            assert_eq!(answer.served_by(), "iam", "{path} {form} {how:?}");
        }
    }
    // A Rails token in the query and an IAM one in the body: IAM too.
    let url = format!("/oauth/token?code={RAILS_TOKEN}");
    let answer = client
        .send(request(
            &gw,
            &url,
            Client::Body,
            "app",
            &format!("refresh_token={IAM_TOKEN}"),
        ))
        .await;
    assert_eq!(answer.served_by(), "iam");
    assert_eq!(gw.preauth.count(), 0);
    assert_eq!(gw.rails.count(), 0);
    assert_eq!(decisions(&gw, "iam", "continuity").await, 7.0);
    gw.stop().await;
}

#[tokio::test]
async fn requests_without_a_code_or_token_follow_the_application() {
    let gw = moved_to_iam("mode = \"preauthorize\"").await;
    let client = TestClient::new();
    let mut requests = vec![
        Request::get(gw.url("/oauth/authorize?response_type=code&client_id=moved-app&state=x"))
            .body(Full::default())
            .unwrap(),
        Request::post(gw.url("/oauth/authorize_device"))
            .header("content-type", FORM)
            .body(Full::new(Bytes::from("client_id=moved-app&scope=api")))
            .unwrap(),
    ];
    for form in [
        "grant_type=client_credentials&scope=api",
        "grant_type=password&username=u&password=p",
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=eyJ0.eyJ0.sig",
        // An empty code is no code.
        "grant_type=authorization_code&code=",
    ] {
        for how in [Client::Basic, Client::Body] {
            requests.push(request(&gw, "/oauth/token", how, "moved-app", form));
        }
    }
    let total = requests.len();
    for request in requests {
        let case = format!("{} {}", request.method(), request.uri());
        assert_eq!(client.send(request).await.served_by(), "iam", "{case}");
    }
    assert_eq!(
        gw.upstream_counts(),
        (0, total, 1),
        "one pre-authorize call, then the cache"
    );
    gw.stop().await;
}

#[tokio::test]
async fn invalid_percent_encoding_names_no_client_and_goes_to_rails_without_a_call() {
    let gw = moved_to_iam("mode = \"preauthorize\"").await;
    let client = TestClient::new();
    let mut requests = Vec::new();
    for body in [
        "grant_type=client_credentials&client_id=app%ZZ",
        "grant_type=client_credentials&client_id=app&scope=%",
        "grant_type=client_credentials&client_id=app%4",
        // An IAM-looking token in an unreadable body is not read either.
        "grant_type=refresh_token&refresh_token=giat_x&client_id=app&state=%G0",
    ] {
        requests.push(
            Request::post(gw.url("/oauth/token"))
                .header("content-type", FORM)
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        );
        // Valid Basic credentials do not rescue an unreadable body.
        requests.push(request(&gw, "/oauth/token", Client::Basic, "app", body));
    }
    for query in [
        "response_type=code&client_id=app%ZZ",
        "client_id=app&state=%",
    ] {
        requests.push(
            Request::get(gw.url(&format!("/oauth/authorize?{query}")))
                .body(Full::default())
                .unwrap(),
        );
    }
    let total = requests.len();
    for request in requests {
        let case = format!("{} {}", request.method(), request.uri());
        let answer = client.send(request).await;
        assert_eq!(answer.status, 200, "{case}: never a gateway error");
        assert_eq!(answer.served_by(), "rails", "{case}");
    }
    assert_eq!(gw.upstream_counts(), (total, 0, 0));
    assert_eq!(
        decisions(&gw, "rails", "unknown_client").await,
        total as f64
    );
    gw.stop().await;
}
