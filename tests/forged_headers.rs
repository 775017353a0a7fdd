//! Headers a client forges to steer Rails: names with `_` (Rack reads `Gitlab_Workhorse`
//! as `Gitlab-Workhorse`) never reach an upstream, and `Forwarded`, `X-Forwarded-Host`,
//! `-Port`, `-Ssl` and `-Scheme` reach Rails only from a peer in `server.trusted_cidrs`.
//! IAM's `X-Forwarded-Host` is always the gateway's own.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderMap;
use hyper::Request;
use support::{gateway, send, Reply, TestGateway};

const TRUSTED_LOOPBACK: &str = "trusted_cidrs = [\"127.0.0.1/32\"]";

/// What a load balancer in front of the gateway says, or a client pretending to be one.
const FORWARDING: [(&str, &str); 5] = [
    ("forwarded", "for=6.6.6.6;proto=https;host=evil.example"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-port", "8443"),
    ("x-forwarded-ssl", "on"),
    ("x-forwarded-scheme", "https"),
];

/// Underscored spellings of headers the gateway strips or sets, and one of no header.
const UNDERSCORED: [(&str, &str); 5] = [
    ("gitlab_workhorse", "forged"),
    ("gitlab_workhorse_api_request", "forged.jwt.value"),
    ("x_forwarded_for", "6.6.6.6"),
    ("x_forwarded_proto", "https"),
    ("x_custom_thing", "1"),
];

/// A request to `path` with the client's `Host`, every forged header and one end-to-end
/// header that must survive them; a form body identifying a client on OAuth paths.
fn forged(gw: &TestGateway, path: &str) -> Request<Full<Bytes>> {
    let oauth = path.starts_with("/oauth/");
    let mut request = Request::builder()
        .method(if oauth { "POST" } else { "GET" })
        .uri(gw.url(path))
        .header("host", "gitlab.example.com")
        .header("x-end-to-end", "kept");
    for (name, value) in FORWARDING.into_iter().chain(UNDERSCORED) {
        request = request.header(name, value);
    }
    let body = if oauth {
        request = request.header("content-type", "application/x-www-form-urlencoded");
        Bytes::from_static(b"grant_type=client_credentials&client_id=app")
    } else {
        Bytes::new()
    };
    request.body(Full::new(body)).unwrap()
}

/// Header names, sorted, without those that describe the body.
fn names(headers: &HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = headers
        .keys()
        .map(|name| name.as_str())
        .filter(|name| !matches!(*name, "content-length" | "content-type"))
        .collect();
    names.sort_unstable();
    names
}

#[tokio::test]
async fn from_an_untrusted_peer_rails_receives_neither_underscored_nor_forwarding_headers() {
    let gw = gateway().start().await;
    for path in ["/api/v4/projects", "/oauth/token"] {
        let answer = send(forged(&gw, path)).await;
        assert_eq!(answer.served_by(), "rails", "{path}");
        let headers = gw.rails.last().headers;
        assert_eq!(
            names(&headers),
            [
                "host",
                "x-end-to-end",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-request-id"
            ],
            "{path}"
        );
        assert_eq!(headers["host"], "gitlab.example.com", "{path}");
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{path}");
        assert_eq!(headers["x-forwarded-proto"], "http", "{path}");
    }
    assert_eq!(gw.preauth.count(), 1, "the OAuth request was routed");
    gw.stop().await;
}

#[tokio::test]
async fn from_a_trusted_peer_rails_receives_its_forwarding_headers_but_no_underscored_one() {
    let gw = gateway().set("server", TRUSTED_LOOPBACK).start().await;
    for path in ["/api/v4/projects", "/oauth/token"] {
        send(forged(&gw, path)).await;
        let headers = gw.rails.last().headers;
        assert_eq!(
            names(&headers),
            [
                "forwarded",
                "host",
                "x-end-to-end",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-port",
                "x-forwarded-proto",
                "x-forwarded-scheme",
                "x-forwarded-ssl",
                "x-request-id"
            ],
            "{path}"
        );
        for (name, value) in FORWARDING {
            let values: Vec<_> = headers.get_all(name).iter().collect();
            assert_eq!(values, [value], "{path}: {name}");
        }
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{path}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn iam_receives_the_gateways_forwarded_host_whoever_the_peer() {
    for trusted in [false, true] {
        let mut builder = gateway();
        if trusted {
            builder = builder.set("server", TRUSTED_LOOPBACK);
        }
        let gw = builder.start().await;
        gw.preauth.always(Reply::destination("iam"));
        let answer = send(forged(&gw, "/oauth/token")).await;
        assert_eq!(answer.served_by(), "iam", "trusted: {trusted}");
        let headers = gw.iam.last().headers;
        assert_eq!(headers["host"], gw.iam.addr.to_string().as_str());
        let forwarded_host: Vec<_> = headers.get_all("x-forwarded-host").iter().collect();
        assert_eq!(
            forwarded_host,
            ["gitlab.example.com"],
            "trusted: {trusted}: the client's Host, set by the gateway"
        );
        let underscored: Vec<&str> = names(&headers)
            .into_iter()
            .filter(|name| name.contains('_'))
            .collect();
        assert!(
            underscored.is_empty(),
            "trusted: {trusted}: {underscored:?}"
        );
        gw.stop().await;
    }
}
