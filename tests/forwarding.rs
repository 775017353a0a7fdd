//! Forwarding: header hygiene and Host rules towards Rails and IAM, the OAuth body limit,
//! 502/504 from Rails failures, streaming without buffering, and h2c from clients.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::process::own_peak_rss;
use support::raw::RawConnection;
use support::{gateway, refused_addr, send, Reply, TestClient, TestGateway};
use tokio::net::TcpListener;

/// Longest any single exchange in this file may take before the test fails.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(exchange: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("the exchange finished in time")
}

fn token_form() -> Full<Bytes> {
    Full::new(Bytes::from_static(
        b"grant_type=client_credentials&client_id=app",
    ))
}

fn form_post(url: String) -> hyper::http::request::Builder {
    Request::post(url).header("content-type", "application/x-www-form-urlencoded")
}

/// Header names, sorted, for exact comparisons.
fn names(headers: &HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
    names.sort_unstable();
    names
}

// ---------------------------------------------------------------------------------------
// Upstream connections

#[tokio::test]
async fn sequential_requests_share_one_keep_alive_connection_per_upstream() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    for _ in 0..20 {
        let answer = send(
            Request::get(gw.url("/api/v4/projects"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.served_by(), "rails");
        let answer = send(
            form_post(gw.url("/oauth/token"))
                .body(token_form())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.served_by(), "iam");
    }
    assert_eq!(gw.rails.count(), 20);
    assert_eq!(gw.iam.count(), 20);
    assert_eq!(
        (
            gw.rails.connections(),
            gw.iam.connections(),
            gw.preauth.connections()
        ),
        (1, 1, 1),
        "(rails, iam, preauthorize) connections for 20 requests each, one after another"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_replaced_without_failing_a_request() {
    let gw = gateway().start().await;
    gw.rails
        .always(Reply::text(200, "once").with_header("connection", "close"));
    for round in 0..5 {
        let answer = send(
            Request::get(gw.url("/api/v4/projects"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, 200, "request {round}: {}", answer.text());
    }
    assert_eq!(
        gw.rails.connections(),
        5,
        "a new connection after each close"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Header hygiene

/// Hop-by-hop and gateway-only headers a client may send, and one end-to-end header that
/// must survive them.
fn with_dirty_headers(request: hyper::http::request::Builder) -> hyper::http::request::Builder {
    [
        ("connection", "keep-alive, X-Hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("gitlab-workhorse", "forged"),
        ("gitlab-workhorse-api-request", "forged.jwt.value"),
        ("x-end-to-end", "kept"),
    ]
    .into_iter()
    .fold(request, |request, (name, value)| {
        request.header(name, value)
    })
}

#[tokio::test]
async fn hop_by_hop_and_gitlab_workhorse_headers_do_not_reach_rails() {
    let gw = gateway().start().await;
    let passed_through = with_dirty_headers(Request::get(gw.url("/api/v4/projects")));
    send(passed_through.body(Full::default()).unwrap()).await;
    assert_eq!(
        names(&gw.rails.last().headers),
        [
            "host",
            "x-end-to-end",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id"
        ]
    );

    let oauth = with_dirty_headers(form_post(gw.url("/oauth/token")));
    send(oauth.body(token_form()).unwrap()).await;
    assert_eq!(
        gw.preauth.count(),
        1,
        "the OAuth request was routed to Rails"
    );
    let received = gw.rails.last();
    assert_eq!(
        names(&received.headers),
        [
            "content-length",
            "content-type",
            "host",
            "x-end-to-end",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id"
        ]
    );
    assert_eq!(received.headers["x-end-to-end"], "kept");
    gw.stop().await;
}

#[tokio::test]
async fn hop_by_hop_and_gitlab_workhorse_headers_do_not_reach_iam() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let oauth = with_dirty_headers(form_post(gw.url("/oauth/token")));
    let answer = send(oauth.body(token_form()).unwrap()).await;
    assert_eq!(answer.served_by(), "iam");
    assert_eq!(
        names(&gw.iam.last().headers),
        [
            "content-length",
            "content-type",
            "host",
            "x-end-to-end",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-request-id"
        ]
    );
    gw.stop().await;
}

/// A request carrying forwarding headers of its own, as a client might forge them.
fn with_client_forwarding_headers(url: String) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "client-chosen-1")
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn untrusted_peer_gets_its_own_address_and_a_generated_request_id() {
    let gw = gateway().start().await;
    let answer = send(with_client_forwarding_headers(gw.url("/api/v4/projects"))).await;
    let headers = gw.rails.last().headers;
    let forwarded_for: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(
        forwarded_for,
        ["127.0.0.1"],
        "the client's chain is dropped"
    );
    assert_eq!(headers["x-forwarded-proto"], "http");
    let request_id = &headers["x-request-id"];
    assert_ne!(request_id, "client-chosen-1", "replaced");
    assert!(!request_id.is_empty());
    assert_eq!(
        &answer.headers["x-request-id"], request_id,
        "returned to the client"
    );

    let next = send(
        Request::get(gw.url("/api/v4/projects"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_ne!(
        next.headers["x-request-id"], request_id,
        "generated per request"
    );
    assert_eq!(
        gw.rails.last().headers["x-request-id"],
        next.headers["x-request-id"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn trusted_peer_keeps_its_forwarded_for_chain_proto_and_request_id() {
    let gw = gateway()
        .set("server", "trusted_cidrs = [\"127.0.0.1/32\"]")
        .start()
        .await;
    let answer = send(with_client_forwarding_headers(gw.url("/api/v4/projects"))).await;
    let headers = gw.rails.last().headers;
    assert_eq!(headers["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(
        headers["x-forwarded-proto"], "https",
        "a trusted load balancer that terminated TLS knows the scheme"
    );
    assert_eq!(headers["x-request-id"], "client-chosen-1");
    assert_eq!(answer.headers["x-request-id"], "client-chosen-1");
    gw.stop().await;
}

#[tokio::test]
async fn a_peer_trusted_for_propagation_only_keeps_its_request_id_but_not_its_forwarded_chain() {
    let gw = gateway()
        .set(
            "server",
            "trusted_cidrs_for_propagation = [\"127.0.0.1/32\"]",
        )
        .start()
        .await;
    let answer = send(with_client_forwarding_headers(gw.url("/api/v4/projects"))).await;
    let headers = gw.rails.last().headers;
    assert_eq!(headers["x-request-id"], "client-chosen-1");
    assert_eq!(answer.headers["x-request-id"], "client-chosen-1");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "chain dropped");
    assert_eq!(headers["x-forwarded-proto"], "http");
    gw.stop().await;
}

#[tokio::test]
async fn a_peer_trusted_for_forwarding_but_not_propagation_gets_a_generated_request_id() {
    let gw = gateway()
        .set(
            "server",
            "trusted_cidrs = [\"127.0.0.1/32\"]\ntrusted_cidrs_for_propagation = []",
        )
        .start()
        .await;
    let answer = send(with_client_forwarding_headers(gw.url("/api/v4/projects"))).await;
    let headers = gw.rails.last().headers;
    assert_eq!(
        headers["x-forwarded-for"], "6.6.6.6, 127.0.0.1",
        "chain kept"
    );
    assert_eq!(headers["x-forwarded-proto"], "https");
    let request_id = &headers["x-request-id"];
    assert_ne!(request_id, "client-chosen-1", "replaced");
    assert_eq!(&answer.headers["x-request-id"], request_id);
    gw.stop().await;
}

#[tokio::test]
async fn upstream_hop_by_hop_response_headers_do_not_reach_the_client() {
    let gw = gateway().start().await;
    let dirty = Reply::text(200, "ok")
        .with_header("keep-alive", "timeout=5")
        .with_header("connection", "X-Up")
        .with_header("x-up", "1")
        .with_header("proxy-authenticate", "Basic")
        .with_header("x-end-to-end", "kept");
    gw.rails.always(dirty.clone());
    gw.iam.always(dirty);
    gw.preauth.always(Reply::destination("iam"));
    let from_rails = send(
        Request::get(gw.url("/api/v4/projects"))
            .body(Full::default())
            .unwrap(),
    );
    let from_iam = send(
        form_post(gw.url("/oauth/token"))
            .body(token_form())
            .unwrap(),
    );
    for answer in [from_rails.await, from_iam.await] {
        assert_eq!(answer.text(), "ok");
        assert_eq!(answer.headers["x-end-to-end"], "kept");
        for hop in ["keep-alive", "connection", "x-up", "proxy-authenticate"] {
            assert!(
                answer.headers.get(hop).is_none(),
                "{hop} reached the client"
            );
        }
    }
    assert_eq!(gw.upstream_counts(), (1, 1, 1));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Host rules

#[tokio::test]
async fn rails_receives_the_client_host() {
    let gw = gateway().start().await;
    let request = form_post(gw.url("/oauth/token")).header("host", "gitlab.example.com");
    send(request.body(token_form()).unwrap()).await;
    let headers = gw.rails.last().headers;
    assert_eq!(headers["host"], "gitlab.example.com");
    assert!(headers.get("x-forwarded-host").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn iam_receives_its_own_host_and_the_client_host_as_forwarded_host() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let request = form_post(gw.url("/oauth/token")).header("host", "gitlab.example.com");
    send(request.body(token_form()).unwrap()).await;
    let headers = gw.iam.last().headers;
    assert_eq!(headers["host"], gw.iam.addr.to_string().as_str());
    assert_eq!(headers["x-forwarded-host"], "gitlab.example.com");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// The OAuth body limit

const LIMIT: usize = 1024;

async fn limited_gateway() -> TestGateway {
    let gw = gateway()
        .set("server", &format!("max_body_bytes = {LIMIT}"))
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    gw
}

/// A form body of exactly `len` bytes that identifies a client.
fn form_of_len(len: usize) -> Vec<u8> {
    let mut form = b"client_id=app&pad=".to_vec();
    form.resize(len, b'a');
    form
}

/// Sends `body` with `Transfer-Encoding: chunked`, `chunk` bytes per chunk, on a raw
/// connection (hyper's client would send a known-size body with Content-Length). The whole
/// request goes out in one write, so the gateway never closes on unread bytes. Returns the
/// response status.
async fn post_chunked(addr: SocketAddr, path: &str, body: &[u8], chunk: usize) -> u16 {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: gitlab.example.com\r\n\
         content-type: application/x-www-form-urlencoded\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut connection = RawConnection::connect(addr).await;
    connection.write(&request).await;
    let response = connection.read_to_end(BOUND).await;
    assert!(!response.reset, "closed, not reset: {response:?}");
    response.status()
}

#[tokio::test]
async fn oauth_body_over_the_limit_with_content_length_is_413_without_any_upstream_call() {
    let gw = limited_gateway().await;
    let body = Full::new(Bytes::from(form_of_len(LIMIT + 1)));
    let answer = send(form_post(gw.url("/oauth/token")).body(body).unwrap()).await;
    assert_eq!(answer.status, 413);
    assert_eq!(gw.upstream_counts(), (0, 0, 0));
    gw.stop().await;
}

#[tokio::test]
async fn chunked_oauth_body_over_the_limit_is_413_without_any_upstream_call() {
    let gw = limited_gateway().await;
    let status = post_chunked(gw.addr, "/oauth/token", &form_of_len(LIMIT + 1), 300).await;
    assert_eq!(status, 413);
    assert_eq!(gw.upstream_counts(), (0, 0, 0));
    gw.stop().await;
}

#[tokio::test]
async fn oauth_body_exactly_at_the_limit_is_forwarded() {
    let gw = limited_gateway().await;
    let body = Bytes::from(form_of_len(LIMIT));
    let with_length = form_post(gw.url("/oauth/token")).body(Full::new(body.clone()));
    let answer = send(with_length.unwrap()).await;
    assert_eq!(answer.served_by(), "iam");
    assert_eq!(gw.iam.last().body, body);

    let status = post_chunked(gw.addr, "/oauth/token", &body, 300).await;
    assert_eq!(status, 200);
    assert_eq!(gw.iam.last().body, body);
    assert_eq!(gw.iam.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn non_oauth_bodies_are_not_limited() {
    let gw = limited_gateway().await;
    let body = Bytes::from(vec![b'x'; 64 * 1024]);
    let upload = Request::post(gw.url("/api/v4/projects/1/uploads")).body(Full::new(body.clone()));
    let answer = send(upload.unwrap()).await;
    assert_eq!(answer.served_by(), "rails");
    assert_eq!(gw.rails.last().body, body);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Rails failures

/// Sends an OAuth and a non-OAuth request; both must get `status` with a short plain-text
/// body. Returns how long the slower one took.
async fn assert_both_get(gw: &TestGateway, status: u16) -> Duration {
    let started = Instant::now();
    let oauth = send(
        form_post(gw.url("/oauth/token"))
            .body(token_form())
            .unwrap(),
    );
    let other = send(
        Request::get(gw.url("/api/v4/projects"))
            .body(Full::default())
            .unwrap(),
    );
    let (oauth, other) = tokio::join!(oauth, other);
    let elapsed = started.elapsed();
    for answer in [oauth, other] {
        assert_eq!(answer.status, status, "{}", answer.text());
        assert!(answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert!(
            !answer.body.is_empty() && answer.body.len() < 64,
            "short body: {:?}",
            answer.text()
        );
    }
    elapsed
}

#[tokio::test]
async fn unreachable_rails_is_502() {
    let refused = refused_addr().await;
    let gw = gateway()
        .set("rails", &format!("url = \"http://{refused}\""))
        .start()
        .await;
    assert_both_get(&gw, 502).await;
    gw.stop().await;
}

#[tokio::test]
async fn rails_dropping_the_connection_is_502() {
    let gw = gateway().start().await;
    gw.rails.always(Reply::Drop);
    assert_both_get(&gw, 502).await;
    assert_eq!(gw.rails.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn rails_slower_than_its_timeout_is_504() {
    let gw = gateway().set("rails", "timeout = \"300ms\"").start().await;
    gw.rails
        .always(Reply::text(200, "too late").after(Duration::from_secs(2)));
    let elapsed = assert_both_get(&gw, 504).await;
    assert!(
        elapsed < Duration::from_secs(2),
        "answered at rails.timeout: {elapsed:?}"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Streaming

/// A body made on the fly: `total` bytes in frames of at most `chunk` bytes, each a slice
/// (no copy) of `pattern`, repeated as needed. Only `pattern` is ever in memory.
struct Generated {
    pattern: Bytes,
    chunk: usize,
    total: u64,
    sent: u64,
    /// Whether the size is announced (Content-Length) or not (chunked).
    announced: bool,
}

impl Generated {
    fn new(pattern: Bytes, chunk: usize, total: u64, announced: bool) -> Generated {
        Generated {
            pattern,
            chunk,
            total,
            sent: 0,
            announced,
        }
    }

    fn empty() -> Generated {
        Generated::new(Bytes::new(), 1, 0, true)
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let left = self.total - self.sent;
        if left == 0 {
            return Poll::Ready(None);
        }
        let start = usize::try_from(self.sent % self.pattern.len() as u64).unwrap();
        let len = (self.pattern.len() - start)
            .min(self.chunk)
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        self.sent += len as u64;
        let frame = Frame::data(self.pattern.slice(start..start + len));
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.total
    }

    fn size_hint(&self) -> SizeHint {
        if self.announced {
            SizeHint::with_exact(self.total - self.sent)
        } else {
            SizeHint::default()
        }
    }
}

/// What [`StreamingRails`] saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    host: Option<HeaderValue>,
    body_len: u64,
    /// Only the first [`StreamingRails::KEEP`] bytes of the body.
    body_head: Bytes,
}

/// A Rails stand-in for large transfers (the shared fake buffers whole bodies): counts
/// request bytes as they arrive, keeping only the first few, and answers with a generated
/// body of `download` bytes.
struct StreamingRails {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl StreamingRails {
    const KEEP: usize = 1 << 20;

    async fn start(download: u64) -> StreamingRails {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = seen.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let recorder = recorder.clone();
            async move {
                let seen = Self::consume(request).await?;
                recorder.lock().unwrap().push(seen);
                let pattern = Bytes::from(vec![b'd'; 64 * 1024]);
                Ok::<_, hyper::Error>(Response::new(Generated::new(
                    pattern,
                    64 * 1024,
                    download,
                    true,
                )))
            }
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service.clone();
                tokio::spawn(async move {
                    // Accepts HTTP/2 too, so that a gateway sending it would be seen doing so.
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        StreamingRails { addr, seen }
    }

    async fn consume(request: Request<Incoming>) -> Result<Seen, hyper::Error> {
        let (parts, mut body) = request.into_parts();
        let mut body_len = 0;
        let mut body_head = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                body_len += data.len() as u64;
                let keep = Self::KEEP.saturating_sub(body_head.len()).min(data.len());
                body_head.extend_from_slice(&data[..keep]);
            }
        }
        Ok(Seen {
            version: parts.version,
            host: parts.headers.get("host").cloned(),
            body_len,
            body_head: body_head.into(),
        })
    }

    fn url(&self) -> String {
        format!("url = \"http://{}\"", self.addr)
    }

    fn only(&self) -> Seen {
        let seen = self.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "exactly one request reached Rails");
        seen[0].clone()
    }
}

/// Sends a streamed body through `gw` and counts the response body as it arrives.
async fn stream_through(gw: &TestGateway, path: &str, body: Generated) -> (u16, u64) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Generated>();
    let request = Request::post(gw.url(path)).body(body).unwrap();
    bounded(async {
        let response = client.request(request).await.expect("request failed");
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut received = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("response body failed").into_data() {
                received += data.len() as u64;
            }
        }
        (status, received)
    })
    .await
}

/// Runs `transfer` and asserts the process's peak RSS grew by less than 64 MiB. The peak
/// is first reset to the current RSS where the kernel allows it (`clear_refs`), so the
/// reading covers only the transfer. Large transfers run one at a time so that each
/// measures itself.
async fn assert_flat_memory<T>(transfer: impl std::future::Future<Output = T>) -> T {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = ONE_AT_A_TIME.lock().await;
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = own_peak_rss() / 1024;
    let result = transfer.await;
    let after = own_peak_rss() / 1024;
    println!("peak RSS before {before} KiB, after {after} KiB");
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    result
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_to_rails_with_flat_memory() {
    let upload = 512 * MIB;
    let rails = StreamingRails::start(0).await;
    let gw = gateway().set("rails", &rails.url()).start().await;
    let body = Generated::new(Bytes::from(vec![b'u'; 64 * 1024]), 64 * 1024, upload, true);
    let started = Instant::now();
    let (status, _) =
        assert_flat_memory(stream_through(&gw, "/api/v4/projects/1/uploads", body)).await;
    println!("uploaded {upload} bytes in {:?}", started.elapsed());
    assert_eq!(status, 200);
    assert_eq!(rails.only().body_len, upload);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_to_the_client_with_flat_memory() {
    let download = 256 * MIB;
    let rails = StreamingRails::start(download).await;
    let gw = gateway().set("rails", &rails.url()).start().await;
    let started = Instant::now();
    let (status, received) = assert_flat_memory(stream_through(
        &gw,
        "/api/v4/projects/1/archive",
        Generated::empty(),
    ))
    .await;
    println!("downloaded {received} bytes in {:?}", started.elapsed());
    assert_eq!(status, 200);
    assert_eq!(received, download);
    gw.stop().await;
}

/// 1 MiB of xorshift output: pseudo-random, but reproducible in a failure message.
fn pseudo_random_mib() -> Bytes {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut bytes = Vec::with_capacity(MIB as usize);
    while bytes.len() < MIB as usize {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.into()
}

#[tokio::test]
async fn streamed_request_body_is_forwarded_byte_for_byte() {
    let rails = StreamingRails::start(0).await;
    let gw = gateway().set("rails", &rails.url()).start().await;
    let content = pseudo_random_mib();
    // Uneven chunks and no Content-Length: the gateway must relay a chunked stream.
    let body = Generated::new(content.clone(), 10_007, MIB, false);
    let (status, _) = stream_through(&gw, "/api/v4/projects/1/uploads", body).await;
    assert_eq!(status, 200);
    let seen = rails.only();
    assert_eq!(seen.body_len, MIB);
    assert!(seen.body_head == content, "the body arrived altered");
    gw.stop().await;
}

#[tokio::test]
async fn h2c_request_reaches_rails_over_http1_with_the_authority_as_host() {
    let rails = StreamingRails::start(0).await;
    let gw = gateway().set("rails", &rails.url()).start().await;
    let answer = bounded(TestClient::http2().get(&gw.url("/api/v4/projects"))).await;
    assert_eq!(answer.status, 200);
    let seen = rails.only();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.host.unwrap(), gw.addr.to_string().as_str());
    gw.stop().await;
}
