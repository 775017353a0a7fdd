//! Requests a reverse proxy refuses, over HTTP/1.1 (raw connections) and HTTP/2 (hyper's
//! client connection, which sends the pseudo-headers its `Uri` spells): `CONNECT` is 405
//! without `Allow` (as nginx answers it), `*` as the target of anything but `OPTIONS` and a
//! scheme other than `http`/`https` are 400. None of them reaches an upstream; each is
//! counted and logged like any other answer.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::http::uri::{Parts, PathAndQuery, Scheme};
use hyper::{Method, Request, StatusCode, Uri};
use support::metrics::scrape;
use support::raw::{RawConnection, PATIENCE};
use support::{gateway, send_h2, TestGateway};

/// Sends one request over HTTP/2; returns its status and whether it had an `Allow` header.
async fn h2(addr: SocketAddr, method: Method, uri: Uri) -> (StatusCode, bool) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let answer = send_h2(addr, request).await;
    (answer.status, answer.headers.contains_key("allow"))
}

/// `scheme://{gw}{path}`, built from parts: `Uri`'s parser takes no `*` after an authority.
fn uri(gw: &TestGateway, scheme: &str, path: &str) -> Uri {
    let mut parts = Parts::default();
    parts.scheme = Some(scheme.parse::<Scheme>().unwrap());
    parts.authority = Some(gw.addr.to_string().parse().unwrap());
    parts.path_and_query = Some(PathAndQuery::try_from(path).unwrap());
    Uri::from_parts(parts).unwrap()
}

/// Sends `request` raw and reads until the gateway closes the connection; returns the
/// head it answered with.
async fn h1(gw: &TestGateway, request: &str) -> String {
    let received = RawConnection::send(gw.addr, request.as_bytes())
        .await
        .read_to_end(PATIENCE)
        .await;
    assert!(!received.reset, "closed, not reset: {received:?}");
    received.head.to_ascii_lowercase()
}

#[tokio::test]
async fn connect_is_405_without_allow_and_closes_the_connection_over_http1_and_http2() {
    let gw = gateway().start().await;
    for request in [
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "CONNECT /api/v4/projects HTTP/1.1\r\nHost: gw\r\n\r\n",
    ] {
        let head = h1(&gw, request).await;
        assert!(head.starts_with("http/1.1 405 "), "{request:?}: {head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(!head.contains("\r\nallow:"), "nginx sends no Allow: {head}");
    }
    let authority: Uri = "example.com:443".parse().unwrap();
    assert_eq!(
        h2(gw.addr, Method::CONNECT, authority).await,
        (StatusCode::METHOD_NOT_ALLOWED, false)
    );
    assert_eq!(gw.upstream_counts(), (0, 0, 0));
    gw.stop().await;
}

#[tokio::test]
async fn asterisk_target_is_400_except_for_options_which_reaches_rails() {
    let gw = gateway().start().await;
    for method in [Method::GET, Method::POST] {
        let answer = h2(gw.addr, method.clone(), uri(&gw, "http", "*")).await;
        assert_eq!(
            answer,
            (StatusCode::BAD_REQUEST, false),
            "HTTP/2 {method} *"
        );
    }
    let head = h1(&gw, "GET * HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 400 "), "HTTP/1.1 GET *: {head}");
    assert_eq!(gw.upstream_counts(), (0, 0, 0));

    let answer = h2(gw.addr, Method::OPTIONS, uri(&gw, "http", "*")).await;
    assert_eq!(answer, (StatusCode::OK, false), "HTTP/2 OPTIONS *");
    let head = h1(
        &gw,
        "OPTIONS * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        head.starts_with("http/1.1 200 "),
        "HTTP/1.1 OPTIONS *: {head}"
    );
    let received = gw.rails.requests();
    let seen: Vec<(&str, &str)> = received
        .iter()
        .map(|r| (r.method.as_str(), r.uri.as_str()))
        .collect();
    assert_eq!(seen, [("OPTIONS", "*"), ("OPTIONS", "*")]);
    gw.stop().await;
}

#[tokio::test]
async fn a_scheme_other_than_http_or_https_is_400_and_counted_as_a_client_error() {
    let gw = gateway().start().await;
    for scheme in ["gopher", "ftp"] {
        let answer = h2(gw.addr, Method::GET, uri(&gw, scheme, "/api/v4/projects")).await;
        assert_eq!(answer, (StatusCode::BAD_REQUEST, false), ":scheme {scheme}");
    }
    let head = h1(
        &gw,
        "GET gopher://gw/api/v4/projects HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await;
    assert!(
        head.starts_with("http/1.1 400 "),
        "absolute-form gopher: {head}"
    );
    assert_eq!(gw.upstream_counts(), (0, 0, 0));
    let refused = [
        ("route", "other"),
        ("method", "GET"),
        ("status_class", "4xx"),
    ];
    let metrics = scrape(gw.admin).await;
    assert_eq!(metrics.sum("iamproxy_requests_total", &refused), 3.0);

    // `https` over cleartext HTTP/2 is what a TLS-terminating load balancer sends.
    for scheme in ["http", "https"] {
        let answer = h2(gw.addr, Method::GET, uri(&gw, scheme, "/api/v4/projects")).await;
        assert_eq!(answer, (StatusCode::OK, false), ":scheme {scheme}");
    }
    assert_eq!(gw.rails.count(), 2);
    gw.stop().await;
}
