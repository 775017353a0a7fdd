//! `iamproxy demo`: the real gateway in front of loopback stand-ins for Rails, IAM and the
//! pre-authorize backend, so a newcomer can watch routing and fail-open with nothing else
//! installed.
//!
//! Decisions: `demo-iam` → IAM; `demo-iam-broken` → IAM, whose stand-in answers 503 for it
//! (so the replay to Rails shows); every other client → Rails.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use iamproxy::classify::identify::identify;
use iamproxy::classify::params::{Parameters, RequestView};
use iamproxy::config::{Config, LogConfig, LogFormat, Secret};
use iamproxy::forward::ResponseBody;
use iamproxy::respond::synthetic;
use iamproxy::server::accept::{Accept, Limits, Settings, WhenFull};
use iamproxy::server::connection::Timeouts;
use iamproxy::Gateway;

/// The stand-ins serve one person trying the demo.
const STAND_IN_CONNECTIONS: usize = 256;

const IAM_CLIENT: &str = "demo-iam";
const BROKEN_IAM_CLIENT: &str = "demo-iam-broken";
/// One IAM failure, short of the URL: the banner's command that opens the breaker.
const BREAKER_REQUEST: &str =
    "curl -s -X POST -u demo-iam-broken:secret -d grant_type=client_credentials";

pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// A started demo: stand-ins serving, gateway bound.
pub struct Demo {
    gateway: Gateway,
    secret_file: PathBuf,
    /// The admin API's token, printed in the banner, and the file it is in.
    admin_token: String,
    token_file: PathBuf,
    /// Dropping this stops the stand-ins.
    _stop_stand_ins: watch::Sender<()>,
}

/// Starts the stand-ins and binds the gateway in front of them.
pub async fn start(listen: SocketAddr, admin_listen: SocketAddr) -> Result<Demo, DemoError> {
    let (stop, stopped) = watch::channel(());
    let secret = random_secret();
    let secret_file = std::env::temp_dir().join(format!(
        "iamproxy-demo-{}-{}.secret",
        std::process::id(),
        listen.port()
    ));
    write_private(&secret_file, &secret)?;
    let admin_token = random_secret();
    let token_file = secret_file.with_extension("admin-token");
    write_private(&token_file, &admin_token)?;
    let key = Secret::from_base64(&secret).map_err(|e| format!("demo secret: {e}"))?;
    let key = Arc::new(jsonwebtoken::DecodingKey::from_secret(key.as_bytes()));

    let rails = stand_in(stopped.clone(), |_request| {
        served_by("rails", StatusCode::OK)
    })
    .await?;
    let iam = stand_in(stopped.clone(), |request| {
        let view = RequestView {
            method: request.method(),
            query: request.uri().query(),
            headers: request.headers(),
            body: request.body(),
        };
        let params = Parameters::read(&view, &[]);
        match identify(view.headers, &params).client_id() {
            Some(BROKEN_IAM_CLIENT) => served_by("iam", StatusCode::SERVICE_UNAVAILABLE),
            _ => served_by("iam", StatusCode::OK),
        }
    })
    .await?;
    let preauth = stand_in(stopped, move |request| preauthorize(&key, &request)).await?;

    let toml = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin_listen}"

[rails]
url = "http://{rails}"
timeout = "10s"

[iam]
url = "http://{iam}"
timeout = "2s"

[preauthorize]
url = "http://{preauth}/-/oauth/iam_routing"
secret_file = "{secret_file}"

[cache]
ttl = "30s"

[admin]
token_file = "{token_file}"

[log]
format = "text"
"#,
        secret_file = secret_file.display(),
        token_file = token_file.display()
    );
    let config = Config::from_toml(&toml)?;
    let gateway = Gateway::bind(config).await?;
    Ok(Demo {
        gateway,
        secret_file,
        admin_token,
        token_file,
        _stop_stand_ins: stop,
    })
}

/// `iamproxy demo`: start, print what to try, serve until SIGINT/SIGTERM.
pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> Result<(), DemoError> {
    let _logging = iamproxy::observe::logging::init(&LogConfig {
        format: LogFormat::Text,
        level: tracing::Level::INFO,
        fields: Vec::new(),
    });
    let shutdown = iamproxy::shutdown_signal();
    let demo = start(listen, admin_listen).await?;
    println!("{}", demo.banner());
    demo.serve(shutdown).await;
    Ok(())
}

impl Demo {
    pub fn banner(&self) -> String {
        let gw = self.gateway.local_addr();
        let admin = self.gateway.admin_addr();
        format!(
            "iamproxy demo: gateway on http://{gw}, admin on http://{admin}
stand-ins on loopback: Rails, IAM and the pre-authorize backend.
clients: {IAM_CLIENT} -> IAM; {BROKEN_IAM_CLIENT} -> IAM, which answers 503, so Rails serves; any other -> Rails
(5 IAM failures in a row open the circuit breaker: all IAM-bound traffic then goes to Rails for 10s)

try:
  curl -s 'http://{gw}/oauth/authorize?client_id={IAM_CLIENT}&response_type=code'
  curl -s -X POST http://{gw}/oauth/token -d 'grant_type=client_credentials&client_id=demo-app'
  curl -s -X POST http://{gw}/oauth/token -u {BROKEN_IAM_CLIENT}:secret -d grant_type=client_credentials
  curl -s http://{gw}/api/v4/version
  curl -s http://{admin}/-/readiness
  curl -s http://{admin}/metrics | grep ^iamproxy_

the admin API (its token is in {token_file}): what is cached for {IAM_CLIENT}, then forget it:
  curl -s -H 'Authorization: Bearer {token}' http://{admin}/-/admin/decisions/{IAM_CLIENT}
  curl -s -X DELETE -H 'Authorization: Bearer {token}' http://{admin}/-/admin/decisions/{IAM_CLIENT}

open the circuit breaker (5 IAM failures in a row), then {IAM_CLIENT} is served by Rails for 10s:
  for i in 1 2 3 4 5; do {BREAKER_REQUEST} http://{gw}/oauth/token; echo; done
  curl -s http://{admin}/metrics | grep iamproxy_iam_breaker_state

Ctrl-C stops it.",
            token = self.admin_token,
            token_file = self.token_file.display(),
        )
    }

    /// Serves until `shutdown`, then removes the demo secret and admin token.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Demo {
            gateway,
            secret_file,
            token_file,
            _stop_stand_ins,
            ..
        } = self;
        gateway.serve(shutdown).await;
        let _ = std::fs::remove_file(secret_file);
        let _ = std::fs::remove_file(token_file);
    }
}

/// The stand-in pre-authorize backend: checks the signature as Rails would, then answers
/// from the demo's decision table.
fn preauthorize(
    key: &jsonwebtoken::DecodingKey,
    request: &Request<Bytes>,
) -> Response<ResponseBody> {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&["gitlab-workhorse"]);
    validation.set_required_spec_claims(&["iss"]);
    validation.validate_exp = false;
    let signed = request
        .headers()
        .get("gitlab-workhorse-api-request")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|jwt| {
            jsonwebtoken::decode::<serde_json::Value>(jwt, key, &validation).is_ok()
        });
    if !signed {
        return json_response(
            StatusCode::UNAUTHORIZED,
            r#"{"message":"401 Unauthorized"}"#.into(),
        );
    }
    let client_id = request
        .uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "client_id"))
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let destination = if client_id == IAM_CLIENT || client_id == BROKEN_IAM_CLIENT {
        "iam"
    } else {
        "rails"
    };
    let mut response = synthetic(
        StatusCode::OK,
        "application/vnd.gitlab-workhorse+json",
        format!(r#"{{"destination":"{destination}"}}"#),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=30"),
    );
    response
}

fn served_by(side: &str, status: StatusCode) -> Response<ResponseBody> {
    json_response(
        status,
        format!(r#"{{"served_by":"{side}","status":{}}}"#, status.as_u16()),
    )
}

fn json_response(status: StatusCode, body: String) -> Response<ResponseBody> {
    synthetic(status, "application/json", body)
}

const STAND_IN_TIMEOUTS: Timeouts = Timeouts {
    handshake_and_header_read: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    write: Duration::from_secs(60),
};

/// Serves `answer` on a fresh loopback port until the demo's stop sender is dropped.
async fn stand_in<F>(mut stop: watch::Receiver<()>, answer: F) -> Result<SocketAddr, std::io::Error>
where
    F: Fn(Request<Bytes>) -> Response<ResponseBody> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        let make = move |_conn| {
            let answer = answer.clone();
            service_fn(move |request: Request<Incoming>| {
                let answer = answer.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    Ok::<_, Infallible>(answer(Request::from_parts(parts, body)))
                }
            })
        };
        let stopped = async move { while stop.changed().await.is_ok() {} };
        let settings = || Settings {
            tls: None,
            timeouts: STAND_IN_TIMEOUTS,
        };
        let limits = Limits {
            max_connections: STAND_IN_CONNECTIONS,
            when_full: WhenFull::Wait,
            max_header_bytes: 65_536,
            h2_max_concurrent_streams: 128,
        };
        Accept::new(limits, settings, make)
            .until(&listener, stopped)
            .await;
    });
    Ok(addr)
}

/// 32 random bytes, base64-encoded: the `.gitlab_workhorse_secret` format.
fn random_secret() -> String {
    use base64::Engine as _;
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        // Each RandomState is keyed from the OS's randomness.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(chunk.as_ptr() as usize);
        chunk.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}
