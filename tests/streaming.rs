//! Long and slow bodies on real sockets: a download that outlasts the idle timeout is sent
//! whole (HTTP/1.1 and HTTP/2); a client that stops reading one is cut after the write
//! timeout; a pass-through upload that goes silent is cut after the body idle timeout, one
//! that trickles is not.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use support::raw::{RawConnection, PATIENCE};
use support::{gateway, Reply, TestClient, TestGateway};

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 10;

/// One-second header read and write clocks, and an idle clock of `idle`.
async fn gateway_with_short_clocks(idle: &str) -> TestGateway {
    let clocks =
        format!("header_read_timeout = \"1s\"\nidle_timeout = \"{idle}\"\nwrite_timeout = \"1s\"");
    gateway().set("server", &clocks).start().await
}

/// Ten chunks of 64 KiB, 300 ms apart: about three idle timeouts long.
fn slow_download() -> Reply {
    Reply::Drip {
        chunk: Bytes::from(vec![b'x'; CHUNK]),
        chunks: CHUNKS,
        every: Duration::from_millis(300),
    }
}

/// A body far larger than what socket buffers and the gateway hold for a stalled reader.
fn large_download() -> Reply {
    Reply::Respond {
        status: hyper::StatusCode::OK,
        headers: Vec::new(),
        body: Bytes::from(vec![b'x'; 64 << 20]),
    }
}

async fn download_outlasting_the_idle_timeout(client: TestClient) {
    let gw = gateway_with_short_clocks("1s").await;
    gw.rails.always(slow_download());
    let started = Instant::now();
    let answer = client.get(&gw.url("/api/v4/jobs/1/artifacts")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.len(), CHUNKS * CHUNK, "the whole body");
    assert!(started.elapsed() >= Duration::from_millis(2500));
}

#[tokio::test]
async fn a_download_that_outlasts_the_idle_timeout_is_sent_whole_over_http1() {
    download_outlasting_the_idle_timeout(TestClient::new()).await;
}

#[tokio::test]
async fn a_download_that_outlasts_the_idle_timeout_is_sent_whole_over_http2() {
    download_outlasting_the_idle_timeout(TestClient::http2()).await;
}

#[tokio::test]
async fn an_http1_client_that_stops_reading_is_cut_after_the_write_timeout() {
    // Only the write clock can end it in time: the idle clock is a minute.
    let gw = gateway_with_short_clocks("60s").await;
    gw.rails.always(large_download());
    let connection = RawConnection::send(
        gw.addr,
        b"GET /api/v4/jobs/1/artifacts HTTP/1.1\r\nhost: gitlab.example.com\r\n\r\n",
    )
    .await;
    // Reads nothing for longer than a look at the header deadline plus a write timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let received = connection.read_to_end(PATIENCE).await;
    assert_eq!(received.status(), 200);
    assert!(
        received.body.len() < 32 << 20,
        "cut: {} of 64 MiB arrived",
        received.body.len()
    );
}

#[tokio::test]
async fn an_http2_client_whose_window_stays_full_is_cut_after_the_write_timeout() {
    // Only the write clock can end it in time: the idle clock is a minute.
    let gw = gateway_with_short_clocks("60s").await;
    gw.rails.always(large_download());
    let client: Client<HttpConnector, Full<Bytes>> = support::h2c_client();
    let request = Request::get(gw.url("/api/v4/jobs/1/artifacts"))
        .body(Full::default())
        .unwrap();
    let response = client.request(request).await.expect("response headers");
    assert_eq!(response.status(), 200);
    // The body is not read, so the client grants no window beyond its first.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let read = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the stream ended in time");
    assert!(read.is_err(), "the stream was cut, not finished");
}

const UPLOAD: &str = "/api/v4/projects/1/uploads";

async fn gateway_with_body_idle_timeout() -> TestGateway {
    gateway()
        .set("server", "body_idle_timeout = \"1s\"")
        .start()
        .await
}

#[tokio::test]
async fn an_http1_upload_that_goes_silent_gets_408_after_the_body_idle_timeout() {
    let gw = gateway_with_body_idle_timeout().await;
    let started = Instant::now();
    let mut connection = RawConnection::send(
        gw.addr,
        format!(
            "POST {UPLOAD} HTTP/1.1\r\nhost: gitlab.example.com\r\ncontent-length: 1000\r\n\r\nten bytes."
        )
        .as_bytes(),
    )
    .await;
    let response = connection.response().await;
    assert_eq!(response.status, 408, "{response:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Rails sees its request end unfinished once the gateway aborts it.
    let waited = Instant::now();
    while gw.rails.count() == 0 && waited.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.rails.count(), 1, "the upload had begun upstream");
    assert!(
        gw.rails.last().body.len() < 1000,
        "Rails never saw a whole body"
    );
    connection.assert_closed(&response).await;
}

#[tokio::test]
async fn an_http1_upload_that_trickles_without_a_silence_is_forwarded_whole() {
    let gw = gateway_with_body_idle_timeout().await;
    let mut connection = RawConnection::connect(gw.addr).await;
    connection
        .write(
            format!(
                "POST {UPLOAD} HTTP/1.1\r\nhost: gitlab.example.com\r\ncontent-length: 8\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    // Eight bytes 400 ms apart: three seconds, never a second of silence.
    for byte in b"trickled" {
        tokio::time::sleep(Duration::from_millis(400)).await;
        connection.write(&[*byte]).await;
    }
    let response = connection.response().await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(gw.rails.last().body, "trickled");
}

/// A gateway whose Rails must answer within a second of a request's body having arrived.
async fn gateway_with_one_second_rails() -> TestGateway {
    gateway()
        .set("server", "body_idle_timeout = \"1s\"")
        .set("rails", "timeout = \"1s\"")
        .start()
        .await
}

/// Sends an upload of `bytes` one byte every 400 ms (no silence reaches the body idle
/// timeout), and reads the answer.
async fn trickled_upload(gw: &TestGateway, bytes: &[u8]) -> support::raw::RawResponse {
    let mut connection = RawConnection::connect(gw.addr).await;
    let head = format!(
        "POST {UPLOAD} HTTP/1.1\r\nhost: gitlab.example.com\r\ncontent-length: {}\r\n\r\n",
        bytes.len()
    );
    connection.write(head.as_bytes()).await;
    for byte in bytes {
        tokio::time::sleep(Duration::from_millis(400)).await;
        connection.write(&[*byte]).await;
    }
    connection.response().await
}

#[tokio::test]
async fn rails_timeout_does_not_run_while_an_upload_is_still_arriving() {
    let gw = gateway_with_one_second_rails().await;
    // Three seconds of upload against a one-second Rails clock.
    let response = trickled_upload(&gw, b"trickled").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(gw.rails.last().body, "trickled");
}

#[tokio::test]
async fn rails_timeout_runs_from_the_end_of_the_upload() {
    let gw = gateway_with_one_second_rails().await;
    gw.rails.always(Reply::After(
        Duration::from_secs(3),
        Box::new(Reply::status(200)),
    ));
    let started = Instant::now();
    // About 1.6 s of upload, then Rails keeps the gateway waiting.
    let response = trickled_upload(&gw, b"slow").await;
    let elapsed = started.elapsed();
    assert_eq!(response.status, 504, "{response:?}");
    assert!(
        elapsed >= Duration::from_millis(2500),
        "one second after the body ended, not after the request began: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_millis(4500), "{elapsed:?}");
}

/// A request body that sends one byte of the million it declares, then nothing.
struct OneByteThenSilence(bool);

impl hyper::body::Body for OneByteThenSilence {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"x")))))
    }
}

#[tokio::test]
async fn an_http2_upload_that_goes_silent_gets_408_after_the_body_idle_timeout() {
    let gw = gateway_with_body_idle_timeout().await;
    let client: Client<HttpConnector, OneByteThenSilence> = support::h2c_client();
    let request = Request::post(gw.url(UPLOAD))
        .header("content-length", "1000000")
        .body(OneByteThenSilence(false))
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("answered in time")
        .expect("a response");
    assert_eq!(response.status(), 408);
}
