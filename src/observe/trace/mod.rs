//! Distributed tracing (`[tracing]`): W3C trace context in and out, and OpenTelemetry
//! spans for sampled requests, exported over OTLP/HTTP.
//!
//! With tracing on, every request gets a [`TraceContext`] ([`Tracer::start`]): the
//! client's trace when its `traceparent` is kept, a new one otherwise. Every upstream
//! request carries a `traceparent` (the pre-authorize call included), and the access and
//! decision lines its `trace_id`. A sampled request also records spans: its server span,
//! written with the access line, and a client span per upstream call ([`Hop`]).
//!
//! The spans are OTLP's own messages (`opentelemetry-proto`), built here rather than
//! through the OpenTelemetry SDK's span machinery: an unsampled request then costs two
//! random ids and one header, a sampled one a few small allocations, and the export
//! queue's drops are ours to count (`export`).

pub mod context;
mod export;
pub mod span;

use std::sync::Arc;

use hyper::header::HeaderMap;
use opentelemetry_proto::tonic::trace::v1::Span;

use crate::config::TracingConfig;
use context::{new_span_id, new_trace_id, parse_traceparent, TRACEPARENT};
pub use context::{TraceContext, TRACESTATE};
pub use export::{ExportCounters, Exporter};
pub use span::{Hop, SpanBuilder};

/// Starts each request's trace context and takes its spans. Rebuilt on reload; the
/// exporter (and its queue) carries over.
#[derive(Debug, Default)]
pub struct Tracer(Option<On>);

#[derive(Debug)]
struct On {
    /// A new trace is recorded when the last 8 bytes of its id, as a number, fall below
    /// this: `sample_ratio` of 2^64, as OpenTelemetry's `TraceIdRatioBased` sampler does,
    /// so every service sampling by ratio agrees on a trace.
    threshold: u128,
    trust_incoming: bool,
    exporter: Arc<Exporter>,
}

impl On {
    fn start(&self, headers: &HeaderMap, sent: bool, trusted_peer: bool) -> TraceContext {
        let kept = (sent && (self.trust_incoming || trusted_peer))
            .then(|| {
                let mut values = headers.get_all(&TRACEPARENT).iter();
                // Two of them are as good as none (the spec's rule).
                match (values.next(), values.next()) {
                    (Some(value), None) => parse_traceparent(value),
                    _ => None,
                }
            })
            .flatten();
        let span_id = new_span_id();
        match kept {
            Some((trace_id, parent, sampled)) => TraceContext {
                trace_id,
                span_id,
                parent: Some(parent),
                sampled,
            },
            None => {
                let trace_id = new_trace_id();
                let mut low = [0; 8];
                low.copy_from_slice(&trace_id[8..]);
                TraceContext {
                    trace_id,
                    span_id,
                    parent: None,
                    sampled: u128::from(u64::from_be_bytes(low)) < self.threshold,
                }
            }
        }
    }
}

impl Tracer {
    /// `previous`: the tracer before a reload, whose exporter is kept.
    pub fn new(
        config: Option<&TracingConfig>,
        previous: Option<&Tracer>,
        counters: impl FnOnce() -> ExportCounters,
    ) -> Tracer {
        let Some((config, collector)) = config
            .filter(|config| config.sample_ratio > 0.0)
            .and_then(|config| Some((config, config.collector.as_ref()?)))
        else {
            return Tracer(None);
        };
        let exporter = match previous.and_then(|previous| previous.0.as_ref()) {
            Some(on) => {
                on.exporter.retarget(config, collector);
                on.exporter.clone()
            }
            None => match Exporter::start(config, collector, counters()) {
                Some(exporter) => Arc::new(exporter),
                None => {
                    tracing::warn!("tracing: the span exporter could not start; tracing is off");
                    return Tracer(None);
                }
            },
        };
        // Exact for 1.0 (2^64 is above every id); a ratio as small as 2^-64 still samples.
        let threshold = (config.sample_ratio * 2f64.powi(64)) as u128;
        Tracer(Some(On {
            threshold,
            trust_incoming: config.trust_incoming,
            exporter,
        }))
    }

    /// The request's trace context, or `None` with tracing off. The client's
    /// `traceparent` (`sent` says the request has one) is kept when it is valid and the
    /// peer is trusted (`trusted_peer`, from `server.trusted_cidrs_for_propagation`) or
    /// `tracing.trust_incoming` is on; its sampled flag then decides, as the parent's does
    /// under OpenTelemetry's `ParentBased` sampler. Otherwise the trace is new and
    /// sampled by `sample_ratio`.
    #[inline]
    pub fn start(
        &self,
        headers: &HeaderMap,
        sent: bool,
        trusted_peer: bool,
    ) -> Option<TraceContext> {
        Some(self.0.as_ref()?.start(headers, sent, trusted_peer))
    }

    /// The exporter a sampled request's spans go to; `None` for one not recorded.
    #[inline]
    pub fn exporter(&self, context: Option<&TraceContext>) -> Option<Arc<Exporter>> {
        let on = self.0.as_ref()?;
        context.filter(|c| c.sampled)?;
        Some(on.exporter.clone())
    }

    /// Sends the spans still queued (at shutdown; see [`Exporter::flush`]).
    pub async fn flush(&self) {
        if let Some(on) = &self.0 {
            on.exporter.flush().await;
        }
    }

    /// Queues a finished span (never waits; see [`Exporter::push`]).
    pub fn record(&self, span: Span) {
        if let Some(on) = &self.0 {
            on.exporter.push(span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::observe::metrics::Metrics;
    use hyper::header::HeaderValue;

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn tracer(tracing: &str) -> Tracer {
        let config = Config::from_toml(&format!(
            "[rails]\nurl = \"http://127.0.0.1:1\"\n[tracing]\n{tracing}\n"
        ))
        .unwrap();
        let metrics = Metrics::new();
        Tracer::new(config.tracing.as_ref(), None, || metrics.tracing())
    }

    fn on(extra: &str) -> Tracer {
        tracer(&format!("otlp_endpoint = \"http://127.0.0.1:1\"\n{extra}"))
    }

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(&TRACEPARENT, HeaderValue::from_static(value));
        }
        headers
    }

    #[tokio::test]
    async fn a_zero_ratio_or_no_collector_is_off() {
        let client = headers(&[CLIENT]);
        for off in [
            tracer("sample_ratio = 0.0\notlp_endpoint = \"http://127.0.0.1:1\""),
            tracer("service_name = \"x\""),
            Tracer::default(),
        ] {
            assert_eq!(off.start(&client, true, true), None);
        }
    }

    #[tokio::test]
    async fn new_traces_are_sampled_by_ratio_of_their_ids() {
        let all = on("sample_ratio = 1.0");
        let none = HeaderMap::new();
        assert!((0..1000).all(|_| all.start(&none, false, false).unwrap().sampled));
        let tenth = on("sample_ratio = 0.1");
        let sampled = (0..10_000)
            .filter(|_| tenth.start(&none, false, false).unwrap().sampled)
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 10000 at 0.1");
        let context = tenth.start(&none, false, false).unwrap();
        assert_eq!(context.parent, None);
        assert_ne!(context.trace_id, [0; 16]);
    }

    #[tokio::test]
    async fn a_clients_context_is_kept_and_its_flag_decides() {
        let tracer = on("sample_ratio = 0.000001");
        let kept = tracer.start(&headers(&[CLIENT]), true, false).unwrap();
        let (trace_id, parent, _) = parse_traceparent(&HeaderValue::from_static(CLIENT)).unwrap();
        assert_eq!((kept.trace_id, kept.parent), (trace_id, Some(parent)));
        assert!(
            kept.sampled,
            "the client's sampled flag, whatever the ratio"
        );
        assert_ne!(kept.span_id, parent, "the gateway's server span is its own");

        let unsampled = CLIENT.replace("-01", "-00");
        let mut headers_00 = HeaderMap::new();
        headers_00.insert(&TRACEPARENT, HeaderValue::from_str(&unsampled).unwrap());
        let all = on("sample_ratio = 1.0");
        assert!(!all.start(&headers_00, true, false).unwrap().sampled);
    }

    #[tokio::test]
    async fn without_trust_only_a_trusted_peers_context_is_kept() {
        let tracer = on("sample_ratio = 1.0\ntrust_incoming = false");
        let client = headers(&[CLIENT]);
        let untrusted = tracer.start(&client, true, false).unwrap();
        assert_eq!(untrusted.parent, None);
        let trusted = tracer.start(&client, true, true).unwrap();
        assert!(trusted.parent.is_some());
    }

    #[tokio::test]
    async fn two_traceparents_are_as_good_as_none() {
        let tracer = on("sample_ratio = 1.0");
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let started = tracer
            .start(&headers(&[CLIENT, other]), true, true)
            .unwrap();
        assert_eq!(started.parent, None);
    }
}
