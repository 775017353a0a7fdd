//! Limits against clients that ask for too much: URI length (414), header size (431),
//! concurrent connections (the rest wait; on the admin listener the connection idle longest
//! makes room, so probes answer), OAuth bodies buffered at once (503), and how long an idle
//! keep-alive connection is kept.

mod support;

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use iamproxy::server::admin::ADMIN_CONNECTIONS;
use support::raw::RawConnection;
use support::{gateway, until, Reply, TestClient};

/// Sends `request` on `connection` and reads its response (within
/// [`support::raw::PATIENCE`], 5 s); returns the status.
async fn exchange(connection: &mut RawConnection, request: &[u8]) -> u16 {
    connection.write(request).await;
    connection.response().await.status
}

fn get(path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: gateway\r\n{extra_headers}\r\n").into_bytes()
}

#[tokio::test]
async fn a_uri_over_max_uri_bytes_is_414_and_one_at_the_limit_is_served() {
    let gw = gateway()
        .set("server", "max_uri_bytes = 1024")
        .start()
        .await;
    let client = TestClient::new();
    let at_limit = format!("/oauth/authorize?client_id=x&state={}", "s".repeat(990));
    let at_limit = &at_limit[..1024];
    assert_eq!(client.get(&gw.url(at_limit)).await.status, 200);
    let served = gw.upstream_counts();

    let over = format!("{at_limit}s");
    assert_eq!(client.get(&gw.url(&over)).await.status, 414);
    let long_path = format!("/api/{}", "p".repeat(1100));
    assert_eq!(client.get(&gw.url(&long_path)).await.status, 414);
    assert_eq!(
        gw.upstream_counts(),
        served,
        "no upstream saw the long URIs"
    );
}

#[tokio::test]
async fn headers_over_max_header_bytes_are_431_and_the_gateway_keeps_serving() {
    let gw = gateway()
        .set("server", "max_header_bytes = 8192")
        .start()
        .await;
    let mut connection = RawConnection::connect(gw.addr).await;
    let big = format!("x-big: {}\r\n", "v".repeat(9000));
    assert_eq!(
        exchange(&mut connection, &get("/api/v4/version", &big)).await,
        431
    );

    let mut many = String::new();
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    let mut connection = RawConnection::connect(gw.addr).await;
    assert_eq!(
        exchange(&mut connection, &get("/api/v4/version", &many)).await,
        431
    );
    assert_eq!(gw.rails.count(), 0);

    let mut connection = RawConnection::connect(gw.addr).await;
    let fits = format!("x-ok: {}\r\n", "v".repeat(4000));
    assert_eq!(
        exchange(&mut connection, &get("/api/v4/version", &fits)).await,
        200
    );
}

#[tokio::test]
async fn connections_over_max_connections_wait_until_one_closes() {
    let gw = gateway().set("server", "max_connections = 2").start().await;
    let mut first = RawConnection::connect(gw.addr).await;
    let mut second = RawConnection::connect(gw.addr).await;
    assert_eq!(exchange(&mut first, &get("/one", "")).await, 200);
    assert_eq!(exchange(&mut second, &get("/two", "")).await, 200);

    // Both stay open (keep-alive): a third connection is not served...
    let mut third = RawConnection::connect(gw.addr).await;
    third.write(&get("/three", "")).await;
    third
        .assert_silent_for(
            Duration::from_millis(300),
            "a third connection was served beyond the limit",
        )
        .await;
    assert_eq!(gw.rails.count(), 2);

    // ...until one of the first two goes away: served within 5 s.
    drop(first);
    let served = third.response().await;
    assert!(served.status_line.starts_with("HTTP/1.1 200"), "{served:?}");
    assert_eq!(gw.rails.count(), 3);
}

#[tokio::test]
async fn probes_answer_while_idle_keep_alive_connections_fill_the_admin_listener() {
    let gw = gateway().start().await;
    // Every admin connection taken, each idle after one request (idle_timeout is 60 s).
    let mut open = Vec::new();
    for _ in 0..ADMIN_CONNECTIONS {
        let mut connection = RawConnection::connect(gw.admin).await;
        assert_eq!(
            exchange(&mut connection, &get("/-/liveness", "")).await,
            200
        );
        open.push(connection);
    }

    let probes = ["/-/readiness", "/-/liveness", "/metrics"];
    for probe in probes {
        let started = Instant::now();
        let mut connection = RawConnection::connect(gw.admin).await;
        assert_eq!(
            exchange(&mut connection, &get(probe, "")).await,
            200,
            "{probe}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{probe} took {:?}",
            started.elapsed()
        );
        open.push(connection);
    }

    // Room was made by closing the connections idle longest: the first ones, in order.
    let mut rest = open.split_off(probes.len());
    for mut closed in open {
        closed.assert_closed_within(Duration::from_secs(2)).await;
    }
    // The others, the probes' own included, are still open and served.
    let last = rest.len() - 1;
    for i in [0, last] {
        assert_eq!(exchange(&mut rest[i], &get("/-/liveness", "")).await, 200);
    }
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout_not_header_read_timeout() {
    let gw = gateway()
        .set(
            "server",
            "header_read_timeout = \"200ms\"\nidle_timeout = \"1500ms\"",
        )
        .start()
        .await;
    let mut connection = RawConnection::connect(gw.addr).await;
    assert_eq!(exchange(&mut connection, &get("/first", "")).await, 200);
    // Well past the header read timeout, well before the idle timeout: still usable.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(exchange(&mut connection, &get("/second", "")).await, 200);
    connection
        .assert_closed_within(Duration::from_secs(10))
        .await;
    assert_eq!(gw.rails.count(), 2);
}

#[tokio::test]
async fn a_request_head_that_stalls_is_closed_after_header_read_timeout() {
    let gw = gateway()
        .set("server", "header_read_timeout = \"300ms\"")
        .start()
        .await;
    // On a fresh connection, and on a keep-alive one after its first request.
    let mut fresh = RawConnection::connect(gw.addr).await;
    fresh.write(b"GET /slow HTTP/1.1\r\nHo").await;
    let mut reused = RawConnection::connect(gw.addr).await;
    assert_eq!(exchange(&mut reused, &get("/first", "")).await, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    reused.write(b"GET /slow HTTP/1.1\r\nHo").await;
    eprintln!("fresh");
    fresh.assert_closed_within(Duration::from_secs(5)).await;
    eprintln!("reused");
    reused.assert_closed_within(Duration::from_secs(5)).await;
    assert_eq!(gw.rails.count(), 1, "the stalled heads never reached Rails");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_header_read_timeout() {
    let gw = gateway()
        .set("server", "header_read_timeout = \"300ms\"")
        .start()
        .await;
    let mut silent = RawConnection::connect(gw.addr).await;
    silent.assert_closed_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_cancels_the_upstream_exchange() {
    let gw = gateway().set("iam", "timeout = \"30s\"").start().await;
    gw.preauth.always(Reply::destination("iam"));
    gw.iam.always(Reply::Hang);
    let mut connection = RawConnection::connect(gw.addr).await;
    let body = "grant_type=client_credentials&client_id=app-1";
    let request = format!(
        "POST /oauth/token HTTP/1.1\r\nhost: gateway\r\ncontent-type: \
         application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    connection.write(request.as_bytes()).await;
    let in_flight =
        |scrape: &support::metrics::Scrape| scrape.value("iamproxy_requests_in_flight", &[]);
    until(Duration::from_secs(2), "IAM holds the request", || async {
        gw.iam.count() == 1
    })
    .await;
    assert_eq!(in_flight(&support::metrics::scrape(gw.admin).await), 1.0);

    drop(connection);
    until(Duration::from_secs(2), "the request is dropped", || async {
        in_flight(&support::metrics::scrape(gw.admin).await) == 0.0
    })
    .await;
    assert_eq!(gw.rails.count(), 0, "a cancelled request is not replayed");
}

#[tokio::test]
async fn connecting_to_a_rails_that_never_accepts_is_bounded_by_rails_connect_timeout() {
    // A listener that never accepts, its backlog filled: further connects hang in SYN.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.listen(1).unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(stuck_addr)).await
        {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    let gw = gateway()
        .set(
            "rails",
            &format!("url = \"http://{stuck_addr}\"\nconnect_timeout = \"200ms\""),
        )
        .start()
        .await;
    let started = std::time::Instant::now();
    let answer = TestClient::new().get(&gw.url("/api/v4/version")).await;
    assert_eq!(answer.status, 502);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "connect gave up after {took:?}, not rails.connect_timeout"
    );
    drop(fillers);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let gw = gateway()
        .set(
            "server",
            "header_read_timeout = \"200ms\"\nidle_timeout = \"1500ms\"",
        )
        .start()
        .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let get = |path: &str| {
        hyper::Request::get(format!("http://{}{path}", gw.addr))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let first = sender.send_request(get("/first")).await.unwrap();
    assert_eq!(first.status(), 200);
    // HTTP/2 has no header read clock between requests: only the idle one.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = sender.send_request(get("/second")).await.unwrap();
    assert_eq!(second.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the gateway closes the idle HTTP/2 connection")
        .unwrap()
        .expect("with a GOAWAY, not an error");
    assert_eq!(gw.rails.count(), 2);
}

/// A token request declaring a 4 KiB body, of which only the head and `sent` go out.
fn token_head(length: usize) -> String {
    format!(
        "POST /oauth/token HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {length}\r\n\r\n"
    )
}

/// `grant_type=…&client_id=app-1`, padded with `&pad=…` to exactly `length` bytes.
fn token_form(length: usize) -> String {
    let form = "grant_type=client_credentials&client_id=app-1&pad=";
    format!("{form}{}", "x".repeat(length - form.len()))
}

#[tokio::test]
async fn oauth_bodies_past_max_buffered_bytes_get_503_until_one_is_done() {
    let gw = gateway()
        .set("server", "max_body_bytes = 4096\nmax_buffered_bytes = 6144")
        .start()
        .await;
    let whole = |length: usize| format!("{}{}", token_head(length), token_form(length));
    // A body of 4 KiB on its way holds 4 KiB of the budget from its head on.
    let mut first = RawConnection::connect(gw.addr).await;
    first.write(token_head(4096).as_bytes()).await;
    // Another 4 KiB does not fit once that head has been read.
    let refused = loop {
        let mut probe = RawConnection::connect(gw.addr).await;
        probe.write(whole(4096).as_bytes()).await;
        let response = probe.response().await;
        if response.status == 503 {
            break response;
        }
        assert_eq!(response.status, 200, "{response:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.header("retry-after"), Some("1"));
    // A chunked body is counted as it arrives: with 2 KiB left, its third KiB is refused.
    let mut chunked = RawConnection::connect(gw.addr).await;
    chunked
        .write(b"POST /oauth/token HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    let chunk = format!("{:x}\r\n{}\r\n", 1000, "x".repeat(1000));
    for _ in 0..3 {
        chunked.write(chunk.as_bytes()).await;
    }
    assert_eq!(chunked.response().await.status, 503);
    // The first finishes: its share comes back, and 4 KiB fits again.
    first.write(token_form(4096).as_bytes()).await;
    assert_eq!(first.response().await.status, 200);
    let mut again = RawConnection::connect(gw.addr).await;
    again.write(whole(4096).as_bytes()).await;
    assert_eq!(again.response().await.status, 200);
}
