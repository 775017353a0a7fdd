//! Header hygiene shared by both directions: hop-by-hop removal, gateway-only headers,
//! forwarding headers and correlation ids.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Request-Id`: the correlation id sent upstream, to the pre-authorize backend and back
/// to the client.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// legacy `Proxy-Connection`. `Proxy-*` are matched by prefix in [`is_hop_by_hop`].
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str().starts_with("proxy-")
}

/// What one look at a message's header names found: which of the rules below have work
/// to do. Most messages carry none of the headers they remove, so a request pays for one
/// pass over its names rather than a lookup (a hash of the name) per rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Names {
    /// A name with `_` ([`remove_underscored`]).
    pub underscored: bool,
    /// `Connection` and no other hop-by-hop header ([`remove_hop_by_hop`]).
    pub connection: bool,
    /// A hop-by-hop header other than `Connection`.
    pub hop_by_hop: bool,
    /// `Gitlab-Workhorse*` ([`remove_gateway_only`]).
    pub gateway_only: bool,
    /// `Forwarded`, `X-Forwarded-Host`, `-Port`, `-Ssl` or `-Scheme`
    /// ([`remove_peer_forwarding`]).
    pub peer_forwarding: bool,
    pub expect: bool,
    pub content_length: bool,
    pub host: bool,
    pub forwarded_for: bool,
    pub forwarded_proto: bool,
    pub request_id: bool,
    /// `traceparent` and `tracestate` (see [`crate::observe::trace`]).
    pub traceparent: bool,
    pub tracestate: bool,
}

impl Names {
    /// Looks at every distinct name once: by its length first, so a name that is none of
    /// these costs a comparison or two, not one per rule.
    pub fn of(headers: &HeaderMap) -> Names {
        let mut found = Names::default();
        for name in headers.keys() {
            let name = name.as_str().as_bytes();
            let known = match name.len() {
                2 => name == b"te" && set(&mut found.hop_by_hop),
                4 => name == b"host" && set(&mut found.host),
                6 => name == b"expect" && set(&mut found.expect),
                7 => (name == b"trailer" || name == b"upgrade") && set(&mut found.hop_by_hop),
                9 => name == b"forwarded" && set(&mut found.peer_forwarding),
                11 => name == b"traceparent" && set(&mut found.traceparent),
                10 => match name {
                    b"connection" => set(&mut found.connection),
                    b"keep-alive" => set(&mut found.hop_by_hop),
                    b"tracestate" => set(&mut found.tracestate),
                    _ => false,
                },
                12 => name == b"x-request-id" && set(&mut found.request_id),
                14 => name == b"content-length" && set(&mut found.content_length),
                15 => match name {
                    b"x-forwarded-for" => set(&mut found.forwarded_for),
                    b"x-forwarded-ssl" => set(&mut found.peer_forwarding),
                    _ => false,
                },
                16 => {
                    (name == b"x-forwarded-host" || name == b"x-forwarded-port")
                        && set(&mut found.peer_forwarding)
                }
                17 => match name {
                    b"transfer-encoding" => set(&mut found.hop_by_hop),
                    b"x-forwarded-proto" => set(&mut found.forwarded_proto),
                    _ => false,
                },
                18 => name == b"x-forwarded-scheme" && set(&mut found.peer_forwarding),
                _ => false,
            };
            if !known {
                match name.first() {
                    Some(b'p') => found.hop_by_hop |= name.starts_with(b"proxy-"),
                    Some(b'g') => found.gateway_only |= name.starts_with(b"gitlab-workhorse"),
                    _ => {}
                }
                found.underscored |= name.contains(&b'_');
            }
        }
        found
    }
}

/// Sets `flag`; true, so a match arm can say "this name, and it is known".
fn set(flag: &mut bool) -> bool {
    *flag = true;
    true
}

/// The options of every `Connection` header, trimmed (`close`, `upgrade`, header names).
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let names = Names::of(headers);
    if names.connection || names.hop_by_hop {
        remove_hop_by_hop_found(headers, names);
    }
}

/// [`remove_hop_by_hop`], for a message whose names were looked at already.
pub fn remove_hop_by_hop_found(headers: &mut HeaderMap, names: Names) {
    if names.connection && !names.hop_by_hop && only_connection_options(headers) {
        // The usual case, `Connection: keep-alive` (or `close`): it names nothing else.
        headers.remove(header::CONNECTION);
        return;
    }
    if names.connection {
        // Collect the names first: `Connection` may name headers we are about to remove.
        // `keep-alive` and `close`, the usual options, name nothing left to remove.
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|token| {
                !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    remove_matching(headers, is_hop_by_hop);
}

/// Whether every `Connection` option is `keep-alive` or `close`, which name no header.
fn only_connection_options(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().all(|value| {
        let value = value.as_bytes();
        value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
    })
}

/// Removes every header whose name `matches`. Most messages carry none of the headers
/// this is asked to remove: it looks before it collects.
fn remove_matching(headers: &mut HeaderMap, matches: impl Fn(&HeaderName) -> bool) {
    if !headers.keys().any(&matches) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| matches(name))
        .cloned()
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

/// Removes headers whose names contain `_`, as nginx does by default
/// (`underscores_in_headers off`). Rack, like CGI, files `Gitlab_Workhorse` and
/// `Gitlab-Workhorse` under the same `HTTP_GITLAB_WORKHORSE` key, so an underscored name
/// would pass every rule below that matches the dashed one. Runs before anything reads a
/// header.
pub fn remove_underscored(headers: &mut HeaderMap) {
    remove_matching(headers, |name| name.as_str().as_bytes().contains(&b'_'));
}

/// Removes headers only the gateway may set (`Gitlab-Workhorse*`): a client must not be
/// able to impersonate the gateway towards Rails.
pub fn remove_gateway_only(headers: &mut HeaderMap) {
    remove_matching(headers, |name| {
        name.as_str().starts_with("gitlab-workhorse")
    });
}

/// Why `name` cannot be one of an upstream's static headers (`[iam.headers]`, …), or
/// `None` when it can: hop-by-hop headers describe one connection and are removed,
/// `Host` has its own rule (the client's for Rails; `iam.host`, `preauthorize.host`),
/// `Content-Length` is the body's framing, and `Gitlab-Workhorse*` is the gateway's
/// signature towards Rails.
pub fn refuse_static(name: &HeaderName) -> Option<&'static str> {
    if is_hop_by_hop(name) {
        Some("is a hop-by-hop header, which describes one connection")
    } else if *name == header::HOST {
        Some("Host is the client's for Rails; set iam.host or preauthorize.host instead")
    } else if *name == header::CONTENT_LENGTH {
        Some("Content-Length is the body's length")
    } else if name.as_str().starts_with("gitlab-workhorse") {
        Some("Gitlab-Workhorse headers are the gateway's own")
    } else {
        None
    }
}

/// Forwarding headers other than `X-Forwarded-For` and `-Proto` that Rack reads to work
/// out the scheme, host and port of the request (`Forwarded` and `X-Forwarded-Scheme` /
/// `-Ssl` before `X-Forwarded-Proto`).
fn is_peer_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "forwarded"
        || name
            .strip_prefix("x-forwarded-")
            .is_some_and(|rest| matches!(rest, "host" | "port" | "ssl" | "scheme"))
}

/// Removes `Forwarded`, `X-Forwarded-Host`, `-Port`, `-Ssl` and `-Scheme`, for a peer
/// outside `server.trusted_cidrs`: they would let it choose the scheme and host Rails
/// builds its redirect and callback URLs from.
pub fn remove_peer_forwarding(headers: &mut HeaderMap) {
    remove_matching(headers, is_peer_forwarding);
}

/// Rewrites a client's `Content-Length` as `decoded`, the length hyper framed the body by
/// (it accepts `005`, and a second line of the same value, and leaves the header as it
/// came); removes it when the body's length is not known from it. A request without one is
/// left alone.
pub fn set_content_length(headers: &mut HeaderMap, decoded: Option<u64>) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    // The common case, already canonical: one line of digits without a leading zero.
    let bytes = first.as_bytes();
    let canonical = values.next().is_none()
        && (bytes == b"0" || bytes.first().is_some_and(|b| *b != b'0'))
        && bytes.iter().all(u8::is_ascii_digit)
        && decoded.is_some_and(|n| first.to_str().ok().and_then(|v| v.parse().ok()) == Some(n));
    if canonical {
        return;
    }
    match decoded {
        Some(length) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// The client's `Host`, left in `headers` when it sent exactly one; more than one leaves
/// only the first. Whether it is in `headers`.
pub fn single_host(headers: &mut HeaderMap) -> (Option<HeaderValue>, bool) {
    let mut values = headers.get_all(header::HOST).iter();
    let first = values.next().cloned();
    if values.next().is_some() {
        if let Some(first) = &first {
            headers.insert(header::HOST, first.clone());
        }
    }
    let present = first.is_some();
    (first, present)
}

/// An IP address as header text, for [`set_forwarded_for`]: made once per connection.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    // An IP address is always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        .unwrap_or(HeaderValue::from_static("unknown"))
}

/// Sets `X-Forwarded-For` to the client's chain plus the peer (`peer`, from [`ip_value`]).
/// The client's own chain is kept only when the peer is trusted; otherwise it could forge
/// any origin address.
pub fn set_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue, keep_client_chain: bool) {
    if !keep_client_chain || !headers.contains_key(&X_FORWARDED_FOR) {
        // The common case: the peer alone, a reference count.
        headers.insert(X_FORWARDED_FOR.clone(), peer.clone());
        return;
    }
    // A trusted peer's chain, then the peer.
    let chain: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let mut value = chain.join(", ");
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(peer.to_str().unwrap_or_default());
    // An IP address and ASCII header values joined with ", " are always valid.
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

/// `X-Forwarded-Proto`: the scheme the client used with us. A trusted peer (a load
/// balancer that terminated TLS) knows better, and its `http` or `https` is kept.
pub fn set_forwarded_proto(headers: &mut HeaderMap, https: bool, trusted_peer: bool) {
    let forwarded = trusted_peer
        .then(|| headers.get(&X_FORWARDED_PROTO))
        .flatten()
        .filter(|v| matches!(v.as_bytes(), b"http" | b"https"))
        .cloned();
    let ours = HeaderValue::from_static(if https { "https" } else { "http" });
    headers.insert(X_FORWARDED_PROTO.clone(), forwarded.unwrap_or(ours));
}

/// Generates correlation ids: a random per-process prefix and a counter, so ids are
/// unique without a syscall or a lock per request.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> RequestIds {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS; hashing the time mixes in this process's start.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        RequestIds {
            prefix: hasher.finish(),
            counter: AtomicU64::new(0),
        }
    }

    /// 32 lower-case hex digits: the prefix, then the counter. Each thread takes
    /// [`ID_BATCH`] counters at a time and writes their ids into one buffer, so an id
    /// costs a slice of it rather than an allocation of its own.
    pub fn next(&self) -> HeaderValue {
        thread_local! {
            static BATCH: std::cell::RefCell<Batch> = std::cell::RefCell::default();
        }
        let id = BATCH.with_borrow_mut(|batch| {
            if batch.prefix != self.prefix || batch.next == ID_BATCH {
                *batch = Batch::new(
                    self.prefix,
                    self.counter.fetch_add(ID_BATCH as u64, Ordering::Relaxed),
                );
            }
            let at = batch.next * ID_LEN;
            batch.next += 1;
            batch.ids.slice(at..at + ID_LEN)
        });
        // Hex digits are always a valid header value.
        HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("0"))
    }
}

/// Ids a thread writes at once; see [`RequestIds::next`].
const ID_BATCH: usize = 64;
const ID_LEN: usize = 32;

/// One thread's written ids, and which is next.
struct Batch {
    prefix: u64,
    ids: Bytes,
    next: usize,
}

impl Default for Batch {
    /// Used up: the first id a thread asks for writes a batch.
    fn default() -> Batch {
        Batch {
            prefix: 0,
            ids: Bytes::new(),
            next: ID_BATCH,
        }
    }
}

impl Batch {
    /// The ids of counters `first` .. `first + ID_BATCH`.
    fn new(prefix: u64, first: u64) -> Batch {
        let mut ids = vec![0u8; ID_BATCH * ID_LEN];
        for (n, id) in (first..).zip(ids.chunks_exact_mut(ID_LEN)) {
            write_hex(&mut id[..16], &prefix.to_be_bytes());
            write_hex(&mut id[16..], &n.to_be_bytes());
        }
        Batch {
            prefix,
            ids: Bytes::from(ids),
            next: 0,
        }
    }
}

/// The two lower-case hex digits of every byte: request ids and `traceparent`s are
/// written per request, so a byte costs one lookup.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    pairs
};

/// `bytes` in hex into `out`, which is twice as long.
pub fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::new()
    }
}

/// Whether a client-supplied `X-Request-Id` is usable as a correlation id: short and
/// plain, so it cannot smuggle anything into logs.
pub fn is_acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn removes_all_hop_headers_case_insensitively() {
        let mut headers = map(&[
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic abc"),
            ("Proxy-Connection", "close"),
            ("TE", "trailers"),
            ("Trailer", "Expires"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
    }

    #[test]
    fn names_say_which_rules_have_work_and_nothing_else() {
        let plain = map(&[
            ("Host", "h"),
            ("Accept", "*/*"),
            ("Content-Type", "text/plain"),
        ]);
        assert_eq!(
            Names::of(&plain),
            Names {
                host: true,
                ..Names::default()
            }
        );
        let every = map(&[
            ("X_Odd", "1"),
            ("Connection", "keep-alive"),
            ("Proxy-Authorization", "x"),
            ("Gitlab-Workhorse-Api-Request", "x"),
            ("X-Forwarded-Ssl", "on"),
            ("Expect", "100-continue"),
            ("Content-Length", "1"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-Request-Id", "abc"),
            (
                "Traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("Tracestate", "vendor=1"),
        ]);
        let all = Names {
            underscored: true,
            connection: true,
            hop_by_hop: true,
            gateway_only: true,
            peer_forwarding: true,
            expect: true,
            content_length: true,
            host: false,
            forwarded_for: true,
            forwarded_proto: true,
            request_id: true,
            traceparent: true,
            tracestate: true,
        };
        assert_eq!(Names::of(&every), all);
        for hop in [
            "Keep-Alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
        ] {
            let names = Names::of(&map(&[(hop, "x")]));
            assert!(names.hop_by_hop && !names.connection, "{hop}");
        }
    }

    #[test]
    fn connection_keep_alive_alone_is_removed_and_nothing_else() {
        for value in ["keep-alive", "Keep-Alive", "close"] {
            let mut headers = map(&[("Connection", value), ("Accept", "*/*")]);
            remove_hop_by_hop(&mut headers);
            let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["accept"], "{value}");
        }
    }

    #[test]
    fn connection_naming_an_end_to_end_header_removes_it() {
        let mut headers = map(&[("Connection", "close, Cookie"), ("Cookie", "a=b")]);
        remove_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn strips_every_gitlab_workhorse_header() {
        let mut headers = map(&[
            ("Gitlab-Workhorse", "forged"),
            ("Gitlab-Workhorse-Api-Request", "forged.jwt"),
            ("GITLAB-WORKHORSE-PROXY-START", "1"),
            ("Gitlab-Shell-Api-Request", "kept"),
        ]);
        remove_gateway_only(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["gitlab-shell-api-request"]);
    }

    #[test]
    fn underscored_names_are_removed_whatever_they_spell() {
        let mut headers = map(&[
            ("Gitlab_Workhorse", "forged"),
            ("Gitlab_Workhorse_Api_Request", "forged.jwt"),
            ("X_Forwarded_Proto", "https"),
            ("x-forwarded-for_", "6.6.6.6"),
            ("Gitlab-Shell-Api-Request", "kept"),
            ("Accept", "*/*"),
        ]);
        remove_underscored(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "gitlab-shell-api-request"]);
    }

    #[test]
    fn static_headers_may_not_be_hop_by_hop_host_length_or_the_gateways_own() {
        for refused in [
            "connection",
            "keep-alive",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "host",
            "content-length",
            "gitlab-workhorse",
            "gitlab-workhorse-api-request",
        ] {
            let name = HeaderName::from_static(refused);
            assert!(refuse_static(&name).is_some(), "{refused}");
        }
        for allowed in [
            "x-gitlab-svc",
            "authorization",
            "x-forwarded-proto",
            "gitlab-shell",
        ] {
            assert_eq!(
                refuse_static(&HeaderName::from_static(allowed)),
                None,
                "{allowed}"
            );
        }
    }

    #[test]
    fn peer_forwarding_headers_are_removed_and_for_and_proto_left_to_their_rules() {
        let mut headers = map(&[
            ("Forwarded", "for=6.6.6.6;proto=https;host=evil.example"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Port", "443"),
            ("X-Forwarded-Ssl", "on"),
            ("X-Forwarded-Scheme", "https"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Prefix", "/kept"),
            ("Host", "gitlab.example.com"),
        ]);
        remove_peer_forwarding(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            vec![
                "host",
                "x-forwarded-for",
                "x-forwarded-prefix",
                "x-forwarded-proto"
            ]
        );
    }

    #[test]
    fn content_length_is_rewritten_as_the_decoded_length() {
        let length = |lines: &[&str], decoded: Option<u64>| {
            let pairs: Vec<_> = lines.iter().map(|v| ("Content-Length", *v)).collect();
            let mut headers = map(&pairs);
            set_content_length(&mut headers, decoded);
            headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(length(&["005"], Some(5)), ["5"]);
        assert_eq!(length(&["5, 5"], Some(5)), ["5"]);
        assert_eq!(length(&["5", "05"], Some(5)), ["5"]);
        assert_eq!(length(&["00"], Some(0)), ["0"]);
        assert_eq!(length(&["+5"], Some(5)), ["5"]);
        assert_eq!(length(&["5"], Some(5)), ["5"]);
        assert_eq!(length(&["0"], Some(0)), ["0"]);
        assert_eq!(
            length(&["4"], None),
            Vec::<String>::new(),
            "not framed by it"
        );
        assert_eq!(
            length(&[], Some(0)),
            Vec::<String>::new(),
            "none sent, none added"
        );
    }

    #[test]
    fn forwarded_for_appends_peer_to_trusted_chain() {
        let mut headers = map(&[("X-Forwarded-For", "203.0.113.9")]);
        let peer = ip_value("10.0.0.1".parse().unwrap());
        set_forwarded_for(&mut headers, &peer, true);
        assert_eq!(headers[&X_FORWARDED_FOR], "203.0.113.9, 10.0.0.1");
    }

    #[test]
    fn forwarded_proto_is_ours_unless_a_trusted_peer_says_http_or_https() {
        let proto = |client: &str, https: bool, trusted: bool| {
            let mut headers = map(&[("X-Forwarded-Proto", client)]);
            set_forwarded_proto(&mut headers, https, trusted);
            assert_eq!(headers.get_all(&X_FORWARDED_PROTO).iter().count(), 1);
            headers[&X_FORWARDED_PROTO].to_str().unwrap().to_string()
        };
        assert_eq!(proto("https", false, false), "http");
        assert_eq!(proto("http", true, false), "https");
        assert_eq!(proto("https", false, true), "https");
        assert_eq!(proto("gopher", true, true), "https");
        assert_eq!(proto("gopher", false, true), "http");
    }

    #[test]
    fn forwarded_for_from_untrusted_peer_is_replaced() {
        let mut headers = map(&[
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-For", "5.6.7.8"),
        ]);
        set_forwarded_for(&mut headers, &ip_value("::1".parse().unwrap()), false);
        assert_eq!(headers.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(headers[&X_FORWARDED_FOR], "::1");
    }

    #[test]
    fn request_ids_are_unique_and_acceptable() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(is_acceptable_request_id(&a));
        let (prefix, counter) = a.to_str().unwrap().split_at(16);
        assert_eq!(prefix, format!("{:016x}", ids.prefix));
        assert_eq!(counter, format!("{:016x}", 0));
        assert_eq!(&b.to_str().unwrap()[16..], "0000000000000001");
    }

    #[test]
    fn request_ids_stay_unique_across_threads_batches_and_generators() {
        let ids = std::sync::Arc::new(RequestIds::new());
        let other = std::sync::Arc::new(RequestIds::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (ids, other) = (ids.clone(), other.clone());
                std::thread::spawn(move || {
                    // Alternating generators on one thread, past several batches each.
                    (0..3 * ID_BATCH)
                        .flat_map(|_| [ids.next(), other.next()])
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<HeaderValue> = threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
        assert_eq!(all.len(), 4 * 3 * ID_BATCH * 2);
        for id in &all {
            assert_eq!(id.len(), 32);
            let prefix = &id.to_str().unwrap()[..16];
            assert!(
                prefix == format!("{:016x}", ids.prefix)
                    || prefix == format!("{:016x}", other.prefix)
            );
        }
    }

    #[test]
    fn odd_client_request_ids_are_not_acceptable() {
        for bad in ["", "has space", "quote\"", &"x".repeat(129)] {
            let value = HeaderValue::from_str(bad).unwrap();
            assert!(!is_acceptable_request_id(&value), "{bad:?}");
        }
        assert!(is_acceptable_request_id(&HeaderValue::from_static(
            "01HZX3-abc_def.1:2"
        )));
    }
}
