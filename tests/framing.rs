//! Request framing towards Rails: `Content-Length` goes out in the form hyper decoded, and
//! a GET's or HEAD's body reaches Rails, whether the client framed it with
//! `Content-Length`, in chunks (raw HTTP/1.1 connections), or in HTTP/2 DATA frames
//! without a length.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::Request;
use support::raw::{RawConnection, PATIENCE};
use support::{gateway, send_h2, TestGateway};

const BODY: &[u8] = b"hello";

/// `BODY` as one chunk and the last chunk.
const CHUNKED: &[u8] = b"5\r\nhello\r\n0\r\n\r\n";

/// Sends a request with `method`, the `framing` header lines and `body` on a raw
/// connection the gateway closes after its answer, and returns the status it answered.
async fn exchange(gw: &TestGateway, method: &str, framing: &str, body: &[u8]) -> u16 {
    let request = [
        format!(
            "{method} /api/v4/projects HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{framing}\r\n"
        )
        .as_bytes(),
        body,
    ]
    .concat();
    let received = RawConnection::send(gw.addr, &request)
        .await
        .read_to_end(PATIENCE)
        .await;
    received.status()
}

#[tokio::test]
async fn content_length_reaches_rails_as_the_number_hyper_decoded() {
    let gw = gateway().start().await;
    let cases = [
        ("leading zeros", "Content-Length: 005\r\n"),
        (
            "two lines of one value",
            "Content-Length: 05\r\nContent-Length: 5\r\n",
        ),
        ("already canonical", "Content-Length: 5\r\n"),
    ];
    for (case, framing) in cases {
        assert_eq!(exchange(&gw, "POST", framing, BODY).await, 200, "{case}");
        let received = gw.rails.last();
        let lengths: Vec<_> = received.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"], "{case}");
        assert_eq!(received.body, BODY, "{case}");
    }
    assert_eq!(gw.rails.count(), cases.len());
    gw.stop().await;
}

#[tokio::test]
async fn get_and_head_bodies_reach_rails_with_content_length_and_chunked() {
    let gw = gateway().start().await;
    for method in ["GET", "HEAD"] {
        for (framing, body) in [
            ("Content-Length: 5\r\n", BODY),
            ("Transfer-Encoding: chunked\r\n", CHUNKED),
        ] {
            let case = format!("{method} with {}", framing.trim_end());
            assert_eq!(exchange(&gw, method, framing, body).await, 200, "{case}");
            let received = gw.rails.last();
            assert_eq!(received.method.as_str(), method, "{case}");
            assert_eq!(received.body, BODY, "{case}");
        }
    }
    assert_eq!(gw.rails.count(), 4);
    gw.stop().await;
}

/// `BODY` as one frame, of a length it does not announce: HTTP/2 sends it with no
/// `Content-Length`.
struct Unannounced(Option<Bytes>);

impl Body for Unannounced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|data| Ok(Frame::data(data))))
    }
}

#[tokio::test]
async fn an_http2_get_body_without_a_length_reaches_rails() {
    let gw = gateway().start().await;
    for method in ["GET", "HEAD"] {
        let request = Request::builder()
            .method(method)
            .uri(gw.url("/api/v4/projects"))
            .body(Unannounced(Some(Bytes::from_static(BODY))))
            .unwrap();
        let answer = send_h2(gw.addr, request).await;
        assert_eq!(answer.status, 200, "{method}");
        let received = gw.rails.last();
        assert_eq!(received.method.as_str(), method);
        assert!(received.headers.get("content-length").is_none(), "{method}");
        assert_eq!(received.body, BODY, "{method}");
    }
    gw.stop().await;
}
