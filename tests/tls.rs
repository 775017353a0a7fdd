//! TLS both ways: the main listener serves HTTPS with the configured certificate (HTTP/1.1
//! and HTTP/2 by ALPN) and swaps it on reload; HTTPS upstreams are verified against
//! `ca_file`, and one presenting an untrusted certificate is refused with an error that
//! says so, while the client still gets its answer the fail-open way.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::logs::Captured;
use support::tls::{https_request, Ca, Leaf, TlsFront};
use support::{gateway, GatewayFakes, Reply, TestClient, TestGateway};

fn get(path: &str, http2: bool) -> Request<Full<Bytes>> {
    // HTTP/2 carries the authority in the URI; HTTP/1.1 in Host.
    let builder = if http2 {
        Request::get(format!("https://localhost{path}"))
    } else {
        Request::get(path).header("host", "localhost")
    };
    builder.body(Full::default()).unwrap()
}

#[tokio::test]
async fn the_listener_serves_https_by_alpn_and_tells_rails_the_client_used_https() {
    let ca = Ca::new("listener CA");
    let leaf = ca.leaf(&["localhost"]);
    let files = leaf.files();
    let gw = gateway()
        .set("server.tls", &Leaf::server_tls_keys(&files))
        .start()
        .await;
    for (http2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let answer = https_request(gw.addr, &ca, http2, get("/api/v4/projects", http2)).await;
        assert_eq!(answer.status, 200, "http2: {http2}");
        assert_eq!(answer.version, version);
        assert_eq!(answer.served_by(), "rails");
        assert_eq!(answer.certificate, leaf.der, "the configured certificate");
        assert_eq!(gw.rails.last().headers["x-forwarded-proto"], "https");
    }
    gw.stop().await;
}

#[tokio::test]
async fn plain_http_and_untrusting_clients_are_refused_and_the_listener_keeps_serving() {
    let ca = Ca::new("listener CA");
    let files = ca.leaf(&["localhost"]).files();
    let gw = gateway()
        .set("server.tls", &Leaf::server_tls_keys(&files))
        .start()
        .await;

    let mut plain = TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(b"GET /api/v4/projects HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the connection is closed, not left hanging");
    assert!(
        !reply.starts_with(b"HTTP/"),
        "no HTTP answer in cleartext: {:?}",
        String::from_utf8_lossy(&reply)
    );

    let stranger = Ca::new("some other CA");
    let refused = support::tls::connect(gw.addr, &stranger, &[b"http/1.1"]).await;
    let Err(error) = refused else {
        panic!("a client that does not trust our CA completed the handshake");
    };
    let error = error.to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");

    let answer = https_request(gw.addr, &ca, false, get("/api/v4/projects", false)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(gw.rails.count(), 1, "only the TLS request reached Rails");
    gw.stop().await;
}

#[tokio::test]
async fn a_reload_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    let ca = Ca::new("listener CA");
    let (first, renewed) = (ca.leaf(&["localhost"]), ca.leaf(&["localhost"]));
    let files = first.files();
    let gw = gateway()
        .set("server.tls", &Leaf::server_tls_keys(&files))
        .start()
        .await;

    // A keep-alive connection opened before the renewal.
    let tls = support::tls::connect(gw.addr, &ca, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], first.der);
    let (mut open, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let before = open.send_request(get("/before", false)).await.unwrap();
    assert_eq!(before.status(), 200);

    files.0.rewrite(&renewed.cert_pem);
    files.1.rewrite(&renewed.key_pem);
    let config = iamproxy::Config::from_toml(&gw.toml).unwrap();
    assert!(
        gw.reloader.apply(config).is_empty(),
        "nothing needs a restart"
    );

    let answer = https_request(gw.addr, &ca, false, get("/after", false)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.certificate, renewed.der,
        "new connections get the renewal"
    );
    let still = open.send_request(get("/still-open", false)).await.unwrap();
    assert_eq!(still.status(), 200, "the open connection keeps working");
    assert_eq!(gw.rails.count(), 3);
    gw.stop().await;
}

/// `[iam]`, `[rails]` and `[preauthorize]` pointing at TLS fronts of the fakes.
fn https_upstreams(
    iam: &TlsFront,
    rails: &TlsFront,
    preauth: &TlsFront,
    ca: &Ca,
) -> [(&'static str, String); 3] {
    let ca_file = format!("ca_file = \"{}\"", ca.file.toml());
    [
        ("iam", format!("url = \"{}\"\n{ca_file}", iam.url())),
        ("rails", format!("url = \"{}\"\n{ca_file}", rails.url())),
        (
            "preauthorize",
            format!("url = \"{}/-/oauth/iam_routing\"\n{ca_file}", preauth.url()),
        ),
    ]
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_ca_file() {
    let ca = Ca::new("upstream CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let (gw, fronts) = behind_tls(&ca, [&leaf, &leaf, &leaf]).await;
    let client = TestClient::new();

    let oauth = client
        .get(&gw.url("/oauth/authorize?client_id=tls-app"))
        .await;
    assert_eq!(oauth.status, 200);
    assert_eq!(
        oauth.served_by(),
        "iam",
        "routed by an HTTPS pre-authorize call"
    );
    assert_eq!(gw.preauth.count(), 1);
    let api = client.get(&gw.url("/api/v4/projects")).await;
    assert_eq!(api.served_by(), "rails");
    for front in &fronts {
        assert!(front.refused().is_empty(), "{:?}", front.refused());
    }
    gw.stop().await;
}

/// A gateway whose IAM, Rails and pre-authorize are TLS fronts presenting these
/// certificates, trusting `ca`; pre-authorize sends everyone to IAM.
async fn behind_tls(ca: &Ca, [iam, rails, preauth]: [&Leaf; 3]) -> (TestGateway, [TlsFront; 3]) {
    let fakes = GatewayFakes::start().await;
    fakes.preauth.always(Reply::destination("iam"));
    let fronts = [
        TlsFront::start(iam, fakes.iam.addr).await,
        TlsFront::start(rails, fakes.rails.addr).await,
        TlsFront::start(preauth, fakes.preauth.addr).await,
    ];
    let mut builder = gateway();
    for (table, keys) in https_upstreams(&fronts[0], &fronts[1], &fronts[2], ca) {
        builder = builder.set(table, &keys);
    }
    (builder.start_with(fakes).await, fronts)
}

#[tokio::test]
async fn an_untrusted_iam_certificate_is_refused_with_a_clear_error_and_rails_answers() {
    let logs = Captured::global();
    let ours = Ca::new("the CA we trust");
    let stranger = Ca::new("a CA nobody configured");
    let good = ours.leaf(&["127.0.0.1"]);
    // All three fronts must outlive the test: a dropped front stops listening.
    let (gw, fronts) = behind_tls(&ours, [&stranger.leaf(&["127.0.0.1"]), &good, &good]).await;
    let iam = &fronts[0];

    let answer = TestClient::new()
        .get(&gw.url("/oauth/authorize?client_id=tls-app"))
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.served_by(), "rails", "replayed to Rails");
    assert_eq!(gw.preauth.count(), 1, "pre-authorize said IAM");
    assert_eq!(gw.iam.count(), 0, "nothing crossed the refused connection");
    assert!(
        !iam.refused().is_empty(),
        "the gateway aborted the handshake"
    );
    assert!(
        logs.has_line(&[
            "IAM failed, replaying to rails",
            "invalid peer certificate: UnknownIssuer"
        ]),
        "the fallback line names the reason:\n{}",
        logs.text()
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_pre_authorize_certificate_for_another_name_is_refused_and_rails_answers() {
    let logs = Captured::global();
    let ours = Ca::new("the CA we trust");
    let good = ours.leaf(&["127.0.0.1"]);
    let other_name = ours.leaf(&["preauth.internal"]);
    let (gw, fronts) = behind_tls(&ours, [&good, &good, &other_name]).await;
    let preauth = &fronts[2];

    let answer = TestClient::new()
        .get(&gw.url("/oauth/authorize?client_id=tls-app"))
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.served_by(),
        "rails",
        "a pre-authorize error routes to Rails"
    );
    assert_eq!(gw.preauth.count(), 0);
    assert!(
        !preauth.refused().is_empty(),
        "the gateway aborted the handshake"
    );
    assert!(
        logs.has_line(&[
            "pre-authorize failed",
            "invalid peer certificate: certificate not valid for name"
        ]),
        "the pre-authorize error names the reason:\n{}",
        logs.text()
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_untrusted_rails_certificate_is_a_502_that_says_why() {
    let logs = Captured::global();
    let ours = Ca::new("the CA we trust");
    let stranger = Ca::new("a CA nobody configured");
    let fakes = GatewayFakes::start().await;
    let rails = TlsFront::start(&stranger.leaf(&["127.0.0.1"]), fakes.rails.addr).await;
    let gw = gateway()
        .without_iam()
        .set(
            "rails",
            &format!(
                "url = \"{}\"\nca_file = \"{}\"",
                rails.url(),
                ours.file.toml()
            ),
        )
        .start_with(fakes)
        .await;
    let answer = TestClient::new().get(&gw.url("/api/v4/projects")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(gw.rails.count(), 0);
    assert!(
        logs.has_line(&[
            "rails unreachable",
            "invalid peer certificate: UnknownIssuer"
        ]),
        "{}",
        logs.text()
    );
    gw.stop().await;
}

/// `iamproxy --check` on a config whose Rails is `https` without `ca_file`, with
/// `SSL_CERT_FILE` standing in for the system's roots.
fn check_with_system_roots(ssl_cert_file: &std::path::Path) -> std::process::Output {
    let config = support::process::TempFile::new(
        "[rails]\nurl = \"https://127.0.0.1:8443\"\n[log]\nlevel = \"warn\"\n",
    );
    std::process::Command::new(env!("CARGO_BIN_EXE_iamproxy"))
        .args(["--check", "--config", config.path()])
        .env("SSL_CERT_FILE", ssl_cert_file)
        .env_remove("SSL_CERT_DIR")
        .output()
        .expect("run iamproxy --check")
}

#[test]
fn without_ca_file_the_system_roots_are_used_and_none_at_all_is_a_config_error() {
    let ca = Ca::new("a system CA");
    let found = check_with_system_roots(ca.file.path());
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );

    let empty = support::process::TempFile::new("");
    let none = check_with_system_roots(std::path::Path::new(empty.path()));
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert!(!none.status.success());
    assert!(
        stderr.contains("rails.ca_file: no system root certificates found"),
        "{stderr}"
    );
}
