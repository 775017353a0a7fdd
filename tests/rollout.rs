//! Rollout controls from `[routing]`: the kill switch both ways, `rails_only` that isolates
//! IAM, the forced lists and the percentage gate decide before the cache and the
//! pre-authorize backend, and a reload applies them to the very next request, cached
//! decisions notwithstanding.

mod support;

use support::logs::Captured;
use support::metrics::scrape;
use support::{gateway, Reply, TestClient, TestGateway};

async fn authorize(gw: &TestGateway, client_id: &str) -> String {
    TestClient::new()
        .get(&gw.url(&format!("/oauth/authorize?client_id={client_id}")))
        .await
        .served_by()
}

async fn decisions(gw: &TestGateway, destination: &str, reason: &str) -> f64 {
    scrape(gw.admin).await.value(
        "iamproxy_routing_decisions_total",
        &[("destination", destination), ("reason", reason)],
    )
}

/// Swaps in the gateway's own config plus `routing`, as SIGHUP would.
fn reload_with_routing(gw: &TestGateway, routing: &str) {
    let text = format!("{}\n[routing]\n{routing}\n", gw.toml);
    let config = iamproxy::Config::from_toml(&text).unwrap();
    assert!(gw.reloader.apply(config).is_empty());
}

#[tokio::test]
async fn forced_lists_decide_without_asking_pre_authorize_and_say_why() {
    let logs = Captured::global();
    let gw = gateway()
        .set(
            "routing",
            "force_iam = [\"pilot-app\"]\nforce_rails = [\"legacy-app\"]",
        )
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));

    assert_eq!(authorize(&gw, "pilot-app").await, "iam");
    assert_eq!(authorize(&gw, "legacy-app").await, "rails");
    assert_eq!(
        gw.preauth.count(),
        0,
        "the lists answer before pre-authorize"
    );
    assert_eq!(authorize(&gw, "anyone-else").await, "iam");
    assert_eq!(gw.preauth.count(), 1, "everyone else is asked about");

    assert_eq!(decisions(&gw, "iam", "force_iam").await, 1.0);
    assert_eq!(decisions(&gw, "rails", "force_rails").await, 1.0);
    for (client, reason) in [("pilot-app", "force_iam"), ("legacy-app", "force_rails")] {
        let (client, reason) = (
            format!("\"client_id\":\"{client}\""),
            format!("\"reason\":\"{reason}\""),
        );
        assert!(
            logs.has_line(&["routing decision", &client, &reason]),
            "a decision line with {client} and {reason}:\n{}",
            logs.text()
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn the_kill_switch_overrides_cached_decisions_at_the_next_request_and_back() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    assert_eq!(authorize(&gw, "app").await, "iam");
    assert_eq!(gw.preauth.count(), 1, "now cached as IAM");

    reload_with_routing(&gw, "mode = \"rails\"");
    assert_eq!(authorize(&gw, "app").await, "rails", "rolled back at once");
    let unknown = TestClient::new().get(&gw.url("/oauth/authorize")).await;
    assert_eq!(unknown.served_by(), "rails");
    assert_eq!(decisions(&gw, "rails", "kill_switch").await, 2.0);

    reload_with_routing(&gw, "mode = \"iam\"");
    gw.preauth.always(Reply::destination("rails"));
    assert_eq!(authorize(&gw, "other-app").await, "iam", "everyone to IAM");
    assert_eq!(decisions(&gw, "iam", "kill_switch").await, 1.0);

    reload_with_routing(&gw, "mode = \"preauthorize\"");
    assert_eq!(
        authorize(&gw, "app").await,
        "iam",
        "the cached decision again"
    );
    assert_eq!(gw.preauth.count(), 1, "the cache survived the reloads");
    gw.stop().await;
}

#[tokio::test]
async fn a_flow_iam_started_finishes_at_iam_under_the_kill_switch_to_rails() {
    let gw = gateway().set("routing", "mode = \"rails\"").start().await;
    let answer = TestClient::new()
        .post_form(
            &gw.url("/oauth/token"),
            "grant_type=authorization_code&code=giat_abc&client_id=app",
        )
        .await;
    assert_eq!(
        answer.served_by(),
        "iam",
        "a code IAM issued means nothing to Rails"
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_percentage_gate_sends_flippers_actors_to_iam_and_asks_about_the_rest() {
    // Flipper buckets for this flag: actor 1 → 90536, 2 → 47698, 3 → 35172, 42 → 37976.
    let gw = gateway()
        .set(
            "routing",
            "percentage_of_actors = { flag = \"proxy_oauth_requests_to_iam_service\", \
             actor = \"Authn::OauthApplication:{client_id}\", percent = 40 }",
        )
        .start()
        .await;
    gw.preauth.always(Reply::destination("rails"));
    assert_eq!(authorize(&gw, "3").await, "iam");
    assert_eq!(authorize(&gw, "42").await, "iam");
    assert_eq!(gw.preauth.count(), 0);
    assert_eq!(authorize(&gw, "2").await, "rails", "47.698% is outside 40%");
    assert_eq!(authorize(&gw, "1").await, "rails");
    assert_eq!(
        gw.preauth.count(),
        2,
        "outside the gate, Rails' flag decides"
    );
    assert_eq!(decisions(&gw, "iam", "percentage").await, 2.0);
    gw.stop().await;
}

#[tokio::test]
async fn rails_only_isolates_iam_even_from_flows_it_started_and_rails_lets_them_finish() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    // An IAM incident: the operator reloads into `rails_only`.
    reload_with_routing(&gw, "mode = \"rails_only\"");
    let client = TestClient::new();
    let code = "grant_type=authorization_code&code=giat_abc&client_id=app";
    let refresh = "grant_type=refresh_token&refresh_token=ory_abc&client_id=app";
    let verifier = "/oauth/authorize?client_id=app&login_verifier=x";
    let continuity = || async {
        [
            client.post_form(&gw.url("/oauth/token"), code).await,
            client.post_form(&gw.url("/oauth/token"), refresh).await,
            client.get(&gw.url(verifier)).await,
        ]
        .map(|answer| answer.served_by())
    };

    assert_eq!(continuity().await, ["rails", "rails", "rails"]);
    assert_eq!(authorize(&gw, "app").await, "rails");
    assert_eq!(gw.iam.count(), 0, "nothing reached IAM");
    assert_eq!(gw.preauth.count(), 0, "nor the pre-authorize backend");
    assert_eq!(decisions(&gw, "rails", "kill_switch").await, 4.0);
    assert_eq!(decisions(&gw, "iam", "continuity").await, 0.0);

    // The incident is over, the rollout still held back: `rails` lets begun flows finish.
    reload_with_routing(&gw, "mode = \"rails\"");
    assert_eq!(continuity().await, ["iam", "iam", "iam"]);
    assert_eq!(
        authorize(&gw, "app").await,
        "rails",
        "the rest still to Rails"
    );
    assert_eq!(decisions(&gw, "iam", "continuity").await, 3.0);
    assert_eq!(gw.preauth.count(), 0);
    gw.stop().await;
}
