//! Upstream URLs, the CA files and the listener's TLS files, and the Workhorse secret.

use super::*;

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
    assert!(err("[rails]\nurl = \"http://\"\n").starts_with("rails.url: invalid URL \"http://\""));
    assert_eq!(err("[rails]\n"), "rails.url: required key is missing");
    assert_eq!(err("[cache]\n"), "rails: required table is missing");
    let iam = with_iam("/unused", "").replace("http://127.0.0.1:9000", "ws://iam");
    assert_eq!(err(&iam), "iam.url: scheme must be http or https");
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
