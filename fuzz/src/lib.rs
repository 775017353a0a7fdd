//! Turns fuzzer bytes into what the gateway's parsers read, deterministically, and checks
//! what must hold whatever they read (DESIGN §2–§4).
#![forbid(unsafe_code)]

use std::time::Duration;

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use iamproxy::classify::identify::{identify, Identity, Source};
use iamproxy::classify::issuer::{continuity, Continuity};
use iamproxy::classify::params::{Found, Parameters, Params, Part, RequestView, Tokens};
use iamproxy::classify::Endpoint;
use iamproxy::config::CacheConfig;
use iamproxy::decision::fleet::Invalidation;
use iamproxy::decision::preauth::parse_answer;
use iamproxy::server::admin::{self, Target};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

const FORM: &str = "application/x-www-form-urlencoded";
const MAX_CLIENT_ID_BYTES: usize = 255;
const TOKEN_PREFIXES: [&str; 2] = ["giat_", "ory_"];
const TOKEN_PARAMS: [&str; 4] = ["code", "refresh_token", "device_code", "token"];

/// A request as identification sees it: method, query, headers and buffered body.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Request {
    /// Byte 0 picks the method (bits 0–1) and the Content-Type (bits 2–4); the rest is
    /// `query NUL authorization NUL body`, where the authorization part holds one header
    /// per line and a missing part is absent. Invalid header values are left out.
    pub fn from_bytes(data: &[u8]) -> Request {
        let Some((&selector, rest)) = data.split_first() else {
            return Request::new(Method::GET);
        };
        let method = match selector & 3 {
            0 => Method::GET,
            1 => Method::POST,
            2 => Method::PUT,
            _ => Method::HEAD,
        };
        let mut request = Request::new(method);
        let content_types: &[&str] = match (selector >> 2) & 7 {
            0 => &[],
            1 => &[FORM],
            2 => &["application/x-www-form-urlencoded; charset=utf-8"],
            3 => &["APPLICATION/X-WWW-FORM-URLENCODED"],
            4 => &["application/json"],
            5 => &[FORM, FORM],
            _ => &["multipart/form-data; boundary=x"],
        };
        for content_type in content_types {
            request
                .headers
                .append(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        let mut parts = rest.splitn(3, |&b| b == 0);
        request.query = parts
            .next()
            .map(|q| String::from_utf8_lossy(q).into_owned());
        for line in parts.next().unwrap_or_default().split(|&b| b == b'\n') {
            request.authorization(line);
        }
        request.body = parts.next().unwrap_or_default().to_vec();
        request
    }

    pub fn new(method: Method) -> Request {
        Request {
            method,
            query: None,
            headers: HeaderMap::new(),
            body: Vec::new(),
        }
    }

    /// Adds an `Authorization` header, unless `value` could never be one.
    pub fn authorization(&mut self, value: &[u8]) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            self.headers.append(AUTHORIZATION, value);
        }
    }

    pub fn view(&self) -> RequestView<'_> {
        RequestView {
            method: &self.method,
            query: self.query.as_deref(),
            headers: &self.headers,
            body: &self.body,
        }
    }

    /// Identifies the client and applies flow continuity for every endpoint. A known client
    /// has an id DESIGN §2 allows; the issuer of its codes and tokens agrees with a plain
    /// `form_urlencoded` reading of the parts a strict reader accepts. The source is
    /// returned for targets that expect one.
    pub fn check(&self) -> Option<Source> {
        let view = self.view();
        let params = Parameters::read(&view, &TOKEN_PREFIXES.map(str::to_owned));
        for endpoint in Endpoint::ALL
            .into_iter()
            .filter(|e| *e != Endpoint::Authorize)
        {
            assert_eq!(
                continuity(endpoint, &params),
                self.reference_issuer(&params)
            );
        }
        let _ = continuity(Endpoint::Authorize, &params);
        let identity = identify(&self.headers, &params);
        if let Some(expected) = self.reference_body_client_id(&params) {
            assert_eq!(identity.client_id(), expected.as_deref(), "{self:?}");
        }
        match identity {
            Identity::Known { client_id, source } => {
                assert!(!client_id.is_empty(), "empty id from {source:?}");
                assert!(
                    client_id.len() <= MAX_CLIENT_ID_BYTES,
                    "long id from {source:?}"
                );
                assert!(
                    client_id.bytes().all(|b| (0x20..=0x7e).contains(&b)),
                    "unprintable id {client_id:?} from {source:?}"
                );
                Some(source)
            }
            Identity::Unknown(_) => None,
        }
    }

    /// Where the form body is the only source (no `Authorization`, an empty query, no
    /// `client_assertion`) and the strict reader accepted it: the client id a plain
    /// `form_urlencoded` reading names, if it names exactly one valid id (`Some(None)`: it
    /// names none, so the client is unknown). `None`: the shortcut does not apply.
    fn reference_body_client_id(&self, params: &Parameters<'_>) -> Option<Option<String>> {
        let simple = self.headers.get(AUTHORIZATION).is_none()
            && self.query.as_deref().unwrap_or_default().is_empty()
            && matches!(params.body, Part::Read(_));
        if !simple {
            return None;
        }
        let pairs: Vec<(String, String)> = form_urlencoded::parse(&self.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if pairs.iter().any(|(k, _)| k == "client_assertion") {
            return None;
        }
        let ids: Vec<&String> = pairs
            .iter()
            .filter(|(k, _)| k == "client_id")
            .map(|(_, v)| v)
            .collect();
        let valid = |id: &str| {
            !id.is_empty()
                && id.len() <= MAX_CLIENT_ID_BYTES
                && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
        };
        Some(match ids[..] {
            [id] if valid(id) => Some(id.clone()),
            _ => None,
        })
    }

    /// The issuer rule read with `form_urlencoded` from each part that the strict reader
    /// accepted: IAM if any token value has an IAM prefix, else Rails if any is non-empty.
    fn reference_issuer(&self, params: &Parameters<'_>) -> Option<Continuity> {
        let query = self.query.as_deref().unwrap_or_default().as_bytes();
        let parts = [
            (params.query.params().is_some(), query),
            (params.body.params().is_some(), &self.body[..]),
        ];
        let values: Vec<String> = parts
            .into_iter()
            .filter(|(read, _)| *read)
            .flat_map(|(_, encoded)| form_urlencoded::parse(encoded))
            .filter(|(name, _)| TOKEN_PARAMS.contains(&name.as_ref()))
            .map(|(_, value)| value.into_owned())
            .collect();
        if values
            .iter()
            .any(|v| TOKEN_PREFIXES.iter().any(|p| v.starts_with(p)))
        {
            Some(Continuity::IamToken)
        } else if values.iter().any(|v| !v.is_empty()) {
            Some(Continuity::RailsToken)
        } else {
            None
        }
    }
}

/// Byte 0 bit 0 clear means status 200, else bytes 0–1 pick any status from 100 to 999;
/// byte 2 is the lifetime cap in seconds (the stale cap is five times it); the rest is
/// `content-type NUL cache-control NUL body`. An Ok answer needs a 200 and a JSON content
/// type, and never outlives the cap.
pub fn check_answer(data: &[u8]) {
    let [low, high, cap, rest @ ..] = data else {
        return;
    };
    let status = if low & 1 == 0 {
        StatusCode::OK
    } else {
        let code = 100 + u16::from_le_bytes([*low, *high]) % 900;
        StatusCode::from_u16(code).expect("100..=999 is a status")
    };
    let max_lifetime = Duration::from_secs(u64::from(*cap));
    let limits = CacheConfig {
        ttl: max_lifetime,
        max_entries: 1,
        stale_if_error: max_lifetime * 5,
    };
    let mut parts = rest.splitn(3, |&b| b == 0);
    let mut headers = HeaderMap::new();
    for name in [CONTENT_TYPE, CACHE_CONTROL] {
        if let Some(Ok(value)) = parts.next().map(HeaderValue::from_bytes) {
            headers.append(name, value);
        }
    }
    let body = parts.next().unwrap_or_default();
    if let Ok(answer) = parse_answer(status, &headers, body, &limits) {
        assert_eq!(status, StatusCode::OK);
        let content_type = headers[CONTENT_TYPE]
            .to_str()
            .expect("accepted, so readable");
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        assert!(
            ["application/json", "application/vnd.gitlab-workhorse+json"]
                .iter()
                .any(|accepted| media_type.eq_ignore_ascii_case(accepted)),
            "accepted {content_type:?}"
        );
        assert!(answer.lifetime <= limits.ttl);
        assert!(answer.stale_if_error <= limits.stale_if_error);
    }
}

/// Whether `encoded` has a `%` that two hex digits do not follow.
fn has_bad_escape(encoded: &[u8]) -> bool {
    encoded.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !encoded
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    })
}

/// The strict reader refuses exactly the inputs with a bad escape; on the others it agrees
/// with `form_urlencoded` on the `client_id` values and on who issued the codes and tokens.
pub fn check_params(data: &[u8]) {
    let prefixes = TOKEN_PREFIXES.map(str::to_owned);
    let read = Params::read(data, &prefixes);
    assert_eq!(read.is_err(), has_bad_escape(data), "{data:?}");
    let Ok(params) = read else { return };
    let pairs: Vec<(String, String)> = form_urlencoded::parse(data)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let ids: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "client_id")
        .map(|(_, v)| v.as_str())
        .collect();
    let found = match &params.client_id {
        Found::Absent => vec![],
        Found::One(id) => vec![id.as_ref()],
        Found::Repeated => {
            assert!(ids.len() > 1, "{data:?}");
            return;
        }
    };
    assert_eq!(found, ids, "{data:?}");
    let tokens = pairs
        .iter()
        .filter(|(k, _)| TOKEN_PARAMS.contains(&k.as_str()))
        .map(|(_, v)| {
            if v.is_empty() {
                Tokens::None
            } else if TOKEN_PREFIXES.iter().any(|p| v.starts_with(p)) {
                Tokens::Iam
            } else {
                Tokens::Rails
            }
        })
        .max()
        .unwrap_or_default();
    assert_eq!(params.tokens, tokens, "{data:?}");
}

/// Any path names every decision, one client, a bad id or nothing; a client id read from it
/// is non-empty and reads back the same once encoded again.
pub fn check_admin_path(data: &[u8]) {
    let path = String::from_utf8_lossy(data);
    for path in [path.to_string(), format!("/-/admin/decisions/{path}")] {
        if let Target::One(id) = admin::target(&path) {
            assert!(!id.is_empty());
            let again = format!(
                "/-/admin/decisions/{}",
                utf8_percent_encode(&id, NON_ALPHANUMERIC)
            );
            assert_eq!(admin::target(&again), Target::One(id), "{path:?}");
        }
    }
}

/// Any payload is an invalidation or ignored; one that is read survives `to_json`.
pub fn check_invalidation(data: &[u8]) {
    if let Some(invalidation) = Invalidation::parse(data) {
        let again = Invalidation::parse(invalidation.to_json().as_bytes());
        assert_eq!(again, Some(invalidation), "{data:?}");
    }
}
