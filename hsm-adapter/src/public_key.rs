//! The DER formats at the PKCS#11 boundary: SubjectPublicKeyInfo from key attributes, ECDSA
//! signatures from PKCS#11's raw `r || s`, and the PKCS#1 v1.5 DigestInfo.
//!
//! Everything here goes through the RustCrypto `der`/`spki` types so that a move to the next
//! generation of those crates touches this file only.

use std::fmt;

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{ID_EC_PUBLIC_KEY, RSA_ENCRYPTION, SECP_256_R_1, SECP_384_R_1};
use der::asn1::{AnyRef, BitStringRef, OctetStringRef, UintRef};
use der::{Decode, Encode, Sequence};
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};

use crate::error::HsmError;
use crate::keys::{EcCurve, HashAlgorithm, KeyAlgorithm};

/// A public key as a DER SubjectPublicKeyInfo (RFC 5280 section 4.1.2.7).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKeySpki(Vec<u8>);

impl PublicKeySpki {
    /// The DER encoding.
    pub fn as_der(&self) -> &[u8] {
        &self.0
    }

    /// The PEM encoding (`-----BEGIN PUBLIC KEY-----`), as openssl reads it.
    pub fn to_pem(&self) -> String {
        // Encoding to a String cannot fail for a label and bytes of this size; an empty string
        // would only make the consumer fail to parse it.
        der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, &self.0).unwrap_or_default()
    }

    /// Parses and checks that the key is of `algorithm`.
    pub(crate) fn from_der(der: Vec<u8>, algorithm: KeyAlgorithm) -> Result<Self, HsmError> {
        let bad = || HsmError::MalformedKeyRef("public key does not match the algorithm");
        let spki = SubjectPublicKeyInfoRef::from_der(&der).map_err(|_| bad())?;
        match algorithm.curve() {
            Some(curve) => {
                let params = spki.algorithm.parameters.ok_or_else(bad)?;
                let oid = params.decode_as::<ObjectIdentifier>().map_err(|_| bad())?;
                let point = spki.subject_public_key.as_bytes().ok_or_else(bad)?;
                if spki.algorithm.oid != ID_EC_PUBLIC_KEY
                    || oid != curve_oid(curve)
                    || point.len() != 1 + 2 * curve.field_len()
                {
                    return Err(bad());
                }
            }
            None => {
                if spki.algorithm.oid != RSA_ENCRYPTION {
                    return Err(bad());
                }
                let key_bytes = spki.subject_public_key.as_bytes().ok_or_else(bad)?;
                let key = RsaPublicKey::from_der(key_bytes).map_err(|_| bad())?;
                if Some(key.modulus.as_bytes().len()) != algorithm.modulus_len() {
                    return Err(bad());
                }
            }
        }
        Ok(PublicKeySpki(der))
    }
}

impl fmt::Debug for PublicKeySpki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKeySpki")
            .field(&crate::keys::HexBytes(&self.0))
            .finish()
    }
}

/// The namedCurve OID (RFC 5480 section 2.1.1.1).
pub(crate) fn curve_oid(curve: EcCurve) -> ObjectIdentifier {
    match curve {
        EcCurve::P256 => SECP_256_R_1,
        EcCurve::P384 => SECP_384_R_1,
    }
}

/// CKA_EC_PARAMS: the DER of the namedCurve OID.
pub(crate) fn ec_params(curve: EcCurve) -> Result<Vec<u8>, HsmError> {
    curve_oid(curve)
        .to_der()
        .map_err(|_| HsmError::UnexpectedResponse("curve OID encoding"))
}

/// SPKI of an EC key from CKA_EC_POINT.
///
/// PKCS#11 says CKA_EC_POINT is the DER OCTET STRING holding the point (SoftHSM does that); some
/// modules return the bare point. Either way the point must be uncompressed and on the right
/// size.
pub(crate) fn ec_spki(curve: EcCurve, ec_point: &[u8]) -> Result<PublicKeySpki, HsmError> {
    let expected = 1 + 2 * curve.field_len();
    let point = match OctetStringRef::from_der(ec_point) {
        Ok(octets) if octets.as_bytes().len() == expected => octets.as_bytes(),
        _ => ec_point,
    };
    if point.len() != expected || point[0] != 0x04 {
        return Err(HsmError::UnexpectedResponse(
            "CKA_EC_POINT is not an uncompressed point",
        ));
    }
    let oid = curve_oid(curve);
    let spki = SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: ID_EC_PUBLIC_KEY,
            parameters: Some(AnyRef::from(&oid)),
        },
        subject_public_key: BitStringRef::from_bytes(point)
            .map_err(|_| HsmError::UnexpectedResponse("EC point"))?,
    };
    encode(&spki)
}

/// RSAPublicKey (RFC 8017 appendix A.1.1).
#[derive(Sequence)]
struct RsaPublicKey<'a> {
    modulus: UintRef<'a>,
    public_exponent: UintRef<'a>,
}

/// SPKI of an RSA key from CKA_MODULUS and CKA_PUBLIC_EXPONENT.
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Result<PublicKeySpki, HsmError> {
    let bad = |_| HsmError::UnexpectedResponse("RSA modulus or exponent");
    let key = RsaPublicKey {
        modulus: UintRef::new(modulus).map_err(bad)?,
        public_exponent: UintRef::new(exponent).map_err(bad)?,
    };
    let key_der = key.to_der().map_err(bad)?;
    let spki = SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: RSA_ENCRYPTION,
            parameters: Some(AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&key_der).map_err(bad)?,
    };
    encode(&spki)
}

/// CKA_MODULUS and CKA_PUBLIC_EXPONENT of an RSA SubjectPublicKeyInfo.
pub(crate) fn rsa_parts(spki_der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), HsmError> {
    let bad = |_| HsmError::InvalidInput("not an RSA SubjectPublicKeyInfo".into());
    let spki = SubjectPublicKeyInfoRef::from_der(spki_der).map_err(bad)?;
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(HsmError::InvalidInput(
            "not an RSA SubjectPublicKeyInfo".into(),
        ));
    }
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| HsmError::InvalidInput("RSA key with unused bits".into()))?;
    let key = RsaPublicKey::from_der(bits).map_err(bad)?;
    Ok((
        key.modulus.as_bytes().to_vec(),
        key.public_exponent.as_bytes().to_vec(),
    ))
}

fn encode(spki: &SubjectPublicKeyInfoRef<'_>) -> Result<PublicKeySpki, HsmError> {
    spki.to_der()
        .map(PublicKeySpki)
        .map_err(|_| HsmError::UnexpectedResponse("SubjectPublicKeyInfo encoding"))
}

/// Ecdsa-Sig-Value (RFC 3279 section 2.2.3).
#[derive(Sequence)]
struct EcdsaSigValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// Converts PKCS#11's `r || s` (each as long as the curve's field) to DER.
pub(crate) fn ecdsa_der(curve: EcCurve, raw: &[u8]) -> Result<Vec<u8>, HsmError> {
    let n = curve.field_len();
    if raw.len() != 2 * n {
        return Err(HsmError::UnexpectedResponse("ECDSA signature length"));
    }
    let bad = |_| HsmError::UnexpectedResponse("ECDSA signature encoding");
    let (r, s) = raw.split_at(n);
    EcdsaSigValue {
        r: UintRef::new(r).map_err(bad)?,
        s: UintRef::new(s).map_err(bad)?,
    }
    .to_der()
    .map_err(bad)
}

/// DigestInfo (RFC 8017 section 9.2, step 2).
#[derive(Sequence)]
struct DigestInfo<'a> {
    digest_algorithm: AlgorithmIdentifierRef<'a>,
    digest: OctetStringRef<'a>,
}

/// The DigestInfo that CKM_RSA_PKCS signs for RSASSA-PKCS1-v1_5.
pub(crate) fn digest_info(algorithm: HashAlgorithm, digest: &[u8]) -> Result<Vec<u8>, HsmError> {
    let oid = algorithm.oid();
    let bad = |_| HsmError::UnexpectedResponse("DigestInfo encoding");
    DigestInfo {
        // RFC 8017 appendix B.1: the SHA-2 parameters are NULL in a DigestInfo.
        digest_algorithm: AlgorithmIdentifierRef {
            oid,
            parameters: Some(AnyRef::NULL),
        },
        digest: OctetStringRef::new(digest).map_err(bad)?,
    }
    .to_der()
    .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_info_matches_rfc_8017_prefixes() {
        // RFC 8017 section 9.2, note 1.
        let cases = [
            (
                HashAlgorithm::Sha256,
                "3031300d060960864801650304020105000420",
            ),
            (
                HashAlgorithm::Sha384,
                "3041300d060960864801650304020205000430",
            ),
            (
                HashAlgorithm::Sha512,
                "3051300d060960864801650304020305000440",
            ),
        ];
        for (alg, prefix) in cases {
            let digest = vec![0xab; alg.output_len()];
            let der = digest_info(alg, &digest).unwrap();
            assert_eq!(hex::encode(&der[..der.len() - digest.len()]), prefix);
            assert!(der.ends_with(&digest));
        }
    }

    #[test]
    fn ecdsa_signature_gets_minimal_integers() {
        let mut raw = vec![0u8; 64];
        raw[31] = 1; // r = 1
        raw[32] = 0x80; // s has its top bit set: needs a leading zero
        let der = ecdsa_der(EcCurve::P256, &raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 0x21, 0x00]);
        assert!(ecdsa_der(EcCurve::P384, &raw).is_err());
    }

    #[test]
    fn ec_point_is_accepted_wrapped_or_bare() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[7u8; 64]);
        let wrapped = OctetStringRef::new(&point).unwrap().to_der().unwrap();
        let a = ec_spki(EcCurve::P256, &wrapped).unwrap();
        let b = ec_spki(EcCurve::P256, &point).unwrap();
        assert_eq!(a, b);
        assert!(PublicKeySpki::from_der(a.as_der().to_vec(), KeyAlgorithm::EcP256).is_ok());
        assert!(PublicKeySpki::from_der(a.as_der().to_vec(), KeyAlgorithm::EcP384).is_err());
        assert!(ec_spki(EcCurve::P384, &point).is_err());
    }

    #[test]
    fn rsa_spki_round_trips() {
        let mut modulus = vec![0xc3u8; 256];
        modulus[255] |= 1;
        let spki = rsa_spki(&modulus, &[1, 0, 1]).unwrap();
        assert!(PublicKeySpki::from_der(spki.as_der().to_vec(), KeyAlgorithm::Rsa2048).is_ok());
        assert!(PublicKeySpki::from_der(spki.as_der().to_vec(), KeyAlgorithm::Rsa3072).is_err());
        assert!(spki.to_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
    }
}
