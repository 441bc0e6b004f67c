//! CMP PKIMessages, client side: a response as the CMP client reads it (transaction id,
//! recipNonce, protection by PBM or by a certificate chaining to the trusted CA, error bodies,
//! then ip/kup/pkiconf/rp). Fields: transactionID, our senderNonce, the PBM secret (empty:
//! signature protection), the trusted CA certificate (DER), the requested public key (DER SPKI);
//! the rest is the response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let transaction_id = fields.next();
    let nonce = fields.next();
    let secret = fields.next();
    let trusted = fields.next();
    let spki = fields.next();
    let response = fields.rest();
    ca_bridge::fuzzing::cmp_client_response(transaction_id, nonce, secret, trusted, spki, response);
});
