//! The access line: what a request's phases found out, gathered in its exchange and
//! written once when the response headers go out.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode, Uri};

use crate::classify::Endpoint;
use crate::decision::{Destination, FallbackReason, Reason};
use crate::forward::Head;

/// Keeps the client id for the access line without copying it when it points into the
/// buffered body (the common form-body case).
pub(super) fn retain(body: &Bytes, client_id: &str) -> Bytes {
    let id = client_id.as_bytes();
    let body_range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
    let id_start = id.as_ptr() as usize;
    if body_range.contains(&id_start) && id_start + id.len() <= body_range.end {
        body.slice_ref(id)
    } else {
        Bytes::copy_from_slice(id)
    }
}

/// Header values we log are either generated or checked to be plain ASCII.
pub(super) fn log_str(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or("")
}

/// What the access line reports, gathered as the request goes through the phases.
pub(super) struct AccessLog {
    pub(super) method: Method,
    uri: Uri,
    pub(super) request_id: HeaderValue,
    route: &'static str,
    pub(super) destination: Destination,
    /// Why the decision went where it did; `None` for traffic that is not OAuth.
    pub(super) reason: Option<Reason>,
    pub(super) fallback: Option<FallbackReason>,
    pub(super) client_id: Option<Bytes>,
}

impl AccessLog {
    pub(super) fn new(head: &Head, endpoint: Option<Endpoint>) -> AccessLog {
        AccessLog {
            method: head.method.clone(),
            uri: head.uri.clone(),
            request_id: head.request_id.clone(),
            route: endpoint.map_or("other", Endpoint::as_str),
            destination: Destination::Rails,
            reason: None,
            fallback: None,
            client_id: None,
        }
    }

    /// One line per request. Only the path is logged: query strings and bodies carry
    /// codes, secrets and tokens.
    pub(super) fn emit(&self, status: StatusCode, elapsed: Duration) {
        let client_id = self
            .client_id
            .as_deref()
            .and_then(|id| std::str::from_utf8(id).ok())
            .unwrap_or("");
        tracing::info!(
            correlation_id = log_str(&self.request_id),
            method = self.method.as_str(),
            path = self.uri.path(),
            route = self.route,
            status = status.as_u16(),
            // Microsecond resolution: float noise past that helps nobody reading logs.
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
            destination = self.destination.as_str(),
            reason = self.reason.map_or("", Reason::as_str),
            fallback_reason = self.fallback.map_or("", FallbackReason::as_str),
            client_id,
            "access"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_slices_ids_borrowed_from_the_body_and_copies_others() {
        let body = Bytes::from_static(b"grant_type=x&client_id=app-1");
        let kept = retain(&body, std::str::from_utf8(&body[23..]).unwrap());
        assert_eq!(kept, "app-1");
        assert_eq!(kept.as_ptr(), body[23..].as_ptr(), "no copy");
        let elsewhere = String::from("app-1");
        let copied = retain(&body, &elsewhere);
        assert_eq!(copied, "app-1");
        assert_ne!(copied.as_ptr(), body[23..].as_ptr());
    }
}
