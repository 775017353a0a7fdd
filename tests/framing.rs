//! Request framing towards Rails, on raw connections: `Content-Length` goes out in the
//! form hyper decoded, and a GET's or HEAD's body reaches Rails, whether the client framed
//! it with `Content-Length` or in chunks.

mod support;

use support::raw::{RawConnection, PATIENCE};
use support::{gateway, TestGateway};

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
