//! The client span of each upstream call a sampled request makes: to Rails (a replay
//! included), to IAM, to the pre-authorize backend. The server span is the access line's
//! twin ([`super::access`]).

use hyper::{Method, Response, StatusCode};

use crate::config::UpstreamAddress;
use crate::decision::FallbackReason;
use crate::forward::client::{Upstream, UpstreamBody};
use crate::forward::{Head, UpstreamError};
use crate::observe::trace::{Hop, SpanBuilder, TraceContext};
use crate::state::AppState;

/// The call to `upstream` at `address` that `hop` timed, with what it ended in.
/// `request`: the method and path sent, when they are not the client's.
pub(super) fn record(
    state: &AppState,
    head: &Head,
    hop: Option<Box<Hop>>,
    upstream: Upstream,
    address: &UpstreamAddress,
    request: Option<(&Method, &str)>,
    end: impl FnOnce(SpanBuilder) -> SpanBuilder,
) {
    let (Some(hop), Some(context)) = (hop, &head.trace) else {
        return;
    };
    let (method, path) = request.unwrap_or((&head.method, head.uri.path()));
    let span = SpanBuilder::client(context, &hop, upstream.as_str(), method, path, address);
    state.tracer.record(end(span).end());
}

/// A span for each upstream call of this request, if it is recorded.
pub(super) fn hop(head: &Head) -> Option<Box<Hop>> {
    head.trace.as_ref().and_then(TraceContext::hop)
}

/// An exchange with Rails or IAM: the response's status, or why there was none.
pub(super) fn exchanged(
    span: SpanBuilder,
    sent: &Result<Response<UpstreamBody>, UpstreamError>,
) -> SpanBuilder {
    match sent {
        Ok(response) => status(span, response.status()),
        Err(UpstreamError::Timeout) => span.error("timeout", "no response headers in time"),
        Err(UpstreamError::Connect(error)) => span.error("connect_error", error.as_str()),
        Err(UpstreamError::Saturated) => {
            span.error("saturated", "every connection busy for the connect timeout")
        }
    }
}

/// A Rails call replaying a request IAM failed.
pub(super) fn replay(span: SpanBuilder, replay: Option<FallbackReason>) -> SpanBuilder {
    match replay {
        Some(reason) => span
            .bool("iamproxy.replay", true)
            .str("iamproxy.fallback_reason", reason.as_str()),
        None => span,
    }
}

/// `http.response.status_code`; a 5xx also ends the span in error, its status as
/// `error.type` (the semantic conventions' rule for HTTP spans).
pub(super) fn status(span: SpanBuilder, status: StatusCode) -> SpanBuilder {
    let span = span.status(status);
    match status.is_server_error() {
        true => span.error(status.as_str(), ""),
        false => span,
    }
}
