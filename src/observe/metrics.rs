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

use std::time::{Duration, SystemTime};

use hyper::{Method, StatusCode};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::family::{register, Family};
use super::process::ProcessGauges;
use super::trace::ExportCounters;
use crate::classify::{route_label, Endpoint};
use crate::decision::cache::{SharedCounters, SharedOutcome};
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
    fallbacks: [IntCounter; 5],
    breaker_state: [IntGauge; 3],
    breaker_opens: IntCounter,
    connection_errors: [IntCounter; 3],
    saturated: [IntCounter; 3],
    shared_cache: SharedCounters,
    tracing: ExportCounters,
    process: Option<ProcessGauges>,
    reloads: ReloadGauges,
}

/// How the last configuration reloads went (SIGHUP): Prometheus' own
/// `prometheus_config_last_reload_*` trio, so the same alert shape applies.
struct ReloadGauges {
    last_successful: IntGauge,
    last_success_time: Gauge,
    total: [IntCounter; 2],
}

/// How a configuration reload ended: the `result` label of `iamproxy_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The file was valid and is now the running configuration.
    Success,
    /// The file could not be read or was invalid: the running configuration stays.
    Failure,
}

impl ReloadResult {
    /// In declaration order: the counters are indexed by `result as usize`.
    pub const ALL: [ReloadResult; 2] = [ReloadResult::Success, ReloadResult::Failure];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        }
    }
}

impl ReloadGauges {
    /// The configuration the process started with counts as the first successful load.
    fn register(registry: &Registry) -> ReloadGauges {
        let total = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_config_reloads_total",
                    "Configuration reloads (SIGHUP), by result: success or failure.",
                ),
                &["result"],
            ),
        );
        let gauges = ReloadGauges {
            last_successful: register(
                registry,
                IntGauge::new(
                    "iamproxy_config_last_reload_successful",
                    "1 when the last configuration reload (or the start) succeeded, 0 when it \
                     failed and the running configuration is not the file on disk.",
                ),
            ),
            last_success_time: register(
                registry,
                Gauge::new(
                    "iamproxy_config_last_reload_success_timestamp_seconds",
                    "When the running configuration was loaded (start or reload), in seconds \
                     since the Unix epoch.",
                ),
            ),
            total: ReloadResult::ALL.map(|result| total.with_label_values(&[result.as_str()])),
        };
        gauges.last_successful.set(1);
        gauges.last_success_time.set(unix_now());
        gauges
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
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
                Opts::new(
                    "iamproxy_build_info",
                    "Always 1; the version and the git commit as labels.",
                ),
                &["version", "commit"],
            ),
        );
        build_info
            .with_label_values(&[crate::VERSION, crate::COMMIT])
            .set(1);

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
            // A series that can never move would only mislead a dashboard.
            for destination in Destination::ALL
                .into_iter()
                .filter(|d| can_serve(endpoint, *d))
            {
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
        let saturated = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_upstream_saturated_total",
                    "Requests that found every one of the upstream's max_connections \
                     connections busy for its connect timeout, and were not sent.",
                ),
                &["upstream"],
            ),
        );

        let shared_lookups = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_shared_cache_lookups_total",
                    "Local decision cache misses looked up in the shared cache in Redis, by \
                     outcome (error includes lookups skipped while Redis recovers from one).",
                ),
                &["outcome"],
            ),
        );
        let shared_cache = SharedCounters {
            lookups: SharedOutcome::ALL
                .map(|outcome| shared_lookups.with_label_values(&[outcome.as_str()])),
            fills: register(
                &registry,
                IntCounter::new(
                    "iamproxy_shared_cache_fills_total",
                    "Pre-authorize answers this instance wrote to the shared cache in Redis.",
                ),
            ),
        };

        let dropped_spans = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "iamproxy_tracing_spans_dropped_total",
                    "Spans not exported, by reason: queue_full (the export queue was full) or \
                     export_failed (the collector did not take their batch).",
                ),
                &["reason"],
            ),
        );
        let tracing = ExportCounters {
            exported: register(
                &registry,
                IntCounter::new(
                    "iamproxy_tracing_spans_exported_total",
                    "Spans the OTLP collector accepted.",
                ),
            ),
            dropped_queue_full: dropped_spans.with_label_values(&["queue_full"]),
            dropped_export_failed: dropped_spans.with_label_values(&["export_failed"]),
        };

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
            saturated: Upstream::ALL
                .map(|upstream| saturated.with_label_values(&[upstream.as_str()])),
            shared_cache,
            tracing,
            process: ProcessGauges::register(&registry),
            reloads: ReloadGauges::register(&registry),
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

    /// The counter `upstream`'s pool increments when it gives up waiting for a connection.
    pub fn saturated(&self, upstream: Upstream) -> IntCounter {
        self.saturated[upstream as usize].clone()
    }

    /// One configuration reload, and how it ended.
    pub fn config_reload(&self, result: ReloadResult) {
        let reloads = &self.reloads;
        reloads.total[result as usize].inc();
        reloads
            .last_successful
            .set(i64::from(result == ReloadResult::Success));
        if result == ReloadResult::Success {
            reloads.last_success_time.set(unix_now());
        }
    }

    /// The counters the shared decision cache increments.
    /// The span exporter's counters (see [`crate::observe::trace`]).
    pub fn tracing(&self) -> ExportCounters {
        self.tracing.clone()
    }

    pub fn shared_cache(&self) -> SharedCounters {
        self.shared_cache.clone()
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

/// Whether a request to `endpoint` (`None`: any other path) can end at `destination`: only
/// the OAuth endpoints are ever routed to IAM, everything else passes through to Rails.
fn can_serve(endpoint: Option<Endpoint>, destination: Destination) -> bool {
    endpoint.is_some() || destination == Destination::Rails
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
mod tests;
