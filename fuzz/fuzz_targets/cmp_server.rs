//! CMP PKIMessages, server side: the embedded CA's CMP server (`CmpServer::handle`, as the
//! `/cmp` route calls it) on a SoftHSM token, with a PBM secret the seed requests use. Its
//! answer must itself be a PKIMessage.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::{ca, now};

fuzz_target!(|data: &[u8]| {
    let ca = ca();
    let answer = ca.runtime.block_on(ca.cmp.handle(data, now()));
    assert!(!answer.is_empty(), "the CMP server always answers");
});
