//! The value types of the configuration: durations, networks, upstream URLs, and the
//! secrets (the Workhorse secret, the admin token), which never print themselves.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use rustls::ClientConfig;

/// The bearer token the admin API asks for. Redacted in `Debug`, like [`Secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub(super) String);

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

/// An upstream to forward to: where its connections go, the `Host` it gets when the
/// client's is not kept, and the headers it always gets.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub address: UpstreamAddress,
    /// The URL's authority as written, so it matches what the operator configured;
    /// `localhost` for a Unix socket; or the upstream's `host` key.
    pub host: HeaderValue,
    /// What the upstream's certificate must chain to; unused but for `https`.
    pub tls: Arc<ClientConfig>,
    /// Set on every request to this upstream.
    pub headers: StaticHeaders,
}

/// Where an upstream's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddress {
    /// `http://authority/` or `https://authority/`: the host is resolved at each connect;
    /// a missing port means 80 (443 for https).
    Url(Uri),
    /// `unix:/path`: cleartext HTTP/1.1 on a Unix socket, as Omnibus runs Puma.
    Unix(PathBuf),
}

impl fmt::Display for UpstreamAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddress::Url(uri) => write!(f, "{uri}"),
            UpstreamAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where a listener listens: an IP address and port, or a Unix socket file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The longest path a Unix socket can be bound to: `sun_path` holds 108 bytes, the last
/// a NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The socket file of `unix:/path` (and, after a second `:`, what follows it, for a URL
/// that carries a request path); `None` when `text` is no `unix:` address. The socket
/// path ends at the first `:`, so it cannot hold one.
pub fn unix_address(text: &str) -> Option<Result<(PathBuf, Option<&str>), String>> {
    let rest = text.strip_prefix("unix:")?;
    let (socket, after) = match rest.split_once(':') {
        Some((socket, after)) => (socket, Some(after)),
        None => (rest, None),
    };
    Some(if socket.is_empty() {
        Err("unix: needs the socket file's path, e.g. unix:/run/iamproxy/iamproxy.sock".into())
    } else if socket.len() > MAX_SOCKET_PATH_BYTES {
        Err(format!(
            "the socket path is {} bytes, more than the {MAX_SOCKET_PATH_BYTES} a Unix socket can have",
            socket.len()
        ))
    } else {
        Ok((PathBuf::from(socket), after))
    })
}

/// Headers set on every request to one upstream (`[iam.headers]`, …), replacing a
/// client's of the same name: checked and made once per configuration, never parsed per
/// request. Their values may be credentials, so `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StaticHeaders(Arc<[(HeaderName, HeaderValue)]>);

impl StaticHeaders {
    pub(super) fn new(headers: Vec<(HeaderName, HeaderValue)>) -> StaticHeaders {
        StaticHeaders(headers.into())
    }

    /// Sets each header in `headers`, replacing whatever value of that name is there.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in self.0.iter() {
            headers.insert(name.clone(), value.clone());
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.0.iter()
    }
}

impl fmt::Debug for StaticHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
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

/// What a duration may look like, for the error that refuses one.
const DURATION_FORMS: &str =
    "an integer and a unit, us, ms, s, m or h, without spaces: \"500ms\", \"60s\", \"2m\"";

/// "500ms", "60s", "2m", "1h", "250us", "0s": an unsigned integer and a unit, no spaces.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: {DURATION_FORMS}");
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

#[cfg(test)]
mod tests {
    use super::*;

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
                Err(format!(
                    "invalid duration {bad:?}: an integer and a unit, us, ms, s, m or h, \
                     without spaces: \"500ms\", \"60s\", \"2m\""
                ))
            );
        }
    }

    #[test]
    fn secret_debug_does_not_print_bytes() {
        let secret = Secret::from_base64(&STANDARD.encode([0xab; 32])).unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert!(!format!("{secret:#?}").contains("171"));
    }
}
