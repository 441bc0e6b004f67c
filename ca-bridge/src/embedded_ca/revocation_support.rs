//! What the embedded CA offers its OCSP responder (RFC 6960) and CRL issuer (RFC 5280 section
//! 5): both are signed directly by the issuing CA key in the HSM (ecdsa-with-SHA256), so a
//! relying party needs no delegated responder certificate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use const_oid::db::rfc5912::{ID_SHA_1, ID_SHA_256};
use der::asn1::{BitString, GeneralizedTime, OctetString, Uint};
use der::{Decode, Encode};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::crl::CrlNumber;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, CrlReason};
use x509_cert::serial_number::SerialNumber;
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspGeneralizedTime, OcspRequest, OcspResponse,
    ResponderId, ResponseData, RevokedInfo, SingleResponse, Version,
};

use super::{CertificateState, EmbeddedCa, Revocation};
use crate::error::CaError;
use crate::x509::{CaSignatureAlg, extension, x509_time};

/// The CRL last made, kept so that CRL fetches do not sign each time, and the CRL number last
/// used (numbers must strictly increase, RFC 5280 section 5.2.3).
#[derive(Debug, Default)]
pub(super) struct CrlCache(tokio::sync::Mutex<CrlCacheState>);

#[derive(Debug, Default)]
struct CrlCacheState {
    last_number: u64,
    current: Option<CachedCrl>,
}

#[derive(Debug)]
struct CachedCrl {
    der: Vec<u8>,
    revocations: Vec<Revocation>,
    this_update: SystemTime,
    validity: Duration,
}

impl EmbeddedCa {
    /// Answers one OCSP request (DER) with one DER `OCSPResponse`, never an error: a request
    /// that does not parse gets `malformedRequest`, a failure of the CA state `internalError`.
    /// Each CertID of the request is answered from the CA state: good, revoked (with time and
    /// reason), or unknown for serials this CA never issued and for CertIDs of another issuer.
    /// The response is signed by the issuing CA key (responderID byKey, ecdsa-with-SHA256), with
    /// thisUpdate = `now`, nextUpdate = `now + validity`, and the request's nonce echoed.
    pub async fn ocsp_response(
        &self,
        request_der: &[u8],
        now: SystemTime,
        validity: Duration,
    ) -> Vec<u8> {
        let response = match self.ocsp_basic_response(request_der, now, validity).await {
            Ok(basic) => OcspResponse::successful(basic).unwrap_or_else(|e| {
                tracing::error!(error = %e, "OCSP response encoding failed");
                OcspResponse::internal_error()
            }),
            Err(OcspFailure::Malformed(why)) => {
                tracing::info!(why, "malformed OCSP request");
                OcspResponse::malformed_request()
            }
            Err(OcspFailure::Internal(e)) => {
                tracing::error!(error = %e, "OCSP responder failed");
                OcspResponse::internal_error()
            }
        };
        // An OCSPResponse of a status and at most a signed response always encodes; should it
        // not, the fixed DER of internalError is the answer.
        response
            .to_der()
            .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x02])
    }

    async fn ocsp_basic_response(
        &self,
        request_der: &[u8],
        now: SystemTime,
        validity: Duration,
    ) -> Result<BasicOcspResponse, OcspFailure> {
        let request = OcspRequest::from_der(request_der)
            .map_err(|_| OcspFailure::Malformed("not a DER OCSPRequest"))?;
        let tbs = &request.tbs_request;
        if tbs.request_list.is_empty() {
            return Err(OcspFailure::Malformed("no CertID"));
        }
        let this_update = ocsp_time(now)?;
        let next_update = ocsp_time(now + validity)?;
        let mut responses = Vec::with_capacity(tbs.request_list.len());
        for single in &tbs.request_list {
            let cert_id = &single.req_cert;
            let cert_status = match self.own_serial(cert_id)? {
                None => CertStatus::unknown(),
                Some(serial_hex) => match self.status(&serial_hex).await? {
                    CertificateState::Unknown => CertStatus::unknown(),
                    CertificateState::Good { .. } => CertStatus::good(),
                    CertificateState::Revoked {
                        revoked_at,
                        reason_code,
                    } => CertStatus::Revoked(RevokedInfo {
                        revocation_time: ocsp_time(revoked_at)?,
                        revocation_reason: CrlReason::try_from(u32::from(reason_code)).ok(),
                    }),
                },
            };
            responses.push(SingleResponse {
                cert_id: cert_id.clone(),
                cert_status,
                this_update,
                next_update: Some(next_update),
                single_extensions: None,
            });
        }
        // The nonce extension is echoed as it came (RFC 8954 section 2.1).
        let nonce: Vec<Extension> = tbs
            .request_extensions
            .iter()
            .flatten()
            .filter(|e| e.extn_id == const_oid::db::rfc6960::ID_PKIX_OCSP_NONCE)
            .cloned()
            .collect();
        let key_hash = Sha1::digest(
            self.issuing
                .cert
                .tbs_certificate
                .subject_public_key_info
                .subject_public_key
                .raw_bytes(),
        );
        let data = ResponseData {
            version: Version::V1,
            responder_id: ResponderId::ByKey(OctetString::new(key_hash.to_vec())?),
            produced_at: this_update,
            responses,
            response_extensions: (!nonce.is_empty()).then_some(nonce),
        };
        let signature = self.sign_as_issuing(&data.to_der()?).await?;
        Ok(BasicOcspResponse {
            tbs_response_data: data,
            signature_algorithm: CaSignatureAlg::EcdsaSha256.identifier(),
            signature: BitString::from_bytes(&signature)?,
            certs: None,
        })
    }

    /// The serial of a CertID naming this CA's issuing certificate (SHA-1 or SHA-256 hashes),
    /// as lowercase hex; `None` for CertIDs of another issuer or an unknown hash.
    fn own_serial(&self, cert_id: &CertId) -> Result<Option<String>, OcspFailure> {
        let tbs = &self.issuing.cert.tbs_certificate;
        let name = tbs.subject.to_der()?;
        let key = tbs.subject_public_key_info.subject_public_key.raw_bytes();
        let (name_hash, key_hash) = match cert_id.hash_algorithm.oid {
            ID_SHA_1 => (Sha1::digest(&name).to_vec(), Sha1::digest(key).to_vec()),
            ID_SHA_256 => (Sha256::digest(&name).to_vec(), Sha256::digest(key).to_vec()),
            _ => return Ok(None),
        };
        if cert_id.issuer_name_hash.as_bytes() != name_hash
            || cert_id.issuer_key_hash.as_bytes() != key_hash
        {
            return Ok(None);
        }
        Ok(Some(crate::verify::serial_hex(
            cert_id.serial_number.as_bytes(),
        )))
    }

    /// The CRL of the issuing CA, DER: version 2, every revocation with its time and a
    /// reasonCode entry extension (left out for unspecified), a strictly increasing cRLNumber,
    /// the authorityKeyIdentifier, thisUpdate = `now` and nextUpdate = `now + validity`, signed
    /// by the issuing CA key. The CRL is cached, and made again when the revocations change,
    /// half the validity has passed, or `now` went back before the cached thisUpdate.
    pub async fn crl(&self, now: SystemTime, validity: Duration) -> Result<Vec<u8>, CaError> {
        let mut cache = self.crl_cache.0.lock().await;
        let revocations = self.revocations().await?;
        if let Some(current) = &cache.current {
            let fresh = current.revocations == revocations
                && current.validity == validity
                && now >= current.this_update
                && now < current.this_update + validity / 2;
            if fresh {
                return Ok(current.der.clone());
            }
        }
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| CaError::InvalidRequest("a time before 1970".into()))?
            .as_secs();
        let number = secs.max(cache.last_number.saturating_add(1));
        let der = self.make_crl(&revocations, now, validity, number).await?;
        cache.last_number = number;
        cache.current = Some(CachedCrl {
            der: der.clone(),
            revocations,
            this_update: now,
            validity,
        });
        tracing::info!(crl_number = number, "CRL issued");
        Ok(der)
    }

    async fn make_crl(
        &self,
        revocations: &[Revocation],
        now: SystemTime,
        validity: Duration,
        number: u64,
    ) -> Result<Vec<u8>, CaError> {
        let mut revoked = Vec::with_capacity(revocations.len());
        for revocation in revocations {
            let mut hex = revocation.serial_hex.clone();
            if hex.len() % 2 == 1 {
                hex.insert(0, '0');
            }
            let bytes = hex::decode(&hex)
                .map_err(|_| CaError::Internal("a serial in the CA state is not hex".into()))?;
            let reason = match revocation.reason_code {
                0 => None,
                code => Some(vec![extension(
                    &CrlReason::try_from(u32::from(code))
                        .map_err(|_| CaError::InvalidReason(code))?,
                    false,
                )?]),
            };
            revoked.push(RevokedCert {
                serial_number: SerialNumber::new(&bytes)?,
                revocation_date: x509_time(revocation.revoked_at)?,
                crl_entry_extensions: reason,
            });
        }
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(self.issuing.key_id.clone()),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        let tbs = TbsCertList {
            version: x509_cert::Version::V2,
            signature: CaSignatureAlg::EcdsaSha256.identifier(),
            issuer: self.issuing.cert.tbs_certificate.subject.clone(),
            this_update: x509_time(now)?,
            next_update: Some(x509_time(now + validity)?),
            revoked_certificates: (!revoked.is_empty()).then_some(revoked),
            crl_extensions: Some(vec![
                extension(&aki, false)?,
                extension(&CrlNumber(Uint::new(&number.to_be_bytes())?), false)?,
            ]),
        };
        let signature = self.sign_as_issuing(&tbs.to_der()?).await?;
        let crl = CertificateList {
            signature_algorithm: tbs.signature.clone(),
            tbs_cert_list: tbs,
            signature: BitString::from_bytes(&signature)?,
        };
        Ok(crl.to_der()?)
    }
}

/// Why no successful OCSP response could be made.
#[derive(Debug)]
enum OcspFailure {
    Malformed(&'static str),
    Internal(CaError),
}

impl From<CaError> for OcspFailure {
    fn from(error: CaError) -> OcspFailure {
        OcspFailure::Internal(error)
    }
}

impl From<der::Error> for OcspFailure {
    fn from(error: der::Error) -> OcspFailure {
        OcspFailure::Internal(error.into())
    }
}

/// A GeneralizedTime without fractional seconds (RFC 5280 section 4.1.2.5.2).
fn ocsp_time(at: SystemTime) -> Result<OcspGeneralizedTime, CaError> {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::InvalidRequest("a time before 1970".into()))?
        .as_secs();
    Ok(OcspGeneralizedTime(GeneralizedTime::from_system_time(
        UNIX_EPOCH + Duration::from_secs(secs),
    )?))
}
