//! Logs (DESIGN §8): secrets never reach a log line, and every request gets exactly one
//! access line and every OAuth request one routing-decision line, as JSON.

mod support;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;
use std::time::Duration;

use support::logs::Captured;
use support::otlp::{Collector, ReceivedSpan};
use support::{gateway, Reply, TestClient, TestGateway};

/// The one line with this `msg`.
fn only<'a>(lines: &'a [Value], msg: &str) -> &'a Value {
    let found: Vec<&Value> = lines.iter().filter(|line| line["msg"] == msg).collect();
    assert_eq!(
        found.len(),
        1,
        "want exactly one {msg:?} line in {lines:#?}"
    );
    found[0]
}

fn count(lines: &[Value], msg: &str) -> usize {
    lines.iter().filter(|line| line["msg"] == msg).count()
}

// ---- A request full of secrets ----------------------------------------------------------

/// 32 hex digits, different on every call and every run.
fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let half = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u8(0);
        hasher.finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

/// Every kind of secret DESIGN §8 names, with values generated at test time.
struct Secrets {
    client_id: String,
    client_secret: String,
    code: String,
    code_verifier: String,
    refresh_token: String,
    access_token: String,
    device_code: String,
    token: String,
    client_assertion: String,
    password: String,
    basic_password: String,
    cookie: String,
}

impl Secrets {
    fn new() -> Secrets {
        let client_id = format!("app-{}", random_hex());
        let claims = format!(
            r#"{{"iss":"{client_id}","sub":"{client_id}","jti":"{}"}}"#,
            random_hex()
        );
        let client_assertion = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims),
            URL_SAFE_NO_PAD.encode(format!("signature-{}", random_hex())),
        );
        let secret = |kind: &str| format!("{kind}-{}", random_hex());
        Secrets {
            client_secret: secret("client-secret"),
            code: secret("code"),
            code_verifier: secret("verifier"),
            refresh_token: secret("refresh"),
            access_token: secret("access"),
            device_code: secret("device"),
            token: secret("token"),
            client_assertion,
            password: secret("password"),
            basic_password: secret("basic"),
            cookie: secret("cookie"),
            client_id,
        }
    }

    fn basic_credentials(&self) -> String {
        STANDARD.encode(format!("{}:{}", self.client_id, self.basic_password))
    }

    /// `POST /oauth/token` with secrets in the query, the form body, `Authorization: Basic`
    /// and `Cookie`; every client_id source agrees, so the client is known.
    fn token_request(&self, gw: &TestGateway, correlation_id: &str) -> Request<Full<Bytes>> {
        let query = format!(
            "code={}&code_verifier={}&access_token={}",
            self.code, self.code_verifier, self.access_token
        );
        let form = format!(
            "grant_type=authorization_code&client_id={}&client_secret={}&refresh_token={}\
             &device_code={}&token={}&client_assertion={}&password={}",
            self.client_id,
            self.client_secret,
            self.refresh_token,
            self.device_code,
            self.token,
            self.client_assertion,
            self.password
        );
        Request::post(gw.url(&format!("/oauth/token?{query}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .header(
                "authorization",
                format!("Basic {}", self.basic_credentials()),
            )
            .header("cookie", format!("_gitlab_session={}", self.cookie))
            .header("x-request-id", correlation_id)
            .body(Full::new(Bytes::from(form)))
            .unwrap()
    }

    /// A non-OAuth request carrying a token in the query and a cookie.
    fn api_request(&self, gw: &TestGateway, correlation_id: &str) -> Request<Full<Bytes>> {
        Request::get(gw.url(&format!("/api/v4/user?private_token={}", self.token)))
            .header("cookie", format!("_gitlab_session={}", self.cookie))
            .header("x-request-id", correlation_id)
            .body(Full::default())
            .unwrap()
    }

    /// Everything that must never be logged, including encoded forms and JWT parts.
    fn values(&self) -> Vec<(&'static str, String)> {
        let signature = self.client_assertion.rsplit('.').next().unwrap().to_owned();
        let claims = self.client_assertion.split('.').nth(1).unwrap().to_owned();
        vec![
            ("client_secret", self.client_secret.clone()),
            ("code", self.code.clone()),
            ("code_verifier", self.code_verifier.clone()),
            ("refresh_token", self.refresh_token.clone()),
            ("access_token", self.access_token.clone()),
            ("device_code", self.device_code.clone()),
            ("token", self.token.clone()),
            ("client_assertion", self.client_assertion.clone()),
            ("client_assertion claims", claims),
            ("client_assertion signature", signature),
            ("password", self.password.clone()),
            ("Basic password", self.basic_password.clone()),
            ("Basic credentials (base64)", self.basic_credentials()),
            ("cookie", self.cookie.clone()),
        ]
    }

    /// No secret appears anywhere in the captured output, whichever request logged it.
    fn assert_never_logged(&self) {
        let logs = Captured::global().text();
        for (what, value) in self.values() {
            assert!(
                !logs.contains(&value),
                "{what} {value:?} was logged:\n{logs}"
            );
        }
    }
}

/// A gateway that keeps the test's X-Request-Id, so its lines can be told apart from those
/// of the tests running beside it. The secret-laden request carries every token parameter,
/// without an IAM prefix: `rails_issued = "decision"` lets it take every routing path,
/// where the default would send it back to Rails (see the `rails_issued` test).
async fn gateway_keeping_request_ids() -> TestGateway {
    Captured::global();
    gateway()
        .set("server", r#"trusted_cidrs = ["127.0.0.1/32"]"#)
        .set("routing", r#"rails_issued = "decision""#)
        .start()
        .await
}

/// What a request's access and routing-decision lines should say.
struct Expected {
    served_by: &'static str,
    destination: &'static str,
    fallback_reason: &'static str,
    decided: &'static str,
    reason: &'static str,
}

/// Sends the secret-laden token request through `gw` and checks its lines and that no
/// secret reached the log. Returns the request's lines for further checks.
async fn secrets_request_is_logged_safely(
    gw: TestGateway,
    secrets: Secrets,
    expected: Expected,
) -> Vec<Value> {
    let correlation_id = format!("logs-{}", random_hex());
    let answer = TestClient::new()
        .send(secrets.token_request(&gw, &correlation_id))
        .await;
    assert_eq!(answer.served_by(), expected.served_by);

    let lines = Captured::global().request_lines(&correlation_id).await;
    let access = only(&lines, "access");
    for field in [
        "correlation_id",
        "method",
        "path",
        "status",
        "duration_ms",
        "destination",
        "reason",
        "fallback_reason",
        "client_id",
    ] {
        assert!(access.get(field).is_some(), "no {field} in {access}");
    }
    assert_eq!(access["method"], "POST");
    assert_eq!(access["path"], "/oauth/token", "path without the query");
    assert_eq!(access["status"], 200);
    assert!(access["duration_ms"].is_number(), "{access}");
    assert_eq!(access["destination"], expected.destination);
    assert_eq!(access["reason"], expected.reason);
    assert_eq!(access["fallback_reason"], expected.fallback_reason);
    assert_eq!(access["client_id"], secrets.client_id.as_str());

    let decision = only(&lines, "iamproxy: routing decision");
    assert_eq!(decision["client_id"], secrets.client_id.as_str());
    assert_eq!(decision["destination"], expected.decided);
    assert_eq!(decision["reason"], expected.reason);

    secrets.assert_never_logged();
    gw.stop().await;
    lines
}

// ---- Tests -------------------------------------------------------------------------------

#[tokio::test]
async fn secrets_stay_out_of_logs_when_routed_to_iam() {
    let gw = gateway_keeping_request_ids().await;
    gw.preauth.always(Reply::destination("iam"));
    let expected = Expected {
        served_by: "iam",
        destination: "iam",
        fallback_reason: "",
        decided: "iam",
        reason: "preauthorize",
    };
    secrets_request_is_logged_safely(gw, Secrets::new(), expected).await;
}

#[tokio::test]
async fn secrets_stay_out_of_logs_when_routed_to_rails() {
    let gw = gateway_keeping_request_ids().await;
    let expected = Expected {
        served_by: "rails",
        destination: "rails",
        fallback_reason: "",
        decided: "rails",
        reason: "preauthorize",
    };
    secrets_request_is_logged_safely(gw, Secrets::new(), expected).await;
}

#[tokio::test]
async fn secrets_stay_out_of_logs_when_iam_fails_and_rails_serves() {
    let gw = gateway_keeping_request_ids().await;
    gw.preauth.always(Reply::destination("iam"));
    gw.iam.always(Reply::status(503));
    let expected = Expected {
        served_by: "rails",
        destination: "rails",
        fallback_reason: "status",
        decided: "iam",
        reason: "preauthorize",
    };
    secrets_request_is_logged_safely(gw, Secrets::new(), expected).await;
}

#[tokio::test]
async fn preauthorize_error_logs_a_warning_naming_the_outcome_without_secrets() {
    let gw = gateway_keeping_request_ids().await;
    gw.preauth.always(Reply::status(500));
    let expected = Expected {
        served_by: "rails",
        destination: "rails",
        fallback_reason: "",
        decided: "rails",
        reason: "preauthorize_error",
    };
    let lines = secrets_request_is_logged_safely(gw, Secrets::new(), expected).await;
    let warning = only(&lines, "iamproxy: pre-authorize failed, routing to rails");
    assert_eq!(warning["level"], "warn");
    assert_eq!(warning["outcome"], "bad_status");
}

#[tokio::test]
async fn secrets_stay_out_of_logs_when_rails_issued_tokens_go_back_to_rails() {
    Captured::global();
    let gw = gateway()
        .set("server", r#"trusted_cidrs = ["127.0.0.1/32"]"#)
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    let expected = Expected {
        served_by: "rails",
        destination: "rails",
        fallback_reason: "",
        decided: "rails",
        reason: "rails_issued",
    };
    let preauth = gw.preauth.clone();
    secrets_request_is_logged_safely(gw, Secrets::new(), expected).await;
    assert_eq!(preauth.count(), 0, "no pre-authorize call");
}

#[tokio::test]
async fn a_stale_decision_logs_a_warning_and_its_reason_without_secrets() {
    let gw = gateway_keeping_request_ids().await;
    // Never fresh, but kept a minute for stale serving.
    gw.preauth.always(
        Reply::destination("iam").with_header("cache-control", "max-age=0, stale-if-error=60"),
    );
    let secrets = Secrets::new();
    let answer = TestClient::new()
        .send(secrets.token_request(&gw, &format!("logs-{}", random_hex())))
        .await;
    assert_eq!(answer.served_by(), "iam");
    gw.preauth.always(Reply::status(500));
    let expected = Expected {
        served_by: "iam",
        destination: "iam",
        fallback_reason: "",
        decided: "iam",
        reason: "stale",
    };
    let lines = secrets_request_is_logged_safely(gw, secrets, expected).await;
    let warning = only(
        &lines,
        "iamproxy: pre-authorize failed, serving the last good decision",
    );
    assert_eq!(warning["level"], "warn");
    assert_eq!(warning["outcome"], "bad_status");
    assert_eq!(
        count(&lines, "iamproxy: pre-authorize failed, routing to rails"),
        0
    );
}

#[tokio::test]
async fn non_oauth_request_gets_an_access_line_and_no_routing_decision() {
    let gw = gateway_keeping_request_ids().await;
    let secrets = Secrets::new();
    let correlation_id = format!("logs-{}", random_hex());
    let answer = TestClient::new()
        .send(secrets.api_request(&gw, &correlation_id))
        .await;
    assert_eq!(answer.served_by(), "rails");

    let lines = Captured::global().request_lines(&correlation_id).await;
    let access = only(&lines, "access");
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/api/v4/user");
    assert_eq!(access["status"], 200);
    assert_eq!(access["destination"], "rails");
    assert_eq!(access["reason"], "", "not OAuth: no routing reason");
    assert_eq!(access["fallback_reason"], "");
    assert_eq!(access["client_id"], "");
    assert_eq!(count(&lines, "iamproxy: routing decision"), 0, "{lines:#?}");
    secrets.assert_never_logged();
    gw.stop().await;
}

// ---- labkit's access fields and log.fields -------------------------------------------------

/// The one access line of `correlation_id`, once written.
async fn access_line(correlation_id: &str) -> Value {
    let lines = Captured::global().request_lines(correlation_id).await;
    only(&lines, "access").clone()
}

#[tokio::test]
async fn access_line_has_labkits_fields_with_query_and_referrer_values_filtered() {
    let gw = gateway_keeping_request_ids().await;
    let body = r#"{"served_by":"rails","projects":[1,2,3]}"#;
    gw.rails.always(Reply::Respond {
        status: hyper::StatusCode::OK,
        headers: vec![("content-type", "application/json; charset=utf-8".into())],
        body: Bytes::from(body),
    });
    let token = format!("private-{}", random_hex());
    let code = format!("code-{}", random_hex());
    let password = format!("referrer-password-{}", random_hex());
    let correlation_id = format!("logs-{}", random_hex());
    let request = Request::get(gw.url(&format!(
        "/api/v4/projects?private_token={token}&per_page=20&{code}"
    )))
    .header("host", "gitlab.example.com")
    .header("user-agent", "labkit-test/1.0 (\"quoted\")")
    .header(
        "referer",
        format!("https://root:{password}@gitlab.example.com/oauth/authorize?code={code}#access_token={token}"),
    )
    // The gateway trusts 127.0.0.1 here: its chain says who the client is.
    .header("x-forwarded-for", "198.51.100.66, 203.0.113.7")
    .header("x-request-id", &correlation_id)
    .body(Full::default())
    .unwrap();
    let answer = TestClient::new().send(request).await;
    assert_eq!(answer.text(), body);

    let access = access_line(&correlation_id).await;
    assert_eq!(access["remote_ip"], "203.0.113.7", "{access}");
    assert_eq!(access["host"], "gitlab.example.com");
    assert_eq!(
        access["uri"],
        "/api/v4/projects?private_token=[FILTERED]&per_page=[FILTERED]&[FILTERED]"
    );
    assert_eq!(access["path"], "/api/v4/projects");
    assert_eq!(access["proto"], "HTTP/1.1");
    assert_eq!(access["user_agent"], "labkit-test/1.0 (\"quoted\")");
    assert_eq!(
        access["referrer"],
        "https://gitlab.example.com/oauth/authorize?code=[FILTERED]"
    );
    assert_eq!(access["written_bytes"], body.len());
    assert_eq!(access["content_type"], "application/json; charset=utf-8");
    let (ttfb, duration) = (
        access["ttfb_ms"].as_f64().expect("ttfb_ms is a number"),
        access["duration_ms"]
            .as_f64()
            .expect("duration_ms is a number"),
    );
    assert!(
        0.0 < ttfb && ttfb <= duration,
        "ttfb {ttfb} ms, duration {duration} ms"
    );
    let logs = Captured::global().text();
    for secret in [&token, &code, &password] {
        assert!(!logs.contains(secret.as_str()), "{secret} was logged");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_streamed_response_is_logged_once_sent_with_every_byte_and_its_whole_duration() {
    let gw = gateway_keeping_request_ids().await;
    gw.rails.always(Reply::Drip {
        chunk: Bytes::from(vec![b'x'; 1000]),
        chunks: 5,
        every: std::time::Duration::from_millis(60),
    });
    let correlation_id = format!("logs-{}", random_hex());
    let request = Request::get(gw.url("/api/v4/jobs/1/trace"))
        .header("x-request-id", &correlation_id)
        .body(Full::default())
        .unwrap();
    let answer = TestClient::new().send(request).await;
    assert_eq!(answer.body.len(), 5000);

    let access = access_line(&correlation_id).await;
    assert_eq!(access["written_bytes"], 5000, "{access}");
    let (ttfb, duration) = (
        access["ttfb_ms"].as_f64().unwrap(),
        access["duration_ms"].as_f64().unwrap(),
    );
    // Headers go out with the first chunk; four more follow, 60 ms apart.
    assert!(
        duration - ttfb >= 200.0,
        "ttfb {ttfb} ms, duration {duration} ms"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_untrusted_peer_is_its_own_remote_ip_and_http2_is_logged_as_such() {
    Captured::global();
    let gw = gateway().start().await;
    let request = Request::get(gw.url("/api/v4/version"))
        .header("x-forwarded-for", "198.51.100.66")
        .body(Full::<Bytes>::default())
        .unwrap();
    let answer = support::send_h2(gw.addr, request).await;
    let correlation_id = answer.headers["x-request-id"].to_str().unwrap().to_owned();
    let access = access_line(&correlation_id).await;
    assert_eq!(access["remote_ip"], "127.0.0.1", "{access}");
    assert_eq!(access["proto"], "HTTP/2.0");
    assert_eq!(access["written_bytes"], answer.body.len());
    assert_eq!(access["referrer"], "");
    gw.stop().await;
}

#[tokio::test]
async fn every_line_carries_log_fields_so_the_seeds_kibana_search_finds_the_decisions() {
    let gw = gateway_keeping_request_ids().await;
    let correlation_id = format!("logs-{}", random_hex());
    let answer = TestClient::new()
        .send(Secrets::new().token_request(&gw, &correlation_id))
        .await;
    assert_eq!(answer.served_by(), "rails");
    let lines = Captured::global().request_lines(&correlation_id).await;
    // json.subcomponent : "workhorse" AND json.msg : "iamproxy: routing decision"
    let found: Vec<&Value> = lines
        .iter()
        .filter(|line| {
            line["subcomponent"] == "workhorse" && line["msg"] == "iamproxy: routing decision"
        })
        .collect();
    assert_eq!(found.len(), 1, "{lines:#?}");
    gw.stop().await;
    let all = Captured::global().lines();
    let without: Vec<&Value> = all
        .iter()
        .filter(|line| line["subcomponent"] != "workhorse")
        .collect();
    assert!(without.is_empty(), "lines without the field: {without:#?}");
    assert!(
        all.iter().any(|line| line.get("correlation_id").is_none()),
        "lines that are not about a request carry it too"
    );
}

#[tokio::test]
async fn the_binary_writes_log_fields_on_its_start_access_and_shutdown_lines() {
    use support::process::{free_addr, Iamproxy, TempFile};
    let rails = support::FakeUpstream::start("rails").await;
    let (addr, admin) = (free_addr(), free_addr());
    let config = TempFile::new(&format!(
        "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n\
         [rails]\nurl = \"{}\"\n[log]\n{}\n",
        rails.url(),
        support::logs::LOG_FIELDS
    ));
    let mut process = Iamproxy::start(&["--config", config.path()]);
    let url = format!("http://{addr}/api/v4/version");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let request = Request::get(url.as_str()).body(Full::default()).unwrap();
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            TestClient::new().try_send(request),
        )
        .await;
        if let Ok(Some(answer)) = sent {
            assert_eq!(answer.served_by(), "rails");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", process.stderr());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    process.sigterm();
    process.assert_exits_cleanly().await;
    let stderr = process.stderr();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(lines.iter().any(|line| line["msg"] == "access"), "{stderr}");
    assert!(
        lines.len() >= 3,
        "start, access and shutdown lines: {stderr}"
    );
    for line in &lines {
        assert_eq!(line["subcomponent"], "workhorse", "{line}");
    }
}

// ---- Tracing ----------------------------------------------------------------------------

/// A gateway recording every request to `collector`, keeping the test's X-Request-Id.
async fn traced_gateway(collector: &Collector) -> TestGateway {
    Captured::global();
    let tracing = format!(
        "otlp_endpoint = \"{}\"\nsample_ratio = 1.0",
        collector.endpoint()
    );
    gateway()
        .set("server", r#"trusted_cidrs = ["127.0.0.1/32"]"#)
        .set("tracing", &tracing)
        .start()
        .await
}

fn token_request_as(gw: &TestGateway, correlation_id: &str) -> Request<Full<Bytes>> {
    Request::post(gw.url("/oauth/token"))
        .header("x-request-id", correlation_id)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials&client_id=app-traced",
        )))
        .unwrap()
}

#[tokio::test]
async fn traced_lines_carry_the_trace_id_and_the_span_only_the_client_id_the_line_shows() {
    let collector = Collector::start().await;
    let gw = traced_gateway(&collector).await;
    gw.preauth.always(Reply::destination("iam"));
    let correlation_id = format!("logs-{}", random_hex());
    let answer = TestClient::new()
        .send(token_request_as(&gw, &correlation_id))
        .await;
    assert_eq!(answer.served_by(), "iam");

    let lines = Captured::global().request_lines(&correlation_id).await;
    let access = only(&lines, "access");
    let decision = only(&lines, "iamproxy: routing decision");
    let is_ours = |span: &ReceivedSpan| {
        span.attr("iamproxy.correlation_id").as_deref() == Some(correlation_id.as_str())
    };
    let spans = collector
        .wait_for(
            Duration::from_secs(5),
            "the request's server span",
            |spans| spans.iter().any(is_ours),
        )
        .await;
    let server = spans.iter().find(|span| is_ours(span)).unwrap();
    let trace_id = server.trace_id();
    assert_eq!(access["trace_id"], trace_id.as_str(), "{access}");
    assert_eq!(decision["trace_id"], trace_id.as_str(), "{decision}");
    // The line shows the client id (the log is at debug here), so the span may too.
    assert_eq!(access["client_id"], "app-traced");
    assert_eq!(
        server.attr("iamproxy.client_id").as_deref(),
        Some("app-traced")
    );
}

/// The warning lines about the collector so far.
fn collector_lines(msg: &str) -> usize {
    count(&Captured::global().lines(), msg)
}

#[tokio::test]
async fn a_failing_collector_is_logged_once_per_episode_not_once_per_batch() {
    const DOWN: &str =
        "tracing: cannot export spans, dropping them until the collector takes them again";
    const BACK: &str = "tracing: the collector takes spans again";
    let collector = Collector::start().await;
    collector.set_status(Some(503));
    let gw = traced_gateway(&collector).await;
    let client = TestClient::new();
    let exports_reach = |n: usize| {
        let collector = &collector;
        async move {
            support::until(Duration::from_secs(5), "an export", || async {
                collector.requests() >= n
            })
            .await
        }
    };
    let get = || {
        Request::get(gw.url("/api/v4/projects"))
            .body(Full::default())
            .unwrap()
    };
    for batch in 1..=3 {
        assert_eq!(client.send(get()).await.status, 200);
        exports_reach(batch).await;
    }
    assert_eq!(
        collector_lines(DOWN),
        1,
        "three failed batches, one episode"
    );
    assert_eq!(collector_lines(BACK), 0);

    collector.set_status(None);
    assert_eq!(client.send(get()).await.status, 200);
    exports_reach(4).await;
    support::until(Duration::from_secs(5), "the all-clear", || async {
        collector_lines(BACK) == 1
    })
    .await;
    let back = Captured::global()
        .lines()
        .into_iter()
        .find(|line| line["msg"] == BACK)
        .unwrap();
    assert_eq!(
        back["dropped_spans"], 6,
        "two spans each of three requests: {back}"
    );

    collector.set_status(Some(503));
    assert_eq!(client.send(get()).await.status, 200);
    exports_reach(5).await;
    support::until(
        Duration::from_secs(5),
        "the second episode's warning",
        || async { collector_lines(DOWN) == 2 },
    )
    .await;
}
