//! Configuration: one TOML file, read in two stages — the raw serde structs ([`raw`],
//! filled by [`read`], which also replaces `${NAME}` from the environment), then a
//! validated, typed [`Config`] ([`build`]) whose errors name the key — and the value types
//! it is made of ([`values`]).

mod build;
mod raw;
mod read;
mod values;

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use hyper::StatusCode;

use crate::classify::Endpoint;
use crate::decision::rules::RoutingConfig;
use crate::server::tls::{ServerTls, TlsError};
pub use build::DEFAULTS;
pub use values::{
    parse_duration, AdminToken, Cidr, ListenAddr, Secret, StaticHeaders, UpstreamAddress,
    UpstreamUrl,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Not TOML: toml's message, with the line and column.
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    /// One of the above, in the file at `path`.
    #[error("{path}: {error}")]
    InFile {
        path: String,
        error: Box<ConfigError>,
    },
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

impl Config {
    /// Reads the file at `path`, with `${NAME}` in its string values replaced from this
    /// process's environment; every error names the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let in_file = |error| ConfigError::InFile {
            path: path.display().to_string(),
            error: Box::new(error),
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(in_file)
    }

    /// `preauthorize.secret_file` is read as given, so a relative path is relative to the cwd.
    /// `${NAME}` is replaced from this process's environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_in(text, &|name| std::env::var_os(name))
    }

    /// [`Config::from_toml`] with `env` as the environment.
    pub(crate) fn from_toml_in(
        text: &str,
        env: read::Environment<'_>,
    ) -> Result<Config, ConfigError> {
        build::config(read::raw(text, env)?)
    }
}

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
    /// `None`: no `[tracing]` table, so no spans and no trace context of the gateway's own.
    pub tracing: Option<TracingConfig>,
}

/// `[tracing]`: OpenTelemetry spans, exported over OTLP/HTTP (see [`crate::observe::trace`]).
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// Where spans go; `None` only with `sample_ratio = 0`.
    pub collector: Option<Collector>,
    pub service_name: String,
    /// The share of new traces recorded; 0 turns tracing off.
    pub sample_ratio: f64,
    /// A client's `traceparent` is kept even from a peer outside
    /// `server.trusted_cidrs_for_propagation`.
    pub trust_incoming: bool,
    /// Each export, connect included.
    pub timeout: Duration,
}

/// The OTLP/HTTP collector: its address, `Host`, CA and headers, and the request path.
#[derive(Debug, Clone)]
pub struct Collector {
    pub upstream: UpstreamUrl,
    pub path: String,
}

/// `Debug` shows the URL without its user info (see [`RedisConfig::url`]).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://…`; may hold a password, so it is never logged.
    /// With `sentinels`, its host and port are not used: the sentinels name the master.
    pub url: String,
    pub channel: String,
    /// The fleet's decision cache in Redis, behind each instance's own.
    pub shared_cache: bool,
    /// Every key the gateway writes starts with this.
    pub key_prefix: String,
    /// Every Redis command on the request path gets this long.
    pub timeout: Duration,
    /// PEM CA certificates a `rediss://` server's certificate must chain to; `None`: the
    /// system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// From `password_file`, in place of a password in the URL.
    pub password: Option<RedisPassword>,
    /// `redis://host:port` of each sentinel (`host:port` is read so); empty: no Sentinel.
    pub sentinels: Vec<String>,
    /// The master the sentinels are asked for.
    pub sentinel_master: String,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `scheme://user:password@host…`: everything between `://` and the last `@` of the
        // authority goes.
        let url = match self.url.split_once("://") {
            Some((scheme, rest)) => {
                let authority = rest.find(['/', '?', '#']).map_or(rest, |end| &rest[..end]);
                match authority.rfind('@') {
                    Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
                    None => self.url.clone(),
                }
            }
            None => self.url.clone(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &url)
            .field("channel", &self.channel)
            .field("shared_cache", &self.shared_cache)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("password", &self.password)
            .field("sentinels", &self.sentinels)
            .field("sentinel_master", &self.sentinel_master)
            .finish()
    }
}

/// Redis' password from `redis.password_file`. Redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(pub String);

impl std::fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisPassword(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    pub admin_listen: ListenAddr,
    /// Permission bits of the socket file of a `unix:` listener.
    pub socket_mode: u32,
    /// A request's headers must arrive within this from its first byte (a new
    /// connection's, from accept, TLS handshake included).
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// An OAuth request body must arrive in full within this; a trickling client gets 408.
    pub body_read_timeout: Duration,
    /// A streamed (pass-through) request body that sends nothing for this long is cut.
    pub body_idle_timeout: Duration,
    /// A connection whose client accepts no response bytes for this long is closed.
    pub write_timeout: Duration,
    pub max_body_bytes: u64,
    /// OAuth bodies buffered at once, across all connections; past it, 503.
    pub max_buffered_bytes: u64,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Request line plus headers; larger gets 431 (HTTP/2: the header list size).
    pub max_header_bytes: usize,
    /// Path plus query; longer gets 414.
    pub max_uri_bytes: usize,
    pub shutdown_timeout: Duration,
    pub graceful_shutdown_delay: Duration,
    /// Peers whose X-Forwarded-* headers are kept rather than replaced.
    pub trusted_cidrs: Vec<Cidr>,
    /// Peers whose X-Request-Id (correlation id) is kept: `trusted_cidrs_for_propagation`
    /// as written, or `trusted_cidrs` when that key is absent.
    pub trusted_cidrs_for_propagation: Vec<Cidr>,
    /// Present: the main listener speaks only HTTPS (never on a Unix socket).
    pub tls: Option<ServerTls>,
}

#[derive(Debug, Clone)]
pub struct OauthConfig {
    pub paths: Vec<(String, Endpoint)>,
}

#[derive(Debug, Clone)]
pub struct RailsConfig {
    pub url: UpstreamUrl,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Connections open to Rails at most; see [`crate::forward::client::Pool`].
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct IamConfig {
    pub url: UpstreamUrl,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_connections: usize,
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
    /// Where the backend is, the `Host` it gets, and its static headers (set under the
    /// call's own headers).
    pub upstream: UpstreamUrl,
    /// The request path, origin-form; never a query, the gateway adds `client_id`.
    pub path: String,
    pub secret: Secret,
    pub timeout: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub max_entries: u64,
    /// Longest an expired answer is still served while the pre-authorize backend fails
    /// (RFC 5861 `stale-if-error`); zero: never.
    pub stale_if_error: Duration,
}

/// Field names the gateway's own lines use, which `log.fields` may not take: a line would
/// otherwise hold the name twice.
pub const RESERVED_LOG_FIELDS: &[&str] = &[
    "time",
    "level",
    "msg",
    "correlation_id",
    "method",
    "path",
    "uri",
    "route",
    "status",
    "duration_ms",
    "ttfb_ms",
    "destination",
    "reason",
    "fallback_reason",
    "client_id",
    "identification",
    "remote_ip",
    "host",
    "proto",
    "user_agent",
    "referrer",
    "written_bytes",
    "content_type",
    "error",
    "outcome",
    "trace_id",
];

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: tracing::Level,
    /// Static `name = value` fields on every JSON line (`log.fields`), sorted by name.
    pub fields: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[cfg(test)]
mod tests;
