//! The request path. [`handle`] runs these phases in order, each a named function, over one
//! per-request context ([`Exchange`]):
//!
//! 0. **screen** — headers with `_` in their names are dropped before anything reads a
//!    header (see [`crate::forward::headers::remove_underscored`]).
//! 1. **classify** — is the path an OAuth endpoint? If not, [`pass_through`] streams it to
//!    Rails untouched (tunnelling a WebSocket upgrade, see [`crate::forward::upgrade`]).
//! 2. **prepare** — clean the head once (hop-by-hop, gateway-only headers, forwarding
//!    headers, `Content-Length`, correlation id, trace context); every upstream request is
//!    built from it.
//! 3. **admit** — refuse what no reverse proxy forwards: an overlong URI, `CONNECT`, `*`
//!    outside `OPTIONS`, a scheme other than `http`/`https` ([`admit`]).
//! 4. **buffer** — read the OAuth body, up to `max_body_bytes` and within the gateway's
//!    budget for buffered bodies ([`buffer`]).
//! 5. **decide** — read the query and form body once, send codes and tokens back to
//!    their issuer, identify the client, apply the rules before the cache, then the
//!    decision cache and the pre-authorize backend ([`decide`]).
//! 6. **forward** — to Rails, or to IAM with fail-open replay to Rails ([`replay`]).
//! 7. **record** — the request metrics when the response headers go out, and the access
//!    line ([`access`]) once its body has been sent, with a sampled request's server span;
//!    each upstream call's span as it ends (`spans`).
//!
//! Nothing here panics or hands a hyper error to the client: every outcome is a response,
//! and [`ProxyError`] maps failures to statuses in one place.

pub mod access;
pub mod buffer;
pub mod decide;
pub mod replay;
mod spans;

use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::{Method, Request, Response};

use crate::classify::Endpoint;
use crate::decision::{Destination, FallbackReason};
use crate::forward::client::{Upstream, UpstreamBody};
use crate::forward::headers::{self, Names, X_REQUEST_ID};
use crate::forward::upgrade::{self, Upgrade};
use crate::forward::{
    self, downstream_response, upstream_request, ClientFailure, Downstream, Head, HostRule,
    Progress, RequestBody, ResponseBody, Streamed, UpstreamError,
};
use crate::respond::ProxyError;
use crate::server::connection::{Conn, Sending};
use crate::state::AppState;
use access::{log_str, AccessLog};

/// One request's context: created at the start of [`handle`], passed to each phase, and
/// written down as the access line at the end.
struct Exchange<'a> {
    state: &'a AppState,
    /// `None`: not an OAuth endpoint.
    endpoint: Option<Endpoint>,
    access: Box<AccessLog>,
}

/// Serves one client request. The phases that never wait (screen, classify, prepare,
/// admit) run when this is called; the returned future runs the rest. The request is in
/// flight on its connection (see [`Conn::request_started`]) until the response body has
/// been sent or dropped; then the access line is written.
///
/// Every request's future is moved a few times on its way through hyper and the runtime,
/// so the phases keep it small: they borrow the head rather than take it, and none is an
/// `async fn` that takes something large by value and keeps it across an `.await`, which
/// would store it twice (the argument, and the local it is moved into).
pub fn handle<'a>(
    state: &'a AppState,
    conn: &'a Conn,
    mut request: Request<Incoming>,
) -> impl Future<Output = Response<Sending<ResponseBody, Box<AccessLog>>>> + Send + 'a {
    let busy = conn.request_started();
    let started = Instant::now();
    let in_flight = state.metrics.in_flight();
    let mut names = Names::of(request.headers());
    if names.underscored {
        headers::remove_underscored(request.headers_mut());
        names = Names::of(request.headers());
    }
    let endpoint = state.endpoints.classify(request.uri().path());
    // `Upgrade` is hop-by-hop: without one of those there is nothing to look for.
    let upgrade = match endpoint {
        None if names.hop_by_hop => upgrade::requested(&mut request, conn),
        _ => None,
    };
    let (parts, body) = request.into_parts();
    let version = parts.version;
    let peer = conn.peer.ip();
    let client = Downstream {
        ip: &conn.peer_ip,
        https: conn.https,
        trusted: state.is_trusted(peer),
        propagate_id: state.propagates_request_id(peer),
    };
    let body_length = body.size_hint().exact();
    let mut head = Head::prepare(parts, body_length, names, client, || {
        state.request_ids.next()
    });
    head.trace = state
        .tracer
        .start(&head.headers, names.traceparent, client.propagate_id);
    if let Some(trace) = &head.trace {
        trace.propagate(&mut head.headers, names.tracestate);
    }
    let admitted = admit(&head, state.config.server.max_uri_bytes);
    let remote_ip = access::remote_ip(&head.headers, &client, &state.config.server.trusted_cidrs);
    let mut exchange = Exchange {
        state,
        endpoint,
        access: Box::new(AccessLog::new(
            &head,
            endpoint,
            version,
            remote_ip,
            started,
            state.tracer.exporter(head.trace.as_ref()),
        )),
    };
    async move {
        let result = match (admitted, endpoint) {
            (Err(refused), _) => Err(refused),
            (Ok(()), None) => pass_through(&exchange, &mut head, body, upgrade).await,
            (Ok(()), Some(endpoint)) => oauth(&mut exchange, endpoint, &mut head, body).await,
        };
        let mut response = result.unwrap_or_else(ProxyError::into_response);
        let mut access = exchange.access;
        response
            .headers_mut()
            .entry(X_REQUEST_ID.clone())
            .or_insert_with(|| access.request_id.clone());
        let elapsed = started.elapsed();
        state.metrics.request(
            exchange.endpoint,
            access.destination,
            &access.method,
            response.status(),
            elapsed,
        );
        access.responded(response.status(), response.headers(), elapsed);
        drop(in_flight);
        response.map(|body| busy.until_sent(body, access))
    }
}

/// Refuses, before any upstream hears of it, what a reverse proxy does not forward: a
/// path and query over `server.max_uri_bytes`; `CONNECT` (no tunnels; 405, as nginx
/// answers it); `*` as the target of anything but `OPTIONS`; a scheme other than `http`
/// or `https` (HTTP/2's `:scheme`, or an HTTP/1 absolute-form target). An origin-form
/// HTTP/1 request carries no scheme at all.
fn admit(head: &Head, max_uri_bytes: usize) -> Result<(), ProxyError> {
    let uri = &head.uri;
    if uri.path_and_query().map_or(0, |pq| pq.as_str().len()) > max_uri_bytes {
        return Err(ProxyError::UriTooLong);
    }
    if head.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    if uri.path() == "*" && head.method != Method::OPTIONS {
        return Err(ProxyError::AsteriskTarget);
    }
    match uri.scheme_str() {
        None => Ok(()),
        Some(scheme)
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            Ok(())
        }
        Some(_) => Err(ProxyError::UnsupportedScheme),
    }
}

/// Non-OAuth traffic: streamed to Rails both ways, never buffered; upgrades tunnelled.
fn pass_through<'a>(
    exchange: &'a Exchange<'a>,
    head: &'a mut Head,
    body: Incoming,
    upgrade: Option<Upgrade>,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a {
    if let Some(upgrade) = &upgrade {
        upgrade.restore_request_headers(&mut head.headers);
    }
    let state = exchange.state;
    async move {
        let response = if body.is_end_stream() {
            rails_exchange(state, head, empty_body(), None, None).await?
        } else {
            let idle = state.config.server.body_idle_timeout;
            let (body, progress) = Streamed::new(body, idle);
            rails_exchange(state, head, Either::Left(body), Some(progress), None).await?
        };
        Ok(match upgrade {
            Some(upgrade) => upgrade.relay(response),
            None => downstream_response(response),
        })
    }
}

/// OAuth traffic: buffer, decide, forward.
async fn oauth(
    exchange: &mut Exchange<'_>,
    endpoint: Endpoint,
    head: &mut Head,
    body: Incoming,
) -> Result<Response<ResponseBody>, ProxyError> {
    let state = exchange.state;
    let (body, _held) = buffer::read(body, &state.config.server, &state.buffered).await?;
    let decision = decide::decide(exchange, endpoint, head, &body).await;
    match (decision.destination, &state.iam) {
        (Destination::Iam, Some(iam)) => replay::to_iam(exchange, iam, head, body).await,
        _ => to_rails(state, head, body, None).await,
    }
}

/// A buffered OAuth request to Rails: the head's headers go with it. `replay`: why IAM
/// did not serve it, when it is replayed.
async fn to_rails(
    state: &AppState,
    head: &mut Head,
    body: Bytes,
    replay: Option<FallbackReason>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let body = Either::Right(Full::new(body));
    Ok(downstream_response(
        rails_exchange(state, head, body, None, replay).await?,
    ))
}

/// Sends to Rails, with the head's headers (taken from it), and waits for its response
/// headers, mapping failures to 502 / 504.
async fn rails_exchange(
    state: &AppState,
    head: &mut Head,
    body: RequestBody,
    progress: Option<Progress>,
    replay: Option<FallbackReason>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let rails = &state.rails;
    let headers = std::mem::take(&mut head.headers);
    let hop = spans::hop(head);
    let request = upstream_request(
        head,
        headers,
        &rails.url,
        HostRule::Keep,
        body,
        hop.as_deref(),
    );
    let sent = forward::send(&rails.pool, request, progress.clone(), rails.timeout).await;
    let address = &rails.url.address;
    spans::record(state, head, hop, Upstream::Rails, address, None, |span| {
        spans::replay(spans::exchanged(span, &sent), replay)
    });
    let error = match sent {
        Ok(response) => return Ok(response),
        Err(error) => error,
    };
    match error {
        UpstreamError::Timeout => {
            tracing::warn!(
                correlation_id = log_str(&head.request_id),
                timeout_ms = u64::try_from(rails.timeout.as_millis()).unwrap_or(u64::MAX),
                "rails sent no response headers in time"
            );
            Err(ProxyError::RailsTimeout)
        }
        UpstreamError::Saturated => {
            tracing::warn!(
                correlation_id = log_str(&head.request_id),
                max_connections = rails.pool.max_connections(),
                "every connection to rails busy, answering 503"
            );
            Err(ProxyError::RailsSaturated)
        }
        UpstreamError::Connect(error) => match client_failure(&progress) {
            // A broken or silent client body aborts the upstream request too: the
            // client's fault.
            Some(ClientFailure::Broken) => Err(ProxyError::BodyUnreadable),
            Some(ClientFailure::Silent) => Err(ProxyError::BodyTimeout),
            None => {
                state.metrics.connection_error(Upstream::Rails);
                tracing::warn!(
                    correlation_id = log_str(&head.request_id),
                    error = %error,
                    "rails unreachable"
                );
                Err(ProxyError::RailsUnavailable)
            }
        },
    }
}

fn client_failure(progress: &Option<Progress>) -> Option<ClientFailure> {
    progress.as_ref().and_then(Progress::client_failure)
}

fn empty_body() -> RequestBody {
    Either::Right(Full::new(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::Downstream;
    use hyper::header::HeaderValue;

    fn admitted(method: &str, uri: hyper::Uri) -> Result<(), ProxyError> {
        let (parts, ()) = Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts();
        let ip = HeaderValue::from_static("192.0.2.7");
        let client = Downstream {
            ip: &ip,
            https: false,
            trusted: false,
            propagate_id: false,
        };
        let names = Names::of(&parts.headers);
        let head = Head::prepare(parts, None, names, client, || {
            HeaderValue::from_static("id")
        });
        admit(&head, 64)
    }

    /// `*` with an authority, as HTTP/2 carries it (`:authority` and `:path *`).
    fn asterisk(scheme: &str) -> hyper::Uri {
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(scheme.parse().unwrap());
        parts.authority = Some("gitlab.example.com".parse().unwrap());
        parts.path_and_query = Some("*".parse().unwrap());
        hyper::Uri::from_parts(parts).unwrap()
    }

    #[test]
    fn admit_refuses_what_no_reverse_proxy_forwards_and_nothing_else() {
        let uri = |s: &str| s.parse::<hyper::Uri>().unwrap();
        let cases = [
            ("GET", uri("/api/v4/projects"), Ok(())),
            ("POST", uri("/oauth/token?a=1"), Ok(())),
            ("GET", uri("https://gitlab.example.com/"), Ok(())),
            ("GET", uri("HTTP://gitlab.example.com/"), Ok(())),
            ("OPTIONS", uri("*"), Ok(())),
            ("OPTIONS", asterisk("https"), Ok(())),
            (
                "GET",
                uri(&format!("/{}", "a".repeat(64))),
                Err(ProxyError::UriTooLong),
            ),
            (
                "CONNECT",
                uri("gitlab.example.com:443"),
                Err(ProxyError::MethodNotAllowed),
            ),
            ("CONNECT", uri("/api"), Err(ProxyError::MethodNotAllowed)),
            ("GET", uri("*"), Err(ProxyError::AsteriskTarget)),
            ("POST", asterisk("http"), Err(ProxyError::AsteriskTarget)),
            (
                "GET",
                uri("gopher://gitlab.example.com/"),
                Err(ProxyError::UnsupportedScheme),
            ),
            (
                "GET",
                uri("ws://gitlab.example.com/"),
                Err(ProxyError::UnsupportedScheme),
            ),
        ];
        for (method, uri, expected) in cases {
            let case = format!("{method} {uri}");
            assert_eq!(admitted(method, uri), expected, "{case}");
        }
    }
}
