//! The access line: what a request's phases found out, gathered in its exchange, completed
//! when the response headers go out, and written once the response body has been sent (or
//! dropped), with labkit's fields (Workhorse's access logger) so the dashboards built on
//! Workhorse's logs read it as they read Workhorse's.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode, Uri, Version};

use super::spans;
use crate::classify::Endpoint;
use crate::config::Cidr;
use crate::decision::{Destination, FallbackReason, Reason};
use crate::forward::headers::X_FORWARDED_FOR;
use crate::forward::{Downstream, Head};
use crate::observe::logging::{json_key, Encoded};
use crate::observe::trace::context::trace_id_hex;
use crate::observe::trace::{Exporter, SpanBuilder, TraceContext};
use crate::server::connection::OnSent;

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

/// Header values we log are either generated or checked to be plain ASCII; anything else
/// (obs-text) is logged empty.
pub(super) fn log_str(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or("")
}

fn log_opt(value: &Option<HeaderValue>) -> &str {
    value.as_ref().map_or("", log_str)
}

/// `trace_id` on a request's line, with tracing on.
pub(super) fn trace_id(line: &mut Encoded, trace: Option<&TraceContext>) {
    if let Some(trace) = trace {
        let hex = trace_id_hex(&trace.trace_id);
        line.name(
            json_key!("trace_id"),
            std::str::from_utf8(&hex).unwrap_or(""),
        );
    }
}

/// What the access line reports, gathered as the request goes through the phases.
pub struct AccessLog {
    pub(super) method: Method,
    uri: Uri,
    pub(super) request_id: HeaderValue,
    route: &'static str,
    pub(super) destination: Destination,
    /// Why the decision went where it did; `None` for traffic that is not OAuth.
    pub(super) reason: Option<Reason>,
    pub(super) fallback: Option<FallbackReason>,
    pub(super) client_id: Option<Bytes>,
    /// The client's address: the peer, or for a trusted peer the first untrusted address
    /// of its `X-Forwarded-For` chain ([`remote_ip`]).
    remote_ip: HeaderValue,
    proto: &'static str,
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    referrer: Option<HeaderValue>,
    started: Instant,
    /// Known once the response headers go out ([`AccessLog::responded`]).
    status: StatusCode,
    ttfb: Duration,
    content_type: Option<HeaderValue>,
    /// With tracing on: the line's `trace_id`, and the server span's ids.
    trace: Option<TraceContext>,
    /// Where the server span goes, for a sampled request.
    spans: Option<Arc<Exporter>>,
}

impl AccessLog {
    pub(super) fn new(
        head: &Head,
        endpoint: Option<Endpoint>,
        version: Version,
        remote_ip: HeaderValue,
        started: Instant,
        spans: Option<Arc<Exporter>>,
    ) -> AccessLog {
        // Only the line reads these: a gateway logging at `warn` skips the lookups.
        let logged = is_logged();
        let header = |name| logged.then(|| head.headers.get(name).cloned()).flatten();
        AccessLog {
            method: head.method.clone(),
            uri: head.uri.clone(),
            request_id: head.request_id.clone(),
            route: endpoint.map_or("other", Endpoint::as_str),
            destination: Destination::Rails,
            reason: None,
            fallback: None,
            client_id: None,
            remote_ip,
            proto: proto(version),
            host: logged.then(|| head.host.clone()).flatten(),
            user_agent: header(header::USER_AGENT),
            referrer: header(header::REFERER),
            started,
            status: StatusCode::OK,
            ttfb: Duration::ZERO,
            content_type: None,
            trace: head.trace,
            spans,
        }
    }

    /// The response headers are going out: what the line says about them, and when.
    pub(super) fn responded(&mut self, status: StatusCode, headers: &HeaderMap, ttfb: Duration) {
        self.status = status;
        self.ttfb = ttfb;
        if is_logged() {
            self.content_type = headers.get(header::CONTENT_TYPE).cloned();
        }
    }

    /// One line per request. The query string shows its parameter names only, the
    /// referrer likewise: values carry codes, secrets and tokens.
    fn emit(&self, written: u64) {
        if !is_logged() {
            return;
        }
        let referrer = log_opt(&self.referrer);
        if self.uri.query().is_none() && referrer.is_empty() {
            // The common case: nothing to redact, nothing to write out first.
            return self.emit_with(self.uri.path(), "", written);
        }
        thread_local! {
            static TARGETS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let redacted = |targets: &mut String| {
            targets.clear();
            Target::of(&self.uri).write_to(targets);
            let split = targets.len();
            Target::url(referrer).write_to(targets);
            split
        };
        TARGETS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut targets) => {
                let split = redacted(&mut targets);
                let (uri, referrer) = targets.split_at(split);
                self.emit_with(uri, referrer, written);
            }
            Err(_) => {
                let mut targets = String::new();
                let split = redacted(&mut targets);
                let (uri, referrer) = targets.split_at(split);
                self.emit_with(uri, referrer, written);
            }
        });
    }

    fn emit_with(&self, uri: &str, referrer: &str, written: u64) {
        let client_id = self
            .client_id
            .as_deref()
            .and_then(|id| std::str::from_utf8(id).ok())
            .unwrap_or("");
        Encoded::with(|line| {
            line.str(json_key!("correlation_id"), log_str(&self.request_id))
                .name(json_key!("method"), self.method.as_str())
                .str(json_key!("path"), self.uri.path())
                .name(json_key!("route"), self.route)
                .u64(json_key!("status"), self.status.as_u16().into())
                .millis(json_key!("duration_ms"), self.started.elapsed())
                .name(json_key!("destination"), self.destination.as_str())
                .name(json_key!("reason"), self.reason.map_or("", Reason::as_str))
                .name(
                    json_key!("fallback_reason"),
                    self.fallback.map_or("", FallbackReason::as_str),
                )
                .str(json_key!("client_id"), client_id)
                .str(json_key!("remote_ip"), log_str(&self.remote_ip))
                .str(json_key!("host"), log_opt(&self.host))
                .str(json_key!("uri"), uri)
                .name(json_key!("proto"), self.proto)
                .str(json_key!("user_agent"), log_opt(&self.user_agent))
                .str(json_key!("referrer"), referrer)
                .u64(json_key!("written_bytes"), written)
                .millis(json_key!("ttfb_ms"), self.ttfb)
                .str(json_key!("content_type"), log_opt(&self.content_type));
            trace_id(line, self.trace.as_ref());
            tracing::info!(fields = ?line.pairs(), "access");
        });
    }

    /// The server span of a sampled request: what the line says, as OpenTelemetry's HTTP
    /// server attributes and the gateway's own. The client id only when the line shows it.
    fn server_span(&self, exporter: &Exporter, written: u64) {
        let Some(trace) = &self.trace else {
            return;
        };
        let name = format!("{} {}", self.method.as_str(), self.route);
        let span = SpanBuilder::server(trace, name, self.started.elapsed())
            .str("http.request.method", self.method.as_str())
            .str("url.path", self.uri.path())
            .str(
                "network.protocol.version",
                self.proto.trim_start_matches("HTTP/"),
            )
            .str("client.address", log_str(&self.remote_ip))
            .int(
                "http.response.body.size",
                i64::try_from(written).unwrap_or(i64::MAX),
            )
            .str("iamproxy.route", self.route)
            .str("iamproxy.correlation_id", log_str(&self.request_id))
            .str("iamproxy.destination", self.destination.as_str());
        let mut span = spans::status(span, self.status);
        if let Some(reason) = self.reason {
            span = span.str("iamproxy.reason", reason.as_str());
        }
        if let Some(fallback) = self.fallback {
            span = span.str("iamproxy.fallback_reason", fallback.as_str());
        }
        let client_id = self.client_id.as_deref().map(std::str::from_utf8);
        if let (Some(Ok(client_id)), true) = (client_id, is_logged()) {
            span = span.str("iamproxy.client_id", client_id);
        }
        exporter.push(span.end());
    }
}

/// The body is done (sent, or dropped when the client went away): the line is complete,
/// and so is a sampled request's server span.
/// Boxed, so the response body that carries it to the end stays small as hyper moves it.
impl OnSent for Box<AccessLog> {
    fn sent(self, written: u64) {
        self.emit(written);
        if let Some(exporter) = &self.spans {
            self.server_span(exporter, written);
        }
    }
}

/// Whether the access and decision lines are written now: `info` is enabled (tracing's
/// global level, one atomic load).
pub(super) fn is_logged() -> bool {
    tracing::level_filters::LevelFilter::current() >= tracing::Level::INFO
}

/// `r.Proto` as Go spells it, which labkit logs.
fn proto(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "",
    }
}

/// The client's address for the access line. From an untrusted peer, the peer (`client.ip`,
/// made once per connection). From a trusted one (a load balancer), the rightmost address
/// of the `X-Forwarded-For` chain that is not itself in `trusted_cidrs`: the one the
/// trusted hops vouch for; a forged entry left of it is never reached.
pub(super) fn remote_ip(
    headers: &HeaderMap,
    client: &Downstream<'_>,
    trusted_cidrs: &[Cidr],
) -> HeaderValue {
    if !client.trusted || !is_logged() {
        return client.ip.clone();
    }
    vouched_for(headers, client, trusted_cidrs)
}

/// [`remote_ip`] for a trusted peer.
fn vouched_for(
    headers: &HeaderMap,
    client: &Downstream<'_>,
    trusted_cidrs: &[Cidr],
) -> HeaderValue {
    let Some(chain) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) else {
        return client.ip.clone();
    };
    let mut found = None;
    for entry in chain.rsplit(',').map(str::trim) {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            break;
        };
        found = Some(entry);
        if !trusted_cidrs.iter().any(|cidr| cidr.contains(ip)) {
            break;
        }
    }
    found
        .and_then(|entry| HeaderValue::from_str(entry).ok())
        .unwrap_or_else(|| client.ip.clone())
}

/// A request target or a URL as the access line writes it: the query keeps its parameter
/// names and loses every value (`?code=[FILTERED]&state=[FILTERED]`; a part without `=`
/// becomes `[FILTERED]` whole); a URL also loses its user info and fragment.
struct Target<'a> {
    /// `scheme://host[:port]`, user info removed; empty for a request target.
    origin: (&'a str, &'a str),
    path: &'a str,
    query: Option<&'a str>,
}

const FILTERED: &str = "[FILTERED]";

impl<'a> Target<'a> {
    fn of(uri: &'a Uri) -> Target<'a> {
        Target {
            origin: ("", ""),
            path: uri.path(),
            query: uri.query(),
        }
    }

    /// A URL as a `Referer` header carries it (absolute, or anything else a client sent).
    fn url(text: &'a str) -> Target<'a> {
        let text = text.split('#').next().unwrap_or("");
        let (origin, rest) = match text.find("://") {
            Some(at) => {
                let after = &text[at + 3..];
                let end = after.find(['/', '?']).unwrap_or(after.len());
                let authority = &after[..end];
                let host = authority.rsplit('@').next().unwrap_or(authority);
                ((&text[..at + 3], host), &after[end..])
            }
            None => (("", ""), text),
        };
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        Target {
            origin,
            path,
            query,
        }
    }
}

impl Target<'_> {
    fn write_to(&self, out: &mut String) {
        out.push_str(self.origin.0);
        out.push_str(self.origin.1);
        out.push_str(self.path);
        let Some(query) = self.query else {
            return;
        };
        out.push('?');
        for (i, part) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match part.split_once('=') {
                Some((name, _)) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(FILTERED);
                }
                None if part.is_empty() => {}
                None => out.push_str(FILTERED),
            }
        }
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

    fn target(uri: &str) -> String {
        let mut out = String::new();
        Target::of(&uri.parse().unwrap()).write_to(&mut out);
        out
    }

    #[test]
    fn a_query_keeps_its_names_and_loses_every_value() {
        assert_eq!(target("/oauth/token"), "/oauth/token");
        assert_eq!(
            target("/oauth/authorize?client_id=app&code=c0de&state=xyz"),
            "/oauth/authorize?client_id=[FILTERED]&code=[FILTERED]&state=[FILTERED]"
        );
        assert_eq!(
            target("/a?giat_token&x=1=2&&y="),
            "/a?[FILTERED]&x=[FILTERED]&&y=[FILTERED]"
        );
        assert_eq!(target("/a?"), "/a?");
    }

    #[test]
    fn a_referrer_loses_user_info_values_and_fragment() {
        let url = |text: &str| {
            let mut out = String::new();
            Target::url(text).write_to(&mut out);
            out
        };
        assert_eq!(
            url("https://user:pass@gitlab.example.com:8443/oauth/authorize?code=secret#access_token=t"),
            "https://gitlab.example.com:8443/oauth/authorize?code=[FILTERED]"
        );
        assert_eq!(
            url("https://gitlab.example.com"),
            "https://gitlab.example.com"
        );
        assert_eq!(
            url("https://gitlab.example.com?refresh_token=r"),
            "https://gitlab.example.com?refresh_token=[FILTERED]"
        );
        assert_eq!(
            url("/relative/path?token=t"),
            "/relative/path?token=[FILTERED]"
        );
        assert_eq!(url(""), "");
    }

    #[test]
    fn remote_ip_is_the_peer_or_the_first_address_a_trusted_chain_vouches_for() {
        let peer = HeaderValue::from_static("10.0.0.2");
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let client = |trusted| Downstream {
            ip: &peer,
            https: false,
            trusted,
            propagate_id: false,
        };
        let chain = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static(value));
            headers
        };
        let forged = chain("198.51.100.1, 203.0.113.7, 10.0.0.9, 10.0.0.2");
        assert_eq!(remote_ip(&forged, &client(false), &trusted), "10.0.0.2");
        assert_eq!(vouched_for(&forged, &client(true), &trusted), "203.0.113.7");
        let all_trusted = chain("10.1.1.1, 10.0.0.2");
        assert_eq!(
            vouched_for(&all_trusted, &client(true), &trusted),
            "10.1.1.1"
        );
        let garbage = chain("unknown, 10.0.0.2");
        assert_eq!(vouched_for(&garbage, &client(true), &trusted), "10.0.0.2");
        assert_eq!(
            vouched_for(&HeaderMap::new(), &client(true), &trusted),
            "10.0.0.2"
        );
    }
}
