//! The configuration's tests: defaults, every key read, and every error naming its key
//! (upstream URLs, TLS files and secrets in `upstreams.rs`, `[routing]` in `routing.rs`,
//! the file's text, its errors' keys and the environment in `reading.rs`, Unix sockets in
//! `sockets.rs`, `log.fields` and the correlation id's trusted peers in `logs.rs`).

mod logs;
mod reading;
mod redis;
mod routing;
mod sockets;
mod upstreams;

use super::*;
use crate::decision::rules::RailsIssued;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hyper::header::HeaderValue;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const MINIMAL: &str = "[rails]\nurl = \"http://127.0.0.1:8080\"\n";

fn err(text: &str) -> String {
    Config::from_toml(text)
        .expect_err("config should be rejected")
        .to_string()
}

/// A file under the temp dir, removed on drop so a failing test leaves nothing behind.
struct TempFile(PathBuf);

impl TempFile {
    fn with(contents: &[u8]) -> TempFile {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("iamproxy-config-{}-{n}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let state = RandomState::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (0..n)
        .map(|i| {
            let mut h = state.build_hasher();
            h.write_u128(now);
            h.write_usize(i);
            h.finish().to_le_bytes()[0]
        })
        .collect()
}

fn secret_file(len: usize) -> TempFile {
    TempFile::with(format!("{}\n", STANDARD.encode(random_bytes(len))).as_bytes())
}

/// MINIMAL plus [iam] and [preauthorize]; `extra` lands in [preauthorize] unless it opens a table.
fn with_iam(secret: &str, extra: &str) -> String {
    format!(
        "{MINIMAL}[iam]\nurl = \"http://127.0.0.1:9000\"\n[preauthorize]\n\
         url = \"http://127.0.0.1:8080/-/oauth/iam_routing\"\nsecret_file = '{secret}'\n{extra}"
    )
}

/// Sets `table.key = value` in `base`, opening the table when it is not there yet.
fn set(base: &str, table: &str, key: &str, value: &str) -> String {
    let header = format!("[{table}]\n");
    let line = format!("{key} = {value}\n");
    if base.contains(&header) {
        base.replace(&header, &format!("{header}{line}"))
    } else {
        format!("{base}{header}{line}")
    }
}

#[test]
fn minimal_config_gets_every_default() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8181");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9229");
    assert_eq!(c.server.socket_mode, 0o666);
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.max_body_bytes, 1_048_576);
    assert_eq!(c.server.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.server.graceful_shutdown_delay, Duration::ZERO);
    assert!(c.server.trusted_cidrs.is_empty());
    let paths: Vec<_> = c
        .oauth
        .paths
        .iter()
        .map(|(p, e)| (p.as_str(), *e))
        .collect();
    assert_eq!(paths, Endpoint::ALL.map(|e| (e.default_path(), e)));
    assert_eq!(c.rails.url.address.to_string(), "http://127.0.0.1:8080/");
    assert_eq!(c.rails.timeout, Duration::from_secs(60));
    assert!(c.iam.is_none() && c.preauthorize.is_none());
    assert_eq!(c.cache.ttl, Duration::from_secs(60));
    assert_eq!(c.cache.max_entries, 100_000);
    assert_eq!(c.cache.stale_if_error, Duration::from_secs(300));
    assert_eq!(c.routing.rails_issued, RailsIssued::Rails);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, tracing::Level::INFO);
}

#[test]
fn full_config_round_trips_every_value() {
    let secret = secret_file(32);
    let text = format!(
        r#"
        [server]
        listen = "0.0.0.0:80"
        admin_listen = "[::1]:9000"
        header_read_timeout = "3s"
        max_body_bytes = 4096
        shutdown_timeout = "1m"
        graceful_shutdown_delay = "5s"
        trusted_cidrs = ["10.0.0.0/8", "::1"]
        [oauth]
        paths = ["/gitlab/oauth/token"]
        [rails]
        url = "http://rails.internal:3000/"
        timeout = "2m"
        [iam]
        url = "http://iam"
        connect_timeout = "250ms"
        timeout = "1h"
        fallback_statuses = [503]
        token_prefixes = ["iam_"]
        [iam.circuit_breaker]
        consecutive_failures = 2
        open_for = "250us"
        [preauthorize]
        url = "http://rails.internal:3000/-/x"
        secret_file = '{}'
        timeout = "1s"
        [cache]
        ttl = "5m"
        max_entries = 7
        stale_if_error = "0s"
        [routing]
        rails_issued = "decision"
        [log]
        format = "text"
        level = "DEBUG"
        "#,
        secret.path()
    );
    let c = Config::from_toml(&text).unwrap();
    let s = &c.server;
    assert_eq!(s.listen, ListenAddr::Tcp("0.0.0.0:80".parse().unwrap()));
    assert_eq!(
        s.admin_listen,
        ListenAddr::Tcp("[::1]:9000".parse().unwrap())
    );
    assert_eq!(s.header_read_timeout, Duration::from_secs(3));
    assert_eq!(s.max_body_bytes, 4096);
    assert_eq!(s.shutdown_timeout, Duration::from_secs(60));
    assert_eq!(s.graceful_shutdown_delay, Duration::from_secs(5));
    assert_eq!(
        s.trusted_cidrs,
        [
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("::1/128").unwrap()
        ]
    );
    assert_eq!(
        c.oauth.paths,
        [("/gitlab/oauth/token".to_string(), Endpoint::Token)]
    );
    assert_eq!(
        c.rails.url.address.to_string(),
        "http://rails.internal:3000/"
    );
    assert_eq!(c.rails.url.host, "rails.internal:3000");
    assert_eq!(c.rails.timeout, Duration::from_secs(120));
    let iam = c.iam.unwrap();
    assert_eq!(
        (iam.url.address.to_string(), iam.url.host),
        ("http://iam/".to_owned(), HeaderValue::from_static("iam"))
    );
    assert_eq!(iam.connect_timeout, Duration::from_millis(250));
    assert_eq!(iam.timeout, Duration::from_secs(3600));
    assert_eq!(iam.fallback_statuses, [StatusCode::SERVICE_UNAVAILABLE]);
    assert_eq!(iam.token_prefixes, ["iam_"]);
    assert_eq!(iam.circuit_breaker.consecutive_failures.get(), 2);
    assert_eq!(iam.circuit_breaker.open_for, Duration::from_micros(250));
    let pre = c.preauthorize.unwrap();
    assert_eq!(
        pre.upstream.address.to_string(),
        "http://rails.internal:3000/"
    );
    assert_eq!(pre.path, "/-/x");
    assert_eq!(pre.timeout, Duration::from_secs(1));
    assert_eq!(c.cache.ttl, Duration::from_secs(300));
    assert_eq!(c.cache.max_entries, 7);
    assert_eq!(c.cache.stale_if_error, Duration::ZERO, "0s turns it off");
    assert_eq!(c.routing.rails_issued, RailsIssued::Decision);
    assert_eq!(
        (c.log.format, c.log.level),
        (LogFormat::Text, tracing::Level::DEBUG)
    );
}

#[test]
fn unknown_keys_are_rejected_naming_the_key() {
    assert!(err(&format!("{MINIMAL}bogus_top = 1\n")).contains("bogus_top"));
    assert!(err(&format!("{MINIMAL}[cache]\nbogus_ttl = \"1s\"\n")).contains("bogus_ttl"));
    assert!(err(&format!("{MINIMAL}[bogus_table]\n")).contains("bogus_table"));
    let nested = with_iam("/unused", "[iam.circuit_breaker]\nbogus_open = 1\n");
    assert!(err(&nested).contains("bogus_open"));
}

#[test]
fn invalid_duration_names_its_key() {
    let secret = secret_file(32);
    let base = with_iam(secret.path(), "");
    assert_eq!(
        err(&set(MINIMAL, "cache", "ttl", "\"sixty\"")),
        r#"cache.ttl: invalid duration "sixty": an integer and a unit, us, ms, s, m or h, without spaces: "500ms", "60s", "2m""#
    );
    for (table, key) in [
        ("server", "header_read_timeout"),
        ("server", "body_read_timeout"),
        ("server", "shutdown_timeout"),
        ("server", "graceful_shutdown_delay"),
        ("rails", "connect_timeout"),
        ("rails", "timeout"),
        ("iam", "connect_timeout"),
        ("iam", "timeout"),
        ("iam.circuit_breaker", "open_for"),
        ("preauthorize", "timeout"),
        ("cache", "ttl"),
    ] {
        let msg = err(&set(&base, table, key, "\"sixty\""));
        let want = format!("{table}.{key}: invalid duration \"sixty\": an integer and a unit");
        assert!(msg.starts_with(&want), "{msg}");
    }
}

#[test]
fn zero_is_rejected_for_timeouts_but_allowed_for_delays() {
    assert_eq!(
        err(&set(MINIMAL, "cache", "ttl", "\"0s\"")),
        "cache.ttl: must be greater than 0"
    );
    assert_eq!(
        err(&set(MINIMAL, "rails", "timeout", "\"0ms\"")),
        "rails.timeout: must be greater than 0"
    );
    let c = Config::from_toml(&set(MINIMAL, "server", "shutdown_timeout", "\"0s\"")).unwrap();
    assert_eq!(c.server.shutdown_timeout, Duration::ZERO);
}

#[test]
fn header_limit_must_fit_hypers_minimum_buffer() {
    let small = set(MINIMAL, "server", "max_header_bytes", "4096");
    assert_eq!(
        err(&small),
        "server.max_header_bytes: must be at least 8192, found 4096"
    );
    let connections = set(MINIMAL, "server", "max_connections", "0");
    assert_eq!(
        err(&connections),
        "server.max_connections: must be at least 1, found 0"
    );
}

#[test]
fn counts_must_be_positive() {
    let max_body = set(MINIMAL, "server", "max_body_bytes", "0");
    assert_eq!(
        err(&max_body),
        "server.max_body_bytes: must be at least 1, found 0"
    );
    let entries = set(MINIMAL, "cache", "max_entries", "-1");
    assert_eq!(
        err(&entries),
        "cache.max_entries: must be at least 1, found -1"
    );
    let base = with_iam("/unused", "");
    let failures = set(&base, "iam.circuit_breaker", "consecutive_failures", "0");
    assert_eq!(
        err(&failures),
        "iam.circuit_breaker.consecutive_failures: must be at least 1, found 0"
    );
    let huge = set(
        &base,
        "iam.circuit_breaker",
        "consecutive_failures",
        "5000000000",
    );
    assert_eq!(
        err(&huge),
        "iam.circuit_breaker.consecutive_failures: 5000000000 is too large"
    );
}

#[test]
fn fallback_status_outside_100_to_599_is_rejected() {
    let base = with_iam("/unused", "");
    let msg = err(&set(&base, "iam", "fallback_statuses", "[500, 99]"));
    assert_eq!(msg, "iam.fallback_statuses[1]: 99 is not an HTTP status");
    let msg = err(&set(&base, "iam", "fallback_statuses", "[600]"));
    assert_eq!(msg, "iam.fallback_statuses[0]: 600 is not an HTTP status");
}

#[test]
fn token_prefixes_must_be_non_empty_printable_ascii() {
    let base = with_iam("/unused", "");
    for bad in [r#"["giat_", ""]"#, r#"["giat_", "a b"]"#] {
        let msg = err(&set(&base, "iam", "token_prefixes", bad));
        assert_eq!(
            msg,
            "iam.token_prefixes[1]: must be non-empty printable ASCII without spaces"
        );
    }
}

#[test]
fn admin_token_is_read_trimmed_redacted_and_must_be_long_enough() {
    let secret = STANDARD.encode(random_bytes(24));
    let file = TempFile::with(format!("{secret}\n").as_bytes());
    let text = format!("{MINIMAL}[admin]\ntoken_file = '{}'\n", file.path());
    let token = Config::from_toml(&text).unwrap().admin_token.unwrap();
    assert!(token.matches(secret.as_bytes()));
    assert!(!token.matches(&secret.as_bytes()[1..]));
    assert!(!format!("{token:?}").contains(&secret));
    assert!(Config::from_toml(MINIMAL).unwrap().admin_token.is_none());

    let short = TempFile::with(b"tooshort\n");
    let text = format!("{MINIMAL}[admin]\ntoken_file = '{}'\n", short.path());
    assert_eq!(
        err(&text),
        "admin.token_file: token must be at least 16 printable ASCII characters without spaces"
    );
}

#[test]
fn redis_needs_a_valid_url_and_defaults_its_channel() {
    let text = format!("{MINIMAL}[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n");
    let redis = Config::from_toml(&text).unwrap().redis.unwrap();
    assert_eq!(redis.channel, "iamproxy:decisions");
    assert_eq!(
        err(&format!("{MINIMAL}[redis]\nchannel = \"x\"\n")),
        "redis.url: required key is missing"
    );
    let bad = err(&format!("{MINIMAL}[redis]\nurl = \"http://redis\"\n"));
    assert!(bad.starts_with("redis.url: "), "{bad}");
}

#[test]
fn iam_without_preauthorize_is_rejected() {
    let text = format!("{MINIMAL}[iam]\nurl = \"http://127.0.0.1:9000\"\n");
    assert_eq!(err(&text), "preauthorize: required when [iam] is set");
}

#[test]
fn preauthorize_without_iam_is_allowed() {
    let secret = secret_file(32);
    let text = with_iam(secret.path(), "").replace("[iam]\nurl = \"http://127.0.0.1:9000\"\n", "");
    let c = Config::from_toml(&text).unwrap();
    assert!(c.iam.is_none() && c.preauthorize.is_some());
}

#[test]
fn oauth_paths_map_to_endpoints_and_reject_bad_entries() {
    let text = set(
        MINIMAL,
        "oauth",
        "paths",
        r#"["/gitlab/oauth/token", "/oauth/authorize_device"]"#,
    );
    let paths = Config::from_toml(&text).unwrap().oauth.paths;
    assert_eq!(
        paths[0],
        ("/gitlab/oauth/token".to_string(), Endpoint::Token)
    );
    assert_eq!(paths[1].1, Endpoint::AuthorizeDevice);
    for (list, want) in [
        (r#"[]"#, "oauth.paths: must not be empty"),
        (
            r#"["oauth/token"]"#,
            "oauth.paths[0]: must start with \"/\"",
        ),
        (
            r#"["/oauth/token?x"]"#,
            "oauth.paths[0]: must not contain '?' or '#'",
        ),
        (
            r#"["/oauth/token", "/oauth/token"]"#,
            "oauth.paths[1]: duplicate of oauth.paths[0]",
        ),
    ] {
        assert_eq!(err(&set(MINIMAL, "oauth", "paths", list)), want);
    }
    let msg = err(&set(MINIMAL, "oauth", "paths", r#"["/oauth/userinfo"]"#));
    assert!(
        msg.starts_with("oauth.paths[0]: must end in one of /oauth/authorize, "),
        "{msg}"
    );
}

#[test]
fn listen_and_admin_listen_must_differ_unless_port_zero() {
    let same = "[server]\nlisten = \"127.0.0.1:8181\"\nadmin_listen = \"127.0.0.1:8181\"\n";
    assert_eq!(
        err(&format!("{same}{MINIMAL}")),
        "server.admin_listen: must differ from server.listen"
    );
    let zero = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
    assert!(Config::from_toml(&format!("{zero}{MINIMAL}")).is_ok());
    let bad = set(MINIMAL, "server", "listen", "\"localhost\"");
    assert_eq!(
        err(&bad),
        r#"server.listen: "localhost" is neither an IP address and port ("127.0.0.1:8181", "[::]:8181") nor unix:/path/to.sock"#
    );
}

#[test]
fn log_level_is_case_insensitive_and_format_is_json_or_text() {
    let c = Config::from_toml(&set(MINIMAL, "log", "level", "\"Warn\"")).unwrap();
    assert_eq!(c.log.level, tracing::Level::WARN);
    let msg = err(&set(MINIMAL, "log", "level", "\"loud\""));
    assert_eq!(
        msg,
        r#"log.level: must be one of "error", "warn", "info", "debug", "trace""#
    );
    let msg = err(&set(MINIMAL, "log", "format", "\"xml\""));
    assert_eq!(msg, r#"log.format: must be "json" or "text""#);
}

#[test]
fn load_reports_an_unreadable_file_with_its_path() {
    let path = std::env::temp_dir().join("iamproxy-config-no-such-config.toml");
    let msg = Config::load(&path).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}: cannot read config file: ", path.display())),
        "{msg}"
    );
}

#[test]
fn example_config_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/iamproxy.example.toml");
    let example = std::fs::read_to_string(path).unwrap();
    assert!(example.contains("\n[iam]\n") && example.contains("\n[preauthorize]\n"));
    let secret = secret_file(32);
    let line = example
        .lines()
        .find(|l| l.starts_with("secret_file = "))
        .unwrap();
    let text = example.replace(line, &format!("secret_file = '{}'", secret.path()));
    let parsed = Config::from_toml(&text).unwrap();

    // Only the keys without defaults, taken from the example itself; the rest must match.
    let urls: Vec<&str> = example
        .lines()
        .filter(|line| line.starts_with("url = "))
        .collect();
    assert_eq!(urls.len(), 3, "rails, iam and preauthorize");
    let defaults = format!(
        "[rails]\n{}\n[iam]\n{}\n[preauthorize]\n{}\nsecret_file = '{}'\n",
        urls[0],
        urls[1],
        urls[2],
        secret.path()
    );
    let defaults = Config::from_toml(&defaults).unwrap();
    assert_eq!(format!("{parsed:#?}"), format!("{defaults:#?}"));
}

#[test]
fn cidr_matches_v4_v6_bare_and_mapped_addresses() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let v4 = Cidr::parse("10.0.0.0/8").unwrap();
    assert!(v4.contains(ip("10.255.0.1")) && !v4.contains(ip("11.0.0.1")));
    assert!(v4.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped peer");
    assert!(!v4.contains(ip("::1")));
    let v6 = Cidr::parse("fd00::/8").unwrap();
    assert!(
        v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")) && !v6.contains(ip("10.0.0.1"))
    );
    let bare = Cidr::parse("192.168.1.7").unwrap();
    assert!(bare.contains(ip("192.168.1.7")) && !bare.contains(ip("192.168.1.8")));
    assert_eq!(Cidr::parse("::1").unwrap(), Cidr::parse("::1/128").unwrap());
    assert_eq!(Cidr::parse("10.1.2.3/8").unwrap(), v4);
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains(ip("203.0.113.9")));
    for bad in ["10.0.0.0/33", "::/129", "x", "10.0.0.0/", "/8", "10.0.0/8"] {
        assert_eq!(Cidr::parse(bad), Err(format!("invalid CIDR {bad:?}")));
    }
    let msg = err(&set(MINIMAL, "server", "trusted_cidrs", r#"["::1", "x"]"#));
    assert_eq!(msg, r#"server.trusted_cidrs[1]: invalid CIDR "x""#);
}

/// The README's configuration table shows the defaults the builders use: every key of
/// [`DEFAULTS`] is in it, with the same value.
#[test]
fn readme_configuration_table_shows_every_default() {
    let readme = include_str!("../../../README.md");
    let shown: std::collections::HashMap<&str, String> = readme
        .lines()
        .filter_map(|line| {
            let mut cells = line.strip_prefix("| `")?.splitn(3, " | ");
            let key = cells.next()?.strip_suffix('`')?;
            let value = cells.next()?.trim_matches('`');
            // Lists are shown as TOML arrays, the table writes them comma-separated.
            let value = value.trim_matches(['[', ']']).replace('"', "");
            Some((key, value))
        })
        .collect();
    for (key, default) in DEFAULTS {
        assert_eq!(
            shown.get(key).map(String::as_str),
            Some(*default),
            "README's row for {key}"
        );
    }
}

#[test]
fn tracing_table_is_checked_key_by_key() {
    let endpoint = set(
        MINIMAL,
        "tracing",
        "otlp_endpoint",
        r#""http://127.0.0.1:4318""#,
    );
    let c = Config::from_toml(&set(&endpoint, "tracing", "sample_ratio", "0.25")).unwrap();
    let tracing = c.tracing.unwrap();
    assert_eq!(tracing.sample_ratio, 0.25);
    assert_eq!(tracing.service_name, "iamproxy");
    assert!(tracing.trust_incoming);
    assert_eq!(tracing.timeout, Duration::from_secs(5));
    let collector = tracing.collector.unwrap();
    assert_eq!(
        collector.path, "/v1/traces",
        "an origin alone: OTLP's default path"
    );
    assert_eq!(collector.upstream.host, "127.0.0.1:4318");

    let path = set(
        MINIMAL,
        "tracing",
        "otlp_endpoint",
        r#""https://otel.example/custom""#,
    );
    let c = Config::from_toml(&path).unwrap();
    assert_eq!(c.tracing.unwrap().collector.unwrap().path, "/custom");
    assert!(Config::from_toml(MINIMAL).unwrap().tracing.is_none());

    for (ratio, reason) in [
        ("1.5", "must be between 0.0 and 1.0, found 1.5"),
        ("-0.1", "must be between 0.0 and 1.0, found -0.1"),
    ] {
        let msg = err(&set(&endpoint, "tracing", "sample_ratio", ratio));
        assert_eq!(msg, format!("tracing.sample_ratio: {reason}"));
    }
    let msg = err(&set(MINIMAL, "tracing", "sample_ratio", "0.5"));
    assert_eq!(
        msg,
        "tracing.otlp_endpoint: required when sample_ratio is above 0"
    );
    let msg = err(&set(&endpoint, "tracing", "service_name", r#""""#));
    assert_eq!(msg, "tracing.service_name: must not be empty");
    let msg = err(&set(&endpoint, "tracing", "timeout", r#""0s""#));
    assert_eq!(msg, "tracing.timeout: must be greater than 0");
    let msg = err(&set(MINIMAL, "tracing", "otlp_endpoint", r#""ftp://x""#));
    assert!(msg.starts_with("tracing.otlp_endpoint: "), "{msg}");
    let msg = err(&set(&endpoint, "tracing", "sample_rate", "0.5"));
    assert!(msg.contains("tracing.sample_rate: unknown key"), "{msg}");
    // A sampled ratio of zero needs no collector: the table is there, tracing is off.
    let off = Config::from_toml(&set(MINIMAL, "tracing", "sample_ratio", "0.0")).unwrap();
    assert!(off.tracing.unwrap().collector.is_none());
}
