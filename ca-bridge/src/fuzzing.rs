//! Entry points for the fuzz targets of `fuzz/` (feature `fuzzing`, off in every build of the
//! appliance): the crate's private parsers and checks of what comes from the network, each
//! called as the crate calls it. Each panics only where the code it calls would.
//!
//! The public parsers ([`crate::crl::VerifiedCrl::parse`], [`crate::ocsp::OcspQuery`],
//! [`crate::ocsp::request_from_get_path`], [`crate::cmp::CmpServer::handle`],
//! [`crate::EmbeddedCa::ocsp_response`]) are fuzzed directly.

use std::time::SystemTime;

use der::{Decode, Encode};
use x509_cert::certificate::Certificate;
use x509_cert::request::CertReq;

use crate::verify::{serial_hex, valid_at, verify_issued_by, verify_signature};
use crate::x509::subject_key;

/// A CMP response as the CMP client reads it (protection, transaction, nonces, error bodies,
/// then the ip/kup/pkiconf/rp body): see `cmp::client::fuzz_response`. `trusted_der` is the
/// trusted CA certificate (DER; none if it does not parse).
pub fn cmp_client_response(
    transaction_id: &[u8],
    nonce: &[u8],
    secret: &[u8],
    trusted_der: &[u8],
    request_spki_der: &[u8],
    response: &[u8],
) {
    let trusted: Vec<Certificate> = Certificate::from_der(trusted_der).into_iter().collect();
    crate::cmp::fuzz_response(
        transaction_id,
        nonce,
        secret,
        &trusted,
        request_spki_der,
        response,
    );
}

/// A PKCS#10 certification request (RFC 2986; a CMP p10cr carries one): decoded, re-encoded,
/// its public key checked as the CA checks a subscriber key, and its self-signature verified
/// with the crate's signature check.
pub fn pkcs10(der: &[u8]) {
    let Ok(request) = CertReq::from_der(der) else {
        return;
    };
    let Ok(info) = request.info.to_der() else {
        return;
    };
    if let Ok(spki) = request.info.public_key.to_der() {
        let _ = subject_key(&spki);
    }
    let _ = verify_signature(
        &request.info.public_key,
        &request.algorithm,
        &info,
        &request.signature,
    );
}

/// A certificate and its claimed issuer (DER) through the crate's certificate checks: the
/// issuer's name and signature, the validity at `now`, the serial, the subject key.
pub fn certificate(cert_der: &[u8], issuer_der: &[u8], now: SystemTime) {
    let Ok(cert) = Certificate::from_der(cert_der) else {
        return;
    };
    let _ = valid_at(&cert, now);
    let _ = serial_hex(cert.tbs_certificate.serial_number.as_bytes());
    if let Ok(spki) = cert.tbs_certificate.subject_public_key_info.to_der() {
        let _ = subject_key(&spki);
    }
    if let Ok(issuer) = Certificate::from_der(issuer_der) {
        let _ = verify_issued_by(&cert, &issuer);
    }
}
