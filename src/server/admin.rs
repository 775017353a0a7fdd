//! The admin listener: the liveness and readiness probes, `/metrics`, and the admin API,
//! which looks at and forgets cached decisions. The admin API is off (every path 404)
//! unless `admin.token_file` is set, and then every call needs
//! `Authorization: Bearer <token>`, the scheme in any case (else 401).
//!
//! - `GET /-/admin/decisions/<client_id>`: the cached answer and the rule before the
//!   cache that decides for the client, each `null` when there is none.
//! - `DELETE /-/admin/decisions/<client_id>`: forget one client's answer.
//! - `DELETE /-/admin/decisions`: forget every answer.
//!
//! `<client_id>` is percent-encoded as in a URL path.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use super::accept::{timeouts, Accept, Limits, Settings, WhenFull};
use super::connection::Conn;
use super::listener::Listener;
use crate::config::ServerConfig;
use crate::decision::fleet::{self, Invalidation};
use crate::forward::ResponseBody;
use crate::observe::metrics;
use crate::proxy::decide::{rules, Rule};
use crate::respond::{json_response, synthetic, text_response};
use crate::state::{AppState, Live};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

/// Every admin API path starts with this.
pub const PREFIX: &str = "/-/admin/";
const DECISIONS: &str = "/-/admin/decisions";

/// Scrapers and probes need few connections; a flood of them must not starve the process.
/// When all are open, the one idle longest is closed for the newcomer
/// ([`WhenFull::CloseOldestIdle`]), so idle connections cannot keep a probe out.
pub const ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin listener until `stop` resolves.
pub async fn serve(listener: Listener, live: Arc<Live>, server: &ServerConfig, stop: impl Future) {
    let settings = {
        let live = live.clone();
        move || Settings {
            tls: None,
            timeouts: timeouts(&live.current().config.server),
        }
    };
    let make = move |conn: Arc<Conn>| {
        let live = live.clone();
        service_fn(move |request: Request<Incoming>| {
            let live = live.clone();
            let conn = conn.clone();
            async move {
                let _busy = conn.request_started();
                Ok::<_, Infallible>(route(&live, &request).await)
            }
        })
    };
    let limits = Limits {
        max_connections: ADMIN_CONNECTIONS,
        when_full: WhenFull::CloseOldestIdle,
        max_header_bytes: server.max_header_bytes,
        h2_max_concurrent_streams: server.h2_max_concurrent_streams,
    };
    Accept::new(limits, settings, make)
        .on(&listener, stop)
        .await;
}

async fn route(live: &Live, request: &Request<Incoming>) -> Response<ResponseBody> {
    let path = request.uri().path();
    if path.starts_with(PREFIX) {
        let state = live.current();
        return respond(&state, request.method(), path, request.headers()).await;
    }
    match path {
        "/-/liveness" => text_response(StatusCode::OK, "ok\n"),
        "/-/readiness" if live.is_ready() => text_response(StatusCode::OK, "ready\n"),
        "/-/readiness" => text_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        "/metrics" => synthetic(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            live.current().render_metrics().await,
        ),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The admin API.
async fn respond(
    state: &AppState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<ResponseBody> {
    let Some(token) = &state.config.admin_token else {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"}));
    };
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| bearer_token(value.as_bytes()));
    if !offered.is_some_and(|offered| token.matches(offered)) {
        let mut response =
            json_response(StatusCode::UNAUTHORIZED, &json!({"error": "unauthorized"}));
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let client_id = match target(path) {
        Target::Every => None,
        Target::One(id) => Some(id),
        Target::BadClientId => return bad_request("the client id must be non-empty UTF-8"),
        Target::NotFound => {
            return json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"}))
        }
    };
    match (method, client_id) {
        (&Method::GET, Some(id)) => json_response(StatusCode::OK, &inspect(state, &id).await),
        (&Method::DELETE, Some(id)) => {
            // The shared cache first: a miss in between would read the old answer back.
            let shared = match state.cache.shared() {
                Some(shared) => Some(shared.forget(&id).await.map(|_| true)),
                None => None,
            };
            let invalidated = state.cache.invalidate(&id).await;
            tracing::info!(
                client_id = id.as_str(),
                invalidated,
                "admin: decision invalidated"
            );
            let fleet = Invalidation::One {
                client_id: id.clone(),
                redis_done: shared.as_ref().is_some_and(Result::is_ok),
            };
            let published = publish(state, &fleet).await;
            json_response(
                StatusCode::OK,
                &json!({
                    "client_id": id,
                    "invalidated": invalidated,
                    "published": published,
                    "shared": shared_outcome(shared),
                }),
            )
        }
        (&Method::DELETE, None) => {
            let shared = match state.cache.shared() {
                Some(shared) => Some(shared.forget_all().await.map(|_| true)),
                None => None,
            };
            let invalidated = state.cache.invalidate_all().await;
            tracing::info!(invalidated, "admin: every decision invalidated");
            let fleet = Invalidation::All {
                all: true,
                redis_done: shared.as_ref().is_some_and(Result::is_ok),
            };
            let published = publish(state, &fleet).await;
            json_response(
                StatusCode::OK,
                &json!({
                    "invalidated": invalidated,
                    "published": published,
                    "shared": shared_outcome(shared),
                }),
            )
        }
        (_, id) => {
            let allow = if id.is_some() {
                "GET, DELETE"
            } else {
                "DELETE"
            };
            let mut response = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method not allowed"}),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            response
        }
    }
}

/// Tells the rest of the fleet, when `[redis]` is set: `null` without it, else whether
/// Redis took the message.
async fn publish(state: &AppState, invalidation: &Invalidation) -> Value {
    let Some(redis) = &state.config.redis else {
        return Value::Null;
    };
    match fleet::publish(redis, invalidation).await {
        Ok(()) => Value::Bool(true),
        Err(error) => {
            tracing::warn!(error = %error, "admin: could not publish the invalidation to redis");
            Value::Bool(false)
        }
    }
}

/// Whether the shared cache in Redis took an invalidation: `null` without one, `false`
/// when Redis could not be reached (subscribers that get the message then forget it
/// there, as for a bare message).
fn shared_outcome(outcome: Option<Result<bool, String>>) -> Value {
    match outcome {
        None => Value::Null,
        Some(Ok(taken)) => Value::Bool(taken),
        Some(Err(error)) => {
            tracing::warn!(%error, "admin: could not forget the decision in redis");
            Value::Bool(false)
        }
    }
}

/// What an admin API path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/-/admin/decisions`: every decision.
    Every,
    /// `/-/admin/decisions/<client id>`, percent-decoded.
    One(String),
    /// `/-/admin/decisions/` followed by nothing, or by bytes that are not UTF-8 once
    /// decoded.
    BadClientId,
    NotFound,
}

/// Reads the path of an admin API call (the query is not part of it).
pub fn target(path: &str) -> Target {
    match path.strip_prefix(DECISIONS) {
        Some("") => Target::Every,
        Some(rest) => match rest.strip_prefix('/').map(percent_decode_str) {
            Some(decoded) => match decoded.decode_utf8() {
                Ok(id) if !id.is_empty() => Target::One(id.into_owned()),
                _ => Target::BadClientId,
            },
            None => Target::BadClientId,
        },
        None => Target::NotFound,
    }
}

async fn inspect(state: &AppState, client_id: &str) -> Value {
    let cached = state.cache.inspect(client_id).await.map(|cached| {
        json!({
            "destination": cached.destination.as_str(),
            "reason": "preauthorize",
            "age_seconds": cached.age.as_secs_f64(),
            "expires_in_seconds": cached.expires_in.as_secs_f64(),
        })
    });
    // The rules the request path applies before the cache, for a request that carries no
    // code or token.
    let rule = match rules(
        &state.config.routing,
        state.iam.is_some(),
        None,
        Some(client_id),
    ) {
        Rule::Decided(decision) => json!({
            "destination": decision.destination.as_str(),
            "reason": decision.reason.as_str(),
        }),
        Rule::AskCache(_) => Value::Null,
    };
    json!({"client_id": client_id, "cached": cached, "rule": rule})
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme is matched
/// case-insensitively and may be followed by more than one space (RFC 7235 §2.1:
/// `auth-scheme 1*SP token68`); the token itself is compared as sent.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) || rest.first() != Some(&b' ') {
        return None;
    }
    let token = &rest[rest.iter().take_while(|&&b| b == b' ').count()..];
    (!token.is_empty()).then_some(token)
}

fn bad_request(why: &str) -> Response<ResponseBody> {
    json_response(StatusCode::BAD_REQUEST, &json!({"error": why}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for value in [
            "Bearer tok",
            "bearer tok",
            "BEARER tok",
            "bEaReR tok",
            "Bearer   tok",
        ] {
            assert_eq!(bearer_token(value.as_bytes()), Some(&b"tok"[..]), "{value}");
        }
        for value in [
            "Bearertok",
            "Bearer",
            "Bearer ",
            "Basic tok",
            "Bear tok",
            " Bearer tok",
            "",
        ] {
            assert_eq!(bearer_token(value.as_bytes()), None, "{value:?}");
        }
        assert_eq!(
            bearer_token(b"bearer TOK"),
            Some(&b"TOK"[..]),
            "the token keeps its case"
        );
    }

    #[test]
    fn paths_name_every_decision_one_client_or_nothing() {
        assert_eq!(target("/-/admin/decisions"), Target::Every);
        assert_eq!(target("/-/admin/decisions/app"), Target::One("app".into()));
        assert_eq!(
            target("/-/admin/decisions/my%20app%2Fx"),
            Target::One("my app/x".into()),
            "percent-decoded, '/' included"
        );
        assert_eq!(target("/-/admin/decisions/a/b"), Target::One("a/b".into()));
        for bad in [
            "/-/admin/decisions/",
            "/-/admin/decisions/%FF",
            "/-/admin/decisionsx",
        ] {
            assert_eq!(target(bad), Target::BadClientId, "{bad}");
        }
        for other in ["/-/admin/", "/-/admin/decision", "/metrics", ""] {
            assert_eq!(target(other), Target::NotFound, "{other}");
        }
    }
}
