//! Cloning the system keys to a second HSM without plaintext (`smartsign-ctl keys
//! clone-request`, `clone-export`, `clone-import`).
//!
//! 1. On the target token the SO makes a transport RSA-3072 key pair; its public key and its
//!    SHA-256 fingerprint go to the officers.
//! 2. On the source token the SO quorum, having compared the fingerprint, imports that public key
//!    as a trusted session object and makes a one-time AES-256 transfer key (trusted, extractable
//!    only under a trusted key), wrapped under the transport key with RSA-OAEP. As the user, each
//!    system key is wrapped under the transfer key (AES key wrap with padding). Both session
//!    objects die with the session. The bundle holds only these wrapped blobs and public data.
//!    The source's audit key signs the bundle.
//! 3. On the target, the transport private key unwraps the transfer key (its unwrap template
//!    makes it a sensitive, unextractable, unwrap-only session key), which unwraps each system key
//!    with the same template and attributes as the original, the KEK as the SO (it is trusted,
//!    with its unwrap and wrap templates). The imported audit key must be the source's one that
//!    the officers name, its signature on the bundle must verify, and each imported key pair must
//!    sign what its public half verifies. Then, or on any failure, the transport key pair is
//!    destroyed; a failed import leaves no key behind.
//!
//! PKCS#11 lets the SO use public objects only, and the KEK must be made by the SO, so the
//! transport private key and the transfer key are public objects: between `clone-request` and
//! `clone-import`, whoever can open a session on the target token and holds the bundle could
//! unwrap with them. The officers keep the target token in hand for that time; `clone-import`
//! destroys the transport key, after which the bundle opens nowhere. SoftHSM 2.6 offers RSA-OAEP
//! with SHA-1 only; a production HSM should use SHA-256 (or its vendor's cloning).

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use pkcs11_arrays::ArrayAttribute;
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};

use crate::directory::{system_key_template, system_public_key_template};
use crate::error::HsmError;
use crate::keys::{EcCurve, HexBytes, KekId, SystemKey, SystemKeyKind};
use crate::module;
use crate::policy::Policy;
use crate::provision::{as_security_officer, reload_after};
use crate::public_key::{ec_spki, rsa_parts, rsa_spki};
use crate::session_pool::Shared;
use crate::templates::{
    PairTarget, kek_unwrap_template, kek_wrap_template, key_pair, secret_key, system_key_algorithm,
    wrap_mechanism,
};

/// Label of the transport key pair on the target token.
pub const TRANSPORT_LABEL: &str = "smartsign-transport";
/// Bits of the transport key's modulus.
const TRANSPORT_BITS: u64 = 3072;

/// The target's transport public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportKey {
    /// Its SubjectPublicKeyInfo (DER).
    pub spki_der: Vec<u8>,
}

impl TransportKey {
    /// SHA-256 of the SubjectPublicKeyInfo, hex: what the officers compare.
    pub fn fingerprint(&self) -> String {
        HexBytes(&Sha256::digest(&self.spki_der)).to_string()
    }
}

/// One system key, wrapped under the transfer key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClonedKey {
    /// Which key.
    pub key: SystemKey,
    /// Its CKA_ID on the source (the KEK's id; empty for the others).
    pub id: Vec<u8>,
    /// The key wrapped with AES key wrap with padding under the transfer key.
    pub wrapped: Vec<u8>,
    /// For a key pair, the public point (CKA_EC_POINT), public data.
    pub ec_point: Option<Vec<u8>>,
}

/// What `clone-export` hands to `clone-import`: nothing in it opens without the target token,
/// and the source's audit key signs it, so that nobody can swap in keys of their own on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneBundle {
    /// The fingerprint of the transport key it was made for.
    pub transport_fingerprint: String,
    /// The transfer key, wrapped with RSA-OAEP under the transport key.
    pub wrapped_transfer_key: Vec<u8>,
    /// Every system key.
    pub keys: Vec<ClonedKey>,
    /// ECDSA P-256 by the source's audit key over SHA-256 of [`CloneBundle::signed_bytes`],
    /// raw `r || s`.
    pub signature: Vec<u8>,
}

impl CloneBundle {
    /// What the signature covers: every field but the signature, each key's blobs by digest.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let hex = |bytes: &[u8]| HexBytes(bytes).to_string();
        let mut out = format!(
            "smartsign-clone-v1\n{}\n{}\n",
            self.transport_fingerprint,
            hex(&Sha256::digest(&self.wrapped_transfer_key))
        );
        for key in &self.keys {
            out.push_str(&format!(
                "{} {} {} {}\n",
                key.key.label(),
                hex(&key.id),
                hex(&Sha256::digest(&key.wrapped)),
                key.ec_point.as_deref().map_or_else(|| "-".to_owned(), hex)
            ));
        }
        out.into_bytes()
    }

    /// SHA-256 (hex) of the source's audit public key (SubjectPublicKeyInfo), which the
    /// officers read off the source (or its ceremony transcript) and give to `clone-import`.
    pub fn source_audit_sha256(&self) -> Result<String, HsmError> {
        let point = self
            .keys
            .iter()
            .find(|k| k.key == SystemKey::Audit)
            .and_then(|k| k.ec_point.as_deref())
            .ok_or(HsmError::SystemKeyMissing(SystemKey::Audit))?;
        audit_key_sha256(point)
    }
}

/// SHA-256 (hex) of the SubjectPublicKeyInfo of an EC P-256 public point: how the officers name
/// the source's audit key (the ceremony transcript lists it as its `public_key_sha256`).
fn audit_key_sha256(point: &[u8]) -> Result<String, HsmError> {
    let spki = ec_spki(EcCurve::P256, point)?;
    Ok(HexBytes(&Sha256::digest(spki.as_der())).to_string())
}

/// RSA-OAEP as SoftHSM 2.6 offers it: SHA-1 and MGF1 with SHA-1, no label.
fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

/// What the transfer key becomes when the transport key unwraps it.
fn transfer_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
        Attribute::Wrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

fn find_transport(session: &Session) -> Result<Option<(ObjectHandle, ObjectHandle)>, HsmError> {
    let find = |class| {
        session.find_objects(&[
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::Label(TRANSPORT_LABEL.as_bytes().to_vec()),
        ])
    };
    match (
        &find(ObjectClass::PUBLIC_KEY)?[..],
        &find(ObjectClass::PRIVATE_KEY)?[..],
    ) {
        ([], []) => Ok(None),
        ([public], [private]) => Ok(Some((*public, *private))),
        _ => Err(HsmError::DuplicateKey {
            label: TRANSPORT_LABEL,
        }),
    }
}

fn transport_key(session: &Session, public: ObjectHandle) -> Result<TransportKey, HsmError> {
    let read = session.get_attributes(
        public,
        &[AttributeType::Modulus, AttributeType::PublicExponent],
    )?;
    match read.as_slice() {
        [Attribute::Modulus(n), Attribute::PublicExponent(e)] => Ok(TransportKey {
            spki_der: rsa_spki(n, e)?.as_der().to_vec(),
        }),
        _ => Err(HsmError::UnexpectedResponse("transport key attributes")),
    }
}

/// On the target: the transport key pair, made by the SO unless it exists.
pub(crate) fn request(shared: &Shared, so_pin: &SecretString) -> Result<TransportKey, HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    if let Some((public, _)) = find_transport(&session)? {
        return transport_key(&session, public);
    }
    let _exclusive = shared.exclusive();
    let label = Attribute::Label(TRANSPORT_LABEL.as_bytes().to_vec());
    let public_template = [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(true),
        Attribute::Private(false),
        label.clone(),
        Attribute::ModulusBits(TRANSPORT_BITS.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Verify(false),
        Attribute::VerifyRecover(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
    ];
    let private_template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(true),
        Attribute::Private(false),
        label,
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::SignRecover(false),
        Attribute::Derive(false),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
    ];
    // What the transport key unwraps can only become the transfer key: sensitive, never
    // extractable, a session object that unwraps and does nothing else.
    let unwrap = transfer_key_template();
    let made = as_security_officer(shared, &session, so_pin, |session| {
        let _token_write = module::token_write_lock();
        let (public, _) = shared.arrays.generate_key_pair(
            session,
            &Mechanism::RsaPkcsKeyPairGen,
            (&public_template, &[]),
            (
                &private_template,
                &[(ArrayAttribute::UnwrapTemplate, &unwrap)],
            ),
        )?;
        Ok(public)
    });
    let public = reload_after(shared, &session, made)?;
    transport_key(&session, public)
}

/// On the source: every system key wrapped for the transport key `transport`, whose fingerprint
/// the officers confirmed as `fingerprint`.
pub(crate) fn export(
    shared: &Shared,
    so_pin: &SecretString,
    transport: &TransportKey,
    fingerprint: &str,
) -> Result<CloneBundle, HsmError> {
    if !transport
        .fingerprint()
        .eq_ignore_ascii_case(fingerprint.trim())
    {
        return Err(HsmError::InvalidInput(format!(
            "the transport key's fingerprint is {}, not the {} the officers confirmed",
            transport.fingerprint(),
            fingerprint.trim()
        )));
    }
    let (modulus, exponent) = rsa_parts(&transport.spki_der)?;
    if modulus.iter().skip_while(|b| **b == 0).count() * 8 != TRANSPORT_BITS as usize {
        return Err(HsmError::InvalidInput(format!(
            "the transport key is not RSA-{TRANSPORT_BITS}, which `clone-request` makes"
        )));
    }
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let _exclusive = shared.exclusive();
    let result = (|| {
        // As the SO: the transport key, trusted for this session only, and the transfer key.
        let (transport_handle, transfer, wrapped_transfer_key) =
            as_security_officer(shared, &session, so_pin, |session| {
                let trusted = shared.arrays.create_object(
                    session,
                    &[
                        Attribute::Class(ObjectClass::PUBLIC_KEY),
                        Attribute::KeyType(KeyType::RSA),
                        Attribute::Token(false),
                        Attribute::Private(false),
                        Attribute::Modulus(modulus.clone()),
                        Attribute::PublicExponent(exponent.clone()),
                        Attribute::Trusted(true),
                        Attribute::Wrap(true),
                        Attribute::Encrypt(false),
                        Attribute::Verify(false),
                    ],
                    // It wraps the transfer key and nothing else.
                    &[(
                        ArrayAttribute::WrapTemplate,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::AES),
                            Attribute::Token(false),
                            Attribute::Private(false),
                        ],
                    )],
                )?;
                let transfer = session.generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32u64.into()),
                        Attribute::Token(false),
                        Attribute::Private(false),
                        Attribute::Trusted(true),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(false),
                        Attribute::Encrypt(false),
                        Attribute::Decrypt(false),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(true),
                        Attribute::WrapWithTrusted(true),
                    ],
                )?;
                let wrapped = session.wrap_key(&oaep(), trusted, transfer)?;
                Ok((trusted, transfer, wrapped))
            })?;
        // As the user (private keys are the user's): each system key under the transfer key.
        let wrapped = wrap_system_keys(&session, transfer);
        for handle in [transfer, transport_handle] {
            if let Err(error) = session.destroy_object(handle) {
                tracing::warn!(error = %HsmError::from(error), "could not destroy a transfer object");
            }
        }
        let mut bundle = CloneBundle {
            transport_fingerprint: transport.fingerprint(),
            wrapped_transfer_key,
            keys: wrapped?,
            signature: Vec::new(),
        };
        let audit = match session.find_objects(&system_key_template(SystemKey::Audit))?[..] {
            [audit] => audit,
            _ => return Err(HsmError::SystemKeyMissing(SystemKey::Audit)),
        };
        bundle.signature = session.sign(
            &Mechanism::Ecdsa,
            audit,
            &Sha256::digest(bundle.signed_bytes()),
        )?;
        Ok(bundle)
    })();
    reload_after(shared, &session, result)
}

fn wrap_system_keys(session: &Session, transfer: ObjectHandle) -> Result<Vec<ClonedKey>, HsmError> {
    let mut keys = Vec::new();
    for key in SystemKey::ALL {
        let handle = match session.find_objects(&system_key_template(key))?[..] {
            [] => continue,
            [handle] => handle,
            _ if key == SystemKey::Kek => return Err(HsmError::KekRotationUnfinished),
            _ => return Err(HsmError::DuplicateKey { label: key.label() }),
        };
        let wrapped = session
            .wrap_key(&wrap_mechanism(), transfer, handle)
            .map_err(|error| match HsmError::from(error) {
                HsmError::Pkcs11 {
                    rv: cryptoki::error::RvError::KeyUnextractable,
                    ..
                } => HsmError::InvalidInput(format!(
                    "system key {key} was made unextractable (before cloning existed) and cannot \
                     be cloned; a new token needs a new ceremony"
                )),
                other => other,
            })?;
        let id = match session
            .get_attributes(handle, &[AttributeType::Id])?
            .first()
        {
            Some(Attribute::Id(id)) => id.clone(),
            _ => Vec::new(),
        };
        let ec_point = match key.kind() {
            SystemKeyKind::Signing(_) => {
                let public = match session.find_objects(&system_public_key_template(key))?[..] {
                    [public] => public,
                    _ => return Err(HsmError::SystemKeyMissing(key)),
                };
                match session
                    .get_attributes(public, &[AttributeType::EcPoint])?
                    .first()
                {
                    Some(Attribute::EcPoint(point)) => Some(point.clone()),
                    _ => {
                        return Err(HsmError::UnexpectedResponse(
                            "public key without CKA_EC_POINT",
                        ));
                    }
                }
            }
            _ => None,
        };
        keys.push(ClonedKey {
            key,
            id,
            wrapped,
            ec_point,
        });
    }
    Ok(keys)
}

/// On the target: unwraps every key of `bundle` with its own template, then destroys the
/// transport key pair. The target must hold no system key yet.
pub(crate) fn import(
    shared: &Shared,
    so_pin: &SecretString,
    bundle: &CloneBundle,
    source_audit_sha256: &str,
) -> Result<(), HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let (transport_public, transport_private) = find_transport(&session)?.ok_or_else(|| {
        HsmError::InvalidInput(
            "no transport key on this token: run `keys clone-request` here".into(),
        )
    })?;
    let transport = transport_key(&session, transport_public)?;
    if transport.fingerprint() != bundle.transport_fingerprint {
        return Err(HsmError::InvalidInput(format!(
            "the bundle was made for transport key {}, and this token's is {}",
            bundle.transport_fingerprint,
            transport.fingerprint()
        )));
    }
    for cloned in &bundle.keys {
        // AES key wrap with padding of a 32-byte secret is 40 bytes (RFC 5649): the length the
        // key policy cannot read back from a module that records none for unwrapped keys.
        if !matches!(cloned.key.kind(), SystemKeyKind::Signing(_)) && cloned.wrapped.len() != 40 {
            return Err(HsmError::InvalidInput(format!(
                "the bundle's {} is not a wrapped 32-byte key",
                cloned.key
            )));
        }
    }
    for key in SystemKey::ALL {
        if !session.find_objects(&system_key_template(key))?.is_empty() {
            return Err(HsmError::InvalidInput(format!(
                "system key {key} is already on this token: import into a token without system keys"
            )));
        }
    }
    let _exclusive = shared.exclusive();
    let result = (|| -> Result<(), HsmError> {
        let kek = bundle.keys.iter().find(|k| k.key == SystemKey::Kek);
        let transfer = as_security_officer(shared, &session, so_pin, |session| {
            let transfer = session.unwrap_key(
                &oaep(),
                transport_private,
                &bundle.wrapped_transfer_key,
                &transfer_key_template(),
            )?;
            if let Some(kek) = kek {
                unwrap_kek(shared, session, transfer, kek)?;
            }
            Ok(transfer)
        })?;
        let unwrapped = bundle
            .keys
            .iter()
            .filter(|k| k.key != SystemKey::Kek)
            .try_for_each(|k| unwrap_system_key(&session, transfer, k));
        if let Err(error) = session.destroy_object(transfer) {
            tracing::warn!(error = %HsmError::from(error), "could not destroy the transfer key");
        }
        unwrapped?;
        check_imported(&session, bundle, source_audit_sha256)
    })();
    // Whatever happened, the transport pair goes, so that the bundle opens nowhere from now on;
    // and a failed import leaves no key of it behind (the token held none before).
    {
        let _token_write = module::token_write_lock();
        for handle in [transport_private, transport_public] {
            if let Err(error) = session.destroy_object(handle) {
                tracing::error!(error = %HsmError::from(error), "could not destroy the transport key");
            }
        }
        if result.is_err() {
            remove_system_keys(&session);
        }
    }
    reload_after(shared, &session, result)?;
    for key in bundle.keys.iter().map(|k| k.key) {
        let handle = shared.directory().system(key)?.handle;
        Policy::System(key).check(&session, &shared.arrays, handle)?;
    }
    Ok(())
}

/// The imported keys are the source's: its audit key is the one the officers named, it signed
/// the bundle, and each imported private key signs what its public half verifies.
fn check_imported(
    session: &Session,
    bundle: &CloneBundle,
    source_audit_sha256: &str,
) -> Result<(), HsmError> {
    let named = bundle.source_audit_sha256()?;
    if !named.eq_ignore_ascii_case(source_audit_sha256.trim()) {
        return Err(HsmError::InvalidInput(format!(
            "the bundle's audit key is {named}, not the source's {} the officers confirmed",
            source_audit_sha256.trim()
        )));
    }
    let public_of = |key: SystemKey| -> Result<ObjectHandle, HsmError> {
        match session.find_objects(&system_public_key_template(key))?[..] {
            [public] => Ok(public),
            _ => Err(HsmError::SystemKeyMissing(key)),
        }
    };
    let audit = public_of(SystemKey::Audit)?;
    session
        .verify(
            &Mechanism::Ecdsa,
            audit,
            &Sha256::digest(bundle.signed_bytes()),
            &bundle.signature,
        )
        .map_err(|_| {
            HsmError::InvalidInput(
                "the bundle's signature does not verify under its audit key".into(),
            )
        })?;
    let probe = Sha256::digest(b"smartsign clone: the pair belongs together");
    for cloned in bundle.keys.iter().filter(|k| k.ec_point.is_some()) {
        let private = match session.find_objects(&system_key_template(cloned.key))?[..] {
            [private] => private,
            _ => return Err(HsmError::SystemKeyMissing(cloned.key)),
        };
        let signature = session.sign(&Mechanism::Ecdsa, private, &probe)?;
        session
            .verify(
                &Mechanism::Ecdsa,
                public_of(cloned.key)?,
                &probe,
                &signature,
            )
            .map_err(|_| {
                HsmError::InvalidInput(format!(
                    "the bundle's public key of {} is not its private key's",
                    cloned.key
                ))
            })?;
    }
    Ok(())
}

/// Destroys every system key on the token (after a failed import into a token that had none).
fn remove_system_keys(session: &Session) {
    for key in SystemKey::ALL {
        let private = session.find_objects(&system_key_template(key));
        let public = session.find_objects(&system_public_key_template(key));
        for handle in private.into_iter().chain(public).flatten() {
            if let Err(error) = session.destroy_object(handle) {
                tracing::error!(error = %HsmError::from(error), "could not remove a half-imported key");
            }
        }
    }
}

fn unwrap_kek(
    shared: &Shared,
    session: &Session,
    transfer: ObjectHandle,
    kek: &ClonedKey,
) -> Result<(), HsmError> {
    let (_, mut template) =
        secret_key(SystemKey::Kek).ok_or(HsmError::UnexpectedResponse("KEK template"))?;
    // An unwrap may not name the length (the wrapped value has it).
    template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
    if !kek.id.is_empty() {
        KekId::from_bytes(&kek.id)?;
        let last = template.len().saturating_sub(1);
        template.insert(last, Attribute::Id(kek.id.clone()));
    }
    let unwrap = kek_unwrap_template();
    let wrap = kek_wrap_template();
    let _token_write = module::token_write_lock();
    shared.arrays.unwrap_key(
        session,
        &wrap_mechanism(),
        transfer,
        &kek.wrapped,
        &template,
        &[
            (ArrayAttribute::UnwrapTemplate, &unwrap),
            (ArrayAttribute::WrapTemplate, &wrap),
        ],
    )?;
    Ok(())
}

fn unwrap_system_key(
    session: &Session,
    transfer: ObjectHandle,
    cloned: &ClonedKey,
) -> Result<(), HsmError> {
    let key = cloned.key;
    let _token_write = module::token_write_lock();
    match key.kind() {
        SystemKeyKind::Signing(curve) => {
            let (_, mut public, private) = key_pair(
                system_key_algorithm(curve),
                PairTarget::System { label: key.label() },
            )?;
            session.unwrap_key(&wrap_mechanism(), transfer, &cloned.wrapped, &private)?;
            let point = cloned
                .ec_point
                .clone()
                .ok_or(HsmError::InvalidInput(format!("no public point for {key}")))?;
            let last = public.len().saturating_sub(1);
            public.insert(last, Attribute::EcPoint(point));
            session.create_object(&public)?;
        }
        _ => {
            let (_, mut template) =
                secret_key(key).ok_or(HsmError::UnexpectedResponse("secret key template"))?;
            template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
            session.unwrap_key(&wrap_mechanism(), transfer, &cloned.wrapped, &template)?;
        }
    }
    Ok(())
}
