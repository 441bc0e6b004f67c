//! Password-based MAC protection (RFC 4210 section 5.1.3.1) with SHA-256 as the one-way
//! function and HMAC-SHA-256 as the MAC, the algorithms RFC 9481 section 6.1.1 recommends.

use cmpv2::parameter::PbmParameter;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::ID_SHA_256;
use der::asn1::{Any, OctetString};
use der::{Decode, Encode};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;

use crate::error::CaError;

/// id-PasswordBasedMac (RFC 4210 section 5.1.3.1).
pub(crate) const ID_PASSWORD_BASED_MAC: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113533.7.66.13");
/// hmacWithSHA256 (RFC 4231 section 3.1, RFC 8018 appendix B.1.2).
const ID_HMAC_WITH_SHA_256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.2.9");
/// hmac-sha1 (RFC 3370 section 2.1.1 via 1.3.6.1.5.5.8.1.2): OpenSSL's default PBM MAC,
/// accepted in received messages only; this crate protects with HMAC-SHA-256.
const ID_HMAC_SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.8.1.2");
/// Iterations of the one-way function in the messages we protect (OpenSSL's limit is 100000).
const ITERATIONS: u64 = 10_000;
/// The most iterations accepted in a received message (a bound on the work a peer can ask).
const MAX_ITERATIONS: u64 = 100_000;

/// The protectionAlg of a PBM-protected message, with a fresh `salt`.
pub(crate) fn algorithm(salt: Vec<u8>) -> Result<AlgorithmIdentifierOwned, CaError> {
    let parameter = PbmParameter {
        salt: OctetString::new(salt)?,
        owf: AlgorithmIdentifierOwned {
            oid: ID_SHA_256,
            parameters: None,
        },
        iteration_count: ITERATIONS,
        mac: AlgorithmIdentifierOwned {
            oid: ID_HMAC_WITH_SHA_256,
            parameters: None,
        },
    };
    Ok(AlgorithmIdentifierOwned {
        oid: ID_PASSWORD_BASED_MAC,
        parameters: Some(Any::encode_from(&parameter)?),
    })
}

/// The MAC of `data` (DER ProtectedPart) under `alg` (a PBM protectionAlg) and `secret`.
/// [`CaError::Protection`] for another algorithm, other functions than SHA-256 and
/// HMAC-SHA-256, or more than 100000 iterations.
pub(crate) fn mac(
    alg: &AlgorithmIdentifierOwned,
    secret: &SecretSlice<u8>,
    data: &[u8],
) -> Result<Vec<u8>, CaError> {
    let bad = |why: &str| CaError::Protection(format!("PBM: {why}"));
    if alg.oid != ID_PASSWORD_BASED_MAC {
        return Err(bad("not a password-based MAC"));
    }
    let parameter = alg
        .parameters
        .as_ref()
        .ok_or_else(|| bad("no parameters"))?;
    let parameter =
        PbmParameter::from_der(&parameter.to_der()?).map_err(|_| bad("malformed parameters"))?;
    if parameter.owf.oid != ID_SHA_256 {
        return Err(bad("only SHA-256 is accepted as the one-way function"));
    }
    let sha1 = match parameter.mac.oid {
        ID_HMAC_WITH_SHA_256 => false,
        ID_HMAC_SHA1 => true,
        _ => return Err(bad("only HMAC-SHA-256 and HMAC-SHA1 are accepted")),
    };
    if parameter.iteration_count == 0 || parameter.iteration_count > MAX_ITERATIONS {
        return Err(bad("iteration count out of range"));
    }
    let key = base_key(
        secret.expose_secret(),
        parameter.salt.as_bytes(),
        parameter.iteration_count,
    );
    Ok(if sha1 {
        hmac::<Hmac<sha1::Sha1>>(&key, data)
    } else {
        hmac::<Hmac<Sha256>>(&key, data)
    })
}

/// RFC 4210 section 5.1.3.1: BASEKEY = OWF^iterations(secret || salt) with SHA-256.
fn base_key(secret: &[u8], salt: &[u8], iterations: u64) -> Vec<u8> {
    let mut key = Sha256::new()
        .chain_update(secret)
        .chain_update(salt)
        .finalize();
    for _ in 1..iterations {
        key = Sha256::digest(key);
    }
    key.to_vec()
}

fn hmac<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Checks `tag` against the MAC of `data`, in constant time.
pub(crate) fn verify(
    alg: &AlgorithmIdentifierOwned,
    secret: &SecretSlice<u8>,
    data: &[u8],
    tag: &[u8],
) -> Result<(), CaError> {
    let expected = mac(alg, secret, data)?;
    let mut difference = u8::from(expected.len() != tag.len());
    for (a, b) in expected.iter().zip(tag) {
        difference |= a ^ b;
    }
    if difference != 0 {
        return Err(CaError::Protection("PBM: the MAC does not verify".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answer computed independently with Python's hashlib/hmac (one iteration
    /// H(secret||salt), then 9 more of H, then HMAC-SHA-256).
    #[test]
    fn pbm_known_answer() {
        let tag = hmac::<Hmac<Sha256>>(&base_key(b"secret", b"salt", 10), b"data");
        assert_eq!(hex::encode(tag), KNOWN);
    }

    const KNOWN: &str = "a3e1bfbdeb745404bc344d09acf4d4c977c5a9bd429ab969924bdec30075488c";

    #[test]
    fn pbm_round_trip_and_wrong_secret() {
        let alg = algorithm(vec![7; 16]).unwrap();
        let secret: SecretSlice<u8> = b"pass".to_vec().into();
        let tag = mac(&alg, &secret, b"protected part").unwrap();
        verify(&alg, &secret, b"protected part", &tag).unwrap();
        let wrong: SecretSlice<u8> = b"Pass".to_vec().into();
        assert!(matches!(
            verify(&alg, &wrong, b"protected part", &tag),
            Err(CaError::Protection(_))
        ));
        assert!(verify(&alg, &secret, b"other", &tag).is_err());
    }
}
