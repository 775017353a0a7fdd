//! Which OAuth client application a buffered OAuth request belongs to: the `Authorization:
//! Basic` user, the form body's or the query's `client_id`, or a client assertion's issuer,
//! all present sources agreeing (README "How a request is routed").

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hyper::header::AUTHORIZATION;
use hyper::HeaderMap;

use crate::classify::assertion;
use crate::classify::params::{Found, Parameters, Part, Unreadable};

/// RFC 6749 sets no limit; the gateway does, so an oversized id never reaches the
/// pre-authorize backend or the decision cache.
const MAX_CLIENT_ID_BYTES: usize = 255;

/// Where the client_id was found, in the order the sources are consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Basic,
    FormBody,
    Query,
    Assertion,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Basic => "basic",
            Source::FormBody => "form_body",
            Source::Query => "query",
            Source::Assertion => "client_assertion",
        }
    }
}

/// Why no single client_id could be trusted for routing; such requests are Rails' to reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    Missing,
    Repeated,
    Disagree,
    Empty,
    TooLong,
    NotPrintable,
    MalformedBasic,
    MalformedAssertion,
    /// A POST body that is not form-encoded: it may hide a client id.
    UnparsableBody,
    /// A form body with invalid percent-encoding.
    MalformedBody,
    /// A query with invalid percent-encoding.
    MalformedQuery,
}

impl Unknown {
    pub fn as_str(self) -> &'static str {
        match self {
            Unknown::Missing => "missing",
            Unknown::Repeated => "repeated",
            Unknown::Disagree => "disagree",
            Unknown::Empty => "empty",
            Unknown::TooLong => "too_long",
            Unknown::NotPrintable => "not_printable",
            Unknown::MalformedBasic => "malformed_basic",
            Unknown::MalformedAssertion => "malformed_assertion",
            Unknown::UnparsableBody => "unparsable_body",
            Unknown::MalformedBody => "malformed_body",
            Unknown::MalformedQuery => "malformed_query",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity<'a> {
    Known {
        client_id: Cow<'a, str>,
        source: Source,
    },
    Unknown(Unknown),
}

impl Identity<'_> {
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Identity::Known { client_id, .. } => Some(client_id),
            Identity::Unknown(_) => None,
        }
    }

    /// Where the id came from, or why there is none: the decision log's `identification`.
    pub fn label(&self) -> &'static str {
        match self {
            Identity::Known { source, .. } => source.as_str(),
            Identity::Unknown(unknown) => unknown.as_str(),
        }
    }
}

/// Identifies the client application from the `Authorization` header and the request's
/// parameters; every present source must be valid and agree.
pub fn identify<'a>(headers: &HeaderMap, params: &Parameters<'a>) -> Identity<'a> {
    match agreed_client_id(headers, params) {
        Ok((client_id, source)) => Identity::Known { client_id, source },
        Err(unknown) => Identity::Unknown(unknown),
    }
}

fn agreed_client_id<'a>(
    headers: &HeaderMap,
    params: &Parameters<'a>,
) -> Result<(Cow<'a, str>, Source), Unknown> {
    let sources = [
        (Source::Basic, basic_user(headers)),
        (
            Source::FormBody,
            client_id_in(&params.body, Unknown::MalformedBody),
        ),
        (
            Source::Query,
            client_id_in(&params.query, Unknown::MalformedQuery),
        ),
        (Source::Assertion, assertion_issuer(params)),
    ];
    let mut agreed: Option<(Cow<'a, str>, Source)> = None;
    for (source, found) in sources {
        let value = match found? {
            Found::Absent => continue,
            Found::Repeated => return Err(Unknown::Repeated),
            Found::One(value) => valid(value)?,
        };
        match &agreed {
            None => agreed = Some((value, source)),
            Some((first, _)) if *first != value => return Err(Unknown::Disagree),
            Some(_) => {}
        }
    }
    agreed.ok_or(Unknown::Missing)
}

fn valid(client_id: Cow<'_, str>) -> Result<Cow<'_, str>, Unknown> {
    if client_id.is_empty() {
        Err(Unknown::Empty)
    } else if client_id.len() > MAX_CLIENT_ID_BYTES {
        Err(Unknown::TooLong)
    } else if !client_id.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        Err(Unknown::NotPrintable)
    } else {
        Ok(client_id)
    }
}

/// The `client_id` of a query or body; an unreadable one may hide it.
fn client_id_in<'a>(part: &Part<'a>, malformed: Unknown) -> Result<Found<Cow<'a, str>>, Unknown> {
    match part {
        Part::Absent => Ok(Found::Absent),
        Part::Read(params) => Ok(params.client_id.clone()),
        Part::Unreadable(Unreadable::NotForm) => Err(Unknown::UnparsableBody),
        Part::Unreadable(Unreadable::Malformed) => Err(malformed),
    }
}

/// The user part of `Authorization: Basic`; other schemes (Bearer) are not a source.
fn basic_user<'a>(headers: &HeaderMap) -> Result<Found<Cow<'a, str>>, Unknown> {
    let credentials = headers.get_all(AUTHORIZATION).iter().filter_map(|value| {
        let value = value.as_bytes();
        // A bare "Basic" has no space; it is still Basic, with empty (malformed) credentials.
        let (scheme, credentials) = match value.iter().position(|&b| b == b' ') {
            Some(space) => (&value[..space], value[space..].trim_ascii()),
            None => (value, &b""[..]),
        };
        scheme.eq_ignore_ascii_case(b"basic").then_some(credentials)
    });
    let credentials = match Found::at_most_one(credentials) {
        Found::One(credentials) => credentials,
        Found::Absent => return Ok(Found::Absent),
        Found::Repeated => return Ok(Found::Repeated),
    };
    let decoded = STANDARD
        .decode(credentials)
        .map_err(|_| Unknown::MalformedBasic)?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(Unknown::MalformedBasic)?;
    // RFC 6749 §2.3.1: the user is form-urlencoded, so '+' is a space. Invalid UTF-8 becomes
    // U+FFFD, which the printable check then rejects.
    let user: Vec<u8> = decoded[..colon]
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    let user = percent_encoding::percent_decode(&user).decode_utf8_lossy();
    Ok(Found::One(Cow::Owned(user.into_owned())))
}

/// The issuer of a `client_assertion` JWT (form body, else query). Read only to route:
/// the signature is never checked here, the upstream verifies it.
fn assertion_issuer<'a>(params: &Parameters<'a>) -> Result<Found<Cow<'a, str>>, Unknown> {
    let in_body = params.body.params().map(|body| &body.client_assertion);
    let found = match in_body {
        None | Some(Found::Absent) => match params.query.params() {
            Some(query) => &query.client_assertion,
            None => return Ok(Found::Absent),
        },
        Some(found) => found,
    };
    Ok(match found {
        Found::One(jwt) => Found::One(Cow::Owned(
            assertion::issuer(jwt).ok_or(Unknown::MalformedAssertion)?,
        )),
        Found::Absent => Found::Absent,
        Found::Repeated => Found::Repeated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::params::tests::Req;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hyper::Method;

    /// Identification of a test request, as `proxy::decide` reads it (no IAM prefixes:
    /// they play no part in identification).
    trait Identify {
        fn identify(&self) -> Identity<'_>;
    }

    impl Identify for Req {
        fn identify(&self) -> Identity<'_> {
            identify(&self.headers, &Parameters::read(&self.view(), &[]))
        }
    }

    fn known(client_id: &str, source: Source) -> Identity<'static> {
        Identity::Known {
            client_id: Cow::Owned(client_id.to_owned()),
            source,
        }
    }

    fn unknown(reason: Unknown) -> Identity<'static> {
        Identity::Unknown(reason)
    }

    /// An unsigned-looking JWT: identification never checks the signature.
    fn jwt(claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{payload}.c2lnbmF0dXJl")
    }

    fn assertion_body(assertion: &str) -> Req {
        Req::post_form(&format!(
            "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}"
        ))
    }

    #[test]
    fn basic_user_is_the_client_id() {
        let req = Req::post_form("grant_type=client_credentials").basic("app:secret");
        assert_eq!(req.identify(), known("app", Source::Basic));
    }

    #[test]
    fn basic_scheme_is_case_insensitive() {
        let credentials = STANDARD.encode("app:secret");
        let req = Req::default().authorization(&format!("bAsIc {credentials}"));
        assert_eq!(req.identify(), known("app", Source::Basic));
    }

    #[test]
    fn basic_user_is_form_urlencoded() {
        for user in ["my%20app", "my+app"] {
            let req = Req::default().basic(&format!("{user}:secret"));
            assert_eq!(req.identify(), known("my app", Source::Basic), "{user}");
        }
    }

    #[test]
    fn basic_password_may_contain_colons() {
        let req = Req::default().basic("app:pa:ss:word");
        assert_eq!(req.identify(), known("app", Source::Basic));
    }

    #[test]
    fn basic_without_colon_is_malformed() {
        let req = Req::default().basic("app");
        assert_eq!(req.identify(), unknown(Unknown::MalformedBasic));
        let req = Req::default().authorization("Basic");
        assert_eq!(req.identify(), unknown(Unknown::MalformedBasic));
    }

    #[test]
    fn basic_with_broken_base64_is_malformed() {
        let req = Req::default().authorization("Basic not*base64!");
        assert_eq!(req.identify(), unknown(Unknown::MalformedBasic));
    }

    #[test]
    fn basic_with_empty_user_is_empty() {
        let req = Req::default().basic(":secret");
        assert_eq!(req.identify(), unknown(Unknown::Empty));
    }

    #[test]
    fn two_basic_headers_are_repeated() {
        let req = Req::default().basic("app:secret").basic("app:secret");
        assert_eq!(req.identify(), unknown(Unknown::Repeated));
    }

    #[test]
    fn bearer_is_not_a_source() {
        let req = Req::get("client_id=app").authorization("Bearer giat_abc");
        assert_eq!(req.identify(), known("app", Source::Query));
        let req = Req::default().authorization("Bearer giat_abc");
        assert_eq!(req.identify(), unknown(Unknown::Missing));
    }

    #[test]
    fn form_body_client_id_is_borrowed() {
        let req = Req::post_form("grant_type=authorization_code&client_id=app&code=x");
        assert_eq!(req.identify(), known("app", Source::FormBody));
        assert!(matches!(
            req.identify(),
            Identity::Known {
                client_id: Cow::Borrowed(_),
                ..
            }
        ));
    }

    #[test]
    fn query_client_id_is_borrowed() {
        let req = Req::get("response_type=code&client_id=app");
        assert_eq!(req.identify(), known("app", Source::Query));
        assert!(matches!(
            req.identify(),
            Identity::Known {
                client_id: Cow::Borrowed(_),
                ..
            }
        ));
    }

    #[test]
    fn percent_encoded_query_client_id_is_decoded() {
        assert_eq!(
            Req::get("client_id=my%2Fapp").identify(),
            known("my/app", Source::Query)
        );
    }

    #[test]
    fn form_content_type_ignores_case_and_parameters() {
        for content_type in [
            "application/x-www-form-urlencoded; charset=utf-8",
            "Application/X-WWW-Form-URLEncoded",
        ] {
            let req = Req::post(content_type, "client_id=app");
            assert_eq!(
                req.identify(),
                known("app", Source::FormBody),
                "{content_type}"
            );
        }
    }

    #[test]
    fn non_form_post_body_is_unparsable() {
        let req = Req::post("application/json", r#"{"client_id":"app"}"#).query("client_id=app");
        assert_eq!(req.identify(), unknown(Unknown::UnparsableBody));
    }

    #[test]
    fn post_body_without_content_type_is_unparsable() {
        let req = Req {
            method: Method::POST,
            body: b"client_id=app".to_vec(),
            ..Req::default()
        };
        assert_eq!(req.identify(), unknown(Unknown::UnparsableBody));
    }

    #[test]
    fn empty_post_body_is_not_a_source() {
        let req = Req::post("application/json", "").query("client_id=app");
        assert_eq!(req.identify(), known("app", Source::Query));
    }

    #[test]
    fn get_ignores_its_body() {
        let mut req = Req::get("client_id=app");
        req.body = b"client_id=other".to_vec();
        assert_eq!(req.identify(), known("app", Source::Query));
    }

    #[test]
    fn no_source_is_missing() {
        assert_eq!(
            Req::post_form("grant_type=client_credentials").identify(),
            unknown(Unknown::Missing)
        );
        assert_eq!(Req::default().identify(), unknown(Unknown::Missing));
    }

    #[test]
    fn repeated_client_id_in_query_is_repeated() {
        let req = Req::get("client_id=app&client_id=app");
        assert_eq!(req.identify(), unknown(Unknown::Repeated));
    }

    #[test]
    fn repeated_client_id_in_body_is_repeated() {
        let req = Req::post_form("client_id=app&client_id=app");
        assert_eq!(req.identify(), unknown(Unknown::Repeated));
    }

    #[test]
    fn query_and_body_disagreeing_is_disagree() {
        let req = Req::post_form("client_id=app").query("client_id=other");
        assert_eq!(req.identify(), unknown(Unknown::Disagree));
    }

    #[test]
    fn basic_and_body_disagreeing_is_disagree() {
        let req = Req::post_form("client_id=other").basic("app:secret");
        assert_eq!(req.identify(), unknown(Unknown::Disagree));
    }

    #[test]
    fn assertion_and_query_disagreeing_is_disagree() {
        let assertion = jwt(serde_json::json!({"iss": "app", "sub": "app"}));
        let req = assertion_body(&assertion).query("client_id=other");
        assert_eq!(req.identify(), unknown(Unknown::Disagree));
    }

    #[test]
    fn agreeing_sources_report_the_first() {
        let req = Req::post_form("client_id=app").basic("app:secret");
        assert_eq!(req.identify(), known("app", Source::Basic));
        let req = Req::post_form("client_id=app").query("client_id=app");
        assert_eq!(req.identify(), known("app", Source::FormBody));
    }

    #[test]
    fn invalid_later_source_spoils_a_valid_first() {
        let req = Req::get("client_id=app&client_id=app").basic("app:secret");
        assert_eq!(req.identify(), unknown(Unknown::Repeated));
    }

    #[test]
    fn empty_client_id_is_empty() {
        assert_eq!(Req::get("client_id=").identify(), unknown(Unknown::Empty));
    }

    #[test]
    fn client_id_of_255_bytes_is_accepted_and_256_is_too_long() {
        let longest = "a".repeat(255);
        let req = Req::get(&format!("client_id={longest}"));
        assert_eq!(req.identify(), known(&longest, Source::Query));
        let req = Req::get(&format!("client_id={longest}a"));
        assert_eq!(req.identify(), unknown(Unknown::TooLong));
    }

    #[test]
    fn non_printable_client_id_is_not_printable() {
        for encoded in ["a%09b", "a%7Fb", "a%00b", "caf%C3%A9", "a%FFb"] {
            let req = Req::get(&format!("client_id={encoded}"));
            assert_eq!(req.identify(), unknown(Unknown::NotPrintable), "{encoded}");
        }
        let req = Req::post_form("client_id=caf\u{e9}");
        assert_eq!(req.identify(), unknown(Unknown::NotPrintable));
    }

    #[test]
    fn assertion_issuer_equal_to_subject_is_the_client_id() {
        let assertion = jwt(serde_json::json!({"iss": "app", "sub": "app", "aud": "x"}));
        assert_eq!(
            assertion_body(&assertion).identify(),
            known("app", Source::Assertion)
        );
    }

    #[test]
    fn assertion_in_query_is_read_when_body_has_none() {
        let assertion = jwt(serde_json::json!({"iss": "app", "sub": "app"}));
        let req = Req::get(&format!("client_assertion={assertion}"));
        assert_eq!(req.identify(), known("app", Source::Assertion));
    }

    #[test]
    fn assertion_agreeing_with_body_client_id_reports_the_body() {
        let assertion = jwt(serde_json::json!({"iss": "app", "sub": "app"}));
        let req = Req::post_form(&format!("client_id=app&client_assertion={assertion}"));
        assert_eq!(req.identify(), known("app", Source::FormBody));
    }

    #[test]
    fn assertion_issuer_other_than_subject_is_malformed() {
        let assertion = jwt(serde_json::json!({"iss": "app", "sub": "user-42"}));
        assert_eq!(
            assertion_body(&assertion).identify(),
            unknown(Unknown::MalformedAssertion)
        );
    }

    #[test]
    fn assertion_without_subject_is_malformed() {
        let assertion = jwt(serde_json::json!({"iss": "app"}));
        assert_eq!(
            assertion_body(&assertion).identify(),
            unknown(Unknown::MalformedAssertion)
        );
    }

    #[test]
    fn assertion_with_non_string_issuer_is_malformed() {
        let assertion = jwt(serde_json::json!({"iss": 7, "sub": 7}));
        assert_eq!(
            assertion_body(&assertion).identify(),
            unknown(Unknown::MalformedAssertion)
        );
    }

    #[test]
    fn assertion_that_is_not_a_jwt_is_malformed() {
        for assertion in ["app", "a.b", "a.b.c.d"] {
            assert_eq!(
                assertion_body(assertion).identify(),
                unknown(Unknown::MalformedAssertion),
                "{assertion}"
            );
        }
    }

    #[test]
    fn assertion_with_bad_base64_or_json_is_malformed() {
        let not_json = URL_SAFE_NO_PAD.encode("not json");
        for assertion in ["e30.***.sig".to_owned(), format!("e30.{not_json}.sig")] {
            assert_eq!(
                assertion_body(&assertion).identify(),
                unknown(Unknown::MalformedAssertion),
                "{assertion}"
            );
        }
    }

    #[test]
    fn assertion_whose_claims_are_not_utf8_is_malformed() {
        // The `assertion` fuzz target's find, minimised: invalid UTF-8 in a claim nobody reads.
        let payload = URL_SAFE_NO_PAD.encode(b"{\"iss\":\"app\",\"sub\":\"app\",\"aud\":\"\xf8\"}");
        let assertion = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln");
        assert_eq!(
            assertion_body(&assertion).identify(),
            unknown(Unknown::MalformedAssertion)
        );
    }

    #[test]
    fn labels_are_snake_case() {
        assert_eq!(Source::Assertion.as_str(), "client_assertion");
        assert_eq!(Source::FormBody.as_str(), "form_body");
        assert_eq!(Unknown::MalformedBasic.as_str(), "malformed_basic");
        assert_eq!(Unknown::UnparsableBody.as_str(), "unparsable_body");
    }

    #[test]
    fn invalid_percent_encoding_makes_the_client_unknown() {
        for body in [
            "client_id=app%ZZ",
            "client_id=app&scope=%",
            "client_id=app%4",
        ] {
            let req = Req::post_form(body);
            assert_eq!(req.identify(), unknown(Unknown::MalformedBody), "{body}");
        }
        let req = Req::get("client_id=app&state=%zz");
        assert_eq!(req.identify(), unknown(Unknown::MalformedQuery));
        let req = Req::post_form("client_id=app").query("x=%");
        assert_eq!(req.identify(), unknown(Unknown::MalformedQuery));
        let req = Req::post_form("client_id=app")
            .basic("app:secret")
            .query("a=%G0");
        assert_eq!(req.identify(), unknown(Unknown::MalformedQuery));
    }
}
