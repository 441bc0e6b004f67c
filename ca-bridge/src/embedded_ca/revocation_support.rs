//! What the embedded CA offers its OCSP responder (RFC 6960) and CRL issuer (RFC 5280 section
//! 5): both are signed directly by the issuing CA key in the HSM (ecdsa-with-SHA256), so a
//! relying party needs no delegated responder certificate.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use const_oid::db::rfc5912::{ID_SHA_1, ID_SHA_256};
use der::asn1::{BitString, GeneralizedTime, OctetString, Uint};
use der::{Decode, Encode};
use hsm_adapter::HsmError;
use lru::LruCache;
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

use super::{CertificateState, EmbeddedCa, Revocation, blocking};
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

/// Most CertIDs one OCSP request may name. Each costs a store read and makes the signed
/// response longer; clients ask for one (RFC 5019 section 2.1.1 allows only one) or a few.
pub const MAX_OCSP_CERT_IDS: usize = 4;
/// Longest nonce accepted (RFC 8954 section 2.1).
const MAX_NONCE_LEN: usize = 32;
/// Most pre-signed OCSP responses kept (about 500 bytes each): the least recently used goes
/// first.
pub(super) const OCSP_CACHE_ENTRIES: usize = 8192;

/// Counters of the OCSP responder since the CA was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OcspStats {
    /// Responses signed (each one HSM signature).
    pub signed: u64,
    /// Requests answered with a cached response (no HSM work, no store read).
    pub cache_hits: u64,
    /// Requests refused without HSM work (malformed, unauthorized, tryLater).
    pub refused: u64,
}

/// The pre-signed responses of single-CertID requests without a nonce (RFC 5019 section 2.1.1),
/// by the CertID's DER (the response repeats the CertID exactly as asked).
pub(super) struct OcspCache {
    state: std::sync::Mutex<OcspCacheState>,
    signed: AtomicU64,
    cache_hits: AtomicU64,
    refused: AtomicU64,
}

struct OcspCacheState {
    entries: LruCache<Vec<u8>, CachedOcsp>,
    /// Bumped whenever an entry is dropped because its serial's state changed: a response made
    /// from a store read older than that is not kept.
    generation: u64,
}

struct CachedOcsp {
    serial_hex: String,
    der: Vec<u8>,
    this_update: SystemTime,
    validity: Duration,
}

impl fmt::Debug for OcspCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OcspCache")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl OcspCache {
    pub(super) fn new(capacity: NonZeroUsize) -> OcspCache {
        OcspCache {
            state: std::sync::Mutex::new(OcspCacheState {
                entries: LruCache::new(capacity),
                generation: 0,
            }),
            signed: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OcspCacheState> {
        // Every change under the lock is one map operation or one counter: a panic cannot
        // leave it half done.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached response for `key`, while it is fresh at `now`: made with this `validity`,
    /// not after `now` (the dev clock can move back), and less than half its validity ago, so
    /// that a relying party always has half of it left before its nextUpdate.
    fn get(&self, key: &[u8], now: SystemTime, validity: Duration) -> Option<Vec<u8>> {
        let mut state = self.lock();
        let entry = state.entries.get(key)?;
        let fresh = entry.validity == validity
            && now >= entry.this_update
            && now < entry.this_update + validity / 2;
        if !fresh {
            state.entries.pop(key);
            return None;
        }
        let der = entry.der.clone();
        drop(state);
        self.count(|s| &s.cache_hits);
        Some(der)
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps a response made from a store read at `generation`, unless a serial's state changed
    /// since (this one's, or another's: the check is coarse and only costs a signature later).
    fn insert(
        &self,
        key: Vec<u8>,
        serial_hex: String,
        der: Vec<u8>,
        this_update: SystemTime,
        validity: Duration,
        generation: u64,
    ) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        state.entries.put(
            key,
            CachedOcsp {
                serial_hex,
                der,
                this_update,
                validity,
            },
        );
    }

    /// Drops every response about `serial_hex` and refuses responses read before now.
    fn forget(&self, serial_hex: &str) {
        let mut state = self.lock();
        state.generation += 1;
        let stale: Vec<Vec<u8>> = state
            .entries
            .iter()
            .filter(|(_, entry)| entry.serial_hex == serial_hex)
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            state.entries.pop(&key);
        }
    }

    fn count(&self, which: impl FnOnce(&Self) -> &AtomicU64) {
        which(self).fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> OcspStats {
        OcspStats {
            signed: self.signed.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl EmbeddedCa {
    /// Answers one OCSP request (DER) with one DER `OCSPResponse`, never an error:
    ///
    /// - a request that does not parse, names no CertID or more than [`MAX_OCSP_CERT_IDS`], or
    ///   carries a nonce of other than 1 to 32 bytes (RFC 8954 section 2.1) gets
    ///   `malformedRequest`; one none of whose CertIDs names this CA's issuing certificate gets
    ///   `unauthorized` (RFC 5019 section 2.2.3: this responder is not authoritative for it);
    ///   none of these costs HSM work or a store read;
    /// - otherwise each CertID is answered from the CA state, read in one query: good, revoked
    ///   (with time and reason), or unknown for serials this CA never issued and for CertIDs of
    ///   another issuer. The response is signed by the issuing CA key (responderID byKey,
    ///   ecdsa-with-SHA256) in the HSM's background lane, with thisUpdate = producedAt = the time
    ///   it was made and nextUpdate = thisUpdate + `validity`. When that lane is full the answer
    ///   is `tryLater`, at once; a failure of the CA state gets `internalError`.
    ///
    /// RFC 5019 caching: the response to a request of one CertID and no nonce is kept and given
    /// again, unchanged (its own thisUpdate and nextUpdate), to the same request until half its
    /// validity has passed; revoking the serial (or issuing it, for an unknown one) drops it
    /// first. A request with a nonce is answered afresh with the nonce echoed (RFC 6960 section
    /// 4.4.1): the client asked for a response bound to its request, which a cached one is not;
    /// these cost a signature each, bounded by the background lane.
    pub async fn ocsp_response(
        &self,
        request_der: &[u8],
        now: SystemTime,
        validity: Duration,
    ) -> Vec<u8> {
        let response = match self.ocsp_answer(request_der, now, validity).await {
            Ok(der) => return der,
            Err(OcspFailure::Malformed(why)) => {
                tracing::debug!(why, "malformed OCSP request");
                self.ocsp_cache.count(|s| &s.refused);
                OcspResponse::malformed_request()
            }
            Err(OcspFailure::NotOurs) => {
                self.ocsp_cache.count(|s| &s.refused);
                OcspResponse::unauthorized()
            }
            Err(OcspFailure::TryLater) => {
                // Not a warning per request: a flood would flood the log (the count is in
                // `ocsp_stats`).
                tracing::debug!("OCSP request refused: the HSM's background lane is full");
                self.ocsp_cache.count(|s| &s.refused);
                OcspResponse::try_later()
            }
            Err(OcspFailure::Internal(e)) => {
                tracing::error!(error = %e, "OCSP responder failed");
                OcspResponse::internal_error()
            }
        };
        // An OCSPResponse of a status alone always encodes; should it not, the fixed DER of
        // internalError is the answer.
        response
            .to_der()
            .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x02])
    }

    /// What the OCSP responder has done since the CA was opened.
    pub fn ocsp_stats(&self) -> OcspStats {
        self.ocsp_cache.stats()
    }

    /// Drops the cached OCSP response of `serial_hex` (normalised): its state has changed.
    pub(super) fn forget_ocsp(&self, serial_hex: &str) {
        self.ocsp_cache.forget(serial_hex);
    }

    /// A successful `OCSPResponse`, DER, or why there is none.
    async fn ocsp_answer(
        &self,
        request_der: &[u8],
        now: SystemTime,
        validity: Duration,
    ) -> Result<Vec<u8>, OcspFailure> {
        let request = OcspRequest::from_der(request_der)
            .map_err(|_| OcspFailure::Malformed("not a DER OCSPRequest"))?;
        let tbs = &request.tbs_request;
        if tbs.request_list.is_empty() {
            return Err(OcspFailure::Malformed("no CertID"));
        }
        if tbs.request_list.len() > MAX_OCSP_CERT_IDS {
            return Err(OcspFailure::Malformed("too many CertIDs"));
        }
        let nonce: Vec<Extension> = tbs
            .request_extensions
            .iter()
            .flatten()
            .filter(|e| e.extn_id == const_oid::db::rfc6960::ID_PKIX_OCSP_NONCE)
            .cloned()
            .collect();
        for extension in &nonce {
            let length = OctetString::from_der(extension.extn_value.as_bytes())
                .map(|n| n.as_bytes().len())
                .unwrap_or(0);
            if !(1..=MAX_NONCE_LEN).contains(&length) {
                return Err(OcspFailure::Malformed(
                    "a nonce of other than 1 to 32 bytes",
                ));
            }
        }
        let serials = tbs
            .request_list
            .iter()
            .map(|single| self.own_serial(&single.req_cert))
            .collect::<Result<Vec<_>, _>>()?;
        if serials.iter().all(Option::is_none) {
            return Err(OcspFailure::NotOurs);
        }
        // RFC 5019: one CertID and no nonce may be answered with the response made before.
        let cache_key = match (&tbs.request_list[..], &serials[..], nonce.is_empty()) {
            ([single], [Some(serial)], true) => Some((single.req_cert.to_der()?, serial.clone())),
            _ => None,
        };
        if let Some((key, _)) = &cache_key
            && let Some(der) = self.ocsp_cache.get(key, now, validity)
        {
            return Ok(der);
        }
        // Read before the store: a revocation after this read makes the insert below a no-op.
        let generation = self.ocsp_cache.generation();
        let own: Vec<String> = serials.iter().flatten().cloned().collect();
        let state = Arc::clone(&self.state);
        let mut states = blocking(move || state.statuses(&own)).await?.into_iter();
        let this_update = ocsp_time(now)?;
        let next_update = ocsp_time(now + validity)?;
        let mut responses = Vec::with_capacity(tbs.request_list.len());
        for (single, serial) in tbs.request_list.iter().zip(&serials) {
            let state = match serial {
                Some(_) => states.next().unwrap_or(CertificateState::Unknown),
                None => CertificateState::Unknown,
            };
            let cert_status = match state {
                CertificateState::Unknown => CertStatus::unknown(),
                CertificateState::Good { .. } => CertStatus::good(),
                CertificateState::Revoked {
                    revoked_at,
                    reason_code,
                } => CertStatus::Revoked(RevokedInfo {
                    revocation_time: ocsp_time(revoked_at)?,
                    revocation_reason: CrlReason::try_from(u32::from(reason_code)).ok(),
                }),
            };
            responses.push(SingleResponse {
                cert_id: single.req_cert.clone(),
                cert_status,
                this_update,
                next_update: Some(next_update),
                single_extensions: None,
            });
        }
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
            // The nonce extension is echoed as it came (RFC 8954 section 2.1).
            response_extensions: (!nonce.is_empty()).then_some(nonce),
        };
        let signature = match self.sign_as_issuing(&data.to_der()?).await {
            Ok(signature) => signature,
            Err(CaError::Hsm(HsmError::Busy)) => return Err(OcspFailure::TryLater),
            Err(e) => return Err(e.into()),
        };
        self.ocsp_cache.count(|s| &s.signed);
        let basic = BasicOcspResponse {
            tbs_response_data: data,
            signature_algorithm: CaSignatureAlg::EcdsaSha256.identifier(),
            signature: BitString::from_bytes(&signature)?,
            certs: None,
        };
        let der = OcspResponse::successful(basic)?.to_der()?;
        if let Some((key, serial)) = cache_key {
            self.ocsp_cache
                .insert(key, serial, der.clone(), now, validity, generation);
        }
        Ok(der)
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
    /// No CertID names this CA's issuing certificate.
    NotOurs,
    /// The HSM's background lane is full.
    TryLater,
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
