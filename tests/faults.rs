//! The fault matrix (issue 4, item 6): each way IAM, the pre-authorize backend and Rails
//! can fail, what the client sees, how many requests each upstream received, and that the
//! gateway keeps serving afterwards. Faults another file already pins are run here again
//! only for what that file does not check (the next request, the counts).
//!
//! Timeouts here: `iam.timeout` 300ms, `rails.timeout` 300ms, `preauthorize.timeout` 200ms.
//!
//! | fault | what the client sees | covered by |
//! | --- | --- | --- |
//! | **IAM** (client routed to IAM) | | |
//! | refuses connections | Rails' answer, the request replayed byte for byte | `fallback.rs` `refused_iam_connection_replays_the_same_request_to_rails`; next request and counts: `faults.rs` `iam_serves_the_next_request_after_refusing_closing_or_hanging` |
//! | closes the connection before headers (FIN) | Rails' answer (replayed) | `fallback.rs` `iam_dropping_the_connection_replays_the_same_request_to_rails`; next request: `faults.rs` `iam_serves_the_next_request_after_refusing_closing_or_hanging` |
//! | accepts, never answers (> `iam.timeout`) | Rails' answer, after `iam.timeout` | `fallback.rs` `iam_hanging_past_its_timeout_replays_the_same_request_to_rails`, `hanging_iam_costs_the_client_no_more_than_iam_timeout`; next request: `faults.rs` `iam_serves_the_next_request_after_refusing_closing_or_hanging` |
//! | resets before headers (RST) | Rails' answer | `faults.rs` `iam_reset_before_headers_falls_back_to_rails_and_iam_serves_the_next_request` |
//! | resets mid-body (after its headers) | IAM's status and headers, then a truncated body; nothing replayed | `faults.rs` `iam_reset_mid_body_truncates_the_response_without_replaying_it_to_rails` |
//! | answers slowly, within `iam.timeout` | IAM's answer | `faults.rs` `iam_answering_slowly_within_its_timeout_serves_the_client` |
//! | answers slowly, beyond `iam.timeout` | Rails' answer at `iam.timeout`; IAM's late answer is discarded | `faults.rs` `iam_answering_after_its_timeout_falls_back_and_its_late_answer_reaches_no_one` |
//! | answers 500, 502, 503, 504 | Rails' answer (replayed) | `fallback.rs` `each_fallback_status_from_iam_replays_the_same_request_to_rails` |
//! | keeps failing (circuit breaker) | Rails' answer without trying IAM | `fallback.rs` `open_breaker_sends_iam_bound_requests_to_rails_without_trying_iam`, `after_open_for_one_probe_goes_to_iam_and_its_success_closes_the_breaker`, `a_failed_probe_reopens_the_breaker` |
//! | **pre-authorize backend** (each row: the client gets Rails' answer; nothing is cached, so the next request asks again) | | |
//! | refuses connections | Rails' answer | `preauthorize.rs` `preauthorize_errors_fail_open_to_rails_and_are_not_cached`, case "connection refused" |
//! | hangs beyond `preauthorize.timeout` | Rails' answer, after the timeout | `preauthorize.rs` `preauthorize_errors_fail_open_to_rails_and_are_not_cached`, case "timeout" |
//! | resets before headers | Rails' answer; IAM once the backend answers again | `faults.rs` `preauthorize_resets_and_oversized_answers_fail_open_uncached_until_it_answers_again` |
//! | resets mid-body (after a complete, valid answer's bytes) | Rails' answer | `faults.rs` `preauthorize_resets_and_oversized_answers_fail_open_uncached_until_it_answers_again` |
//! | 500 | Rails' answer | `preauthorize.rs` `preauthorize_errors_fail_open_to_rails_and_are_not_cached`, case "status 500" |
//! | 302 redirect | Rails' answer (the redirect is not followed) | `preauthorize.rs` `preauthorize_errors_fail_open_to_rails_and_are_not_cached`, case "redirect to IAM" |
//! | wrong content type | Rails' answer | `preauthorize.rs` `preauthorize_errors_fail_open_to_rails_and_are_not_cached`, case "text/html" |
//! | oversized body (64 KiB of valid JSON naming IAM) | Rails' answer | `faults.rs` `preauthorize_resets_and_oversized_answers_fail_open_uncached_until_it_answers_again` |
//! | invalid JSON | Rails' answer | `preauthorize.rs` `preauthorize_errors_fail_open_to_rails_and_are_not_cached`, case "bad JSON" |
//! | unknown destination | Rails' answer | `preauthorize.rs` `preauthorize_errors_fail_open_to_rails_and_are_not_cached`, case "unknown destination" |
//! | **Rails** | | |
//! | down (refused) | `502`, short text body | `forwarding.rs` `unreachable_rails_is_502`; next request once Rails is back: `faults.rs` `rails_serves_the_next_request_after_refusing_closing_or_timing_out` |
//! | closes before headers (FIN) | `502` | `forwarding.rs` `rails_dropping_the_connection_is_502`; next request: `faults.rs` `rails_serves_the_next_request_after_refusing_closing_or_timing_out` |
//! | slow beyond `rails.timeout` | `504`, short text body | `forwarding.rs` `rails_slower_than_its_timeout_is_504`; next request: `faults.rs` `rails_serves_the_next_request_after_refusing_closing_or_timing_out` |
//! | resets before headers (RST) | `502`, OAuth and passthrough alike | `faults.rs` `rails_reset_before_headers_is_502_and_rails_serves_the_next_request` |
//! | resets mid-body on passthrough | Rails' status and headers, then a truncated body | `faults.rs` `rails_reset_mid_body_truncates_the_passthrough_response_and_the_gateway_keeps_serving` |
//! | IAM down and Rails down, client routed to IAM | `502`, after falling back | `faults.rs` `iam_and_rails_both_down_is_502_after_falling_back` |
//! | **client** disconnects while IAM holds its request | nothing: the request, its upstream exchange and its replay are cancelled | `limits.rs` `a_client_that_disconnects_mid_request_cancels_the_upstream_exchange` |
//! | **leaks**: every reset, hang, slow and mid-body fault above at once on one gateway | each its answer above; then nothing in flight, no upstream connection left open, normal requests served, prompt shutdown | `faults.rs` `after_every_fault_nothing_is_in_flight_no_upstream_connection_stays_open_and_shutdown_is_prompt` |

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use support::metrics::scrape;
use support::raw::{RawConnection, Received};
use support::{gateway, refused_addr, send, Answer, GatewayBuilder, Reply, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Longest any single exchange in this file may take before the test fails.
const BOUND: Duration = Duration::from_secs(5);
const IAM_TIMEOUT: Duration = Duration::from_millis(300);
const WORKHORSE_JSON: &str = "application/vnd.gitlab-workhorse+json";
/// What a response cut off mid-body delivers of the 1000 bytes it declares.
const PARTIAL: &[u8] = b"0123456789";
const DECLARED: usize = 1000;

/// A gateway with this file's short timeouts and a breaker that stays out of the way (no
/// test here fails IAM more than a few times).
fn short_timeouts() -> GatewayBuilder {
    gateway()
        .set(
            "iam",
            &format!("timeout = \"{}ms\"", IAM_TIMEOUT.as_millis()),
        )
        .set("iam.circuit_breaker", "consecutive_failures = 100")
        .set("rails", "timeout = \"300ms\"")
        .set("preauthorize", "timeout = \"200ms\"")
}

/// A client-credentials token request for `client_id`; `query` (may be empty) tells the
/// raw fakes which fault to act out.
fn token(gw: &TestGateway, client_id: &str, query: &str) -> Request<Full<Bytes>> {
    Request::post(gw.url(&with_query("/oauth/token", query)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(format!(
            "grant_type=client_credentials&client_id={client_id}"
        ))))
        .unwrap()
}

/// A non-OAuth request, streamed to Rails.
fn passthrough(gw: &TestGateway, query: &str) -> Request<Full<Bytes>> {
    Request::get(gw.url(&with_query("/api/v4/projects", query)))
        .body(Full::default())
        .unwrap()
}

fn with_query(path: &str, query: &str) -> String {
    match query {
        "" => path.to_owned(),
        query => format!("{path}?{query}"),
    }
}

fn assert_served_by(answer: &Answer, upstream: &str, case: &str) {
    assert_eq!(answer.status, 200, "{case}: {}", answer.text());
    assert_eq!(answer.served_by(), upstream, "{case}");
}

/// The gateway's own error: `status` with a short plain-text body.
fn assert_gateway_error(answer: &Answer, status: u16, case: &str) {
    assert_eq!(answer.status, status, "{case}: {}", answer.text());
    let content_type = answer.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain"),
        "{case}: {content_type}"
    );
    assert!(
        !answer.body.is_empty() && answer.body.len() < 64,
        "{case}: short body: {:?}",
        answer.text()
    );
}

// ---------------------------------------------------------------------------------------
// A raw upstream, for faults a hyper server cannot act out

/// What a [`RawUpstream`] does once it has read a request in full.
#[derive(Debug, Clone)]
enum Act {
    /// `200` with `Connection: close`, after `delay`; the connection is then closed, so
    /// the gateway never pools it.
    Respond {
        delay: Duration,
        content_type: &'static str,
        body: Bytes,
    },
    /// Keep the connection open, unanswered, until the gateway closes it.
    Hang,
    /// Reset the connection (`SO_LINGER` 0, so the close sends RST) without answering.
    ResetBeforeHeaders,
    /// `200` headers declaring `Content-Length: 1000`, then `sent`, then a reset.
    ResetMidBody { sent: &'static [u8] },
}

impl Act {
    /// What the default fakes answer: `{"served_by": name}`.
    fn served_by(name: &str) -> Act {
        Act::Respond {
            delay: Duration::ZERO,
            content_type: "application/json",
            body: Bytes::from(format!(r#"{{"served_by":"{name}"}}"#)),
        }
    }

    /// A valid pre-authorize answer.
    fn destination(destination: &str) -> Act {
        Act::Respond {
            delay: Duration::ZERO,
            content_type: WORKHORSE_JSON,
            body: Bytes::from(format!(r#"{{"destination":"{destination}"}}"#)),
        }
    }

    fn after(self, wait: Duration) -> Act {
        match self {
            Act::Respond {
                content_type, body, ..
            } => Act::Respond {
                delay: wait,
                content_type,
                body,
            },
            other => other,
        }
    }
}

/// Picks the act for a request from its index (0 for the first request read) and its
/// request target (path and query).
type Script = dyn Fn(usize, &str) -> Act + Send + Sync;

/// An upstream on a plain `TcpListener`, for byte-level control: TCP resets and responses
/// cut off mid-body. It counts requests and the connections still open, which shows
/// whether the gateway closes connections it gave up on. Requests must carry their body
/// with `Content-Length` (or none), as the gateway's buffered OAuth requests and bodiless
/// GETs do.
#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(script: impl Fn(usize, &str) -> Act + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        RawUpstream::serve(listener, Arc::new(script))
    }

    /// Starts listening on `addr`: an upstream that was down comes back.
    async fn start_at(
        addr: SocketAddr,
        script: impl Fn(usize, &str) -> Act + Send + Sync + 'static,
    ) -> RawUpstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        RawUpstream::serve(listener, Arc::new(script))
    }

    /// The accept loop ends with the test's runtime.
    fn serve(listener: TcpListener, script: Arc<Script>) -> RawUpstream {
        let upstream = RawUpstream {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            open: Arc::default(),
        };
        let serving = upstream.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serving.open.fetch_add(1, Ordering::SeqCst);
                let (serving, script) = (serving.clone(), script.clone());
                tokio::spawn(async move {
                    serving.handle(stream, &*script).await;
                    serving.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        upstream
    }

    async fn handle(&self, mut stream: TcpStream, script: &Script) {
        let Some(target) = read_request(&mut stream).await else {
            return;
        };
        let index = self.requests.fetch_add(1, Ordering::SeqCst);
        match script(index, &target) {
            Act::Respond {
                delay,
                content_type,
                body,
            } => {
                tokio::time::sleep(delay).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            }
            Act::Hang => {
                let mut scratch = [0u8; 1024];
                while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
            }
            Act::ResetBeforeHeaders => reset(stream),
            Act::ResetMidBody { sent } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {WORKHORSE_JSON}\r\n\
                     content-length: {DECLARED}\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(sent).await;
                // Let the gateway take the head (so the response has begun) before the reset.
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset(stream);
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests read in full.
    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted and not yet closed.
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Closing with a zero linger sends RST instead of FIN.
fn reset(stream: TcpStream) {
    stream.set_zero_linger().unwrap();
    drop(stream);
}

/// Reads one request (head, and a `Content-Length` body); returns its request target, or
/// `None` when the peer closed first.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    while received.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    head.split(' ').nth(1).map(str::to_owned)
}

/// The value of query parameter `name` in a request target.
fn param<'t>(target: &'t str, name: &str) -> Option<&'t str> {
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The act a fault name in a query stands for, shared by the IAM and Rails fakes.
fn fault(name: &str) -> Option<Act> {
    match name {
        "hang" => Some(Act::Hang),
        "reset" => Some(Act::ResetBeforeHeaders),
        "reset_mid_body" => Some(Act::ResetMidBody { sent: PARTIAL }),
        _ => None,
    }
}

/// A raw stand-in for `upstream` ("iam" or "rails") that acts out the fault named by the
/// `upstream=<fault>` query parameter and otherwise answers `{"served_by": upstream}`.
async fn raw_faulty(upstream: &'static str) -> RawUpstream {
    RawUpstream::start(move |_, target| match param(target, upstream) {
        Some("slow") => Act::served_by(upstream).after(3 * IAM_TIMEOUT),
        Some(name) => fault(name).unwrap_or_else(|| Act::served_by(upstream)),
        None => Act::served_by(upstream),
    })
    .await
}

/// Sends `head` (plus `body`) on a new connection with `Connection: close`, and reads
/// until the gateway ends the connection, by FIN or RST.
async fn raw_exchange(addr: SocketAddr, head: &str, body: &str) -> Received {
    let mut connection = RawConnection::connect(addr).await;
    let request = format!(
        "{head}\r\nhost: gitlab.example.com\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    connection.write(request.as_bytes()).await;
    connection.read_to_end(BOUND).await
}

/// The client saw the upstream's `200` head declaring 1000 bytes, then only the 10 the
/// upstream sent before resetting, then the end of the connection: a short body.
fn assert_truncated(seen: &Received, case: &str) {
    let head = seen.head.to_lowercase();
    assert!(
        head.starts_with("http/1.1 200"),
        "{case}: the upstream's status was relayed: {head:?}"
    );
    assert!(
        head.contains(&format!("\r\ncontent-length: {DECLARED}\r\n")),
        "{case}: the declared length was relayed: {head:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&seen.body),
        String::from_utf8_lossy(PARTIAL),
        "{case}: the bytes sent before the reset, then the end"
    );
}

// ---------------------------------------------------------------------------------------
// IAM

#[tokio::test]
async fn iam_reset_before_headers_falls_back_to_rails_and_iam_serves_the_next_request() {
    let iam = RawUpstream::start(|index, _| match index {
        0 => Act::ResetBeforeHeaders,
        _ => Act::served_by("iam"),
    })
    .await;
    let gw = short_timeouts().iam_url(iam.url()).start().await;
    gw.preauth.always(Reply::destination("iam"));

    assert_served_by(&send(token(&gw, "app", "")).await, "rails", "reset");
    assert_eq!(iam.count(), 1, "IAM was tried once");
    assert_eq!(gw.rails.count(), 1, "replayed once");

    assert_served_by(&send(token(&gw, "app", "")).await, "iam", "next");
    assert_eq!(iam.count(), 2);
    assert_eq!(gw.rails.count(), 1, "the next request was not replayed");
    assert_eq!(gw.preauth.count(), 1, "the decision stayed cached");
    gw.stop().await;
}

#[tokio::test]
async fn iam_reset_mid_body_truncates_the_response_without_replaying_it_to_rails() {
    let iam = RawUpstream::start(|index, _| match index {
        0 => Act::ResetMidBody { sent: PARTIAL },
        _ => Act::served_by("iam"),
    })
    .await;
    let gw = short_timeouts().iam_url(iam.url()).start().await;
    gw.preauth.always(Reply::destination("iam"));

    let seen = raw_exchange(
        gw.addr,
        "POST /oauth/token HTTP/1.1\r\ncontent-type: application/x-www-form-urlencoded",
        "grant_type=client_credentials&client_id=app",
    )
    .await;
    assert_truncated(&seen, "IAM reset mid-body");
    assert_eq!(iam.count(), 1);
    assert_eq!(
        gw.rails.count(),
        0,
        "not replayed: IAM's response had begun streaming"
    );

    assert_served_by(&send(token(&gw, "app", "")).await, "iam", "next");
    assert_served_by(&send(passthrough(&gw, "")).await, "rails", "passthrough");
    assert_eq!(iam.count(), 2);
    assert_eq!(gw.rails.count(), 1, "only the passthrough request");
    gw.stop().await;
}

#[tokio::test]
async fn iam_answering_slowly_within_its_timeout_serves_the_client() {
    let gw = short_timeouts().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let slow = IAM_TIMEOUT / 3;
    gw.iam
        .always(Reply::text(200, r#"{"served_by":"iam"}"#).after(slow));

    let started = Instant::now();
    assert_served_by(&send(token(&gw, "app", "")).await, "iam", "slow IAM");
    assert!(started.elapsed() >= slow, "IAM really was slow");
    assert_eq!(gw.iam.count(), 1);
    assert_eq!(gw.rails.count(), 0, "no fallback");

    assert_served_by(&send(passthrough(&gw, "")).await, "rails", "passthrough");
    gw.stop().await;
}

#[tokio::test]
async fn iam_answering_after_its_timeout_falls_back_and_its_late_answer_reaches_no_one() {
    let gw = short_timeouts().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let late = 3 * IAM_TIMEOUT;
    gw.iam
        .always(Reply::text(200, r#"{"served_by":"iam-late"}"#).after(late));

    let started = Instant::now();
    assert_served_by(&send(token(&gw, "app", "")).await, "rails", "late IAM");
    let took = started.elapsed();
    assert!(
        took >= IAM_TIMEOUT && took < late,
        "answered at iam.timeout, not when IAM finally answered: {took:?}"
    );

    // Once IAM's late answer has gone out on the abandoned connection, a prompt IAM must
    // serve the next request with its own answer, not that stale one.
    tokio::time::sleep((late + Duration::from_millis(100)).saturating_sub(took)).await;
    gw.iam.always(Reply::text(200, r#"{"served_by":"iam"}"#));
    assert_served_by(&send(token(&gw, "app", "")).await, "iam", "next");
    assert_eq!(gw.iam.count(), 2);
    assert_eq!(gw.rails.count(), 1, "only the late request was replayed");
    gw.stop().await;
}

#[derive(Debug, Clone, Copy)]
enum Down {
    /// Nothing listens at the upstream's address; later something does.
    Refuses,
    /// Accepts and closes without answering (FIN).
    Closes,
    /// Accepts and never answers.
    Hangs,
}

#[tokio::test]
async fn iam_serves_the_next_request_after_refusing_closing_or_hanging() {
    for case in [Down::Refuses, Down::Closes, Down::Hangs] {
        let refused = refused_addr().await;
        let builder = short_timeouts();
        let gw = match case {
            Down::Refuses => builder.iam_url(format!("http://{refused}")),
            _ => builder,
        }
        .start()
        .await;
        gw.preauth.always(Reply::destination("iam"));
        match case {
            Down::Refuses => {}
            Down::Closes => gw.iam.always(Reply::Drop),
            Down::Hangs => gw.iam.always(Reply::Hang),
        }
        let name = format!("{case:?}");
        assert_served_by(&send(token(&gw, "app", "")).await, "rails", &name);

        // IAM is healthy again.
        let revived = match case {
            Down::Refuses => {
                Some(RawUpstream::start_at(refused, |_, _| Act::served_by("iam")).await)
            }
            _ => {
                gw.iam.always(Reply::text(200, r#"{"served_by":"iam"}"#));
                None
            }
        };
        assert_served_by(&send(token(&gw, "app", "")).await, "iam", &name);
        let iam_requests = match &revived {
            Some(revived) => (gw.iam.count(), revived.count()),
            None => (gw.iam.count(), 0),
        };
        let expected = if revived.is_some() { (0, 1) } else { (2, 0) };
        assert_eq!(iam_requests, expected, "{name}: IAM requests");
        assert_eq!(
            gw.rails.count(),
            1,
            "{name}: only the failed request replayed"
        );
        assert_eq!(gw.preauth.count(), 1, "{name}: the decision stayed cached");
        gw.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// The pre-authorize backend

#[tokio::test]
async fn preauthorize_resets_and_oversized_answers_fail_open_uncached_until_it_answers_again() {
    // Valid JSON naming IAM, padded far past any decision's size: only its size is wrong.
    let oversized = format!(r#"{{"destination":"iam"{}}}"#, " ".repeat(64 * 1024));
    let cases: [(&str, Act); 3] = [
        ("reset before headers", Act::ResetBeforeHeaders),
        (
            // Cut off after a complete, valid answer: only the missing bytes are wrong.
            "reset mid-body",
            Act::ResetMidBody {
                sent: br#"{"destination":"iam"}"#,
            },
        ),
        (
            "oversized body",
            Act::Respond {
                delay: Duration::ZERO,
                content_type: WORKHORSE_JSON,
                body: Bytes::from(oversized),
            },
        ),
    ];
    for (case, failure) in cases {
        // The first two calls fail; then the backend answers "iam".
        let backend = RawUpstream::start(move |index, _| match index {
            0 | 1 => failure.clone(),
            _ => Act::destination("iam"),
        })
        .await;
        let gw = short_timeouts()
            .set(
                "preauthorize",
                &format!("url = \"{}/-/oauth/iam_routing\"", backend.url()),
            )
            .start()
            .await;

        for attempt in 1..=2 {
            assert_served_by(&send(token(&gw, "app", "")).await, "rails", case);
            assert_eq!(backend.count(), attempt, "{case}: not cached, asked again");
        }
        assert_eq!(gw.iam.count(), 0, "{case}: never IAM on an error");

        // The backend answers again: its decision routes and is cached.
        for _ in 0..2 {
            assert_served_by(&send(token(&gw, "app", "")).await, "iam", case);
        }
        assert_eq!(backend.count(), 3, "{case}: the valid answer was cached");
        assert_eq!(
            (gw.rails.count(), gw.iam.count()),
            (2, 2),
            "{case}: requests served"
        );
        gw.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// Rails

#[tokio::test]
async fn rails_reset_before_headers_is_502_and_rails_serves_the_next_request() {
    let rails = raw_faulty("rails").await;
    let gw = short_timeouts()
        .set("rails", &format!("url = \"{}\"", rails.url()))
        .start()
        .await;

    let oauth = send(token(&gw, "app", "rails=reset")).await;
    assert_gateway_error(&oauth, 502, "OAuth request");
    let other = send(passthrough(&gw, "rails=reset")).await;
    assert_gateway_error(&other, 502, "passthrough");
    assert_eq!(rails.count(), 2, "each request reached Rails once");

    assert_served_by(&send(passthrough(&gw, "")).await, "rails", "next");
    assert_served_by(&send(token(&gw, "app", "")).await, "rails", "next OAuth");
    assert_eq!(rails.count(), 4);
    assert_eq!(gw.iam.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn rails_reset_mid_body_truncates_the_passthrough_response_and_the_gateway_keeps_serving() {
    let rails = raw_faulty("rails").await;
    let gw = short_timeouts()
        .set("rails", &format!("url = \"{}\"", rails.url()))
        .start()
        .await;

    let seen = raw_exchange(
        gw.addr,
        "GET /api/v4/projects?rails=reset_mid_body HTTP/1.1",
        "",
    )
    .await;
    assert_truncated(&seen, "Rails reset mid-body");
    assert_eq!(rails.count(), 1);

    assert_served_by(&send(passthrough(&gw, "")).await, "rails", "next");
    assert_eq!(rails.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn rails_serves_the_next_request_after_refusing_closing_or_timing_out() {
    for case in [Down::Refuses, Down::Closes, Down::Hangs] {
        let refused = refused_addr().await;
        let builder = short_timeouts();
        let gw = match case {
            Down::Refuses => builder.set("rails", &format!("url = \"http://{refused}\"")),
            _ => builder,
        }
        .start()
        .await;
        let status = match case {
            Down::Refuses => 502,
            Down::Closes => {
                gw.rails.always(Reply::Drop);
                502
            }
            Down::Hangs => {
                gw.rails.always(Reply::Hang);
                504
            }
        };
        let name = format!("{case:?}");
        assert_gateway_error(&send(passthrough(&gw, "")).await, status, &name);

        // Rails is healthy again.
        let revived = match case {
            Down::Refuses => {
                Some(RawUpstream::start_at(refused, |_, _| Act::served_by("rails")).await)
            }
            _ => {
                gw.rails
                    .always(Reply::text(200, r#"{"served_by":"rails"}"#));
                None
            }
        };
        assert_served_by(&send(passthrough(&gw, "")).await, "rails", &name);
        assert_served_by(&send(token(&gw, "app", "")).await, "rails", &name);
        let rails_requests = match &revived {
            Some(revived) => (gw.rails.count(), revived.count()),
            None => (gw.rails.count(), 0),
        };
        let expected = if revived.is_some() { (0, 2) } else { (3, 0) };
        assert_eq!(rails_requests, expected, "{name}: Rails requests");
        gw.stop().await;
    }
}

#[tokio::test]
async fn iam_and_rails_both_down_is_502_after_falling_back() {
    let (iam_addr, rails_addr) = (refused_addr().await, refused_addr().await);
    let gw = short_timeouts()
        .iam_url(format!("http://{iam_addr}"))
        .set("rails", &format!("url = \"http://{rails_addr}\""))
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));

    assert_gateway_error(&send(token(&gw, "app", "")).await, 502, "both down");
    let scraped = scrape(gw.admin).await;
    let errors = |upstream| {
        scraped.value(
            "iamproxy_upstream_connection_errors_total",
            &[("upstream", upstream)],
        )
    };
    assert_eq!(errors("iam"), 1.0, "IAM was tried");
    assert_eq!(
        scraped.value("iamproxy_fallbacks_total", &[("reason", "connect_error")]),
        1.0,
        "then the request fell back"
    );
    assert_eq!(errors("rails"), 1.0, "and Rails was tried");

    // Rails comes back while IAM stays down: the fallback serves again.
    let rails = RawUpstream::start_at(rails_addr, |_, _| Act::served_by("rails")).await;
    assert_served_by(&send(token(&gw, "app", "")).await, "rails", "Rails back");
    assert_eq!(rails.count(), 1);
    assert_eq!(gw.preauth.count(), 1);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Leaks

#[tokio::test]
async fn after_every_fault_nothing_is_in_flight_no_upstream_connection_stays_open_and_shutdown_is_prompt(
) {
    let iam = raw_faulty("iam").await;
    let rails = raw_faulty("rails").await;
    // Clients named after a fault meet it at the backend; every other client goes to IAM.
    let preauth = RawUpstream::start(|_, target| match param(target, "client_id") {
        Some("preauth-hang") => Act::Hang,
        Some("preauth-reset") => Act::ResetBeforeHeaders,
        Some("preauth-reset_mid_body") => Act::ResetMidBody { sent: PARTIAL },
        _ => Act::destination("iam"),
    })
    .await;
    let gw = short_timeouts()
        .iam_url(iam.url())
        .set("rails", &format!("url = \"{}\"", rails.url()))
        .set(
            "preauthorize",
            &format!("url = \"{}/-/oauth/iam_routing\"", preauth.url()),
        )
        // A connection the gateway failed to finish would hold shutdown for this long.
        .set("server", "shutdown_timeout = \"30s\"")
        .start()
        .await;

    // Every fault at once: (request, status the client must get, the upstream serving it).
    let faults: Vec<(Request<Full<Bytes>>, u16, &str)> = vec![
        (token(&gw, "app", "iam=reset"), 200, "rails"),
        (token(&gw, "app", "iam=hang"), 200, "rails"),
        (token(&gw, "app", "iam=slow"), 200, "rails"),
        (token(&gw, "preauth-hang", ""), 200, "rails"),
        (token(&gw, "preauth-reset", ""), 200, "rails"),
        (token(&gw, "preauth-reset_mid_body", ""), 200, "rails"),
        (passthrough(&gw, "rails=reset"), 502, ""),
        (passthrough(&gw, "rails=hang"), 504, ""),
        (token(&gw, "app", "iam=reset&rails=reset"), 502, ""),
    ];
    let mut answers = Vec::new();
    for (request, status, upstream) in faults {
        let case = request.uri().to_string();
        answers.push((case, status, upstream, tokio::spawn(send(request))));
    }
    let truncated = [
        "POST /oauth/token?iam=reset_mid_body HTTP/1.1\r\n\
         content-type: application/x-www-form-urlencoded",
        "GET /api/v4/projects?rails=reset_mid_body HTTP/1.1",
    ]
    .map(|head| {
        let addr = gw.addr;
        tokio::spawn(async move {
            raw_exchange(addr, head, "grant_type=client_credentials&client_id=app").await
        })
    });
    for (case, status, upstream, answer) in answers {
        let answer = answer.await.unwrap();
        match status {
            200 => assert_served_by(&answer, upstream, &case),
            _ => assert_gateway_error(&answer, status, &case),
        }
    }
    for seen in truncated {
        assert_truncated(&seen.await.unwrap(), "mid-body reset");
    }

    // The gateway closed every upstream connection it gave up on (the fakes close the
    // others themselves once they have answered or reset).
    let open = || (iam.open(), rails.open(), preauth.open());
    let closed = timeout(BOUND, async {
        while open() != (0, 0, 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "upstream connections still open (iam, rails, preauthorize): {:?}",
        open()
    );
    assert_eq!(
        scrape(gw.admin)
            .await
            .value("iamproxy_requests_in_flight", &[]),
        0.0,
        "no request is still being handled"
    );

    assert_served_by(
        &send(token(&gw, "app", "")).await,
        "iam",
        "after the faults",
    );
    assert_served_by(
        &send(passthrough(&gw, "")).await,
        "rails",
        "after the faults",
    );

    let started = Instant::now();
    timeout(BOUND, gw.stop())
        .await
        .expect("shutdown finished: no connection was left to drain");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "drained promptly: {:?}",
        started.elapsed()
    );
}
