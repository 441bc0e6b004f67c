//! What the CMP server needs of the embedded CA beyond issuing and revoking: the certificate of
//! the registration authority (the daemon's CMP client, bootstrapped in-process), and the
//! issuing CA's certificate and policies to check requests against.

use std::time::{Duration, SystemTime};

use const_oid::ObjectIdentifier;
use const_oid::db::rfc4519::{COMMON_NAME, COUNTRY_NAME, ORGANIZATION_NAME};
use der::Encode;
use der::asn1::{Any, OctetString};
use x509_cert::certificate::Certificate;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};

use super::{CA_BACKDATE, EmbeddedCa, IssuedCertificate, Profile, SERIAL_LEN};
use crate::error::CaError;
use crate::x509::{
    CaSignatureAlg, NameBuilder, TbsParts, assemble, extension, key_identifier, serial_from_random,
    subject_key, validity,
};

/// id-kp-cmcRA (RFC 6402 section 2.10): the key purpose of a CMP registration authority.
pub(crate) const ID_KP_CMC_RA: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.28");
/// Validity of an RA certificate when the issuing CA lives longer: well beyond a subscriber
/// certificate's (three years), so that the dev clock can pass a subscriber's expiry and the
/// daemon can still ask for the re-application's certificate.
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
        let subject = NameBuilder::default()
            .printable(COUNTRY_NAME, "HK")?
            .utf8(ORGANIZATION_NAME, &self.organisation)?
            .utf8(COMMON_NAME, common_name)?
            .build();
        let ca_not_after = self
            .issuing
            .cert
            .tbs_certificate
            .validity
            .not_after
            .to_system_time();
        let not_after = (now + RA_VALIDITY).min(ca_not_after);
        let extensions = vec![
            extension(
                &BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
                true,
            )?,
            extension(&KeyUsage(KeyUsages::DigitalSignature.into()), true)?,
            extension(&ExtendedKeyUsage(vec![ID_KP_CMC_RA]), false)?,
            extension(&SubjectKeyIdentifier(key_identifier(&spki)?), false)?,
            extension(
                &AuthorityKeyIdentifier {
                    key_identifier: Some(self.issuing.key_id.clone()),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                },
                false,
            )?,
        ];
        let (serial, serial_hex) = serial_from_random(self.hsm.random(SERIAL_LEN).await?)?;
        let tbs = TbsParts {
            serial,
            alg: CaSignatureAlg::EcdsaSha256,
            issuer: self.issuing.cert.tbs_certificate.subject.clone(),
            validity: validity(now - CA_BACKDATE, not_after)?,
            subject,
            spki,
            extensions,
        }
        .into_tbs();
        let signature = self.sign_as_issuing(&tbs.to_der()?).await?;
        let der = assemble(tbs, &signature)?.to_der()?;
        tracing::info!(serial = %serial_hex, "RA certificate issued");
        Ok(IssuedCertificate { serial_hex, der })
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
