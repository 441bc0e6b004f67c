//! CRL client (RFC 5280 section 5): parse a CRL (DER or PEM), verify it against the issuer
//! certificate (issuer name, signature, nextUpdate not passed), and look serials up in it.

use std::collections::HashMap;
use std::time::SystemTime;

use der::{Decode, Encode};
use x509_cert::certificate::Certificate;
use x509_cert::crl::CertificateList;
use x509_cert::ext::pkix::CrlReason;

use crate::error::CaError;
use crate::transport::{CRL_CONTENT_TYPE, HttpTransport};
use crate::verify::{check_update_window, serial_hex, verify_signature};

/// One revoked certificate's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlEntry {
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// RFC 5280 CRLReason code (0, unspecified, when the entry has no reasonCode).
    pub reason_code: u8,
}

/// A CRL whose signature and issuer were checked.
#[derive(Debug, Clone)]
pub struct VerifiedCrl {
    this_update: SystemTime,
    next_update: SystemTime,
    revoked: HashMap<String, CrlEntry>,
}

impl VerifiedCrl {
    /// Parses `crl` (DER, or PEM with the `X509 CRL` label) and checks it at `now`: issued and
    /// signed by `issuer_der` ([`CaError::Protection`] otherwise), with a nextUpdate that has
    /// not passed and a thisUpdate not in the future ([`CaError::Protocol`] otherwise).
    pub fn parse(crl: &[u8], issuer_der: &[u8], now: SystemTime) -> Result<VerifiedCrl, CaError> {
        let protocol = |why: &str| CaError::Protocol(format!("CRL: {why}"));
        let list = if crl.starts_with(b"-----BEGIN") {
            let (label, der) =
                der::pem::decode_vec(crl).map_err(|_| protocol("malformed PEM CRL"))?;
            if label != "X509 CRL" {
                return Err(protocol("a PEM block that is not an X509 CRL"));
            }
            CertificateList::from_der(&der).map_err(|_| protocol("malformed DER CRL"))?
        } else {
            CertificateList::from_der(crl).map_err(|_| protocol("malformed DER CRL"))?
        };
        let issuer = Certificate::from_der(issuer_der)?;
        let tbs = &list.tbs_cert_list;
        if tbs.issuer != issuer.tbs_certificate.subject {
            return Err(CaError::Protection(
                "CRL: not issued by the expected issuer".into(),
            ));
        }
        if tbs.signature != list.signature_algorithm {
            return Err(CaError::Protection(
                "CRL: the signature algorithms differ".into(),
            ));
        }
        verify_signature(
            &issuer.tbs_certificate.subject_public_key_info,
            &list.signature_algorithm,
            &tbs.to_der()?,
            &list.signature,
        )
        .map_err(|e| CaError::Protection(format!("CRL: {e}")))?;
        // A critical extension this client does not understand (a delta CRL indicator, an
        // issuing distribution point narrowing the scope) makes the CRL unusable (RFC 5280
        // section 5.2).
        if tbs.crl_extensions.iter().flatten().any(|e| e.critical) {
            return Err(protocol(
                "a critical CRL extension this client does not support",
            ));
        }
        let this_update = tbs.this_update.to_system_time();
        let next_update = check_update_window(
            "CRL",
            this_update,
            tbs.next_update.map(|t| t.to_system_time()),
            now,
        )?;
        let mut revoked = HashMap::new();
        for entry in tbs.revoked_certificates.iter().flatten() {
            let reason_code = match entry.crl_entry_extensions.as_ref() {
                Some(extensions) => {
                    match extensions
                        .iter()
                        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_CRL_REASONS)
                    {
                        Some(e) => CrlReason::from_der(e.extn_value.as_bytes())
                            .map_err(|_| protocol("malformed reasonCode"))?
                            as u8,
                        None => 0,
                    }
                }
                None => 0,
            };
            revoked.insert(
                serial_hex(entry.serial_number.as_bytes()),
                CrlEntry {
                    revoked_at: entry.revocation_date.to_system_time(),
                    reason_code,
                },
            );
        }
        Ok(VerifiedCrl {
            this_update,
            next_update,
            revoked,
        })
    }

    /// GETs the CRL at `url` and checks it as [`VerifiedCrl::parse`] does.
    pub async fn fetch(
        transport: &HttpTransport,
        url: &str,
        issuer_der: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedCrl, CaError> {
        let body = transport.get(url, CRL_CONTENT_TYPE).await?;
        VerifiedCrl::parse(&body, issuer_der, now)
    }

    /// The entry of a serial (hex, any case, leading zeros allowed), if it is revoked.
    pub fn lookup(&self, serial: &str) -> Option<CrlEntry> {
        let serial = serial.trim_start_matches('0').to_ascii_lowercase();
        self.revoked.get(&serial).copied()
    }

    /// When the CRL was issued.
    pub fn this_update(&self) -> SystemTime {
        self.this_update
    }

    /// When the next CRL will be issued; this one is not used after it.
    pub fn next_update(&self) -> SystemTime {
        self.next_update
    }
}
