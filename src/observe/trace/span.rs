//! Spans as OTLP writes them, built only for sampled requests: the client request's server
//! span and one client span per upstream call ([`Hop`]), with OpenTelemetry's semantic
//! convention attributes (`http.*`, `server.*`, `url.*`) and the gateway's own
//! (`iamproxy.*`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status, Span, Status};

use super::context::{new_span_id, SpanId, TraceContext};
use crate::config::UpstreamAddress;

/// One upstream call of a sampled request, from before it is sent: its span id names it
/// as the parent in the `traceparent` the upstream gets.
#[derive(Debug)]
pub struct Hop {
    pub span_id: SpanId,
    /// `traceparent` naming this span.
    pub traceparent: HeaderValue,
    started: SystemTime,
}

impl TraceContext {
    /// A client span for one upstream call; `None` unless the trace is recorded, and an
    /// unrecorded request's upstreams get its server span as their parent.
    /// Boxed: it waits in the request's future through the call.
    pub fn hop(&self) -> Option<Box<Hop>> {
        self.sampled.then(|| {
            let span_id = new_span_id();
            Box::new(Hop {
                traceparent: self.traceparent(&span_id),
                span_id,
                started: SystemTime::now(),
            })
        })
    }
}

/// A span being filled in; [`SpanBuilder::end`] stamps its end time.
#[derive(Debug)]
pub struct SpanBuilder(Span);

impl SpanBuilder {
    /// The request's server span, which began `elapsed` ago.
    pub fn server(context: &TraceContext, name: String, elapsed: Duration) -> SpanBuilder {
        let started = SystemTime::now().checked_sub(elapsed).unwrap_or(UNIX_EPOCH);
        SpanBuilder::new(
            context,
            context.span_id,
            context.parent,
            name,
            SpanKind::Server,
            started,
        )
    }

    /// The client span of `hop`, a child of the request's server span. `method` and
    /// `path` are the request's (never its query, which can carry codes and secrets).
    pub fn client(
        context: &TraceContext,
        hop: &Hop,
        upstream: &str,
        method: &Method,
        path: &str,
        address: &UpstreamAddress,
    ) -> SpanBuilder {
        let name = format!("{} {upstream}", method.as_str());
        let span = SpanBuilder::new(
            context,
            hop.span_id,
            Some(context.span_id),
            name,
            SpanKind::Client,
            hop.started,
        );
        let span = span
            .str("iamproxy.upstream", upstream)
            .str("http.request.method", method.as_str())
            .str("url.path", path);
        match address {
            UpstreamAddress::Url(uri) => {
                let https = uri.scheme_str() == Some("https");
                let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
                span.str("server.address", uri.host().unwrap_or(""))
                    .int("server.port", port.into())
                    .str("url.scheme", if https { "https" } else { "http" })
            }
            UpstreamAddress::Unix(path) => span
                .str("server.address", &path.to_string_lossy())
                .str("network.transport", "unix"),
        }
    }

    fn new(
        context: &TraceContext,
        span_id: SpanId,
        parent: Option<SpanId>,
        name: String,
        kind: SpanKind,
        started: SystemTime,
    ) -> SpanBuilder {
        SpanBuilder(Span {
            trace_id: context.trace_id.to_vec(),
            span_id: span_id.to_vec(),
            parent_span_id: parent.map_or_else(Vec::new, |parent| parent.to_vec()),
            // W3C trace flags: sampled.
            flags: 1,
            name,
            kind: kind as i32,
            start_time_unix_nano: unix_nanos(started),
            ..Span::default()
        })
    }

    pub fn str(self, key: &str, value: &str) -> SpanBuilder {
        self.attribute(key, Value::StringValue(value.to_owned()))
    }

    pub fn int(self, key: &str, value: i64) -> SpanBuilder {
        self.attribute(key, Value::IntValue(value))
    }

    pub fn bool(self, key: &str, value: bool) -> SpanBuilder {
        self.attribute(key, Value::BoolValue(value))
    }

    /// `http.response.status_code`.
    pub fn status(self, status: StatusCode) -> SpanBuilder {
        self.int("http.response.status_code", status.as_u16().into())
    }

    /// The span ended in error: `error.type` (a closed set, such as `timeout`) and the
    /// status description (the error's text).
    pub fn error(mut self, error_type: &str, message: impl Into<String>) -> SpanBuilder {
        self.0.status = Some(Status {
            message: message.into(),
            code: status::StatusCode::Error as i32,
        });
        self.str("error.type", error_type)
    }

    pub fn end(mut self) -> Span {
        self.0.end_time_unix_nano = unix_nanos(SystemTime::now());
        self.0
    }

    fn attribute(mut self, key: &str, value: Value) -> SpanBuilder {
        self.0.attributes.push(KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        });
        self
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}
