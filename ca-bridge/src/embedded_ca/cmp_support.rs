//! What the CMP server needs of the embedded CA beyond issuing and revoking: the certificate of
//! the registration authority (the daemon's CMP client, bootstrapped in-process), and the
//! issuing CA's certificate and policies to check requests against.

use std::time::{Duration, SystemTime};

use const_oid::ObjectIdentifier;
use const_oid::db::rfc4519::COMMON_NAME;
use der::asn1::{Any, OctetString};
use x509_cert::certificate::Certificate;

use super::profile::organisation_name;
use super::{CA_BACKDATE, EmbeddedCa, IssuedCertificate, Profile};
use crate::error::CaError;
use crate::x509::{signing_end_entity_extensions, subject_key, validity};

/// id-kp-cmcRA (RFC 6402 section 2.10): the key purpose of a CMP registration authority.
pub(crate) const ID_KP_CMC_RA: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.28");
/// Validity of an RA certificate when the issuing CA lives longer (ten years, well beyond a
/// subscriber certificate's three): the dev clock may be moved years ahead, past a subscriber's
/// expiry, and the CMP server checks the RA certificate at that clock.
const RA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl EmbeddedCa {
    /// Issues the certificate of a CMP registration authority (the daemon's CMP client key,
    /// `SystemKey::CmpClient`), for the development bootstrap before CMP can be used:
    /// `C=HK, O=<organisation>, CN=<common_name>`, keyUsage digitalSignature, extKeyUsage
    /// id-kp-cmcRA, valid for ten years or until the issuing CA expires if sooner. It is not
    /// recorded in the subscriber state (it has no adult/minor profile).
    pub async fn issue_ra_certificate(
        &self,
        public_key_spki_der: &[u8],
        common_name: &str,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        let spki = subject_key(public_key_spki_der)?;
        if common_name.trim().is_empty() || common_name.chars().count() > 64 {
            return Err(CaError::InvalidRequest(
                "RA common name must be 1 to 64 characters".into(),
            ));
        }
        let subject = organisation_name(&self.organisation)?
            .utf8(COMMON_NAME, common_name)?
            .build();
        let not_after = (now + RA_VALIDITY).min(self.issuing_not_after());
        let extensions =
            signing_end_entity_extensions(&spki, &self.issuing.key_id, vec![ID_KP_CMC_RA])?;
        let issued = self
            .sign_certificate(
                subject,
                spki,
                validity(now - CA_BACKDATE, not_after)?,
                extensions,
            )
            .await?;
        tracing::info!(serial = %issued.serial_hex, "RA certificate issued");
        Ok(issued)
    }

    /// `len` random bytes from the HSM (transaction ids, nonces, salts).
    pub(crate) async fn random(&self, len: usize) -> Result<Vec<u8>, CaError> {
        Ok(self.hsm.random(len).await?)
    }

    /// The issuing CA certificate, parsed.
    pub(crate) fn issuing_certificate(&self) -> &Certificate {
        &self.issuing.cert
    }

    /// The issuing CA's key identifier (its certificates' AKI, its CMP messages' senderKID).
    pub(crate) fn issuing_key_id(&self) -> &OctetString {
        &self.issuing.key_id
    }

    /// The profile whose certificate policy is `policy` (an OBJECT IDENTIFIER as `Any`).
    pub(crate) fn profile_of_policy(&self, policy: &Any) -> Result<Option<Profile>, CaError> {
        if *policy == self.subscriber.adult_policy.to_any()? {
            Ok(Some(Profile::Adult))
        } else if *policy == self.subscriber.minor_policy.to_any()? {
            Ok(Some(Profile::Minor))
        } else {
            Ok(None)
        }
    }
}
