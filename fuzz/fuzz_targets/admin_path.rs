//! An admin API path: whatever arrives, it names every decision, one client, a bad client
//! id or nothing; a client id it reads comes back unchanged when encoded again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iamproxy_fuzz::check_admin_path(data);
});
