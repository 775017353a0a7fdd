//! `iamproxy demo` run as a child process: its stand-ins route, its banner's commands work
//! as printed (the admin API with the demo's token, the breaker opened by five failures),
//! and it exits on SIGTERM.

mod support;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use support::process::{free_addr, probe, Iamproxy};
use support::TestClient;

#[tokio::test]
async fn demo_routes_through_its_stand_ins_and_exits_on_sigterm() {
    let (addr, admin) = (free_addr(), free_addr());
    let mut demo = Iamproxy::start(&[
        "demo",
        "--listen",
        &addr.to_string(),
        "--admin-listen",
        &admin.to_string(),
    ]);
    // The banner's last line: all of it is in.
    let banner = demo.stdout_containing("Ctrl-C stops it.").await;
    assert!(
        banner.contains(&format!("admin on http://{admin}")),
        "{banner}"
    );
    assert!(
        banner.contains(&format!("gateway on http://{addr}")),
        "{banner}"
    );

    let client = TestClient::new();
    let url = |path: &str| format!("http://{addr}{path}");
    let authorize = client
        .get(&url("/oauth/authorize?client_id=demo-iam"))
        .await;
    assert_eq!(authorize.served_by(), "iam");
    let token = client
        .post_form(
            &url("/oauth/token"),
            "grant_type=client_credentials&client_id=demo-app",
        )
        .await;
    assert_eq!(token.served_by(), "rails");
    let broken = client.send(broken_iam_token(url("/oauth/token"))).await;
    assert_eq!(broken.served_by(), "rails", "IAM's 503 replayed to Rails");
    assert_eq!(probe(admin, "/-/readiness").await, Some(StatusCode::OK));
    let metrics = client.get(&format!("http://{admin}/metrics")).await.text();
    assert!(
        metrics.contains("iamproxy_fallbacks_total{reason=\"status\"} 1\n"),
        "the demo's replay shows in its metrics:\n{metrics}"
    );

    // The admin API, with the token the banner prints.
    let token = banner
        .split_once("Authorization: Bearer ")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(token, _)| token.to_owned())
        .unwrap_or_else(|| panic!("no admin curl in the banner:\n{banner}"));
    let admin_curl = format!(
        "curl -s -H 'Authorization: Bearer {token}' http://{admin}/-/admin/decisions/demo-iam\n"
    );
    assert!(banner.contains(&admin_curl), "{banner}");
    let cached = client
        .send(
            Request::get(format!("http://{admin}/-/admin/decisions/demo-iam"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(cached.status, StatusCode::OK, "{}", cached.text());
    assert!(
        cached.text().contains(r#""destination":"iam""#),
        "{}",
        cached.text()
    );

    // The banner's one command that opens the breaker, sent as it would send it.
    let breaker = format!(
        "for i in 1 2 3 4 5; do curl -s -X POST -u demo-iam-broken:secret \
         -d grant_type=client_credentials http://{addr}/oauth/token; echo; done\n"
    );
    assert!(banner.contains(&breaker), "{banner}");
    for _ in 0..5 {
        let failure = broken_iam_token(url("/oauth/token"));
        assert_eq!(client.send(failure).await.served_by(), "rails");
    }
    let metrics = client.get(&format!("http://{admin}/metrics")).await.text();
    assert!(
        metrics.contains("iamproxy_iam_breaker_state{state=\"open\"} 1\n"),
        "{metrics}"
    );
    let authorize = client
        .get(&url("/oauth/authorize?client_id=demo-iam"))
        .await;
    assert_eq!(authorize.served_by(), "rails", "the breaker is open");

    demo.sigterm();
    demo.assert_exits_cleanly().await;
}

/// A token request from the demo's application whose IAM answers 503 (Basic auth).
fn broken_iam_token(url: String) -> Request<Full<Bytes>> {
    Request::post(url)
        .header(
            "authorization",
            format!("Basic {}", STANDARD.encode("demo-iam-broken:secret")),
        )
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials",
        )))
        .unwrap()
}
