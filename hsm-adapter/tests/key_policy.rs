//! The key policy holds on the token, checked with cryptoki and pkcs11-tool directly, and keys
//! that break it are refused by name.
// Helpers outside #[test] functions: in tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{blob_of, hsm, raw_session, token, user_key};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use der::Encode;
use hsm_adapter::{
    Digest, ErrorKind, HashAlgorithm, HsmError, KeyAlgorithm, KeyMode, RESIDENT_KEY_LABEL,
    SignatureScheme, SystemKey,
};

fn digest() -> Digest {
    Digest::new(HashAlgorithm::Sha256, vec![0x11; 32]).unwrap()
}

fn find_resident(
    session: &cryptoki::session::Session,
    id: &[u8],
) -> cryptoki::object::ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.to_vec()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    found[0]
}

fn bool_attribute(
    session: &cryptoki::session::Session,
    key: cryptoki::object::ObjectHandle,
    t: AttributeType,
) -> bool {
    match session.get_attributes(key, &[t]).unwrap().as_slice() {
        [
            Attribute::Sensitive(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::NeverExtractable(b)
            | Attribute::Extractable(b)
            | Attribute::Decrypt(b)
            | Attribute::Unwrap(b)
            | Attribute::Derive(b)
            | Attribute::Sign(b)
            | Attribute::Trusted(b)
            | Attribute::WrapWithTrusted(b)
            | Attribute::Private(b),
        ] => *b,
        other => panic!("{t}: {other:?}"),
    }
}

#[tokio::test]
async fn resident_private_keys_are_sensitive_and_never_extractable() {
    for algorithm in [KeyAlgorithm::EcP256, KeyAlgorithm::Rsa2048] {
        let key = user_key(algorithm, KeyMode::Resident).await;
        let session = raw_session();
        let handle = find_resident(&session, key.resident_id().unwrap());
        for t in [
            AttributeType::Sensitive,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Sign,
            AttributeType::Private,
        ] {
            assert!(bool_attribute(&session, handle, t), "{t} must be true");
        }
        for t in [
            AttributeType::Extractable,
            AttributeType::Decrypt,
            AttributeType::Unwrap,
            AttributeType::Derive,
        ] {
            assert!(!bool_attribute(&session, handle, t), "{t} must be false");
        }
        let value_type = match algorithm {
            KeyAlgorithm::EcP256 => AttributeType::Value,
            _ => AttributeType::PrivateExponent,
        };
        // C_GetAttributeValue answers CKR_ATTRIBUTE_SENSITIVE for the private value.
        let info = session.get_attribute_info(handle, &[value_type]).unwrap();
        assert!(
            matches!(info.as_slice(), [AttributeInfo::Sensitive]),
            "{value_type}: {info:?}"
        );
    }
}

#[tokio::test]
async fn pkcs11_tool_lists_resident_keys_as_never_extractable() {
    let key = user_key(KeyAlgorithm::EcP256, KeyMode::Resident).await;
    let token = token();
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&token.module)
        .args([
            "--token-label",
            &token.label,
            "--login",
            "--pin",
            &token.pin(),
        ])
        .args(["--list-objects", "--type", "privkey"])
        .output()
        .expect("run pkcs11-tool");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{listing} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One block per object, each starting with an unindented "Private Key Object" line; other
    // tests' keys may be listed too.
    let id_line = format!("ID:         {}", hex::encode(key.resident_id().unwrap()));
    let block = listing
        .split("Private Key Object")
        .find(|block| block.lines().any(|l| l.trim() == id_line.trim()))
        .unwrap_or_else(|| panic!("key not listed: {listing}"));
    assert!(block.contains(RESIDENT_KEY_LABEL), "{block}");
    let flags = block
        .lines()
        .find(|l| l.trim_start().starts_with("Access:"))
        .expect(block);
    for flag in ["sensitive", "always sensitive", "never extractable"] {
        assert!(flags.contains(flag), "{flag} missing from {flags}");
    }
    let usage = block
        .lines()
        .find(|l| l.trim_start().starts_with("Usage:"))
        .expect(block);
    assert!(
        usage.contains("sign") && !usage.contains("decrypt") && !usage.contains("unwrap"),
        "{usage}"
    );
}

#[tokio::test]
async fn object_handles_work_across_sessions_of_the_process() {
    // The adapter's key directory relies on this (SoftHSM, like PKCS#11, scopes handles to the
    // application, not to the session that found them).
    let key = user_key(KeyAlgorithm::EcP256, KeyMode::Resident).await;
    let finder = raw_session();
    let handle = find_resident(&finder, key.resident_id().unwrap());
    let signer = raw_session();
    let signature = signer
        .sign(&Mechanism::Ecdsa, handle, digest().as_bytes())
        .unwrap();
    assert_eq!(signature.len(), 64);
}

#[tokio::test]
async fn wrapped_key_cannot_be_rewrapped_under_an_untrusted_key() {
    let key = user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped).await;
    let session = raw_session();
    let kek = session
        .find_objects(&[
            Attribute::Label(b"smartsign-kek".to_vec()),
            Attribute::Class(ObjectClass::SECRET_KEY),
        ])
        .unwrap()[0];
    // An attacker's own wrapping key: a session AES key that may wrap and unwrap, not trusted.
    let untrusted = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32u64.into()),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Extractable(false),
            ],
        )
        .unwrap();
    // Unwrap the user's blob into an extractable copy, the most an attacker with the token
    // could ask for: WRAP_WITH_TRUSTED comes back set, and only a trusted key may wrap it.
    let blob = blob_of(key);
    let template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Sign(true),
        // The rest of what the KEK's unwrap template forces (tests/key_custody.rs).
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
    ];
    let copy = session
        .unwrap_key(&Mechanism::AesKeyWrapPad, kek, &blob, &template)
        .unwrap();
    let err = session
        .wrap_key(&Mechanism::AesKeyWrapPad, untrusted, copy)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CryptokiError::Pkcs11(RvError::KeyNotWrappable | RvError::KeyUnextractable, _)
        ),
        "wrapping under an untrusted key must fail: {err}"
    );
    // Turning WRAP_WITH_TRUSTED off is refused too.
    let err = session
        .update_attributes(copy, &[Attribute::WrapWithTrusted(false)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            CryptokiError::Pkcs11(RvError::AttributeReadOnly | RvError::ActionProhibited, _)
        ),
        "{err}"
    );
    // And the blob does not unwrap under any key but the KEK.
    assert!(
        session
            .unwrap_key(&Mechanism::AesKeyWrapPad, untrusted, &blob, &template)
            .is_err()
    );
    session.destroy_object(copy).unwrap();
    session.destroy_object(untrusted).unwrap();
}

/// Makes a resident-looking key pair through cryptoki with one attribute changed, and opens a
/// fresh adapter so that its directory finds it.
async fn sign_with_tampered_resident_key(algorithm: KeyAlgorithm, tampered: Attribute) -> HsmError {
    let session = raw_session();
    let id = format!("tampered-{}", tampered.attribute_type()).into_bytes();
    let label = RESIDENT_KEY_LABEL.as_bytes().to_vec();
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Id(id.clone()),
        Attribute::Label(label.clone()),
        Attribute::Verify(true),
    ];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Id(id.clone()),
        Attribute::Label(label),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::SignRecover(false),
    ];
    let tampered_type = tampered.attribute_type();
    private.retain(|a| a.attribute_type() != tampered_type);
    private.push(tampered);
    if !private
        .iter()
        .any(|a| a.attribute_type() == AttributeType::Extractable)
    {
        private.push(Attribute::Extractable(false));
    }
    let mechanism = match algorithm {
        KeyAlgorithm::EcP256 => {
            public.push(Attribute::EcParams(
                const_oid::db::rfc5912::SECP_256_R_1.to_der().unwrap(),
            ));
            Mechanism::EccKeyPairGen
        }
        _ => {
            public.push(Attribute::ModulusBits(2048u64.into()));
            public.push(Attribute::PublicExponent(vec![1, 0, 1]));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    let (public, private) = session
        .generate_key_pair(&mechanism, &public, &private)
        .unwrap();

    let adapter = common::open_another(token().config()).await;
    let key = adapter.resident_key_ref(&id, algorithm).await.unwrap();
    let scheme = if algorithm == KeyAlgorithm::EcP256 {
        SignatureScheme::Ecdsa
    } else {
        SignatureScheme::RsaPkcs1v15
    };
    let err = adapter.sign(&key, scheme, &digest()).await.unwrap_err();
    adapter.shutdown().await;
    session.destroy_object(private).unwrap();
    session.destroy_object(public).unwrap();
    err
}

#[tokio::test]
async fn extractable_resident_key_is_refused_naming_the_attribute() {
    let err =
        sign_with_tampered_resident_key(KeyAlgorithm::EcP256, Attribute::Extractable(true)).await;
    assert!(
        matches!(
            err,
            HsmError::KeyPolicy {
                attribute: "CKA_EXTRACTABLE",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::NotPermitted);
    assert!(
        err.to_string().contains("CKA_EXTRACTABLE must be CK_FALSE"),
        "{err}"
    );
}

#[tokio::test]
async fn decrypting_private_key_is_refused_naming_the_attribute() {
    let err =
        sign_with_tampered_resident_key(KeyAlgorithm::Rsa2048, Attribute::Decrypt(true)).await;
    assert!(
        matches!(
            err,
            HsmError::KeyPolicy {
                attribute: "CKA_DECRYPT",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::NotPermitted);
}

#[tokio::test]
async fn system_keys_pass_the_policy_and_the_kek_is_trusted() {
    let report = hsm()
        .provision_system_keys(&token().so_pin())
        .await
        .unwrap();
    assert!(
        report.created.is_empty(),
        "provisioning twice creates nothing: {report:?}"
    );
    assert_eq!(report.found, SystemKey::ALL.to_vec());
    let session = raw_session();
    let kek = session
        .find_objects(&[
            Attribute::Label(b"smartsign-kek".to_vec()),
            Attribute::Class(ObjectClass::SECRET_KEY),
        ])
        .unwrap();
    assert_eq!(kek.len(), 1);
    assert!(bool_attribute(&session, kek[0], AttributeType::Trusted));
    assert!(bool_attribute(&session, kek[0], AttributeType::Sensitive));
    // Extractable only under a trusted key: what a clone to a second HSM needs.
    assert!(bool_attribute(
        &session,
        kek[0],
        AttributeType::WrapWithTrusted
    ));
    assert!(!bool_attribute(&session, kek[0], AttributeType::Decrypt));
    for key in [SystemKey::Taid, SystemKey::Hkic, SystemKey::Data] {
        let found = session
            .find_objects(&[
                Attribute::Label(key.label().as_bytes().to_vec()),
                Attribute::Class(ObjectClass::SECRET_KEY),
            ])
            .unwrap();
        assert_eq!(found.len(), 1, "{key}");
        assert!(
            bool_attribute(&session, found[0], AttributeType::Private),
            "{key}"
        );
        assert!(
            bool_attribute(&session, found[0], AttributeType::WrapWithTrusted),
            "{key}"
        );
    }
}
