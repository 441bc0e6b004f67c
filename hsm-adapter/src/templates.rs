//! Attribute templates for every object the adapter creates.
//!
//! Every usage attribute is set explicitly: SoftHSM (and the PKCS#11 defaults) would otherwise
//! leave DECRYPT and UNWRAP true on private keys. Objects the adapter never needs to change are
//! also made unmodifiable and uncopyable.
//!
//! CKA_MODIFIABLE = false always comes last: SoftHSM applies an unwrap template in order and
//! refuses every attribute after it with CKR_ATTRIBUTE_READ_ONLY.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};

use crate::error::HsmError;
use crate::keys::{EcCurve, KeyAlgorithm, RESIDENT_KEY_LABEL, SystemKey, SystemKeyKind};
use crate::public_key::ec_params;

/// The mechanism that wraps user keys under the KEK: AES key wrap with padding (RFC 5649).
pub(crate) fn wrap_mechanism() -> Mechanism<'static> {
    Mechanism::AesKeyWrapPad
}

/// RSA public exponent F4.
const RSA_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];

pub(crate) fn wrap_mechanism_code() -> u64 {
    u64::from(wrap_mechanism().mechanism_type())
}

pub(crate) fn key_type(algorithm: KeyAlgorithm) -> KeyType {
    match algorithm.curve() {
        Some(_) => KeyType::EC,
        None => KeyType::RSA,
    }
}

pub(crate) fn key_type_code(algorithm: KeyAlgorithm) -> u64 {
    u64::from(key_type(algorithm))
}

/// Where a generated key pair goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PairTarget<'a> {
    /// Session objects, private half extractable only under a trusted wrapping key.
    WrappedSession,
    /// Token objects with this CKA_ID.
    ResidentToken { id: &'a [u8] },
    /// Token objects of a system signing key.
    System { label: &'static str },
}

/// Mechanism and (public, private) templates for a signing key pair.
pub(crate) fn key_pair(
    algorithm: KeyAlgorithm,
    target: PairTarget<'_>,
) -> Result<(Mechanism<'static>, Vec<Attribute>, Vec<Attribute>), HsmError> {
    let mut public = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(key_type(algorithm)),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::VerifyRecover(false),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ];
    let mut private = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(algorithm)),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Copyable(false),
    ];
    match target {
        PairTarget::WrappedSession => {
            public.push(Attribute::Token(false));
            private.extend([
                Attribute::Token(false),
                // Extractable so that it can be wrapped once, and only under a trusted key.
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
            ]);
        }
        PairTarget::ResidentToken { id } => {
            for half in [&mut public, &mut private] {
                half.extend([
                    Attribute::Token(true),
                    Attribute::Id(id.to_vec()),
                    Attribute::Label(RESIDENT_KEY_LABEL.as_bytes().to_vec()),
                ]);
            }
            private.push(Attribute::Extractable(false));
        }
        PairTarget::System { label } => {
            for half in [&mut public, &mut private] {
                half.extend([
                    Attribute::Token(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ]);
            }
            // Extractable only under a trusted key: what `keys clone-export` needs to copy it
            // to a second HSM, and what nobody without the SO quorum can use.
            private.extend([
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
            ]);
        }
    }
    let mechanism = match algorithm.curve() {
        Some(curve) => {
            public.push(Attribute::EcParams(ec_params(curve)?));
            Mechanism::EccKeyPairGen
        }
        None => {
            let bits: u64 = match algorithm.modulus_len() {
                Some(bytes) => 8 * bytes as u64,
                None => return Err(HsmError::UnexpectedResponse("RSA without modulus length")),
            };
            public.push(Attribute::ModulusBits(bits.into()));
            public.push(Attribute::PublicExponent(RSA_EXPONENT.to_vec()));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    public.push(Attribute::Modifiable(false));
    private.push(Attribute::Modifiable(false));
    Ok((mechanism, public, private))
}

/// The algorithm of a system signing key.
pub(crate) fn system_key_algorithm(curve: EcCurve) -> KeyAlgorithm {
    match curve {
        EcCurve::P256 => KeyAlgorithm::EcP256,
        EcCurve::P384 => KeyAlgorithm::EcP384,
    }
}

/// How the session copy of a wrapped key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyUse {
    /// To sign: the copy never leaves the HSM again.
    Sign,
    /// To re-wrap under another KEK (rotation): extractable, under a trusted key only.
    Rewrap,
}

/// Template of the session object a wrapped key is unwrapped into.
///
/// It holds every attribute of the KEK's [`kek_unwrap_template`] with the same value (SoftHSM
/// refuses an unwrap whose template leaves one out, with CKR_TEMPLATE_INCONSISTENT), and says
/// whether the copy is extractable, which the KEK leaves to the caller: a copy to sign with is
/// not; a copy to re-wrap is, still under a trusted key only.
pub(crate) fn unwrap_template(algorithm: KeyAlgorithm, copy: CopyUse) -> Vec<Attribute> {
    let mut template = kek_unwrap_template();
    let modifiable = template.pop();
    template.extend([
        Attribute::KeyType(key_type(algorithm)),
        Attribute::Extractable(copy == CopyUse::Rewrap),
    ]);
    template.extend(modifiable);
    template
}

/// The KEK's CKA_UNWRAP_TEMPLATE: whatever it unwraps becomes a private, sensitive, sign-only
/// session key, extractable (if at all) only under a trusted key, that nobody can copy or
/// change. An unwrap that asks for anything else (a secret or public key, CKA_SENSITIVE false,
/// a token object, a public object that needs no login) fails with CKR_TEMPLATE_INCONSISTENT.
pub(crate) fn kek_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
    ]
}

/// The KEK's CKA_WRAP_TEMPLATE: it wraps only what it can unwrap, private sign-only keys that
/// are sensitive, wrap-with-trusted session objects. It will not wrap a secret key (another
/// system key) or a token object. (Copyable and modifiable are left out: they say how an
/// unwrapped copy may be used, not which keys may leave.)
pub(crate) fn kek_wrap_template() -> Vec<Attribute> {
    kek_unwrap_template()
        .into_iter()
        .filter(|a| !matches!(a, Attribute::Copyable(_) | Attribute::Modifiable(_)))
        .collect()
}

/// Mechanism and template of a secret system key. The KEK's also needs its CKA_ID (a fresh
/// [`crate::KekId`]) and its two array attributes ([`kek_unwrap_template`], [`kek_wrap_template`]).
pub(crate) fn secret_key(key: SystemKey) -> Option<(Mechanism<'static>, Vec<Attribute>)> {
    let (mechanism, key_type, private, usage): (_, _, _, &[Attribute]) = match key.kind() {
        // Only the security officer can set CKA_TRUSTED, and only on a public object (PKCS#11
        // lets the SO touch public objects only). The value stays sensitive and unextractable.
        SystemKeyKind::KeyEncryption => (
            Mechanism::AesKeyGen,
            KeyType::AES,
            false,
            &[
                Attribute::Trusted(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
            ],
        ),
        SystemKeyKind::Hmac => (
            Mechanism::GenericSecretKeyGen,
            KeyType::GENERIC_SECRET,
            true,
            &[
                Attribute::Sign(true),
                Attribute::Verify(false),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
            ],
        ),
        SystemKeyKind::Aead => (
            Mechanism::AesKeyGen,
            KeyType::AES,
            true,
            &[
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
            ],
        ),
        SystemKeyKind::Signing(_) => return None,
    };
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(true),
        Attribute::Private(private),
        Attribute::Label(key.label().as_bytes().to_vec()),
        Attribute::Sensitive(true),
        // Extractable only under a trusted key, for `keys clone-export` (the KEK's own wrap
        // template does not let it wrap any of them).
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Derive(false),
        Attribute::Copyable(false),
    ];
    template.extend_from_slice(usage);
    template.push(Attribute::Modifiable(false));
    Some((mechanism, template))
}
