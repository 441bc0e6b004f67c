//! Device public keys: the PEM of the account routes (`device_public_key`, through the daemon's
//! parser) and the DER the store keeps (through the signature check of the application layer).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // DER, as stored and read back for every authorisation.
    let _ = application::signing::device_signature_valid(data, "smartsign", &[0x30, 0]);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(der) = smartsignd::fuzzing::device_public_key_pem(text) {
        // What the routes accept is a P-256 key the signature check takes as one.
        assert_eq!(
            der.len(),
            91,
            "an accepted key is a P-256 SubjectPublicKeyInfo"
        );
        let _ = application::signing::device_signature_valid(&der, "smartsign", &[0x30, 0]);
    }
});
