//! Unix sockets on both sides of the gateway: listening on one (its mode, a stale file
//! replaced, removal on exit, what a peer counts as), and Rails, IAM and the pre-authorize
//! backend reached through theirs.

mod support;

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use support::metrics::scrape;
use support::unix::{send_unix, SocketDir};
use support::{gateway, send, FakeUpstream, GatewayFakes, Reply, TestGateway};

fn get(path: &str) -> hyper::http::request::Builder {
    Request::get(path).header("host", "gitlab.example.com")
}

fn empty(builder: hyper::http::request::Builder) -> Request<Full<Bytes>> {
    builder.body(Full::default()).unwrap()
}

/// A gateway listening on `main` and `admin` in front of TCP fakes, with `server` keys.
async fn on_sockets(main: &Path, admin: &Path, server: &str) -> TestGateway {
    let listen = format!(
        "listen = \"unix:{}\"\nadmin_listen = \"unix:{}\"\n{server}",
        main.display(),
        admin.display()
    );
    gateway().set("server", &listen).start().await
}

#[tokio::test]
async fn the_gateway_serves_on_a_unix_socket_with_its_mode_and_removes_it_on_exit() {
    let dir = SocketDir::new();
    let (main, admin) = (dir.path("gw.sock"), dir.path("admin.sock"));
    let gw = on_sockets(&main, &admin, "socket_mode = \"0660\"").await;
    for socket in [&main, &admin] {
        let metadata = std::fs::symlink_metadata(socket).unwrap();
        assert!(metadata.file_type().is_socket(), "{}", socket.display());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    }

    let answer = send_unix(&main, empty(get("/api/v4/projects"))).await;
    assert_eq!(answer.served_by(), "rails");
    assert_eq!(gw.rails.last().headers["host"], "gitlab.example.com");
    let ready = send_unix(&admin, empty(get("/-/readiness"))).await;
    assert_eq!(ready.status, StatusCode::OK);

    gw.stop().await;
    assert!(!main.exists(), "the socket file is removed on exit");
    assert!(!admin.exists(), "the admin socket file too");
}

#[tokio::test]
async fn a_unix_peer_counts_as_127_0_0_1_and_its_chain_is_kept_only_when_that_is_trusted() {
    let forged = || {
        empty(
            get("/api/v4/projects")
                .header("x-forwarded-for", "203.0.113.9")
                .header("x-forwarded-proto", "https"),
        )
    };
    let dir = SocketDir::new();
    let (main, admin) = (dir.path("gw.sock"), dir.path("admin.sock"));
    let untrusted = on_sockets(&main, &admin, "").await;
    send_unix(&main, forged()).await;
    let received = untrusted.rails.last();
    assert_eq!(received.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(received.headers["x-forwarded-proto"], "http");
    untrusted.stop().await;

    let trusted = on_sockets(&main, &admin, "trusted_cidrs = [\"127.0.0.1\"]").await;
    send_unix(&main, forged()).await;
    let received = trusted.rails.last();
    assert_eq!(
        received.headers["x-forwarded-for"],
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(received.headers["x-forwarded-proto"], "https");
}

/// `Gateway::bind` with the main listener at `path`, or its error.
async fn bind_at(path: &Path) -> Result<iamproxy::Gateway, String> {
    let text = format!(
        "[server]\nlisten = \"unix:{}\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [rails]\nurl = \"http://127.0.0.1:1\"\n",
        path.display()
    );
    let config = iamproxy::Config::from_toml(&text).unwrap();
    iamproxy::Gateway::bind(config)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced_and_a_live_one_or_another_file_is_refused() {
    let dir = SocketDir::new();
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "a crashed run leaves its socket file");
    let gateway = bind_at(&stale).await.expect("the stale socket is replaced");
    assert_eq!(
        gateway.listen_addr().to_string(),
        format!("unix:{}", stale.display())
    );
    drop(gateway);

    let live = dir.path("live.sock");
    let _running = tokio::net::UnixListener::bind(&live).unwrap();
    assert_eq!(
        bind_at(&live).await.err().as_deref(),
        Some(&*format!(
            "server.listen: cannot listen on unix:{}: another process is accepting \
             connections on this socket",
            live.display()
        ))
    );
    assert!(live.exists(), "a live socket is left alone");

    let plain = dir.path("config.toml");
    std::fs::write(&plain, "keep me").unwrap();
    assert_eq!(
        bind_at(&plain).await.err().as_deref(),
        Some(&*format!(
            "server.listen: cannot listen on unix:{}: the path exists and is not a socket \
             (only a socket left by a crashed run is replaced)",
            plain.display()
        ))
    );
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep me");
}

async fn unix_fakes(dir: &SocketDir) -> GatewayFakes {
    let preauth = FakeUpstream::start_unix("preauthorize", &dir.path("gitlab.socket")).await;
    preauth.always(Reply::destination("iam"));
    GatewayFakes {
        rails: FakeUpstream::start_unix("rails", &dir.path("workhorse.socket")).await,
        iam: FakeUpstream::start_unix("iam", &dir.path("iam.socket")).await,
        preauth,
    }
}

#[tokio::test]
async fn rails_iam_and_pre_authorize_are_reached_over_their_sockets() {
    let dir = SocketDir::new();
    let gw = gateway().start_with(unix_fakes(&dir).await).await;
    assert!(gw.toml.contains("url = \"unix:"), "{}", gw.toml);

    let answer = send(empty(get(&gw.url("/oauth/authorize?client_id=app")))).await;
    assert_eq!(answer.served_by(), "iam");
    let iam = gw.iam.last();
    assert_eq!(iam.headers["host"], "localhost");
    assert_eq!(iam.headers["x-forwarded-host"], "gitlab.example.com");
    let preauth = gw.preauth.last();
    assert_eq!(preauth.uri, "/-/oauth/iam_routing?client_id=app");
    assert_eq!(preauth.headers["host"], "localhost");

    let answer = send(empty(get(&gw.url("/api/v4/version")))).await;
    assert_eq!(answer.served_by(), "rails");
    assert_eq!(gw.rails.last().headers["host"], "gitlab.example.com");

    gw.iam.always(Reply::status(503));
    let answer = send(empty(get(&gw.url("/oauth/authorize?client_id=app")))).await;
    assert_eq!(answer.served_by(), "rails", "replayed to Rails' socket");
    assert_eq!(gw.rails.last().uri, "/oauth/authorize?client_id=app");
}

#[tokio::test]
async fn iam_host_and_preauthorize_host_set_the_host_a_socket_upstream_gets() {
    let dir = SocketDir::new();
    let gw = gateway()
        .set("iam", "host = \"iam.internal\"")
        .set("preauthorize", "host = \"gitlab.internal:8080\"")
        .start_with(unix_fakes(&dir).await)
        .await;
    let answer = send(empty(get(&gw.url("/oauth/authorize?client_id=app")))).await;
    assert_eq!(answer.served_by(), "iam");
    assert_eq!(gw.iam.last().headers["host"], "iam.internal");
    assert_eq!(gw.preauth.last().headers["host"], "gitlab.internal:8080");
}

#[tokio::test]
async fn a_socket_nobody_listens_on_fails_like_a_refused_port() {
    let dir = SocketDir::new();
    let missing = dir.path("missing.sock");
    let gw = gateway()
        .iam_url(format!("unix:{}", missing.display()))
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    let answer = send(empty(get(&gw.url("/oauth/authorize?client_id=app")))).await;
    assert_eq!(
        answer.served_by(),
        "rails",
        "IAM unreachable: replayed to Rails"
    );
    let metrics = scrape(gw.admin).await;
    assert_eq!(
        metrics.value("iamproxy_fallbacks_total", &[("reason", "connect_error")]),
        1.0
    );

    let rails_missing = gateway()
        .without_iam()
        .set("rails", &format!("url = \"unix:{}\"", missing.display()))
        .start()
        .await;
    let answer = send(empty(get(&rails_missing.url("/api/v4/version")))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
}
