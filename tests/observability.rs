//! The shipped dashboard and alert rules against a real Prometheus (issue 3): Prometheus
//! scrapes a running gateway every second while traffic goes through every path; then
//! every dashboard expression and every rule is evaluated through Prometheus' HTTP API and
//! must return data, every alert's condition must have held during the traffic, and the
//! counters Prometheus scraped must match the requests sent.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support::{gateway, refused_addr, Reply, TestClient, TestGateway};

const INSTALL_HINT: &str =
    "run scripts/test.sh, which installs Debian's prometheus package (prometheus, promtool)";

/// Longest any single request to the gateway or Prometheus may take.
const BOUND: Duration = Duration::from_secs(10);

fn dashboards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---- A Prometheus server of our own ------------------------------------------------------

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "iamproxy-observability-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `prometheus` on a loopback port, killed when dropped; its log is printed if
/// the test is failing.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
    client: HttpClient,
    // Dropped after `drop` has killed the process.
    _dir: TempDir,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus log ({}) ----\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The first `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// A port nothing listens on right now (Prometheus may lose a race for it: see `start`).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GETs `url`, reading the whole body.
async fn get(client: &HttpClient, url: &str) -> Result<(StatusCode, Bytes), String> {
    let request = Request::get(url).body(Full::default()).unwrap();
    let response = tokio::time::timeout(BOUND, client.request(request))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes()))
}

/// Polls `{url}/-/ready` until it answers 200; `Err` if the process exits first or it
/// takes over 30 s.
async fn wait_ready(child: &mut Child, client: &HttpClient, url: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(status.to_string());
        }
        if let Ok((StatusCode::OK, _)) = get(client, &format!("{url}/-/ready")).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("not ready within 30 s".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second and evaluating `rules` every
    /// second, and waits until it is ready.
    async fn start(target: SocketAddr, rules: &Path) -> Prometheus {
        let binary = on_path("prometheus")
            .unwrap_or_else(|| panic!("prometheus is not on PATH: {INSTALL_HINT}"));
        let dir = TempDir::new();
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: iamproxy\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n",
                rules = rules.display().to_string(),
            ),
        )
        .unwrap();
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for attempt in 0..5 {
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}");
            let log = dir.0.join(format!("prometheus-{attempt}.log"));
            let mut child = Command::new(&binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.0.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {}: {e}; {INSTALL_HINT}", binary.display())
                });
            match wait_ready(&mut child, &client, &url).await {
                Ok(()) => {
                    return Prometheus {
                        child,
                        url,
                        log,
                        client,
                        _dir: dir,
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    if !log.contains("address already in use") {
                        panic!("prometheus did not become ready ({why}):\n{log}");
                    }
                }
            }
        }
        panic!("prometheus could not bind a free loopback port in 5 attempts");
    }

    async fn try_get(&self, path_and_query: &str) -> Result<(StatusCode, Bytes), String> {
        get(&self.client, &format!("{}{path_and_query}", self.url)).await
    }

    /// GETs an API path and returns its `data`, asserting `"status": "success"`.
    async fn api(&self, path_and_query: &str) -> Value {
        let (status, body) = self
            .try_get(path_and_query)
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"));
        let json: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "GET {path_and_query}: {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        assert_eq!(
            json["status"], "success",
            "GET {path_and_query}: {status} {json}"
        );
        json["data"].clone()
    }

    /// An instant query, now; returns the result (a vector's samples, or a scalar's pair).
    async fn query(&self, expr: &str) -> Vec<Value> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .finish();
        let data = self.api(&format!("/api/v1/query?{query}")).await;
        result(&data, expr)
    }

    /// A range query over [start, now] with a 1 s step; returns the matrix.
    async fn query_range(&self, expr: &str, start: f64) -> Vec<Value> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .append_pair("start", &format!("{start:.3}"))
            .append_pair("end", &format!("{:.3}", unix_now()))
            .append_pair("step", "1")
            .finish();
        let data = self.api(&format!("/api/v1/query_range?{query}")).await;
        result(&data, expr)
    }

    /// An instant query's vector as a map from the values of `labels` to the sample value.
    async fn by_labels(&self, expr: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
        self.query(expr)
            .await
            .iter()
            .map(|sample| {
                let key = labels
                    .iter()
                    .map(|label| sample["metric"][label].as_str().unwrap_or("").to_owned())
                    .collect();
                (key, sample_value(sample))
            })
            .collect()
    }

    /// The single value of an instant query that must return exactly one sample.
    async fn scalar(&self, expr: &str) -> f64 {
        let result = self.query(expr).await;
        assert_eq!(result.len(), 1, "{expr} returned {result:?}");
        sample_value(&result[0])
    }
}

fn result(data: &Value, expr: &str) -> Vec<Value> {
    data["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{expr}: no result array in {data}"))
        .clone()
}

fn sample_value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {sample}"))
}

// ---- Traffic -----------------------------------------------------------------------------

/// What the gateway is expected to decide for one OAuth request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A client the pre-authorize fake routes to this destination ("cache" or
    /// "preauthorize" depending on whether this request made the call).
    Known(&'static str),
    Continuity,
    /// A code or token without an IAM prefix: back to Rails, no pre-authorize call.
    RailsIssued,
    UnknownClient,
    /// The client's answer expired and the pre-authorize fake now answers 500: its last
    /// good decision (IAM) is served.
    Stale,
    /// The pre-authorize fake answers 500 for this client.
    PreauthorizeBadStatus,
    /// The pre-authorize fake drops the connection for this client.
    PreauthorizeDropped,
    /// Not an OAuth endpoint: no decision.
    Passthrough,
}

/// One request the test sends.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    form: Option<String>,
    client_id: Option<String>,
    expect: Expect,
}

impl Call {
    /// A client-credentials token request for `client_id`.
    fn token(client_id: &str, expect: Expect) -> Call {
        Call::post(
            "/oauth/token",
            &format!("grant_type=client_credentials&client_id={client_id}"),
            Some(client_id),
            expect,
        )
    }

    fn post(path: &str, form: &str, client_id: Option<&str>, expect: Expect) -> Call {
        Call {
            method: Method::POST,
            path: path.to_owned(),
            form: Some(form.to_owned()),
            client_id: client_id.map(str::to_owned),
            expect,
        }
    }

    fn get(path: &str, client_id: Option<&str>, expect: Expect) -> Call {
        Call {
            method: Method::GET,
            path: path.to_owned(),
            form: None,
            client_id: client_id.map(str::to_owned),
            expect,
        }
    }

    /// Where the decision sends it, if it is an OAuth request.
    fn bound_for(&self) -> Option<&'static str> {
        match self.expect {
            Expect::Known(destination) => Some(destination),
            Expect::Continuity | Expect::Stale => Some("iam"),
            Expect::RailsIssued
            | Expect::UnknownClient
            | Expect::PreauthorizeBadStatus
            | Expect::PreauthorizeDropped => Some("rails"),
            Expect::Passthrough => None,
        }
    }

    fn route(&self) -> &'static str {
        let path = self.path.split('?').next().unwrap();
        match path {
            "/oauth/authorize" => "authorize",
            "/oauth/authorize_device" => "authorize_device",
            "/oauth/token" => "token",
            "/oauth/revoke" => "revoke",
            "/oauth/introspect" => "introspect",
            _ => "other",
        }
    }
}

/// The background's cycle of requests: every kind of decision, every route.
fn mixed_call(i: usize) -> Call {
    let iam = format!("iam-{}", i % 5);
    let rails = format!("rails-{}", i % 5);
    match i % 10 {
        0 => Call::token(&iam, Expect::Known("iam")),
        1 => Call::token(&rails, Expect::Known("rails")),
        2 => Call::get("/api/v4/projects?page=2", None, Expect::Passthrough),
        3 => Call::get(
            &format!("/oauth/authorize?response_type=code&client_id={iam}"),
            Some(&iam),
            Expect::Known("iam"),
        ),
        4 => Call::post(
            "/oauth/token",
            &format!("grant_type=refresh_token&client_id={rails}&refresh_token=giat_{i}"),
            None,
            Expect::Continuity,
        ),
        5 => Call::post(
            "/oauth/token",
            "grant_type=client_credentials",
            None,
            Expect::UnknownClient,
        ),
        6 => Call::post(
            "/oauth/revoke",
            &format!("client_id={rails}&token=abc{i}"),
            Some(&rails),
            Expect::RailsIssued,
        ),
        7 => Call::post(
            "/oauth/introspect",
            &format!("client_id={iam}&token=abc{i}"),
            Some(&iam),
            Expect::RailsIssued,
        ),
        8 => Call::post(
            "/oauth/authorize_device",
            &format!("client_id={rails}&scope=read_user"),
            Some(&rails),
            Expect::Known("rails"),
        ),
        _ => Call::get("/assets/application.js", None, Expect::Passthrough),
    }
}

/// What the test sent and who served it, in the shape of the gateway's metrics.
#[derive(Debug, Default)]
struct Tally {
    /// (route, destination that served it, method, status class) → requests.
    requests: BTreeMap<Vec<String>, u64>,
    /// (destination, reason) → decisions; `known` stands for cache + preauthorize.
    decisions: BTreeMap<Vec<String>, u64>,
    /// (destination, client id) of every client the pre-authorize fake answered.
    answered_clients: BTreeSet<(String, String)>,
    /// IAM-bound requests that Rails served.
    fallbacks: u64,
    bad_status_calls: u64,
    dropped_calls: u64,
}

/// Sends calls to the gateway and tallies them.
#[derive(Clone)]
struct Traffic {
    gateway: SocketAddr,
    client: TestClient,
    tally: Arc<Mutex<Tally>>,
}

impl Traffic {
    /// Sends one call, asserts who served it agrees with the decision, and tallies it.
    /// Returns who served it.
    async fn send(&self, call: Call) -> &'static str {
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(format!("http://{}{}", self.gateway, call.path));
        if call.form.is_some() {
            request = request.header("content-type", "application/x-www-form-urlencoded");
        }
        let body = Full::new(Bytes::from(call.form.clone().unwrap_or_default()));
        let answer = tokio::time::timeout(BOUND, self.client.send(request.body(body).unwrap()))
            .await
            .unwrap_or_else(|_| panic!("{call:?}: no answer within {BOUND:?}"));
        let served = match answer.served_by().as_str() {
            "iam" => "iam",
            "rails" => "rails",
            other => panic!("{call:?}: answered by neither fake: {other}"),
        };
        let bound_for = call.bound_for();
        assert!(
            bound_for != Some("rails") || served == "rails",
            "{call:?}: a Rails-bound request was served by {served}"
        );
        let mut tally = self.tally.lock().unwrap();
        let status_class = format!("{}xx", answer.status.as_u16() / 100);
        let key = vec![
            call.route().to_owned(),
            served.to_owned(),
            call.method.as_str().to_owned(),
            status_class,
        ];
        *tally.requests.entry(key).or_default() += 1;
        let decision = match call.expect {
            Expect::Known(destination) => {
                let client_id = call
                    .client_id
                    .clone()
                    .expect("known calls name their client");
                tally
                    .answered_clients
                    .insert((destination.to_owned(), client_id));
                Some((destination, "known"))
            }
            Expect::Continuity => Some(("iam", "continuity")),
            Expect::RailsIssued => Some(("rails", "rails_issued")),
            Expect::UnknownClient => Some(("rails", "unknown_client")),
            Expect::Stale => {
                tally.bad_status_calls += 1;
                Some(("iam", "stale"))
            }
            Expect::PreauthorizeBadStatus => {
                tally.bad_status_calls += 1;
                Some(("rails", "preauthorize_error"))
            }
            Expect::PreauthorizeDropped => {
                tally.dropped_calls += 1;
                Some(("rails", "preauthorize_error"))
            }
            Expect::Passthrough => None,
        };
        if let Some((destination, reason)) = decision {
            let key = vec![destination.to_owned(), reason.to_owned()];
            *tally.decisions.entry(key).or_default() += 1;
        }
        if bound_for == Some("iam") && served == "rails" {
            tally.fallbacks += 1;
        }
        served
    }

    /// Sends `calls` one after another, `every` apart.
    async fn paced(&self, calls: impl IntoIterator<Item = Call>, every: Duration) {
        for call in calls {
            self.send(call).await;
            tokio::time::sleep(every).await;
        }
    }

    /// `workers` tasks each sending `each` calls from `make(worker, n)` in sequence.
    async fn concurrently(&self, workers: usize, each: usize, make: fn(usize, usize) -> Call) {
        let tasks: Vec<_> = (0..workers)
            .map(|worker| {
                let traffic = self.clone();
                tokio::spawn(async move {
                    for n in 0..each {
                        traffic.send(make(worker, n)).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    /// Sends [`mixed_call`]s every 15 ms until `stop` is set (at most 20 000).
    fn background(&self, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        let traffic = self.clone();
        tokio::spawn(async move {
            for i in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                traffic.send(mixed_call(i)).await;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    }
}

fn iam_ok() -> Reply {
    Reply::text(200, r#"{"served_by":"iam"}"#)
}

/// Routes by client-id prefix for the whole test: `iam-` to IAM; `slow-` to Rails after
/// 350 ms (over the 250 ms pre-authorize budget); `e500-` answers 500; `drop-` drops the
/// connection; `stale-` to IAM, never fresh but kept for stale serving, until `stale_down`
/// makes it answer 500; anything else to Rails.
fn route_by_prefix(gw: &TestGateway, stale_down: Arc<AtomicBool>) {
    gw.preauth.respond(move |recorded| {
        let id = recorded.query_values("client_id").pop().unwrap_or_default();
        match id.split('-').next().unwrap_or("") {
            "iam" => Reply::destination("iam"),
            "stale" if stale_down.load(Ordering::SeqCst) => Reply::status(500),
            "stale" => Reply::destination("iam")
                .with_header("cache-control", "max-age=0, stale-if-error=600"),
            "slow" => Reply::destination("rails").after(Duration::from_millis(350)),
            "e500" => Reply::status(500),
            "drop" => Reply::Drop,
            _ => Reply::destination("rails"),
        }
    });
}

/// Drives every path in phases over a steady mixed background: a long fast baseline
/// (cache misses, then hits), pre-authorize errors and slowness, stale decisions, IAM failing (503, then
/// dropped connections: fallbacks and the breaker), Rails answering 500, and finally a
/// slow IAM for well over 5% of the OAuth requests.
async fn drive_traffic(gw: &TestGateway, traffic: &Traffic, stale_down: &AtomicBool) {
    let stop = Arc::new(AtomicBool::new(false));
    let background = traffic.background(stop.clone());
    let every = Duration::from_millis(20);

    // Baseline: the longest phase, so the recorded p99's median over 1d stays fast.
    tokio::time::sleep(Duration::from_secs(25)).await;

    // Pre-authorize errors (each client id once: errors are not cached) and slow answers.
    let errors = (0..15).flat_map(|n| {
        [
            Call::token(&format!("e500-{n}"), Expect::PreauthorizeBadStatus),
            Call::token(&format!("drop-{n}"), Expect::PreauthorizeDropped),
        ]
    });
    traffic.paced(errors, every).await;
    traffic
        .concurrently(5, 1, |worker, _| {
            Call::token(&format!("slow-{worker}"), Expect::Known("rails"))
        })
        .await;

    // Pre-authorize failing for clients it answered before: their last good decision is
    // served stale, well over 1% of the decisions for a while.
    let stale = |n: usize| format!("stale-{}", n % 5);
    traffic
        .paced(
            (0..5).map(|n| Call::token(&stale(n), Expect::Known("iam"))),
            every,
        )
        .await;
    stale_down.store(true, Ordering::SeqCst);
    traffic
        .paced(
            (0..100).map(|n| Call::token(&stale(n), Expect::Stale)),
            every,
        )
        .await;

    // IAM failing: fallbacks by status, then by connection error; the breaker opens,
    // probes and re-opens.
    let iam_bound = |n: usize| Call::token(&format!("iam-{}", n % 5), Expect::Known("iam"));
    gw.iam.always(Reply::status(503));
    traffic.paced((0..75).map(iam_bound), every).await;
    gw.iam.always(Reply::Drop);
    traffic.paced((0..150).map(iam_bound), every).await;
    gw.iam.always(iam_ok());
    let deadline = Instant::now() + Duration::from_secs(5);
    while traffic.send(iam_bound(0)).await != "iam" {
        assert!(
            Instant::now() < deadline,
            "the breaker closed within 5 s of IAM recovering"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Rails answering 500: the OAuth 5xx ratio climbs over 2%.
    gw.rails
        .always(Reply::text(500, r#"{"served_by":"rails"}"#));
    let rails_bound =
        (0..100).map(|n| Call::token(&format!("rails-{}", n % 5), Expect::Known("rails")));
    traffic.paced(rails_bound, every).await;
    gw.rails
        .always(Reply::text(200, r#"{"served_by":"rails"}"#));

    // A reload of a file that does not parse: the running configuration stays, and the
    // gateway says its last reload failed.
    let broken = std::env::temp_dir().join(format!(
        "iamproxy-observability-{}.toml",
        std::process::id()
    ));
    std::fs::write(&broken, "[server\n").unwrap();
    let reloaded = gw.reloader.reload(&broken);
    let _ = std::fs::remove_file(&broken);
    assert_eq!(reloaded, iamproxy::observe::metrics::ReloadResult::Failure);

    // IAM slow (below iam.timeout): the OAuth p99 regresses.
    gw.iam.always(iam_ok().after(Duration::from_millis(400)));
    traffic
        .concurrently(20, 8, |worker, _| {
            Call::token(&format!("iam-{}", worker % 5), Expect::Known("iam"))
        })
        .await;
    // A few rule evaluations with the slow requests scraped.
    tokio::time::sleep(Duration::from_secs(3)).await;

    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
}

// ---- What Prometheus must see ------------------------------------------------------------

/// Every target `expr` in the dashboard, with the title of the panel it belongs to.
fn dashboard_queries(value: &Value, title: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
            if let Some(Value::Array(targets)) = map.get("targets") {
                for target in targets {
                    if let Some(expr) = target.get("expr").and_then(Value::as_str) {
                        out.push((title.to_owned(), expr.to_owned()));
                    }
                }
            }
            for (key, value) in map {
                if key != "targets" {
                    dashboard_queries(value, title, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                dashboard_queries(item, title, out);
            }
        }
        _ => {}
    }
}

/// The expression Grafana would send with every job and instance selected.
fn substitute_variables(expr: &str) -> String {
    [
        ("${__rate_interval}", "5m"),
        ("$__rate_interval", "5m"),
        ("${job}", ".*"),
        ("$job", ".*"),
        ("${instance}", ".*"),
        ("$instance", ".*"),
    ]
    .into_iter()
    .fold(expr.to_owned(), |expr, (variable, value)| {
        expr.replace(variable, value)
    })
}

/// Every dashboard panel expression is valid PromQL and returns data.
async fn assert_every_dashboard_query_returns_data(prometheus: &Prometheus) {
    let path = dashboards().join("iamproxy.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, "", &mut queries);
    assert!(
        queries.len() >= 8,
        "the dashboard has panels for every question of the issue: {queries:#?}"
    );
    for (title, expr) in queries {
        let query = substitute_variables(&expr);
        assert!(
            !query.contains('$'),
            "panel {title:?}: unknown variable left in {query:?}"
        );
        let result = prometheus.query(&query).await;
        assert!(
            !result.is_empty(),
            "panel {title:?}: no data for {query:?} (from {expr:?})"
        );
    }
}

/// `(kind, name)` of every rule in the rules file, in file order: `alert: X` and
/// `record: X` keys, as list items or not.
fn rules_in_file(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|line| line.trim().trim_start_matches("- ").trim())
        .filter_map(|line| {
            let (kind, name) = line.split_once(':')?;
            let kind = match kind {
                "alert" => "alerting",
                "record" => "recording",
                _ => return None,
            };
            Some((kind.to_owned(), name.trim().trim_matches('"').to_owned()))
        })
        .collect()
}

/// Prometheus loaded every rule of alerts.yml, each evaluates without error, each alert's
/// condition held at some moment since `start`, and each recording rule recorded data.
async fn assert_every_rule_is_healthy_and_held(prometheus: &Prometheus, rules: &Path, start: f64) {
    let expected = rules_in_file(rules);
    let data = prometheus.api("/api/v1/rules").await;
    let loaded: Vec<Value> = data["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    let mut names: Vec<(String, String)> = loaded
        .iter()
        .map(|rule| {
            let kind = rule["type"].as_str().unwrap_or("").to_owned();
            (kind, rule["name"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    // tests/dashboards.rs pins the alert names; here all of alerts.yml must load.
    let mut expected = expected;
    names.sort();
    expected.sort();
    assert_eq!(names, expected, "rules Prometheus loaded vs alerts.yml");

    for rule in &loaded {
        let name = rule["name"].as_str().unwrap_or("");
        assert_eq!(
            rule["health"], "ok",
            "rule {name}: health {} ({})",
            rule["health"], rule["lastError"]
        );
        let query = rule["query"].as_str().expect("every rule has a query");
        let held = prometheus.query_range(query, start).await;
        assert!(
            !held.is_empty(),
            "rule {name}: {query:?} returned nothing over the traffic (its condition never held)"
        );
        if rule["type"] == "recording" {
            let recorded = prometheus.query_range(name, start).await;
            assert!(
                !recorded.is_empty(),
                "recording rule {name} recorded nothing"
            );
        }
    }
}

/// Waits until Prometheus holds a scrape taken after every request was answered.
async fn wait_for_final_scrape(prometheus: &Prometheus) {
    let after = unix_now();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped_at = prometheus
            .query("timestamp(iamproxy_build_info{job=\"iamproxy\"})")
            .await
            .first()
            .map(sample_value)
            .unwrap_or(0.0);
        if scraped_at > after {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape after the traffic within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The counters Prometheus scraped equal what the test sent, series by series.
async fn assert_counters_match_traffic(prometheus: &Prometheus, gw: &TestGateway, tally: &Tally) {
    let requests = prometheus
        .by_labels(
            "sum by (route, destination, method, status_class) (iamproxy_requests_total{job=\"iamproxy\"})",
            &["route", "destination", "method", "status_class"],
        )
        .await;
    let sent: BTreeMap<Vec<String>, f64> = tally
        .requests
        .iter()
        .map(|(key, n)| (key.clone(), *n as f64))
        .collect();
    assert_eq!(requests, sent, "iamproxy_requests_total vs requests sent");

    let served_by = |destination: &str| -> f64 {
        sent.iter()
            .filter(|(key, _)| key[1] == destination)
            .map(|(_, n)| n)
            .sum()
    };
    let to_iam = prometheus
        .scalar("sum(iamproxy_requests_total{job=\"iamproxy\",destination=\"iam\"})")
        .await;
    assert_eq!(to_iam, served_by("iam"), "requests served by IAM");
    assert!(to_iam > 0.0);
    assert_eq!(
        prometheus
            .scalar("sum(iamproxy_requests_total{job=\"iamproxy\",destination=\"rails\"})")
            .await,
        gw.rails.count() as f64,
        "requests served by Rails = requests the Rails fake received"
    );

    let durations = prometheus
        .by_labels(
            "sum by (route, destination) (iamproxy_request_duration_seconds_count{job=\"iamproxy\"}) > 0",
            &["route", "destination"],
        )
        .await;
    let mut sent_by_route: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    for (key, n) in &sent {
        *sent_by_route.entry(key[..2].to_vec()).or_default() += n;
    }
    assert_eq!(
        durations, sent_by_route,
        "duration histogram counts vs requests sent"
    );

    let decisions = prometheus
        .by_labels(
            "sum by (destination, reason) (iamproxy_routing_decisions_total{job=\"iamproxy\"}) > 0",
            &["destination", "reason"],
        )
        .await;
    let answered = |destination: &str| {
        tally
            .answered_clients
            .iter()
            .filter(|(d, _)| d == destination)
            .count() as f64
    };
    let mut merged: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    for (key, n) in &decisions {
        let reason = match key[1].as_str() {
            "cache" | "preauthorize" => "known",
            other => other,
        };
        *merged
            .entry(vec![key[0].clone(), reason.to_owned()])
            .or_default() += n;
    }
    let expected: BTreeMap<Vec<String>, f64> = tally
        .decisions
        .iter()
        .map(|(key, n)| (key.clone(), *n as f64))
        .collect();
    assert_eq!(
        merged, expected,
        "decisions (cache and preauthorize merged as known) vs requests sent"
    );
    for destination in ["iam", "rails"] {
        let key = vec![destination.to_owned(), "preauthorize".to_owned()];
        assert_eq!(
            decisions.get(&key).copied().unwrap_or(0.0),
            answered(destination),
            "{destination}/preauthorize decisions = distinct clients answered (cache ttl 10m)"
        );
    }

    let calls = prometheus
        .by_labels(
            "sum by (outcome) (iamproxy_preauthorize_calls_total{job=\"iamproxy\"})",
            &["outcome"],
        )
        .await;
    let outcome = |name: &str| calls.get(&vec![name.to_owned()]).copied();
    assert_eq!(outcome("ok"), Some(answered("iam") + answered("rails")));
    assert_eq!(outcome("bad_status"), Some(tally.bad_status_calls as f64));
    assert_eq!(outcome("connect_error"), Some(tally.dropped_calls as f64));
    assert_eq!(outcome("timeout"), Some(0.0));
    assert_eq!(outcome("bad_response"), Some(0.0));
    let misses = prometheus
        .scalar("sum(iamproxy_decision_cache_misses_total{job=\"iamproxy\"})")
        .await;
    assert_eq!(
        misses,
        gw.preauth.count() as f64,
        "one miss per pre-authorize call"
    );
    let hits = prometheus
        .scalar("sum(iamproxy_decision_cache_hits_total{job=\"iamproxy\"})")
        .await;
    let known: f64 = expected
        .iter()
        .filter(|(key, _)| key[1] == "known")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(hits, known - answered("iam") - answered("rails"));

    let fallbacks = prometheus
        .by_labels(
            "sum by (reason) (iamproxy_fallbacks_total{job=\"iamproxy\"})",
            &["reason"],
        )
        .await;
    let fallback = |reason: &str| {
        fallbacks
            .get(&vec![reason.to_owned()])
            .copied()
            .unwrap_or(0.0)
    };
    assert_eq!(
        fallbacks.values().sum::<f64>(),
        tally.fallbacks as f64,
        "fallbacks = IAM-bound requests Rails served"
    );
    for reason in ["status", "connect_error", "breaker_open"] {
        assert!(
            fallback(reason) > 0.0,
            "no {reason} fallback: {fallbacks:?}"
        );
    }
    assert_eq!(
        fallback("status") + fallback("connect_error") + fallback("timeout") + to_iam,
        gw.iam.count() as f64,
        "every request IAM received was either served by it or fell back"
    );
    let opens = prometheus
        .scalar("sum(iamproxy_iam_breaker_opens_total{job=\"iamproxy\"})")
        .await;
    assert!(
        opens >= 2.0,
        "opened, then re-opened after a failed probe: {opens}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alert_rules_return_data_from_a_real_prometheus_and_counters_match_traffic() {
    let rules = dashboards().join("alerts.yml");
    // A shared cache whose Redis refuses every connection: each lookup is an error (what
    // IamproxySharedCacheErrors watches), and the requests go on without it.
    let redis = refused_addr().await;
    let gw = gateway()
        .set(
            "redis",
            &format!("url = \"redis://{redis}/\"\nshared_cache = true"),
        )
        .set("iam", "timeout = \"1s\"")
        .set("iam.circuit_breaker", "consecutive_failures = 3")
        .set("iam.circuit_breaker", "open_for = \"1s\"")
        .set("preauthorize", "timeout = \"1s\"")
        .set("cache", "ttl = \"10m\"")
        .start()
        .await;
    let stale_down = Arc::new(AtomicBool::new(false));
    route_by_prefix(&gw, stale_down.clone());
    let prometheus = Prometheus::start(gw.admin, &rules).await;
    let start = unix_now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while prometheus
        .query("up{job=\"iamproxy\"} == 1")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape the gateway within 15 s: {}",
            prometheus.api("/api/v1/targets").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let traffic = Traffic {
        gateway: gw.addr,
        client: TestClient::new(),
        tally: Arc::default(),
    };
    drive_traffic(&gw, &traffic, &stale_down).await;
    wait_for_final_scrape(&prometheus).await;

    assert_every_dashboard_query_returns_data(&prometheus).await;
    assert_every_rule_is_healthy_and_held(&prometheus, &rules, start).await;
    let tally = std::mem::take(&mut *traffic.tally.lock().unwrap());
    assert_counters_match_traffic(&prometheus, &gw, &tally).await;
    drop(prometheus);
    gw.stop().await;
}
