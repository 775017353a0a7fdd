//! A pre-authorize backend answer: status, Content-Type, Cache-Control and body from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iamproxy_fuzz::check_answer(data);
});
