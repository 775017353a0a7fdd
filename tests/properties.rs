//! Properties of the parsers that read hostile input (DESIGN §2–§4): client identification,
//! its form, Basic and assertion readers, flow continuity and the issuer rule, and the
//! pre-authorize answer never panic on any input, do not care in which order parameters
//! arrive, give back exactly the client_id that was sent, however it was encoded, and send
//! every code and token to the server that issued it. The fuzz targets in `fuzz/` drive
//! the same public functions with coverage guidance.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use iamproxy::classify::identify::{identify, Identity, Source, Unknown};
use iamproxy::classify::issuer::{continuity, Continuity};
use iamproxy::classify::params::{Parameters, RequestView};
use iamproxy::classify::Endpoint;
use iamproxy::config::CacheConfig;
use iamproxy::decision::preauth::{parse_answer, Outcome};
use iamproxy::decision::Destination;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;

const FORM: &str = "application/x-www-form-urlencoded";
/// DESIGN §2: longer ids are unknown clients.
const MAX_CLIENT_ID_BYTES: usize = 255;
/// The default `iam.token_prefixes`.
const TOKEN_PREFIXES: [&str; 2] = ["giat_", "ory_"];

/// An owned request that lends out the `RequestView` identification reads.
#[derive(Debug, Clone)]
struct Req {
    method: Method,
    query: Option<String>,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Req {
    fn new(method: Method) -> Req {
        Req {
            method,
            query: None,
            headers: HeaderMap::new(),
            body: Vec::new(),
        }
    }

    fn get(query: impl Into<String>) -> Req {
        Req::new(Method::GET).query(query)
    }

    fn post_form(body: impl Into<Vec<u8>>) -> Req {
        Req::new(Method::POST).body(FORM, body)
    }

    fn query(mut self, query: impl Into<String>) -> Req {
        self.query = Some(query.into());
        self
    }

    fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Req {
        self.headers.append(
            CONTENT_TYPE,
            HeaderValue::from_str(content_type).expect("valid content type"),
        );
        self.body = body.into();
        self
    }

    fn authorization(mut self, value: impl AsRef<[u8]>) -> Req {
        let value = HeaderValue::from_bytes(value.as_ref()).expect("valid header value");
        self.headers.append(AUTHORIZATION, value);
        self
    }

    fn basic(self, user: &str, secret: &str) -> Req {
        self.authorization(format!(
            "Basic {}",
            STANDARD.encode(format!("{user}:{secret}"))
        ))
    }

    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: &self.method,
            query: self.query.as_deref(),
            headers: &self.headers,
            body: &self.body,
        }
    }

    fn params(&self) -> Parameters<'_> {
        Parameters::read(&self.view(), &TOKEN_PREFIXES.map(str::to_owned))
    }

    fn identify(&self) -> Identity<'_> {
        identify(&self.headers, &self.params())
    }

    fn continuity(&self, endpoint: Endpoint) -> Option<Continuity> {
        continuity(endpoint, &self.params())
    }
}

fn known(client_id: &str, source: Source) -> Identity<'static> {
    Identity::Known {
        client_id: client_id.to_owned().into(),
        source,
    }
}

/// DESIGN §2's rules for one id on its own, so the tests can state what a source must give.
fn expected(client_id: &str, source: Source) -> Identity<'static> {
    if client_id.is_empty() {
        Identity::Unknown(Unknown::Empty)
    } else if client_id.len() > MAX_CLIENT_ID_BYTES {
        Identity::Unknown(Unknown::TooLong)
    } else if !client_id.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        Identity::Unknown(Unknown::NotPrintable)
    } else {
        known(client_id, source)
    }
}

/// `application/x-www-form-urlencoded` as browsers and `form_urlencoded` write it.
fn form_encode(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Every byte as `%XX`, even the ones that need no escaping.
fn percent_all(value: &str) -> String {
    value.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Only what would otherwise change the parse: '%', '&', '+'.
fn percent_minimal(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            '%' | '&' | '+' => percent_all(c.encode_utf8(&mut [0; 4])),
            c => c.to_string(),
        })
        .collect()
}

/// The three ways a client may encode a value (and a parameter name).
#[derive(Debug, Clone, Copy)]
enum Encoding {
    Form,
    PercentAll,
    Minimal,
}

impl Encoding {
    fn encode(self, value: &str) -> String {
        match self {
            Encoding::Form => form_urlencoded::byte_serialize(value.as_bytes()).collect(),
            Encoding::PercentAll => percent_all(value),
            Encoding::Minimal => percent_minimal(value),
        }
    }
}

fn encoding() -> impl Strategy<Value = Encoding> {
    select(vec![
        Encoding::Form,
        Encoding::PercentAll,
        Encoding::Minimal,
    ])
}

/// A client_id identification must accept: 1 to 255 bytes of printable ASCII.
fn printable_id() -> impl Strategy<Value = String> {
    "[ -~]{1,255}"
}

/// Names of parameters that are not a client_id source (nor a continuity token), with
/// values of any kind.
fn other_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        select(vec![
            "grant_type",
            "scope",
            "redirect_uri",
            "state",
            "client_secret"
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,12}".prop_filter("not a source", |name| {
            !name.starts_with("client_") && !is_token_param(name) && !name.contains("verifier")
        }),
    ];
    prop::collection::vec((name, any::<String>()), 0..6)
}

fn is_token_param(name: &str) -> bool {
    ["code", "refresh_token", "device_code", "token"].contains(&name)
}

/// A `client_assertion`-looking string: three base64url segments whose payload is JSON
/// with an `iss` and `sub`, or not quite.
fn jwt_ish() -> impl Strategy<Value = String> {
    let claim = prop_oneof![
        Just(serde_json::Value::Null),
        "[ -~]{0,20}".prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
    ];
    let claims = (claim.clone(), claim.clone(), any::<bool>()).prop_map(|(iss, sub, same)| {
        let sub = if same { iss.clone() } else { sub };
        let mut claims = serde_json::Map::new();
        for (name, value) in [("iss", iss), ("sub", sub)] {
            if !value.is_null() {
                claims.insert(name.to_owned(), value);
            }
        }
        jwt(&serde_json::Value::Object(claims).to_string())
    });
    // RFC 7519 §7.2: the claims are a JSON object; an array of the same values is not one.
    let array = (claim.clone(), claim, any::<bool>()).prop_map(|(iss, sub, same)| {
        let sub = if same { iss.clone() } else { sub };
        jwt(&serde_json::json!([iss, sub]).to_string())
    });
    prop_oneof![
        claims,
        array,
        any::<Vec<u8>>().prop_map(|payload| jwt(&String::from_utf8_lossy(&payload))),
        "[A-Za-z0-9_=+/-]{0,30}(\\.[A-Za-z0-9_=+/*-]{0,30}){0,4}",
        any::<String>(),
    ]
}

/// A JWT with this payload and a signature nobody checks.
fn jwt(payload: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    format!("{header}.{}.c2ln", URL_SAFE_NO_PAD.encode(payload))
}

/// Bytes a `HeaderValue` accepts: tab, visible ASCII, space and obs-text.
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff];
    prop::collection::vec(byte, 0..max)
}

/// `Authorization` values: Basic (any case) with base64 or not, Bearer, or anything.
fn authorization() -> impl Strategy<Value = Vec<u8>> {
    let scheme = select(vec!["Basic ", "basic ", "BASIC  ", "Basic", "Bearer ", ""]);
    let credentials = prop_oneof![
        any::<Vec<u8>>().prop_map(|raw| STANDARD.encode(raw).into_bytes()),
        ("[ -~]{0,40}", any::<String>())
            .prop_map(|(user, secret)| STANDARD.encode(format!("{user}:{secret}")).into_bytes()),
        header_bytes(64),
    ];
    (scheme, credentials)
        .prop_map(|(scheme, credentials)| [scheme.as_bytes(), &credentials].concat())
}

/// A query or body as segments between '&': well-formed pairs, including client_id and the
/// continuity parameters, and junk.
fn segments() -> impl Strategy<Value = Vec<String>> {
    let name = select(vec![
        "client_id",
        "client_assertion",
        "code",
        "refresh_token",
        "login_verifier",
        "grant_type",
        "scope",
    ]);
    let value = prop_oneof![
        "app-[0-2]",
        select(vec!["giat_x", "ory_y", "plain"]).prop_map(str::to_owned),
        jwt_ish(),
        any::<String>(),
    ];
    let pair = (name, value).prop_map(|(name, value)| form_encode(&[(name.to_owned(), value)]));
    let segment = prop_oneof![3 => pair, 1 => "[^&]{0,16}"];
    prop::collection::vec(segment, 0..8)
}

/// The segments in their order and shuffled.
fn segments_and_shuffled() -> impl Strategy<Value = (String, String)> {
    segments().prop_flat_map(|segments| {
        let joined = segments.join("&");
        (
            Just(joined),
            Just(segments).prop_shuffle().prop_map(|s| s.join("&")),
        )
    })
}

fn method() -> impl Strategy<Value = Method> {
    select(vec![Method::GET, Method::POST, Method::PUT, Method::HEAD])
}

/// `Content-Type` values: the form type as clients vary it, other types, and any bytes.
fn content_type() -> impl Strategy<Value = Option<Vec<u8>>> {
    let value = prop_oneof![
        select(vec![
            FORM,
            "application/x-www-form-urlencoded; charset=utf-8",
            "Application/X-WWW-Form-URLEncoded",
            "application/json",
            "multipart/form-data; boundary=x",
        ])
        .prop_map(|v| v.as_bytes().to_vec()),
        header_bytes(48),
    ];
    prop::option::of(value)
}

/// A request from parts, any of which may be nonsense.
fn request(
    method: Method,
    query: Option<String>,
    content_types: Vec<Vec<u8>>,
    authorizations: Vec<Vec<u8>>,
    body: Vec<u8>,
) -> Req {
    let mut req = Req::new(method);
    req.query = query;
    req.body = body;
    for content_type in content_types {
        let value = HeaderValue::from_bytes(&content_type).expect("header_bytes are valid");
        req.headers.append(CONTENT_TYPE, value);
    }
    for value in authorizations {
        req = req.authorization(value);
    }
    req
}

proptest! {
    // Cases: proptest's default (256) or PROPTEST_CASES. A failure is saved beside this file
    // as properties.proptest-regressions and replayed first; commit it with the fix.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    /// Whatever arrives, identification answers, and anything it calls known obeys DESIGN §2.
    #[test]
    fn identify_never_panics_and_only_knows_valid_ids(
        method in method(),
        query in prop::option::of(prop_oneof![
            any::<String>(),
            any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ]),
        content_types in prop::collection::vec(content_type(), 0..3),
        authorizations in prop::collection::vec(authorization(), 0..3),
        body in prop_oneof![any::<Vec<u8>>(), segments().prop_map(|s| s.join("&").into_bytes())],
    ) {
        let content_types = content_types.into_iter().flatten().collect();
        let req = request(method, query, content_types, authorizations, body);
        if let Identity::Known { client_id, source } = req.identify() {
            prop_assert_eq!(expected(&client_id, source), known(&client_id, source));
        }
    }

    /// Continuity reads the same untrusted parts; it must not panic either.
    #[test]
    fn continuity_never_panics_on_arbitrary_requests(
        endpoint in select(Endpoint::ALL.to_vec()),
        method in method(),
        query in prop::option::of(any::<String>()),
        content_type in content_type(),
        body in prop_oneof![any::<Vec<u8>>(), segments().prop_map(|s| s.join("&").into_bytes())],
    ) {
        let req = request(method, query, content_type.into_iter().collect(), Vec::new(), body);
        let _ = req.continuity(endpoint);
    }

    /// Shuffling the pairs of the query and of the form body changes neither the identity
    /// nor the continuity verdict: only which parameters occur, and how often, matters.
    #[test]
    fn identification_and_continuity_ignore_parameter_order(
        (query, shuffled_query) in segments_and_shuffled(),
        (body, shuffled_body) in segments_and_shuffled(),
        basic in prop::option::of("app-[0-2]"),
        endpoint in select(Endpoint::ALL.to_vec()),
    ) {
        let build = |query: &str, body: &str| {
            let req = Req::post_form(body).query(query);
            match &basic {
                Some(user) => req.basic(user, "secret"),
                None => req,
            }
        };
        let original = build(&query, &body);
        let shuffled = build(&shuffled_query, &shuffled_body);
        prop_assert_eq!(original.identify(), shuffled.identify());
        prop_assert_eq!(original.continuity(endpoint), shuffled.continuity(endpoint));
    }

    /// A client_id sent once in the form body comes back byte for byte, whether the client
    /// percent-encoded all of it, only what it had to, or the way browsers do, and wherever
    /// it sits among the other parameters.
    #[test]
    fn form_body_client_id_is_exactly_what_was_sent_however_encoded(
        client_id in printable_id(),
        others in other_pairs(),
        position in any::<prop::sample::Index>(),
        value_encoding in encoding(),
        name_encoding in encoding(),
        content_type in select(vec![
            FORM,
            "application/x-www-form-urlencoded; charset=UTF-8",
            "APPLICATION/X-WWW-FORM-URLENCODED",
        ]),
    ) {
        let mut segments: Vec<String> =
            others.iter().map(|pair| form_encode(std::slice::from_ref(pair))).collect();
        let client_id_pair = format!(
            "{}={}",
            name_encoding.encode("client_id"),
            value_encoding.encode(&client_id)
        );
        segments.insert(position.index(segments.len() + 1), client_id_pair);
        let req = Req::new(Method::POST).body(content_type, segments.join("&"));
        prop_assert_eq!(req.identify(), known(&client_id, Source::FormBody));
    }

    /// The same id in the query, encoded either way, is the same client.
    #[test]
    fn query_client_id_is_exactly_what_was_sent_however_encoded(
        client_id in printable_id(),
        others in other_pairs(),
        value_encoding in encoding(),
    ) {
        let mut query = form_encode(&others);
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(&format!("client_id={}", value_encoding.encode(&client_id)));
        let req = Req::get(query);
        prop_assert_eq!(req.identify(), known(&client_id, Source::Query));
    }

    /// Ids outside DESIGN §2's limits are unknown with the right reason, in any source.
    #[test]
    fn out_of_limit_client_ids_are_unknown_with_the_reason(
        client_id in prop_oneof![
            Just(String::new()),
            "[ -~]{256,300}",
            "[ -~]{0,10}[\\x00-\\x1f\\x7f\u{80}-\u{10ffff}][ -~]{0,10}",
        ],
        source in select(vec![Source::Basic, Source::FormBody, Source::Query, Source::Assertion]),
    ) {
        let encoded = percent_all(&client_id);
        let req = match source {
            Source::Basic => Req::new(Method::GET).authorization(format!(
                "Basic {}",
                STANDARD.encode(format!("{encoded}:secret"))
            )),
            Source::FormBody => Req::post_form(format!("client_id={encoded}")),
            Source::Query => Req::get(format!("client_id={encoded}")),
            Source::Assertion => {
                let claims = serde_json::json!({"iss": client_id, "sub": client_id});
                Req::get(format!("client_assertion={}", jwt(&claims.to_string())))
            }
        };
        let reason = match expected(&client_id, source) {
            Identity::Unknown(reason) => reason,
            Identity::Known { .. } => unreachable!("the strategy makes only invalid ids"),
        };
        prop_assert_eq!(req.identify(), Identity::Unknown(reason));
    }

    /// Form body and query must name the same client; a second client_id in one source is
    /// never resolved, even when both say the same.
    #[test]
    fn form_body_and_query_ids_must_agree_and_never_repeat(
        (body_id, query_id) in body_and_query_ids(),
        repeat_in_body in any::<bool>(),
    ) {
        let mut body = format!("client_id={}", percent_all(&body_id));
        if repeat_in_body {
            body = format!("{body}&{body}");
        }
        let mut req = Req::post_form(body);
        if let Some(query_id) = &query_id {
            req = req.query(format!("client_id={}", percent_all(query_id)));
        }
        let want = if repeat_in_body {
            Identity::Unknown(Unknown::Repeated)
        } else {
            match query_id {
                Some(query_id) if query_id != body_id => Identity::Unknown(Unknown::Disagree),
                _ => known(&body_id, Source::FormBody),
            }
        };
        prop_assert_eq!(req.identify(), want);
    }

    /// `Basic base64(user:secret)` identifies `user`: as is when it has no ':', '%' or '+',
    /// and form-urlencoded (RFC 6749 §2.3.1) when it has, whatever the secret.
    #[test]
    fn basic_credentials_roundtrip_to_the_user(
        raw_user in "[ -~&&[^:%+]]{1,255}",
        any_user in printable_id(),
        encoding in encoding(),
        secret in any::<String>(),
        scheme in select(vec!["Basic", "basic", "BASIC", "bAsIc"]),
    ) {
        let header =
            |user: &str| format!("{scheme} {}", STANDARD.encode(format!("{user}:{secret}")));
        let req = Req::new(Method::GET).authorization(header(&raw_user));
        prop_assert_eq!(req.identify(), known(&raw_user, Source::Basic));
        let encoded = match encoding {
            // '+' is a space in the user, so the minimal escape must include it; ':' must go too.
            Encoding::Minimal => percent_minimal(&any_user).replace(':', "%3A"),
            other => other.encode(&any_user),
        };
        let req = Req::new(Method::GET).authorization(header(&encoded));
        prop_assert_eq!(req.identify(), known(&any_user, Source::Basic));
    }

    /// Basic credentials that are not base64, or decode to no ':', are malformed; anything
    /// else names a user that DESIGN §2 then judges.
    #[test]
    fn basic_with_arbitrary_credentials_is_malformed_or_judged(
        credentials in prop_oneof![
            any::<Vec<u8>>().prop_map(|raw| STANDARD.encode(raw)),
            "[ -~]{0,40}",
            "[A-Za-z0-9+/=]{0,40}",
        ],
    ) {
        let req = Req::new(Method::GET).authorization(format!("Basic {credentials}"));
        let identity = req.identify();
        let decoded = STANDARD.decode(credentials.trim());
        match decoded {
            Ok(decoded) if decoded.contains(&b':') => prop_assert!(
                !matches!(identity, Identity::Unknown(Unknown::MalformedBasic | Unknown::Missing)),
                "{identity:?}"
            ),
            _ => prop_assert_eq!(identity, Identity::Unknown(Unknown::MalformedBasic)),
        }
    }

    /// A client_assertion names its issuer when `iss` = `sub` and is malformed otherwise;
    /// arbitrary JWT-ish strings give one of those answers and nothing else.
    #[test]
    fn client_assertion_names_its_issuer_or_is_malformed(
        assertion in jwt_ish(),
        in_body in any::<bool>(),
    ) {
        let encoded = form_encode(&[("client_assertion".to_owned(), assertion.clone())]);
        let req = if in_body { Req::post_form(encoded) } else { Req::get(encoded) };
        let issuer = issuer_if_equal_to_subject(&assertion);
        let want = match &issuer {
            Some(issuer) => expected(issuer, Source::Assertion),
            None => Identity::Unknown(Unknown::MalformedAssertion),
        };
        prop_assert_eq!(req.identify(), want);
    }

    /// Any valid issuer equal to the subject is the client_id, and it must agree with a
    /// client_id sent alongside.
    #[test]
    fn client_assertion_issuer_roundtrips_and_must_agree(
        issuer in printable_id(),
        other in prop::option::of(printable_id()),
    ) {
        let claims = serde_json::json!({"iss": issuer, "sub": issuer, "aud": "x"});
        let assertion = jwt(&claims.to_string());
        let mut pairs = vec![("client_assertion".to_owned(), assertion)];
        if let Some(other) = &other {
            pairs.push(("client_id".to_owned(), other.clone()));
        }
        let want = match &other {
            None => known(&issuer, Source::Assertion),
            Some(other) if *other == issuer => known(&issuer, Source::FormBody),
            Some(_) => Identity::Unknown(Unknown::Disagree),
        };
        let req = Req::post_form(form_encode(&pairs));
        prop_assert_eq!(req.identify(), want);
    }

    /// A token-bearing parameter whose value IAM issued keeps the flow at IAM, wherever it
    /// sits among the other parameters, in the body or the query.
    #[test]
    fn iam_issued_token_keeps_the_flow_at_iam(
        name in select(vec!["code", "refresh_token", "device_code", "token"]),
        prefix in select(TOKEN_PREFIXES.to_vec()),
        rest in any::<String>(),
        others in other_pairs(),
        position in any::<prop::sample::Index>(),
        in_body in any::<bool>(),
        endpoint in select(Endpoint::ALL.to_vec()),
    ) {
        let mut pairs = others;
        pairs.insert(position.index(pairs.len() + 1), (name.to_owned(), format!("{prefix}{rest}")));
        let encoded = form_encode(&pairs);
        let req = if in_body { Req::post_form(encoded) } else { Req::get(encoded) };
        prop_assert_eq!(req.continuity(endpoint), Some(Continuity::IamToken));
    }

    /// Whatever the token values, the request goes to their issuer: IAM when any of them
    /// carries an IAM prefix, else Rails when any is non-empty; only a request without a
    /// code or token is left to the per-client decision.
    #[test]
    fn codes_and_tokens_go_to_their_issuer(
        tokens in prop::collection::vec(
            (
                select(vec!["code", "refresh_token", "device_code", "token"]),
                prop_oneof![
                    Just(String::new()),
                    select(TOKEN_PREFIXES.to_vec())
                        .prop_flat_map(|p| any::<String>().prop_map(move |r| format!("{p}{r}"))),
                    any::<String>(),
                ],
                any::<bool>(),
            ),
            0..5,
        ),
        others in other_pairs(),
        endpoint in select(vec![Endpoint::Token, Endpoint::Revoke, Endpoint::Introspect]),
    ) {
        let (mut body, mut query) = (others.clone(), Vec::new());
        for (name, value, in_body) in &tokens {
            let pair = ((*name).to_owned(), value.clone());
            if *in_body { body.push(pair) } else { query.push(pair) }
        }
        let req = Req::post_form(form_encode(&body)).query(form_encode(&query));
        let values = tokens.iter().map(|(_, value, _)| value);
        let want = if values.clone().any(|v| TOKEN_PREFIXES.iter().any(|p| v.starts_with(p))) {
            Some(Continuity::IamToken)
        } else if values.clone().any(|v| !v.is_empty()) {
            Some(Continuity::RailsToken)
        } else {
            None
        };
        prop_assert_eq!(req.continuity(endpoint), want);
    }

    /// A `%` without two hex digits anywhere in a form body makes the whole body
    /// unreadable: no client id and no token is read from it, so it goes to Rails without
    /// a pre-authorize call. The same in the query.
    #[test]
    fn a_bad_escape_anywhere_makes_the_part_unreadable(
        client_id in "app-[0-9]{1,3}",
        others in other_pairs(),
        bad in select(vec!["%", "%4", "%ZZ", "%g1", "x%", "%%41"]),
        position in any::<prop::sample::Index>(),
        in_body in any::<bool>(),
    ) {
        let mut segments: Vec<String> =
            others.iter().map(|pair| form_encode(std::slice::from_ref(pair))).collect();
        segments.push(format!("client_id={client_id}"));
        segments.push("refresh_token=giat_abc".to_owned());
        segments.insert(position.index(segments.len() + 1), format!("state={bad}"));
        let encoded = segments.join("&");
        let (req, reason) = if in_body {
            (Req::post_form(encoded), Unknown::MalformedBody)
        } else {
            (Req::get(encoded), Unknown::MalformedQuery)
        };
        prop_assert_eq!(req.identify(), Identity::Unknown(reason));
        prop_assert_eq!(req.continuity(Endpoint::Token), None);
    }

    /// Whatever the backend answers, parse_answer returns; it is Ok only for a 200 with a
    /// Workhorse or plain JSON content type and a destination of exactly "iam" or "rails",
    /// and neither the lifetime nor the stale window exceeds its cap.
    #[test]
    fn parse_answer_accepts_only_a_200_json_destination(
        status in prop_oneof![3 => Just(200u16), 1 => 100u16..=999],
        content_type in prop_oneof![
            3 => select(vec![
                "application/vnd.gitlab-workhorse+json",
                "application/json; charset=utf-8",
                "Application/JSON",
                "text/html",
                "application/jsonx",
            ]).prop_map(|v| Some(v.as_bytes().to_vec())),
            1 => prop::option::of(header_bytes(40)),
        ],
        cache_control in prop::option::of(prop_oneof![
            concat!(
                "(max-age=[0-9]{1,25}|no-store|no-cache|private|max-age=\"?[ -~]{0,6})",
                "(, ?(max-age=[0-9]{1,4}|stale-if-error=[0-9]{1,25}|public)){0,2}",
            )
                .prop_map(String::into_bytes),
            header_bytes(30),
        ]),
        body in prop_oneof![
            3 => answer_body().prop_map(String::into_bytes),
            1 => any::<Vec<u8>>(),
        ],
        max_lifetime in (0u64..1_000_000).prop_map(Duration::from_secs),
        max_stale in (0u64..1_000_000).prop_map(Duration::from_secs),
    ) {
        let limits = CacheConfig { ttl: max_lifetime, max_entries: 1, stale_if_error: max_stale };
        let status = StatusCode::from_u16(status).expect("100..=999 is a status");
        let mut headers = HeaderMap::new();
        if let Some(value) = &content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_bytes(value).expect("valid bytes"));
        }
        if let Some(value) = &cache_control {
            headers.insert(CACHE_CONTROL, HeaderValue::from_bytes(value).expect("valid bytes"));
        }
        match parse_answer(status, &headers, &body, &limits) {
            Ok(answer) => {
                prop_assert_eq!(status, StatusCode::OK);
                let media_type = content_type
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.split(';').next())
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                prop_assert!(
                    ["application/vnd.gitlab-workhorse+json", "application/json"]
                        .contains(&media_type.as_str()),
                    "accepted content type {media_type:?}"
                );
                prop_assert_eq!(Some(answer.destination), destination_of(&body));
                prop_assert!(answer.lifetime <= max_lifetime);
                prop_assert!(answer.stale_if_error <= max_stale);
            }
            Err(error) if status != StatusCode::OK => {
                prop_assert_eq!(error.outcome(), Outcome::BadStatus);
            }
            Err(error) => prop_assert_eq!(error.outcome(), Outcome::BadResponse),
        }
    }

    /// Every well-formed answer is accepted, whatever else its object carries, and a lone
    /// `max-age` sets the lifetime up to the cap.
    #[test]
    fn parse_answer_accepts_every_well_formed_answer(
        destination in select(vec![Destination::Iam, Destination::Rails]),
        extra in prop::collection::btree_map("[a-z_]{1,10}", any::<String>(), 0..4),
        content_type in select(vec![
            "application/vnd.gitlab-workhorse+json",
            "application/json",
            "APPLICATION/JSON ; charset=utf-8",
        ]),
        max_age in prop::option::of(any::<u32>()),
        max_lifetime in (0u64..100_000).prop_map(Duration::from_secs),
    ) {
        let mut object: serde_json::Map<String, serde_json::Value> =
            extra.into_iter().map(|(k, v)| (k, v.into())).collect();
        object.insert("destination".to_owned(), destination.as_str().into());
        let body = serde_json::Value::Object(object).to_string();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(max_age) = max_age {
            let value = HeaderValue::from_str(&format!("max-age={max_age}")).unwrap();
            headers.insert(CACHE_CONTROL, value);
        }
        let limits = CacheConfig {
            ttl: max_lifetime,
            max_entries: 1,
            stale_if_error: Duration::from_secs(300),
        };
        let answer = parse_answer(StatusCode::OK, &headers, body.as_bytes(), &limits);
        let answer = answer.map_err(|e| TestCaseError::fail(format!("{e} for {body}")))?;
        prop_assert_eq!(answer.destination, destination);
        let lifetime =
            max_age.map_or(max_lifetime, |s| Duration::from_secs(s.into()).min(max_lifetime));
        prop_assert_eq!(answer.lifetime, lifetime);
    }
}

/// A body client_id and maybe a query one, equal to it about half the time.
fn body_and_query_ids() -> impl Strategy<Value = (String, Option<String>)> {
    printable_id().prop_flat_map(|body_id| {
        let query_id = prop::option::of(prop_oneof![Just(body_id.clone()), printable_id()]);
        (Just(body_id), query_id)
    })
}

/// `iss` of a JWT-ish string when it is a three-part token whose payload is a JSON object
/// with string `iss` = `sub` (RFC 7523 §2.2).
fn issuer_if_equal_to_subject(jwt: &str) -> Option<String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [_, payload, _] = parts[..] else {
        return None;
    };
    let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    match (claims.get("iss")?.as_str(), claims.get("sub")?.as_str()) {
        (Some(iss), Some(sub)) if iss == sub => Some(iss.to_owned()),
        _ => None,
    }
}

/// JSON bodies close to an answer: right and wrong destinations, wrong shapes.
fn answer_body() -> impl Strategy<Value = String> {
    let destination = prop_oneof![
        3 => select(vec!["\"iam\"", "\"rails\""]).prop_map(str::to_owned),
        2 => select(vec![
            "\"iam\"",
            "\"rails\"",
            "\"IAM\"",
            "\"iam \"",
            "null",
            "1",
            "[\"iam\"]"
        ])
        .prop_map(str::to_owned),
        1 => any::<String>().prop_map(|s| serde_json::Value::from(s).to_string()),
    ];
    let key = prop_oneof![
        3 => Just("destination"),
        1 => select(vec!["Destination", "dest", "destination "]),
    ];
    prop_oneof![
        4 => (key, destination).prop_map(|(key, value)| format!("{{\"{key}\":{value}}}")),
        1 => select(vec![
            r#"["iam"]"#,
            r#""iam""#,
            "{}",
            r#"{"destination":"iam","destination":1}"#,
        ])
        .prop_map(str::to_owned),
    ]
}

/// The destination a body names, by the JSON rules DESIGN §4 states.
fn destination_of(body: &[u8]) -> Option<Destination> {
    let body: serde_json::Value = serde_json::from_slice(body).ok()?;
    match body.get("destination")?.as_str()? {
        "iam" => Some(Destination::Iam),
        "rails" => Some(Destination::Rails),
        _ => None,
    }
}

/// RFC 7519 §7.2: a JWT's claims are a JSON object. A payload that is an array of two equal
/// strings has no `iss` and no `sub`, so it names no client.
#[test]
fn assertion_whose_claims_are_an_array_is_malformed() {
    let assertion = jwt(r#"["app","app"]"#);
    let req = Req::post_form(format!("client_assertion={assertion}"));
    assert_eq!(
        req.identify(),
        Identity::Unknown(Unknown::MalformedAssertion),
        "{assertion}"
    );
}
