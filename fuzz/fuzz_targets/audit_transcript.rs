//! Ceremony transcripts (`transcript.json`, read by `--check-config` and at start): parsed and
//! verified under the audit key. Fields: the audit public key (SPKI PEM); the rest is the
//! transcript.
#![no_main]

use audit_log::{AuditPublicKey, Transcript};
use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let key = AuditPublicKey::from_spki_pem(&fields.next_str());
    let Ok(transcript) = Transcript::parse(fields.rest()) else {
        return;
    };
    if let Ok(key) = key {
        let _ = transcript.verify(&key);
    }
});
