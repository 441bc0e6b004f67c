//! The key policy: which attributes each kind of key must have before the adapter uses it.
//!
//! The templates in `templates.rs` create keys that pass; the check here is what stops a key that
//! was created some other way (by hand, by an older version, by a module ignoring part of a
//! template) from being used. The verdict is read from the HSM, never assumed.
//!
//! - user key, resident: a private-key token object, PRIVATE, SENSITIVE, ALWAYS_SENSITIVE, not
//!   EXTRACTABLE, NEVER_EXTRACTABLE, SIGN, not DECRYPT / UNWRAP / DERIVE / SIGN_RECOVER, of the
//!   right key type and curve or modulus size;
//! - user key, wrapped (its session copy): a private-key session object, PRIVATE, SENSITIVE,
//!   WRAP_WITH_TRUSTED, SIGN, not DECRYPT / UNWRAP / DERIVE / SIGN_RECOVER, of the right key type;
//! - every system key: a SENSITIVE token object, and either not EXTRACTABLE or extractable only
//!   under a trusted key (WRAP_WITH_TRUSTED), which `keys clone-export` needs to copy it to a
//!   second HSM (a key copied so is no longer ALWAYS_SENSITIVE / NEVER_EXTRACTABLE, so those
//!   are not asked of system keys);
//! - audit and CA keys: PRIVATE, SIGN, and not DECRYPT / UNWRAP / DERIVE / SIGN_RECOVER, of the
//!   right curve;
//! - KEK: an AES-256 secret key, TRUSTED, WRAP, UNWRAP, and not ENCRYPT / DECRYPT / SIGN / VERIFY
//!   / DERIVE; and its CKA_UNWRAP_TEMPLATE and CKA_WRAP_TEMPLATE exactly those of `templates.rs`
//!   (without them, whoever may use the KEK may unwrap a blob as an extractable secret key and
//!   read the user's private key in plaintext);
//! - TAID and HKIC keys: 32-byte generic secrets, PRIVATE, SIGN, and no other usage;
//! - data key: an AES-256 secret key, PRIVATE, ENCRYPT, DECRYPT, and no other usage.
//!
//! The KEK may be a public (CKA_PRIVATE = false) object: PKCS#11 lets only the security officer
//! set CKA_TRUSTED, and the security officer can only create public objects. Its unwrap template
//! makes whatever it unwraps private, so a session without a login cannot use it.

use std::fmt;

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use pkcs11_arrays::{ArrayAttribute, Arrays};

use crate::error::HsmError;
use crate::keys::{HexBytes, KeyAlgorithm, SystemKey, SystemKeyKind};
use crate::public_key::ec_params;
use crate::templates::{kek_unwrap_template, kek_wrap_template, key_type, system_key_algorithm};

/// Which rule a key must follow.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Policy<'a> {
    /// A resident user key, named by its CKA_ID.
    Resident(KeyAlgorithm, &'a [u8]),
    /// A freshly generated wrapped user key, before it is wrapped (so extractable).
    Wrapped(KeyAlgorithm),
    /// The session copy of a wrapped user key unwrapped to sign: never extractable again.
    Unwrapped(KeyAlgorithm),
    /// A system key.
    System(SystemKey),
}

impl fmt::Display for Policy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Resident(alg, id) => write!(f, "resident {alg} user key (id {})", HexBytes(id)),
            Policy::Wrapped(alg) => write!(f, "wrapped {alg} user key"),
            Policy::Unwrapped(alg) => write!(f, "unwrapped copy of a wrapped {alg} user key"),
            Policy::System(key) => write!(f, "system key \"{}\"", key.label()),
        }
    }
}

/// A boolean attribute and the value it must have.
type Flag = (&'static str, AttributeType, bool);

const SIGNING_ONLY: &[Flag] = &[
    ("CKA_SIGN", AttributeType::Sign, true),
    ("CKA_DECRYPT", AttributeType::Decrypt, false),
    ("CKA_UNWRAP", AttributeType::Unwrap, false),
    ("CKA_DERIVE", AttributeType::Derive, false),
    ("CKA_SIGN_RECOVER", AttributeType::SignRecover, false),
];

const NEVER_LEFT_THE_HSM: &[Flag] = &[
    ("CKA_TOKEN", AttributeType::Token, true),
    ("CKA_SENSITIVE", AttributeType::Sensitive, true),
    ("CKA_EXTRACTABLE", AttributeType::Extractable, false),
    ("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive, true),
    (
        "CKA_NEVER_EXTRACTABLE",
        AttributeType::NeverExtractable,
        true,
    ),
];

const PRIVATE: &[Flag] = &[("CKA_PRIVATE", AttributeType::Private, true)];

/// System keys stay on the token and sensitive; whether they may leave under a trusted key is
/// checked apart (`check_system_extractable`).
const SYSTEM_CUSTODY: &[Flag] = &[
    ("CKA_TOKEN", AttributeType::Token, true),
    ("CKA_SENSITIVE", AttributeType::Sensitive, true),
];

/// The unwrap template asks for an unextractable copy; a module that ignored that must not sign.
const NOT_EXTRACTABLE: &[Flag] = &[
    ("CKA_PRIVATE", AttributeType::Private, true),
    ("CKA_EXTRACTABLE", AttributeType::Extractable, false),
];

const WRAPPED_COPY: &[Flag] = &[
    ("CKA_TOKEN", AttributeType::Token, false),
    ("CKA_SENSITIVE", AttributeType::Sensitive, true),
    (
        "CKA_WRAP_WITH_TRUSTED",
        AttributeType::WrapWithTrusted,
        true,
    ),
];

const KEK_USAGE: &[Flag] = &[
    ("CKA_TRUSTED", AttributeType::Trusted, true),
    ("CKA_WRAP", AttributeType::Wrap, true),
    ("CKA_UNWRAP", AttributeType::Unwrap, true),
    ("CKA_ENCRYPT", AttributeType::Encrypt, false),
    ("CKA_DECRYPT", AttributeType::Decrypt, false),
    ("CKA_SIGN", AttributeType::Sign, false),
    ("CKA_VERIFY", AttributeType::Verify, false),
    ("CKA_DERIVE", AttributeType::Derive, false),
];

const HMAC_USAGE: &[Flag] = &[
    ("CKA_SIGN", AttributeType::Sign, true),
    ("CKA_VERIFY", AttributeType::Verify, false),
    ("CKA_ENCRYPT", AttributeType::Encrypt, false),
    ("CKA_DECRYPT", AttributeType::Decrypt, false),
    ("CKA_WRAP", AttributeType::Wrap, false),
    ("CKA_UNWRAP", AttributeType::Unwrap, false),
    ("CKA_DERIVE", AttributeType::Derive, false),
];

const AEAD_USAGE: &[Flag] = &[
    ("CKA_ENCRYPT", AttributeType::Encrypt, true),
    ("CKA_DECRYPT", AttributeType::Decrypt, true),
    ("CKA_SIGN", AttributeType::Sign, false),
    ("CKA_VERIFY", AttributeType::Verify, false),
    ("CKA_WRAP", AttributeType::Wrap, false),
    ("CKA_UNWRAP", AttributeType::Unwrap, false),
    ("CKA_DERIVE", AttributeType::Derive, false),
];

/// What the class, type and size of the key must be.
enum Shape {
    /// A private key of this algorithm, curve or modulus size included.
    PrivateKey(KeyAlgorithm),
    /// A private key of this algorithm's key type. Used for the session copy of a wrapped key,
    /// which is checked on every signature: its curve or size is that of the blob, which only
    /// the KEK can have made, and a mismatch would show in the signature's length anyway. Reading
    /// the variable-length CKA_EC_PARAMS or CKA_MODULUS would double the cost of the check.
    PrivateKeyType(KeyAlgorithm),
    SecretKey(KeyType),
}

impl Policy<'_> {
    /// A small number naming the rule, never 0 (the directory's "unchecked").
    pub(crate) fn tag(&self) -> u8 {
        match self {
            Policy::Resident(alg, _) => alg.code(),
            Policy::Wrapped(alg) => 0x10 | alg.code(),
            Policy::Unwrapped(alg) => 0x20 | alg.code(),
            Policy::System(_) => 0xff,
        }
    }

    fn shape(&self) -> Shape {
        match self {
            Policy::Resident(alg, _) => Shape::PrivateKey(*alg),
            Policy::Wrapped(alg) | Policy::Unwrapped(alg) => Shape::PrivateKeyType(*alg),
            Policy::System(key) => match key.kind() {
                SystemKeyKind::Signing(curve) => Shape::PrivateKey(system_key_algorithm(curve)),
                SystemKeyKind::KeyEncryption | SystemKeyKind::Aead => {
                    Shape::SecretKey(KeyType::AES)
                }
                SystemKeyKind::Hmac => Shape::SecretKey(KeyType::GENERIC_SECRET),
            },
        }
    }

    /// The boolean rules, in the order they are reported (the most telling first).
    fn flag_groups(&self) -> [&'static [Flag]; 3] {
        match self {
            Policy::Resident(..) => [NEVER_LEFT_THE_HSM, PRIVATE, SIGNING_ONLY],
            Policy::Wrapped(_) => [WRAPPED_COPY, PRIVATE, SIGNING_ONLY],
            Policy::Unwrapped(_) => [WRAPPED_COPY, NOT_EXTRACTABLE, SIGNING_ONLY],
            Policy::System(key) => match key.kind() {
                SystemKeyKind::Signing(_) => [SYSTEM_CUSTODY, PRIVATE, SIGNING_ONLY],
                SystemKeyKind::KeyEncryption => [SYSTEM_CUSTODY, KEK_USAGE, &[]],
                SystemKeyKind::Hmac => [SYSTEM_CUSTODY, PRIVATE, HMAC_USAGE],
                SystemKeyKind::Aead => [SYSTEM_CUSTODY, PRIVATE, AEAD_USAGE],
            },
        }
    }

    /// Reads the key's attributes and checks them; the error names the first attribute that
    /// breaks the policy. `arrays` reads the KEK's templates.
    pub(crate) fn check(
        &self,
        session: &Session,
        arrays: &Arrays,
        key: ObjectHandle,
    ) -> Result<(), HsmError> {
        self.check_attributes(session, key)?;
        if let Policy::System(system) = self {
            self.check_system_extractable(session, key)?;
            if system.kind() == SystemKeyKind::KeyEncryption {
                check_kek_templates(session, arrays, key)?;
            }
        }
        Ok(())
    }

    /// A system key may be extractable only under a trusted key.
    fn check_system_extractable(
        &self,
        session: &Session,
        key: ObjectHandle,
    ) -> Result<(), HsmError> {
        let read = session.get_attributes(
            key,
            &[AttributeType::Extractable, AttributeType::WrapWithTrusted],
        )?;
        let flag = |t: AttributeType| {
            read.iter()
                .find(|a| a.attribute_type() == t)
                .and_then(bool_value)
        };
        match (
            flag(AttributeType::Extractable),
            flag(AttributeType::WrapWithTrusted),
        ) {
            (Some(false), _) | (Some(true), Some(true)) => Ok(()),
            (None, _) => Err(HsmError::KeyPolicy {
                key: self.to_string(),
                attribute: "CKA_EXTRACTABLE",
                requirement: "is missing",
            }),
            (Some(true), _) => Err(HsmError::KeyPolicy {
                key: self.to_string(),
                attribute: "CKA_WRAP_WITH_TRUSTED",
                requirement: "must be CK_TRUE for an extractable system key",
            }),
        }
    }

    fn check_attributes(&self, session: &Session, key: ObjectHandle) -> Result<(), HsmError> {
        let shape = self.shape();
        let groups = self.flag_groups();
        let mut types = vec![AttributeType::Class, AttributeType::KeyType];
        types.extend(groups.iter().flat_map(|g| g.iter().map(|f| f.1)));
        match shape {
            Shape::PrivateKey(alg) if alg.is_ec() => types.push(AttributeType::EcParams),
            Shape::PrivateKey(_) => types.push(AttributeType::Modulus),
            Shape::PrivateKeyType(_) => {}
            Shape::SecretKey(_) => types.extend([AttributeType::ValueLen, AttributeType::Local]),
        }
        let attributes = session.get_attributes(key, &types)?;
        let find = |t: AttributeType| attributes.iter().find(|a| a.attribute_type() == t);
        let violation = |attribute, requirement| HsmError::KeyPolicy {
            key: self.to_string(),
            attribute,
            requirement,
        };

        let (class, kt) = match &shape {
            Shape::PrivateKey(alg) | Shape::PrivateKeyType(alg) => {
                (ObjectClass::PRIVATE_KEY, key_type(*alg))
            }
            Shape::SecretKey(kt) => (ObjectClass::SECRET_KEY, *kt),
        };
        match find(AttributeType::Class) {
            Some(Attribute::Class(c)) if *c == class => {}
            _ => return Err(violation("CKA_CLASS", "is not the expected object class")),
        }
        match find(AttributeType::KeyType) {
            Some(Attribute::KeyType(t)) if *t == kt => {}
            _ => return Err(violation("CKA_KEY_TYPE", "is not the expected key type")),
        }
        for (name, attribute_type, expected) in groups.iter().flat_map(|g| g.iter()) {
            match find(*attribute_type).and_then(bool_value) {
                Some(actual) if actual == *expected => {}
                Some(_) if *expected => return Err(violation(name, "must be CK_TRUE")),
                Some(_) => return Err(violation(name, "must be CK_FALSE")),
                None => return Err(violation(name, "is missing")),
            }
        }
        match shape {
            Shape::PrivateKey(alg) => match alg.curve() {
                Some(curve) => match find(AttributeType::EcParams) {
                    Some(Attribute::EcParams(p)) if *p == ec_params(curve)? => Ok(()),
                    _ => Err(violation("CKA_EC_PARAMS", "is not the expected curve")),
                },
                None => match find(AttributeType::Modulus) {
                    Some(Attribute::Modulus(m))
                        if Some(significant_len(m)) == alg.modulus_len() =>
                    {
                        Ok(())
                    }
                    _ => Err(violation("CKA_MODULUS", "is not of the expected size")),
                },
            },
            Shape::PrivateKeyType(_) => Ok(()),
            Shape::SecretKey(_) => match (
                find(AttributeType::ValueLen),
                find(AttributeType::Local).and_then(bool_value),
            ) {
                (Some(Attribute::ValueLen(len)), _) if u64::from(*len) == 32 => Ok(()),
                // SoftHSM 2.6 records no length for a key it unwrapped (`keys clone-import`,
                // which checks the wrapped length, 40 bytes for 32, before it unwraps).
                (Some(Attribute::ValueLen(len)), Some(false)) if u64::from(*len) == 0 => Ok(()),
                _ => Err(violation("CKA_VALUE_LEN", "must be 32 bytes")),
            },
        }
    }
}

/// The KEK's two templates must be exactly those the adapter makes: an attribute missing would
/// let an unwrap choose it, and one added is not something this version knows to be harmless.
fn check_kek_templates(
    session: &Session,
    arrays: &Arrays,
    kek: ObjectHandle,
) -> Result<(), HsmError> {
    for (which, expected) in [
        (ArrayAttribute::UnwrapTemplate, kek_unwrap_template()),
        (ArrayAttribute::WrapTemplate, kek_wrap_template()),
    ] {
        let actual = match arrays.read(session, kek, which) {
            Ok(actual) => actual,
            // A module that does not know the attribute has no template to enforce.
            Err(CryptokiError::Pkcs11(RvError::AttributeTypeInvalid, _)) => Vec::new(),
            Err(error) => return Err(error.into()),
        };
        let defect = |problem: String| HsmError::KekTemplate {
            template: which,
            problem,
        };
        if actual.is_empty() {
            return Err(defect("is missing".into()));
        }
        if let Some(absent) = expected.iter().find(|a| !actual.contains(a)) {
            return Err(defect(format!("does not force {}", describe(absent))));
        }
        if let Some(extra) = actual.iter().find(|a| !expected.contains(a)) {
            return Err(defect(format!("also sets {}", describe(extra))));
        }
    }
    Ok(())
}

/// `CKA_SIGN = CK_TRUE`, `CKA_CLASS = PRIVATE_KEY`, for messages.
fn describe(attribute: &Attribute) -> String {
    let name = attribute.attribute_type().to_string();
    match (attribute, bool_value(attribute)) {
        (_, Some(true)) => format!("{name} = CK_TRUE"),
        (_, Some(false)) => format!("{name} = CK_FALSE"),
        (Attribute::Class(class), None) => format!("{name} = {class}"),
        (Attribute::KeyType(key_type), None) => format!("{name} = {key_type}"),
        _ => name,
    }
}

pub(crate) fn bool_value(attribute: &Attribute) -> Option<bool> {
    match attribute {
        Attribute::Token(b)
        | Attribute::Private(b)
        | Attribute::Sensitive(b)
        | Attribute::Extractable(b)
        | Attribute::AlwaysSensitive(b)
        | Attribute::NeverExtractable(b)
        | Attribute::WrapWithTrusted(b)
        | Attribute::Trusted(b)
        | Attribute::Sign(b)
        | Attribute::SignRecover(b)
        | Attribute::Verify(b)
        | Attribute::Encrypt(b)
        | Attribute::Decrypt(b)
        | Attribute::Wrap(b)
        | Attribute::Unwrap(b)
        | Attribute::Derive(b)
        | Attribute::Copyable(b)
        | Attribute::Local(b)
        | Attribute::Modifiable(b) => Some(*b),
        _ => None,
    }
}

/// Length of a big-endian unsigned integer without leading zero bytes.
fn significant_len(bytes: &[u8]) -> usize {
    bytes.len() - bytes.iter().take_while(|b| **b == 0).count()
}
