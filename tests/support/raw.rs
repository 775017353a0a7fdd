//! A client that speaks HTTP/1.1 by hand on a plain `TcpStream`: for requests an HTTP
//! client would refuse to build or would frame differently (bytes sent exactly as given),
//! and for watching how and when the gateway ends a connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest one response, or the close after it, may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(5);
/// How long [`RawConnection::assert_nothing_more`] listens for a response nobody asked for.
const QUIET: Duration = Duration::from_millis(200);

/// One response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    /// As received, e.g. `HTTP/1.1 200 OK`.
    pub status_line: String,
    pub status: u16,
    /// Lower-cased names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Which fake served it, from the default `{"served_by": …}` body.
    pub fn served_by(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["served_by"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("<{self:?}>"))
    }
}

/// Everything a connection delivered until the gateway ended it, however well or badly
/// framed, split after the first head.
#[derive(Debug)]
pub struct Received {
    /// Up to and including the first blank line (all of it when there is none), decoded
    /// lossily, as received.
    pub head: String,
    /// The bytes after the head.
    pub body: Vec<u8>,
    /// The connection ended with an error (a reset) rather than a FIN.
    pub reset: bool,
}

impl Received {
    /// The status code on the first line.
    pub fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|status| status.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {self:?}"))
    }
}

/// A client connection that sends bytes as given and reads responses byte by byte.
pub struct RawConnection {
    stream: TcpStream,
    /// Read and not yet taken as a response.
    received: Vec<u8>,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> RawConnection {
        RawConnection {
            stream: TcpStream::connect(addr).await.unwrap(),
            received: Vec::new(),
        }
    }

    /// Connects and writes `request`. A write error is ignored: the gateway may answer and
    /// close before it has read everything (e.g. a 413 before the body).
    pub async fn send(addr: SocketAddr, request: &[u8]) -> RawConnection {
        let mut connection = RawConnection::connect(addr).await;
        let _ = connection.stream.write_all(request).await;
        connection
    }

    /// Writes `bytes`, which must all go out.
    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("wrote to the gateway");
    }

    /// Reads exactly one response (it must carry `Content-Length`) within [`PATIENCE`],
    /// leaving any bytes after it for [`RawConnection::assert_closed`] to complain about.
    pub async fn response(&mut self) -> RawResponse {
        let read = async {
            loop {
                if let Some(response) = self.take_response() {
                    return response;
                }
                let mut chunk = [0u8; 16 * 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => panic!(
                        "connection ended before a complete response; received {:?}",
                        String::from_utf8_lossy(&self.received)
                    ),
                    Ok(n) => self.received.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("the gateway answered in time")
    }

    fn take_response(&mut self) -> Option<RawResponse> {
        let end = self.received.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8(self.received[..end].to_vec()).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header line");
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or_else(|| panic!("response without content-length: {head}"));
        let body_start = end + 4;
        if self.received.len() < body_start + length {
            return None;
        }
        let body = self.received[body_start..body_start + length].to_vec();
        self.received.drain(..body_start + length);
        Some(RawResponse {
            status_line: status_line.to_owned(),
            status,
            headers,
            body,
        })
    }

    /// Reads until the gateway ends the connection, by FIN or RST, failing the test after
    /// `within`; for responses cut off mid-body or framed by the close.
    pub async fn read_to_end(mut self, within: Duration) -> Received {
        let mut received = std::mem::take(&mut self.received);
        let mut chunk = [0u8; 4096];
        let reset = tokio::time::timeout(within, async {
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) => return false,
                    Err(_) => return true,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the gateway ended the connection within {within:?}"));
        let end = received
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(received.len(), |end| end + 4);
        Received {
            head: String::from_utf8_lossy(&received[..end]).into_owned(),
            body: received[end..].to_vec(),
            reset,
        }
    }

    /// Asserts the gateway closes the connection (FIN, or a reset when it left request
    /// bytes unread) within [`PATIENCE`] without sending anything more after `response`.
    pub async fn assert_closed(mut self, response: &RawResponse) {
        let rest = tokio::time::timeout(PATIENCE, async {
            let mut rest = Vec::new();
            let _ = self.stream.read_to_end(&mut rest).await;
            rest
        })
        .await
        .unwrap_or_else(|_| panic!("the gateway closed the connection after {response:?}"));
        self.received.extend_from_slice(&rest);
        assert!(
            self.received.is_empty(),
            "nothing after the response, got {:?}",
            String::from_utf8_lossy(&self.received)
        );
    }

    /// Asserts the next read finds the connection closed (FIN or reset) within `within`:
    /// the gateway gave up on it, e.g. idle or stalled.
    pub async fn assert_closed_within(&mut self, within: Duration) {
        let mut chunk = [0u8; 64];
        let closed = tokio::time::timeout(within, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("the connection is still open after {within:?}"));
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "expected EOF, got {closed:?}"
        );
    }

    /// Asserts nothing more arrived: no second response to bytes a wrong parse would have
    /// left over.
    pub async fn assert_nothing_more(mut self) {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(QUIET, self.stream.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => self.received.extend_from_slice(&chunk[..n]),
        }
        assert!(
            self.received.is_empty(),
            "a second response: {:?}",
            String::from_utf8_lossy(&self.received)
        );
    }

    /// Asserts that for `duration` the gateway neither sends anything nor closes the
    /// connection: it is holding the request, e.g. at a connection limit.
    pub async fn assert_silent_for(&mut self, duration: Duration, case: &str) {
        let mut chunk = [0u8; 64];
        let read = tokio::time::timeout(duration, self.stream.read(&mut chunk)).await;
        assert!(read.is_err(), "{case}: within {duration:?}, {read:?}");
    }
}
