//! Certificate policy OIDs with arcs of up to 128 bits.
//!
//! `const-oid` 0.9 (the OID type of the der 0.7 generation) holds arcs of 32 bits only, and
//! panics on overflow in debug builds when parsing larger ones, so it cannot hold OIDs under the
//! `2.25` arc, whose second component is a whole UUID (ITU-T X.667). This type parses and
//! DER-encodes such OIDs itself; the certificate policies extension is encoded from it.

use std::fmt;
use std::str::FromStr;

use der::asn1::Any;
use der::{Encode, Sequence, Tag};

use crate::error::CaError;

/// Longest OID content accepted, in bytes (a `2.25.<uuid>.n` OID takes about 21).
const MAX_CONTENT: usize = 64;

/// An object identifier in dotted form, e.g. `2.25.329800735698586629295641978511506172918.1`,
/// each arc below 2^128.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PolicyOid {
    dotted: String,
    /// The DER content octets (without tag and length).
    content: Vec<u8>,
}

impl PolicyOid {
    /// The dotted form.
    pub fn as_str(&self) -> &str {
        &self.dotted
    }

    /// The DER encoding as an `Any` (tag OBJECT IDENTIFIER).
    pub(crate) fn to_any(&self) -> Result<Any, CaError> {
        Ok(Any::new(Tag::ObjectIdentifier, self.content.as_slice())?)
    }
}

impl FromStr for PolicyOid {
    type Err = CaError;

    /// X.660 rules: at least two arcs, the first 0, 1 or 2, the second below 40 unless the first
    /// is 2; decimal arcs without leading zeros.
    fn from_str(dotted: &str) -> Result<PolicyOid, CaError> {
        let bad = || CaError::Config(format!("{dotted:?} is not a dotted object identifier"));
        let arcs = dotted
            .split('.')
            .map(|arc| {
                let canonical = !arc.is_empty()
                    && arc.bytes().all(|b| b.is_ascii_digit())
                    && (arc == "0" || !arc.starts_with('0'));
                if canonical {
                    arc.parse::<u128>().map_err(|_| bad())
                } else {
                    Err(bad())
                }
            })
            .collect::<Result<Vec<u128>, CaError>>()?;
        let (first, second) = match arcs.as_slice() {
            [first, second, ..] => (*first, *second),
            _ => return Err(bad()),
        };
        if first > 2 || (first < 2 && second >= 40) {
            return Err(bad());
        }
        let mut content = Vec::new();
        let head = (first * 40).checked_add(second).ok_or_else(bad)?;
        push_base128(&mut content, head);
        for arc in &arcs[2..] {
            push_base128(&mut content, *arc);
        }
        if content.len() > MAX_CONTENT {
            return Err(bad());
        }
        Ok(PolicyOid {
            dotted: dotted.to_owned(),
            content,
        })
    }
}

impl fmt::Display for PolicyOid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dotted)
    }
}

impl fmt::Debug for PolicyOid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyOid({})", self.dotted)
    }
}

/// One subidentifier: base 128, most significant group first, bit 8 set on all but the last.
fn push_base128(out: &mut Vec<u8>, mut value: u128) {
    let mut groups = vec![(value & 0x7f) as u8];
    value >>= 7;
    while value > 0 {
        groups.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.extend(groups.iter().rev());
}

/// `PolicyInformation ::= SEQUENCE { policyIdentifier CertPolicyId }` without qualifiers
/// (RFC 5280 section 4.2.1.4).
#[derive(Sequence)]
struct PolicyInformation {
    policy_identifier: Any,
}

/// The DER of `certificatePolicies` with one policy: the extension's value.
pub(crate) fn certificate_policies(policy: &PolicyOid) -> Result<Vec<u8>, CaError> {
    let policies = vec![PolicyInformation {
        policy_identifier: policy.to_any()?,
    }];
    Ok(policies.to_der()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use const_oid::ObjectIdentifier;

    #[test]
    fn small_arcs_encode_as_const_oid_does() {
        for dotted in [
            "1.2.840.10045.4.3.2",
            "2.5.29.32",
            "0.9.2342.19200300.100.1.1",
        ] {
            let ours = PolicyOid::from_str(dotted).unwrap();
            let theirs = ObjectIdentifier::new(dotted).unwrap();
            assert_eq!(ours.content, theirs.as_bytes(), "{dotted}");
            assert_eq!(ours.to_string(), dotted);
        }
    }

    #[test]
    fn uuid_arcs_are_held() {
        // X.667's example UUID f81d4fae-7dec-11d0-a765-00a0c91e6bf6 as an OID; the expected
        // content octets are what `openssl asn1parse -genstr OID:...` encodes.
        let oid = PolicyOid::from_str("2.25.329800735698586629295641978511506172918").unwrap();
        assert_eq!(
            hex::encode(&oid.content),
            "6983f09da7ebcfdee0c7a1a7b2c0948cc8f9d776"
        );
    }

    #[test]
    fn malformed_oids_are_refused() {
        for dotted in [
            "", "1", "3.1", "1.40", "1..2", "1.02", "1.2.x", "1.2.", "-1.2",
        ] {
            assert!(PolicyOid::from_str(dotted).is_err(), "{dotted}");
        }
        let too_big = "2.25.340282366920938463463374607431768211456"; // 2^128
        assert!(PolicyOid::from_str(too_big).is_err());
    }
}
