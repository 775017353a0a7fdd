//! The request path. [`handle`] runs these phases in order, each a named function:
//!
//! 1. **classify** — is the path an OAuth endpoint? If not, [`pass_through`] streams it to
//!    Rails untouched (tunnelling a WebSocket upgrade, see [`crate::upgrade`]).
//! 2. **prepare** — clean the head once (hop-by-hop, gateway-only headers, forwarding
//!    headers, correlation id); every upstream request is built from it.
//! 3. **buffer** — read the OAuth body, up to `max_body_bytes` ([`buffer_body`]).
//! 4. **decide** — read the query and form body once, send codes and tokens back to
//!    their issuer, identify the client, apply the rules before the cache, then the
//!    decision cache and the pre-authorize backend ([`decide`]).
//! 5. **forward** — to Rails, or to IAM with fail-open replay to Rails ([`to_iam`]).
//! 6. **record** — one access line and the request metrics.
//!
//! Nothing here panics or hands a hyper error to the client: every outcome is a response,
//! and [`ProxyError`] maps failures to statuses in one place.
//!
//! Replay ends where streaming begins: once IAM's response headers have been accepted
//! (a status not in `iam.fallback_statuses`), its body is streamed to the client, and a
//! failure after that point cannot be replayed to Rails: the client sees a truncated body.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};

use crate::cache::Lookup;
use crate::classify::{continuity, Endpoint};
use crate::connection::Conn;
use crate::decision::{Decision, Destination, Reason};
use crate::fallback::FallbackReason;
use crate::forward::{
    self, downstream_response, upstream_request, Downstream, Head, HostRule, Progress, RequestBody,
    ResponseBody, Streamed, UpstreamError,
};
use crate::headers::X_REQUEST_ID;
use crate::identify::identify;
use crate::metrics::Upstream;
use crate::params::{Parameters, RequestView};
use crate::preauth::PreauthError;
use crate::respond::ProxyError;
use crate::rollout::Rule;
use crate::state::{AppState, IamRoute};
use crate::upgrade::{self, Upgrade};

/// Serves one client request.
pub async fn handle(
    state: &AppState,
    conn: &Conn,
    mut request: Request<Incoming>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let _in_flight = state.metrics.in_flight();
    let endpoint = state.routes.classify(request.uri().path());
    let upgrade = match endpoint {
        None => upgrade::requested(&mut request, conn),
        Some(_) => None,
    };
    let (parts, body) = request.into_parts();
    let client = Downstream {
        addr: conn.peer,
        https: conn.https,
        trusted: state.is_trusted(conn.peer.ip()),
    };
    let head = Head::prepare(parts, client, || state.request_ids.next());
    let mut access = AccessLog::new(&head, endpoint);

    let uri_bytes = head.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let result = match endpoint {
        _ if uri_bytes > state.config.server.max_uri_bytes => Err(ProxyError::UriTooLong),
        None => pass_through(state, head, body, upgrade).await,
        Some(endpoint) => route_oauth(state, endpoint, head, body, &mut access).await,
    };
    let mut response = result.unwrap_or_else(ProxyError::into_response);
    response
        .headers_mut()
        .entry(X_REQUEST_ID.clone())
        .or_insert_with(|| access.request_id.clone());
    let elapsed = started.elapsed();
    state.metrics.request(
        endpoint,
        access.destination,
        &access.method,
        response.status(),
        elapsed,
    );
    access.emit(response.status(), elapsed);
    response
}

/// Non-OAuth traffic: streamed to Rails both ways, never buffered; upgrades tunnelled.
async fn pass_through(
    state: &AppState,
    mut head: Head,
    body: Incoming,
    upgrade: Option<Upgrade>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let mut headers = std::mem::take(&mut head.headers);
    if let Some(upgrade) = &upgrade {
        upgrade.restore_request_headers(&mut headers);
    }
    let response = if body.is_end_stream() {
        rails_exchange(state, &head, headers, empty_body(), None).await?
    } else {
        let (body, progress) = Streamed::new(body);
        rails_exchange(state, &head, headers, Either::Left(body), Some(progress)).await?
    };
    Ok(match upgrade {
        Some(upgrade) => upgrade.relay(response),
        None => downstream_response(response),
    })
}

/// OAuth traffic: buffer, decide, forward.
async fn route_oauth(
    state: &AppState,
    endpoint: Endpoint,
    mut head: Head,
    body: Incoming,
    access: &mut AccessLog,
) -> Result<Response<ResponseBody>, ProxyError> {
    let config = &state.config.server;
    let body = buffer_body(
        body,
        &head.headers,
        config.max_body_bytes,
        config.body_read_timeout,
    )
    .await?;
    let decision = decide(state, endpoint, &head, &body, access).await;
    match (decision.destination, &state.iam) {
        (Destination::Iam, Some(iam)) => to_iam(state, iam, head, body, access).await,
        _ => {
            let headers = std::mem::take(&mut head.headers);
            to_rails(state, &head, headers, body).await
        }
    }
}

/// Reads an OAuth request body, refusing one over `limit` up front (Content-Length) or as
/// soon as a chunked body crosses it.
async fn buffer_body(
    body: Incoming,
    headers: &HeaderMap,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ProxyError::BodyTooLarge);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge),
        Ok(Err(_)) => Err(ProxyError::BodyUnreadable),
        Err(_) => Err(ProxyError::BodyTimeout),
    }
}

/// Decides where an OAuth request goes, and logs the decision: the rules before the cache
/// ([`RoutingConfig::decide`](crate::rollout::RoutingConfig::decide)), then the cache and
/// the pre-authorize backend.
async fn decide(
    state: &AppState,
    endpoint: Endpoint,
    head: &Head,
    body: &Bytes,
    access: &mut AccessLog,
) -> Decision {
    let view = RequestView {
        method: &head.method,
        query: head.uri.query(),
        headers: &head.headers,
        body,
    };
    let prefixes = state
        .iam
        .as_ref()
        .map_or(&[][..], |iam| &iam.token_prefixes[..]);
    let params = Parameters::read(&view, prefixes);
    let identity = identify(&head.headers, &params);
    let client_id = identity.client_id();
    let rule = state.config.routing.decide(
        state.iam.is_some(),
        continuity(endpoint, &params),
        client_id,
    );
    let decision = match (rule, &state.iam) {
        (Rule::Decided(decision), _) => decision,
        (Rule::AskCache(client_id), Some(iam)) => {
            ask_cache(state, iam, client_id, &head.request_id).await
        }
        // The rules never defer to the cache without IAM.
        (Rule::AskCache(_), None) => Decision::rails(Reason::IamDisabled),
    };
    state.metrics.decision(decision);
    tracing::info!(
        correlation_id = log_str(&head.request_id),
        client_id = client_id.unwrap_or(""),
        identification = identity.label(),
        route = endpoint.as_str(),
        destination = decision.destination.as_str(),
        reason = decision.reason.as_str(),
        "iamproxy: routing decision"
    );
    access.client_id = client_id.map(|id| retain(body, id));
    access.reason = Some(decision.reason);
    decision
}

async fn ask_cache(
    state: &AppState,
    iam: &IamRoute,
    client_id: &str,
    request_id: &HeaderValue,
) -> Decision {
    let fetch = async {
        let started = Instant::now();
        let answer = iam.preauth.ask(client_id, request_id).await;
        state
            .metrics
            .preauthorize(answer.as_ref().err(), started.elapsed());
        answer
    };
    let lookup = state.cache.lookup(client_id, fetch).await;
    match &lookup {
        Lookup::Hit(_) => state.metrics.cache_hit(),
        Lookup::Fetched(_) | Lookup::Stale(..) | Lookup::Failed(_) => state.metrics.cache_miss(),
    }
    let failed = |error: &PreauthError, msg: &str| {
        tracing::warn!(
            correlation_id = log_str(request_id),
            client_id,
            outcome = error.outcome(),
            error = %error,
            "{msg}"
        );
    };
    match lookup {
        Lookup::Hit(destination) => Decision {
            destination,
            reason: Reason::Cache,
        },
        Lookup::Fetched(destination) => Decision {
            destination,
            reason: Reason::Preauthorize,
        },
        Lookup::Stale(destination, error) => {
            failed(
                &error,
                "iamproxy: pre-authorize failed, serving the last good decision",
            );
            Decision {
                destination,
                reason: Reason::Stale,
            }
        }
        Lookup::Failed(error) => {
            failed(&error, "iamproxy: pre-authorize failed, routing to rails");
            Decision::rails(Reason::PreauthorizeError)
        }
    }
}

/// Sends to IAM; on a connect error, timeout, fallback status or open breaker, replays the
/// same buffered request to Rails. The client never sees the IAM failure.
async fn to_iam(
    state: &AppState,
    iam: &IamRoute,
    mut head: Head,
    body: Bytes,
    access: &mut AccessLog,
) -> Result<Response<ResponseBody>, ProxyError> {
    match try_iam(state, iam, &head, &body).await {
        Ok(response) => {
            access.destination = Destination::Iam;
            Ok(downstream_response(response))
        }
        Err(reason) => {
            state.metrics.fallback(reason);
            access.fallback = Some(reason);
            let headers = std::mem::take(&mut head.headers);
            to_rails(state, &head, headers, body).await
        }
    }
}

async fn try_iam(
    state: &AppState,
    iam: &IamRoute,
    head: &Head,
    body: &Bytes,
) -> Result<Response<Incoming>, FallbackReason> {
    let attempt = iam
        .breaker
        .try_acquire()
        .ok_or(FallbackReason::BreakerOpen)?;
    let body = Either::Right(Full::new(body.clone()));
    let request = upstream_request(
        head,
        head.headers.clone(),
        &iam.upstream,
        HostRule::Rewrite,
        body,
    );
    let (outcome, detail) = match forward::send(&iam.client, request, None, iam.timeout).await {
        Ok(response) if iam.fallback_statuses.contains(&response.status()) => {
            let status = response.status();
            (Err(FallbackReason::Status), Cow::Owned(status.to_string()))
        }
        Ok(response) => (Ok(response), Cow::Borrowed("")),
        Err(UpstreamError::Timeout) => (
            Err(FallbackReason::Timeout),
            Cow::Borrowed("no response headers in time"),
        ),
        Err(UpstreamError::Connect(error)) => {
            state.metrics.connection_error(Upstream::Iam);
            (Err(FallbackReason::ConnectError), Cow::Owned(error))
        }
    };
    match outcome {
        Ok(response) => {
            attempt.succeeded();
            Ok(response)
        }
        Err(reason) => {
            let opened = attempt.failed();
            if opened {
                state.metrics.breaker_opened();
            }
            tracing::warn!(
                correlation_id = log_str(&head.request_id),
                reason = reason.as_str(),
                error = %detail,
                breaker_opened = opened,
                "iamproxy: IAM failed, replaying to rails"
            );
            Err(reason)
        }
    }
}

/// A buffered OAuth request to Rails.
async fn to_rails(
    state: &AppState,
    head: &Head,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response<ResponseBody>, ProxyError> {
    let body = Either::Right(Full::new(body));
    let response = rails_exchange(state, head, headers, body, None).await?;
    Ok(downstream_response(response))
}

/// Sends to Rails and waits for its response headers, mapping failures to 502 / 504.
async fn rails_exchange(
    state: &AppState,
    head: &Head,
    headers: HeaderMap,
    body: RequestBody,
    mut progress: Option<Progress>,
) -> Result<Response<Incoming>, ProxyError> {
    let rails = &state.rails;
    let request = upstream_request(head, headers, &rails.upstream, HostRule::Keep, body);
    let sent = progress.as_mut().and_then(Progress::take_sent);
    match forward::send(&rails.client, request, sent, rails.timeout).await {
        Ok(response) => Ok(response),
        Err(UpstreamError::Timeout) => {
            tracing::warn!(
                correlation_id = log_str(&head.request_id),
                timeout_ms = u64::try_from(rails.timeout.as_millis()).unwrap_or(u64::MAX),
                "rails sent no response headers in time"
            );
            Err(ProxyError::RailsTimeout)
        }
        // A broken client body aborts the upstream request too: the client's fault.
        Err(UpstreamError::Connect(_))
            if progress.as_ref().is_some_and(Progress::client_failed) =>
        {
            Err(ProxyError::BodyUnreadable)
        }
        Err(UpstreamError::Connect(error)) => {
            state.metrics.connection_error(Upstream::Rails);
            tracing::warn!(
                correlation_id = log_str(&head.request_id),
                error = %error,
                "rails unreachable"
            );
            Err(ProxyError::RailsUnavailable)
        }
    }
}

fn empty_body() -> RequestBody {
    Either::Right(Full::new(Bytes::new()))
}

/// Keeps the client id for the access line without copying it when it points into the
/// buffered body (the common form-body case).
fn retain(body: &Bytes, client_id: &str) -> Bytes {
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
fn log_str(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or("")
}

/// What the access line reports, gathered as the request goes through the phases.
struct AccessLog {
    method: Method,
    uri: Uri,
    request_id: HeaderValue,
    route: &'static str,
    destination: Destination,
    /// Why the decision went where it did; `None` for traffic that is not OAuth.
    reason: Option<Reason>,
    fallback: Option<FallbackReason>,
    client_id: Option<Bytes>,
}

impl AccessLog {
    fn new(head: &Head, endpoint: Option<Endpoint>) -> AccessLog {
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
    fn emit(&self, status: StatusCode, elapsed: Duration) {
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
