//! Protocol upgrades: a WebSocket handshake on a non-OAuth path is tunnelled to Rails;
//! OAuth paths never upgrade.

mod support;

use std::time::Duration;

use support::{gateway, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PATIENCE: Duration = Duration::from_secs(5);

/// Reads from `stream` until the end of an HTTP head; returns the head.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read head");
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("ASCII head")
}

/// Connects to `addr`, sends a raw request head, and returns the connection with the
/// response head it got back.
async fn exchange_head(addr: std::net::SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(request).await.unwrap();
    let head = tokio::time::timeout(PATIENCE, read_head(&mut client))
        .await
        .expect("response head within patience");
    (client, head)
}

/// A Rails stand-in that accepts one WebSocket handshake, reports the request head it got,
/// then echoes every byte back.
async fn echoing_rails() -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
        head
    });
    (url, task)
}

#[tokio::test]
async fn websocket_upgrade_on_a_non_oauth_path_is_tunnelled_to_rails() {
    let (rails_url, rails) = echoing_rails().await;
    let gw = gateway()
        .set("rails", &format!("url = \"{rails_url}\""))
        .start()
        .await;

    let (mut client, head) = exchange_head(gw.addr, b"GET /-/cable HTTP/1.1\r\nHost: gitlab.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );

    client.write_all(b"frames both ways").await.unwrap();
    let mut echoed = [0u8; 16];
    tokio::time::timeout(PATIENCE, client.read_exact(&mut echoed))
        .await
        .expect("echo within patience")
        .unwrap();
    assert_eq!(&echoed, b"frames both ways");

    drop(client);
    let seen = tokio::time::timeout(PATIENCE, rails)
        .await
        .unwrap()
        .unwrap();
    let seen = seen.to_ascii_lowercase();
    assert!(seen.starts_with("get /-/cable http/1.1"), "{seen}");
    assert!(seen.contains("upgrade: websocket"), "{seen}");
    assert!(seen.contains("connection: upgrade"), "{seen}");
    assert!(seen.contains("host: gitlab.example.com"), "{seen}");
    assert!(
        seen.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{seen}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn upgrade_headers_on_an_oauth_path_are_dropped() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("rails"));
    let (_client, head) = exchange_head(gw.addr, b"GET /oauth/authorize?client_id=app HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = gw.rails.last();
    assert!(seen.headers.get("upgrade").is_none());
    assert!(seen.headers.get("connection").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn a_refused_upgrade_is_relayed_as_a_plain_response() {
    let gw = gateway().start().await;
    gw.rails
        .always(Reply::text(426, "upgrade required elsewhere"));
    let (_client, head) = exchange_head(
        gw.addr,
        b"GET /-/cable HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert_eq!(gw.rails.last().headers["upgrade"], "websocket");
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_closes_open_tunnels_and_waits_for_them_not_for_shutdown_timeout() {
    let (rails_url, rails) = echoing_rails().await;
    let gw = gateway()
        .set("rails", &format!("url = \"{rails_url}\""))
        .set("server", "shutdown_timeout = \"60s\"")
        .start()
        .await;
    let (mut client, head) = exchange_head(gw.addr, b"GET /-/cable HTTP/1.1\r\nHost: gitlab.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    client.read_exact(&mut echoed).await.unwrap();

    // Well inside the 60 s shutdown_timeout: the tunnel does not hold the exit.
    tokio::time::timeout(PATIENCE, gw.stop())
        .await
        .expect("shutdown closes the tunnel instead of waiting out shutdown_timeout");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, client.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the client side of the tunnel is closed");
    tokio::time::timeout(PATIENCE, rails)
        .await
        .expect("the Rails side of the tunnel is closed")
        .unwrap();
}
