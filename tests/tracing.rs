//! `[tracing]` (issue 18): the span tree a request leaves in a real OTLP/HTTP receiver
//! (decoded with `opentelemetry-proto`) for a cache miss, an IAM fallback and a request the
//! open breaker sends to Rails; W3C trace context kept from the client or started anew,
//! and sent on every upstream request; a collector that fails never failing a request.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use support::metrics::scrape;
use support::otlp::{Collector, ReceivedSpan};
use support::{gateway, refused_addr, send, Answer, GatewayBuilder, Reply, TestGateway};

const WITHIN: Duration = Duration::from_secs(5);
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Every request recorded, to `collector`.
fn traced(collector: &Collector) -> GatewayBuilder {
    gateway().set(
        "tracing",
        &format!(
            "otlp_endpoint = \"{}\"\nsample_ratio = 1.0\nservice_name = \"gateway-under-test\"",
            collector.endpoint()
        ),
    )
}

/// A client-credentials token request for `app-1`, its secret in the form body.
fn token_request(gw: &TestGateway, traceparent: Option<&str>) -> Request<Full<Bytes>> {
    let mut request = Request::post(gw.url("/oauth/token?state=q-secret"))
        .header("host", "gitlab.example.com")
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(traceparent) = traceparent {
        request = request
            .header("traceparent", traceparent)
            .header("tracestate", "vendor=opaque");
    }
    let body = "grant_type=client_credentials&client_id=app-1&client_secret=s3cret-value";
    request
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A request that is not OAuth: passed through to Rails.
fn pass_through(gw: &TestGateway) -> Request<Full<Bytes>> {
    Request::get(gw.url("/api/v4/projects"))
        .body(Full::default())
        .unwrap()
}

/// The spans of the one trace that has a server span named `name`, once it has `count`.
async fn trace_of(collector: &Collector, name: &str, count: usize) -> Vec<ReceivedSpan> {
    let find = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        let Some(server) = spans
            .iter()
            .find(|s| s.name() == name && s.kind() == SpanKind::Server)
        else {
            return Vec::new();
        };
        let trace = server.trace_id();
        spans
            .iter()
            .filter(|s| s.trace_id() == trace)
            .cloned()
            .collect()
    };
    let spans = collector
        .wait_for(WITHIN, &format!("{count} spans of {name:?}"), |spans| {
            find(spans).len() >= count
        })
        .await;
    let trace = find(&spans);
    assert_eq!(trace.len(), count, "{trace:#?}");
    trace
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name() == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {spans:#?}");
    found[0]
}

fn attr(span: &ReceivedSpan, key: &str) -> String {
    span.attr(key)
        .unwrap_or_else(|| panic!("{} has no {key}: {span:#?}", span.name()))
}

/// The traceparent an upstream received: `00-<trace>-<span>-<flags>`.
fn traceparent_of(recorded: &support::Recorded) -> (String, String, String) {
    let value = recorded.headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// No attribute carries the client's secret, its id (the log is off here), or a query value.
fn assert_nothing_leaked(spans: &[ReceivedSpan]) {
    for span in spans {
        for (key, value) in span.attributes() {
            for secret in ["s3cret-value", "app-1", "q-secret"] {
                assert!(
                    !value.contains(secret),
                    "{}: {key} = {value} leaks {secret}",
                    span.name()
                );
            }
        }
    }
}

fn assert_served(answer: &Answer, by: &str) {
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.served_by(), by);
}

#[tokio::test]
async fn a_cache_miss_records_the_request_the_preauthorize_call_and_the_iam_attempt() {
    let collector = Collector::start().await;
    let gw = traced(&collector).start().await;
    gw.preauth.always(Reply::destination("iam"));
    assert_served(&send(token_request(&gw, None)).await, "iam");

    let spans = trace_of(&collector, "POST token", 3).await;
    let server = one(&spans, "POST token");
    let preauth = one(&spans, "POST preauthorize");
    let iam = one(&spans, "POST iam");
    assert_eq!(server.service_name, "gateway-under-test");
    assert_eq!(
        server.parent_span_id(),
        "",
        "a new trace: the server span is its root"
    );
    for (key, value) in [
        ("http.request.method", "POST"),
        ("url.path", "/oauth/token"),
        ("http.response.status_code", "200"),
        ("iamproxy.route", "token"),
        ("iamproxy.destination", "iam"),
        ("iamproxy.reason", "preauthorize"),
        ("client.address", "127.0.0.1"),
    ] {
        assert_eq!(attr(server, key), value, "server span {key}");
    }
    assert!(server.attr("iamproxy.fallback_reason").is_none());
    assert_eq!(server.status_code(), SpanStatus::Unset);

    let preauth_addr = gw.preauth.url();
    let preauth_port = preauth_addr.rsplit(':').next().unwrap();
    for child in [preauth, iam] {
        assert_eq!(child.kind(), SpanKind::Client);
        assert!(child.is_child_of(server), "{child:#?}");
        assert_eq!(attr(child, "server.address"), "127.0.0.1");
        assert_eq!(attr(child, "http.response.status_code"), "200");
        assert_eq!(attr(child, "http.request.method"), "POST");
    }
    assert_eq!(attr(preauth, "iamproxy.upstream"), "preauthorize");
    assert_eq!(attr(preauth, "url.path"), "/-/oauth/iam_routing");
    assert_eq!(attr(preauth, "server.port"), preauth_port);
    assert_eq!(attr(preauth, "iamproxy.destination"), "iam");
    assert_eq!(attr(iam, "iamproxy.upstream"), "iam");
    assert_eq!(attr(iam, "url.path"), "/oauth/token");
    // Children end before their parent, and start after it.
    for child in [preauth, iam] {
        assert!(child.span.start_time_unix_nano >= server.span.start_time_unix_nano);
        assert!(child.span.end_time_unix_nano <= server.span.end_time_unix_nano);
    }
    assert!(preauth.span.end_time_unix_nano <= iam.span.start_time_unix_nano);
    assert_nothing_leaked(&spans);

    // Each upstream was told its caller's span: IAM's and the backend's spans will be
    // children of the gateway's client spans.
    let trace = server.trace_id();
    let sent = traceparent_of(&gw.iam.last());
    assert_eq!(sent, (trace.clone(), iam.span_id(), "01".into()));
    let sent = traceparent_of(&gw.preauth.last());
    assert_eq!(sent, (trace, preauth.span_id(), "01".into()));
}

#[tokio::test]
async fn an_iam_fallback_records_the_failed_attempt_and_the_replay_to_rails() {
    let collector = Collector::start().await;
    let gw = traced(&collector)
        .set("iam.circuit_breaker", "consecutive_failures = 100")
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw.iam.always(Reply::status(503));
    assert_served(&send(token_request(&gw, None)).await, "rails");

    let spans = trace_of(&collector, "POST token", 4).await;
    let server = one(&spans, "POST token");
    let iam = one(&spans, "POST iam");
    let rails = one(&spans, "POST rails");
    one(&spans, "POST preauthorize");
    assert_eq!(attr(server, "iamproxy.destination"), "rails");
    assert_eq!(attr(server, "iamproxy.fallback_reason"), "status");
    assert_eq!(attr(server, "http.response.status_code"), "200");
    assert_eq!(attr(iam, "http.response.status_code"), "503");
    assert_eq!(attr(iam, "error.type"), "503");
    assert_eq!(iam.status_code(), SpanStatus::Error);
    assert!(rails.is_child_of(server) && iam.is_child_of(server));
    assert_eq!(attr(rails, "iamproxy.replay"), "true");
    assert_eq!(attr(rails, "iamproxy.fallback_reason"), "status");
    assert_eq!(attr(rails, "url.path"), "/oauth/token");
    assert!(iam.span.end_time_unix_nano <= rails.span.start_time_unix_nano);
    let sent = traceparent_of(&gw.rails.last());
    assert_eq!(sent, (server.trace_id(), rails.span_id(), "01".into()));
    assert_nothing_leaked(&spans);
}

#[tokio::test]
async fn an_open_breaker_sends_to_rails_with_no_iam_span_and_says_why() {
    let collector = Collector::start().await;
    let refused = refused_addr().await;
    let gw = traced(&collector)
        .iam_url(format!("http://{refused}"))
        .set(
            "iam.circuit_breaker",
            "consecutive_failures = 1\nopen_for = \"60s\"",
        )
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    // The first attempt fails to connect and opens the breaker.
    assert_served(&send(token_request(&gw, None)).await, "rails");
    let first = trace_of(&collector, "POST token", 4).await;
    let failed = one(&first, "POST iam");
    assert_eq!(attr(failed, "error.type"), "connect_error");
    assert_eq!(failed.status_code(), SpanStatus::Error);
    assert!(!failed.status_message().is_empty());
    collector.clear();

    // The second is a cache hit that the open breaker keeps from IAM.
    assert_served(&send(token_request(&gw, None)).await, "rails");
    let spans = trace_of(&collector, "POST token", 2).await;
    let server = one(&spans, "POST token");
    let rails = one(&spans, "POST rails");
    assert_eq!(attr(server, "iamproxy.reason"), "cache");
    assert_eq!(attr(server, "iamproxy.fallback_reason"), "breaker_open");
    assert_eq!(attr(rails, "iamproxy.fallback_reason"), "breaker_open");
    assert!(rails.is_child_of(server));
    assert!(
        spans.iter().all(|s| s.name() != "POST iam"),
        "nothing was sent to IAM"
    );
}

#[tokio::test]
async fn a_clients_trace_is_continued_and_its_state_sent_on() {
    let collector = Collector::start().await;
    let gw = traced(&collector).start().await;
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let request = Request::get(gw.url("/api/v4/projects"))
        .header("traceparent", &traceparent)
        .header("tracestate", "vendor=opaque")
        .body(Full::default())
        .unwrap();
    assert_served(&send(request).await, "rails");

    let spans = trace_of(&collector, "GET other", 2).await;
    let server = one(&spans, "GET other");
    let rails = one(&spans, "GET rails");
    assert_eq!(server.trace_id(), CLIENT_TRACE);
    assert_eq!(server.parent_span_id(), CLIENT_SPAN);
    assert!(rails.is_child_of(server));
    let sent = gw.rails.last();
    assert_eq!(
        traceparent_of(&sent),
        (CLIENT_TRACE.into(), rails.span_id(), "01".into())
    );
    assert_eq!(sent.headers["tracestate"], "vendor=opaque");
}

#[tokio::test]
async fn an_unsampled_clients_trace_is_sent_on_and_not_recorded() {
    let collector = Collector::start().await;
    let gw = traced(&collector).start().await;
    gw.preauth.always(Reply::destination("rails"));
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    assert_served(&send(token_request(&gw, Some(&traceparent))).await, "rails");
    let (trace, parent, flags) = traceparent_of(&gw.rails.last());
    assert_eq!((trace.as_str(), flags.as_str()), (CLIENT_TRACE, "00"));
    assert_ne!(
        parent, CLIENT_SPAN,
        "the gateway's span is the parent upstream"
    );
    let (preauth_trace, preauth_parent, _) = traceparent_of(&gw.preauth.last());
    assert_eq!(
        (preauth_trace, preauth_parent),
        (trace, parent),
        "the same server span"
    );

    // A sampled request after it is recorded, and nothing of the first.
    let sampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_served(&send(token_request(&gw, Some(&sampled))).await, "rails");
    let spans = trace_of(&collector, "POST token", 2).await;
    assert_eq!(one(&spans, "POST token").parent_span_id(), CLIENT_SPAN);
}

#[tokio::test]
async fn with_trust_incoming_off_an_untrusted_peer_starts_a_new_trace() {
    let collector = Collector::start().await;
    let gw = traced(&collector)
        .set("tracing", "trust_incoming = false")
        .start()
        .await;
    gw.preauth.always(Reply::destination("rails"));
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_served(&send(token_request(&gw, Some(&traceparent))).await, "rails");
    let spans = trace_of(&collector, "POST token", 3).await;
    let server = one(&spans, "POST token");
    assert_ne!(server.trace_id(), CLIENT_TRACE);
    assert_eq!(server.parent_span_id(), "");
    let sent = gw.rails.last();
    assert_eq!(traceparent_of(&sent).0, server.trace_id());
    assert!(
        sent.headers.get("tracestate").is_none(),
        "the state of a trace not continued is not sent"
    );
}

#[tokio::test]
async fn with_tracing_off_trace_headers_pass_untouched_and_nothing_is_added() {
    let gw = gateway().start().await;
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_served(&send(token_request(&gw, Some(&traceparent))).await, "rails");
    let sent = gw.rails.last();
    assert_eq!(sent.headers["traceparent"], traceparent.as_str());
    assert_eq!(sent.headers["tracestate"], "vendor=opaque");
    assert!(gw.preauth.last().headers.get("traceparent").is_none());

    assert_served(&send(pass_through(&gw)).await, "rails");
    assert!(gw.rails.last().headers.get("traceparent").is_none());
}

#[tokio::test]
async fn a_failing_collector_never_fails_a_request_and_its_drops_are_counted() {
    let collector = Collector::start().await;
    collector.set_status(Some(503));
    let gw = traced(&collector).start().await;
    for _ in 0..3 {
        assert_served(&send(pass_through(&gw)).await, "rails");
    }
    let dropped = ("reason", "export_failed");
    support::until(WITHIN, "spans counted as dropped", || async {
        scrape(gw.admin)
            .await
            .value("iamproxy_tracing_spans_dropped_total", &[dropped])
            >= 6.0
    })
    .await;
    assert!(collector.requests() >= 1);
    assert!(collector.spans().is_empty());

    // Back up: the next spans arrive and are counted as exported.
    collector.set_status(None);
    assert_served(&send(pass_through(&gw)).await, "rails");
    trace_of(&collector, "GET other", 2).await;
    support::until(WITHIN, "spans counted as exported", || async {
        scrape(gw.admin)
            .await
            .value("iamproxy_tracing_spans_exported_total", &[])
            >= 2.0
    })
    .await;
    let metrics = scrape(gw.admin).await;
    assert_eq!(
        metrics.value(
            "iamproxy_tracing_spans_dropped_total",
            &[("reason", "queue_full")]
        ),
        0.0
    );
}

#[tokio::test]
async fn a_collector_that_is_not_there_never_fails_a_request() {
    let refused = refused_addr().await;
    let gw = gateway()
        .set(
            "tracing",
            &format!("otlp_endpoint = \"http://{refused}\"\nsample_ratio = 1.0"),
        )
        .start()
        .await;
    assert_served(&send(pass_through(&gw)).await, "rails");
    support::until(WITHIN, "spans counted as dropped", || async {
        let metrics = scrape(gw.admin).await;
        metrics.value(
            "iamproxy_tracing_spans_dropped_total",
            &[("reason", "export_failed")],
        ) >= 2.0
    })
    .await;
}

#[tokio::test]
async fn a_reload_sends_the_next_spans_to_the_new_collector() {
    let (first, second) = (Collector::start().await, Collector::start().await);
    let gw = traced(&first).start().await;
    assert_served(&send(pass_through(&gw)).await, "rails");
    trace_of(&first, "GET other", 2).await;

    let toml = gw.toml.replace(&first.endpoint(), &second.endpoint());
    let needs_restart = gw
        .reloader
        .apply(iamproxy::Config::from_toml(&toml).unwrap());
    assert!(needs_restart.is_empty(), "{needs_restart:?}");
    assert_served(&send(pass_through(&gw)).await, "rails");
    let spans = trace_of(&second, "GET other", 2).await;
    assert_eq!(spans[0].service_name, "gateway-under-test");
}

#[tokio::test]
async fn the_last_requests_spans_are_sent_at_shutdown_without_waiting_for_their_batch() {
    let collector = Collector::start().await;
    let gw = traced(&collector).start().await;
    assert_served(&send(pass_through(&gw)).await, "rails");
    // Stopped at once: the spans are still in their second of batch delay, and the shutdown
    // sends them before it returns.
    gw.stop().await;
    let spans = collector.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
}
