//! Prometheus metrics, on a registry each gateway owns (never the global one), served by
//! the admin listener at `/metrics`.
//!
//! Every label value comes from a closed set (route, destination, method, status class,
//! reason, outcome), never from the request: no client id and no raw path can reach a
//! label. The request path records through [`Family`], which resolves each label
//! combination to its child once and then only indexes an array: no hashing, no lock and
//! no label string per request.
//!
//! Gauges describing state that lives elsewhere (cache entries, breaker state, process
//! memory) are read at scrape time, not maintained on the request path.

use std::time::Duration;

use hyper::{Method, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::family::{register, Family};
use super::process::ProcessGauges;
use crate::classify::{route_label, Endpoint};
use crate::decision::preauth::{Outcome, PreauthError};
use crate::decision::{Decision, Destination, FallbackReason, Reason};
use crate::forward::breaker::BreakerState;
use crate::forward::client::Upstream;

/// `route` label values: the OAuth endpoints in [`Endpoint::ALL`] order, then `other`.
const ROUTES: usize = Endpoint::ALL.len() + 1;
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The decisions that can happen, exported at 0 from start-up so that `rate()` sees the
/// first one.
const POSSIBLE_DECISIONS: [(Destination, Reason); 16] = [
    (Destination::Iam, Reason::Continuity),
    (Destination::Rails, Reason::RailsIssued),
    (Destination::Iam, Reason::KillSwitch),
    (Destination::Iam, Reason::ForceIam),
    (Destination::Iam, Reason::Percentage),
    (Destination::Rails, Reason::KillSwitch),
    (Destination::Rails, Reason::ForceRails),
    (Destination::Iam, Reason::Cache),
    (Destination::Iam, Reason::Preauthorize),
    (Destination::Rails, Reason::Cache),
    (Destination::Rails, Reason::Preauthorize),
    (Destination::Iam, Reason::Stale),
    (Destination::Rails, Reason::Stale),
    (Destination::Rails, Reason::UnknownClient),
    (Destination::Rails, Reason::PreauthorizeError),
    (Destination::Rails, Reason::IamDisabled),
];
/// 1 ms to 60 s: a cached OAuth request takes about a millisecond, `rails.timeout`
/// defaults to a minute.
const REQUEST_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// 0.5 ms to 2 s: a healthy pre-authorize answer takes a few milliseconds,
/// `preauthorize.timeout` defaults to 500 ms.
const PREAUTH_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
];

/// The gateway's metrics. Recording methods take plain enums and are lock-free.
pub struct Metrics {
    registry: Registry,
    requests: Family<IntCounter, 4>,
    request_duration: Family<Histogram, 2>,
    in_flight: IntGauge,
    decisions: Family<IntCounter, 2>,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    cache_entries: IntGauge,
    preauth_calls: [IntCounter; 5],
    preauth_duration: Histogram,
    fallbacks: [IntCounter; 4],
    breaker_state: [IntGauge; 3],
    breaker_opens: IntCounter,
    connection_errors: [IntCounter; 3],
    process: Option<ProcessGauges>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("iamproxy_build_info", "Always 1; the version as a label."),
                &["version"],
            ),
        );
        build_info.with_label_values(&[crate::VERSION]).set(1);

        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_requests_total",
                    "Requests answered, by route, the upstream that served them (a fallback \
                     counts as rails), method and status class.",
                ),
                &["route", "destination", "method", "status_class"],
            ),
        );
        let request_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "iamproxy_request_duration_seconds",
                    "Time from the request's arrival to its response headers, by route and \
                     the upstream that served it.",
                )
                .buckets(REQUEST_BUCKETS.to_vec()),
                &["route", "destination"],
            ),
        );
        let request_duration = Family::new(request_duration, ROUTES * Destination::ALL.len());
        for endpoint in Endpoint::ALL.map(Some).into_iter().chain([None]) {
            for destination in Destination::ALL {
                let index = duration_index(route_index(endpoint), destination);
                request_duration.get(index, || [route_label(endpoint), destination.as_str()]);
            }
        }

        let decisions = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_routing_decisions_total",
                    "Routing decisions for OAuth requests, by destination and reason.",
                ),
                &["destination", "reason"],
            ),
        );
        let decisions = Family::new(decisions, Destination::ALL.len() * Reason::ALL.len());
        for (destination, reason) in POSSIBLE_DECISIONS {
            decisions.get(decision_index(destination, reason), || {
                [destination.as_str(), reason.as_str()]
            });
        }

        let preauth_calls = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_preauthorize_calls_total",
                    "Calls to the pre-authorize backend, by outcome.",
                ),
                &["outcome"],
            ),
        );
        let fallbacks = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_fallbacks_total",
                    "IAM-bound requests replayed to Rails, by reason.",
                ),
                &["reason"],
            ),
        );
        let breaker_state = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "iamproxy_iam_breaker_state",
                    "1 for the IAM circuit breaker's current state, 0 for the others \
                     (all 0 without [iam]).",
                ),
                &["state"],
            ),
        );
        let connection_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_upstream_connection_errors_total",
                    "Requests to an upstream that failed before response headers: refused, \
                     reset or closed connections.",
                ),
                &["upstream"],
            ),
        );

        Metrics {
            requests: Family::new(
                requests,
                ROUTES * Destination::ALL.len() * METHODS.len() * STATUS_CLASSES.len(),
            ),
            request_duration,
            in_flight: register(
                &registry,
                IntGauge::new("iamproxy_requests_in_flight", "Requests being handled now."),
            ),
            decisions,
            cache_hits: register(
                &registry,
                IntCounter::new(
                    "iamproxy_decision_cache_hits_total",
                    "Decision lookups answered from the cache, or by a concurrent request's \
                     backend call.",
                ),
            ),
            cache_misses: register(
                &registry,
                IntCounter::new(
                    "iamproxy_decision_cache_misses_total",
                    "Decision lookups that called the pre-authorize backend.",
                ),
            ),
            cache_entries: register(
                &registry,
                IntGauge::new("iamproxy_decision_cache_entries", "Decisions in the cache."),
            ),
            preauth_calls: Outcome::ALL
                .map(|outcome| preauth_calls.with_label_values(&[outcome.as_str()])),
            preauth_duration: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "iamproxy_preauthorize_duration_seconds",
                        "Duration of pre-authorize calls, whatever their outcome.",
                    )
                    .buckets(PREAUTH_BUCKETS.to_vec()),
                ),
            ),
            fallbacks: FallbackReason::ALL
                .map(|reason| fallbacks.with_label_values(&[reason.as_str()])),
            breaker_state: BreakerState::ALL
                .map(|state| breaker_state.with_label_values(&[state.as_str()])),
            breaker_opens: register(
                &registry,
                IntCounter::new(
                    "iamproxy_iam_breaker_opens_total",
                    "Times the IAM circuit breaker opened, re-opening after a failed probe \
                     included.",
                ),
            ),
            connection_errors: Upstream::ALL
                .map(|upstream| connection_errors.with_label_values(&[upstream.as_str()])),
            process: ProcessGauges::register(&registry),
            registry,
        }
    }

    /// Counts a request as in flight until the guard is dropped, which happens even when
    /// the client goes away mid-request.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// One answered request.
    pub fn request(
        &self,
        endpoint: Option<Endpoint>,
        destination: Destination,
        method: &Method,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let route = route_index(endpoint);
        let method = method_index(method);
        let class = status_class_index(status);
        let index = ((duration_index(route, destination)) * METHODS.len() + method)
            * STATUS_CLASSES.len()
            + class;
        self.requests
            .get(index, || {
                [
                    route_label(endpoint),
                    destination.as_str(),
                    METHODS[method],
                    STATUS_CLASSES[class],
                ]
            })
            .inc();
        self.request_duration
            .get(duration_index(route, destination), || {
                [route_label(endpoint), destination.as_str()]
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn decision(&self, decision: Decision) {
        let Decision {
            destination,
            reason,
        } = decision;
        self.decisions
            .get(decision_index(destination, reason), || {
                [destination.as_str(), reason.as_str()]
            })
            .inc();
    }

    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    /// One pre-authorize call; a connection failure also counts as a connection error.
    pub fn preauthorize(&self, error: Option<&PreauthError>, elapsed: Duration) {
        let outcome = error.map_or(Outcome::Ok, PreauthError::outcome);
        self.preauth_calls[outcome as usize].inc();
        if matches!(error, Some(PreauthError::Connect(_))) {
            self.connection_error(Upstream::Preauthorize);
        }
        self.preauth_duration.observe(elapsed.as_secs_f64());
    }

    pub fn fallback(&self, reason: FallbackReason) {
        self.fallbacks[reason as usize].inc();
    }

    pub fn breaker_opened(&self) {
        self.breaker_opens.inc();
    }

    pub fn connection_error(&self, upstream: Upstream) {
        self.connection_errors[upstream as usize].inc();
    }

    /// The text exposition, after reading the state-describing gauges. `breaker` is
    /// `None` when no IAM is configured.
    pub fn render(&self, cache_entries: u64, breaker: Option<BreakerState>) -> Vec<u8> {
        self.cache_entries
            .set(i64::try_from(cache_entries).unwrap_or(i64::MAX));
        for (state, gauge) in BreakerState::ALL.into_iter().zip(&self.breaker_state) {
            gauge.set(i64::from(breaker == Some(state)));
        }
        if let Some(process) = &self.process {
            process.update();
        }
        let mut text = Vec::with_capacity(16 * 1024);
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            tracing::warn!(error = %error, "cannot encode metrics");
        }
        text
    }
}

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Decrements the in-flight gauge when dropped.
pub struct InFlight<'a>(&'a IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn route_index(endpoint: Option<Endpoint>) -> usize {
    endpoint.map_or(ROUTES - 1, |endpoint| endpoint as usize)
}

fn duration_index(route: usize, destination: Destination) -> usize {
    route * Destination::ALL.len() + destination as usize
}

fn decision_index(destination: Destination, reason: Reason) -> usize {
    destination as usize * Reason::ALL.len() + reason as usize
}

fn method_index(method: &Method) -> usize {
    METHODS[..METHODS.len() - 1]
        .iter()
        .position(|known| *known == method.as_str())
        .unwrap_or(METHODS.len() - 1)
}

fn status_class_index(status: StatusCode) -> usize {
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

#[cfg(test)]
mod tests {
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
        ];
        assert_eq!(positions, [true; 6]);
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
        let duration =
            r#"iamproxy_request_duration_seconds_bucket{destination="iam",route="token""#;
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
        let version = format!(r#"iamproxy_build_info{{version="{}"}}"#, crate::VERSION);
        assert_eq!(value(&text, &version), Some(1.0));
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
}
