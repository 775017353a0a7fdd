//! Configuration: the TOML file read in two stages, raw serde structs then a validated, typed `Config`.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hyper::header::HeaderValue;
use hyper::http::uri::{Authority, Scheme};
use hyper::{StatusCode, Uri};
use rustls::ClientConfig;
use serde::Deserialize;

use crate::classify::Endpoint;
use crate::rollout::{Mode, PercentageOfActors, RailsIssued, RoutingConfig};
use crate::tls::{self, ServerTls, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// toml/serde's own message, which already names unknown keys with line and column.
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl From<TlsError> for ConfigError {
    fn from(error: TlsError) -> ConfigError {
        invalid(error.key, error.reason)
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---- Validated stage -------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub oauth: OauthConfig,
    pub rails: RailsConfig,
    /// Absent: every request goes to Rails.
    pub iam: Option<IamConfig>,
    /// Always present when `iam` is; allowed but unused without it.
    pub preauthorize: Option<PreauthorizeConfig>,
    pub cache: CacheConfig,
    pub routing: RoutingConfig,
    /// `None`: the admin API is off and its paths answer 404.
    pub admin_token: Option<AdminToken>,
    /// Fleet-wide invalidation; `None`: this instance's cache is its own.
    pub redis: Option<RedisConfig>,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port/db`; may hold a password, so it is never logged.
    pub url: String,
    pub channel: String,
}

/// The bearer token the admin API asks for. Redacted in `Debug`, like [`Secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Whether `offered` is the token, comparing every byte whatever the first
    /// difference, so the time taken does not say how much of a guess was right.
    pub fn matches(&self, offered: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        ours.len() == offered.len()
            && ours
                .iter()
                .zip(offered)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// A request's headers must arrive within this from its first byte (a new
    /// connection's, from accept, TLS handshake included).
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// An OAuth request body must arrive in full within this; a trickling client gets 408.
    pub body_read_timeout: Duration,
    pub max_body_bytes: u64,
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Request line plus headers; larger gets 431 (HTTP/2: the header list size).
    pub max_header_bytes: usize,
    /// Path plus query; longer gets 414.
    pub max_uri_bytes: usize,
    pub shutdown_timeout: Duration,
    pub graceful_shutdown_delay: Duration,
    /// Peers whose X-Forwarded-For / X-Request-Id are kept rather than replaced.
    pub trusted_cidrs: Vec<Cidr>,
    /// Present: the main listener speaks only HTTPS.
    pub tls: Option<ServerTls>,
}

#[derive(Debug, Clone)]
pub struct OauthConfig {
    pub paths: Vec<(String, Endpoint)>,
}

/// An origin to forward to. A missing port means 80 (443 for https); `authority` stays
/// as written so the `Host` header matches what the operator configured.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http://authority/` or `https://authority/`.
    pub uri: Uri,
    pub authority: Authority,
    pub host: HeaderValue,
    /// What the upstream's certificate must chain to; unused for `http`.
    pub tls: Arc<ClientConfig>,
}

#[derive(Debug, Clone)]
pub struct RailsConfig {
    pub url: Upstream,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct IamConfig {
    pub url: Upstream,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub fallback_statuses: Vec<StatusCode>,
    pub token_prefixes: Vec<String>,
    pub circuit_breaker: BreakerConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    pub consecutive_failures: NonZeroU32,
    pub open_for: Duration,
}

#[derive(Debug, Clone)]
pub struct PreauthorizeConfig {
    /// Full URL including the path; never a query, the gateway adds `client_id`.
    pub url: Uri,
    pub secret: Secret,
    pub timeout: Duration,
    /// What the backend's certificate must chain to; unused for `http`.
    pub tls: Arc<ClientConfig>,
}

/// The 32-byte key that signs pre-authorize JWTs. Deliberately no `Display`, and a
/// redacted `Debug`, so it cannot reach a log by accident.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    /// Decodes the `.gitlab_workhorse_secret` format: standard base64 of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Secret, String> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| "not valid base64".to_string())?;
        let found = bytes.len();
        <[u8; 32]>::try_from(bytes)
            .map(Secret)
            .map_err(|_| format!("must hold base64 of exactly 32 bytes, found {found}"))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub max_entries: u64,
    /// Longest an expired answer is still served while the pre-authorize backend fails
    /// (RFC 5861 `stale-if-error`); zero: never.
    pub stale_if_error: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: tracing::Level,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// "10.0.0.0/8", "::1/128"; a bare address is a single host. Host bits are cleared, so
    /// "10.1.2.3/8" means 10.0.0.0/8, as ip(8) and Go's ParseCIDR read it.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid CIDR {s:?}");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr {
            network: mask(network, prefix),
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // Dual-stack listeners report IPv4 peers as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

/// Keeps the first `prefix` bits; `prefix` is at most the address width (checked by `Cidr`).
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// "500ms", "60s", "2m", "1h", "250us", "0s": an unsigned integer and a unit, no spaces.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let per_unit_us: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per_unit_us)
        .map(Duration::from_micros)
        .ok_or_else(bad)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// `preauthorize.secret_file` is read as given, so a relative path is relative to the cwd.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let server = server(raw.server)?;
        let oauth = oauth(raw.oauth)?;
        let rails = raw
            .rails
            .ok_or_else(|| invalid("rails", "required table is missing"))?;
        let rails = RailsConfig {
            url: upstream(("rails.url", rails.url), ("rails.ca_file", rails.ca_file))?,
            connect_timeout: positive_duration(
                "rails.connect_timeout",
                rails.connect_timeout,
                "5s",
            )?,
            timeout: positive_duration("rails.timeout", rails.timeout, "60s")?,
        };
        let iam = raw.iam.map(iam).transpose()?;
        if iam.is_some() && raw.preauthorize.is_none() {
            return Err(invalid("preauthorize", "required when [iam] is set"));
        }
        let preauthorize = raw.preauthorize.map(preauthorize).transpose()?;
        let cache = CacheConfig {
            ttl: positive_duration("cache.ttl", raw.cache.ttl, "60s")?,
            max_entries: positive_int("cache.max_entries", raw.cache.max_entries, 100_000)?,
            stale_if_error: duration("cache.stale_if_error", raw.cache.stale_if_error, "5m")?,
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
            redis: raw.redis.map(redis).transpose()?,
            log: log(raw.log)?,
        })
    }
}

fn server(raw: RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = socket_addr("server.listen", raw.listen, "127.0.0.1:8181")?;
    let admin_listen = socket_addr("server.admin_listen", raw.admin_listen, "127.0.0.1:9229")?;
    // Port 0 asks the OS for a fresh port each time, so two of them never collide.
    if listen == admin_listen && listen.port() != 0 {
        return Err(invalid(
            "server.admin_listen",
            "must differ from server.listen",
        ));
    }
    let header_read_timeout =
        positive_duration("server.header_read_timeout", raw.header_read_timeout, "10s")?;
    let idle_timeout = positive_duration("server.idle_timeout", raw.idle_timeout, "60s")?;
    let body_read_timeout =
        positive_duration("server.body_read_timeout", raw.body_read_timeout, "30s")?;
    let max_body_bytes = positive_int("server.max_body_bytes", raw.max_body_bytes, 1_048_576)?;
    let max_connections = positive_int("server.max_connections", raw.max_connections, 10_000)?;
    let max_header_bytes = positive_int("server.max_header_bytes", raw.max_header_bytes, 65_536)?;
    if max_header_bytes < MIN_HEADER_BYTES {
        return Err(invalid(
            "server.max_header_bytes",
            format!("must be at least {MIN_HEADER_BYTES}, found {max_header_bytes}"),
        ));
    }
    let max_uri_bytes = positive_int("server.max_uri_bytes", raw.max_uri_bytes, 16_384)?;
    let shutdown_timeout = duration("server.shutdown_timeout", raw.shutdown_timeout, "30s")?;
    let graceful_shutdown_delay = duration(
        "server.graceful_shutdown_delay",
        raw.graceful_shutdown_delay,
        "0s",
    )?;
    let trusted_cidrs = raw
        .trusted_cidrs
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, s)| Cidr::parse(s).map_err(|r| invalid(format!("server.trusted_cidrs[{i}]"), r)))
        .collect::<Result<_, _>>()?;
    let tls = raw.tls.map(server_tls).transpose()?;
    Ok(ServerConfig {
        listen,
        admin_listen,
        header_read_timeout,
        idle_timeout,
        body_read_timeout,
        max_body_bytes,
        max_connections,
        max_header_bytes,
        max_uri_bytes,
        shutdown_timeout,
        graceful_shutdown_delay,
        trusted_cidrs,
        tls,
    })
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
        .unwrap_or_else(|| vec![500, 502, 503, 504]);
    let prefixes = raw
        .token_prefixes
        .unwrap_or_else(|| vec!["giat_".to_string(), "ory_".to_string()]);
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
        5,
    )?;
    Ok(IamConfig {
        url: upstream(("iam.url", raw.url), ("iam.ca_file", raw.ca_file))?,
        connect_timeout: positive_duration("iam.connect_timeout", raw.connect_timeout, "1s")?,
        timeout: positive_duration("iam.timeout", raw.timeout, "10s")?,
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
                "10s",
            )?,
        },
    })
}

fn preauthorize(raw: RawPreauthorize) -> Result<PreauthorizeConfig, ConfigError> {
    let url = http_uri("preauthorize.url", raw.url)?;
    let tls = upstream_tls(&url, "preauthorize.ca_file", raw.ca_file)?;
    let key = "preauthorize.secret_file";
    let path = required(key, raw.secret_file)?;
    let bytes =
        std::fs::read(&path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))?;
    // Non-UTF-8 bytes become U+FFFD, which base64 then rejects.
    let secret =
        Secret::from_base64(&String::from_utf8_lossy(&bytes)).map_err(|r| invalid(key, r))?;
    Ok(PreauthorizeConfig {
        url,
        secret,
        timeout: positive_duration("preauthorize.timeout", raw.timeout, "500ms")?,
        tls,
    })
}

fn redis(raw: RawRedis) -> Result<RedisConfig, ConfigError> {
    let url = required("redis.url", raw.url)?;
    redis::Client::open(url.as_str()).map_err(|e| invalid("redis.url", e.to_string()))?;
    let channel = raw
        .channel
        .unwrap_or_else(|| "iamproxy:decisions".to_string());
    if channel.is_empty() {
        return Err(invalid("redis.channel", "must not be empty"));
    }
    Ok(RedisConfig { url, channel })
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
    let mode = match raw.mode.as_deref() {
        None | Some("preauthorize") => Mode::Preauthorize,
        Some("rails") => Mode::Rails,
        Some("iam") => Mode::Iam,
        Some(_) => {
            let reason = r#"must be "preauthorize", "rails" or "iam""#;
            return Err(invalid("routing.mode", reason));
        }
    };
    let rails_issued = match raw.rails_issued.as_deref() {
        None | Some("rails") => RailsIssued::Rails,
        Some("decision") => RailsIssued::Decision,
        Some(_) => {
            let reason = r#"must be "rails" or "decision""#;
            return Err(invalid("routing.rails_issued", reason));
        }
    };
    let max: usize = positive_int(
        "routing.max_forced_clients",
        raw.max_forced_clients,
        DEFAULT_MAX_FORCED_CLIENTS,
    )?;
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

/// Seed 002's limit on an allowlist: long lists belong in Flipper, not in a config file.
const DEFAULT_MAX_FORCED_CLIENTS: usize = 200;

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

fn log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let format = match raw.format.as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(_) => return Err(invalid("log.format", r#"must be "json" or "text""#)),
    };
    let level = match raw.level.map(|l| l.to_ascii_lowercase()).as_deref() {
        Some("error") => tracing::Level::ERROR,
        Some("warn") => tracing::Level::WARN,
        None | Some("info") => tracing::Level::INFO,
        Some("debug") => tracing::Level::DEBUG,
        Some("trace") => tracing::Level::TRACE,
        Some(_) => {
            let reason = r#"must be one of "error", "warn", "info", "debug", "trace""#;
            return Err(invalid("log.level", reason));
        }
    };
    Ok(LogConfig { format, level })
}

fn required(key: &str, value: Option<String>) -> Result<String, ConfigError> {
    value.ok_or_else(|| invalid(key, "required key is missing"))
}

fn duration(key: &str, raw: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    parse_duration(raw.as_deref().unwrap_or(default)).map_err(|r| invalid(key, r))
}

/// For timeouts and lifetimes, where zero would fail or expire everything at once.
fn positive_duration(
    key: &str,
    raw: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let d = duration(key, raw, default)?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

/// TOML integers are i64; taking them as such lets a negative value get our message, not serde's.
/// hyper's HTTP/1 read buffer cannot be smaller than this.
const MIN_HEADER_BYTES: usize = 8192;

fn positive_int<T: TryFrom<i64>>(
    key: &str,
    raw: Option<i64>,
    default: T,
) -> Result<T, ConfigError> {
    match raw {
        None => Ok(default),
        Some(n) if n < 1 => Err(invalid(key, format!("must be at least 1, found {n}"))),
        Some(n) => T::try_from(n).map_err(|_| invalid(key, format!("{n} is too large"))),
    }
}

fn socket_addr(key: &str, raw: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = raw.as_deref().unwrap_or(default);
    text.parse()
        .map_err(|_| invalid(key, format!("invalid socket address {text:?}")))
}

/// An absolute `http` or `https` URL with a host and no query.
fn http_uri(key: &str, raw: Option<String>) -> Result<Uri, ConfigError> {
    let text = required(key, raw)?;
    let uri: Uri = text
        .parse()
        .map_err(|e| invalid(key, format!("invalid URL {text:?}: {e}")))?;
    if uri.scheme() != Some(&Scheme::HTTP) && uri.scheme() != Some(&Scheme::HTTPS) {
        return Err(invalid(key, "scheme must be http or https"));
    }
    match uri.authority() {
        None => return Err(invalid(key, "must have a host")),
        Some(a) if a.host().is_empty() => return Err(invalid(key, "must have a host")),
        // Credentials would otherwise end up in the Host header.
        Some(a) if a.as_str().contains('@') => {
            return Err(invalid(key, "must not contain user info"))
        }
        // The http crate reads "host:99999" as "no port", which would quietly mean 80.
        Some(a) if a.port_u16().is_none() && a.as_str() != a.host() => {
            return Err(invalid(key, "invalid port"))
        }
        Some(_) => {}
    }
    // The http crate silently drops a fragment, so look at the text.
    if uri.query().is_some() || text.contains('#') {
        return Err(invalid(key, "must not have a query or fragment"));
    }
    Ok(uri)
}

/// Trust for an `https` URL: `ca_file`'s certificates, or the system's roots.
fn upstream_tls(
    url: &Uri,
    ca_key: &'static str,
    ca_file: Option<String>,
) -> Result<Arc<ClientConfig>, ConfigError> {
    if url.scheme() != Some(&Scheme::HTTPS) {
        return match ca_file {
            Some(_) => Err(invalid(ca_key, "is only used with an https URL")),
            None => Ok(tls::unused_client_config()),
        };
    }
    Ok(tls::client_config(
        ca_key,
        ca_file.as_deref().map(Path::new),
    )?)
}

fn upstream(
    (key, raw): (&str, Option<String>),
    (ca_key, ca_file): (&'static str, Option<String>),
) -> Result<Upstream, ConfigError> {
    let uri = http_uri(key, raw)?;
    let tls = upstream_tls(&uri, ca_key, ca_file)?;
    let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
    if !matches!(uri.path(), "" | "/") {
        return Err(invalid(key, "must not have a path"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| invalid(key, "must have a host"))?;
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|_| invalid(key, "host is not a valid Host header"))?;
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| invalid(key, e.to_string()))?;
    Ok(Upstream {
        uri,
        authority,
        host,
        tls,
    })
}

// ---- Raw stage: mirrors the TOML exactly ------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    oauth: RawOauth,
    rails: Option<RawRails>,
    iam: Option<RawIam>,
    preauthorize: Option<RawPreauthorize>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    admin: RawAdmin,
    redis: Option<RawRedis>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    body_read_timeout: Option<String>,
    max_body_bytes: Option<i64>,
    max_connections: Option<i64>,
    max_header_bytes: Option<i64>,
    max_uri_bytes: Option<i64>,
    shutdown_timeout: Option<String>,
    graceful_shutdown_delay: Option<String>,
    trusted_cidrs: Option<Vec<String>>,
    tls: Option<RawServerTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    certificate_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOauth {
    paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRails {
    url: Option<String>,
    ca_file: Option<String>,
    connect_timeout: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIam {
    url: Option<String>,
    ca_file: Option<String>,
    connect_timeout: Option<String>,
    timeout: Option<String>,
    fallback_statuses: Option<Vec<i64>>,
    token_prefixes: Option<Vec<String>>,
    #[serde(default)]
    circuit_breaker: RawBreaker,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    consecutive_failures: Option<i64>,
    open_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreauthorize {
    url: Option<String>,
    ca_file: Option<String>,
    secret_file: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    ttl: Option<String>,
    max_entries: Option<i64>,
    stale_if_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    channel: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    mode: Option<String>,
    rails_issued: Option<String>,
    force_iam: Option<Vec<String>>,
    force_rails: Option<Vec<String>>,
    max_forced_clients: Option<i64>,
    percentage_of_actors: Option<RawPercentage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPercentage {
    flag: Option<String>,
    actor: Option<String>,
    percent: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
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
            let path =
                std::env::temp_dir().join(format!("iamproxy-config-{}-{n}", std::process::id()));
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
        assert_eq!(c.server.listen, "127.0.0.1:8181".parse().unwrap());
        assert_eq!(c.server.admin_listen, "127.0.0.1:9229".parse().unwrap());
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
        assert_eq!(c.rails.url.uri, "http://127.0.0.1:8080/");
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
        assert_eq!(s.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(s.admin_listen, "[::1]:9000".parse().unwrap());
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
        assert_eq!(c.rails.url.uri, "http://rails.internal:3000/");
        assert_eq!(c.rails.url.authority, "rails.internal:3000");
        assert_eq!(c.rails.url.host, "rails.internal:3000");
        assert_eq!(c.rails.timeout, Duration::from_secs(120));
        let iam = c.iam.unwrap();
        assert_eq!(
            (iam.url.uri, iam.url.host),
            (
                "http://iam/".parse().unwrap(),
                HeaderValue::from_static("iam")
            )
        );
        assert_eq!(iam.connect_timeout, Duration::from_millis(250));
        assert_eq!(iam.timeout, Duration::from_secs(3600));
        assert_eq!(iam.fallback_statuses, [StatusCode::SERVICE_UNAVAILABLE]);
        assert_eq!(iam.token_prefixes, ["iam_"]);
        assert_eq!(iam.circuit_breaker.consecutive_failures.get(), 2);
        assert_eq!(iam.circuit_breaker.open_for, Duration::from_micros(250));
        let pre = c.preauthorize.unwrap();
        assert_eq!(pre.url, "http://rails.internal:3000/-/x");
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
            r#"cache.ttl: invalid duration "sixty""#
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
            assert_eq!(msg, format!("{table}.{key}: invalid duration \"sixty\""));
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
    fn parse_duration_accepts_integer_and_unit_only() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("60s", Duration::from_secs(60)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("250us", Duration::from_micros(250)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "sixty",
            "",
            "60",
            "s",
            "1.5s",
            "-1s",
            "+1s",
            " 1s",
            "1 s",
            "1s ",
            "1sec",
            "1d",
            "1ns",
            "99999999999999h",
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(format!("invalid duration {bad:?}"))
            );
        }
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
    fn upstream_url_must_be_an_http_or_https_origin() {
        for (url, reason) in [
            ("ftp://rails", "scheme must be http or https"),
            ("127.0.0.1:8080", "scheme must be http or https"),
            ("http://:8080", "must have a host"),
            ("http://rails/api", "must not have a path"),
            ("http://rails/?a=1", "must not have a query or fragment"),
            ("http://rails/#top", "must not have a query or fragment"),
            ("http://user:pw@rails", "must not contain user info"),
            ("http://rails:99999", "invalid port"),
        ] {
            let text = format!("[rails]\nurl = \"{url}\"\n");
            assert_eq!(err(&text), format!("rails.url: {reason}"), "{url}");
        }
        assert!(
            err("[rails]\nurl = \"http://\"\n").starts_with("rails.url: invalid URL \"http://\"")
        );
        assert_eq!(err("[rails]\n"), "rails.url: required key is missing");
        assert_eq!(err("[cache]\n"), "rails: required table is missing");
        let iam = with_iam("/unused", "").replace("http://127.0.0.1:9000", "ws://iam");
        assert_eq!(err(&iam), "iam.url: scheme must be http or https");
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
    fn routing_defaults_to_asking_the_pre_authorize_backend() {
        let routing = Config::from_toml(MINIMAL).unwrap().routing;
        assert_eq!(routing, RoutingConfig::default());
        assert_eq!(routing.mode, Mode::Preauthorize);
    }

    #[test]
    fn routing_reads_mode_lists_and_percentage() {
        let text = format!(
            "{MINIMAL}[routing]\nmode = \"iam\"\nforce_iam = [\"a\", \"b\"]\nforce_rails = [\"c\"]\n\
             percentage_of_actors = {{ flag = \"f\", actor = \"App:{{client_id}}!\", percent = 12 }}\n"
        );
        let routing = Config::from_toml(&text).unwrap().routing;
        assert_eq!(routing.mode, Mode::Iam);
        assert!(routing.force_iam.contains("b") && routing.force_rails.contains("c"));
        let gate = routing.percentage.unwrap();
        assert_eq!(
            (gate.actor_prefix.as_str(), gate.actor_suffix.as_str()),
            ("App:", "!")
        );
        assert_eq!(gate.percent, 12.0, "an integer percent is accepted");
    }

    #[test]
    fn routing_rejects_bad_modes_lists_and_percentages() {
        let routing = |body: &str| err(&format!("{MINIMAL}[routing]\n{body}\n"));
        assert_eq!(
            routing("rails_issued = \"iam\""),
            r#"routing.rails_issued: must be "rails" or "decision""#
        );
        assert_eq!(
            routing("mode = \"off\""),
            r#"routing.mode: must be "preauthorize", "rails" or "iam""#
        );
        assert_eq!(
            routing("force_iam = [\"a\", \"b\", \"a\"]"),
            r#"routing.force_iam[2]: duplicate "a""#
        );
        assert_eq!(
            routing("force_iam = [\"a\"]\nforce_rails = [\"b\", \"a\"]"),
            r#"routing.force_rails: "a" is also in routing.force_iam"#
        );
        assert_eq!(
            routing("force_rails = [\"\"]"),
            "routing.force_rails[0]: must be a non-empty client id without control characters"
        );
        let three = "force_iam = [\"a\", \"b\", \"c\"]\nmax_forced_clients = 2";
        assert_eq!(
            routing(three),
            "routing.force_iam: 3 client ids, more than routing.max_forced_clients (2)"
        );
        let many: Vec<String> = (0..201).map(|n| format!("\"app-{n}\"")).collect();
        assert_eq!(
            routing(&format!("force_rails = [{}]", many.join(", "))),
            "routing.force_rails: 201 client ids, more than routing.max_forced_clients (200)"
        );
        let gate = |inner: &str| routing(&format!("percentage_of_actors = {{ {inner} }}"));
        assert_eq!(
            gate("flag = \"f\", percent = 100.5"),
            "routing.percentage_of_actors.percent: must be from 0 to 100, found 100.5"
        );
        assert_eq!(
            gate("flag = \"f\", actor = \"App\", percent = 1"),
            "routing.percentage_of_actors.actor: must contain {client_id} exactly once"
        );
        assert_eq!(
            gate("percent = 1"),
            "routing.percentage_of_actors.flag: required key is missing"
        );
        assert_eq!(
            gate("flag = \"f\""),
            "routing.percentage_of_actors.percent: required key is missing"
        );
    }

    #[test]
    fn ca_file_is_read_for_https_and_refused_for_http() {
        let missing = "/nonexistent/iamproxy-ca.pem";
        let https = format!("[rails]\nurl = \"https://rails\"\nca_file = \"{missing}\"\n");
        assert!(
            err(&https).starts_with(&format!("rails.ca_file: cannot read {missing}: ")),
            "{}",
            err(&https)
        );
        let garbage = TempFile::with(b"not a certificate\n");
        let https = https.replace(missing, garbage.path());
        assert_eq!(
            err(&https),
            format!("rails.ca_file: no PEM certificate in {}", garbage.path())
        );
        let http = format!("[rails]\nurl = \"http://rails\"\nca_file = \"{missing}\"\n");
        assert_eq!(err(&http), "rails.ca_file: is only used with an https URL");
    }

    #[test]
    fn https_upstreams_keep_their_scheme_and_trust_the_ca_file() {
        let ca = rcgen::generate_simple_self_signed(vec!["iam.internal".to_string()]).unwrap();
        let ca_file = TempFile::with(ca.cert.pem().as_bytes());
        let secret = secret_file(32);
        let text = with_iam(secret.path(), &format!("ca_file = '{}'\n", ca_file.path()))
            .replace("http://127.0.0.1:9000", "https://iam.internal")
            .replace("http://127.0.0.1:8080/-/", "https://rails.internal/-/")
            .replace(
                "[iam]\n",
                &format!("[iam]\nca_file = '{}'\n", ca_file.path()),
            );
        let config = Config::from_toml(&text).unwrap();
        let iam = config.iam.unwrap();
        assert_eq!(iam.url.uri, "https://iam.internal/");
        assert_eq!(iam.url.host, "iam.internal");
        let preauthorize = config.preauthorize.unwrap();
        assert_eq!(preauthorize.url.scheme_str(), Some("https"));
    }

    #[test]
    fn server_tls_names_the_key_of_the_file_at_fault() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_file = TempFile::with(cert.cert.pem().as_bytes());
        let key_file = TempFile::with(cert.signing_key.serialize_pem().as_bytes());
        let other_key = TempFile::with(other.signing_key.serialize_pem().as_bytes());
        let with_tls = |cert: &str, key: &str| {
            format!("[server.tls]\ncertificate_file = '{cert}'\nkey_file = '{key}'\n{MINIMAL}")
        };
        let ok = Config::from_toml(&with_tls(cert_file.path(), key_file.path())).unwrap();
        let tls = ok.server.tls.expect("tls is configured");
        assert_eq!(tls.certificate_file.to_str(), Some(cert_file.path()));
        assert_eq!(
            tls.config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let msg = err(&with_tls(cert_file.path(), other_key.path()));
        assert!(
            msg.starts_with("server.tls.key_file: does not fit the certificate"),
            "{msg}"
        );
        let msg = err(&with_tls(key_file.path(), key_file.path()));
        assert_eq!(
            msg,
            format!(
                "server.tls.certificate_file: no PEM certificate in {}",
                key_file.path()
            )
        );
        let msg = err(&with_tls(cert_file.path(), cert_file.path()));
        assert!(
            msg.starts_with("server.tls.key_file: no usable PEM private key"),
            "{msg}"
        );
        let msg = err(&format!("[server.tls]\ncertificate_file = 'x'\n{MINIMAL}"));
        assert_eq!(msg, "server.tls.key_file: required key is missing");
    }

    #[test]
    fn upstream_keeps_authority_as_written_for_the_host_header() {
        let c = Config::from_toml("[rails]\nurl = \"http://Rails.Internal\"\n").unwrap();
        assert_eq!(c.rails.url.uri, "http://Rails.Internal/");
        assert_eq!(c.rails.url.authority.port_u16(), None);
        assert_eq!(c.rails.url.host, "Rails.Internal");
    }

    #[test]
    fn preauthorize_url_keeps_its_path_but_rejects_a_query() {
        let secret = secret_file(32);
        let c = Config::from_toml(&with_iam(secret.path(), "")).unwrap();
        assert_eq!(
            c.preauthorize.unwrap().url,
            "http://127.0.0.1:8080/-/oauth/iam_routing"
        );
        let query = with_iam(secret.path(), "").replace("iam_routing", "iam_routing?x=1");
        assert_eq!(
            err(&query),
            "preauthorize.url: must not have a query or fragment"
        );
    }

    #[test]
    fn iam_without_preauthorize_is_rejected() {
        let text = format!("{MINIMAL}[iam]\nurl = \"http://127.0.0.1:9000\"\n");
        assert_eq!(err(&text), "preauthorize: required when [iam] is set");
    }

    #[test]
    fn preauthorize_without_iam_is_allowed() {
        let secret = secret_file(32);
        let text =
            with_iam(secret.path(), "").replace("[iam]\nurl = \"http://127.0.0.1:9000\"\n", "");
        let c = Config::from_toml(&text).unwrap();
        assert!(c.iam.is_none() && c.preauthorize.is_some());
    }

    #[test]
    fn secret_file_with_32_bytes_of_base64_is_loaded() {
        let bytes = random_bytes(32);
        let file = TempFile::with(format!("  {}\n\n", STANDARD.encode(&bytes)).as_bytes());
        let c = Config::from_toml(&with_iam(file.path(), "")).unwrap();
        assert_eq!(c.preauthorize.unwrap().secret.as_bytes()[..], bytes[..]);
    }

    #[test]
    fn secret_file_with_wrong_length_or_content_is_rejected() {
        let short = secret_file(16);
        let msg = err(&with_iam(short.path(), ""));
        assert_eq!(
            msg,
            "preauthorize.secret_file: must hold base64 of exactly 32 bytes, found 16"
        );
        for junk in [&b"not base64!"[..], &[0xff, 0xfe, 0x00][..]] {
            let file = TempFile::with(junk);
            assert_eq!(
                err(&with_iam(file.path(), "")),
                "preauthorize.secret_file: not valid base64"
            );
        }
        let missing = std::env::temp_dir().join("iamproxy-config-no-such-file");
        let msg = err(&with_iam(missing.to_str().unwrap(), ""));
        let want = format!(
            "preauthorize.secret_file: cannot read {}: ",
            missing.display()
        );
        assert!(msg.starts_with(&want), "{msg}");
    }

    #[test]
    fn secret_debug_does_not_print_bytes() {
        let secret = Secret::from_base64(&STANDARD.encode([0xab; 32])).unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert!(!format!("{secret:#?}").contains("171"));
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
    fn cidr_matches_v4_v6_bare_and_mapped_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let v4 = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(v4.contains(ip("10.255.0.1")) && !v4.contains(ip("11.0.0.1")));
        assert!(v4.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped peer");
        assert!(!v4.contains(ip("::1")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(
            v6.contains(ip("fd12::1"))
                && !v6.contains(ip("fe80::1"))
                && !v6.contains(ip("10.0.0.1"))
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
            r#"server.listen: invalid socket address "localhost""#
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
        let (iam, pre) = (
            parsed.iam.as_ref().unwrap(),
            parsed.preauthorize.as_ref().unwrap(),
        );

        // Only the keys without defaults, taken from the example itself; the rest must match.
        let defaults = format!(
            "[rails]\nurl = \"{}\"\n[iam]\nurl = \"{}\"\n[preauthorize]\nurl = \"{}\"\nsecret_file = '{}'\n",
            parsed.rails.url.uri,
            iam.url.uri,
            pre.url,
            secret.path()
        );
        let defaults = Config::from_toml(&defaults).unwrap();
        assert_eq!(format!("{parsed:#?}"), format!("{defaults:#?}"));
    }
}
