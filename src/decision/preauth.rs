//! The pre-authorize client: asks the backend (`POST /-/oauth/iam_routing`) where one OAuth
//! application's traffic goes, signing each call with the shared Workhorse secret.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use jsonwebtoken::{EncodingKey, Header};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;

use crate::config::{CacheConfig, PreauthorizeConfig, StaticHeaders, UpstreamAddress};
use crate::decision::Destination;
use crate::forward::client::{Pool, PoolLimits};
use crate::forward::headers::X_REQUEST_ID;
use crate::forward::RequestBody;
use crate::observe::trace::context::TRACEPARENT;

static GITLAB_WORKHORSE: HeaderName = HeaderName::from_static("gitlab-workhorse");
static GITLAB_WORKHORSE_API_REQUEST: HeaderName =
    HeaderName::from_static("gitlab-workhorse-api-request");
const WORKHORSE_JSON: &str = "application/vnd.gitlab-workhorse+json";

/// Everything but RFC 3986 unreserved characters is escaped in the `client_id` value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A decision answer is a few dozen bytes; anything much larger is not one.
const MAX_ANSWER_BYTES: usize = 4096;

/// A valid answer from the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub destination: Destination,
    /// How long this answer may be cached; zero means not at all.
    pub lifetime: Duration,
    /// How long after its lifetime it may still be served while the backend fails.
    pub stale_if_error: Duration,
}

/// Why a pre-authorize call produced no answer. None of these is ever cached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PreauthError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("unexpected status {0}")]
    BadStatus(StatusCode),
    #[error("bad response: {0}")]
    BadResponse(&'static str),
}

impl PreauthError {
    pub fn outcome(&self) -> Outcome {
        match self {
            PreauthError::Timeout(_) => Outcome::Timeout,
            PreauthError::Connect(_) => Outcome::ConnectError,
            PreauthError::BadStatus(_) => Outcome::BadStatus,
            PreauthError::BadResponse(_) => Outcome::BadResponse,
        }
    }
}

/// How a pre-authorize call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Timeout,
    ConnectError,
    BadStatus,
    BadResponse,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Timeout,
        Outcome::ConnectError,
        Outcome::BadStatus,
        Outcome::BadResponse,
    ];

    /// The `outcome` label of the metrics and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::BadStatus => "bad_status",
            Outcome::BadResponse => "bad_response",
        }
    }
}

#[derive(Serialize)]
struct Claims {
    iss: &'static str,
    iat: u64,
}

/// A pooled client of its own, so a slow pre-authorize backend never holds connections
/// the proxied traffic needs.
pub struct PreauthClient {
    pool: Pool,
    /// Where it is, for `Debug` and the call's span.
    address: UpstreamAddress,
    /// The URL's path, origin-form, and the `Host` it gets (`preauthorize.host`, or the
    /// URL's authority).
    path: String,
    host: HeaderValue,
    /// `[preauthorize.headers]`.
    headers: StaticHeaders,
    key: EncodingKey,
    timeout: Duration,
    limits: CacheConfig,
    user_agent: HeaderValue,
}

impl std::fmt::Debug for PreauthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreauthClient")
            .field("url", &self.address.to_string())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PreauthClient {
    /// `limits` caps the lifetimes an answer may ask for; `saturated` counts calls that
    /// found every connection busy.
    pub fn new(
        config: &PreauthorizeConfig,
        limits: &CacheConfig,
        saturated: prometheus::IntCounter,
    ) -> PreauthClient {
        let upstream = &config.upstream;
        PreauthClient {
            pool: Pool::new(
                &upstream.address,
                &upstream.tls,
                PoolLimits {
                    connect_timeout: config.timeout,
                    max_connections: config.max_connections,
                    saturated,
                },
            ),
            address: upstream.address.clone(),
            path: config.path.clone(),
            host: upstream.host.clone(),
            headers: upstream.headers.clone(),
            key: EncodingKey::from_secret(config.secret.as_bytes()),
            timeout: config.timeout,
            limits: limits.clone(),
            user_agent: HeaderValue::from_str(&format!("iamproxy/{}", crate::VERSION))
                .unwrap_or(HeaderValue::from_static("iamproxy")),
        }
    }

    /// Where the backend is and the path it is called at, for the call's span.
    pub fn address(&self) -> (&UpstreamAddress, &str) {
        (&self.address, &self.path)
    }

    /// Asks where `client_id` goes. The whole exchange, body included, is bounded by
    /// `preauthorize.timeout`. `traceparent` goes along when the request is traced.
    pub async fn ask(
        &self,
        client_id: &str,
        request_id: &HeaderValue,
        traceparent: Option<&HeaderValue>,
    ) -> Result<Answer, PreauthError> {
        let call = self.call(client_id, request_id, traceparent);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(PreauthError::Timeout(self.timeout)),
        }
    }

    async fn call(
        &self,
        client_id: &str,
        request_id: &HeaderValue,
        traceparent: Option<&HeaderValue>,
    ) -> Result<Answer, PreauthError> {
        let request = self.request(client_id, request_id, traceparent)?;
        let response = self
            .pool
            .send(request)
            .await
            .map_err(|e| PreauthError::Connect(crate::forward::error_chain(&e)))?;
        let (parts, body) = response.into_parts();
        if parts.status != StatusCode::OK {
            // Includes redirects: they are never followed.
            return Err(PreauthError::BadStatus(parts.status));
        }
        let body = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|_| PreauthError::BadResponse("body unreadable or too large"))?
            .to_bytes();
        parse_answer(parts.status, &parts.headers, &body, &self.limits)
    }

    /// Builds the signed request. Nothing of the client's request goes along but the
    /// client id, the correlation id and the trace context: the decision is per
    /// application, never per user.
    fn request(
        &self,
        client_id: &str,
        request_id: &HeaderValue,
        traceparent: Option<&HeaderValue>,
    ) -> Result<Request<RequestBody>, PreauthError> {
        let uri: Uri = format!(
            "{}?client_id={}",
            self.path,
            utf8_percent_encode(client_id, QUERY_VALUE)
        )
        .parse()
        .map_err(|_| PreauthError::Connect("cannot build request URI".into()))?;
        let jwt = self.sign()?;
        let mut request = Request::new(Either::Right(Full::new(Bytes::new())));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        // First, so that the call's own headers below are never replaced.
        self.headers.apply(headers);
        headers.insert(header::HOST, self.host.clone());
        headers.insert(GITLAB_WORKHORSE.clone(), self.user_agent.clone());
        headers.insert(GITLAB_WORKHORSE_API_REQUEST.clone(), jwt);
        headers.insert(header::ACCEPT, HeaderValue::from_static(WORKHORSE_JSON));
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        if let Some(traceparent) = traceparent {
            headers.insert(TRACEPARENT.clone(), traceparent.clone());
        }
        Ok(request)
    }

    /// HS256 JWT `{"iss": "gitlab-workhorse", "iat": now}`, as Workhorse signs API calls.
    fn sign(&self) -> Result<HeaderValue, PreauthError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let claims = Claims {
            iss: "gitlab-workhorse",
            iat,
        };
        jsonwebtoken::encode(&Header::default(), &claims, &self.key)
            .ok()
            .and_then(|jwt| HeaderValue::from_str(&jwt).ok())
            .ok_or(PreauthError::Connect("cannot sign request".into()))
    }
}

/// Validates a backend response: status 200, the Workhorse (or plain) JSON content type
/// and `{"destination": "iam" | "rails"}`. `Cache-Control` sets the lifetime and the stale
/// window, capped by `cache.ttl` and `cache.stale_if_error`.
pub fn parse_answer(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    limits: &CacheConfig,
) -> Result<Answer, PreauthError> {
    if status != StatusCode::OK {
        return Err(PreauthError::BadStatus(status));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    if !content_type.eq_ignore_ascii_case(WORKHORSE_JSON)
        && !content_type.eq_ignore_ascii_case("application/json")
    {
        return Err(PreauthError::BadResponse("unexpected content type"));
    }
    // Read as a JSON value, not a derived struct: serde would also accept `["iam"]`.
    let body: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| PreauthError::BadResponse("body is not JSON"))?;
    let destination = match body.get("destination").and_then(|d| d.as_str()) {
        Some("iam") => Destination::Iam,
        Some("rails") => Destination::Rails,
        _ => return Err(PreauthError::BadResponse("no valid destination")),
    };
    let (lifetime, stale_if_error) = lifetimes(headers, limits);
    Ok(Answer {
        destination,
        lifetime,
        stale_if_error,
    })
}

/// The answer's lifetime and stale window from `Cache-Control`:
/// - `no-store` (or `no-cache`, which would need revalidation we do not do): neither;
/// - `max-age=N`: N capped by `cache.ttl`; unreadable → zero (RFC 9111 §4.2.1: stale);
/// - `stale-if-error=N` (RFC 5861): N capped by `cache.stale_if_error`; unreadable → zero;
/// - a directive left out: its cap.
fn lifetimes(headers: &HeaderMap, limits: &CacheConfig) -> (Duration, Duration) {
    let (mut lifetime, mut stale) = (limits.ttl, limits.stale_if_error);
    let seconds = |value: &str, cap: Duration| match value.trim().trim_matches('"').parse() {
        Ok(seconds) => Duration::from_secs(seconds).min(cap),
        Err(_) => Duration::ZERO,
    };
    let directives = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for directive in directives {
        let (name, value) = directive.split_once('=').unwrap_or((directive, ""));
        let name = name.trim();
        if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
            return (Duration::ZERO, Duration::ZERO);
        }
        if name.eq_ignore_ascii_case("max-age") {
            lifetime = seconds(value, limits.ttl);
        } else if name.eq_ignore_ascii_case("stale-if-error") {
            stale = seconds(value, limits.stale_if_error);
        }
    }
    (lifetime, stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);
    const STALE: Duration = Duration::from_secs(300);

    fn limits() -> CacheConfig {
        CacheConfig {
            ttl: TTL,
            max_entries: 10,
            stale_if_error: STALE,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn parse(pairs: &[(&'static str, &'static str)], body: &str) -> Result<Answer, PreauthError> {
        parse_answer(StatusCode::OK, &headers(pairs), body.as_bytes(), &limits())
    }

    const JSON: (&str, &str) = ("content-type", "application/vnd.gitlab-workhorse+json");

    #[test]
    fn accepts_both_destinations_with_workhorse_or_plain_json() {
        let iam = parse(&[JSON], r#"{"destination":"iam"}"#).unwrap();
        assert_eq!(iam.destination, Destination::Iam);
        assert_eq!(iam.lifetime, TTL);
        let rails = parse(
            &[("content-type", "Application/JSON; charset=utf-8")],
            r#"{"destination": "rails", "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(rails.destination, Destination::Rails);
    }

    #[test]
    fn rejects_other_content_types_bodies_and_destinations() {
        let cases = [
            (
                vec![("content-type", "text/html")],
                r#"{"destination":"iam"}"#,
            ),
            (vec![], r#"{"destination":"iam"}"#),
            (vec![JSON], "not json"),
            (vec![JSON], r#"{"destination":"IAM"}"#),
            (vec![JSON], r#"{"destination":"elsewhere"}"#),
            (vec![JSON], r#"{"dest":"iam"}"#),
            (vec![JSON], r#"["iam"]"#),
        ];
        for (pairs, body) in cases {
            let err = parse(&pairs, body).unwrap_err();
            assert_eq!(err.outcome(), Outcome::BadResponse, "{pairs:?} {body}");
        }
    }

    #[test]
    fn non_200_statuses_are_errors_including_redirects() {
        for status in [201, 204, 302, 307, 404, 500] {
            let status = StatusCode::from_u16(status).unwrap();
            let err = parse_answer(status, &headers(&[JSON]), b"{}", &limits()).unwrap_err();
            assert_eq!(err.outcome(), Outcome::BadStatus);
        }
    }

    #[test]
    fn cache_control_sets_the_lifetime() {
        let body = r#"{"destination":"iam"}"#;
        let lifetime = |cc: &'static str| {
            parse(&[JSON, ("cache-control", cc)], body)
                .unwrap()
                .lifetime
        };
        assert_eq!(lifetime("max-age=5"), Duration::from_secs(5));
        assert_eq!(lifetime("private, Max-Age=7"), Duration::from_secs(7));
        assert_eq!(lifetime("max-age=86400"), TTL, "capped by cache.ttl");
        assert_eq!(lifetime("no-store"), Duration::ZERO);
        assert_eq!(lifetime("max-age=30, no-store"), Duration::ZERO);
        assert_eq!(lifetime("no-cache"), Duration::ZERO);
        assert_eq!(lifetime("max-age=soon"), Duration::ZERO);
        assert_eq!(lifetime("public"), TTL);
    }

    #[test]
    fn stale_if_error_sets_the_stale_window_capped_by_the_config() {
        let body = r#"{"destination":"iam"}"#;
        let windows = |cc: &'static str| {
            let answer = parse(&[JSON, ("cache-control", cc)], body).unwrap();
            (answer.lifetime, answer.stale_if_error)
        };
        let secs = Duration::from_secs;
        assert_eq!(windows("max-age=5, stale-if-error=30"), (secs(5), secs(30)));
        assert_eq!(windows("Stale-If-Error=86400"), (TTL, STALE), "capped");
        assert_eq!(
            windows("max-age=5"),
            (secs(5), STALE),
            "the config's by default"
        );
        assert_eq!(windows("max-age=0, stale-if-error=60"), (secs(0), secs(60)));
        assert_eq!(windows("stale-if-error=later"), (TTL, secs(0)));
        assert_eq!(windows("no-store, stale-if-error=60"), (secs(0), secs(0)));
        let off = CacheConfig {
            stale_if_error: Duration::ZERO,
            ..limits()
        };
        let cc = headers(&[JSON, ("cache-control", "stale-if-error=60")]);
        let answer = parse_answer(StatusCode::OK, &cc, body.as_bytes(), &off).unwrap();
        assert_eq!(answer.stale_if_error, Duration::ZERO, "0s turns it off");
    }

    #[test]
    fn client_id_is_percent_encoded_in_the_query() {
        let encoded = utf8_percent_encode("a b&c=d/é~-._", QUERY_VALUE).to_string();
        assert_eq!(encoded, "a%20b%26c%3Dd%2F%C3%A9~-._");
    }
}
