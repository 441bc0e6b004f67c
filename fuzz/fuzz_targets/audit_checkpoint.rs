//! Audit checkpoints (`checkpoint.json`, and the exports `smartsign-ctl audit verify` checks):
//! parsed, verified under the audit key, and written back: what parses must write a form that
//! parses to the same checkpoint. Fields: the audit public key (SPKI PEM); the rest is the
//! checkpoint.
#![no_main]

use audit_log::{AuditPublicKey, Checkpoint};
use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let key = AuditPublicKey::from_spki_pem(&fields.next_str());
    let json = fields.rest();
    let Ok(checkpoint) = Checkpoint::from_json(json) else {
        return;
    };
    if let Ok(key) = &key {
        let _ = checkpoint.verify(key);
    }
    let written = checkpoint.to_json();
    let again = Checkpoint::from_json(&written).expect("a written checkpoint parses");
    assert_eq!(
        again.to_json(),
        written,
        "a checkpoint has one written form"
    );
    // The export check starts the same way (an empty export of a tree of size 0 verifies).
    if let Ok(pem) = key.as_ref().map(AuditPublicKey::to_spki_pem) {
        let _ = audit_log::verify_export(b"", json, &pem.unwrap_or_default());
    }
});
