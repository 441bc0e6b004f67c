//! Checked identifiers: accounts, services, signing requests and certificate serials.
//!
//! Each is parsed once at the edge (STYLE.md: parse, don't validate) and is a plain string inside,
//! so that it goes to JSON, SQL and logs without a second check. None of them is personal data:
//! account ids are pseudonymous (DOMAIN.md, "Data protection").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// Declares a `String` newtype whose constructor checks its form.
macro_rules! checked_id {
    ($(#[$meta:meta])* $name:ident, $check:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks the form of `s`.
            pub fn parse(s: &str) -> Result<Self, ParseError> {
                $check(s)?;
                Ok($name(s.to_owned()))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ParseError;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                $check(&s)?;
                Ok($name(s))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_id!(
    /// An account id: 1 to 64 of `A-Z a-z 0-9 _ -` (API.md, "Accounts").
    AccountId,
    check_account_id
);

checked_id!(
    /// An online service's name, the CN of its client certificate: 1 to 64 of
    /// `A-Z a-z 0-9 _ . -`.
    ServiceName,
    check_service_name
);

checked_id!(
    /// A signing request id: 16 random bytes from the HSM as 32 lowercase hex digits.
    RequestId,
    check_request_id
);

checked_id!(
    /// A certificate serial number as lowercase hex without leading zeros (API.md).
    ///
    /// RFC 5280 section 4.1.2.2: a positive integer of at most 20 octets.
    CertSerial,
    check_serial
);

impl RequestId {
    /// Makes a request id from random bytes (the caller takes them from the HSM's generator).
    pub fn from_random(bytes: [u8; 16]) -> RequestId {
        RequestId(hex::encode(bytes))
    }
}

/// Longest serial: 20 octets (RFC 5280 section 4.1.2.2).
const MAX_SERIAL_OCTETS: usize = 20;

impl CertSerial {
    /// The serial of a certificate from the big-endian bytes of its serialNumber INTEGER.
    ///
    /// Leading zero octets (DER adds one when the top bit is set) are dropped; zero, and anything
    /// longer than 20 octets after that, is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<CertSerial, ParseError> {
        let first = bytes.iter().position(|&b| b != 0).ok_or(SERIAL_ERROR)?;
        let bytes = &bytes[first..];
        if bytes.len() > MAX_SERIAL_OCTETS {
            return Err(SERIAL_ERROR);
        }
        let hex = hex::encode(bytes);
        Ok(CertSerial(hex.trim_start_matches('0').to_owned()))
    }

    /// The serial as big-endian bytes without leading zeros (no DER sign octet).
    pub fn to_bytes(&self) -> Vec<u8> {
        let padded = if self.0.len() % 2 == 1 {
            format!("0{}", self.0)
        } else {
            self.0.clone()
        };
        // The form was checked at construction: lowercase hex digits only.
        hex::decode(padded).unwrap_or_default()
    }
}

fn check_chars(
    s: &str,
    allowed: impl Fn(u8) -> bool,
    kind: &'static str,
    expected: &'static str,
) -> Result<(), ParseError> {
    if (1..=64).contains(&s.len()) && s.bytes().all(allowed) {
        Ok(())
    } else {
        Err(ParseError::InvalidId { kind, expected })
    }
}

fn check_account_id(s: &str) -> Result<(), ParseError> {
    check_chars(
        s,
        |b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
        "account id",
        "1 to 64 of A-Z a-z 0-9 _ -",
    )
}

fn check_service_name(s: &str) -> Result<(), ParseError> {
    check_chars(
        s,
        |b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-',
        "service name",
        "1 to 64 of A-Z a-z 0-9 _ . -",
    )
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn check_request_id(s: &str) -> Result<(), ParseError> {
    if s.len() == 32 && s.bytes().all(is_lower_hex) {
        Ok(())
    } else {
        Err(ParseError::InvalidId {
            kind: "request id",
            expected: "32 lowercase hex digits",
        })
    }
}

const SERIAL_ERROR: ParseError = ParseError::InvalidId {
    kind: "certificate serial",
    expected: "1 to 40 lowercase hex digits without leading zeros, not zero",
};

fn check_serial(s: &str) -> Result<(), ParseError> {
    let ok = (1..=2 * MAX_SERIAL_OCTETS).contains(&s.len())
        && s.bytes().all(is_lower_hex)
        && !s.starts_with('0');
    if ok { Ok(()) } else { Err(SERIAL_ERROR) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_id_allows_its_alphabet_up_to_64() {
        assert!(AccountId::parse("u-000123").is_ok());
        assert!(AccountId::parse("A_z-9").is_ok());
        assert!(AccountId::parse(&"a".repeat(64)).is_ok());
        assert!(AccountId::parse(&"a".repeat(65)).is_err());
        assert!(AccountId::parse("").is_err());
        assert!(AccountId::parse("u.1").is_err());
        assert!(AccountId::parse("u 1").is_err());
        assert!(AccountId::parse("ü").is_err());
    }

    #[test]
    fn service_name_allows_dots() {
        assert!(ServiceName::parse("demo-a").is_ok());
        assert!(ServiceName::parse("tax.gov_hk-1").is_ok());
        assert!(ServiceName::parse("a/b").is_err());
        assert!(ServiceName::parse("").is_err());
        assert!(ServiceName::parse(&"s".repeat(65)).is_err());
    }

    #[test]
    fn request_id_is_32_lowercase_hex() {
        let id = RequestId::from_random([0xab; 16]);
        assert_eq!(id.as_str(), "abababababababababababababababab");
        assert_eq!(RequestId::parse(id.as_str()).unwrap(), id);
        assert!(RequestId::parse("ABABABABABABABABABABABABABABABAB").is_err());
        assert!(RequestId::parse("abab").is_err());
        assert!(RequestId::parse(&"g".repeat(32)).is_err());
    }

    #[test]
    fn serial_is_lowercase_hex_without_leading_zeros() {
        let s = CertSerial::from_bytes(&[0x00, 0x0f, 0x9a]).unwrap();
        assert_eq!(s.as_str(), "f9a");
        assert_eq!(s.to_bytes(), vec![0x0f, 0x9a]);
        assert_eq!(CertSerial::parse("f9a").unwrap(), s);
        assert_eq!(
            CertSerial::from_bytes(&[0x3f, 0x00]).unwrap().as_str(),
            "3f00"
        );
        assert!(CertSerial::parse("0f9a").is_err());
        assert!(CertSerial::parse("F9A").is_err());
        assert!(CertSerial::parse("0").is_err());
        assert!(CertSerial::parse("").is_err());
        assert!(CertSerial::from_bytes(&[0, 0]).is_err());
        assert!(CertSerial::from_bytes(&[1; 21]).is_err());
        let max = CertSerial::from_bytes(&[0xff; 20]).unwrap();
        assert_eq!(CertSerial::parse(max.as_str()).unwrap(), max);
        // A DER sign octet before a 20-octet value is not counted.
        let mut signed = vec![0u8];
        signed.extend([0x80; 20]);
        assert!(CertSerial::from_bytes(&signed).is_ok());
    }

    #[test]
    fn ids_go_through_serde_as_strings_and_are_checked() {
        let id: AccountId = serde_json::from_str("\"u-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"u-1\"");
        assert!(serde_json::from_str::<AccountId>("\"u 1\"").is_err());
        assert!(serde_json::from_str::<CertSerial>("\"00\"").is_err());
    }
}
