//! Any request: method, Content-Type, query, Authorization headers and body from the input.
#![no_main]

use iamproxy_fuzz::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    Request::from_bytes(data).check();
});
