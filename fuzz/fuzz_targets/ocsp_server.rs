//! OCSP requests: the embedded CA's responder (`EmbeddedCa::ocsp_response`, as the `/ocsp`
//! route calls it for POST, and after `request_from_get_path` for GET) on a SoftHSM token. The
//! first byte picks POST (even) or GET (odd).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::{ca, now};

fuzz_target!(|data: &[u8]| {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    let request = if method % 2 == 0 {
        body.to_vec()
    } else {
        let Ok(path) = std::str::from_utf8(body) else {
            return;
        };
        match ca_bridge::ocsp::request_from_get_path(path) {
            Ok(der) => der,
            Err(_) => return,
        }
    };
    let ca = ca();
    let answer = ca.runtime.block_on(ca.ca.ocsp_response(
        &request,
        now(),
        Duration::from_secs(600),
    ));
    assert!(!answer.is_empty(), "the responder always answers");
});
