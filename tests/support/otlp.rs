//! An OTLP/HTTP trace receiver on loopback, for the tests of `[tracing]`: it takes what an
//! exporter POSTs to `/v1/traces` (`application/x-protobuf`, one
//! `ExportTraceServiceRequest` per request), decodes it with OpenTelemetry's own message
//! definitions (the `opentelemetry-proto` crate) and keeps every span with the
//! `service.name` of its resource.
//!
//! Self-contained (no `super::` items), so the same file serves the integration tests
//! (`support::otlp`, or `#[path = "support/otlp.rs"] mod otlp;`) and the receiver binary
//! the end-to-end suite starts (`examples/otlp_receiver.rs`).
//!
//! What it answers:
//! - `POST /v1/traces` with `Content-Type: application/x-protobuf` (parameters ignored) and
//!   no content coding: 200 with an empty `ExportTraceServiceResponse` (protobuf), the
//!   spans kept. An undecodable body gets 400, a body over [`MAX_BODY`] 413.
//! - any other content type, or a `Content-Encoding` other than `identity`: 415; another
//!   method on `/v1/traces`: 405; any other path: 404.
//! - `GET /spans`: every span kept, as JSON (see [`ReceivedSpan::to_json`]), for the
//!   end-to-end suite.
//!
//! [`Collector::set_status`] makes it answer exports with a given status instead (503: a
//! collector that is down for a while), keeping nothing. [`Collector::requests`] counts
//! every `POST /v1/traces`, whatever the answer; [`Collector::rejected`] the requests it
//! refused itself (404, 405, 413, 415, 400), which an exporter that speaks OTLP/HTTP never
//! gets.
#![allow(dead_code)] // each user takes a different part of this module

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Where OTLP/HTTP exporters send traces (the specification's default path).
pub const TRACES_PATH: &str = "/v1/traces";
/// The media type of OTLP/HTTP's binary protobuf encoding.
pub const PROTOBUF: &str = "application/x-protobuf";
/// The largest export body taken (larger ones get 413).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// One span as received: the decoded OTLP span and the `service.name` of its resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The resource's `service.name` attribute; empty when the resource had none.
    pub service_name: String,
    pub span: Span,
}

impl ReceivedSpan {
    /// 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// 16 lowercase hex digits, or an empty string for a root span.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    pub fn name(&self) -> &str {
        &self.span.name
    }

    /// `SpanKind::Unspecified` for a value outside the enum.
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// The span's attribute `key` as text (see [`render`]), or None when it has none.
    pub fn attr(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }

    /// `Unset` when the span carries no status.
    pub fn status_code(&self) -> SpanStatusCode {
        self.span
            .status
            .as_ref()
            .and_then(|s| SpanStatusCode::try_from(s.code).ok())
            .unwrap_or(SpanStatusCode::Unset)
    }

    /// The status message (empty when none).
    pub fn status_message(&self) -> &str {
        self.span.status.as_ref().map_or("", |s| s.message.as_str())
    }

    /// Whether this span is a child of `parent`: same trace, and its parent is that span.
    pub fn is_child_of(&self, parent: &ReceivedSpan) -> bool {
        self.span.trace_id == parent.span.trace_id
            && !self.span.parent_span_id.is_empty()
            && self.span.parent_span_id == parent.span.span_id
    }

    /// Every attribute, rendered as text (see [`render`]).
    pub fn attributes(&self) -> BTreeMap<String, String> {
        self.span
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map(render).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// `{service_name, trace_id, span_id, parent_span_id, trace_state, name, kind,
    /// attributes: {k: "v"}, status: {code, message}}`; `kind` and `status.code` are the
    /// protobuf enum names (`SPAN_KIND_SERVER`, `STATUS_CODE_ERROR`), ids lowercase hex (the
    /// parent's empty for a root span), `trace_state` the W3C `tracestate` as exported.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "service_name": self.service_name,
            "trace_id": self.trace_id(),
            "span_id": self.span_id(),
            "parent_span_id": self.parent_span_id(),
            "trace_state": self.span.trace_state,
            "name": self.name(),
            "kind": self.kind().as_str_name(),
            "attributes": self.attributes(),
            "status": {
                "code": self.status_code().as_str_name(),
                "message": self.status_message(),
            },
        })
    }
}

/// One line, for failure messages: `service kind "name" trace=… span=… parent=… {attrs}`.
impl fmt::Display for ReceivedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parent = self.parent_span_id();
        write!(
            f,
            "{} {} {:?} trace={} span={} parent={} {:?}",
            self.service_name,
            self.kind().as_str_name(),
            self.name(),
            self.trace_id(),
            self.span_id(),
            if parent.is_empty() { "-" } else { &parent },
            self.attributes(),
        )
    }
}

/// Every span, one per line (see `Display for ReceivedSpan`).
pub fn describe(spans: &[ReceivedSpan]) -> String {
    if spans.is_empty() {
        return "(no spans)".to_owned();
    }
    spans
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// An attribute value as text: strings as they are, integers and doubles in decimal,
/// booleans `true`/`false`, bytes in lowercase hex, arrays `[a, b]`, key-value lists
/// `{k=v, …}`, an empty value as the empty string.
pub fn render(value: &AnyValue) -> String {
    match &value.value {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(render).collect();
            format!("[{}]", items.join(", "))
        }
        Some(Value::KvlistValue(list)) => {
            let items: Vec<String> = list
                .values
                .iter()
                .map(|kv| {
                    format!(
                        "{}={}",
                        kv.key,
                        kv.value.as_ref().map(render).unwrap_or_default()
                    )
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        // Only profiles' dictionaries use string indexes; a trace export never should.
        Some(Value::StringValueStrindex(i)) => format!("strindex:{i}"),
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| kv.value.as_ref().map(render).unwrap_or_default())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every span of one export, each with its resource's `service.name`.
pub fn spans_of(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service_name = resource_spans
            .resource
            .as_ref()
            .and_then(|r| attribute(&r.attributes, "service.name"))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                out.push(ReceivedSpan {
                    service_name: service_name.clone(),
                    span,
                });
            }
        }
    }
    out
}

#[derive(Default)]
struct State {
    spans: Mutex<Vec<ReceivedSpan>>,
    /// Every POST to /v1/traces, whatever it was answered.
    requests: AtomicUsize,
    /// Requests refused by the receiver itself (404, 405, 413, 415, 400).
    rejected: AtomicUsize,
    /// Answer exports with this status instead, keeping nothing.
    status: Mutex<Option<u16>>,
}

/// The receiver: listens on 127.0.0.1 (a port picked by the system) from `start` until it
/// is dropped, which closes the listener and every open connection.
pub struct Collector {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let serving = state.clone();
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it (on drop) aborts every connection too.
            let mut connections = JoinSet::new();
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                };
                // Reap the finished ones so the set does not grow over a long run.
                while connections.try_join_next().is_some() {}
                let state = serving.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(serve(&state, request).await) }
                    });
                    // HTTP/1.1, and HTTP/2 with prior knowledge, as the exporter speaks.
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1/traces`: what `[tracing] otlp_endpoint` names.
    pub fn endpoint(&self) -> String {
        format!("http://{}{TRACES_PATH}", self.addr)
    }

    /// Every span received so far, in the order received.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.spans.lock().unwrap().clone()
    }

    /// Forgets the spans received so far (the counters stay).
    pub fn clear(&self) {
        self.state.spans.lock().unwrap().clear();
    }

    /// `POST /v1/traces` requests received, whatever they were answered.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests the receiver refused itself: wrong path, method or content type, a body
    /// too large or not an `ExportTraceServiceRequest`.
    pub fn rejected(&self) -> usize {
        self.state.rejected.load(Ordering::SeqCst)
    }

    /// `Some(status)`: answer every export with `status` (e.g. 503), empty, keeping
    /// nothing; `None`: accept exports again.
    pub fn set_status(&self, status: Option<u16>) {
        if let Some(code) = status {
            assert!(StatusCode::from_u16(code).is_ok(), "not a status: {code}");
        }
        *self.state.status.lock().unwrap() = status;
    }

    /// Waits until `check` holds for the spans received, polling every 20 ms, and returns
    /// them; after `within`, fails the test with `what` and every span it had.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        check: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let spans = self.spans();
            if check(&spans) {
                return spans;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{what}: not within {within:?}; the receiver had {} span(s) from {} export(s), {} rejected:\n{}",
                    spans.len(),
                    self.requests(),
                    self.rejected(),
                    describe(&spans)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collector")
            .field("endpoint", &self.endpoint())
            .field("requests", &self.requests())
            .field("rejected", &self.rejected())
            .finish()
    }
}

async fn serve(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/spans" && request.method() == Method::GET {
        let spans: Vec<serde_json::Value> = state
            .spans
            .lock()
            .unwrap()
            .iter()
            .map(ReceivedSpan::to_json)
            .collect();
        let body = serde_json::to_vec(&spans).unwrap();
        return reply(StatusCode::OK, "application/json", body);
    }
    if path != TRACES_PATH {
        return refuse(state, StatusCode::NOT_FOUND, "not found");
    }
    if request.method() != Method::POST {
        let mut response = refuse(state, StatusCode::METHOD_NOT_ALLOWED, "POST only");
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, "POST".parse().unwrap());
        return response;
    }
    state.requests.fetch_add(1, Ordering::SeqCst);

    let headers = request.headers();
    let media_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some(PROTOBUF) {
        return refuse(
            state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/x-protobuf only",
        );
    }
    let coding = headers.get(CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    if coding.is_some_and(|c| !c.trim().eq_ignore_ascii_case("identity")) {
        return refuse(
            state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "no content coding",
        );
    }

    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return refuse(state, StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    // The status set for a failing collector wins over decoding: such a collector keeps
    // nothing, whatever it was sent.
    if let Some(code) = *state.status.lock().unwrap() {
        return reply(
            StatusCode::from_u16(code).unwrap(),
            "text/plain",
            Vec::new(),
        );
    }
    let export = match ExportTraceServiceRequest::decode(body) {
        Ok(export) => export,
        Err(err) => {
            return refuse(
                state,
                StatusCode::BAD_REQUEST,
                &format!("not an ExportTraceServiceRequest: {err}"),
            )
        }
    };
    state.spans.lock().unwrap().extend(spans_of(export));
    reply(
        StatusCode::OK,
        PROTOBUF,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn refuse(state: &State, status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    state.rejected.fetch_add(1, Ordering::SeqCst);
    reply(status, "text/plain", why.as_bytes().to_vec())
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}
