//! OCSP responses, as the status check reads them (`OcspQuery::check_response`): the nonce,
//! the CertID, the responder (the issuer or a delegate), the signature, the update window.
//! Fields: the issuer certificate (DER), the certificate asked about (DER), the request's nonce;
//! the rest is the response.
#![no_main]

use ca_bridge::ocsp::OcspQuery;
use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::{Fields, now};

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let issuer = fields.next();
    let cert = fields.next();
    let nonce = fields.next().to_vec();
    let response = fields.rest();
    let Ok(query) = OcspQuery::with_nonce(issuer, cert, nonce) else {
        return;
    };
    let _ = query.check_response(response, now());
});
