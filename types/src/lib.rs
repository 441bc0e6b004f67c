//! The vocabulary every crate of smartsign shares, so that no crate boundary translates one
//! enum into another: the hash algorithms a service may ask to sign and the certificate
//! profiles. Each has one wire name (API.md), also the form kept in the store, and parses only
//! from it.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{ID_SHA_256, ID_SHA_384, ID_SHA_512};
use sha2::{Digest as _, Sha256, Sha384, Sha512};

/// A name that is not one of the wire names of `kind`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a {kind}")]
pub struct UnknownName {
    /// What was being parsed ("hash algorithm", "certificate profile").
    pub kind: &'static str,
}

/// Declares a fieldless enum with wire names: `as_str`, `ALL`, `FromStr`, `Display`, serde.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($kind:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )+
        }
    ) => {
        $(#[$meta])*
        // Exhaustive on purpose: a new variant is a change every match in the workspace must
        // see.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire name (API.md), also the form kept in the store.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownName { kind: $kind }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(
                    deserializer,
                )?;
                s.parse().map_err(|_| serde::de::Error::unknown_variant(&s, &[$($wire),+]))
            }
        }
    };
}

vocabulary! {
    /// The hash function of a hash to sign: what a service names, what the HSM signs a digest
    /// of, and what the CMS names.
    pub enum HashAlgorithm ("hash algorithm") {
        /// SHA-256, 32 bytes.
        Sha256 => "sha256",
        /// SHA-384, 48 bytes.
        Sha384 => "sha384",
        /// SHA-512, 64 bytes.
        Sha512 => "sha512",
    }
}

impl HashAlgorithm {
    /// Length of its digest in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 32,
            HashAlgorithm::Sha384 => 48,
            HashAlgorithm::Sha512 => 64,
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlgorithm::Sha256 => Sha256::digest(data).to_vec(),
            HashAlgorithm::Sha384 => Sha384::digest(data).to_vec(),
            HashAlgorithm::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// Its object identifier (RFC 5754 / RFC 5912).
    pub fn oid(self) -> ObjectIdentifier {
        match self {
            HashAlgorithm::Sha256 => ID_SHA_256,
            HashAlgorithm::Sha384 => ID_SHA_384,
            HashAlgorithm::Sha512 => ID_SHA_512,
        }
    }
}

vocabulary! {
    /// The profile of an iAM Smart-Cert, chosen by the holder's age at issuance and marked in
    /// the certificate by its policy OID.
    pub enum Profile ("certificate profile") {
        /// A holder aged 18 or over.
        Adult => "adult",
        /// A holder aged 11 to 17; the certificate ends at 18.
        Minor => "minor",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_and_nothing_else_parses() {
        for hash in HashAlgorithm::ALL {
            assert_eq!(hash.as_str().parse::<HashAlgorithm>(), Ok(*hash));
            assert_eq!(hash.digest(b"abc").len(), hash.output_len());
        }
        for profile in Profile::ALL {
            assert_eq!(profile.as_str().parse::<Profile>(), Ok(*profile));
        }
        assert!("SHA256".parse::<HashAlgorithm>().is_err());
        assert!("sha1".parse::<HashAlgorithm>().is_err());
        assert!("child".parse::<Profile>().is_err());
        assert_eq!(
            serde_json::to_string(&HashAlgorithm::Sha384).unwrap(),
            "\"sha384\""
        );
        assert!(serde_json::from_str::<Profile>("\"Adult\"").is_err());
    }
}
