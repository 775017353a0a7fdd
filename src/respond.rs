//! Responses the gateway makes itself — errors, probes, `/metrics`, admin JSON, the demo's
//! stand-ins — through one builder, and the one place request errors map to statuses.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::forward::ResponseBody;

/// Everything that can stop the gateway from relaying an upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// An OAuth request body over `server.max_body_bytes`.
    BodyTooLarge,
    /// An OAuth request body that did not arrive within `server.body_read_timeout`.
    BodyTimeout,
    /// The client's request body broke off or was malformed.
    BodyUnreadable,
    /// Path plus query longer than `server.max_uri_bytes`.
    UriTooLong,
    /// `CONNECT`: a reverse proxy opens no tunnels. 405 without `Allow`, as nginx answers.
    MethodNotAllowed,
    /// `*` as the target of a method other than `OPTIONS`.
    AsteriskTarget,
    /// A scheme other than `http` or `https` (HTTP/2 `:scheme`, an absolute-form target).
    UnsupportedScheme,
    /// Rails refused, reset or closed the connection before answering.
    RailsUnavailable,
    /// Rails sent no response headers within `rails.timeout`.
    RailsTimeout,
    /// Every one of `rails.max_connections` stayed busy for `rails.connect_timeout`.
    RailsSaturated,
    /// Buffering this OAuth body would pass `server.max_buffered_bytes`.
    BufferFull,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyUnreadable => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::AsteriskTarget | ProxyError::UnsupportedScheme => StatusCode::BAD_REQUEST,
            ProxyError::RailsUnavailable => StatusCode::BAD_GATEWAY,
            ProxyError::RailsTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RailsSaturated | ProxyError::BufferFull => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether the connection is closed after this answer: the (rest of the) body was not
    /// read, so the connection cannot be reused; or the request is one no reverse proxy
    /// forwards, and nothing good follows it on that connection (nginx closes too).
    fn closes_connection(self) -> bool {
        matches!(
            self,
            ProxyError::BodyTooLarge
                | ProxyError::BodyTimeout
                | ProxyError::UriTooLong
                | ProxyError::BufferFull
                | ProxyError::MethodNotAllowed
                | ProxyError::AsteriskTarget
                | ProxyError::UnsupportedScheme
        )
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        let text = match self {
            ProxyError::BodyTooLarge => "Request body too large\n",
            ProxyError::BodyTimeout => "Request body timeout\n",
            ProxyError::BodyUnreadable => "Bad request body\n",
            ProxyError::UriTooLong => "URI too long\n",
            ProxyError::MethodNotAllowed => "Method not allowed\n",
            ProxyError::AsteriskTarget => "Bad request target\n",
            ProxyError::UnsupportedScheme => "Unsupported scheme\n",
            ProxyError::RailsUnavailable => "Bad Gateway\n",
            ProxyError::RailsTimeout => "Gateway Timeout\n",
            ProxyError::RailsSaturated | ProxyError::BufferFull => "Service Unavailable\n",
        };
        let mut response = text_response(self.status(), text);
        if self.closes_connection() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ProxyError::RailsSaturated | ProxyError::BufferFull) {
            // Nothing was sent upstream: the client may try again shortly.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The one builder of a response the gateway makes itself.
pub fn synthetic(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(body.into())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A short plain-text response.
pub fn text_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    synthetic(status, "text/plain; charset=utf-8", text)
}

/// A JSON response, one line.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ResponseBody> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    synthetic(status, "application/json", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_status_and_says_whether_the_connection_closes() {
        let table = [
            (ProxyError::BodyTooLarge, 413, true),
            (ProxyError::BodyTimeout, 408, true),
            (ProxyError::BodyUnreadable, 400, false),
            (ProxyError::UriTooLong, 414, true),
            (ProxyError::MethodNotAllowed, 405, true),
            (ProxyError::AsteriskTarget, 400, true),
            (ProxyError::UnsupportedScheme, 400, true),
            (ProxyError::RailsUnavailable, 502, false),
            (ProxyError::RailsTimeout, 504, false),
            (ProxyError::RailsSaturated, 503, false),
            (ProxyError::BufferFull, 503, true),
        ];
        for (error, status, closes) in table {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            assert_eq!(
                response.headers()["content-type"],
                "text/plain; charset=utf-8"
            );
            let close = response.headers().get("connection").map(|v| v.as_bytes());
            assert_eq!(close, closes.then_some(&b"close"[..]), "{error:?}");
            assert!(response.headers().get("allow").is_none(), "{error:?}");
        }
    }
}
