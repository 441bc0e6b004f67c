//! KEK rotation, from a token made before KEKs had templates to one that has them, and on to a
//! second KEK: every user key re-wrapped inside the HSM still signs (openssl verifies), the
//! references from before (a backup of the store) no longer unwrap, and while two KEKs are on
//! the token nothing signs.
//!
//! It is the only test of this binary because it logs the security officer in and destroys the
//! token's KEK: no other test may share its token while it does.

// Test code: a panic is how a helper reports a failure (clippy.toml covers only #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Padding, blob_of, openssl_verify, token};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use der::Encode as _;
use hsm_adapter::{
    Digest, HashAlgorithm, Hsm, HsmError, KekId, KeyAlgorithm, KeyMode, SignatureScheme, UserKeyRef,
};
use p256::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};

const DATA: &[u8] = b"a document signed before and after a KEK rotation";

fn digest() -> Digest {
    Digest::new(HashAlgorithm::Sha256, Sha256::digest(DATA).to_vec()).unwrap()
}

fn raw_session(pkcs11: &Pkcs11) -> Session {
    let token = token();
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label() == token.label)
        .unwrap();
    pkcs11.open_rw_session(slot).unwrap()
}

/// The KEK as the code before this one made it: trusted, wrap and unwrap, no CKA_ID and no
/// templates. Made by the security officer, before anything else logs in.
fn make_legacy_kek(pkcs11: &Pkcs11) {
    let session = raw_session(pkcs11);
    session
        .login(UserType::So, Some(&token().so_pin()))
        .unwrap();
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Label(b"smartsign-kek".to_vec()),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(false),
                Attribute::Copyable(false),
                Attribute::Trusted(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Modifiable(false),
            ],
        )
        .unwrap();
    session.logout().unwrap();
}

/// A user key wrapped under the legacy KEK as the old code did, and its version-1 reference
/// (the documented encoding without a KEK id). Also runs the attack of issue 12 against it: the
/// blob unwraps as a readable secret, and that secret is the user's private key.
fn legacy_wrapped_key(session: &Session) -> UserKeyRef {
    let kek = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"smartsign-kek".to_vec()),
        ])
        .unwrap()[0];
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::Verify(true),
                Attribute::EcParams(const_oid::db::rfc5912::SECP_256_R_1.to_der().unwrap()),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::SignRecover(false),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::Copyable(false),
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
                Attribute::Modifiable(false),
            ],
        )
        .unwrap();
    let blob = session
        .wrap_key(&Mechanism::AesKeyWrapPad, kek, private)
        .unwrap();
    let point = match &session
        .get_attributes(public, &[AttributeType::EcPoint])
        .unwrap()[0]
    {
        Attribute::EcPoint(point) => point.clone(),
        other => panic!("{other:?}"),
    };
    session.destroy_object(private).unwrap();
    session.destroy_object(public).unwrap();
    // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
    let public_key = p256::PublicKey::from_sec1_bytes(&point[2..]).unwrap();
    let spki = public_key.to_public_key_der().unwrap().into_vec();

    // Before: the attack reads the private key in plaintext.
    let leaked = session
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            &blob,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .expect("a KEK without templates unwraps the blob as a readable secret");
    let pkcs8 = match &session
        .get_attributes(leaked, &[AttributeType::Value])
        .unwrap()[0]
    {
        Attribute::Value(value) => value.clone(),
        other => panic!("{other:?}"),
    };
    session.destroy_object(leaked).unwrap();
    // The value is the PKCS#8 DER (a short-form SEQUENCE), then what was padding to the wrap.
    assert_eq!(pkcs8[0], 0x30);
    assert!(pkcs8[1] < 0x80);
    let secret = p256::SecretKey::from_pkcs8_der(&pkcs8[..2 + usize::from(pkcs8[1])]).unwrap();
    assert_eq!(
        secret.public_key(),
        public_key,
        "the leaked key is the user's"
    );

    let mut encoded = b"SSKR\x01\x01\x01".to_vec();
    encoded.extend_from_slice(&0x210Au64.to_be_bytes()); // CKM_AES_KEY_WRAP_PAD
    encoded.extend_from_slice(&3u64.to_be_bytes()); // CKK_EC
    encoded.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    encoded.extend_from_slice(&blob);
    encoded.extend_from_slice(&(spki.len() as u32).to_be_bytes());
    encoded.extend_from_slice(&spki);
    UserKeyRef::from_bytes(&encoded).unwrap()
}

async fn signs(hsm: &Hsm, key: &UserKeyRef) {
    let scheme = if key.algorithm().is_ec() {
        SignatureScheme::Ecdsa
    } else {
        SignatureScheme::RsaPkcs1v15
    };
    let signature = hsm.sign(key, scheme, &digest()).await.unwrap();
    openssl_verify(
        &key.public_key().to_pem(),
        "sha256",
        DATA,
        &signature,
        Padding::Default,
    );
}

async fn sign_error(hsm: &Hsm, key: &UserKeyRef) -> HsmError {
    let scheme = if key.algorithm().is_ec() {
        SignatureScheme::Ecdsa
    } else {
        SignatureScheme::RsaPkcs1v15
    };
    hsm.sign(key, scheme, &digest()).await.unwrap_err()
}

async fn rotate(
    hsm: &Hsm,
    so_pin: &SecretString,
    keys: &[UserKeyRef],
    old: Option<KekId>,
) -> (KekId, Vec<UserKeyRef>) {
    let new = KekId::from_bytes(&hsm.random(KekId::LEN).await.unwrap()).unwrap();
    assert!(hsm.ensure_kek(so_pin, new).await.unwrap());
    // Idempotent, as a resumed rotation needs.
    assert!(!hsm.ensure_kek(so_pin, new).await.unwrap());
    let keks = hsm.key_encryption_keys().await.unwrap();
    assert_eq!(keks.len(), 2);
    // Two KEKs: no wrapped key signs until the rotation is finished.
    for key in keys.iter().filter(|k| k.mode() == KeyMode::Wrapped) {
        assert!(matches!(
            sign_error(hsm, key).await,
            HsmError::KekRotationUnfinished
        ));
    }
    let rewrapped: Vec<UserKeyRef> = hsm
        .rewrap(keys.to_vec(), new)
        .await
        .unwrap()
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    for (before, after) in keys.iter().zip(&rewrapped) {
        assert_eq!(before.public_key(), after.public_key());
        match before.mode() {
            KeyMode::Wrapped => {
                assert_eq!(after.kek(), Some(&new));
                assert_ne!(blob_of_any(before), blob_of(after));
            }
            _ => assert_eq!(before, after, "a resident key is not touched"),
        }
    }
    // Re-wrapping again changes nothing: a resumed rotation skips what is done.
    let again: Vec<UserKeyRef> = hsm
        .rewrap(rewrapped.clone(), new)
        .await
        .unwrap()
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(again, rewrapped);
    hsm.destroy_kek(old).await.unwrap();
    let keks = hsm.key_encryption_keys().await.unwrap();
    assert_eq!(keks.len(), 1);
    assert_eq!(keks[0].id, Some(new));
    assert!(keks[0].refused.is_none(), "{:?}", keks[0].refused);
    assert_eq!(hsm.current_kek().await.unwrap(), Some(new));
    (new, rewrapped)
}

/// The blob of a reference, with or without a KEK id (version 2 encodes none as length 0).
fn blob_of_any(key: &UserKeyRef) -> Vec<u8> {
    if key.kek().is_some() {
        return blob_of(key);
    }
    let bytes = key.to_bytes();
    assert_eq!((bytes[4], bytes[6], bytes[7]), (2, 1, 0));
    let len = u32::from_be_bytes(bytes[24..28].try_into().unwrap()) as usize;
    bytes[28..28 + len].to_vec()
}

#[tokio::test]
async fn rotation_rewraps_every_key_and_old_blobs_die_with_the_old_kek() {
    let token = token();
    let so_pin = token.so_pin();
    let pkcs11 = Pkcs11::new(&token.module).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();

    // A token made by the old code: its KEK has no templates.
    make_legacy_kek(&pkcs11);
    let hsm = Hsm::open(token.config()).await.unwrap();
    let refused = hsm.provision_system_keys(&so_pin).await.unwrap_err();
    assert!(matches!(refused, HsmError::KekTemplate { .. }), "{refused}");
    assert!(refused.to_string().contains("keys rotate-kek"), "{refused}");
    assert!(matches!(
        hsm.generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
            .await
            .unwrap_err(),
        HsmError::KekTemplate { .. }
    ));
    let user = raw_session(&pkcs11);
    let legacy = legacy_wrapped_key(&user);
    assert_eq!(legacy.kek(), None);
    assert!(matches!(
        sign_error(&hsm, &legacy).await,
        HsmError::KekTemplate { .. }
    ));

    // Rotation 1: from the legacy KEK to one with templates.
    let (first, after_first) = rotate(&hsm, &so_pin, std::slice::from_ref(&legacy), None).await;
    hsm.provision_system_keys(&so_pin).await.unwrap();
    signs(&hsm, &after_first[0]).await;
    let stale = sign_error(&hsm, &legacy).await;
    assert!(matches!(stale, HsmError::KekNotOnToken { .. }), "{stale}");

    // Rotation 2: keys made by the adapter under the first KEK, both algorithms, both modes.
    let mut keys = after_first;
    for (algorithm, mode) in [
        (KeyAlgorithm::EcP256, KeyMode::Wrapped),
        (KeyAlgorithm::Rsa2048, KeyMode::Wrapped),
        (KeyAlgorithm::EcP384, KeyMode::Resident),
    ] {
        let key = hsm.generate_user_key(algorithm, mode).await.unwrap();
        signs(&hsm, &key).await;
        keys.push(key);
    }
    let (second, after_second) = rotate(&hsm, &so_pin, &keys, Some(first)).await;
    assert_ne!(first, second);
    for key in &after_second {
        signs(&hsm, key).await;
    }
    // The store's backup from before rotation 2: its wrapped keys are dead, by name...
    for old in keys.iter().filter(|k| k.mode() == KeyMode::Wrapped) {
        let err = sign_error(&hsm, old).await;
        assert!(matches!(err, HsmError::KekNotOnToken { .. }), "{err}");
        // ...and by cryptography: the only KEK left does not open their blobs.
        let kek = user
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(b"smartsign-kek".to_vec()),
            ])
            .unwrap();
        assert_eq!(kek.len(), 1);
        let template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(if old.algorithm().is_ec() {
                KeyType::EC
            } else {
                KeyType::RSA
            }),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::WrapWithTrusted(true),
            Attribute::Sign(true),
            Attribute::SignRecover(false),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Copyable(false),
            Attribute::Modifiable(false),
        ];
        assert!(
            user.unwrap_key(&Mechanism::AesKeyWrapPad, kek[0], &blob_of(old), &template)
                .is_err()
        );
        // While the same template opens the re-wrapped blob: it is the old KEK that is missing.
        let rewrapped = after_second
            .iter()
            .find(|k| k.public_key() == old.public_key())
            .unwrap();
        let copy = user
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                kek[0],
                &blob_of(rewrapped),
                &template,
            )
            .unwrap();
        user.destroy_object(copy).unwrap();
    }

    // A trusted key besides the KEK, made by the SO, is found and named.
    assert!(hsm.foreign_trusted_objects().await.unwrap().is_empty());
    user.logout().unwrap();
    let officer = raw_session(&pkcs11);
    officer.login(UserType::So, Some(&token.so_pin())).unwrap();
    let stray = officer
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::ValueLen(32u64.into()),
                Attribute::Label(b"exfiltration".to_vec()),
                Attribute::Trusted(true),
                Attribute::Wrap(true),
            ],
        )
        .unwrap();
    officer.logout().unwrap();
    let found = hsm.foreign_trusted_objects().await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("exfiltration"), "{found:?}");
    let (_, described) = hsm.describe().await.unwrap();
    assert!(described.iter().any(|k| k.label.contains("exfiltration")));
    officer.destroy_object(stray).unwrap();
    assert!(hsm.foreign_trusted_objects().await.unwrap().is_empty());
    hsm.shutdown().await;
}
