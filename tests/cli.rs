//! The `iamproxy` binary run as a child process: `--version`, `--help`, `--check`, the
//! configuration from the environment, reloads on SIGHUP, graceful shutdown on SIGTERM
//! (`iamproxy demo` is in `demo.rs`).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use support::process::{free_addr, poll_until, probe, try_get, Iamproxy, TempFile, PATIENCE};
use support::{Answer, FakeUpstream, Reply, SecretFile};
use tokio::task::JoinHandle;

// ---- Configurations ---------------------------------------------------------------------

/// A complete config with IAM and pre-authorize; nothing listens at its URLs, which
/// `--check` never contacts.
fn valid_config(secret_file: &Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:8181"
admin_listen = "127.0.0.1:9229"

[rails]
url = "http://127.0.0.1:8080"

[iam]
url = "http://127.0.0.1:9000"

[preauthorize]
url = "http://127.0.0.1:8080/-/oauth/iam_routing"
secret_file = "{}"
"#,
        secret_file.display()
    )
}

/// `iamproxy --config <text> --check`.
async fn check(config: &str) -> (Iamproxy, ExitStatus) {
    let file = TempFile::new(config);
    Iamproxy::run(&["--config", file.path(), "--check"]).await
}

/// `check` for a config that must be rejected: exit 1 and the message on stderr.
async fn rejected(config: &str) -> String {
    let (process, status) = check(config).await;
    assert_eq!(status.code(), Some(1), "stdout:\n{}", process.stdout());
    process.stderr()
}

/// The binary serving in front of `rails`, ready (readiness answers 200).
struct Serving {
    process: Iamproxy,
    addr: SocketAddr,
    admin: SocketAddr,
    config: TempFile,
}

async fn serve(rails: &FakeUpstream, server_keys: &str) -> Serving {
    let (addr, admin) = (free_addr(), free_addr());
    let config = TempFile::new(&serving_config(addr, admin, server_keys, rails));
    let process = Iamproxy::start(&["--config", config.path()]);
    poll_until("readiness answers 200", || async {
        if let Some(status) = *process.exit.borrow() {
            panic!(
                "iamproxy exited with {status}; stderr:\n{}",
                process.stderr()
            );
        }
        probe(admin, "/-/readiness").await == Some(StatusCode::OK)
    })
    .await;
    Serving {
        process,
        addr,
        admin,
        config,
    }
}

fn serving_config(
    addr: SocketAddr,
    admin: SocketAddr,
    server_keys: &str,
    rails: &FakeUpstream,
) -> String {
    format!(
        "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n{server_keys}\n\
         [rails]\nurl = \"{}\"\n\n[log]\nlevel = \"warn\"\n",
        rails.url()
    )
}

impl Serving {
    /// Starts a request in the background and waits until Rails has received it.
    async fn request_held_by(&self, rails: &FakeUpstream) -> JoinHandle<Option<Answer>> {
        let addr = self.addr;
        let request = tokio::spawn(async move { try_get(addr, "/api/v4/slow").await });
        poll_until("rails has the request", || async { rails.count() == 1 }).await;
        request
    }
}

// ---- Command line -----------------------------------------------------------------------

#[tokio::test]
async fn version_prints_the_crate_version_and_the_git_commit() {
    let (process, status) = Iamproxy::run(&["--version"]).await;
    assert!(status.success());
    assert_eq!(
        process.stdout(),
        format!(
            "iamproxy {} ({})\n",
            env!("CARGO_PKG_VERSION"),
            support::process::git_commit()
        )
    );
}

#[tokio::test]
async fn help_exits_zero() {
    let (process, status) = Iamproxy::run(&["--help"]).await;
    assert!(status.success());
    assert!(
        process.stdout().contains("--config"),
        "{}",
        process.stdout()
    );
}

#[tokio::test]
async fn check_accepts_a_valid_config() {
    let secret = SecretFile::new();
    let (process, status) = check(&valid_config(secret.path())).await;
    assert!(status.success(), "stderr:\n{}", process.stderr());
}

#[tokio::test]
async fn check_rejects_an_invalid_duration_naming_key_and_value() {
    let secret = SecretFile::new();
    let config = valid_config(secret.path()) + "\n[cache]\nttl = \"sixty\"\n";
    let stderr = rejected(&config).await;
    assert!(
        stderr.contains(r#"cache.ttl: invalid duration "sixty""#),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_rejects_an_unknown_key_naming_the_file_and_the_dotted_key() {
    let secret = SecretFile::new();
    let rails = "[rails]\nurl = \"http://127.0.0.1:8080\"\n";
    let config = valid_config(secret.path()).replace(rails, &format!("{rails}timout = \"5s\"\n"));
    let file = TempFile::new(&config);
    let (process, status) = Iamproxy::run(&["--config", file.path(), "--check"]).await;
    assert_eq!(status.code(), Some(1), "stdout:\n{}", process.stdout());
    let want = format!("iamproxy: {}: rails.timout: unknown key", file.path());
    assert!(process.stderr().starts_with(&want), "{}", process.stderr());
}

#[tokio::test]
async fn iamproxy_config_names_the_file_when_config_is_not_given() {
    let secret = SecretFile::new();
    let file = TempFile::new(&valid_config(secret.path()));
    let (process, status) =
        Iamproxy::run_with_env(&["--check"], &[("IAMPROXY_CONFIG", file.path())]).await;
    assert!(status.success(), "stderr:\n{}", process.stderr());
    assert!(
        process.stdout().contains(file.path()),
        "{}",
        process.stdout()
    );
    // --config still wins.
    let missing = format!("{}.missing", file.path());
    let (process, status) = Iamproxy::run_with_env(
        &["--config", &missing, "--check"],
        &[("IAMPROXY_CONFIG", file.path())],
    )
    .await;
    assert_eq!(status.code(), Some(1));
    assert!(process.stderr().contains(&missing), "{}", process.stderr());
}

#[tokio::test]
async fn check_replaces_environment_references_and_names_an_unset_one() {
    let secret = SecretFile::new();
    let config = valid_config(secret.path())
        .replace("http://127.0.0.1:9000", "${IAM_URL}")
        .replace(
            &secret.path().display().to_string(),
            "${SECRET_DIR}/${SECRET_NAME:-x}",
        );
    let file = TempFile::new(&config);
    let dir = secret.path().parent().unwrap().to_str().unwrap();
    let name = secret.path().file_name().unwrap().to_str().unwrap();
    let args = ["--config", file.path(), "--check"];
    let env = [
        ("IAM_URL", "http://127.0.0.1:9000"),
        ("SECRET_DIR", dir),
        ("SECRET_NAME", name),
    ];
    let (process, status) = Iamproxy::run_with_env(&args, &env).await;
    assert!(status.success(), "stderr:\n{}", process.stderr());

    let (process, status) = Iamproxy::run_with_env(&args, &env[1..]).await;
    assert_eq!(status.code(), Some(1));
    let want = format!(
        "iamproxy: {}: iam.url: environment variable IAM_URL is not set",
        file.path()
    );
    assert!(process.stderr().starts_with(&want), "{}", process.stderr());
}

#[tokio::test]
async fn check_refuses_tls_on_a_unix_listener() {
    let secret = SecretFile::new();
    let config = valid_config(secret.path()).replace(
        "listen = \"127.0.0.1:8181\"",
        "listen = \"unix:/run/iamproxy/iamproxy.sock\"",
    ) + "\n[server.tls]\ncertificate_file = \"/etc/iamproxy/tls/cert.pem\"\n\
           key_file = \"/etc/iamproxy/tls/key.pem\"\n";
    let stderr = rejected(&config).await;
    assert!(
        stderr.contains("server.tls: is not served on a unix: listener (server.listen)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_rejects_a_secret_of_16_bytes_asking_for_32() {
    let random = SecretFile::new();
    let secret = TempFile::new(&STANDARD.encode(&random.bytes[..16]));
    let stderr = rejected(&valid_config(&secret.0)).await;
    assert!(stderr.contains("preauthorize.secret_file"), "{stderr}");
    assert!(stderr.contains("32"), "{stderr}");
}

#[tokio::test]
async fn check_fails_for_a_missing_config_file() {
    let missing =
        std::env::temp_dir().join(format!("iamproxy-cli-missing-{}.toml", std::process::id()));
    let missing = missing.to_str().unwrap();
    let (process, status) = Iamproxy::run(&["--config", missing, "--check"]).await;
    assert_eq!(status.code(), Some(1));
    assert!(process.stderr().contains(missing), "{}", process.stderr());
}

#[tokio::test]
async fn example_config_passes_check_with_a_generated_secret() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/iamproxy.example.toml"
    ))
    .unwrap();
    let secret = SecretFile::new();
    let default_secret = r#"secret_file = "/etc/iamproxy/.gitlab_workhorse_secret""#;
    assert!(example.contains(default_secret), "example changed shape");
    let config = example.replace(
        default_secret,
        &format!("secret_file = \"{}\"", secret.path().display()),
    );
    let (process, status) = check(&config).await;
    assert!(status.success(), "stderr:\n{}", process.stderr());
}

// ---- Reload -----------------------------------------------------------------------------

#[tokio::test]
async fn sighup_swaps_in_a_valid_config_and_keeps_the_running_one_when_invalid() {
    let old_rails = FakeUpstream::start("old-rails").await;
    let new_rails = FakeUpstream::start("new-rails").await;
    old_rails
        .always(Reply::text(200, r#"{"served_by":"old-rails"}"#).after(Duration::from_millis(800)));
    let gw = serve(&old_rails, "").await;
    let held = gw.request_held_by(&old_rails).await;

    std::fs::write(
        &gw.config.0,
        serving_config(gw.addr, gw.admin, "", &new_rails),
    )
    .unwrap();
    gw.process.signal("HUP");
    poll_until("new requests reach the new Rails", || async {
        try_get(gw.addr, "/api/v4/version")
            .await
            .is_some_and(|answer| answer.served_by() == "new-rails")
    })
    .await;
    let held = tokio::time::timeout(PATIENCE, held)
        .await
        .expect("the request in flight finishes")
        .expect("request task")
        .expect("answered");
    assert_eq!(held.served_by(), "old-rails", "in flight across the reload");

    let invalid = serving_config(gw.addr, gw.admin, "max_body_bytes = 0", &old_rails);
    std::fs::write(&gw.config.0, invalid).unwrap();
    gw.process.signal("HUP");
    poll_until("the failed reload is logged", || async {
        gw.process.stderr().contains("config reload failed")
    })
    .await;
    let stderr = gw.process.stderr();
    assert!(
        stderr.contains("server.max_body_bytes: must be at least 1, found 0"),
        "the log names the key and the reason:\n{stderr}"
    );
    let answer = try_get(gw.addr, "/api/v4/version")
        .await
        .expect("still serving");
    assert_eq!(answer.served_by(), "new-rails", "the running config stays");
    assert!(gw.process.exit.borrow().is_none(), "still running");
}

#[tokio::test]
async fn sighup_substitutes_the_environment_again_in_the_reloaded_file() {
    let old_rails = FakeUpstream::start("old-rails").await;
    let new_rails = FakeUpstream::start("new-rails").await;
    let (addr, admin) = (free_addr(), free_addr());
    let config = TempFile::new(&serving_config(addr, admin, "", &old_rails));
    let process = Iamproxy::start_with_env(
        &["--config", config.path()],
        &[("NEW_RAILS_URL", &new_rails.url())],
    );
    poll_until("readiness answers 200", || async {
        probe(admin, "/-/readiness").await == Some(StatusCode::OK)
    })
    .await;
    let reloaded =
        serving_config(addr, admin, "", &new_rails).replace(&new_rails.url(), "${NEW_RAILS_URL}");
    std::fs::write(&config.0, reloaded).unwrap();
    process.signal("HUP");
    poll_until("requests reach the Rails the environment names", || async {
        try_get(addr, "/api/v4/version")
            .await
            .is_some_and(|answer| answer.served_by() == "new-rails")
    })
    .await;

    let unset = serving_config(addr, admin, "", &old_rails)
        .replace(&old_rails.url(), "${NOT_SET_ANYWHERE}");
    std::fs::write(&config.0, unset).unwrap();
    process.signal("HUP");
    poll_until("the failed reload is logged", || async {
        process.stderr().contains("config reload failed")
    })
    .await;
    assert!(
        process
            .stderr()
            .contains("rails.url: environment variable NOT_SET_ANYWHERE is not set"),
        "{}",
        process.stderr()
    );
    let answer = try_get(addr, "/api/v4/version")
        .await
        .expect("still serving");
    assert_eq!(answer.served_by(), "new-rails", "the running config stays");
}

#[tokio::test]
async fn sighup_reloads_are_counted_by_result_and_a_failed_one_reads_0_until_one_succeeds() {
    use support::metrics::scrape;
    const SUCCESSFUL: &str = "iamproxy_config_last_reload_successful";
    const SUCCEEDED_AT: &str = "iamproxy_config_last_reload_success_timestamp_seconds";
    const RELOADS: &str = "iamproxy_config_reloads_total";
    let rails = FakeUpstream::start("rails").await;
    let gw = serve(&rails, "").await;
    let scraped = scrape(gw.admin).await;
    assert_eq!(scraped.value(SUCCESSFUL, &[]), 1.0, "the start counts");
    let started = scraped.value(SUCCEEDED_AT, &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now).contains(&started),
        "{started} vs now {now}"
    );
    for result in ["success", "failure"] {
        assert_eq!(
            scraped.value(RELOADS, &[("result", result)]),
            0.0,
            "{result}"
        );
    }

    let invalid = serving_config(gw.addr, gw.admin, "max_body_bytes = 0", &rails);
    std::fs::write(&gw.config.0, invalid).unwrap();
    gw.process.signal("HUP");
    poll_until("the failed reload is counted", || async {
        scrape(gw.admin)
            .await
            .value(RELOADS, &[("result", "failure")])
            == 1.0
    })
    .await;
    let scraped = scrape(gw.admin).await;
    assert_eq!(scraped.value(SUCCESSFUL, &[]), 0.0);
    assert_eq!(
        scraped.value(SUCCEEDED_AT, &[]),
        started,
        "unchanged by a failure"
    );
    assert_eq!(scraped.value(RELOADS, &[("result", "success")]), 0.0);

    tokio::time::sleep(Duration::from_millis(10)).await;
    let valid = serving_config(gw.addr, gw.admin, "max_body_bytes = 4096", &rails);
    std::fs::write(&gw.config.0, valid).unwrap();
    gw.process.signal("HUP");
    poll_until("the good reload is counted", || async {
        scrape(gw.admin)
            .await
            .value(RELOADS, &[("result", "success")])
            == 1.0
    })
    .await;
    let scraped = scrape(gw.admin).await;
    assert_eq!(scraped.value(SUCCESSFUL, &[]), 1.0);
    assert!(scraped.value(SUCCEEDED_AT, &[]) > started);
    assert_eq!(scraped.value(RELOADS, &[("result", "failure")]), 1.0);
}

#[tokio::test]
async fn sighup_log_level_applies_to_log_statements_that_already_ran() {
    let quiet_rails = FakeUpstream::start("quiet-rails").await;
    let loud_rails = FakeUpstream::start("loud-rails").await;
    let gw = serve(&loud_rails, "").await;
    let at = |level: &str, rails: &FakeUpstream| {
        serving_config(gw.addr, gw.admin, "", rails)
            .replace("level = \"warn\"", &format!("level = \"{level}\""))
    };
    // Each reload also moves Rails, so a request answered by the new one proves it applied.
    let reload_to = |level: &'static str, rails: &'static str, config: String| {
        std::fs::write(&gw.config.0, config).unwrap();
        gw.process.signal("HUP");
        poll_until(level, move || async move {
            try_get(gw.addr, "/api/v4/version")
                .await
                .is_some_and(|answer| answer.served_by() == rails)
        })
    };

    reload_to("info", "loud-rails", at("info", &loud_rails)).await;
    assert!(try_get(gw.addr, "/first-at-info").await.is_some());
    poll_until("the access line at info", || async {
        gw.process.stderr().contains("/first-at-info")
    })
    .await;

    reload_to("warn", "quiet-rails", at("warn", &quiet_rails)).await;
    assert!(try_get(gw.addr, "/at-warn").await.is_some());
    reload_to("info again", "loud-rails", at("info", &loud_rails)).await;
    assert!(try_get(gw.addr, "/back-at-info").await.is_some());
    poll_until("the access line at info again", || async {
        gw.process.stderr().contains("/back-at-info")
    })
    .await;
    let stderr = gw.process.stderr();
    assert!(
        !stderr.contains("/at-warn"),
        "the access statement, already run at info, was silenced at warn:\n{stderr}"
    );
}

// ---- Graceful shutdown ------------------------------------------------------------------

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish_then_exits_zero() {
    let rails = FakeUpstream::start("rails").await;
    rails.always(Reply::text(200, r#"{"served_by":"rails"}"#).after(Duration::from_millis(1500)));
    let mut gw = serve(
        &rails,
        "graceful_shutdown_delay = \"0s\"\nshutdown_timeout = \"10s\"",
    )
    .await;
    let slow = gw.request_held_by(&rails).await;

    gw.process.sigterm();
    let answer = tokio::time::timeout(PATIENCE, slow)
        .await
        .expect("slow request finishes")
        .expect("slow request task")
        .expect("slow request answered");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.served_by(), "rails");
    gw.process.assert_exits_cleanly().await;
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "listener still accepts after exit"
    );
}

#[tokio::test]
async fn sigterm_removes_the_unix_socket_the_gateway_listened_on() {
    let rails = FakeUpstream::start("rails").await;
    let dir = support::unix::SocketDir::new();
    let socket = dir.path("iamproxy.sock");
    let admin = free_addr();
    let config = TempFile::new(&format!(
        "[server]\nlisten = \"unix:{}\"\nadmin_listen = \"{admin}\"\n\
         [rails]\nurl = \"{}\"\n[log]\nlevel = \"warn\"\n",
        socket.display(),
        rails.url()
    ));
    let mut process = Iamproxy::start(&["--config", config.path()]);
    poll_until("readiness answers 200", || async {
        probe(admin, "/-/readiness").await == Some(StatusCode::OK)
    })
    .await;
    let request = Request::get("/api/v4/version")
        .header("host", "gitlab.example.com")
        .body(Full::default())
        .unwrap();
    let answer = support::unix::send_unix(&socket, request).await;
    assert_eq!(answer.served_by(), "rails");

    process.sigterm();
    process.assert_exits_cleanly().await;
    assert!(!socket.exists(), "the socket file is removed on exit");
}

#[tokio::test]
async fn readiness_reports_503_during_the_graceful_delay_while_requests_are_served() {
    let rails = FakeUpstream::start("rails").await;
    let mut gw = serve(&rails, "graceful_shutdown_delay = \"1s\"").await;

    gw.process.sigterm();
    let admin = gw.admin;
    poll_until("readiness answers 503", || async {
        probe(admin, "/-/readiness").await == Some(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert_eq!(probe(admin, "/-/liveness").await, Some(StatusCode::OK));
    let answer = try_get(gw.addr, "/api/v4/version").await;
    let answer = answer.expect("a new connection is served during the delay");
    assert_eq!(answer.served_by(), "rails");

    gw.process.assert_exits_cleanly().await;
}

#[tokio::test]
async fn shutdown_timeout_bounds_exit_when_a_request_never_finishes() {
    let rails = FakeUpstream::start("rails").await;
    rails.always(Reply::Hang);
    let mut gw = serve(&rails, "shutdown_timeout = \"500ms\"").await;
    let _hanging = gw.request_held_by(&rails).await;

    gw.process.sigterm();
    let status = gw.process.exit_status(Duration::from_secs(3)).await;
    assert!(
        status.success(),
        "{status}; stderr:\n{}",
        gw.process.stderr()
    );
}
