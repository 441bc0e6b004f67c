//! X.509 certificates from the network (extraCerts of CMP messages, OCSP delegates, the RA and
//! client certificates): decoded and put through the crate's checks (issuer name and signature,
//! validity, serial, subject key). Fields: the issuer certificate; the rest is the certificate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::{Fields, now};

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let issuer = fields.next();
    let cert = fields.rest();
    ca_bridge::fuzzing::certificate(cert, issuer, now());
});
