//! The X.509 pieces both CAs of this crate use (the embedded CA in the HSM, the software dev TLS
//! CA): names, validity, extensions, key identifiers, and assembling a signed certificate from a
//! `TBSCertificate` and a signature made elsewhere.
//!
//! Everything goes through the x509-cert 0.2 / der 0.7 types, so that a move to the next
//! generation touches this file (and the callers' field lists) only. The x509-cert builder is not
//! used: its signer trait is synchronous, and the HSM signs asynchronously.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use const_oid::db::rfc5912::{ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384};
use const_oid::{AssociatedOid, ObjectIdentifier};
use der::asn1::{Any, BitString, GeneralizedTime, OctetString, PrintableStringRef, SetOfVec};
use der::asn1::{UtcTime, Utf8StringRef};
use der::{Decode, Encode};
use sha2::{Digest as _, Sha256};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

use crate::error::CaError;

/// The signature algorithms the crate's CAs sign with (RFC 5758 section 3.2: no parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaSignatureAlg {
    EcdsaSha256,
    EcdsaSha384,
}

impl CaSignatureAlg {
    pub(crate) fn identifier(self) -> AlgorithmIdentifierOwned {
        AlgorithmIdentifierOwned {
            oid: match self {
                CaSignatureAlg::EcdsaSha256 => ECDSA_WITH_SHA_256,
                CaSignatureAlg::EcdsaSha384 => ECDSA_WITH_SHA_384,
            },
            parameters: None,
        }
    }
}

/// Builds a distinguished name one single-valued RDN at a time, in the order given.
#[derive(Debug, Default)]
pub(crate) struct NameBuilder(Vec<RelativeDistinguishedName>);

impl NameBuilder {
    /// An attribute whose syntax is DirectoryString, as UTF8String (RFC 5280 section 4.1.2.6).
    pub(crate) fn utf8(mut self, oid: ObjectIdentifier, value: &str) -> Result<Self, CaError> {
        let value = Any::encode_from(&Utf8StringRef::new(value)?)?;
        self.push(oid, value)?;
        Ok(self)
    }

    /// An attribute of PrintableString syntax (countryName, serialNumber: X.520).
    pub(crate) fn printable(mut self, oid: ObjectIdentifier, value: &str) -> Result<Self, CaError> {
        let value = Any::encode_from(&PrintableStringRef::new(value)?)?;
        self.push(oid, value)?;
        Ok(self)
    }

    fn push(&mut self, oid: ObjectIdentifier, value: Any) -> Result<(), CaError> {
        let atv = AttributeTypeAndValue { oid, value };
        self.0
            .push(RelativeDistinguishedName(SetOfVec::try_from(vec![atv])?));
        Ok(())
    }

    pub(crate) fn build(self) -> Name {
        RdnSequence(self.0)
    }
}

/// An X.509 time: UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 section 4.1.2.5).
/// Sub-second parts are dropped.
pub(crate) fn x509_time(at: SystemTime) -> Result<Time, CaError> {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::InvalidRequest("a time before 1970".into()))?
        .as_secs();
    let at = UNIX_EPOCH + Duration::from_secs(secs);
    // 2050-01-01T00:00:00Z.
    const Y2050: u64 = 2_524_608_000;
    Ok(if secs < Y2050 {
        Time::UtcTime(UtcTime::from_system_time(at)?)
    } else {
        Time::GeneralTime(GeneralizedTime::from_system_time(at)?)
    })
}

pub(crate) fn validity(not_before: SystemTime, not_after: SystemTime) -> Result<Validity, CaError> {
    if not_after <= not_before {
        return Err(CaError::InvalidRequest(
            "not_after must be after not_before".into(),
        ));
    }
    Ok(Validity {
        not_before: x509_time(not_before)?,
        not_after: x509_time(not_after)?,
    })
}

/// One extension with its value DER-encoded.
pub(crate) fn extension<T: Encode + AssociatedOid>(
    value: &T,
    critical: bool,
) -> Result<Extension, CaError> {
    Ok(Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

/// basicConstraints, critical: a CA with this path length limit, or (`ca` false) an end entity.
pub(crate) fn basic_constraints(
    ca: bool,
    path_len_constraint: Option<u8>,
) -> Result<Extension, CaError> {
    extension(
        &BasicConstraints {
            ca,
            path_len_constraint,
        },
        true,
    )
}

/// subjectKeyIdentifier: the [`key_identifier`] of `spki`.
pub(crate) fn subject_key_id(spki: &SubjectPublicKeyInfoOwned) -> Result<Extension, CaError> {
    extension(&SubjectKeyIdentifier(key_identifier(spki)?), false)
}

/// authorityKeyIdentifier: the issuer's key identifier only.
pub(crate) fn authority_key_id(issuer_key_id: &OctetString) -> Result<Extension, CaError> {
    extension(
        &AuthorityKeyIdentifier {
            key_identifier: Some(issuer_key_id.clone()),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        },
        false,
    )
}

/// An end entity that signs for `purposes` (extKeyUsage): not a CA, keyUsage digitalSignature
/// (critical), its SKI and the issuer's AKI.
pub(crate) fn signing_end_entity_extensions(
    spki: &SubjectPublicKeyInfoOwned,
    issuer_key_id: &OctetString,
    purposes: Vec<ObjectIdentifier>,
) -> Result<Vec<Extension>, CaError> {
    Ok(vec![
        basic_constraints(false, None)?,
        extension(&KeyUsage(KeyUsages::DigitalSignature.into()), true)?,
        subject_key_id(spki)?,
        authority_key_id(issuer_key_id)?,
        extension(&ExtendedKeyUsage(purposes), false)?,
    ])
}

/// Key identifier of a public key: SHA-256 of the subjectPublicKey BIT STRING's bytes, truncated
/// to 160 bits (RFC 7093 section 2, method 1).
pub(crate) fn key_identifier(spki: &SubjectPublicKeyInfoOwned) -> Result<OctetString, CaError> {
    let hash = Sha256::digest(spki.subject_public_key.raw_bytes());
    Ok(OctetString::new(&hash[..20])?)
}

/// A positive serial number from random bytes: the top bit is cleared (positive) and the next
/// one set, so it has exactly `bytes.len()` octets and no leading zero (hex without leading
/// zeros is then its full width).
pub(crate) fn serial_from_random(mut bytes: Vec<u8>) -> Result<(SerialNumber, String), CaError> {
    let first = bytes
        .first_mut()
        .ok_or_else(|| CaError::Internal("empty serial".into()))?;
    *first = (*first & 0x7f) | 0x40;
    let serial = SerialNumber::new(&bytes)?;
    Ok((serial, hex::encode(&bytes)))
}

/// The parts of a certificate that differ between profiles.
#[derive(Debug)]
pub(crate) struct TbsParts {
    pub(crate) serial: SerialNumber,
    pub(crate) alg: CaSignatureAlg,
    pub(crate) issuer: Name,
    pub(crate) validity: Validity,
    pub(crate) subject: Name,
    pub(crate) spki: SubjectPublicKeyInfoOwned,
    pub(crate) extensions: Vec<Extension>,
}

impl TbsParts {
    pub(crate) fn into_tbs(self) -> TbsCertificate {
        TbsCertificate {
            version: Version::V3,
            serial_number: self.serial,
            signature: self.alg.identifier(),
            issuer: self.issuer,
            validity: self.validity,
            subject: self.subject,
            subject_public_key_info: self.spki,
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: Some(self.extensions),
        }
    }
}

/// The certificate for `tbs` with `signature` (a DER `Ecdsa-Sig-Value` over the TBS DER).
pub(crate) fn assemble(tbs: TbsCertificate, signature: &[u8]) -> Result<Certificate, CaError> {
    // The signer must have produced a well-formed ECDSA signature; check its outer shape so that
    // a broken HSM reply never ends up in a certificate.
    der::asn1::SequenceRef::from_der(signature)
        .map_err(|_| CaError::Internal("the signature is not a DER sequence".into()))?;
    Ok(Certificate {
        signature_algorithm: tbs.signature.clone(),
        tbs_certificate: tbs,
        signature: BitString::from_bytes(signature)?,
    })
}

/// Parses an SPKI and checks it is a key a certificate may carry: EC P-256/P-384 or RSA of at
/// least 2048 bits.
pub(crate) fn subject_key(der: &[u8]) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    use const_oid::db::rfc5912::{ID_EC_PUBLIC_KEY, RSA_ENCRYPTION, SECP_256_R_1, SECP_384_R_1};

    let bad = |why: &str| CaError::InvalidRequest(format!("subject public key: {why}"));
    let spki = SubjectPublicKeyInfoOwned::from_der(der).map_err(|_| bad("not a DER SPKI"))?;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| bad("unaligned bit string"))?;
    match spki.algorithm.oid {
        ID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                .ok_or_else(|| bad("EC key without a named curve"))?;
            let len = match curve {
                SECP_256_R_1 => 65,
                SECP_384_R_1 => 97,
                _ => return Err(bad("unsupported curve")),
            };
            if key.len() != len || key[0] != 0x04 {
                return Err(bad("not an uncompressed point"));
            }
        }
        RSA_ENCRYPTION => {
            let rsa = RsaPublicKey::from_der(key).map_err(|_| bad("bad RSAPublicKey"))?;
            if rsa.modulus.as_bytes().len() < 256 {
                return Err(bad("RSA modulus shorter than 2048 bits"));
            }
        }
        _ => return Err(bad("unsupported algorithm")),
    }
    Ok(spki)
}

/// RSAPublicKey (RFC 8017 appendix A.1.1).
#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    #[allow(dead_code)] // Parsed to check the structure; the exponent is not checked.
    public_exponent: der::asn1::UintRef<'a>,
}
