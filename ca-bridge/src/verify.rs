//! Signature and certificate checks shared by the CMP, OCSP and CRL code: a signature over DER
//! bytes by an issuer's public key (ECDSA P-256/P-384 or RSA PKCS#1 v1.5, with SHA-256/384/512),
//! the validity period of a certificate, the update window of an OCSP response or a CRL, and
//! serial numbers as hex.

use std::time::{Duration, SystemTime};

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, ID_EC_PUBLIC_KEY, RSA_ENCRYPTION,
    SECP_256_R_1, SECP_384_R_1, SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION,
    SHA_512_WITH_RSA_ENCRYPTION,
};
use der::asn1::BitString;
use ecdsa::signature::hazmat::PrehashVerifier as _;
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::certificate::Certificate;

use crate::error::CaError;

/// The hash of a signature algorithm.
#[derive(Debug, Clone, Copy)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => Sha256::digest(data).to_vec(),
            Hash::Sha384 => Sha384::digest(data).to_vec(),
            Hash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// Checks that `signature` (by the algorithm `alg`) over `data` was made by the key of `spki`.
/// [`CaError::Protection`] when it was not or the algorithm is not one this crate accepts.
pub(crate) fn verify_signature(
    spki: &SubjectPublicKeyInfoOwned,
    alg: &AlgorithmIdentifierOwned,
    data: &[u8],
    signature: &BitString,
) -> Result<(), CaError> {
    let bad = |why: &str| CaError::Protection(why.to_owned());
    let signature = signature
        .as_bytes()
        .ok_or_else(|| bad("the signature bit string is not whole octets"))?;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| bad("the public key bit string is not whole octets"))?;
    let (is_ecdsa, hash) = match alg.oid {
        ECDSA_WITH_SHA_256 => (true, Hash::Sha256),
        ECDSA_WITH_SHA_384 => (true, Hash::Sha384),
        ECDSA_WITH_SHA_512 => (true, Hash::Sha512),
        SHA_256_WITH_RSA_ENCRYPTION => (false, Hash::Sha256),
        SHA_384_WITH_RSA_ENCRYPTION => (false, Hash::Sha384),
        SHA_512_WITH_RSA_ENCRYPTION => (false, Hash::Sha512),
        _ => return Err(bad("unsupported signature algorithm")),
    };
    let prehash = hash.digest(data);
    let valid = match (is_ecdsa, spki.algorithm.oid) {
        (true, ID_EC_PUBLIC_KEY) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
            // ring's constant-time P-256 and P-384 for the pairs it has (every status check
            // verifies an OCSP response: RustCrypto's p256 was 13% of the daemon's CPU under
            // `bench sign`), RustCrypto's for the rest.
            let ring_algorithm: Option<&ring::signature::EcdsaVerificationAlgorithm> =
                match (curve, &hash) {
                    (Some(SECP_256_R_1), Hash::Sha256) => {
                        Some(&ring::signature::ECDSA_P256_SHA256_ASN1)
                    }
                    (Some(SECP_256_R_1), Hash::Sha384) => {
                        Some(&ring::signature::ECDSA_P256_SHA384_ASN1)
                    }
                    (Some(SECP_384_R_1), Hash::Sha256) => {
                        Some(&ring::signature::ECDSA_P384_SHA256_ASN1)
                    }
                    (Some(SECP_384_R_1), Hash::Sha384) => {
                        Some(&ring::signature::ECDSA_P384_SHA384_ASN1)
                    }
                    _ => None,
                };
            match curve {
                _ if let Some(algorithm) = ring_algorithm => {
                    ring::signature::UnparsedPublicKey::new(algorithm, key)
                        .verify(data, signature)
                        .is_ok()
                }
                Some(SECP_256_R_1) => {
                    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(key)
                        .map_err(|_| bad("bad P-256 public key"))?;
                    let sig = p256::ecdsa::Signature::from_der(signature)
                        .map_err(|_| bad("malformed ECDSA signature"))?;
                    key.verify_prehash(&prehash, &sig).is_ok()
                }
                Some(SECP_384_R_1) => {
                    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(key)
                        .map_err(|_| bad("bad P-384 public key"))?;
                    let sig = p384::ecdsa::Signature::from_der(signature)
                        .map_err(|_| bad("malformed ECDSA signature"))?;
                    key.verify_prehash(&prehash, &sig).is_ok()
                }
                _ => return Err(bad("unsupported EC curve")),
            }
        }
        (false, RSA_ENCRYPTION) => {
            use rsa::pkcs1::DecodeRsaPublicKey as _;
            let key =
                rsa::RsaPublicKey::from_pkcs1_der(key).map_err(|_| bad("bad RSA public key"))?;
            let scheme = match hash {
                Hash::Sha256 => rsa::Pkcs1v15Sign::new::<Sha256>(),
                Hash::Sha384 => rsa::Pkcs1v15Sign::new::<Sha384>(),
                Hash::Sha512 => rsa::Pkcs1v15Sign::new::<Sha512>(),
            };
            key.verify(scheme, &prehash, signature).is_ok()
        }
        _ => return Err(bad("the signature algorithm does not fit the key")),
    };
    if valid {
        Ok(())
    } else {
        Err(bad("the signature does not verify"))
    }
}

/// Checks that `cert` was signed by `issuer` (name and signature).
pub(crate) fn verify_issued_by(cert: &Certificate, issuer: &Certificate) -> Result<(), CaError> {
    use der::Encode as _;
    if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err(CaError::Protection(
            "the certificate is not issued by the expected issuer".into(),
        ));
    }
    verify_signature(
        &issuer.tbs_certificate.subject_public_key_info,
        &cert.signature_algorithm,
        &cert.tbs_certificate.to_der()?,
        &cert.signature,
    )
}

/// Whether `now` lies within the certificate's validity period.
pub(crate) fn valid_at(cert: &Certificate, now: SystemTime) -> bool {
    let validity = &cert.tbs_certificate.validity;
    validity.not_before.to_system_time() <= now && now <= validity.not_after.to_system_time()
}

/// How far a thisUpdate may lie ahead of the local clock (the two clocks may differ a little).
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Checks the update window of an OCSP response or a CRL (`what`, in the error) at `now`:
/// thisUpdate not ahead by more than [`CLOCK_SKEW`], a nextUpdate that has not passed. Returns
/// the nextUpdate.
pub(crate) fn check_update_window(
    what: &str,
    this_update: SystemTime,
    next_update: Option<SystemTime>,
    now: SystemTime,
) -> Result<SystemTime, CaError> {
    let protocol = |why: &str| CaError::Protocol(format!("{what}: {why}"));
    if this_update > now + CLOCK_SKEW {
        return Err(protocol("thisUpdate is in the future"));
    }
    let next_update = next_update.ok_or_else(|| protocol("no nextUpdate"))?;
    if next_update <= now {
        return Err(protocol("nextUpdate has passed"));
    }
    Ok(next_update)
}

/// A serial number as lowercase hex without leading zeros (the form the embedded CA keys its
/// state by and API.md uses).
pub(crate) fn serial_hex(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_drop_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0x4a, 0x0f]), "4a0f");
        assert_eq!(serial_hex(&[0]), "0");
    }
}
