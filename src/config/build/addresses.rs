//! Where the gateway listens and where it forwards: listener addresses (an IP address and
//! port, or `unix:/path`), the socket file's mode, and upstream URLs (`http`, `https` or
//! `unix:`) with their CA files, their `Host` and their static headers.

use std::path::Path;
use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::Uri;
use rustls::ClientConfig;

use super::{default, required};
use crate::config::raw::RawHeaders;
use crate::config::values::{
    unix_address, ListenAddr, StaticHeaders, UpstreamAddress, UpstreamUrl,
};
use crate::config::{invalid, ConfigError};
use crate::forward::headers;
use crate::server::tls;

/// `server.listen` or `server.admin_listen`.
pub(in crate::config) fn listen_addr(
    key: &'static str,
    raw: Option<String>,
) -> Result<ListenAddr, ConfigError> {
    let text = raw.as_deref().unwrap_or(default(key));
    if let Some(unix) = unix_address(text) {
        return match unix.map_err(|reason| invalid(key, reason))? {
            (path, None) => Ok(ListenAddr::Unix(path)),
            (_, Some(_)) => Err(invalid(key, "a socket path cannot hold \":\"")),
        };
    }
    text.parse().map(ListenAddr::Tcp).map_err(|_| {
        let reason = format!(
            "{text:?} is neither an IP address and port (\"127.0.0.1:8181\", \"[::]:8181\") \
             nor unix:/path/to.sock"
        );
        invalid(key, reason)
    })
}

/// `server.socket_mode`: octal permission bits, as chmod(1) takes them.
pub(in crate::config) fn socket_mode(raw: Option<String>) -> Result<u32, ConfigError> {
    const KEY: &str = "server.socket_mode";
    let text = raw.as_deref().unwrap_or(default(KEY));
    let octal =
        !text.is_empty() && text.len() <= 4 && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    octal
        .then(|| u32::from_str_radix(text, 8).ok())
        .flatten()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            invalid(
                KEY,
                format!("{text:?} is not an octal file mode such as \"0660\""),
            )
        })
}

/// Rails' or IAM's `url` (an origin: no path, no query), its `ca_file`, an optional
/// `host` key and its `[….headers]`.
pub(in crate::config) fn upstream(
    (key, raw): (&str, Option<String>),
    (ca_key, ca_file): (&'static str, Option<String>),
    host: Option<(&str, Option<String>)>,
    headers: StaticHeaders,
) -> Result<UpstreamUrl, ConfigError> {
    let (upstream, path) = upstream_with_path((key, raw), (ca_key, ca_file), host, headers)?;
    if path != "/" {
        return Err(invalid(key, "must not have a path"));
    }
    Ok(upstream)
}

/// An upstream whose URL may carry a request path (the pre-authorize endpoint's):
/// `http(s)://host:port/path`, or `unix:/path/to.sock:/path`. Returns the path too, `/`
/// when there is none.
pub(in crate::config) fn upstream_with_path(
    (key, raw): (&str, Option<String>),
    (ca_key, ca_file): (&'static str, Option<String>),
    host: Option<(&str, Option<String>)>,
    headers: StaticHeaders,
) -> Result<(UpstreamUrl, String), ConfigError> {
    let text = required(key, raw)?;
    let (address, path, url_host) = match unix_address(&text) {
        Some(unix) => {
            let (socket, path) = unix.map_err(|reason| invalid(key, reason))?;
            let path = match path {
                None => "/".to_owned(),
                Some(path) => request_path(key, path)?,
            };
            // A socket has no host name; the upstream routes by path.
            let host = HeaderValue::from_static("localhost");
            (UpstreamAddress::Unix(socket), path, host)
        }
        None => {
            let uri = http_uri(key, &text)?;
            let authority = uri
                .authority()
                .cloned()
                .ok_or_else(|| invalid(key, "must have a host"))?;
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|_| invalid(key, "host is not a valid Host header"))?;
            let path = match uri.path() {
                "" => "/".to_owned(),
                path => path.to_owned(),
            };
            let origin = Uri::builder()
                .scheme(uri.scheme().cloned().unwrap_or(Scheme::HTTP))
                .authority(authority)
                .path_and_query("/")
                .build()
                .map_err(|e| invalid(key, e.to_string()))?;
            (UpstreamAddress::Url(origin), path, host)
        }
    };
    let tls = upstream_tls(&address, ca_key, ca_file)?;
    let host = match host {
        Some((host_key, Some(text))) => host_header(host_key, &text)?,
        _ => url_host,
    };
    let upstream = UpstreamUrl {
        address,
        host,
        tls,
        headers,
    };
    Ok((upstream, path))
}

/// The request path after a socket's `:`: origin-form, no query.
fn request_path(key: &str, text: &str) -> Result<String, ConfigError> {
    if text.contains(['?', '#']) {
        return Err(invalid(key, "must not have a query or fragment"));
    }
    match text.parse::<PathAndQuery>() {
        Ok(path) if text.starts_with('/') => Ok(path.path().to_owned()),
        _ => Err(invalid(
            key,
            "after the socket path come \":\" and a request path, e.g. \
             unix:/run/gitlab/gitlab.socket:/-/oauth/iam_routing",
        )),
    }
}

/// `iam.host` or `preauthorize.host`: the `Host` that upstream gets.
fn host_header(key: &str, text: &str) -> Result<HeaderValue, ConfigError> {
    let bad = || invalid(key, format!("{text:?} is not a host or host:port"));
    let authority: Authority = text.parse().map_err(|_| bad())?;
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(bad());
    }
    HeaderValue::from_str(authority.as_str()).map_err(|_| bad())
}

/// An absolute `http` or `https` URL with a host and no query.
fn http_uri(key: &str, text: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = text
        .parse()
        .map_err(|e| invalid(key, format!("invalid URL {text:?}: {e}")))?;
    if uri.scheme() != Some(&Scheme::HTTP) && uri.scheme() != Some(&Scheme::HTTPS) {
        return Err(invalid(
            key,
            "scheme must be http or https, or the URL unix:/path/to.sock",
        ));
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
    address: &UpstreamAddress,
    ca_key: &'static str,
    ca_file: Option<String>,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let https =
        matches!(address, UpstreamAddress::Url(uri) if uri.scheme() == Some(&Scheme::HTTPS));
    if !https {
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

/// `[<upstream>.headers]`: each name and value checked once, here, and refused with its
/// key (`iam.headers."Host"`) when it is not a header, would break the request's framing
/// or routing ([`headers::refuse_static`]), or names one header twice in two cases.
pub(in crate::config) fn static_headers(
    upstream: &str,
    raw: RawHeaders,
) -> Result<StaticHeaders, ConfigError> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for (name, value) in raw.unwrap_or_default() {
        let key = format!("{upstream}.headers.{name:?}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(&key, "is not a valid header name"))?;
        if let Some(reason) = headers::refuse_static(&header) {
            return Err(invalid(key, reason));
        }
        if out.iter().any(|(seen, _)| *seen == header) {
            return Err(invalid(key, "is set twice (header names ignore case)"));
        }
        let value = HeaderValue::from_str(&value).map_err(|_| {
            invalid(
                &key,
                "the value must be printable ASCII (spaces and tabs allowed)",
            )
        })?;
        out.push((header, value));
    }
    Ok(StaticHeaders::new(out))
}
