//! The metrics' tests: label tables in step with the enums, what one request or outcome
//! counts, the families exported from the start, and the process gauges.

use super::*;

fn scrape(metrics: &Metrics, breaker: Option<BreakerState>) -> String {
    String::from_utf8(metrics.render(0, breaker)).unwrap()
}

/// The value of one exposed series, written exactly as the text format prints it.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// The label arrays are indexed by `value as usize`: each enum's `ALL` must list its
/// values in declaration order.
#[test]
fn label_tables_follow_the_enum_order_used_as_indexes() {
    for (index, endpoint) in Endpoint::ALL.into_iter().enumerate() {
        assert_eq!(route_index(Some(endpoint)), index);
    }
    assert_eq!(route_index(None), ROUTES - 1);
    assert_eq!(route_label(None), "other");
    let positions = [
        Reason::ALL
            .iter()
            .enumerate()
            .all(|(i, r)| *r as usize == i),
        FallbackReason::ALL
            .iter()
            .enumerate()
            .all(|(i, r)| *r as usize == i),
        Upstream::ALL
            .iter()
            .enumerate()
            .all(|(i, u)| *u as usize == i),
        Destination::ALL
            .iter()
            .enumerate()
            .all(|(i, d)| *d as usize == i),
        Outcome::ALL
            .iter()
            .enumerate()
            .all(|(i, o)| *o as usize == i),
        BreakerState::ALL
            .iter()
            .enumerate()
            .all(|(i, b)| *b as usize == i),
        SharedOutcome::ALL
            .iter()
            .enumerate()
            .all(|(i, o)| *o as usize == i),
    ];
    assert_eq!(positions, [true; 7]);
}

#[test]
fn methods_outside_the_known_set_share_one_label() {
    assert_eq!(METHODS[method_index(&Method::GET)], "GET");
    assert_eq!(METHODS[method_index(&Method::OPTIONS)], "OPTIONS");
    let propfind = Method::from_bytes(b"PROPFIND").unwrap();
    assert_eq!(METHODS[method_index(&propfind)], "other");
}

#[test]
fn status_classes_cover_every_status_hyper_accepts() {
    let class = |code| STATUS_CLASSES[status_class_index(StatusCode::from_u16(code).unwrap())];
    assert_eq!(class(100), "1xx");
    assert_eq!(class(204), "2xx");
    assert_eq!(class(308), "3xx");
    assert_eq!(class(431), "4xx");
    assert_eq!(class(504), "5xx");
    assert_eq!(class(999), "5xx");
}

#[test]
fn a_request_counts_once_with_its_labels_and_its_duration() {
    let metrics = Metrics::new();
    for _ in 0..3 {
        metrics.request(
            Some(Endpoint::Token),
            Destination::Iam,
            &Method::POST,
            StatusCode::OK,
            Duration::from_millis(3),
        );
    }
    metrics.request(
        None,
        Destination::Rails,
        &Method::GET,
        StatusCode::BAD_GATEWAY,
        Duration::from_millis(40),
    );
    let text = scrape(&metrics, None);
    let token = r#"{destination="iam",method="POST",route="token",status_class="2xx"}"#;
    assert_eq!(
        value(&text, &format!("iamproxy_requests_total{token}")),
        Some(3.0)
    );
    let other = r#"{destination="rails",method="GET",route="other",status_class="5xx"}"#;
    assert_eq!(
        value(&text, &format!("iamproxy_requests_total{other}")),
        Some(1.0)
    );
    let duration = r#"iamproxy_request_duration_seconds_bucket{destination="iam",route="token""#;
    assert_eq!(
        value(&text, &format!(r#"{duration},le="0.0025"}}"#)),
        Some(0.0)
    );
    assert_eq!(
        value(&text, &format!(r#"{duration},le="0.005"}}"#)),
        Some(3.0)
    );
    // Combinations never seen are not exported.
    assert!(
        !text.contains(r#"route="authorize",status_class"#),
        "{text}"
    );
}

#[test]
fn every_possible_decision_fallback_outcome_and_upstream_is_exported_from_the_start() {
    let text = scrape(&Metrics::new(), None);
    for (destination, reason) in POSSIBLE_DECISIONS {
        let series = format!(
            r#"iamproxy_routing_decisions_total{{destination="{}",reason="{}"}}"#,
            destination.as_str(),
            reason.as_str()
        );
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }
    for reason in FallbackReason::ALL {
        let series = format!(
            r#"iamproxy_fallbacks_total{{reason="{}"}}"#,
            reason.as_str()
        );
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }
    for outcome in Outcome::ALL.map(Outcome::as_str) {
        let series = format!(r#"iamproxy_preauthorize_calls_total{{outcome="{outcome}"}}"#);
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }
    for upstream in Upstream::ALL.map(Upstream::as_str) {
        let series =
            format!(r#"iamproxy_upstream_connection_errors_total{{upstream="{upstream}"}}"#);
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }
    for outcome in SharedOutcome::ALL.map(SharedOutcome::as_str) {
        let series = format!(r#"iamproxy_shared_cache_lookups_total{{outcome="{outcome}"}}"#);
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }
    assert_eq!(value(&text, "iamproxy_shared_cache_fills_total"), Some(0.0));
    let version = format!(
        r#"iamproxy_build_info{{commit="{}",version="{}"}}"#,
        crate::COMMIT,
        crate::VERSION
    );
    assert_eq!(value(&text, &version), Some(1.0));
}

/// Label combinations that can never happen: only OAuth endpoints go to IAM.
const IMPOSSIBLE: [&[&str]; 1] = [&[r#"route="other""#, r#"destination="iam""#]];

#[test]
fn no_impossible_label_combination_is_exported() {
    let metrics = Metrics::new();
    // Every request that can happen, once.
    for endpoint in Endpoint::ALL.map(Some).into_iter().chain([None]) {
        for destination in Destination::ALL {
            if endpoint.is_some() || destination == Destination::Rails {
                let ok = StatusCode::OK;
                let elapsed = Duration::from_millis(1);
                metrics.request(endpoint, destination, &Method::GET, ok, elapsed);
            }
        }
    }
    for (destination, reason) in POSSIBLE_DECISIONS {
        metrics.decision(Decision {
            destination,
            reason,
        });
    }
    let text = scrape(&metrics, Some(BreakerState::Closed));
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        for labels in IMPOSSIBLE {
            assert!(
                !labels.iter().all(|label| line.contains(label)),
                "{labels:?} can never happen, yet: {line}"
            );
        }
    }
    // The possible ones are there from the start, so `rate()` sees their first request.
    let fresh = scrape(&Metrics::new(), None);
    let duration = |route: &str, destination: &str| {
        let series = format!(
            r#"iamproxy_request_duration_seconds_count{{destination="{destination}",route="{route}"}}"#
        );
        value(&fresh, &series)
    };
    assert_eq!(duration("token", "iam"), Some(0.0));
    assert_eq!(duration("other", "rails"), Some(0.0));
    assert_eq!(duration("other", "iam"), None);
}

#[test]
fn a_failed_preauthorize_connection_counts_as_its_outcome_and_a_connection_error() {
    let metrics = Metrics::new();
    let refused = PreauthError::Connect("connection refused".into());
    metrics.preauthorize(Some(&refused), Duration::from_millis(1));
    metrics.preauthorize(None, Duration::from_millis(2));
    let text = scrape(&metrics, None);
    let calls = |outcome: &str| {
        value(
            &text,
            &format!(r#"iamproxy_preauthorize_calls_total{{outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(calls("connect_error"), Some(1.0));
    assert_eq!(calls("ok"), Some(1.0));
    assert_eq!(
        value(
            &text,
            r#"iamproxy_upstream_connection_errors_total{upstream="preauthorize"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "iamproxy_preauthorize_duration_seconds_count"),
        Some(2.0)
    );
}

#[test]
fn breaker_state_gauges_show_exactly_the_current_state() {
    let metrics = Metrics::new();
    let state = |text: &str, state: &str| {
        value(
            text,
            &format!(r#"iamproxy_iam_breaker_state{{state="{state}"}}"#),
        )
    };
    let open = scrape(&metrics, Some(BreakerState::Open));
    assert_eq!(state(&open, "open"), Some(1.0));
    assert_eq!(state(&open, "closed"), Some(0.0));
    assert_eq!(state(&open, "half_open"), Some(0.0));
    let closed = scrape(&metrics, Some(BreakerState::Closed));
    assert_eq!(state(&closed, "open"), Some(0.0));
    assert_eq!(state(&closed, "closed"), Some(1.0));
    let no_iam = scrape(&metrics, None);
    for name in ["closed", "open", "half_open"] {
        assert_eq!(state(&no_iam, name), Some(0.0), "{name}");
    }
}

#[test]
fn in_flight_guard_counts_until_dropped() {
    let metrics = Metrics::new();
    let first = metrics.in_flight();
    let second = metrics.in_flight();
    assert_eq!(
        value(&scrape(&metrics, None), "iamproxy_requests_in_flight"),
        Some(2.0)
    );
    drop(first);
    drop(second);
    assert_eq!(
        value(&scrape(&metrics, None), "iamproxy_requests_in_flight"),
        Some(0.0)
    );
}

#[test]
fn each_gateway_has_its_own_registry() {
    let one = Metrics::new();
    let other = Metrics::new();
    one.cache_hit();
    assert_eq!(
        value(&scrape(&one, None), "iamproxy_decision_cache_hits_total"),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape(&other, None), "iamproxy_decision_cache_hits_total"),
        Some(0.0)
    );
}

#[test]
fn process_gauges_read_this_process() {
    let text = scrape(&Metrics::new(), None);
    if std::path::Path::new("/proc/self/status").exists() {
        let rss = value(&text, "process_resident_memory_bytes").unwrap();
        assert!(rss > 1_000_000.0, "resident memory {rss}");
        assert!(value(&text, "process_open_fds").unwrap() >= 3.0);
    } else {
        assert!(!text.contains("process_resident_memory_bytes"));
    }
}

#[test]
fn reloads_count_by_result_and_the_last_one_sets_the_success_gauge_and_time() {
    let metrics = Metrics::new();
    let text = scrape(&metrics, None);
    let started = value(
        &text,
        "iamproxy_config_last_reload_success_timestamp_seconds",
    )
    .unwrap();
    assert!(started > 1.6e9, "the start is the first successful load");
    assert_eq!(
        value(&text, "iamproxy_config_last_reload_successful"),
        Some(1.0)
    );
    for result in ReloadResult::ALL.map(ReloadResult::as_str) {
        let series = format!(r#"iamproxy_config_reloads_total{{result="{result}"}}"#);
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }

    metrics.config_reload(ReloadResult::Failure);
    metrics.config_reload(ReloadResult::Failure);
    let text = scrape(&metrics, None);
    let reloads = |text: &str, result: &str| {
        value(
            text,
            &format!(r#"iamproxy_config_reloads_total{{result="{result}"}}"#),
        )
    };
    assert_eq!(reloads(&text, "failure"), Some(2.0));
    assert_eq!(reloads(&text, "success"), Some(0.0));
    assert_eq!(
        value(&text, "iamproxy_config_last_reload_successful"),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            "iamproxy_config_last_reload_success_timestamp_seconds"
        ),
        Some(started),
        "a failure leaves the time of the last success"
    );

    std::thread::sleep(Duration::from_millis(5));
    metrics.config_reload(ReloadResult::Success);
    let text = scrape(&metrics, None);
    assert_eq!(reloads(&text, "success"), Some(1.0));
    assert_eq!(
        value(&text, "iamproxy_config_last_reload_successful"),
        Some(1.0)
    );
    let reloaded = value(
        &text,
        "iamproxy_config_last_reload_success_timestamp_seconds",
    )
    .unwrap();
    assert!(reloaded > started, "{reloaded} after {started}");
}
