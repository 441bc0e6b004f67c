//! Device signatures: an ECDSA signature (DER) over a statement under a stored device key, as
//! every authorisation and consent checks it. Fields: the key (DER), the statement; the rest is
//! the signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let key = fields.next();
    let statement = fields.next_str();
    let signature = fields.rest();
    let _ = application::signing::device_signature_valid(key, &statement, signature);
});
