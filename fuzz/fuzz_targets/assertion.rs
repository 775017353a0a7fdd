//! A `client_assertion` JWT whose payload is the input, so the fuzzer explores the claims
//! past base64url; sent in a form body and in the query. Only a JSON object of claims
//! (RFC 7519 §7.2) may name a client.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Method;
use iamproxy::classify::identify::Source;
use iamproxy_fuzz::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // {"alg":"RS256","typ":"JWT"}; the signature is never checked when routing.
    let jwt = format!(
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{}.c2ln",
        URL_SAFE_NO_PAD.encode(data)
    );
    let parameter = format!("client_assertion={jwt}");
    let mut in_body = Request::new(Method::POST);
    in_body.headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    in_body.body = parameter.clone().into_bytes();
    let mut in_query = Request::new(Method::GET);
    in_query.query = Some(parameter);
    let is_object = serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| v.is_object());
    for request in [in_body, in_query] {
        if let Some(source) = request.check() {
            assert_eq!(source, Source::Assertion);
            assert!(is_object, "claims that are not an object named a client");
        }
    }
});
