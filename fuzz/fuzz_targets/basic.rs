//! `Authorization: Basic` whose decoded credentials are the input, so the fuzzer explores
//! the user part past base64; also the input as the raw header value.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hyper::Method;
use iamproxy::classify::identify::Source;
use iamproxy_fuzz::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut encoded = Request::new(Method::GET);
    encoded.authorization(format!("Basic {}", STANDARD.encode(data)).as_bytes());
    if let Some(source) = encoded.check() {
        assert_eq!(source, Source::Basic);
    }
    let mut raw = Request::new(Method::GET);
    raw.authorization(data);
    raw.check();
});
