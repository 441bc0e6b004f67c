//! Stored key references (the blobs the store keeps for each user key, and KEK ids): decoded,
//! and what decodes must encode to bytes that decode to the same reference (an older version
//! is written anew in the current one).
#![no_main]

use hsm_adapter::{KekId, UserKeyRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = KekId::from_bytes(data);
    if let Ok(key) = UserKeyRef::from_bytes(data) {
        let written = key.to_bytes();
        let again = UserKeyRef::from_bytes(&written).expect("a written key reference decodes");
        assert_eq!(
            again.to_bytes(),
            written,
            "a key reference has one encoding"
        );
        let _ = key.public_key().to_pem();
    }
});
