//! Metrics (DESIGN §8): the admin `/metrics` scrape exports exactly the contracted families,
//! its counters match the traffic sent path by path, no label carries a client id or a raw
//! path, and `promtool check metrics` finds nothing to report.

mod support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use support::metrics::{scrape, Scrape};
use support::{gateway, refused_addr, send, Answer, Reply, TestGateway};

/// Longest any single request in this file may take before the test fails.
const BOUND: Duration = Duration::from_secs(5);

const REQUESTS: &str = "iamproxy_requests_total";
const DURATION_COUNT: &str = "iamproxy_request_duration_seconds_count";
const DECISIONS: &str = "iamproxy_routing_decisions_total";
const PREAUTH_CALLS: &str = "iamproxy_preauthorize_calls_total";
const PREAUTH_DURATION_COUNT: &str = "iamproxy_preauthorize_duration_seconds_count";
const FALLBACKS: &str = "iamproxy_fallbacks_total";
const CONNECTION_ERRORS: &str = "iamproxy_upstream_connection_errors_total";
const BREAKER_STATE: &str = "iamproxy_iam_breaker_state";
const CACHE_HITS: &str = "iamproxy_decision_cache_hits_total";
const CACHE_MISSES: &str = "iamproxy_decision_cache_misses_total";
const CACHE_ENTRIES: &str = "iamproxy_decision_cache_entries";
const IN_FLIGHT: &str = "iamproxy_requests_in_flight";

const ROUTES: [&str; 6] = [
    "authorize",
    "authorize_device",
    "token",
    "revoke",
    "introspect",
    "other",
];

/// The labels of one `iamproxy_requests_total` series.
fn requests(
    route: &'static str,
    destination: &'static str,
    method: &'static str,
    status_class: &'static str,
) -> [(&'static str, &'static str); 4] {
    [
        ("route", route),
        ("destination", destination),
        ("method", method),
        ("status_class", status_class),
    ]
}

fn decision(destination: &'static str, reason: &'static str) -> [(&'static str, &'static str); 2] {
    [("destination", destination), ("reason", reason)]
}

/// POSTs a form to `/oauth/token`.
async fn token(gw: &TestGateway, form: &str) -> Answer {
    send(
        Request::post(gw.url("/oauth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form.to_owned())))
            .unwrap(),
    )
    .await
}

/// A client-credentials token request for `client_id`.
async fn token_for(gw: &TestGateway, client_id: &str) -> Answer {
    token(
        gw,
        &format!("grant_type=client_credentials&client_id={client_id}"),
    )
    .await
}

async fn get(gw: &TestGateway, path: &str) -> Answer {
    send(Request::get(gw.url(path)).body(Full::default()).unwrap()).await
}

fn assert_served_by(answer: &Answer, upstream: &str) {
    assert_eq!(answer.served_by(), upstream, "{}", answer.status);
}

/// A gateway routing every client to IAM, whose breaker stays out of the way.
async fn iam_gateway() -> TestGateway {
    let gw = gateway()
        .set("iam", "timeout = \"300ms\"")
        .set("iam.circuit_breaker", "consecutive_failures = 100")
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw
}

// ---- The contract --------------------------------------------------------------------

#[tokio::test]
async fn exports_exactly_the_contracted_metric_families_with_their_types() {
    let gw = gateway().start().await;
    // iamproxy_requests_total has no series, hence no family, before the first request.
    assert_served_by(&get(&gw, "/").await, "rails");
    let scraped = scrape(gw.admin).await;
    let expected: BTreeMap<String, String> = [
        ("iamproxy_build_info", "gauge"),
        ("iamproxy_requests_total", "counter"),
        ("iamproxy_request_duration_seconds", "histogram"),
        ("iamproxy_requests_in_flight", "gauge"),
        ("iamproxy_routing_decisions_total", "counter"),
        ("iamproxy_decision_cache_hits_total", "counter"),
        ("iamproxy_decision_cache_misses_total", "counter"),
        ("iamproxy_decision_cache_entries", "gauge"),
        ("iamproxy_preauthorize_calls_total", "counter"),
        ("iamproxy_preauthorize_duration_seconds", "histogram"),
        ("iamproxy_fallbacks_total", "counter"),
        ("iamproxy_iam_breaker_state", "gauge"),
        ("iamproxy_iam_breaker_opens_total", "counter"),
        ("iamproxy_upstream_connection_errors_total", "counter"),
        ("iamproxy_upstream_saturated_total", "counter"),
        ("iamproxy_config_last_reload_successful", "gauge"),
        (
            "iamproxy_config_last_reload_success_timestamp_seconds",
            "gauge",
        ),
        ("iamproxy_config_reloads_total", "counter"),
        ("iamproxy_shared_cache_lookups_total", "counter"),
        ("iamproxy_shared_cache_fills_total", "counter"),
        ("iamproxy_tracing_spans_exported_total", "counter"),
        ("iamproxy_tracing_spans_dropped_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_cpu_seconds_total", "counter"),
    ]
    .into_iter()
    .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
    .collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|(name, kind)| scraped.types.get(*name) != Some(kind))
        .collect();
    let unexpected: Vec<_> = scraped
        .types
        .iter()
        .filter(|(name, kind)| expected.get(*name) != Some(kind))
        .collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "missing or of another type: {missing:?}; not in the contract: {unexpected:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn series_created_at_start_up_read_zero_before_any_traffic() {
    let gw = gateway().start().await;
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.named(REQUESTS).count(),
        0,
        "request counters appear on first use"
    );
    for route in ROUTES {
        for destination in ["iam", "rails"] {
            let labels = [("route", route), ("destination", destination)];
            if route == "other" && destination == "iam" {
                // Only OAuth endpoints go to IAM: a series that could never move.
                assert_eq!(scraped.get(DURATION_COUNT, &labels), None);
            } else {
                assert_eq!(scraped.value(DURATION_COUNT, &labels), 0.0);
            }
        }
    }
    let decisions = [
        ("iam", "continuity"),
        ("iam", "cache"),
        ("iam", "preauthorize"),
        ("rails", "cache"),
        ("rails", "preauthorize"),
        ("rails", "unknown_client"),
        ("rails", "preauthorize_error"),
        ("rails", "iam_disabled"),
        ("iam", "kill_switch"),
        ("rails", "kill_switch"),
        ("iam", "force_iam"),
        ("rails", "force_rails"),
        ("iam", "percentage"),
    ];
    for (destination, reason) in decisions {
        assert_eq!(
            scraped.value(DECISIONS, &decision(destination, reason)),
            0.0
        );
    }
    for outcome in [
        "ok",
        "timeout",
        "connect_error",
        "bad_status",
        "bad_response",
    ] {
        assert_eq!(scraped.value(PREAUTH_CALLS, &[("outcome", outcome)]), 0.0);
    }
    for reason in ["connect_error", "timeout", "status", "breaker_open"] {
        assert_eq!(scraped.value(FALLBACKS, &[("reason", reason)]), 0.0);
    }
    for upstream in ["iam", "rails", "preauthorize"] {
        assert_eq!(
            scraped.value(CONNECTION_ERRORS, &[("upstream", upstream)]),
            0.0
        );
    }
    let zero = [
        IN_FLIGHT,
        CACHE_HITS,
        CACHE_MISSES,
        CACHE_ENTRIES,
        PREAUTH_DURATION_COUNT,
        "iamproxy_iam_breaker_opens_total",
    ];
    for name in zero {
        assert_eq!(scraped.value(name, &[]), 0.0, "{name}");
    }
    assert_eq!(scraped.value(BREAKER_STATE, &[("state", "closed")]), 1.0);
    assert_eq!(scraped.value(BREAKER_STATE, &[("state", "open")]), 0.0);
    assert_eq!(scraped.value(BREAKER_STATE, &[("state", "half_open")]), 0.0);
    gw.stop().await;
}

/// The `le` values of one histogram series, in exposition order.
fn buckets(scraped: &Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<String> {
    let mut les: Vec<(f64, String)> = scraped
        .named(name)
        .filter(|(series, _)| series.has(labels))
        .map(|(series, _)| {
            let le = series.labels["le"].clone();
            (le.parse::<f64>().unwrap(), le)
        })
        .collect();
    les.sort_by(|a, b| a.0.total_cmp(&b.0));
    les.into_iter().map(|(_, le)| le).collect()
}

#[tokio::test]
async fn histograms_use_the_contracted_buckets() {
    let gw = gateway().start().await;
    let scraped = scrape(gw.admin).await;
    let request_buckets = [
        "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5",
        "10", "30", "60", "+Inf",
    ];
    for route in ROUTES {
        let labels = [("route", route), ("destination", "rails")];
        assert_eq!(
            buckets(
                &scraped,
                "iamproxy_request_duration_seconds_bucket",
                &labels
            ),
            request_buckets,
            "{route}"
        );
    }
    let preauthorize_buckets = [
        "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
        "2", "+Inf",
    ];
    assert_eq!(
        buckets(
            &scraped,
            "iamproxy_preauthorize_duration_seconds_bucket",
            &[]
        ),
        preauthorize_buckets
    );
    gw.stop().await;
}

#[tokio::test]
async fn build_info_is_1_with_the_crate_version_and_the_git_commit() {
    let gw = gateway().start().await;
    let scraped = scrape(gw.admin).await;
    let commit = support::process::git_commit();
    let series: Vec<String> = scraped
        .named("iamproxy_build_info")
        .map(|(series, _)| series.to_string())
        .collect();
    assert_eq!(
        series,
        [format!(
            "iamproxy_build_info{{commit={commit:?},version={:?}}}",
            env!("CARGO_PKG_VERSION")
        )]
    );
    assert_eq!(
        scraped.value(
            "iamproxy_build_info",
            &[("commit", &commit), ("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    gw.stop().await;
}

// ---- Requests ------------------------------------------------------------------------

#[tokio::test]
async fn token_requests_served_by_iam_count_as_token_iam_post_2xx_and_in_the_duration_histogram() {
    let gw = iam_gateway().await;
    for _ in 0..5 {
        assert_served_by(&token_for(&gw, "app").await, "iam");
    }
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.value(REQUESTS, &requests("token", "iam", "POST", "2xx")),
        5.0
    );
    assert_eq!(scraped.sum(REQUESTS, &[]), 5.0, "nothing else counted");
    let token_iam = [("route", "token"), ("destination", "iam")];
    assert_eq!(scraped.value(DURATION_COUNT, &token_iam), 5.0);
    assert_eq!(scraped.sum(DURATION_COUNT, &[]), 5.0);
    assert_eq!(
        scraped.value(
            "iamproxy_request_duration_seconds_bucket",
            &[("route", "token"), ("destination", "iam"), ("le", "+Inf")]
        ),
        5.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn passthrough_requests_count_as_route_other_served_by_rails_without_a_decision() {
    let gw = iam_gateway().await;
    for path in [
        "/api/v4/projects",
        "/",
        "/oauth/applications",
        // Doorkeeper's token info: Rails routes it elsewhere than the token endpoint.
        "/oauth/token/info",
    ] {
        assert_served_by(&get(&gw, path).await, "rails");
    }
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.value(REQUESTS, &requests("other", "rails", "GET", "2xx")),
        4.0
    );
    assert_eq!(scraped.sum(REQUESTS, &[]), 4.0);
    let other_rails = [("route", "other"), ("destination", "rails")];
    assert_eq!(scraped.value(DURATION_COUNT, &other_rails), 4.0);
    assert_eq!(
        scraped.sum(DECISIONS, &[]),
        0.0,
        "decisions are for OAuth only"
    );
    assert_eq!(scraped.sum(PREAUTH_CALLS, &[]), 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn in_flight_gauge_is_1_while_a_slow_request_is_handled_and_0_after() {
    let gw = gateway().start().await;
    gw.rails
        .always(Reply::text(200, r#"{"served_by":"rails"}"#).after(Duration::from_millis(500)));
    let slow = tokio::spawn(send(
        Request::get(gw.url("/slow")).body(Full::default()).unwrap(),
    ));
    // Once Rails has the request, the gateway is in the middle of handling it.
    tokio::time::timeout(BOUND, async {
        while gw.rails.count() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the request reached Rails");
    assert_eq!(scrape(gw.admin).await.value(IN_FLIGHT, &[]), 1.0);
    assert_served_by(&slow.await.unwrap(), "rails");
    assert_eq!(scrape(gw.admin).await.value(IN_FLIGHT, &[]), 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn refused_rails_connection_counts_the_502_as_rails_5xx_and_a_rails_connection_error() {
    let gw = gateway()
        .set(
            "rails",
            &format!("url = \"http://{}\"", refused_addr().await),
        )
        .start()
        .await;
    gw.preauth.always(Reply::destination("rails"));
    assert_eq!(get(&gw, "/api/v4/projects").await.status, 502);
    assert_eq!(token_for(&gw, "app").await.status, 502);
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.value(REQUESTS, &requests("other", "rails", "GET", "5xx")),
        1.0
    );
    assert_eq!(
        scraped.value(REQUESTS, &requests("token", "rails", "POST", "5xx")),
        1.0
    );
    assert_eq!(scraped.sum(REQUESTS, &[]), 2.0);
    assert_eq!(
        scraped.value(CONNECTION_ERRORS, &[("upstream", "rails")]),
        2.0
    );
    assert_eq!(
        scraped.value(CONNECTION_ERRORS, &[("upstream", "iam")]),
        0.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn oversized_oauth_body_counts_the_gateway_413_as_rails_4xx() {
    let gw = gateway().set("server", "max_body_bytes = 64").start().await;
    let answer = token(&gw, &format!("client_id=app&pad={}", "x".repeat(200))).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.value(REQUESTS, &requests("token", "rails", "POST", "4xx")),
        1.0
    );
    assert_eq!(scraped.sum(REQUESTS, &[]), 1.0);
    assert_eq!(gw.upstream_counts(), (0, 0, 0));
    gw.stop().await;
}

// ---- Decisions, the cache and pre-authorize ---------------------------------------------

#[tokio::test]
async fn first_request_for_a_client_is_one_miss_and_one_ok_call_and_later_ones_are_hits() {
    let gw = iam_gateway().await;
    assert_served_by(&token_for(&gw, "app-a").await, "iam");
    let first = scrape(gw.admin).await;
    assert_eq!(first.value(CACHE_MISSES, &[]), 1.0);
    assert_eq!(first.value(CACHE_HITS, &[]), 0.0);
    assert_eq!(first.value(PREAUTH_CALLS, &[("outcome", "ok")]), 1.0);
    assert_eq!(first.value(PREAUTH_DURATION_COUNT, &[]), 1.0);
    assert_eq!(
        first.value(DECISIONS, &decision("iam", "preauthorize")),
        1.0
    );

    for _ in 0..4 {
        assert_served_by(&token_for(&gw, "app-a").await, "iam");
    }
    assert_served_by(&token_for(&gw, "app-b").await, "iam");
    let scraped = scrape(gw.admin).await;
    assert_eq!(scraped.value(CACHE_MISSES, &[]), 2.0);
    assert_eq!(scraped.value(CACHE_HITS, &[]), 4.0);
    assert_eq!(scraped.value(PREAUTH_CALLS, &[("outcome", "ok")]), 2.0);
    assert_eq!(scraped.sum(PREAUTH_CALLS, &[]), 2.0);
    assert_eq!(scraped.value(PREAUTH_DURATION_COUNT, &[]), 2.0);
    assert_eq!(
        scraped.value(DECISIONS, &decision("iam", "preauthorize")),
        2.0
    );
    assert_eq!(scraped.value(DECISIONS, &decision("iam", "cache")), 4.0);
    assert_eq!(scraped.sum(DECISIONS, &[]), 6.0);
    assert_eq!(
        scraped.value(CACHE_ENTRIES, &[]),
        2.0,
        "one entry per distinct client"
    );
    assert_eq!(gw.preauth.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn iam_prefixed_token_counts_a_continuity_decision_without_a_preauthorize_call() {
    let gw = gateway().start().await;
    let answer = token(
        &gw,
        "grant_type=refresh_token&client_id=app&refresh_token=giat_abc",
    )
    .await;
    assert_served_by(&answer, "iam");
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.value(DECISIONS, &decision("iam", "continuity")),
        1.0
    );
    assert_eq!(scraped.sum(DECISIONS, &[]), 1.0);
    assert_eq!(scraped.sum(PREAUTH_CALLS, &[]), 0.0);
    assert_eq!(scraped.value(CACHE_MISSES, &[]), 0.0);
    assert_eq!(scraped.value(CACHE_HITS, &[]), 0.0);
    assert_eq!(
        scraped.value(REQUESTS, &requests("token", "iam", "POST", "2xx")),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn request_without_a_client_id_counts_an_unknown_client_decision() {
    let gw = gateway().start().await;
    assert_served_by(&token(&gw, "grant_type=client_credentials").await, "rails");
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.value(DECISIONS, &decision("rails", "unknown_client")),
        1.0
    );
    assert_eq!(scraped.sum(DECISIONS, &[]), 1.0);
    assert_eq!(scraped.sum(PREAUTH_CALLS, &[]), 0.0);
    assert_eq!(gw.preauth.count(), 0);
    gw.stop().await;
}

/// Sends one token request while the pre-authorize backend fails as `reply` says, and
/// returns the scrape after it. The request must reach Rails.
async fn scrape_after_preauthorize_failure(gw: &TestGateway, reply: Reply) -> Scrape {
    gw.preauth.always(reply);
    assert_served_by(&token_for(gw, "app").await, "rails");
    let scraped = scrape(gw.admin).await;
    assert_eq!(
        scraped.value(DECISIONS, &decision("rails", "preauthorize_error")),
        1.0
    );
    assert_eq!(scraped.sum(DECISIONS, &[]), 1.0);
    assert_eq!(scraped.sum(PREAUTH_CALLS, &[]), 1.0);
    assert_eq!(scraped.value(PREAUTH_DURATION_COUNT, &[]), 1.0);
    assert_eq!(
        scraped.value(CACHE_MISSES, &[]),
        1.0,
        "a failed call is a miss"
    );
    assert_eq!(
        scraped.value(CACHE_ENTRIES, &[]),
        0.0,
        "errors are not cached"
    );
    scraped
}

#[tokio::test]
async fn preauthorize_answering_500_counts_a_bad_status_call_and_a_preauthorize_error_decision() {
    let gw = gateway().start().await;
    let scraped = scrape_after_preauthorize_failure(&gw, Reply::status(500)).await;
    assert_eq!(
        scraped.value(PREAUTH_CALLS, &[("outcome", "bad_status")]),
        1.0
    );
    assert_eq!(
        scraped.value(CONNECTION_ERRORS, &[("upstream", "preauthorize")]),
        0.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn preauthorize_dropping_the_connection_counts_a_connect_error_call_and_a_connection_error() {
    let gw = gateway().start().await;
    let scraped = scrape_after_preauthorize_failure(&gw, Reply::Drop).await;
    assert_eq!(
        scraped.value(PREAUTH_CALLS, &[("outcome", "connect_error")]),
        1.0
    );
    assert_eq!(
        scraped.value(CONNECTION_ERRORS, &[("upstream", "preauthorize")]),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn preauthorize_slower_than_its_timeout_counts_a_timeout_call() {
    let gw = gateway()
        .set("preauthorize", "timeout = \"200ms\"")
        .start()
        .await;
    let slow = Reply::destination("iam").after(Duration::from_secs(2));
    let scraped = scrape_after_preauthorize_failure(&gw, slow).await;
    assert_eq!(scraped.value(PREAUTH_CALLS, &[("outcome", "timeout")]), 1.0);
    let waited = scraped.value("iamproxy_preauthorize_duration_seconds_sum", &[]);
    assert!(
        (0.2..1.0).contains(&waited),
        "the call is timed until the timeout: {waited}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn preauthorize_answer_in_another_content_type_counts_a_bad_response_call() {
    let gw = gateway().start().await;
    let html = Reply::text(200, "<html>sign in</html>").with_header("content-type", "text/html");
    let scraped = scrape_after_preauthorize_failure(&gw, html).await;
    assert_eq!(
        scraped.value(PREAUTH_CALLS, &[("outcome", "bad_response")]),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn without_iam_every_breaker_state_reads_0_and_decisions_count_as_iam_disabled() {
    let gw = gateway().without_iam().start().await;
    for _ in 0..3 {
        assert_served_by(&token_for(&gw, "app").await, "rails");
    }
    let scraped = scrape(gw.admin).await;
    for state in ["closed", "open", "half_open"] {
        assert_eq!(scraped.value(BREAKER_STATE, &[("state", state)]), 0.0);
    }
    assert_eq!(
        scraped.value(DECISIONS, &decision("rails", "iam_disabled")),
        3.0
    );
    assert_eq!(scraped.sum(DECISIONS, &[]), 3.0);
    assert_eq!(scraped.sum(PREAUTH_CALLS, &[]), 0.0);
    gw.stop().await;
}

// ---- Fallbacks and the breaker -------------------------------------------------------

/// Sends one IAM-bound token request while IAM fails as `reply` says and returns the scrape
/// after it: one fallback, served and counted as Rails, decided as IAM.
async fn scrape_after_iam_failure(gw: &TestGateway, reply: Reply) -> Scrape {
    gw.iam.always(reply);
    assert_served_by(&token_for(gw, "app").await, "rails");
    let scraped = scrape(gw.admin).await;
    assert_eq!(scraped.sum(FALLBACKS, &[]), 1.0);
    assert_eq!(
        scraped.value(REQUESTS, &requests("token", "rails", "POST", "2xx")),
        1.0
    );
    assert_eq!(
        scraped.sum(REQUESTS, &[]),
        1.0,
        "a fallback counts once, as rails"
    );
    assert_eq!(
        scraped.value(DECISIONS, &decision("iam", "preauthorize")),
        1.0
    );
    scraped
}

#[tokio::test]
async fn iam_answering_a_fallback_status_counts_a_status_fallback() {
    let gw = iam_gateway().await;
    let scraped = scrape_after_iam_failure(&gw, Reply::status(503)).await;
    assert_eq!(scraped.value(FALLBACKS, &[("reason", "status")]), 1.0);
    assert_eq!(
        scraped.value(CONNECTION_ERRORS, &[("upstream", "iam")]),
        0.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn iam_dropping_the_connection_counts_a_connect_error_fallback_and_an_iam_connection_error() {
    let gw = iam_gateway().await;
    let scraped = scrape_after_iam_failure(&gw, Reply::Drop).await;
    assert_eq!(
        scraped.value(FALLBACKS, &[("reason", "connect_error")]),
        1.0
    );
    assert_eq!(
        scraped.value(CONNECTION_ERRORS, &[("upstream", "iam")]),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn iam_slower_than_iam_timeout_counts_a_timeout_fallback() {
    let gw = iam_gateway().await;
    let slow = Reply::text(200, r#"{"served_by":"iam"}"#).after(Duration::from_secs(2));
    let scraped = scrape_after_iam_failure(&gw, slow).await;
    assert_eq!(scraped.value(FALLBACKS, &[("reason", "timeout")]), 1.0);
    assert_eq!(
        scraped.value(CONNECTION_ERRORS, &[("upstream", "iam")]),
        0.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn open_breaker_counts_breaker_open_fallbacks_one_opening_and_state_open() {
    let gw = gateway()
        .set("iam.circuit_breaker", "consecutive_failures = 3")
        .set("iam.circuit_breaker", "open_for = \"1m\"")
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw.iam.always(Reply::status(503));
    for _ in 0..5 {
        assert_served_by(&token_for(&gw, "app").await, "rails");
    }
    assert_eq!(gw.iam.count(), 3, "the breaker opened after 3 failures");
    let scraped = scrape(gw.admin).await;
    assert_eq!(scraped.value(FALLBACKS, &[("reason", "status")]), 3.0);
    assert_eq!(scraped.value(FALLBACKS, &[("reason", "breaker_open")]), 2.0);
    assert_eq!(scraped.sum(FALLBACKS, &[]), 5.0);
    assert_eq!(scraped.value("iamproxy_iam_breaker_opens_total", &[]), 1.0);
    assert_eq!(scraped.value(BREAKER_STATE, &[("state", "open")]), 1.0);
    assert_eq!(scraped.value(BREAKER_STATE, &[("state", "closed")]), 0.0);
    assert_eq!(scraped.value(BREAKER_STATE, &[("state", "half_open")]), 0.0);
    assert_eq!(
        scraped.value(REQUESTS, &requests("token", "rails", "POST", "2xx")),
        5.0
    );
    gw.stop().await;
}

// ---- Cardinality and lint ------------------------------------------------------------

#[tokio::test]
async fn no_label_carries_a_client_id_a_raw_path_or_an_unknown_method() {
    let gw = gateway().start().await;
    let client_id = "zq-client-7f3a9c";
    gw.preauth.respond(move |recorded| {
        let to_iam = recorded.query_values("client_id") == [client_id];
        Reply::destination(if to_iam { "iam" } else { "rails" })
    });
    let client_path = "/api/v4/projects/zq-path-4b1e";
    let oauth_like_path = "/oauth/zq-oauth-path-5d2c";
    assert_served_by(&token_for(&gw, client_id).await, "iam");
    assert_served_by(&token_for(&gw, "zq-other-client-81c0").await, "rails");
    let query = format!("/oauth/authorize?client_id={client_id}&state=zq-state-2e77");
    assert_served_by(&get(&gw, &query).await, "iam");
    assert_served_by(&get(&gw, client_path).await, "rails");
    assert_served_by(&get(&gw, oauth_like_path).await, "rails");
    let brew = Method::from_bytes(b"ZQBREW").unwrap();
    let answer = send(
        Request::builder()
            .method(brew)
            .uri(gw.url("/coffee"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_served_by(&answer, "rails");

    let scraped = scrape(gw.admin).await;
    for needle in [
        "zq-",
        "zq-client-7f3a9c",
        "zq-other-client-81c0",
        "zq-path-4b1e",
        "zq-oauth-path-5d2c",
        "zq-state-2e77",
        "/api/v4",
        "/oauth",
        "/coffee",
        "ZQBREW",
    ] {
        assert!(
            !scraped.text.contains(needle),
            "{needle:?} appears in the scrape:\n{}",
            scraped.text
        );
    }
    assert_eq!(
        scraped.value(REQUESTS, &requests("other", "rails", "other", "2xx")),
        1.0,
        "unknown methods share the label \"other\""
    );
    assert_labels_come_from_closed_sets(&scraped);
    gw.stop().await;
}

/// Every label of every `iamproxy_` series takes a value from the contract's closed sets.
fn assert_labels_come_from_closed_sets(scraped: &Scrape) {
    let allowed = |label: &str| -> &'static [&'static str] {
        match label {
            "route" => &ROUTES,
            "destination" => &["iam", "rails"],
            "method" => &[
                "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
            ],
            "status_class" => &["1xx", "2xx", "3xx", "4xx", "5xx"],
            "outcome" => &[
                "ok",
                "timeout",
                "connect_error",
                "bad_status",
                "bad_response",
            ],
            "state" => &["closed", "open", "half_open"],
            "upstream" => &["iam", "rails", "preauthorize"],
            "version" => &[env!("CARGO_PKG_VERSION")],
            "result" => &["success", "failure"],
            _ => &[],
        }
    };
    let decision_reasons = [
        "continuity",
        "rails_issued",
        "cache",
        "preauthorize",
        "stale",
        "unknown_client",
        "preauthorize_error",
        "iam_disabled",
        "kill_switch",
        "force_iam",
        "force_rails",
        "percentage",
    ];
    let fallback_reasons = [
        "connect_error",
        "timeout",
        "status",
        "breaker_open",
        "saturated",
    ];
    let commit = support::process::git_commit();
    for series in scraped.samples.keys() {
        if !series.name.starts_with("iamproxy_") {
            continue;
        }
        for (label, value) in &series.labels {
            let ok = match label.as_str() {
                "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
                "reason" if series.name == DECISIONS => decision_reasons.contains(&value.as_str()),
                "reason" if series.name == FALLBACKS => fallback_reasons.contains(&value.as_str()),
                "reason" if series.name == "iamproxy_tracing_spans_dropped_total" => {
                    ["queue_full", "export_failed"].contains(&value.as_str())
                }
                "commit" => *value == commit,
                "outcome" if series.name == "iamproxy_shared_cache_lookups_total" => {
                    ["hit", "miss", "error", "timeout"].contains(&value.as_str())
                }
                other => allowed(other).contains(&value.as_str()),
            };
            assert!(ok, "{series}: {label}={value:?} is outside the contract");
        }
    }
}

/// Where the scripts install promtool when it is missing.
const INSTALL_HINT: &str =
    "promtool is not on PATH: run scripts/test.sh, which installs Debian's prometheus package";

#[tokio::test]
async fn promtool_finds_no_problem_in_a_scrape_after_mixed_traffic() {
    let gw = gateway()
        .set("iam.circuit_breaker", "consecutive_failures = 100")
        .start()
        .await;
    gw.preauth.respond(|recorded| {
        let id = recorded.query_values("client_id").pop().unwrap_or_default();
        match id.as_str() {
            "to-iam" | "iam-fails" => Reply::destination("iam"),
            "preauth-500" => Reply::status(500),
            _ => Reply::destination("rails"),
        }
    });
    gw.iam.respond(|recorded| {
        if recorded.body.ends_with(b"client_id=iam-fails") {
            Reply::status(503)
        } else {
            Reply::text(200, r#"{"served_by":"iam"}"#)
        }
    });
    for _ in 0..2 {
        // miss, then hit
        assert_served_by(&token_for(&gw, "to-iam").await, "iam");
        assert_served_by(&token_for(&gw, "to-rails").await, "rails");
    }
    assert_served_by(&token_for(&gw, "iam-fails").await, "rails");
    assert_served_by(&token_for(&gw, "preauth-500").await, "rails");
    assert_served_by(&token(&gw, "grant_type=client_credentials").await, "rails");
    assert_served_by(&get(&gw, "/api/v4/projects").await, "rails");
    let scraped = scrape(gw.admin).await;
    assert_eq!(scraped.value(FALLBACKS, &[("reason", "status")]), 1.0);
    assert_eq!(scraped.value(CACHE_HITS, &[]), 2.0);
    assert_eq!(
        scraped.value(PREAUTH_CALLS, &[("outcome", "bad_status")]),
        1.0
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scraped.text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}) reported:\n{report}\non:\n{}",
        output.status,
        scraped.text
    );
    gw.stop().await;
}

// ---- The scrape parser ---------------------------------------------------------------

#[test]
fn scrape_parser_reads_labels_escapes_and_special_values() {
    let scraped = Scrape::parse(concat!(
        "# HELP a_total A.\n",
        "# TYPE a_total counter\n",
        "a_total{z=\"1\",b=\"x\\\"y\\\\\"} 3\n",
        "a_total{b=\"w, v\",z=\"1\"} 4 1700000000000\n",
        "b_bucket{le=\"+Inf\"} 2\n",
        "c NaN\n",
        "d +Inf\n",
    ));
    assert_eq!(scraped.types["a_total"], "counter");
    assert_eq!(
        scraped.value("a_total", &[("z", "1"), ("b", "x\"y\\")]),
        3.0
    );
    assert_eq!(scraped.sum("a_total", &[("z", "1")]), 7.0);
    assert_eq!(scraped.sum("a_total", &[("b", "w, v")]), 4.0);
    assert_eq!(scraped.value("b_bucket", &[("le", "+Inf")]), 2.0);
    assert!(scraped.value("c", &[]).is_nan());
    assert_eq!(scraped.value("d", &[]), f64::INFINITY);
    assert_eq!(scraped.get("a", &[]), None);
    assert_eq!(scraped.named("a_total").count(), 2);
}
