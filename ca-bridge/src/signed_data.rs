//! Detached CMS `SignedData` (RFC 5652) around a signature made elsewhere.
//!
//! The signing key lives in the HSM and the HSM signs asynchronously, so building the CMS takes two
//! steps: [`SignedAttributes::new`] fixes the signed attributes and gives the bytes to sign
//! ([`SignedAttributes::to_be_signed`], the DER `SET OF Attribute`, RFC 5652 section 5.4); the
//! caller hashes and signs them; [`SignedAttributes::into_content_info`] wraps the signature, the
//! attributes and the certificates into a `ContentInfo`.
//!
//! The content itself is never seen: the caller gives its hash, which becomes the message-digest
//! attribute, and the `SignedData` is detached (no `eContent`). The signed attributes are the ones
//! API.md promises: content-type (id-data), message-digest, signing-time and ESS
//! signing-certificate-v2 (RFC 5035), which binds the signer's certificate to the signature.

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5911::{
    ID_AA_SIGNING_CERTIFICATE_V_2, ID_CONTENT_TYPE, ID_DATA, ID_MESSAGE_DIGEST, ID_SIGNED_DATA,
    ID_SIGNING_TIME,
};
use const_oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, SHA_256_WITH_RSA_ENCRYPTION,
    SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
};
use der::asn1::{GeneralizedTime, Null, OctetString, SetOfVec, UtcTime};
use der::{Any, DateTime, Decode, Encode, Sequence};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::time::SystemTime;
use x509_cert::Certificate;
use x509_cert::attr::{Attribute, Attributes};
use x509_cert::ext::pkix::name::{GeneralName, GeneralNames};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::AlgorithmIdentifierOwned;

/// Why a `SignedData` could not be built. None of the variants carries the signer's certificate
/// or the message digest, so an error can be logged as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CmsError {
    /// The message digest is not as long as the digest algorithm's output.
    #[error("message digest is {actual} bytes, {algorithm:?} gives {expected}")]
    DigestLength {
        /// The digest algorithm the caller named.
        algorithm: HashAlgorithm,
        /// Its output length.
        expected: usize,
        /// The length of the digest given.
        actual: usize,
    },
    /// The signing time is before 1970 or past what `GeneralizedTime` can hold.
    #[error("signing time cannot be encoded")]
    SigningTime,
    /// A certificate is not a DER X.509 certificate (`index` 0 is the signer's).
    #[error("certificate {index} is not a DER X.509 certificate: {source}")]
    Certificate {
        /// Its position: 0 for the signer's certificate, then the chain.
        index: usize,
        /// What the decoder found.
        source: der::Error,
    },
    /// The certificates given with the signature do not start with the signer's certificate that
    /// the signed attributes were made for.
    #[error("the first certificate is not the signer's certificate of the signed attributes")]
    SignerCertificateMismatch,
    /// The signature algorithm hashes with another algorithm than the signed attributes' digest
    /// algorithm.
    #[error("signature algorithm {signature:?} does not use digest algorithm {digest:?}")]
    AlgorithmMismatch {
        /// The digest algorithm of the signed attributes.
        digest: HashAlgorithm,
        /// The signature algorithm given with the signature.
        signature: SignatureAlg,
    },
    /// The signature is empty.
    #[error("the signature is empty")]
    EmptySignature,
    /// DER encoding failed (a length past what DER can carry).
    #[error("DER encoding failed: {0}")]
    Encoding(#[from] der::Error),
}

/// The digest algorithm of the message digest and the signed attributes: the vocabulary
/// shared by every crate.
pub use smartsign_types::HashAlgorithm;

/// `DigestAlgorithmIdentifier`: RFC 5754 section 2 says the parameters SHOULD be absent.
fn digest_algorithm_identifier(hash: HashAlgorithm) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: hash.oid(),
        parameters: None,
    }
}

/// The algorithm of the signature over the signed attributes (RFC 5754 section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignatureAlg {
    /// ECDSA over SHA-256 (`ecdsa-with-SHA256`); the signature is a DER `Ecdsa-Sig-Value`.
    EcdsaSha256,
    /// ECDSA over SHA-384 (`ecdsa-with-SHA384`).
    EcdsaSha384,
    /// ECDSA over SHA-512 (`ecdsa-with-SHA512`).
    EcdsaSha512,
    /// RSASSA-PKCS1-v1_5 over SHA-256 (`sha256WithRSAEncryption`).
    RsaPkcs1Sha256,
    /// RSASSA-PKCS1-v1_5 over SHA-384 (`sha384WithRSAEncryption`).
    RsaPkcs1Sha384,
    /// RSASSA-PKCS1-v1_5 over SHA-512 (`sha512WithRSAEncryption`).
    RsaPkcs1Sha512,
}

impl SignatureAlg {
    /// The digest algorithm this signature algorithm signs with.
    pub fn hash(self) -> HashAlgorithm {
        match self {
            Self::EcdsaSha256 | Self::RsaPkcs1Sha256 => HashAlgorithm::Sha256,
            Self::EcdsaSha384 | Self::RsaPkcs1Sha384 => HashAlgorithm::Sha384,
            Self::EcdsaSha512 | Self::RsaPkcs1Sha512 => HashAlgorithm::Sha512,
        }
    }

    /// `SignatureAlgorithmIdentifier`. RFC 5754 section 3.2 (via RFC 5758 section 3.2): the
    /// ECDSA identifiers have absent parameters; RFC 4055 section 5: the `sha*WithRSAEncryption`
    /// identifiers have NULL parameters.
    fn algorithm_identifier(self) -> AlgorithmIdentifierOwned {
        let (oid, null_parameters) = match self {
            Self::EcdsaSha256 => (ECDSA_WITH_SHA_256, false),
            Self::EcdsaSha384 => (ECDSA_WITH_SHA_384, false),
            Self::EcdsaSha512 => (ECDSA_WITH_SHA_512, false),
            Self::RsaPkcs1Sha256 => (SHA_256_WITH_RSA_ENCRYPTION, true),
            Self::RsaPkcs1Sha384 => (SHA_384_WITH_RSA_ENCRYPTION, true),
            Self::RsaPkcs1Sha512 => (SHA_512_WITH_RSA_ENCRYPTION, true),
        };
        AlgorithmIdentifierOwned {
            oid,
            parameters: null_parameters.then(|| Any::from(Null)),
        }
    }
}

/// The signed attributes of one signer, ready to be signed (RFC 5652 section 5.3).
///
/// Made by [`SignedAttributes::new`]; the caller signs the digest of
/// [`to_be_signed`](Self::to_be_signed) (or [`digest_to_sign`](Self::digest_to_sign)) and hands the
/// signature to [`into_content_info`](Self::into_content_info).
pub struct SignedAttributes {
    digest_alg: HashAlgorithm,
    attributes: Attributes,
    /// DER of `attributes` with the `SET OF` tag: what is signed (RFC 5652 section 5.4).
    to_be_signed: Vec<u8>,
    signer: IssuerAndSerialNumber,
    signer_cert_der: Vec<u8>,
}

impl fmt::Debug for SignedAttributes {
    // The certificate carries the signer's name and the digest identifies a document: neither
    // belongs in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedAttributes")
            .field("digest_alg", &self.digest_alg)
            .finish_non_exhaustive()
    }
}

impl SignedAttributes {
    /// Signed attributes for a document whose `digest_alg` hash is `message_digest`, signed at
    /// `signing_time` by the holder of `signer_cert_der`:
    ///
    /// - content-type: id-data (RFC 5652 section 11.1);
    /// - message-digest: `message_digest` (section 11.2);
    /// - signing-time: `UTCTime` for 1950 to 2049, `GeneralizedTime` after (section 11.3),
    ///   whole seconds;
    /// - signing-certificate-v2 (RFC 5035 section 3): one `ESSCertIDv2` with the SHA-256 hash of
    ///   the certificate (the `DEFAULT` hash algorithm, so left out) and its `issuerSerial`.
    ///
    /// The same `digest_alg` hashes the signed attributes for the signature.
    pub fn new(
        digest_alg: HashAlgorithm,
        message_digest: &[u8],
        signing_time: SystemTime,
        signer_cert_der: &[u8],
    ) -> Result<Self, CmsError> {
        if message_digest.len() != digest_alg.output_len() {
            return Err(CmsError::DigestLength {
                algorithm: digest_alg,
                expected: digest_alg.output_len(),
                actual: message_digest.len(),
            });
        }
        let signer_cert = Certificate::from_der(signer_cert_der)
            .map_err(|source| CmsError::Certificate { index: 0, source })?;
        let tbs = &signer_cert.tbs_certificate;

        let signing_certificate = SigningCertificateV2 {
            certs: vec![EssCertIdV2 {
                hash_algorithm: None,
                cert_hash: OctetString::new(Sha256::digest(signer_cert_der).to_vec())?,
                issuer_serial: Some(IssuerSerial {
                    issuer: vec![GeneralName::DirectoryName(tbs.issuer.clone())],
                    serial_number: tbs.serial_number.clone(),
                }),
            }],
        };

        let attributes = Attributes::try_from(vec![
            attribute(ID_CONTENT_TYPE, Any::encode_from(&ID_DATA)?)?,
            attribute(
                ID_MESSAGE_DIGEST,
                Any::encode_from(&OctetString::new(message_digest)?)?,
            )?,
            attribute(ID_SIGNING_TIME, encode_signing_time(signing_time)?)?,
            attribute(
                ID_AA_SIGNING_CERTIFICATE_V_2,
                Any::encode_from(&signing_certificate)?,
            )?,
        ])?;
        // `Attributes` is a `SetOfVec`: built from a `Vec`, it is sorted by DER encoding, and
        // it encodes with the universal `SET OF` tag (0x31), as RFC 5652 section 5.4 asks for
        // the signed form.
        let to_be_signed = attributes.to_der()?;

        Ok(Self {
            digest_alg,
            attributes,
            to_be_signed,
            signer: IssuerAndSerialNumber {
                issuer: tbs.issuer.clone(),
                serial_number: tbs.serial_number.clone(),
            },
            signer_cert_der: signer_cert_der.to_vec(),
        })
    }

    /// The digest algorithm of the message digest and of the signed attributes.
    pub fn digest_alg(&self) -> HashAlgorithm {
        self.digest_alg
    }

    /// The DER `SET OF Attribute` (tag 0x31) that the signature covers. The caller hashes it with
    /// [`digest_alg`](Self::digest_alg) and signs the hash.
    pub fn to_be_signed(&self) -> Vec<u8> {
        self.to_be_signed.clone()
    }

    /// The [`digest_alg`](Self::digest_alg) hash of [`to_be_signed`](Self::to_be_signed): the
    /// digest to hand to the HSM.
    pub fn digest_to_sign(&self) -> Vec<u8> {
        self.digest_alg.digest(&self.to_be_signed)
    }

    /// The DER `ContentInfo` of a detached `SignedData` (RFC 5652 section 5.1) with one
    /// `SignerInfo`: version 1, `issuerAndSerialNumber` of the signer's certificate, these signed
    /// attributes (as `[0] IMPLICIT`), `signature_alg` and `signature` (for ECDSA the DER
    /// `Ecdsa-Sig-Value`, for RSA the PKCS#1 v1.5 signature block).
    ///
    /// `certificates` are DER certificates, the signer's first (the one given to
    /// [`new`](Self::new)), then the chain; the root may be left out. They go into the
    /// `CertificateSet`, which as a DER `SET OF` is sorted by encoding, not kept in this order;
    /// duplicates are dropped.
    ///
    /// The signature is not verified here: the caller, who knows the public key, may do so.
    pub fn into_content_info(
        self,
        signature: &[u8],
        signature_alg: SignatureAlg,
        certificates: &[&[u8]],
    ) -> Result<Vec<u8>, CmsError> {
        if signature_alg.hash() != self.digest_alg {
            return Err(CmsError::AlgorithmMismatch {
                digest: self.digest_alg,
                signature: signature_alg,
            });
        }
        if signature.is_empty() {
            return Err(CmsError::EmptySignature);
        }
        if certificates.first().copied() != Some(self.signer_cert_der.as_slice()) {
            return Err(CmsError::SignerCertificateMismatch);
        }

        let mut choices: Vec<CertificateChoices> = Vec::with_capacity(certificates.len());
        for (index, der) in certificates.iter().enumerate() {
            if certificates[..index].contains(der) {
                continue;
            }
            let certificate = Certificate::from_der(der)
                .map_err(|source| CmsError::Certificate { index, source })?;
            choices.push(CertificateChoices::Certificate(certificate));
        }

        let digest_algorithm = digest_algorithm_identifier(self.digest_alg);
        let signer_info = SignerInfo {
            // Version 1 goes with an issuerAndSerialNumber sid (RFC 5652 section 5.3).
            version: CmsVersion::V1,
            sid: SignerIdentifier::IssuerAndSerialNumber(self.signer),
            digest_alg: digest_algorithm.clone(),
            signed_attrs: Some(self.attributes),
            signature_algorithm: signature_alg.algorithm_identifier(),
            signature: OctetString::new(signature)?,
            unsigned_attrs: None,
        };
        let signed_data = SignedData {
            // Version 1: id-data content, only X.509 certificates, only version 1 SignerInfos
            // (RFC 5652 section 5.1).
            version: CmsVersion::V1,
            digest_algorithms: SetOfVec::try_from(vec![digest_algorithm])?,
            encap_content_info: EncapsulatedContentInfo {
                econtent_type: ID_DATA,
                econtent: None,
            },
            certificates: Some(CertificateSet::try_from(choices)?),
            crls: None,
            signer_infos: SignerInfos::try_from(vec![signer_info])?,
        };
        let content_info = ContentInfo {
            content_type: ID_SIGNED_DATA,
            content: Any::encode_from(&signed_data)?,
        };
        Ok(content_info.to_der()?)
    }
}

/// A single-valued attribute.
fn attribute(oid: ObjectIdentifier, value: Any) -> Result<Attribute, der::Error> {
    Ok(Attribute {
        oid,
        values: SetOfVec::try_from(vec![value])?,
    })
}

/// `SigningTime ::= Time`: dates from 1950 through 2049 MUST be `UTCTime`, others
/// `GeneralizedTime` (RFC 5652 section 11.3). Sub-second precision is dropped.
fn encode_signing_time(signing_time: SystemTime) -> Result<Any, CmsError> {
    let date_time = DateTime::from_system_time(signing_time).map_err(|_| CmsError::SigningTime)?;
    if date_time.year() < 2050 {
        // Not before 1970 (from_system_time refuses earlier times), so UTCTime can hold it.
        Ok(Any::encode_from(&UtcTime::from_date_time(date_time)?)?)
    } else {
        Ok(Any::encode_from(&GeneralizedTime::from_date_time(
            date_time,
        ))?)
    }
}

/// RFC 5035 section 5.4.1 (the `policies` field is not used):
///
/// ```text
/// SigningCertificateV2 ::= SEQUENCE {
///     certs        SEQUENCE OF ESSCertIDv2,
///     policies     SEQUENCE OF PolicyInformation OPTIONAL }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
struct SigningCertificateV2 {
    certs: Vec<EssCertIdV2>,
}

/// RFC 5035 section 5.4.1.1:
///
/// ```text
/// ESSCertIDv2 ::= SEQUENCE {
///     hashAlgorithm   AlgorithmIdentifier DEFAULT {algorithm id-sha256},
///     certHash        Hash,
///     issuerSerial    IssuerSerial OPTIONAL }
/// ```
///
/// We always hash with SHA-256, the `DEFAULT`, which DER leaves out: `hash_algorithm` is `None`
/// when encoding.
#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
struct EssCertIdV2 {
    #[asn1(optional = "true")]
    hash_algorithm: Option<AlgorithmIdentifierOwned>,
    cert_hash: OctetString,
    #[asn1(optional = "true")]
    issuer_serial: Option<IssuerSerial>,
}

/// RFC 5035 section 5.4.1.1:
///
/// ```text
/// IssuerSerial ::= SEQUENCE {
///     issuer          GeneralNames,
///     serialNumber    CertificateSerialNumber }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
struct IssuerSerial {
    issuer: GeneralNames,
    serial_number: SerialNumber,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// A structurally valid certificate; this module never checks its signature.
    fn test_certificate() -> Vec<u8> {
        use std::str::FromStr;
        use x509_cert::certificate::{TbsCertificate, Version};
        use x509_cert::name::Name;
        use x509_cert::spki::SubjectPublicKeyInfoOwned;
        use x509_cert::time::Validity;

        let name = Name::from_str("CN=Test Signer,O=smartsign test,C=HK").unwrap();
        let signature_algorithm = SignatureAlg::EcdsaSha256.algorithm_identifier();
        let tbs_certificate = TbsCertificate {
            version: Version::V3,
            serial_number: SerialNumber::new(&[0x01, 0x23, 0x45]).unwrap(),
            signature: signature_algorithm.clone(),
            issuer: name.clone(),
            validity: Validity::from_now(Duration::from_secs(3600)).unwrap(),
            subject: name,
            subject_public_key_info: SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: const_oid::db::rfc5912::ID_EC_PUBLIC_KEY,
                    parameters: Some(
                        Any::encode_from(&const_oid::db::rfc5912::SECP_256_R_1).unwrap(),
                    ),
                },
                subject_public_key: der::asn1::BitString::from_bytes(&[4; 65]).unwrap(),
            },
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: None,
        };
        Certificate {
            tbs_certificate,
            signature_algorithm,
            signature: der::asn1::BitString::from_bytes(&[0x30, 0x00]).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    fn attrs_at(time: SystemTime) -> SignedAttributes {
        SignedAttributes::new(HashAlgorithm::Sha256, &[7; 32], time, &test_certificate()).unwrap()
    }

    #[test]
    fn to_be_signed_is_a_der_sorted_set_of_four_attributes() {
        let attrs = attrs_at(UNIX_EPOCH + Duration::from_secs(1_780_000_000));
        let tbs = attrs.to_be_signed();
        assert_eq!(tbs[0], 0x31, "SET OF tag");
        // Decoding a SetOfVec checks the DER order of its elements.
        let decoded = Attributes::from_der(&tbs).unwrap();
        let oids: Vec<_> = decoded.iter().map(|a| a.oid).collect();
        assert_eq!(oids.len(), 4);
        for oid in [
            ID_CONTENT_TYPE,
            ID_MESSAGE_DIGEST,
            ID_SIGNING_TIME,
            ID_AA_SIGNING_CERTIFICATE_V_2,
        ] {
            assert!(oids.contains(&oid), "{oid} missing");
        }
        let encodings: Vec<Vec<u8>> = decoded.iter().map(|a| a.to_der().unwrap()).collect();
        let mut sorted = encodings.clone();
        sorted.sort();
        assert_eq!(encodings, sorted);
        assert_eq!(attrs.digest_to_sign(), Sha256::digest(&tbs).to_vec());
    }

    #[test]
    fn signing_time_is_utc_time_before_2050_and_generalized_after() {
        fn time_tag(attrs: &SignedAttributes) -> u8 {
            let time = attrs
                .attributes
                .iter()
                .find(|a| a.oid == ID_SIGNING_TIME)
                .unwrap();
            der::Tagged::tag(time.values.get(0).unwrap()).octet()
        }
        let before = attrs_at(UNIX_EPOCH + Duration::from_secs(2_524_607_999)); // 2049-12-31
        assert_eq!(time_tag(&before), 0x17);
        let after = attrs_at(UNIX_EPOCH + Duration::from_secs(2_524_608_000)); // 2050-01-01
        assert_eq!(time_tag(&after), 0x18);
        let err = SignedAttributes::new(
            HashAlgorithm::Sha256,
            &[7; 32],
            UNIX_EPOCH - Duration::from_secs(1),
            &test_certificate(),
        )
        .unwrap_err();
        assert!(matches!(err, CmsError::SigningTime));
    }

    #[test]
    fn signing_certificate_v2_hashes_the_certificate_and_names_its_issuer_and_serial() {
        let cert_der = test_certificate();
        let attrs = SignedAttributes::new(
            HashAlgorithm::Sha384,
            &[1; 48],
            SystemTime::now(),
            &cert_der,
        )
        .unwrap();
        let ess = attrs
            .attributes
            .iter()
            .find(|a| a.oid == ID_AA_SIGNING_CERTIFICATE_V_2)
            .unwrap();
        let value: SigningCertificateV2 = ess.values.get(0).unwrap().decode_as().unwrap();
        assert_eq!(value.certs.len(), 1);
        let id = &value.certs[0];
        assert!(id.hash_algorithm.is_none(), "DEFAULT sha256 is left out");
        assert_eq!(id.cert_hash.as_bytes(), &Sha256::digest(&cert_der)[..]);
        let cert = Certificate::from_der(&cert_der).unwrap();
        let issuer_serial = id.issuer_serial.as_ref().unwrap();
        assert_eq!(
            issuer_serial.issuer,
            vec![GeneralName::DirectoryName(
                cert.tbs_certificate.issuer.clone()
            )]
        );
        assert_eq!(
            issuer_serial.serial_number,
            cert.tbs_certificate.serial_number
        );
    }

    #[test]
    fn wrong_digest_length_is_refused() {
        let err = SignedAttributes::new(
            HashAlgorithm::Sha512,
            &[0; 32],
            SystemTime::now(),
            &test_certificate(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            CmsError::DigestLength {
                expected: 64,
                actual: 32,
                ..
            }
        ));
    }

    #[test]
    fn bad_certificate_is_refused() {
        let err = SignedAttributes::new(
            HashAlgorithm::Sha256,
            &[0; 32],
            SystemTime::now(),
            b"not a cert",
        )
        .unwrap_err();
        assert!(matches!(err, CmsError::Certificate { index: 0, .. }));
    }

    #[test]
    fn signature_algorithm_must_match_digest_algorithm() {
        let cert = test_certificate();
        let attrs = attrs_at(SystemTime::now());
        let err = attrs
            .into_content_info(&[1, 2, 3], SignatureAlg::EcdsaSha384, &[&cert])
            .unwrap_err();
        assert!(matches!(err, CmsError::AlgorithmMismatch { .. }));
    }

    #[test]
    fn signer_certificate_must_come_first() {
        let cert = test_certificate();
        let attrs = attrs_at(SystemTime::now());
        let err = attrs
            .into_content_info(&[1, 2, 3], SignatureAlg::EcdsaSha256, &[])
            .unwrap_err();
        assert!(matches!(err, CmsError::SignerCertificateMismatch));
        let mut other = cert.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        let attrs = attrs_at(SystemTime::now());
        let err = attrs
            .into_content_info(&[1, 2, 3], SignatureAlg::EcdsaSha256, &[&other])
            .unwrap_err();
        assert!(matches!(err, CmsError::SignerCertificateMismatch));
    }

    #[test]
    fn content_info_is_detached_signed_data_version_1() {
        let cert = test_certificate();
        let attrs = attrs_at(SystemTime::now());
        let tbs = attrs.to_be_signed();
        let der = attrs
            .into_content_info(&[0x30, 0x00], SignatureAlg::RsaPkcs1Sha256, &[&cert, &cert])
            .unwrap();
        let content_info = ContentInfo::from_der(&der).unwrap();
        assert_eq!(content_info.content_type, ID_SIGNED_DATA);
        let signed_data: SignedData = content_info.content.decode_as().unwrap();
        assert_eq!(signed_data.version, CmsVersion::V1);
        assert_eq!(signed_data.encap_content_info.econtent_type, ID_DATA);
        assert!(signed_data.encap_content_info.econtent.is_none());
        assert_eq!(signed_data.certificates.unwrap().0.len(), 1, "deduplicated");
        let digest_algs: Vec<_> = signed_data.digest_algorithms.iter().cloned().collect();
        assert_eq!(
            digest_algs,
            vec![digest_algorithm_identifier(HashAlgorithm::Sha256)]
        );
        let signer_info = signed_data.signer_infos.0.get(0).unwrap();
        assert_eq!(signer_info.version, CmsVersion::V1);
        assert!(matches!(
            signer_info.sid,
            SignerIdentifier::IssuerAndSerialNumber(_)
        ));
        assert_eq!(
            signer_info.signature_algorithm.oid,
            SHA_256_WITH_RSA_ENCRYPTION
        );
        assert_eq!(
            signer_info.signature_algorithm.parameters,
            Some(Any::from(Null))
        );
        // Re-encoded with the SET OF tag, the signed attributes are the bytes that were signed.
        assert_eq!(
            signer_info.signed_attrs.as_ref().unwrap().to_der().unwrap(),
            tbs
        );
    }

    #[test]
    fn algorithm_identifiers_follow_rfc_5754() {
        for (alg, oid, null) in [
            (SignatureAlg::EcdsaSha256, "1.2.840.10045.4.3.2", false),
            (SignatureAlg::EcdsaSha384, "1.2.840.10045.4.3.3", false),
            (SignatureAlg::EcdsaSha512, "1.2.840.10045.4.3.4", false),
            (SignatureAlg::RsaPkcs1Sha256, "1.2.840.113549.1.1.11", true),
            (SignatureAlg::RsaPkcs1Sha384, "1.2.840.113549.1.1.12", true),
            (SignatureAlg::RsaPkcs1Sha512, "1.2.840.113549.1.1.13", true),
        ] {
            let id = alg.algorithm_identifier();
            assert_eq!(id.oid.to_string(), oid);
            assert_eq!(id.parameters.is_some(), null, "{alg:?}");
        }
        for (alg, oid) in [
            (HashAlgorithm::Sha256, "2.16.840.1.101.3.4.2.1"),
            (HashAlgorithm::Sha384, "2.16.840.1.101.3.4.2.2"),
            (HashAlgorithm::Sha512, "2.16.840.1.101.3.4.2.3"),
        ] {
            assert_eq!(digest_algorithm_identifier(alg).oid.to_string(), oid);
            assert!(digest_algorithm_identifier(alg).parameters.is_none());
            assert_eq!(alg.digest(b"").len(), alg.output_len());
        }
    }

    #[test]
    fn debug_shows_no_certificate_or_digest() {
        let attrs = attrs_at(SystemTime::now());
        let debug = format!("{attrs:?}");
        assert_eq!(debug, "SignedAttributes { digest_alg: Sha256, .. }");
    }
}
