//! `[redis]`: the URL, the shared cache's keys and timeout, TLS, AUTH and Sentinel.

use super::*;

fn redis(lines: &str) -> Result<RedisConfig, String> {
    Config::from_toml(&format!("{MINIMAL}[redis]\n{lines}\n"))
        .map(|config| config.redis.unwrap())
        .map_err(|e| e.to_string())
}

#[test]
fn the_shared_cache_is_off_by_default_with_its_prefix_and_a_50ms_timeout() {
    let config = redis("url = \"redis://127.0.0.1:6379/0\"").unwrap();
    assert!(!config.shared_cache);
    assert_eq!(config.key_prefix, "iamproxy:");
    assert_eq!(config.timeout, Duration::from_millis(50));
    assert!(config.sentinels.is_empty());
    let on = redis(
        "url = \"redis://r/\"\nshared_cache = true\nkey_prefix = \"gw:\"\ntimeout = \"20ms\"",
    )
    .unwrap();
    assert!(on.shared_cache);
    assert_eq!(
        (on.key_prefix.as_str(), on.timeout),
        ("gw:", Duration::from_millis(20))
    );
    assert_eq!(
        redis("url = \"redis://r/\"\ntimeout = \"0s\"").unwrap_err(),
        "redis.timeout: must be greater than 0"
    );
}

#[test]
fn urls_are_redis_or_rediss_without_a_fragment() {
    for (url, reason) in [
        ("http://redis", "must be a redis:// or rediss:// URL"),
        ("rediss://redis:6380/#insecure", "must not have a fragment"),
    ] {
        assert_eq!(
            redis(&format!("url = \"{url}\"")).unwrap_err(),
            format!("redis.url: {reason}"),
            "{url}"
        );
    }
    assert!(redis("url = \"rediss://user:pw@redis:6380/2\"").is_ok());
}

#[test]
fn ca_file_needs_rediss_and_a_readable_pem() {
    let reason = redis("url = \"redis://r/\"\nca_file = \"/x\"").unwrap_err();
    assert_eq!(reason, "redis.ca_file: is only used with a rediss:// URL");
    let missing = redis("url = \"rediss://r/\"\nca_file = \"/nonexistent/ca.pem\"").unwrap_err();
    assert!(
        missing.starts_with("redis.ca_file: cannot read /nonexistent/ca.pem"),
        "{missing}"
    );
    let not_pem = TempFile::with(b"not a certificate\n");
    let text = format!("url = \"rediss://r/\"\nca_file = \"{}\"", not_pem.path());
    assert!(redis(&text)
        .unwrap_err()
        .starts_with("redis.ca_file: no PEM certificate"));
}

#[test]
fn password_file_is_read_trimmed_and_not_printed_and_not_given_twice() {
    let file = TempFile::with(b"s3cret pass\n");
    let text = format!(
        "url = \"redis://app@r/\"\npassword_file = \"{}\"",
        file.path()
    );
    let config = redis(&text).unwrap();
    assert_eq!(config.password, Some(RedisPassword("s3cret pass".into())));
    assert!(!format!("{config:?}").contains("s3cret"));
    let twice = format!(
        "url = \"redis://:pw@r/\"\npassword_file = \"{}\"",
        file.path()
    );
    assert_eq!(
        redis(&twice).unwrap_err(),
        "redis.password_file: redis.url holds a password already: give it in one place"
    );
    let empty = TempFile::with(b"\n");
    let text = format!("url = \"redis://r/\"\npassword_file = \"{}\"", empty.path());
    assert!(redis(&text).unwrap_err().ends_with("is empty"));
}

#[test]
fn sentinels_name_their_master_and_make_the_url_optional() {
    let config = redis(
        "sentinels = [\"10.0.0.1:26379\", \"rediss://:pw@sentinel-2:26379\"]\nsentinel_master = \"gitlab-redis\"",
    )
    .unwrap();
    assert_eq!(
        config.sentinels,
        ["redis://10.0.0.1:26379", "rediss://:pw@sentinel-2:26379"]
    );
    assert_eq!(config.sentinel_master, "gitlab-redis");
    assert_eq!(
        redis("sentinels = [\"10.0.0.1:26379\"]").unwrap_err(),
        "redis.sentinel_master: required with redis.sentinels"
    );
    assert_eq!(
        redis("url = \"redis://r/\"\nsentinel_master = \"m\"").unwrap_err(),
        "redis.sentinels: required with redis.sentinel_master"
    );
    let bad = redis("sentinels = [\"10.0.0.1:1\", \"http://x\"]\nsentinel_master = \"m\"");
    assert_eq!(
        bad.unwrap_err(),
        "redis.sentinels[1]: must be a redis:// or rediss:// URL"
    );
    assert_eq!(
        redis("channel = \"x\"").unwrap_err(),
        "redis.url: required key is missing"
    );
}

#[test]
fn debug_never_shows_the_password_in_the_url() {
    for url in [
        "redis://:s3cr3t-pw@redis.internal:6379/0",
        "rediss://gitlab:s3cr3t-pw@redis.internal/",
        "redis://gitlab:s3cr3t-pw@redis.internal?db=1",
    ] {
        let config = redis(&format!("url = \"{url}\"")).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>@redis.internal"), "{shown}");
    }
    let plain = redis("url = \"redis://redis.internal:6379/0\"").unwrap();
    assert!(format!("{plain:?}").contains("\"redis://redis.internal:6379/0\""));
}
