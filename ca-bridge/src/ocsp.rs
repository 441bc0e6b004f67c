//! OCSP (RFC 6960) client: build a request for one certificate (SHA-1 CertID, as RFC 5019 and
//! OpenSSL expect, with a 16-byte nonce), POST it (RFC 6960 appendix A.1), and check the
//! response: successful, signed by the issuer itself or by a delegated responder certificate
//! that the issuer issued for id-kp-OCSPSigning (section 4.2.2.2), our nonce, our CertID, a
//! thisUpdate not in the future and a nextUpdate not passed. GET requests (appendix A.1) are
//! built by [`OcspQuery::send_get`] and read back by a responder with [`request_from_get_path`].

use std::time::SystemTime;

use const_oid::db::rfc5280::ID_KP_OCSP_SIGNING;
use const_oid::db::rfc5912::ID_SHA_1;
use const_oid::db::rfc6960::{ID_PKIX_OCSP_BASIC, ID_PKIX_OCSP_NONCE};
use der::asn1::{Null, OctetString};
use der::{Decode, Encode};
use rand_core::RngCore as _;
use sha1::{Digest as _, Sha1};
use spki::AlgorithmIdentifierOwned;
use x509_cert::certificate::Certificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::ExtendedKeyUsage;
use x509_ocsp::{
    BasicOcspResponse, CertId, OcspRequest, OcspResponse, OcspResponseStatus, Request, ResponderId,
    TbsRequest, Version,
};

use crate::error::CaError;
use crate::transport::{HttpTransport, OCSP_REQUEST_CONTENT_TYPE, OCSP_RESPONSE_CONTENT_TYPE};
use crate::verify::{
    check_update_window, serial_hex, valid_at, verify_issued_by, verify_signature,
};

/// Bytes of the request nonce (RFC 8954 section 2.1 asks for 1 to 32; 16 is what OpenSSL sends).
const NONCE_LEN: usize = 16;

/// The status one OCSP response gives a certificate (RFC 6960 section 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OcspStatus {
    /// Not revoked.
    Good,
    /// Revoked.
    Revoked {
        /// When.
        revoked_at: SystemTime,
        /// RFC 5280 CRLReason code (0, unspecified, when the response gives none).
        reason_code: u8,
    },
    /// The responder does not know the certificate.
    Unknown,
}

/// A verified answer for one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OcspAnswer {
    /// The certificate's status.
    pub status: OcspStatus,
    /// When the status was known to be correct.
    pub this_update: SystemTime,
    /// When newer information will be available; the answer is not used after it.
    pub next_update: SystemTime,
}

/// One OCSP request for one certificate, kept to check the response against it.
#[derive(Debug, Clone)]
pub struct OcspQuery {
    der: Vec<u8>,
    nonce: Vec<u8>,
    cert_id: CertId,
    issuer: Certificate,
    serial_hex: String,
}

/// How a request travels to the responder.
#[derive(Debug, Clone, Copy)]
enum Method {
    /// POST with the DER as the body.
    Post,
    /// GET with the base64 of the DER in the URL.
    Get,
}

impl OcspQuery {
    /// A request for `cert_der`, issued by `issuer_der` (both DER certificates), with a fresh
    /// random nonce.
    pub fn new(issuer_der: &[u8], cert_der: &[u8]) -> Result<OcspQuery, CaError> {
        let mut nonce = vec![0; NONCE_LEN];
        rand_core::OsRng.fill_bytes(&mut nonce);
        OcspQuery::with_nonce(issuer_der, cert_der, nonce)
    }

    /// A request with the given nonce (tests use it to replay a response).
    pub fn with_nonce(
        issuer_der: &[u8],
        cert_der: &[u8],
        nonce: Vec<u8>,
    ) -> Result<OcspQuery, CaError> {
        let issuer = Certificate::from_der(issuer_der)?;
        let cert = Certificate::from_der(cert_der)?;
        let tbs = &issuer.tbs_certificate;
        let cert_id = CertId {
            hash_algorithm: AlgorithmIdentifierOwned {
                oid: ID_SHA_1,
                parameters: Some(Null.into()),
            },
            issuer_name_hash: OctetString::new(Sha1::digest(tbs.subject.to_der()?).to_vec())?,
            issuer_key_hash: OctetString::new(
                Sha1::digest(tbs.subject_public_key_info.subject_public_key.raw_bytes()).to_vec(),
            )?,
            serial_number: cert.tbs_certificate.serial_number.clone(),
        };
        let request = OcspRequest {
            tbs_request: TbsRequest {
                version: Version::V1,
                requestor_name: None,
                request_list: vec![Request {
                    req_cert: cert_id.clone(),
                    single_request_extensions: None,
                }],
                request_extensions: Some(vec![Extension {
                    extn_id: ID_PKIX_OCSP_NONCE,
                    critical: false,
                    extn_value: OctetString::new(OctetString::new(nonce.clone())?.to_der()?)?,
                }]),
            },
            optional_signature: None,
        };
        Ok(OcspQuery {
            der: request.to_der()?,
            nonce,
            serial_hex: serial_hex(cert_id.serial_number.as_bytes()),
            cert_id,
            issuer,
        })
    }

    /// The request, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The certificate's serial, lowercase hex without leading zeros.
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }

    /// POSTs the request to `url` and checks the response at `now`.
    pub async fn send(
        &self,
        transport: &HttpTransport,
        url: &str,
        now: SystemTime,
    ) -> Result<OcspAnswer, CaError> {
        self.exchange(transport, url, Method::Post, now).await
    }

    /// Sends the request with GET, the base64 of its DER appended to `url` (RFC 6960 appendix
    /// A.1; RFC 5019 responders prefer it for caching), and checks the response at `now`.
    pub async fn send_get(
        &self,
        transport: &HttpTransport,
        url: &str,
        now: SystemTime,
    ) -> Result<OcspAnswer, CaError> {
        self.exchange(transport, url, Method::Get, now).await
    }

    /// Sends the request to `url` by `method` and checks the response at `now`.
    async fn exchange(
        &self,
        transport: &HttpTransport,
        url: &str,
        method: Method,
        now: SystemTime,
    ) -> Result<OcspAnswer, CaError> {
        let response = match method {
            Method::Post => {
                transport
                    .post(
                        url,
                        OCSP_REQUEST_CONTENT_TYPE,
                        self.der.clone(),
                        OCSP_RESPONSE_CONTENT_TYPE,
                    )
                    .await?
            }
            Method::Get => {
                transport
                    .get(&get_url(url, &self.der), OCSP_RESPONSE_CONTENT_TYPE)
                    .await?
            }
        };
        self.check_response(&response, now)
    }

    /// Checks a DER OCSPResponse against this request at `now`: [`CaError::Refused`] for an
    /// unsuccessful status, [`CaError::Protection`] for a signature or signer that does not
    /// verify, [`CaError::Protocol`] for anything else that does not fit.
    pub fn check_response(
        &self,
        response_der: &[u8],
        now: SystemTime,
    ) -> Result<OcspAnswer, CaError> {
        let protocol = |why: &str| CaError::Protocol(format!("OCSP: {why}"));
        let response =
            OcspResponse::from_der(response_der).map_err(|_| protocol("not a DER OCSPResponse"))?;
        if response.response_status != OcspResponseStatus::Successful {
            return Err(CaError::Refused(format!(
                "OCSP status {:?}",
                response.response_status
            )));
        }
        let bytes = response
            .response_bytes
            .ok_or_else(|| protocol("successful without a response"))?;
        if bytes.response_type != ID_PKIX_OCSP_BASIC {
            return Err(protocol("not a basic response"));
        }
        let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
            .map_err(|_| protocol("malformed BasicOCSPResponse"))?;
        self.verify_signer(&basic, now)?;

        let nonce = basic
            .nonce()
            .ok_or_else(|| protocol("the response carries no nonce"))?;
        if nonce.0.as_bytes() != self.nonce.as_slice() {
            return Err(protocol("the nonce does not match the request's"));
        }
        let single = basic
            .tbs_response_data
            .responses
            .iter()
            .find(|r| same_cert_id(&r.cert_id, &self.cert_id))
            .ok_or_else(|| protocol("no answer for the requested certificate"))?;
        let this_update = single.this_update.0.to_system_time();
        let next_update = check_update_window(
            "OCSP",
            this_update,
            single.next_update.map(|t| t.0.to_system_time()),
            now,
        )?;
        let status = match &single.cert_status {
            x509_ocsp::CertStatus::Good(_) => OcspStatus::Good,
            x509_ocsp::CertStatus::Revoked(info) => OcspStatus::Revoked {
                revoked_at: info.revocation_time.0.to_system_time(),
                reason_code: info.revocation_reason.map_or(0, |r| r as u8),
            },
            x509_ocsp::CertStatus::Unknown(_) => OcspStatus::Unknown,
        };
        Ok(OcspAnswer {
            status,
            this_update,
            next_update,
        })
    }

    /// The response must be signed by the issuer, or by a responder certificate in `certs`
    /// that the issuer issued for OCSP signing and that is valid at `now`.
    fn verify_signer(&self, basic: &BasicOcspResponse, now: SystemTime) -> Result<(), CaError> {
        let data = basic.tbs_response_data.to_der()?;
        let responder_id = &basic.tbs_response_data.responder_id;
        let signer = if names(responder_id, &self.issuer)? {
            &self.issuer
        } else {
            let delegate = basic
                .certs
                .iter()
                .flatten()
                .find(|c| names(responder_id, c).unwrap_or(false))
                .ok_or_else(|| {
                    CaError::Protection(
                        "OCSP: the responder is not the issuer or its delegate".into(),
                    )
                })?;
            verify_issued_by(delegate, &self.issuer)?;
            let ocsp_signing = matches!(
                delegate.tbs_certificate.get::<ExtendedKeyUsage>(),
                Ok(Some((_, eku))) if eku.0.contains(&ID_KP_OCSP_SIGNING)
            );
            if !ocsp_signing {
                return Err(CaError::Protection(
                    "OCSP: the responder certificate lacks id-kp-OCSPSigning".into(),
                ));
            }
            if !valid_at(delegate, now) {
                return Err(CaError::Protection(
                    "OCSP: the responder certificate is not valid now".into(),
                ));
            }
            delegate
        };
        verify_signature(
            &signer.tbs_certificate.subject_public_key_info,
            &basic.signature_algorithm,
            &data,
            &basic.signature,
        )
    }
}

/// The URL of a GET request: `base`, a slash, and the URL-encoded base64 of `request_der`.
pub fn get_url(base: &str, request_der: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(request_der);
    let mut url = base.trim_end_matches('/').to_owned();
    url.push('/');
    for c in encoded.chars() {
        match c {
            '+' => url.push_str("%2B"),
            '/' => url.push_str("%2F"),
            '=' => url.push_str("%3D"),
            c => url.push(c),
        }
    }
    url
}

/// The DER request of a GET: `encoded` is the part of the path after the responder's own
/// (URL-encoded base64, RFC 6960 appendix A.1). [`CaError::Protocol`] when it does not decode;
/// a responder answers that with `malformedRequest`.
pub fn request_from_get_path(encoded: &str) -> Result<Vec<u8>, CaError> {
    use base64::Engine as _;
    let bad = || CaError::Protocol("OCSP GET: not URL-encoded base64".into());
    let bytes = encoded.as_bytes();
    let mut text = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            text.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            text.push(bytes[i]);
            i += 1;
        }
    }
    base64::engine::general_purpose::STANDARD
        .decode(&text)
        .map_err(|_| bad())
}

/// Whether the responderID names `cert` (by name, or by the SHA-1 of its key).
fn names(id: &ResponderId, cert: &Certificate) -> Result<bool, CaError> {
    let tbs = &cert.tbs_certificate;
    Ok(match id {
        ResponderId::ByName(name) => *name == tbs.subject,
        ResponderId::ByKey(hash) => {
            hash.as_bytes()
                == &Sha1::digest(tbs.subject_public_key_info.subject_public_key.raw_bytes())[..]
        }
    })
}

/// CertIDs are equal when hash algorithm, hashes and serial are (the NULL parameters of the
/// hash algorithm may be present or not).
fn same_cert_id(a: &CertId, b: &CertId) -> bool {
    a.hash_algorithm.oid == b.hash_algorithm.oid
        && a.issuer_name_hash == b.issuer_name_hash
        && a.issuer_key_hash == b.issuer_key_hash
        && a.serial_number == b.serial_number
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_paths_round_trip() {
        let der: Vec<u8> = (0..=255u8).collect();
        let url = get_url("http://127.0.0.1:1/ocsp/", &der);
        let encoded = url.strip_prefix("http://127.0.0.1:1/ocsp/").unwrap();
        assert!(!encoded.contains(['+', '/', '=']));
        assert_eq!(request_from_get_path(encoded).unwrap(), der);
        assert!(request_from_get_path("%zz").is_err());
        assert!(request_from_get_path("%4").is_err());
    }
}
