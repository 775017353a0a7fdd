//! The first stage: the TOML file exactly as written, every key optional, unknown keys
//! refused by serde (naming them with line and column).

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[rails.headers]` and the like: header names to values, set on every request to that
/// upstream.
pub(super) type RawHeaders = Option<BTreeMap<String, String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) oauth: RawOauth,
    pub(super) rails: Option<RawRails>,
    pub(super) iam: Option<RawIam>,
    pub(super) preauthorize: Option<RawPreauthorize>,
    #[serde(default)]
    pub(super) cache: RawCache,
    #[serde(default)]
    pub(super) routing: RawRouting,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    pub(super) redis: Option<RawRedis>,
    #[serde(default)]
    pub(super) log: RawLog,
    pub(super) tracing: Option<RawTracing>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) socket_mode: Option<String>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) body_read_timeout: Option<String>,
    pub(super) body_idle_timeout: Option<String>,
    pub(super) write_timeout: Option<String>,
    pub(super) max_body_bytes: Option<i64>,
    pub(super) max_connections: Option<i64>,
    pub(super) max_buffered_bytes: Option<i64>,
    pub(super) h2_max_concurrent_streams: Option<i64>,
    pub(super) max_header_bytes: Option<i64>,
    pub(super) max_uri_bytes: Option<i64>,
    pub(super) shutdown_timeout: Option<String>,
    pub(super) graceful_shutdown_delay: Option<String>,
    pub(super) trusted_cidrs: Option<Vec<String>>,
    pub(super) trusted_cidrs_for_propagation: Option<Vec<String>>,
    pub(super) tls: Option<RawServerTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServerTls {
    pub(super) certificate_file: Option<String>,
    pub(super) key_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOauth {
    pub(super) paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRails {
    pub(super) url: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) headers: RawHeaders,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIam {
    pub(super) url: Option<String>,
    pub(super) host: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) fallback_statuses: Option<Vec<i64>>,
    pub(super) token_prefixes: Option<Vec<String>>,
    #[serde(default)]
    pub(super) circuit_breaker: RawBreaker,
    pub(super) headers: RawHeaders,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub(super) consecutive_failures: Option<i64>,
    pub(super) open_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPreauthorize {
    pub(super) url: Option<String>,
    pub(super) host: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) secret_file: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) headers: RawHeaders,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) ttl: Option<String>,
    pub(super) max_entries: Option<i64>,
    pub(super) stale_if_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<String>,
    pub(super) channel: Option<String>,
    pub(super) shared_cache: Option<bool>,
    pub(super) key_prefix: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) sentinels: Option<Vec<String>>,
    pub(super) sentinel_master: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) token_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) mode: Option<String>,
    pub(super) rails_issued: Option<String>,
    pub(super) force_iam: Option<Vec<String>>,
    pub(super) force_rails: Option<Vec<String>>,
    pub(super) max_forced_clients: Option<i64>,
    pub(super) percentage_of_actors: Option<RawPercentage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPercentage {
    pub(super) flag: Option<String>,
    pub(super) actor: Option<String>,
    pub(super) percent: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
    pub(super) fields: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    pub(super) otlp_endpoint: Option<String>,
    pub(super) host: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) service_name: Option<String>,
    pub(super) sample_ratio: Option<f64>,
    pub(super) trust_incoming: Option<bool>,
    pub(super) timeout: Option<String>,
    pub(super) headers: RawHeaders,
}
