//! The daemon's enrolment as a registration authority with a production CA: a PKCS#10
//! certification request (RFC 2986) for its CMP client key (`SystemKey::CmpClient`), signed in
//! the HSM, for the CA operator to certify with id-kp-cmcRA. The certificate they return is
//! `ca.ra_certificate`. (The embedded CA certifies the key in-process instead.)

use const_oid::db::rfc4519::{COMMON_NAME, COUNTRY_NAME, ORGANIZATION_NAME};
use der::asn1::{BitString, SetOfVec};
use der::{Decode, Encode};
use hsm_adapter::{Digest, HashAlgorithm, Hsm, SystemKey};
use sha2::{Digest as _, Sha256};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::request::{CertReq, CertReqInfo, Version};

use crate::error::CaError;
use crate::x509::{CaSignatureAlg, NameBuilder};

/// A DER certification request for the HSM's CMP client key, subject
/// `C=HK, O=<organisation>, CN=<common_name>`, signed ecdsa-with-SHA256 by that key.
pub async fn ra_certification_request(
    hsm: &Hsm,
    organisation: &str,
    common_name: &str,
) -> Result<Vec<u8>, CaError> {
    for (field, value) in [("organisation", organisation), ("common name", common_name)] {
        if value.trim().is_empty() || value.chars().count() > 64 {
            return Err(CaError::InvalidRequest(format!(
                "the RA's {field} must be 1 to 64 characters"
            )));
        }
    }
    let key = hsm.system_public_key(SystemKey::CmpClient).await?;
    let info = CertReqInfo {
        version: Version::V1,
        subject: NameBuilder::default()
            .printable(COUNTRY_NAME, "HK")?
            .utf8(ORGANIZATION_NAME, organisation)?
            .utf8(COMMON_NAME, common_name)?
            .build(),
        public_key: SubjectPublicKeyInfoOwned::from_der(key.as_der())?,
        attributes: SetOfVec::new(),
    };
    let digest = Digest::new(
        HashAlgorithm::Sha256,
        Sha256::digest(info.to_der()?).to_vec(),
    )?;
    let signature = hsm
        .sign_with_system_key(SystemKey::CmpClient, &digest)
        .await?;
    Ok(CertReq {
        info,
        algorithm: CaSignatureAlg::EcdsaSha256.identifier(),
        signature: BitString::from_bytes(&signature)?,
    }
    .to_der()?)
}
