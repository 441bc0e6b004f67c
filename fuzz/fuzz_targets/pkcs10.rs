//! PKCS#10 certification requests (RFC 2986), as a CMP p10cr carries them: decoded, the key
//! checked as the CA checks a subscriber key, the self-signature verified.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ca_bridge::fuzzing::pkcs10(data);
});
