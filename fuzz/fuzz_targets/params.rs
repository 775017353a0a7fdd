//! The strict reader of a query or form body, against `form_urlencoded`: it refuses exactly
//! the inputs with a `%` not followed by two hex digits, and on the others reads the same
//! `client_id` and the same issuer of codes and tokens.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iamproxy_fuzz::check_params(data);
});
