//! The one helper every integration test uses: fake upstreams that speak real HTTP on
//! loopback and record what they receive, a gateway started in-process on port 0, and a
//! small client.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod process;
pub mod raw;
pub mod redis;
pub mod tls;
pub mod unix;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// What a fake upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query, as sent on the request line.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How a fake upstream answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Respond {
        status: StatusCode,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// Wait, then answer as the inner reply does.
    After(Duration, Box<Reply>),
    /// 200 with `chunks` copies of `chunk`, one every `every` (the first at once).
    Drip {
        chunk: Bytes,
        chunks: usize,
        every: Duration,
    },
    /// Never answer (the connection stays open).
    Hang,
    /// Close the connection without answering.
    Drop,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply::Respond {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn text(status: u16, body: &str) -> Reply {
        Reply::Respond {
            status: StatusCode::from_u16(status).unwrap(),
            headers: vec![("content-type", "text/plain".into())],
            body: Bytes::from(body.to_owned()),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Reply {
        if let Reply::Respond { headers, .. } = &mut self {
            headers.push((name, value.to_owned()));
        }
        self
    }

    pub fn after(self, delay: Duration) -> Reply {
        Reply::After(delay, Box::new(self))
    }

    /// A pre-authorize answer with the Workhorse content type.
    pub fn destination(destination: &str) -> Reply {
        Reply::Respond {
            status: StatusCode::OK,
            headers: vec![(
                "content-type",
                "application/vnd.gitlab-workhorse+json".into(),
            )],
            body: Bytes::from(format!(r#"{{"destination":"{destination}"}}"#)),
        }
    }
}

type Responder = dyn Fn(&Recorded) -> Reply + Send + Sync;

/// A fake upstream: counts and records every request, answers with a replaceable rule.
#[derive(Clone)]
pub struct FakeUpstream {
    /// Its TCP address; unspecified for a fake on a Unix socket.
    pub addr: SocketAddr,
    /// The socket file of a fake on a Unix socket ([`FakeUpstream::start_unix`]).
    pub socket: Option<PathBuf>,
    name: &'static str,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Off: requests are counted, not kept (long runs).
    remember: Arc<std::sync::atomic::AtomicBool>,
    count: Arc<AtomicUsize>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    responder: Arc<Mutex<Arc<Responder>>>,
    _stop: Arc<oneshot::Sender<()>>,
}

impl FakeUpstream {
    /// Starts a fake that answers 200 with `{"served_by": name}`.
    pub async fn start(name: &'static str) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        FakeUpstream::serve_on(name, addr, None, listener)
    }

    /// A fake on `listener` (at `addr`, or the Unix socket `socket`), serving every
    /// connection until the last clone is dropped.
    fn serve_on(
        name: &'static str,
        addr: SocketAddr,
        socket: Option<PathBuf>,
        listener: impl Accepts,
    ) -> FakeUpstream {
        let (stop, mut stopped) = oneshot::channel();
        let served_by = Bytes::from(format!(r#"{{"served_by":"{name}"}}"#));
        let default: Arc<Responder> = Arc::new(move |_| Reply::Respond {
            status: StatusCode::OK,
            headers: vec![("content-type", "application/json".into())],
            body: served_by.clone(),
        });
        let fake = FakeUpstream {
            addr,
            socket,
            name,
            requests: Arc::default(),
            remember: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            count: Arc::default(),
            connections: Arc::default(),
            responder: Arc::new(Mutex::new(default)),
            _stop: Arc::new(stop),
        };
        let serving = fake.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept_one() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let fake = serving.clone();
                fake.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let fake = fake.clone();
                        async move { fake.serve(request).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        fake
    }

    /// Replaces how this fake answers.
    pub fn respond(&self, rule: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Arc::new(rule);
    }

    /// Always answers `reply`.
    pub fn always(&self, reply: Reply) {
        self.respond(move |_| reply.clone());
    }

    /// `http://127.0.0.1:port`, or `unix:/path` for a fake on a Unix socket.
    pub fn url(&self) -> String {
        match &self.socket {
            Some(path) => format!("unix:{}", path.display()),
            None => format!("http://{}", self.addr),
        }
    }

    /// From now on requests are only counted: `requests()` and `last()` see none of them.
    pub fn count_only(&self) {
        self.remember.store(false, Ordering::Relaxed);
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .unwrap_or_else(|| panic!("{} received no request", self.name))
    }

    async fn serve(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Either<Full<Bytes>, Drip>>, std::io::Error> {
        let (parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let recorded = Recorded {
            method: parts.method,
            uri: parts
                .uri
                .path_and_query()
                .map(|pq| pq.to_string())
                .unwrap_or_default(),
            headers: parts.headers,
            body,
        };
        let responder = self.responder.lock().unwrap().clone();
        let mut reply = responder(&recorded);
        if self.remember.load(Ordering::Relaxed) {
            self.requests.lock().unwrap().push(recorded);
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        loop {
            match reply {
                Reply::After(delay, inner) => {
                    tokio::time::sleep(delay).await;
                    reply = *inner;
                }
                Reply::Drip {
                    chunk,
                    chunks,
                    every,
                } => {
                    let drip = Drip {
                        chunk,
                        left: chunks,
                        every,
                        next: Box::pin(tokio::time::sleep(Duration::ZERO)),
                    };
                    return Ok(Response::new(Either::Right(drip)));
                }
                Reply::Hang => std::future::pending::<()>().await,
                // An error from the service makes hyper close the connection unanswered.
                Reply::Drop => return Err(std::io::Error::other("dropping connection")),
                Reply::Respond {
                    status,
                    headers,
                    body,
                } => {
                    let mut response = Response::new(Either::Left(Full::new(body)));
                    *response.status_mut() = status;
                    for (name, value) in headers {
                        response.headers_mut().append(
                            HeaderName::from_static(name),
                            HeaderValue::from_str(&value).unwrap(),
                        );
                    }
                    return Ok(response);
                }
            }
        }
    }
}

/// A listener a fake upstream takes connections from.
trait Accepts: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accepts for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

impl Accepts for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

/// An address nothing listens on: connecting is refused.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// 32 random bytes, generated at test time, base64-encoded in a temp file that is removed
/// when dropped.
pub struct SecretFile {
    pub path: PathBuf,
    pub bytes: [u8; 32],
}

impl SecretFile {
    pub fn new() -> SecretFile {
        use base64::Engine as _;
        use std::hash::{BuildHasher, Hasher};
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_usize(SEQ.fetch_add(1, Ordering::SeqCst));
            chunk.copy_from_slice(&hasher.finish().to_le_bytes());
        }
        let path = std::env::temp_dir().join(format!(
            "iamproxy-test-{}-{}.secret",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode(bytes),
        )
        .unwrap();
        SecretFile { path, bytes }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Fake Rails, IAM and pre-authorize backend, and a gateway in front of them.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub rails: FakeUpstream,
    pub iam: FakeUpstream,
    pub preauth: FakeUpstream,
    pub secret: SecretFile,
    /// The configuration it started with, as TOML.
    pub toml: String,
    pub reloader: iamproxy::Reloader,
    shutdown: Option<oneshot::Sender<()>>,
    pub finished: Option<tokio::task::JoinHandle<()>>,
}

/// The fakes a [`TestGateway`] talks to.
pub struct GatewayFakes {
    pub rails: FakeUpstream,
    pub iam: FakeUpstream,
    pub preauth: FakeUpstream,
}

impl GatewayFakes {
    /// The pre-authorize fake sends everyone to Rails until told otherwise.
    pub async fn start() -> GatewayFakes {
        let preauth = FakeUpstream::start("preauthorize").await;
        preauth.always(Reply::destination("rails"));
        GatewayFakes {
            rails: FakeUpstream::start("rails").await,
            iam: FakeUpstream::start("iam").await,
            preauth,
        }
    }
}

/// Builder for [`TestGateway`]: `extra` TOML is appended to a config naming the fakes.
pub struct GatewayBuilder {
    extra: String,
    iam_url: Option<String>,
    with_iam: bool,
}

pub fn gateway() -> GatewayBuilder {
    GatewayBuilder {
        extra: String::new(),
        iam_url: None,
        with_iam: true,
    }
}

impl GatewayBuilder {
    /// Extra keys for the named table, e.g. `.set("iam", "timeout = \"200ms\"")`.
    pub fn set(mut self, table: &str, line: &str) -> GatewayBuilder {
        self.extra.push_str(&format!("\n[{table}]\n{line}\n"));
        self
    }

    /// Point IAM somewhere other than its fake (e.g. a refused address).
    pub fn iam_url(mut self, url: String) -> GatewayBuilder {
        self.iam_url = Some(url);
        self
    }

    /// No `[iam]` table at all.
    pub fn without_iam(mut self) -> GatewayBuilder {
        self.with_iam = false;
        self
    }

    pub async fn start(self) -> TestGateway {
        self.start_with(GatewayFakes::start().await).await
    }

    /// With fakes started beforehand, e.g. to put something in front of them.
    pub async fn start_with(self, fakes: GatewayFakes) -> TestGateway {
        let GatewayFakes {
            rails,
            iam,
            preauth,
        } = fakes;
        let secret = SecretFile::new();
        let toml = self.toml(&rails, &iam, &preauth, &secret);
        let config = iamproxy::Config::from_toml(&toml)
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
        let gateway = iamproxy::Gateway::bind(config).await.unwrap();
        let (addr, admin) = (gateway.local_addr(), gateway.admin_addr());
        let reloader = gateway.reloader();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let finished = tokio::spawn(gateway.serve(async {
            let _ = stopped.await;
        }));
        TestGateway {
            addr,
            admin,
            rails,
            iam,
            preauth,
            secret,
            toml,
            reloader,
            shutdown: Some(shutdown),
            finished: Some(finished),
        }
    }

    /// The config text; tables named in `extra` are merged by emitting the base keys only
    /// for tables `extra` does not mention.
    fn toml(
        &self,
        rails: &FakeUpstream,
        iam: &FakeUpstream,
        preauth: &FakeUpstream,
        secret: &SecretFile,
    ) -> String {
        let mut tables: Vec<(String, Vec<String>)> = vec![
            (
                "server".into(),
                vec![
                    "listen = \"127.0.0.1:0\"".into(),
                    "admin_listen = \"127.0.0.1:0\"".into(),
                ],
            ),
            ("rails".into(), vec![format!("url = \"{}\"", rails.url())]),
            ("log".into(), vec!["level = \"warn\"".into()]),
        ];
        if self.with_iam {
            let url = self.iam_url.clone().unwrap_or_else(|| iam.url());
            tables.push(("iam".into(), vec![format!("url = \"{url}\"")]));
            tables.push((
                "preauthorize".into(),
                vec![
                    // On a socket, the request path follows the socket's after a ':'.
                    format!(
                        "url = \"{}{}/-/oauth/iam_routing\"",
                        preauth.url(),
                        if preauth.socket.is_some() { ":" } else { "" }
                    ),
                    format!("secret_file = \"{}\"", secret.path().display()),
                ],
            ));
        }
        // Merge `extra` lines into their tables.
        let mut current: Option<String> = None;
        for line in self.extra.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = Some(name.to_owned());
                if !tables.iter().any(|(t, _)| t == name) {
                    tables.push((name.to_owned(), Vec::new()));
                }
            } else if let Some(table) = &current {
                let (_, lines) = tables.iter_mut().find(|(t, _)| t == table).unwrap();
                let key = line.split('=').next().unwrap().trim();
                lines.retain(|l| l.split('=').next().unwrap().trim() != key);
                lines.push(line.to_owned());
            }
        }
        tables
            .into_iter()
            .map(|(name, lines)| format!("[{name}]\n{}\n", lines.join("\n")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Checks `check` every 20 ms until it holds, failing the test after `within`.
pub async fn until<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestGateway {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// The admin API's JSON answer to `method path`, sent with `token`; anything but 200
    /// fails the test.
    pub async fn admin_json(&self, method: Method, path: &str, token: &str) -> serde_json::Value {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.admin))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let answer = TestClient::new().send(request).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        serde_json::from_slice(&answer.body).unwrap()
    }

    /// Asks the gateway to shut down and waits until it has.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(finished) = self.finished.take() {
            finished.await.unwrap();
        }
    }

    /// Requests the fake upstreams received, in total.
    pub fn upstream_counts(&self) -> (usize, usize, usize) {
        (self.rails.count(), self.iam.count(), self.preauth.count())
    }
}

/// A response body sent a chunk at a time: see [`Reply::Drip`].
pub struct Drip {
    chunk: Bytes,
    left: usize,
    every: Duration,
    next: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Drip {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        std::task::ready!(self.next.as_mut().poll(cx));
        self.left -= 1;
        let at = tokio::time::Instant::now() + self.every;
        self.next.as_mut().reset(at);
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// A response as the test client saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// `response` with its whole body.
    pub async fn read(response: Response<Incoming>) -> Answer {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body failed").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Which fake served it, from the default `{"served_by": …}` body.
    pub fn served_by(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["served_by"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("<{}: {}>", self.status, self.text()))
    }
}

/// Longest [`send`] waits for an answer before the test fails: generous, as a loaded
/// machine and a debug build are slow. A test that asserts how fast an answer comes times
/// it itself.
pub const ANSWER_PATIENCE: Duration = Duration::from_secs(30);

/// Sends `request` with a fresh [`TestClient`], failing the test unless the gateway
/// answers within [`ANSWER_PATIENCE`].
pub async fn send(request: Request<Full<Bytes>>) -> Answer {
    tokio::time::timeout(ANSWER_PATIENCE, TestClient::new().send(request))
        .await
        .expect("the gateway answered in time")
}

/// Sends `request` on a new HTTP/2 connection of hyper's own (`client::conn::http2`),
/// which sends the pseudo-headers its `Uri` spells (`:path *`, `:scheme gopher`) and a body
/// of unknown length without `Content-Length`; fails the test unless the gateway answers
/// within [`ANSWER_PATIENCE`].
pub async fn send_h2<B>(addr: SocketAddr, request: Request<B>) -> Answer
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("an HTTP/2 connection");
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .expect("an HTTP/2 answer");
        Answer::read(response).await
    };
    tokio::time::timeout(ANSWER_PATIENCE, exchange)
        .await
        .expect("the gateway answered in time")
}

/// hyper's pooled client speaking HTTP/2 by prior knowledge (one connection per origin),
/// with request bodies of type `B`.
pub fn h2c_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// A small HTTP/1.1 client with its own pool.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        TestClient::new()
    }
}

impl TestClient {
    pub fn new() -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    pub fn http2() -> TestClient {
        TestClient {
            client: h2c_client(),
        }
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Answer {
        let response = self.client.request(request).await.expect("request failed");
        Answer::read(response).await
    }

    /// [`TestClient::send`], or `None` when there is no answer (nothing listens yet).
    pub async fn try_send(&self, request: Request<Full<Bytes>>) -> Option<Answer> {
        let response = self.client.request(request).await.ok()?;
        Some(Answer::read(response).await)
    }

    pub async fn get(&self, url: &str) -> Answer {
        self.send(Request::get(url).body(Full::default()).unwrap())
            .await
    }

    /// POST with a form body.
    pub async fn post_form(&self, url: &str, form: &str) -> Answer {
        self.send(
            Request::post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form.to_owned())))
                .unwrap(),
        )
        .await
    }
}

impl Recorded {
    /// Every value of query parameter `name`, decoded (e.g. the pre-authorize `client_id`).
    pub fn query_values(&self, name: &str) -> Vec<String> {
        let query = self.uri.split_once('?').map_or("", |(_, query)| query);
        form_urlencoded::parse(query.as_bytes())
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
            .collect()
    }
}
