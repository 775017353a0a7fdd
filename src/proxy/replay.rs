//! Failing open to Rails: a request the decision sent to IAM is replayed, byte for byte,
//! to Rails when IAM refuses or drops the connection, sends no headers within
//! `iam.timeout`, answers a fallback status, or the breaker is open. The client never sees
//! the IAM failure.
//!
//! Replay ends where streaming begins: once IAM's response headers have been accepted
//! (a status not in `iam.fallback_statuses`), its body is streamed to the client, and a
//! failure after that point cannot be replayed to Rails: the client sees a truncated body.

use std::borrow::Cow;

use bytes::Bytes;
use http_body_util::{Either, Full};

use hyper::Response;

use super::access::log_str;
use super::{spans, to_rails, Exchange};
use crate::decision::{Destination, FallbackReason};
use crate::forward::client::{Upstream, UpstreamBody};
use crate::forward::{
    self, downstream_response, upstream_request, Head, HostRule, ResponseBody, UpstreamError,
};
use crate::respond::ProxyError;
use crate::state::{AppState, IamUpstream};

/// Sends to IAM; on a connect error, timeout, fallback status or open breaker, replays the
/// same buffered request to Rails. The client never sees the IAM failure.
pub(super) async fn to_iam(
    exchange: &mut Exchange<'_>,
    iam: &IamUpstream,
    head: &mut Head,
    body: Bytes,
) -> Result<Response<ResponseBody>, ProxyError> {
    let state = exchange.state;
    // The outcome is not kept across the replay below: it would take room in this
    // future's state for nothing.
    let reason = match try_iam(state, iam, head, &body).await {
        Ok(response) => {
            exchange.access.destination = Destination::Iam;
            return Ok(downstream_response(response));
        }
        Err(reason) => reason,
    };
    state.metrics.fallback(reason);
    exchange.access.fallback = Some(reason);
    to_rails(state, head, body, Some(reason)).await
}

async fn try_iam(
    state: &AppState,
    iam: &IamUpstream,
    head: &Head,
    body: &Bytes,
) -> Result<Response<UpstreamBody>, FallbackReason> {
    let attempt = iam
        .breaker
        .try_acquire()
        .ok_or(FallbackReason::BreakerOpen)?;
    let body = Either::Right(Full::new(body.clone()));
    let hop = spans::hop(head);
    let request = upstream_request(
        head,
        head.headers.clone(),
        &iam.url,
        HostRule::Rewrite,
        body,
        hop.as_deref(),
    );
    let sent = forward::send(&iam.pool, request, None, iam.timeout).await;
    spans::record(
        state,
        head,
        hop,
        Upstream::Iam,
        &iam.url.address,
        None,
        |span| spans::exchanged(span, &sent),
    );
    let (outcome, detail) = match sent {
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
        Err(UpstreamError::Saturated) => {
            // The gateway's own limit, not IAM failing: the breaker does not hear of it.
            drop(attempt);
            tracing::warn!(
                correlation_id = log_str(&head.request_id),
                max_connections = iam.pool.max_connections(),
                "iamproxy: every connection to IAM busy, replaying to rails"
            );
            return Err(FallbackReason::Saturated);
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
