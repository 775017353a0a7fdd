//! Forwarding to the upstreams: the request head prepared once per request, the one
//! function that turns it into an upstream request, the wait for response headers, and
//! the bodies in both directions.

pub mod breaker;
pub mod client;
pub mod headers;
pub mod streamed;
pub mod upgrade;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, Uri, Version};
use tokio::time::Sleep;

use crate::config::UpstreamUrl;
// From the files that own them, not the tracer (whose exporter sends through `client`).
use crate::observe::trace::context::{TraceContext, TRACEPARENT};
use crate::observe::trace::span::Hop;
use client::{Pool, SendError, UpstreamBody};
use headers::{Names, X_FORWARDED_HOST, X_REQUEST_ID};
pub use streamed::{ClientFailure, Progress, Streamed};

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
    /// The client's headers, its one `Host` among them when it sent one.
    pub headers: HeaderMap,
    /// The client's `Host` (or HTTP/2 `:authority`).
    pub host: Option<HeaderValue>,
    /// `host` is in `headers` already: the client sent it as a header.
    host_in_headers: bool,
    pub request_id: HeaderValue,
    /// The request's trace, with tracing on; its `traceparent` is in `headers`.
    pub trace: Option<TraceContext>,
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
    /// hint): the `Content-Length` that goes upstream. `names` is what
    /// [`headers::Names::of`] found in `parts`' headers, whose names with `_` are gone by
    /// now ([`headers::remove_underscored`]). Each rule runs only when `names` says it
    /// has something to do.
    pub fn prepare(
        parts: Parts,
        body_length: Option<u64>,
        mut names: Names,
        client: Downstream<'_>,
        new_id: impl FnOnce() -> HeaderValue,
    ) -> Head {
        let Parts {
            method,
            uri,
            mut headers,
            ..
        } = parts;
        if names.connection || names.hop_by_hop {
            headers::remove_hop_by_hop_found(&mut headers, names);
            // `Connection` may have named any header.
            names = Names::of(&headers);
        }
        if names.gateway_only {
            headers::remove_gateway_only(&mut headers);
        }
        if names.peer_forwarding && !client.trusted {
            headers::remove_peer_forwarding(&mut headers);
        }
        if names.content_length {
            headers::set_content_length(&mut headers, body_length);
        }
        if names.expect {
            // `Expect: 100-continue` is between the client and us, and hyper meets it when
            // the body is first read; upstreams get the body without the handshake.
            headers.remove(header::EXPECT);
        }
        let trusted = client.trusted;
        headers::set_forwarded_for(&mut headers, client.ip, trusted && names.forwarded_for);
        headers::set_forwarded_proto(&mut headers, client.https, trusted && names.forwarded_proto);
        let request_id = (client.propagate_id && names.request_id)
            .then(|| headers.get(&X_REQUEST_ID))
            .flatten()
            .filter(|id| headers::is_acceptable_request_id(id))
            .cloned()
            .unwrap_or_else(new_id);
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        let (host, host_in_headers) = match names.host {
            true => headers::single_host(&mut headers),
            false => {
                let authority = uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                (authority, false)
            }
        };
        Head {
            method,
            uri,
            headers,
            host,
            host_in_headers,
            request_id,
            trace: None,
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

/// The one place an upstream request is built: the prepared head, the `Host` rule, the
/// upstream's static headers, which replace a client's of the same name, and for a traced
/// request's call (`hop`) the `traceparent` naming its span.
pub fn upstream_request(
    head: &Head,
    mut headers: HeaderMap,
    upstream: &UpstreamUrl,
    host_rule: HostRule,
    body: RequestBody,
    hop: Option<&Hop>,
) -> Request<RequestBody> {
    if let Some(hop) = hop {
        headers.insert(TRACEPARENT.clone(), hop.traceparent.clone());
    }
    match (host_rule, &head.host) {
        // The client's `Host` is in its headers already.
        (HostRule::Keep, Some(_)) if head.host_in_headers => {}
        (HostRule::Keep, Some(host)) => {
            headers.insert(header::HOST, host.clone());
        }
        (HostRule::Rewrite, Some(host)) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
            headers.insert(header::HOST, upstream.host.clone());
        }
        (_, None) => {
            headers.insert(header::HOST, upstream.host.clone());
        }
    }
    upstream.headers.apply(&mut headers);
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

impl From<SendError> for UpstreamError {
    fn from(error: SendError) -> UpstreamError {
        match error {
            SendError::Saturated(_) => UpstreamError::Saturated,
            error => UpstreamError::Connect(error_chain(&error)),
        }
    }
}

/// Sends `request` and waits for response headers. The clock starts once the request body
/// has been sent, like Go's `ResponseHeaderTimeout`: a large upload is not cut off by the
/// time it takes to arrive, only by how long the upstream then keeps us waiting. `body` is
/// the progress of a streamed body; a buffered one is sent at once.
pub fn send(
    pool: &Pool,
    request: Request<RequestBody>,
    body: Option<Progress>,
    timeout: Duration,
) -> HeadersWait<impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + '_> {
    HeadersWait {
        exchange: pool.send(request),
        body,
        // Not registered with the timer until first polled.
        deadline: tokio::time::sleep(timeout),
        timeout,
    }
}

pin_project_lite::pin_project! {
    /// An exchange raced against its response-header deadline; see [`send`]. Written out
    /// rather than an `async` block with `select!`, which would keep the exchange twice in
    /// its state: every request's future is moved a few times.
    pub struct HeadersWait<F> {
        #[pin]
        exchange: F,
        body: Option<Progress>,
        // Armed from the start: a body still being sent when it fires pushes it back, so
        // the common case, a body sent long before, costs no second clock.
        #[pin]
        deadline: Sleep,
        timeout: Duration,
    }
}

impl<F> Future for HeadersWait<F>
where
    F: Future<Output = Result<Response<UpstreamBody>, SendError>>,
{
    type Output = Result<Response<UpstreamBody>, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.exchange.poll(cx) {
            return Poll::Ready(result.map_err(UpstreamError::from));
        }
        loop {
            std::task::ready!(this.deadline.as_mut().poll(cx));
            let fired = this.deadline.deadline();
            match this.body.as_ref().map(|body| body.clock_end(*this.timeout)) {
                Some(end) if end > fired => this.deadline.as_mut().reset(end),
                _ => return Poll::Ready(Err(UpstreamError::Timeout)),
            }
        }
    }
}

/// Removes hop-by-hop headers from an upstream response before it reaches the client.
pub fn downstream_response(response: Response<UpstreamBody>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
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
            address: crate::config::UpstreamAddress::Url(uri),
            tls: crate::server::tls::unused_client_config(),
            headers: Default::default(),
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
        prepared(builder, "generated")
    }

    /// `request` prepared as from an untrusted peer, its id (if it needs one) `id`.
    fn prepared(request: hyper::http::request::Builder, id: &'static str) -> Head {
        let (parts, ()) = request.body(()).unwrap().into_parts();
        let ip = HeaderValue::from_static("192.0.2.7");
        let client = Downstream {
            ip: &ip,
            https: false,
            trusted: false,
            propagate_id: false,
        };
        let names = Names::of(&parts.headers);
        Head::prepare(parts, None, names, client, || HeaderValue::from_static(id))
    }

    fn empty() -> RequestBody {
        Either::Right(Full::new(Bytes::new()))
    }

    /// `head`'s request to `up`, untraced and without a body.
    fn built(head: &Head, up: &UpstreamUrl, rule: HostRule) -> Request<RequestBody> {
        upstream_request(head, head.headers.clone(), up, rule, empty(), None)
    }

    #[test]
    fn rails_keeps_the_client_host() {
        let head = head(Some("gitlab.example.com"));
        let up = upstream("http://127.0.0.1:8080");
        let req = built(&head, &up, HostRule::Keep);
        assert_eq!(req.uri(), "/oauth/token?a=1");
        assert_eq!(req.headers()["host"], "gitlab.example.com");
        assert!(req.headers().get("x-forwarded-host").is_none());
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn iam_gets_its_own_host_and_the_original_in_forwarded_host() {
        let head = head(Some("gitlab.example.com"));
        let up = upstream("http://iam.internal:9000/");
        let req = built(&head, &up, HostRule::Rewrite);
        assert_eq!(req.headers()["host"], "iam.internal:9000");
        assert_eq!(req.headers()["x-forwarded-host"], "gitlab.example.com");
    }

    #[test]
    fn missing_host_falls_back_to_the_upstream_host() {
        let head = head(None);
        let up = upstream("http://127.0.0.1:8080");
        let req = built(&head, &up, HostRule::Keep);
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
            let names = Names::of(&parts.headers);
            let head = Head::prepare(parts, None, names, client, || {
                HeaderValue::from_static("id")
            });
            let kept = head.headers.get_all(&X_FORWARDED_HOST).iter().count();
            assert_eq!(kept, if trusted { 2 } else { 0 }, "trusted: {trusted}");
            let up = upstream("http://iam.internal:9000/");
            let req = built(&head, &up, HostRule::Rewrite);
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
        // The client's one Host stays where it came: Rails gets it as sent, IAM's request
        // replaces it (see the Host tests above).
        assert_eq!(head.host.as_ref().unwrap(), "h");
        assert_eq!(head.headers.get_all("host").iter().count(), 1);
    }

    #[test]
    fn a_second_host_header_is_dropped_and_the_first_goes_upstream() {
        let request = Request::get("/")
            .header("host", "first.example")
            .header("host", "second.example");
        let head = prepared(request, "id");
        let up = upstream("http://127.0.0.1:8080");
        let req = built(&head, &up, HostRule::Keep);
        let sent: Vec<_> = req.headers().get_all("host").iter().collect();
        assert_eq!(sent, ["first.example"]);
    }

    #[test]
    fn an_http2_authority_becomes_rails_host() {
        let head = prepared(Request::get("https://gitlab.example.com/api"), "id");
        let up = upstream("http://127.0.0.1:8080");
        let req = built(&head, &up, HostRule::Keep);
        assert_eq!(req.headers()["host"], "gitlab.example.com");
    }
}
