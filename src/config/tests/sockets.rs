//! Unix sockets: `unix:` listeners and their mode, `unix:` upstreams with the `Host` they
//! get; and the configurations the README's Deploying section and the example file show.

use super::*;
use std::path::Path;

fn unix(path: &str) -> ListenAddr {
    ListenAddr::Unix(PathBuf::from(path))
}

#[test]
fn listeners_may_be_unix_sockets_with_a_mode() {
    let text = "[server]\nlisten = \"unix:/run/iamproxy/iamproxy.sock\"\n\
                admin_listen = \"unix:/run/iamproxy/admin.sock\"\nsocket_mode = \"0660\"\n";
    let c = Config::from_toml(&format!("{text}{MINIMAL}")).unwrap();
    assert_eq!(c.server.listen, unix("/run/iamproxy/iamproxy.sock"));
    assert_eq!(c.server.admin_listen, unix("/run/iamproxy/admin.sock"));
    assert_eq!(c.server.socket_mode, 0o660);
    assert_eq!(
        c.server.listen.to_string(),
        "unix:/run/iamproxy/iamproxy.sock"
    );
}

#[test]
fn unix_listeners_refuse_tls_one_path_twice_and_paths_no_socket_can_have() {
    let tls =
        "[server.tls]\ncertificate_file = '/nonexistent/c.pem'\nkey_file = '/nonexistent/k.pem'\n";
    let text = format!("{tls}{MINIMAL}[server]\nlisten = \"unix:/run/iamproxy.sock\"\n");
    assert_eq!(
        err(&text),
        "server.tls: is not served on a unix: listener (server.listen): terminate TLS in front \
         of the socket, e.g. in nginx"
    );
    let same = "[server]\nlisten = \"unix:/run/a.sock\"\nadmin_listen = \"unix:/run/a.sock\"\n";
    assert_eq!(
        err(&format!("{same}{MINIMAL}")),
        "server.admin_listen: must differ from server.listen"
    );
    let listen = |value: &str| err(&set(MINIMAL, "server", "listen", &format!("{value:?}")));
    assert_eq!(
        listen("unix:"),
        "server.listen: unix: needs the socket file's path, e.g. unix:/run/iamproxy/iamproxy.sock"
    );
    assert_eq!(
        listen("unix:/run/a:b.sock"),
        "server.listen: a socket path cannot hold \":\""
    );
    let long = format!("unix:/{}", "x".repeat(107));
    assert_eq!(
        listen(&long),
        "server.listen: the socket path is 108 bytes, more than the 107 a Unix socket can have"
    );
}

#[test]
fn socket_mode_is_octal_permission_bits() {
    for (text, mode) in [("0666", 0o666), ("660", 0o660), ("0", 0), ("0777", 0o777)] {
        let c = Config::from_toml(&set(MINIMAL, "server", "socket_mode", &format!("{text:?}")));
        assert_eq!(c.unwrap().server.socket_mode, mode, "{text}");
    }
    for bad in ["", "999", "0x1ff", "+660", "1777", "07777", "rw-rw----"] {
        assert_eq!(
            err(&set(MINIMAL, "server", "socket_mode", &format!("{bad:?}"))),
            format!("server.socket_mode: {bad:?} is not an octal file mode such as \"0660\""),
        );
    }
    let number = err(&set(MINIMAL, "server", "socket_mode", "660"));
    assert_eq!(
        number,
        "server.socket_mode: invalid type: integer `660`, expected a string"
    );
}

#[test]
fn upstreams_may_be_unix_sockets_and_get_localhost_unless_told_otherwise() {
    let secret = secret_file(32);
    let text = format!(
        r#"
        [rails]
        url = "unix:/var/opt/gitlab/gitlab-workhorse/sockets/socket"
        [iam]
        url = "unix:/run/iam/iam.sock"
        host = "iam.internal:9000"
        [preauthorize]
        url = "unix:/var/opt/gitlab/gitlab-rails/sockets/gitlab.socket:/-/oauth/iam_routing"
        host = "gitlab.internal"
        secret_file = '{}'
        "#,
        secret.path()
    );
    let c = Config::from_toml(&text).unwrap();
    let socket = |address: &UpstreamAddress| match address {
        UpstreamAddress::Unix(path) => path.clone(),
        other => panic!("not a socket: {other}"),
    };
    assert_eq!(
        socket(&c.rails.url.address),
        Path::new("/var/opt/gitlab/gitlab-workhorse/sockets/socket")
    );
    assert_eq!(c.rails.url.host, "localhost", "for a client without Host");
    let iam = c.iam.unwrap();
    assert_eq!(socket(&iam.url.address), Path::new("/run/iam/iam.sock"));
    assert_eq!(iam.url.host, "iam.internal:9000");
    let pre = c.preauthorize.unwrap();
    assert_eq!(
        pre.upstream.address.to_string(),
        "unix:/var/opt/gitlab/gitlab-rails/sockets/gitlab.socket"
    );
    assert_eq!(pre.path, "/-/oauth/iam_routing");
    assert_eq!(pre.upstream.host, "gitlab.internal");

    let plain = with_iam(secret.path(), "").replace("http://127.0.0.1:9000", "unix:/run/iam.sock");
    assert_eq!(
        Config::from_toml(&plain).unwrap().iam.unwrap().url.host,
        "localhost"
    );
}

#[test]
fn unix_upstream_urls_refuse_paths_queries_and_ca_files() {
    let rails = |url: &str| err(&format!("[rails]\nurl = \"{url}\"\n"));
    assert_eq!(
        rails("unix:/run/rails.sock:/api"),
        "rails.url: must not have a path"
    );
    assert_eq!(
        rails("unix:"),
        "rails.url: unix: needs the socket file's path, e.g. unix:/run/iamproxy/iamproxy.sock"
    );
    let with_ca = "[rails]\nurl = \"unix:/run/rails.sock\"\nca_file = \"/x.pem\"\n";
    assert_eq!(
        err(with_ca),
        "rails.ca_file: is only used with an https URL"
    );

    let secret = secret_file(32);
    let pre = |url: &str| {
        err(&with_iam(secret.path(), "").replace("http://127.0.0.1:8080/-/oauth/iam_routing", url))
    };
    assert_eq!(
        pre("unix:/run/rails.sock:/-/oauth/iam_routing?x=1"),
        "preauthorize.url: must not have a query or fragment"
    );
    assert_eq!(
        pre("unix:/run/rails.sock:-/oauth/iam_routing"),
        "preauthorize.url: after the socket path come \":\" and a request path, e.g. \
         unix:/run/gitlab/gitlab.socket:/-/oauth/iam_routing"
    );
    for bad in ["a b", "user@iam", ""] {
        let text =
            with_iam(secret.path(), "").replace("[iam]\n", &format!("[iam]\nhost = {bad:?}\n"));
        assert_eq!(
            err(&text),
            format!("iam.host: {bad:?} is not a host or host:port"),
            "{bad}"
        );
    }
}

/// The README's Deploying examples are valid configurations: the Omnibus one as written,
/// the container one with its variables set.
#[test]
fn readme_deploying_examples_are_valid() {
    let readme = include_str!("../../../README.md");
    let example = |heading: &str| -> String {
        let section = readme.split_once(heading).expect(heading).1;
        let block = section.split_once("```toml\n").expect("a toml block").1;
        block.split_once("```").expect("closed").0.to_owned()
    };
    let secret = secret_file(32);
    let omnibus = example("### In front of Omnibus over Unix sockets").replace(
        "/var/opt/gitlab/gitlab-rails/etc/gitlab_workhorse_secret",
        secret.path(),
    );
    let c = Config::from_toml(&omnibus).unwrap();
    assert_eq!(
        c.server.listen,
        unix("/var/opt/gitlab/iamproxy/iamproxy.sock")
    );
    assert_eq!(c.server.socket_mode, 0o660);

    let container = example("### A container with environment variables").replace(
        "/etc/gitlab-secrets/workhorse/.gitlab_workhorse_secret",
        secret.path(),
    );
    let env = |name: &str| match name {
        "RAILS_URL" => Some("http://webservice:8080".into()),
        "IAM_SERVICE_URL" => Some("http://iam-auth:9000".into()),
        _ => None,
    };
    let c = Config::from_toml_in(&container, &env).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8181");
    assert_eq!(c.preauthorize.unwrap().path, "/-/oauth/iam_routing");
    let iam = c.iam.unwrap();
    assert_eq!(iam.url.host, "iam-auth:9000");
    let svc: Vec<_> = iam.url.headers.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(svc, ["iam-auth-http"]);
    let unset = Config::from_toml_in(&container, &|_| None).unwrap_err();
    assert_eq!(
        unset.to_string(),
        "iam.url: environment variable IAM_SERVICE_URL is not set (\"${IAM_SERVICE_URL:-default}\" gives it a default)"
    );
}

/// The example's commented-out `host` keys and `headers` tables are valid once uncommented.
#[test]
fn example_config_commented_hosts_and_headers_are_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/iamproxy.example.toml");
    let example = std::fs::read_to_string(path).unwrap();
    let secret = secret_file(32);
    let mut uncomment_next = false;
    let mut uncommented = 0;
    let text: Vec<String> = example
        .lines()
        .map(|line| {
            let header = line.starts_with("# [") && line.ends_with(".headers]");
            if header || uncomment_next || line.starts_with("# host = ") {
                uncomment_next = header;
                uncommented += 1;
                line[2..].to_owned()
            } else if line.starts_with("secret_file = ") {
                format!("secret_file = '{}'", secret.path())
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(uncommented, 8, "two hosts, three tables of one header each");
    let c = Config::from_toml(&text.join("\n")).unwrap();
    assert_eq!(c.iam.unwrap().url.headers.iter().count(), 1);
    assert_eq!(c.preauthorize.unwrap().upstream.host, "gitlab.example.com");
    assert_eq!(c.rails.url.headers.iter().count(), 1);
}
