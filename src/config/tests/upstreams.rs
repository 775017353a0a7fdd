//! Upstream URLs, the CA files and the listener's TLS files, the Workhorse secret, and
//! each upstream's static headers.

use super::*;

const HTTP_OR_UNIX: &str = "scheme must be http or https, or the URL unix:/path/to.sock";

#[test]
fn upstream_url_must_be_an_http_or_https_origin() {
    for (url, reason) in [
        ("ftp://rails", HTTP_OR_UNIX),
        ("127.0.0.1:8080", HTTP_OR_UNIX),
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
    assert_eq!(err(&iam), format!("iam.url: {HTTP_OR_UNIX}"));
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
    assert_eq!(iam.url.address.to_string(), "https://iam.internal/");
    assert_eq!(iam.url.host, "iam.internal");
    let preauthorize = config.preauthorize.unwrap();
    assert_eq!(
        preauthorize.upstream.address.to_string(),
        "https://rails.internal/"
    );
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
    assert_eq!(c.rails.url.address.to_string(), "http://Rails.Internal/");
    assert_eq!(c.rails.url.host, "Rails.Internal");
}

#[test]
fn preauthorize_url_keeps_its_path_but_rejects_a_query() {
    let secret = secret_file(32);
    let c = Config::from_toml(&with_iam(secret.path(), "")).unwrap();
    let pre = c.preauthorize.unwrap();
    assert_eq!(pre.upstream.address.to_string(), "http://127.0.0.1:8080/");
    assert_eq!(pre.path, "/-/oauth/iam_routing");
    assert_eq!(pre.upstream.host, "127.0.0.1:8080");
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

#[test]
fn static_headers_are_read_per_upstream_and_printed_without_values() {
    let secret = secret_file(32);
    let text = with_iam(
        secret.path(),
        "[preauthorize.headers]\nX-Preauth = \"p\"\n[iam.headers]\n\"X-Gitlab-Svc\" = \"iam-auth-http\"\n\
         [rails.headers]\nX-Token = \"secret value\"\n",
    );
    let c = Config::from_toml(&text).unwrap();
    let names = |headers: &StaticHeaders| -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    };
    let iam = c.iam.as_ref().unwrap();
    let svc = ("x-gitlab-svc".to_owned(), "iam-auth-http".to_owned());
    assert_eq!(names(&iam.url.headers), [svc]);
    assert_eq!(
        names(&c.rails.url.headers),
        [("x-token".into(), "secret value".into())]
    );
    let pre = c.preauthorize.as_ref().unwrap();
    assert_eq!(
        names(&pre.upstream.headers),
        [("x-preauth".into(), "p".into())]
    );
    assert!(
        !format!("{c:?}").contains("secret value"),
        "values stay out of Debug"
    );
    assert!(Config::from_toml(MINIMAL)
        .unwrap()
        .rails
        .url
        .headers
        .iter()
        .next()
        .is_none());
}

#[test]
fn static_headers_refuse_bad_names_values_and_headers_the_gateway_owns() {
    let secret = secret_file(32);
    let header = |table: &str, line: &str| {
        err(&with_iam(
            secret.path(),
            &format!("[{table}.headers]\n{line}\n"),
        ))
    };
    for (table, line, want) in [
        (
            "iam",
            "\"Host\" = \"iam\"",
            r#"iam.headers."Host": Host is the client's for Rails; set iam.host or preauthorize.host instead"#,
        ),
        (
            "rails",
            "Connection = \"close\"",
            r#"rails.headers."Connection": is a hop-by-hop header, which describes one connection"#,
        ),
        (
            "rails",
            "Transfer-Encoding = \"chunked\"",
            r#"rails.headers."Transfer-Encoding": is a hop-by-hop header, which describes one connection"#,
        ),
        (
            "preauthorize",
            "Proxy-Authorization = \"x\"",
            r#"preauthorize.headers."Proxy-Authorization": is a hop-by-hop header, which describes one connection"#,
        ),
        (
            "iam",
            "Content-Length = \"0\"",
            r#"iam.headers."Content-Length": Content-Length is the body's length"#,
        ),
        (
            "rails",
            "Gitlab-Workhorse-Api-Request = \"x\"",
            r#"rails.headers."Gitlab-Workhorse-Api-Request": Gitlab-Workhorse headers are the gateway's own"#,
        ),
        (
            "iam",
            "\"Bad Name\" = \"x\"",
            r#"iam.headers."Bad Name": is not a valid header name"#,
        ),
        (
            "iam",
            "\"\" = \"x\"",
            r#"iam.headers."": is not a valid header name"#,
        ),
        (
            "iam",
            "X-Svc = \"a\\nb\"",
            r#"iam.headers."X-Svc": the value must be printable ASCII (spaces and tabs allowed)"#,
        ),
        (
            "iam",
            "X-Svc = \"a\"\nx-svc = \"b\"",
            r#"iam.headers."x-svc": is set twice (header names ignore case)"#,
        ),
        (
            "iam",
            "X-Svc = 1",
            r#"iam.headers."X-Svc": invalid type: integer `1`, expected a string"#,
        ),
    ] {
        assert_eq!(header(table, line), want, "{line}");
    }
}
