//! CRLs (DER or PEM), as the status check's fallback reads them (`VerifiedCrl::parse`): issuer,
//! signature, update window, entries. Fields: the issuer certificate (DER); the rest is the CRL.
#![no_main]

use ca_bridge::crl::VerifiedCrl;
use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::{Fields, now};

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let issuer = fields.next();
    let crl = fields.rest();
    if let Ok(list) = VerifiedCrl::parse(crl, issuer, now()) {
        let _ = list.lookup("1");
    }
});
