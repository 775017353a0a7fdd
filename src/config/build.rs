//! The second stage: raw values checked and turned into the typed [`Config`], every error
//! naming its key, and the one table of defaults.

mod addresses;

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use hyper::StatusCode;

use super::raw::*;
use super::values::{parse_duration, AdminToken, Cidr, ListenAddr, Secret};
use super::{
    invalid, BreakerConfig, CacheConfig, Collector, Config, ConfigError, IamConfig, LogConfig,
    LogFormat, OauthConfig, PreauthorizeConfig, RailsConfig, ServerConfig, TracingConfig,
};
use crate::classify::Endpoint;
use crate::decision::rules::{Mode, PercentageOfActors, RailsIssued, RoutingConfig};
use crate::server::tls::ServerTls;
use addresses::{listen_addr, socket_mode, static_headers, upstream, upstream_with_path};

mod redis_table;

/// Every key's default, as the TOML would spell it (lists comma-separated): the one table
/// the builders below read, and the README's configuration table shows. Keys without a
/// default are required, or mean "off" when left out.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("server.listen", "127.0.0.1:8181"),
    ("server.admin_listen", "127.0.0.1:9229"),
    // Anyone on the host may connect, as to a TCP port; "0660" keeps it to a group.
    ("server.socket_mode", "0666"),
    ("server.header_read_timeout", "10s"),
    ("server.idle_timeout", "60s"),
    ("server.body_read_timeout", "30s"),
    ("server.body_idle_timeout", "30s"),
    ("server.write_timeout", "60s"),
    ("server.max_body_bytes", "1048576"),
    ("server.max_buffered_bytes", "67108864"),
    ("server.max_connections", "10000"),
    ("server.h2_max_concurrent_streams", "128"),
    ("server.max_header_bytes", "65536"),
    ("server.max_uri_bytes", "16384"),
    ("server.shutdown_timeout", "30s"),
    ("server.graceful_shutdown_delay", "0s"),
    ("rails.connect_timeout", "5s"),
    ("rails.timeout", "60s"),
    ("rails.max_connections", "1024"),
    ("iam.connect_timeout", "1s"),
    ("iam.timeout", "10s"),
    ("iam.max_connections", "512"),
    ("iam.fallback_statuses", "500, 502, 503, 504"),
    ("iam.token_prefixes", "giat_, ory_"),
    ("iam.circuit_breaker.consecutive_failures", "5"),
    ("iam.circuit_breaker.open_for", "10s"),
    ("preauthorize.timeout", "500ms"),
    ("preauthorize.max_connections", "64"),
    ("cache.ttl", "60s"),
    ("cache.max_entries", "100000"),
    ("cache.stale_if_error", "5m"),
    ("routing.mode", "preauthorize"),
    ("routing.rails_issued", "rails"),
    // GitLab's own limit on an allowlist of actors: long lists belong in Flipper, not here.
    ("routing.max_forced_clients", "200"),
    ("redis.channel", "iamproxy:decisions"),
    ("redis.shared_cache", "false"),
    ("redis.key_prefix", "iamproxy:"),
    ("redis.timeout", "50ms"),
    ("log.format", "json"),
    ("log.level", "info"),
    ("tracing.service_name", "iamproxy"),
    ("tracing.sample_ratio", "0.0"),
    ("tracing.trust_incoming", "true"),
    ("tracing.timeout", "5s"),
];

/// `key`'s default from [`DEFAULTS`]; empty (and so refused by every reader) for a key
/// that has none, which the tests rule out.
pub(super) fn default(key: &str) -> &'static str {
    DEFAULTS
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("", |(_, value)| value)
}

/// A list default, each comma-separated item read by `item`.
fn default_list<T, E>(key: &str, item: impl Fn(&str) -> Result<T, E>) -> Vec<T> {
    default(key)
        .split(',')
        .filter_map(|part| item(part.trim()).ok())
        .collect()
}

/// `preauthorize.secret_file` is read as given, so a relative path is relative to the cwd.
pub(super) fn config(raw: RawConfig) -> Result<Config, ConfigError> {
    let server = server(raw.server)?;
    let oauth = oauth(raw.oauth)?;
    let rails = raw
        .rails
        .ok_or_else(|| invalid("rails", "required table is missing"))?;
    let rails = RailsConfig {
        // Rails keeps the client's Host, so no `rails.host`.
        url: upstream(
            ("rails.url", rails.url),
            ("rails.ca_file", rails.ca_file),
            None,
            static_headers("rails", rails.headers)?,
        )?,
        connect_timeout: positive_duration("rails.connect_timeout", rails.connect_timeout)?,
        timeout: positive_duration("rails.timeout", rails.timeout)?,
        max_connections: positive_int("rails.max_connections", rails.max_connections)?,
    };
    let iam = raw.iam.map(iam).transpose()?;
    if iam.is_some() && raw.preauthorize.is_none() {
        return Err(invalid("preauthorize", "required when [iam] is set"));
    }
    let preauthorize = raw.preauthorize.map(preauthorize).transpose()?;
    let cache = CacheConfig {
        ttl: positive_duration("cache.ttl", raw.cache.ttl)?,
        max_entries: positive_int("cache.max_entries", raw.cache.max_entries)?,
        stale_if_error: duration("cache.stale_if_error", raw.cache.stale_if_error)?,
    };
    Ok(Config {
        server,
        oauth,
        rails,
        iam,
        preauthorize,
        cache,
        routing: routing(raw.routing)?,
        admin_token: raw.admin.token_file.map(admin_token).transpose()?,
        redis: raw.redis.map(redis_table::redis).transpose()?,
        log: log(raw.log)?,
        tracing: raw.tracing.map(tracing).transpose()?,
    })
}

fn server(raw: RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = listen_addr("server.listen", raw.listen)?;
    let admin_listen = listen_addr("server.admin_listen", raw.admin_listen)?;
    // Port 0 asks the OS for a fresh port each time, so two of them never collide.
    let same = match (&listen, &admin_listen) {
        (ListenAddr::Tcp(main), ListenAddr::Tcp(admin)) => main == admin && main.port() != 0,
        (main, admin) => main == admin,
    };
    if same {
        return Err(invalid(
            "server.admin_listen",
            "must differ from server.listen",
        ));
    }
    let socket_mode = socket_mode(raw.socket_mode)?;
    if raw.tls.is_some() && matches!(listen, ListenAddr::Unix(_)) {
        let reason = "is not served on a unix: listener (server.listen): terminate TLS in \
                      front of the socket, e.g. in nginx";
        return Err(invalid("server.tls", reason));
    }
    let header_read_timeout =
        positive_duration("server.header_read_timeout", raw.header_read_timeout)?;
    let idle_timeout = positive_duration("server.idle_timeout", raw.idle_timeout)?;
    let body_read_timeout = positive_duration("server.body_read_timeout", raw.body_read_timeout)?;
    let body_idle_timeout = positive_duration("server.body_idle_timeout", raw.body_idle_timeout)?;
    let write_timeout = positive_duration("server.write_timeout", raw.write_timeout)?;
    let max_body_bytes = positive_int("server.max_body_bytes", raw.max_body_bytes)?;
    let max_buffered_bytes = positive_int("server.max_buffered_bytes", raw.max_buffered_bytes)?;
    if max_buffered_bytes < max_body_bytes {
        return Err(invalid(
            "server.max_buffered_bytes",
            format!("must be at least server.max_body_bytes ({max_body_bytes}), found {max_buffered_bytes}"),
        ));
    }
    let h2_max_concurrent_streams = positive_int(
        "server.h2_max_concurrent_streams",
        raw.h2_max_concurrent_streams,
    )?;
    let max_connections = positive_int("server.max_connections", raw.max_connections)?;
    let max_header_bytes = positive_int("server.max_header_bytes", raw.max_header_bytes)?;
    if max_header_bytes < MIN_HEADER_BYTES {
        return Err(invalid(
            "server.max_header_bytes",
            format!("must be at least {MIN_HEADER_BYTES}, found {max_header_bytes}"),
        ));
    }
    let max_uri_bytes = positive_int("server.max_uri_bytes", raw.max_uri_bytes)?;
    let shutdown_timeout = duration("server.shutdown_timeout", raw.shutdown_timeout)?;
    let graceful_shutdown_delay = duration(
        "server.graceful_shutdown_delay",
        raw.graceful_shutdown_delay,
    )?;
    let trusted_cidrs = cidrs(
        "server.trusted_cidrs",
        raw.trusted_cidrs.unwrap_or_default(),
    )?;
    // Absent: the correlation id is kept from the peers X-Forwarded-* is kept from, as
    // before the key existed.
    let trusted_cidrs_for_propagation = match raw.trusted_cidrs_for_propagation {
        Some(list) => cidrs("server.trusted_cidrs_for_propagation", list)?,
        None => trusted_cidrs.clone(),
    };
    let tls = raw.tls.map(server_tls).transpose()?;
    Ok(ServerConfig {
        listen,
        admin_listen,
        socket_mode,
        header_read_timeout,
        idle_timeout,
        body_read_timeout,
        body_idle_timeout,
        write_timeout,
        max_body_bytes,
        max_buffered_bytes,
        h2_max_concurrent_streams,
        max_connections,
        max_header_bytes,
        max_uri_bytes,
        shutdown_timeout,
        graceful_shutdown_delay,
        trusted_cidrs,
        trusted_cidrs_for_propagation,
        tls,
    })
}

fn cidrs(key: &str, list: Vec<String>) -> Result<Vec<Cidr>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| Cidr::parse(s).map_err(|r| invalid(format!("{key}[{i}]"), r)))
        .collect()
}

fn server_tls(raw: RawServerTls) -> Result<ServerTls, ConfigError> {
    const CERTIFICATE: &str = "server.tls.certificate_file";
    const KEY: &str = "server.tls.key_file";
    let certificate_file = required(CERTIFICATE, raw.certificate_file)?;
    let key_file = required(KEY, raw.key_file)?;
    Ok(ServerTls::load(
        (CERTIFICATE, Path::new(&certificate_file)),
        (KEY, Path::new(&key_file)),
    )?)
}

fn oauth(raw: RawOauth) -> Result<OauthConfig, ConfigError> {
    let paths = raw
        .paths
        .unwrap_or_else(|| Endpoint::ALL.map(|e| e.default_path().to_string()).to_vec());
    if paths.is_empty() {
        return Err(invalid("oauth.paths", "must not be empty"));
    }
    let mut out: Vec<(String, Endpoint)> = Vec::with_capacity(paths.len());
    for (i, path) in paths.into_iter().enumerate() {
        let key = format!("oauth.paths[{i}]");
        if !path.starts_with('/') {
            return Err(invalid(key, "must start with \"/\""));
        }
        if path.contains(['?', '#']) {
            return Err(invalid(key, "must not contain '?' or '#'"));
        }
        if let Some(j) = out.iter().position(|(p, _)| *p == path) {
            return Err(invalid(key, format!("duplicate of oauth.paths[{j}]")));
        }
        let Some(endpoint) = Endpoint::from_path_suffix(&path) else {
            let known = Endpoint::ALL.map(Endpoint::default_path).join(", ");
            return Err(invalid(key, format!("must end in one of {known}")));
        };
        out.push((path, endpoint));
    }
    Ok(OauthConfig { paths: out })
}

fn iam(raw: RawIam) -> Result<IamConfig, ConfigError> {
    let statuses = raw
        .fallback_statuses
        .unwrap_or_else(|| default_list("iam.fallback_statuses", str::parse));
    let prefixes = raw
        .token_prefixes
        .unwrap_or_else(|| default_list("iam.token_prefixes", |p| Ok::<_, ()>(p.to_owned())));
    for (i, prefix) in prefixes.iter().enumerate() {
        // Prefixes are matched against token values, which are never empty or spaced.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            let reason = "must be non-empty printable ASCII without spaces";
            return Err(invalid(format!("iam.token_prefixes[{i}]"), reason));
        }
    }
    let failures: u32 = positive_int(
        "iam.circuit_breaker.consecutive_failures",
        raw.circuit_breaker.consecutive_failures,
    )?;
    Ok(IamConfig {
        url: upstream(
            ("iam.url", raw.url),
            ("iam.ca_file", raw.ca_file),
            Some(("iam.host", raw.host)),
            static_headers("iam", raw.headers)?,
        )?,
        connect_timeout: positive_duration("iam.connect_timeout", raw.connect_timeout)?,
        timeout: positive_duration("iam.timeout", raw.timeout)?,
        max_connections: positive_int("iam.max_connections", raw.max_connections)?,
        fallback_statuses: statuses
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                u16::try_from(n)
                    .ok()
                    .filter(|n| (100..=599).contains(n))
                    .and_then(|n| StatusCode::from_u16(n).ok())
                    .ok_or_else(|| {
                        let key = format!("iam.fallback_statuses[{i}]");
                        invalid(key, format!("{n} is not an HTTP status"))
                    })
            })
            .collect::<Result<_, _>>()?,
        token_prefixes: prefixes,
        circuit_breaker: BreakerConfig {
            // positive_int guarantees failures >= 1.
            consecutive_failures: NonZeroU32::MIN.saturating_add(failures - 1),
            open_for: positive_duration(
                "iam.circuit_breaker.open_for",
                raw.circuit_breaker.open_for,
            )?,
        },
    })
}

fn preauthorize(raw: RawPreauthorize) -> Result<PreauthorizeConfig, ConfigError> {
    let (upstream, path) = upstream_with_path(
        ("preauthorize.url", raw.url),
        ("preauthorize.ca_file", raw.ca_file),
        Some(("preauthorize.host", raw.host)),
        static_headers("preauthorize", raw.headers)?,
    )?;
    let key = "preauthorize.secret_file";
    let file = required(key, raw.secret_file)?;
    let bytes =
        std::fs::read(&file).map_err(|e| invalid(key, format!("cannot read {file}: {e}")))?;
    // Non-UTF-8 bytes become U+FFFD, which base64 then rejects.
    let secret =
        Secret::from_base64(&String::from_utf8_lossy(&bytes)).map_err(|r| invalid(key, r))?;
    Ok(PreauthorizeConfig {
        upstream,
        path,
        secret,
        timeout: positive_duration("preauthorize.timeout", raw.timeout)?,
        max_connections: positive_int("preauthorize.max_connections", raw.max_connections)?,
    })
}

/// Shortest admin token accepted: a guessable token would open cache invalidation to anyone
/// who can reach the admin listener.
const MIN_ADMIN_TOKEN_BYTES: usize = 16;

fn admin_token(path: String) -> Result<AdminToken, ConfigError> {
    let key = "admin.token_file";
    let bytes =
        std::fs::read(&path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| invalid(key, "token is not UTF-8"))?;
    let token = text.trim();
    if token.len() < MIN_ADMIN_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
        let reason = format!(
            "token must be at least {MIN_ADMIN_TOKEN_BYTES} printable ASCII characters without spaces"
        );
        return Err(invalid(key, reason));
    }
    Ok(AdminToken(token.to_string()))
}

fn routing(raw: RawRouting) -> Result<RoutingConfig, ConfigError> {
    let mode = match raw.mode.as_deref().unwrap_or(default("routing.mode")) {
        "preauthorize" => Mode::Preauthorize,
        "rails" => Mode::Rails,
        "rails_only" => Mode::RailsOnly,
        "iam" => Mode::Iam,
        _ => {
            let reason = r#"must be "preauthorize", "rails", "rails_only" or "iam""#;
            return Err(invalid("routing.mode", reason));
        }
    };
    let rails_issued = match raw
        .rails_issued
        .as_deref()
        .unwrap_or(default("routing.rails_issued"))
    {
        "rails" => RailsIssued::Rails,
        "decision" => RailsIssued::Decision,
        _ => {
            let reason = r#"must be "rails" or "decision""#;
            return Err(invalid("routing.rails_issued", reason));
        }
    };
    let max: usize = positive_int("routing.max_forced_clients", raw.max_forced_clients)?;
    let force_iam = client_list("routing.force_iam", raw.force_iam, max)?;
    let force_rails = client_list("routing.force_rails", raw.force_rails, max)?;
    if let Some(both) = force_rails.iter().find(|id| force_iam.contains(*id)) {
        return Err(invalid(
            "routing.force_rails",
            format!("{both:?} is also in routing.force_iam"),
        ));
    }
    let percentage = raw.percentage_of_actors.map(percentage).transpose()?;
    Ok(RoutingConfig {
        mode,
        rails_issued,
        force_iam,
        force_rails,
        percentage,
    })
}

fn client_list(
    key: &str,
    raw: Option<Vec<String>>,
    max: usize,
) -> Result<HashSet<String>, ConfigError> {
    let ids = raw.unwrap_or_default();
    if ids.len() > max {
        return Err(invalid(
            key,
            format!(
                "{} client ids, more than routing.max_forced_clients ({max})",
                ids.len()
            ),
        ));
    }
    let mut set = HashSet::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        if id.is_empty() || id.chars().any(char::is_control) {
            return Err(invalid(
                format!("{key}[{i}]"),
                "must be a non-empty client id without control characters",
            ));
        }
        if set.contains(&id) {
            return Err(invalid(format!("{key}[{i}]"), format!("duplicate {id:?}")));
        }
        set.insert(id);
    }
    Ok(set)
}

fn percentage(raw: RawPercentage) -> Result<PercentageOfActors, ConfigError> {
    const KEY: &str = "routing.percentage_of_actors";
    let flag = required(&format!("{KEY}.flag"), raw.flag)?;
    if flag.is_empty() {
        return Err(invalid(format!("{KEY}.flag"), "must not be empty"));
    }
    let actor = raw.actor.unwrap_or_else(|| {
        format!(
            "Authn::OauthApplication:{}",
            PercentageOfActors::PLACEHOLDER
        )
    });
    let placeholder = PercentageOfActors::PLACEHOLDER;
    let Some((prefix, suffix)) = actor
        .split_once(placeholder)
        .filter(|(_, suffix)| !suffix.contains(placeholder))
    else {
        let reason = format!("must contain {placeholder} exactly once");
        return Err(invalid(format!("{KEY}.actor"), reason));
    };
    let percent = raw
        .percent
        .ok_or_else(|| invalid(format!("{KEY}.percent"), "required key is missing"))?;
    if !(0.0..=100.0).contains(&percent) {
        let reason = format!("must be from 0 to 100, found {percent}");
        return Err(invalid(format!("{KEY}.percent"), reason));
    }
    Ok(PercentageOfActors {
        flag,
        actor_prefix: prefix.to_string(),
        actor_suffix: suffix.to_string(),
        percent,
    })
}

/// `[tracing]`. Without `otlp_endpoint` or with `sample_ratio = 0` it is off.
fn tracing(raw: RawTracing) -> Result<TracingConfig, ConfigError> {
    let ratio_key = "tracing.sample_ratio";
    let sample_ratio = match raw.sample_ratio {
        Some(ratio) => ratio,
        None => default(ratio_key)
            .parse()
            .map_err(|_| invalid(ratio_key, "has no number default"))?,
    };
    if !(0.0..=1.0).contains(&sample_ratio) {
        let reason = format!("must be between 0.0 and 1.0, found {sample_ratio}");
        return Err(invalid(ratio_key, reason));
    }
    let endpoint_key = "tracing.otlp_endpoint";
    if raw.otlp_endpoint.is_none() && sample_ratio > 0.0 {
        return Err(invalid(
            endpoint_key,
            "required when sample_ratio is above 0",
        ));
    }
    let collector = raw
        .otlp_endpoint
        .map(|url| {
            upstream_with_path(
                (endpoint_key, Some(url)),
                ("tracing.ca_file", raw.ca_file),
                Some(("tracing.host", raw.host)),
                static_headers("tracing", raw.headers)?,
            )
        })
        .transpose()?
        .map(|(upstream, path)| Collector {
            upstream,
            // An origin alone means OTLP's default path.
            path: if path == "/" {
                "/v1/traces".to_owned()
            } else {
                path
            },
        });
    let service_name = raw
        .service_name
        .unwrap_or_else(|| default("tracing.service_name").to_owned());
    if service_name.is_empty() {
        return Err(invalid("tracing.service_name", "must not be empty"));
    }
    Ok(TracingConfig {
        collector,
        service_name,
        sample_ratio,
        trust_incoming: raw
            .trust_incoming
            .unwrap_or(default("tracing.trust_incoming") == "true"),
        timeout: positive_duration("tracing.timeout", raw.timeout)?,
    })
}

fn log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let format = match raw.format.as_deref().unwrap_or(default("log.format")) {
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        _ => return Err(invalid("log.format", r#"must be "json" or "text""#)),
    };
    let level = raw
        .level
        .unwrap_or_else(|| default("log.level").to_owned())
        .to_ascii_lowercase();
    let level = match level.as_str() {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "info" => tracing::Level::INFO,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => {
            let reason = r#"must be one of "error", "warn", "info", "debug", "trace""#;
            return Err(invalid("log.level", reason));
        }
    };
    let fields = raw
        .fields
        .unwrap_or_default()
        .into_iter()
        .collect::<Vec<_>>();
    for (name, _) in &fields {
        let key = format!("log.fields.{name}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(invalid(
                key,
                "a field name is letters, digits, '_', '-' or '.'",
            ));
        }
        if super::RESERVED_LOG_FIELDS.contains(&name.as_str()) {
            return Err(invalid(key, "the gateway's own lines use this field"));
        }
    }
    Ok(LogConfig {
        format,
        level,
        fields,
    })
}

pub(super) fn required(key: &str, value: Option<String>) -> Result<String, ConfigError> {
    value.ok_or_else(|| invalid(key, "required key is missing"))
}

fn duration(key: &'static str, raw: Option<String>) -> Result<Duration, ConfigError> {
    parse_duration(raw.as_deref().unwrap_or(default(key))).map_err(|r| invalid(key, r))
}

/// For timeouts and lifetimes, where zero would fail or expire everything at once.
fn positive_duration(key: &'static str, raw: Option<String>) -> Result<Duration, ConfigError> {
    let d = duration(key, raw)?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

/// hyper's HTTP/1 read buffer cannot be smaller than this.
const MIN_HEADER_BYTES: usize = 8192;

/// TOML integers are i64; taking them as such lets a negative value get our message, not
/// serde's.
fn positive_int<T: TryFrom<i64>>(key: &'static str, raw: Option<i64>) -> Result<T, ConfigError> {
    let n = match raw {
        Some(n) => n,
        None => default(key)
            .parse()
            .map_err(|_| invalid(key, "has no integer default"))?,
    };
    if n < 1 {
        return Err(invalid(key, format!("must be at least 1, found {n}")));
    }
    T::try_from(n).map_err(|_| invalid(key, format!("{n} is too large")))
}
