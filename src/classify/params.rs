//! The parameters of a buffered OAuth request that routing reads, from its query and its
//! form body: one strict pass over each, decoding only the values it keeps.
//!
//! Strict means as Go's `url.ParseQuery` (and so Workhorse) reads a form: a `%` that is not
//! followed by two hex digits makes the whole query or body unreadable, and an unreadable
//! part is never half-read for a client id or a token.

use std::borrow::Cow;

use hyper::header::CONTENT_TYPE;
use hyper::{HeaderMap, Method};

const FORM_MEDIA_TYPE: &str = "application/x-www-form-urlencoded";

/// The parts of a request that identification and continuity read; the body is buffered.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// How many times something occurs where at most once is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Found<T> {
    #[default]
    Absent,
    Repeated,
    One(T),
}

impl<T> Found<T> {
    pub(crate) fn at_most_one(mut items: impl Iterator<Item = T>) -> Found<T> {
        match (items.next(), items.next()) {
            (None, _) => Found::Absent,
            (Some(item), None) => Found::One(item),
            (Some(_), Some(_)) => Found::Repeated,
        }
    }

    /// One more occurrence.
    fn add(&mut self, item: T) {
        *self = match std::mem::take(self) {
            Found::Absent => Found::One(item),
            Found::One(_) | Found::Repeated => Found::Repeated,
        };
    }
}

/// Who issued the codes and tokens (`code`, `refresh_token`, `device_code`, `token`) a
/// request carries. Ordered: one IAM-issued value outweighs any number of others, and any
/// non-empty value outweighs none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Tokens {
    /// None, or only empty values.
    #[default]
    None,
    /// At least one non-empty value, none with an `iam.token_prefixes` prefix.
    Rails,
    /// At least one value with an `iam.token_prefixes` prefix.
    Iam,
}

/// The names of the parameters that carry a code or a token.
pub const TOKEN_PARAMS: [&str; 4] = ["code", "refresh_token", "device_code", "token"];

/// What routing reads from one urlencoded query or form body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Params<'a> {
    pub client_id: Found<Cow<'a, str>>,
    pub client_assertion: Found<Cow<'a, str>>,
    /// Still encoded: only whether it is empty matters.
    pub login_verifier: Found<&'a [u8]>,
    pub consent_verifier: Found<&'a [u8]>,
    /// Every occurrence counts, repeated ones included: a repeated token is still a token.
    pub tokens: Tokens,
}

/// A query or body that is not `application/x-www-form-urlencoded` as a strict reader
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl<'a> Params<'a> {
    /// Reads `encoded` as `form_urlencoded::parse` does ('+' is a space, then
    /// percent-decoding, invalid UTF-8 as U+FFFD), but refuses invalid percent-encoding,
    /// and decodes a value only when routing keeps it: the others (a `redirect_uri`, a
    /// `client_secret`) are never copied.
    pub fn read(encoded: &'a [u8], token_prefixes: &[String]) -> Result<Params<'a>, Malformed> {
        let mut params = Params::default();
        // One pass over the bytes: where each pair ends, where its value starts, and
        // whether either side needs decoding at all (most need none).
        let mut pair = Pair::default();
        for (i, &byte) in encoded.iter().enumerate() {
            match byte {
                b'&' => {
                    params.add(&encoded[pair.start..i], &pair, token_prefixes)?;
                    pair = Pair {
                        start: i + 1,
                        ..Pair::default()
                    };
                }
                b'=' if pair.equals.is_none() => pair.equals = Some(i - pair.start),
                b'%' | b'+' => {
                    pair.percent |= byte == b'%';
                    match pair.equals {
                        None => pair.escaped_key = true,
                        Some(_) => pair.escaped_value = true,
                    }
                }
                _ => {}
            }
        }
        params.add(&encoded[pair.start..], &pair, token_prefixes)?;
        Ok(params)
    }

    /// One `name=value` pair, as [`Params::read`]'s pass found it.
    fn add(
        &mut self,
        raw: &'a [u8],
        pair: &Pair,
        token_prefixes: &[String],
    ) -> Result<(), Malformed> {
        if raw.is_empty() {
            return Ok(());
        }
        if pair.percent && !well_encoded(raw) {
            return Err(Malformed);
        }
        let (key, value) = match pair.equals {
            Some(equals) => (&raw[..equals], &raw[equals + 1..]),
            None => (raw, &b""[..]),
        };
        let key = if pair.escaped_key {
            Cow::Owned(decode(key).into_owned().into_bytes())
        } else {
            Cow::Borrowed(key)
        };
        let value_of = |value| match pair.escaped_value {
            true => decode(value),
            false => String::from_utf8_lossy(value),
        };
        match &*key {
            b"client_id" => self.client_id.add(value_of(value)),
            b"client_assertion" => self.client_assertion.add(value_of(value)),
            b"login_verifier" => self.login_verifier.add(value),
            b"consent_verifier" => self.consent_verifier.add(value),
            b"code" | b"refresh_token" | b"device_code" | b"token" => {
                let issued = issuer(&value_of(value), token_prefixes);
                self.tokens = self.tokens.max(issued);
            }
            _ => {}
        }
        Ok(())
    }
}

/// What [`Params::read`] knows of the pair it is in.
#[derive(Default)]
struct Pair {
    start: usize,
    /// The first `=`, from the pair's start.
    equals: Option<usize>,
    /// A `%` or `+` before the first `=`, or after it.
    escaped_key: bool,
    escaped_value: bool,
    percent: bool,
}

fn issuer(token: &str, token_prefixes: &[String]) -> Tokens {
    if token.is_empty() {
        Tokens::None
    } else if token_prefixes.iter().any(|p| token.starts_with(p.as_str())) {
        Tokens::Iam
    } else {
        Tokens::Rails
    }
}

/// Every `%` starts a `%XX` escape.
fn well_encoded(raw: &[u8]) -> bool {
    let mut rest = raw;
    while let Some(percent) = rest.iter().position(|&b| b == b'%') {
        match rest.get(percent + 1..percent + 3) {
            Some([high, low]) if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                rest = &rest[percent + 3..];
            }
            _ => return false,
        }
    }
    true
}

/// application/x-www-form-urlencoded decoding of one name or value: '+' is a space, then
/// percent-decoding, then UTF-8 with U+FFFD for what is not.
fn decode(raw: &[u8]) -> Cow<'_, str> {
    if raw.contains(&b'+') {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        Cow::Owned(
            percent_encoding::percent_decode(&spaced)
                .decode_utf8_lossy()
                .into_owned(),
        )
    } else {
        percent_encoding::percent_decode(raw).decode_utf8_lossy()
    }
}

/// One part of a request as routing sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Part<'a> {
    /// No query; or no body, or a body that is not a POST's.
    Absent,
    Read(Params<'a>),
    /// Present but unreadable: it may hide a client id or a token.
    Unreadable(Unreadable),
}

/// Why a query or body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// A POST body whose one `Content-Type` is not the form type (or that has none, or two).
    NotForm,
    /// Invalid percent-encoding.
    Malformed,
}

impl<'a> Part<'a> {
    fn read(encoded: &'a [u8], token_prefixes: &[String]) -> Part<'a> {
        match Params::read(encoded, token_prefixes) {
            Ok(params) => Part::Read(params),
            Err(Malformed) => Part::Unreadable(Unreadable::Malformed),
        }
    }

    /// The parameters, if this part was read.
    pub fn params(&self) -> Option<&Params<'a>> {
        match self {
            Part::Read(params) => Some(params),
            Part::Absent | Part::Unreadable(_) => None,
        }
    }
}

/// A buffered OAuth request's query and form body, each read once.
#[derive(Debug, PartialEq, Eq)]
pub struct Parameters<'a> {
    pub query: Part<'a>,
    pub body: Part<'a>,
}

impl<'a> Parameters<'a> {
    pub fn read(view: &RequestView<'a>, token_prefixes: &[String]) -> Parameters<'a> {
        let query = match view.query {
            None => Part::Absent,
            Some(query) => Part::read(query.as_bytes(), token_prefixes),
        };
        let body = if view.method != Method::POST || view.body.is_empty() {
            Part::Absent
        } else if is_form(view.headers) {
            Part::read(view.body, token_prefixes)
        } else {
            Part::Unreadable(Unreadable::NotForm)
        };
        Parameters { query, body }
    }

    /// Who issued the codes and tokens of the parts that could be read.
    pub fn tokens(&self) -> Tokens {
        [&self.query, &self.body]
            .into_iter()
            .filter_map(Part::params)
            .map(|params| params.tokens)
            .max()
            .unwrap_or_default()
    }
}

/// Whether the body is form-encoded. Two `Content-Type` headers could be read differently
/// by Rails and IAM, so they are not.
fn is_form(headers: &HeaderMap) -> bool {
    match Found::at_most_one(headers.get_all(CONTENT_TYPE).iter()) {
        // Visible ASCII only (`to_str`), so trimming ASCII whitespace is `str::trim`.
        Found::One(value) => value.to_str().is_ok_and(|value| {
            let media_type = match value.find(';') {
                Some(semicolon) => &value[..semicolon],
                None => value,
            };
            media_type
                .trim_ascii()
                .eq_ignore_ascii_case(FORM_MEDIA_TYPE)
        }),
        Found::Absent | Found::Repeated => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION};

    /// An owned request that lends out a `RequestView`; shared with the identification
    /// and issuer tests.
    #[derive(Default)]
    pub(crate) struct Req {
        pub(crate) method: Method,
        pub(crate) query: Option<String>,
        pub(crate) headers: HeaderMap,
        pub(crate) body: Vec<u8>,
    }

    impl Req {
        pub(crate) fn get(query: &str) -> Req {
            Req::default().query(query)
        }

        pub(crate) fn post_form(body: &str) -> Req {
            Req::post(FORM_MEDIA_TYPE, body)
        }

        pub(crate) fn post(content_type: &str, body: &str) -> Req {
            let req = Req {
                method: Method::POST,
                body: body.as_bytes().to_vec(),
                ..Req::default()
            };
            req.header(CONTENT_TYPE, content_type)
        }

        pub(crate) fn query(mut self, query: &str) -> Req {
            self.query = Some(query.to_owned());
            self
        }

        pub(crate) fn header(mut self, name: HeaderName, value: &str) -> Req {
            let value = HeaderValue::from_str(value).expect("valid header value");
            self.headers.append(name, value);
            self
        }

        pub(crate) fn authorization(self, value: &str) -> Req {
            self.header(AUTHORIZATION, value)
        }

        pub(crate) fn basic(self, credentials: &str) -> Req {
            self.authorization(&format!("Basic {}", STANDARD.encode(credentials)))
        }

        pub(crate) fn view(&self) -> RequestView<'_> {
            RequestView {
                method: &self.method,
                query: self.query.as_deref(),
                headers: &self.headers,
                body: &self.body,
            }
        }
    }

    fn prefixes() -> Vec<String> {
        vec!["giat_".to_owned(), "ory_".to_owned()]
    }

    fn read(encoded: &str) -> Result<Params<'_>, Malformed> {
        Params::read(encoded.as_bytes(), &prefixes())
    }

    fn tokens(encoded: &str) -> Tokens {
        read(encoded).expect("well-formed").tokens
    }

    #[test]
    fn invalid_percent_encoding_anywhere_is_malformed() {
        for encoded in [
            "client_id=app%ZZ",
            "client_id=app%",
            "client_id=app%4",
            "client_id=app&state=%zz",
            "x%G1=1&client_id=app",
            "%",
            "code=%2",
        ] {
            assert_eq!(read(encoded), Err(Malformed), "{encoded}");
        }
    }

    #[test]
    fn valid_escapes_in_any_case_are_read() {
        let params = read("client_id=my%2fapp&state=%C3%A9%41").unwrap();
        assert_eq!(params.client_id, Found::One(Cow::from("my/app")));
    }

    #[test]
    fn values_are_borrowed_unless_they_need_decoding() {
        let params = read("grant_type=x&client_id=app&client_assertion=a+b").unwrap();
        assert!(matches!(params.client_id, Found::One(Cow::Borrowed("app"))));
        assert!(matches!(params.client_assertion, Found::One(Cow::Owned(ref v)) if v == "a b"));
    }

    #[test]
    fn encoded_names_are_decoded_before_they_are_matched() {
        let params = read("client%5Fid=app&refresh%5ftoken=giat_x").unwrap();
        assert_eq!(params.client_id, Found::One(Cow::from("app")));
        assert_eq!(params.tokens, Tokens::Iam);
    }

    #[test]
    fn repeats_are_reported() {
        assert_eq!(
            read("client_id=a&client_id=a").unwrap().client_id,
            Found::Repeated
        );
        assert_eq!(
            read("login_verifier=v").unwrap().login_verifier,
            Found::One(&b"v"[..])
        );
        assert_eq!(
            read("login_verifier=v&login_verifier=v")
                .unwrap()
                .login_verifier,
            Found::Repeated
        );
    }

    #[test]
    fn each_token_parameter_names_its_issuer() {
        for name in TOKEN_PARAMS {
            assert_eq!(tokens(&format!("{name}=giat_abc")), Tokens::Iam, "{name}");
            assert_eq!(tokens(&format!("{name}=ory_abc")), Tokens::Iam, "{name}");
            assert_eq!(
                tokens(&format!("{name}=abc_giat_")),
                Tokens::Rails,
                "{name}"
            );
            assert_eq!(tokens(&format!("{name}=")), Tokens::None, "{name}");
        }
        assert_eq!(
            tokens("grant_type=client_credentials&client_id=a"),
            Tokens::None
        );
    }

    #[test]
    fn an_iam_value_outweighs_any_other_and_repeats_count() {
        assert_eq!(tokens("code=plain&refresh_token=giat_x"), Tokens::Iam);
        assert_eq!(tokens("token=giat_x&token=plain"), Tokens::Iam);
        assert_eq!(tokens("token=plain&token=plain"), Tokens::Rails);
        assert_eq!(tokens("code=&token=plain"), Tokens::Rails);
    }

    #[test]
    fn the_prefix_is_checked_on_the_decoded_value() {
        assert_eq!(tokens("refresh_token=%67iat_abc"), Tokens::Iam);
        assert_eq!(
            tokens("refresh_token=+giat_abc"),
            Tokens::Rails,
            "a leading space"
        );
    }

    proptest::proptest! {
        /// On what it accepts, the reader agrees with `form_urlencoded` on every value of
        /// every name routing keeps; it refuses exactly the strings with a bad escape.
        #[test]
        fn reads_exactly_as_form_urlencoded_does_or_refuses_a_bad_escape(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "client_id", "client%5Fid", "client+id", "code", "token", "a", "=", "&",
                    "&&", "%", "%2", "%41", "+", "%C3%A9", "%FF", "é", "x", "giat_",
                ]),
                0..12,
            )
        ) {
            let encoded = parts.concat();
            let bad_escape = encoded.as_bytes().iter().enumerate().any(|(i, &b)| {
                b == b'%'
                    && !encoded.as_bytes().get(i + 1..i + 3)
                        .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            });
            let read = read(&encoded);
            proptest::prop_assert_eq!(read.is_err(), bad_escape);
            let Ok(params) = read else { return Ok(()) };
            let values = |name: &str| -> Vec<String> {
                form_urlencoded::parse(encoded.as_bytes())
                    .filter(|(key, _)| key == name)
                    .map(|(_, value)| value.into_owned())
                    .collect()
            };
            let reference = Found::at_most_one(values("client_id").into_iter());
            proptest::prop_assert_eq!(params.client_id.map_cow(), reference);
            let reference_tokens = ["code", "token"]
                .into_iter()
                .flat_map(values)
                .map(|token| issuer(&token, &prefixes()))
                .max()
                .unwrap_or_default();
            proptest::prop_assert_eq!(params.tokens, reference_tokens);
        }
    }

    impl Found<Cow<'_, str>> {
        fn map_cow(self) -> Found<String> {
            match self {
                Found::Absent => Found::Absent,
                Found::Repeated => Found::Repeated,
                Found::One(value) => Found::One(value.into_owned()),
            }
        }
    }
}
