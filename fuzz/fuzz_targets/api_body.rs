//! The API's JSON request bodies, as each route parses them before any workflow runs: the first
//! byte picks the route (`smartsignd::fuzzing::API_BODIES` of them), the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((route, body)) = data.split_first() {
        smartsignd::fuzzing::api_body(*route, body);
    }
});
