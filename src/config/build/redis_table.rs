//! `[redis]`: the URL (and Sentinel's), the shared cache's keys and timeout, the CA file
//! and the password file, each error naming its key.

use std::path::Path;

use super::super::raw::RawRedis;
use super::super::{invalid, ConfigError, RedisConfig, RedisPassword};
use super::{default, positive_duration};
use crate::server::tls;

pub(super) fn redis(raw: RawRedis) -> Result<RedisConfig, ConfigError> {
    let sentinels = raw.sentinels.unwrap_or_default();
    // With Sentinel the URL only carries the scheme, credentials and database, so it may
    // be left out; GitLab spells it `redis://:password@gitlab-redis/`, naming the master.
    let url = match (raw.url, sentinels.is_empty()) {
        (Some(url), _) => url,
        (None, false) => "redis://sentinel-master/".to_owned(),
        (None, true) => return Err(invalid("redis.url", "required key is missing")),
    };
    let info = redis_url("redis.url", &url)?;
    let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
    let channel = raw
        .channel
        .unwrap_or_else(|| default("redis.channel").to_owned());
    if channel.is_empty() {
        return Err(invalid("redis.channel", "must not be empty"));
    }
    let ca_pem = match raw.ca_file {
        Some(_) if !tls => {
            return Err(invalid(
                "redis.ca_file",
                "is only used with a rediss:// URL",
            ))
        }
        Some(path) => {
            // Parsed as the upstreams' CA files are, so a bad file is refused here.
            tls::client_config("redis.ca_file", Some(Path::new(&path)))?;
            Some(std::fs::read(&path).map_err(|e| invalid("redis.ca_file", e.to_string()))?)
        }
        None => None,
    };
    let password = raw.password_file.map(redis_password).transpose()?;
    if password.is_some() && info.redis.password.is_some() {
        return Err(invalid(
            "redis.password_file",
            "redis.url holds a password already: give it in one place",
        ));
    }
    let sentinels = sentinels
        .into_iter()
        .enumerate()
        .map(|(i, sentinel)| sentinel_url(&format!("redis.sentinels[{i}]"), sentinel))
        .collect::<Result<Vec<_>, _>>()?;
    let sentinel_master = raw.sentinel_master.unwrap_or_default();
    match (sentinels.is_empty(), sentinel_master.is_empty()) {
        (false, true) => {
            return Err(invalid(
                "redis.sentinel_master",
                "required with redis.sentinels",
            ))
        }
        (true, false) => {
            return Err(invalid(
                "redis.sentinels",
                "required with redis.sentinel_master",
            ))
        }
        _ => {}
    }
    let key_prefix = raw
        .key_prefix
        .unwrap_or_else(|| default("redis.key_prefix").to_owned());
    Ok(RedisConfig {
        url,
        channel,
        shared_cache: raw
            .shared_cache
            .unwrap_or(default("redis.shared_cache") == "true"),
        key_prefix,
        timeout: positive_duration("redis.timeout", raw.timeout)?,
        ca_pem,
        password,
        sentinels,
        sentinel_master,
    })
}

/// A sentinel's address: `host:port`, or a `redis://` / `rediss://` URL when it needs TLS
/// or a password of its own.
fn sentinel_url(key: &str, text: String) -> Result<String, ConfigError> {
    let url = if text.contains("://") {
        text
    } else {
        format!("redis://{text}")
    };
    let info = redis_url(key, &url)?;
    if matches!(info.addr, redis::ConnectionAddr::Unix(_)) {
        return Err(invalid(
            key,
            "must be host:port or a redis:// or rediss:// URL",
        ));
    }
    Ok(url)
}

/// A `redis://`, `rediss://` or `redis+unix://` URL as the redis crate reads it. A
/// fragment is refused: `#insecure` would turn certificate verification off.
fn redis_url(key: &str, url: &str) -> Result<redis::ConnectionInfo, ConfigError> {
    let parsed = redis::parse_redis_url(url)
        .ok_or_else(|| invalid(key, "must be a redis:// or rediss:// URL"))?;
    if parsed.fragment().is_some() {
        return Err(invalid(key, "must not have a fragment"));
    }
    redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| invalid(key, e.to_string()))
}

fn redis_password(path: String) -> Result<RedisPassword, ConfigError> {
    let key = "redis.password_file";
    let bytes =
        std::fs::read(&path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| invalid(key, "password is not UTF-8"))?;
    // A trailing newline is the editor's, not the password's.
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(invalid(key, format!("{path} is empty")));
    }
    Ok(RedisPassword(password.to_owned()))
}
