//! A Redis invalidation message: whatever arrives, it is one client, every client or
//! ignored, and what it reads survives a round trip through `to_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iamproxy_fuzz::check_invalidation(data);
});
