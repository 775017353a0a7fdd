//! Forwarding to the upstreams: the request head prepared once per request, the one
//! function that turns it into an upstream request, the wait for response headers, and
//! the bodies in both directions.

pub mod breaker;
pub mod client;
pub mod headers;
pub mod upgrade;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, Uri, Version};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::config::UpstreamUrl;
use client::{Pool, SendError, UpstreamBody};
use headers::{X_FORWARDED_HOST, X_REQUEST_ID};

/// A request body going upstream: streamed from the client, or buffered (OAuth requests,
/// which may be replayed).
pub type RequestBody = Either<Streamed, Full<Bytes>>;
/// A response body going to the client: streamed from upstream, or made by the gateway.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// The client request's head, cleaned once: hop-by-hop and gateway-only headers removed,
/// an untrusted peer's forwarding headers removed or replaced, `Content-Length` made
/// canonical, the correlation id set. Every upstream request is built from it,
/// so a replay to Rails carries exactly what a direct Rails request would.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The client's `Host` (or HTTP/2 `:authority`).
    pub host: Option<HeaderValue>,
    pub request_id: HeaderValue,
}

/// The client end of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Downstream<'a> {
    /// The peer's IP address as header text, made once per connection.
    pub ip: &'a HeaderValue,
    /// It spoke TLS to us.
    pub https: bool,
    /// In `server.trusted_cidrs`: its forwarding headers are kept.
    pub trusted: bool,
    /// In `server.trusted_cidrs_for_propagation`: its `X-Request-Id` is kept.
    pub propagate_id: bool,
}

impl Head {
    /// `body_length` is the length hyper framed the body by, if it knows it (its size
    /// hint): the `Content-Length` that goes upstream. Headers with `_` in their names are
    /// gone by now ([`headers::remove_underscored`]).
    pub fn prepare(
        parts: Parts,
        body_length: Option<u64>,
        client: Downstream<'_>,
        new_id: impl FnOnce() -> HeaderValue,
    ) -> Head {
        let Parts {
            method,
            uri,
            mut headers,
            ..
        } = parts;
        headers::remove_hop_by_hop(&mut headers);
        headers::remove_gateway_only(&mut headers);
        if !client.trusted {
            headers::remove_peer_forwarding(&mut headers);
        }
        headers::set_content_length(&mut headers, body_length);
        // `Expect: 100-continue` is between the client and us, and hyper meets it when the
        // body is first read; upstreams get the body without the handshake.
        headers.remove(header::EXPECT);
        headers::set_forwarded_for(&mut headers, client.ip, client.trusted);
        headers::set_forwarded_proto(&mut headers, client.https, client.trusted);
        let request_id = headers
            .get(&X_REQUEST_ID)
            .filter(|id| client.propagate_id && headers::is_acceptable_request_id(id))
            .cloned()
            .unwrap_or_else(new_id);
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        let host = headers.remove(header::HOST).or_else(|| {
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        Head {
            method,
            uri,
            headers,
            host,
            request_id,
        }
    }
}

/// Which `Host` rule applies upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRule {
    /// Rails keeps the client's `Host`.
    Keep,
    /// IAM gets its own host; the client's goes in `X-Forwarded-Host`.
    Rewrite,
}

/// The one place an upstream request is built.
pub fn upstream_request(
    head: &Head,
    mut headers: HeaderMap,
    upstream: &UpstreamUrl,
    host_rule: HostRule,
    body: RequestBody,
) -> Request<RequestBody> {
    let host = match (host_rule, &head.host) {
        (HostRule::Keep, Some(host)) => host.clone(),
        (HostRule::Rewrite, Some(host)) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
            upstream.host.clone()
        }
        (_, None) => upstream.host.clone(),
    };
    headers.insert(header::HOST, host);
    if body.size_hint().exact().is_none() {
        // A body of unknown length is a client's chunked one (or HTTP/2 DATA without a
        // length). hyper's client would send it chunked, except for GET and HEAD, whose
        // body it leaves out unless told how to frame it.
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    // Origin-form: the pool knows where it connects, `Host` says the rest.
    *request.uri_mut() = match head.uri.path_and_query() {
        Some(path_and_query) => Uri::from(path_and_query.clone()),
        None => Uri::from_static("/"),
    };
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    request
}

/// Why an upstream exchange produced no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connection refused, reset or closed before response headers.
    Connect(String),
    /// No response headers in time.
    Timeout,
    /// Every one of the upstream's `max_connections` stayed busy for its connect timeout:
    /// nothing was sent.
    Saturated,
}

/// Sends `request` and waits for response headers. The clock starts once the request body
/// has been sent, like Go's `ResponseHeaderTimeout`: a large upload is not cut off by the
/// time it takes to arrive, only by how long the upstream then keeps us waiting.
pub async fn send(
    pool: &Pool,
    request: Request<RequestBody>,
    body_sent: Option<oneshot::Receiver<()>>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let exchange = pool.send(request);
    let deadline = async {
        if let Some(sent) = body_sent {
            // An error means hyper dropped the body unfinished: the clock starts too.
            let _ = sent.await;
        }
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        result = exchange => result.map_err(|error| match error {
            SendError::Saturated(_) => UpstreamError::Saturated,
            error => UpstreamError::Connect(error_chain(&error)),
        }),
        () = deadline => Err(UpstreamError::Timeout),
    }
}

/// Removes hop-by-hop headers from an upstream response before it reaches the client.
pub fn downstream_response(response: Response<UpstreamBody>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}

/// A client body streamed upstream: it reports when it has been sent in full and whether
/// it ended because of the client, and cuts a client that goes silent for `idle`
/// (`server.body_idle_timeout`), which aborts the upstream exchange.
#[derive(Debug)]
pub struct Streamed {
    inner: Incoming,
    sent: Option<oneshot::Sender<()>>,
    failure: Arc<AtomicU8>,
    idle: Duration,
    /// Armed the first time the client keeps us waiting; re-armed after each frame.
    silence: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since `silence` was armed.
    moved: bool,
}

/// Why a client's body ended the upstream exchange; see [`Progress::client_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFailure {
    /// It broke off or was malformed (e.g. a bad chunk).
    Broken,
    /// It sent nothing for `server.body_idle_timeout`.
    Silent,
}

const NO_FAILURE: u8 = 0;

impl ClientFailure {
    fn code(self) -> u8 {
        match self {
            ClientFailure::Broken => 1,
            ClientFailure::Silent => 2,
        }
    }
}

/// The client's body went silent for longer than `server.body_idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no body bytes for {0:?}")]
pub struct BodyIdle(Duration);

/// How a [`Streamed`] body is getting on.
#[derive(Debug)]
pub struct Progress {
    sent: Option<oneshot::Receiver<()>>,
    failure: Arc<AtomicU8>,
}

impl Progress {
    /// Resolves once the body has ended, completely or not; for [`send`]'s clock.
    pub fn take_sent(&mut self) -> Option<oneshot::Receiver<()>> {
        self.sent.take()
    }

    /// The client's body ended the exchange: a failed upstream exchange is then the
    /// client's doing, not the upstream's.
    pub fn client_failure(&self) -> Option<ClientFailure> {
        match self.failure.load(Ordering::Acquire) {
            NO_FAILURE => None,
            1 => Some(ClientFailure::Broken),
            _ => Some(ClientFailure::Silent),
        }
    }
}

impl Streamed {
    pub fn new(inner: Incoming, idle: Duration) -> (Streamed, Progress) {
        let (tx, rx) = oneshot::channel();
        let failure = Arc::new(AtomicU8::new(NO_FAILURE));
        (
            Streamed {
                inner,
                sent: Some(tx),
                failure: failure.clone(),
                idle,
                silence: None,
                moved: false,
            },
            Progress {
                sent: Some(rx),
                failure,
            },
        )
    }

    fn ended(&mut self, failure: Option<ClientFailure>) {
        if let Some(failure) = failure {
            self.failure.store(failure.code(), Ordering::Release);
        }
        if let Some(sent) = self.sent.take() {
            let _ = sent.send(());
        }
    }

    /// Ready once the client has been silent for `idle` since its last frame.
    fn poll_silence(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let idle = self.idle;
        let silence = self
            .silence
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if std::mem::take(&mut self.moved) {
            silence.as_mut().reset(Instant::now() + idle);
        }
        silence.as_mut().poll(cx)
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                std::task::ready!(this.poll_silence(cx));
                this.ended(Some(ClientFailure::Silent));
                Poll::Ready(Some(Err(Box::new(BodyIdle(this.idle)))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.moved = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.ended(Some(ClientFailure::Broken));
                Poll::Ready(Some(Err(Box::new(error))))
            }
            Poll::Ready(None) => {
                this.ended(None);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An error with its sources, for logs: hyper's top-level messages alone ("client error
/// (Connect)") do not say what happened.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> UpstreamUrl {
        let uri: Uri = url.parse().unwrap();
        let authority = uri.authority().unwrap().clone();
        UpstreamUrl {
            host: HeaderValue::from_str(authority.as_str()).unwrap(),
            authority,
            uri,
            tls: crate::server::tls::unused_client_config(),
        }
    }

    fn head(host: Option<&'static str>) -> Head {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri("/oauth/token?a=1")
            .header("x-request-id", "client-chosen")
            .header("connection", "close");
        if let Some(host) = host {
            builder = builder.header("host", host);
        }
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        let ip = HeaderValue::from_static("192.0.2.7");
        let client = Downstream {
            ip: &ip,
            https: false,
            trusted: false,
            propagate_id: false,
        };
        Head::prepare(parts, None, client, || {
            HeaderValue::from_static("generated")
        })
    }

    fn empty() -> RequestBody {
        Either::Right(Full::new(Bytes::new()))
    }

    #[test]
    fn rails_keeps_the_client_host() {
        let head = head(Some("gitlab.example.com"));
        let up = upstream("http://127.0.0.1:8080");
        let req = upstream_request(&head, head.headers.clone(), &up, HostRule::Keep, empty());
        assert_eq!(req.uri(), "/oauth/token?a=1");
        assert_eq!(req.headers()["host"], "gitlab.example.com");
        assert!(req.headers().get("x-forwarded-host").is_none());
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn iam_gets_its_own_host_and_the_original_in_forwarded_host() {
        let head = head(Some("gitlab.example.com"));
        let up = upstream("http://iam.internal:9000/");
        let req = upstream_request(&head, head.headers.clone(), &up, HostRule::Rewrite, empty());
        assert_eq!(req.headers()["host"], "iam.internal:9000");
        assert_eq!(req.headers()["x-forwarded-host"], "gitlab.example.com");
    }

    #[test]
    fn missing_host_falls_back_to_the_upstream_host() {
        let head = head(None);
        let up = upstream("http://127.0.0.1:8080");
        let req = upstream_request(&head, head.headers.clone(), &up, HostRule::Keep, empty());
        assert_eq!(req.headers()["host"], "127.0.0.1:8080");
    }

    #[test]
    fn iam_gets_the_gateways_forwarded_host_and_never_a_peers() {
        for trusted in [false, true] {
            let (parts, ()) = Request::get("/oauth/authorize")
                .header("host", "gitlab.example.com")
                .header("x-forwarded-host", "evil.example")
                .header("x-forwarded-host", "evil.example.net")
                .body(())
                .unwrap()
                .into_parts();
            let ip = HeaderValue::from_static("10.0.0.1");
            let client = Downstream {
                ip: &ip,
                https: false,
                trusted,
                propagate_id: trusted,
            };
            let head = Head::prepare(parts, None, client, || HeaderValue::from_static("id"));
            let kept = head.headers.get_all(&X_FORWARDED_HOST).iter().count();
            assert_eq!(kept, if trusted { 2 } else { 0 }, "trusted: {trusted}");
            let up = upstream("http://iam.internal:9000/");
            let req =
                upstream_request(&head, head.headers.clone(), &up, HostRule::Rewrite, empty());
            let sent: Vec<_> = req.headers().get_all(&X_FORWARDED_HOST).iter().collect();
            assert_eq!(sent, ["gitlab.example.com"], "trusted: {trusted}");
        }
    }

    #[test]
    fn prepare_sets_forwarding_headers_and_replaces_untrusted_request_id() {
        let head = head(Some("h"));
        assert_eq!(head.request_id, "generated");
        assert_eq!(head.headers["x-request-id"], "generated");
        assert_eq!(head.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(head.headers["x-forwarded-proto"], "http");
        assert!(head.headers.get("connection").is_none());
        assert!(
            head.headers.get("host").is_none(),
            "host is set per upstream"
        );
    }
}
