//! User keys sign, and an independent implementation (openssl, p256) verifies.
// Helpers outside #[test] functions: in tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{Padding, hsm, openssl_verify, user_key};
use hsm_adapter::{
    Digest, ErrorKind, HashAlgorithm, Hsm, KeyAlgorithm, KeyMode, SignatureScheme, UserKeyRef,
};
use sha2::Digest as _;

const DATA: &[u8] = b"smartsign test document: the quick brown fox jumps over the lazy dog";

fn sha256(data: &[u8]) -> Digest {
    Digest::new(HashAlgorithm::Sha256, sha2::Sha256::digest(data).to_vec()).unwrap()
}

fn sha384(data: &[u8]) -> Digest {
    Digest::new(HashAlgorithm::Sha384, sha2::Sha384::digest(data).to_vec()).unwrap()
}

fn schemes(algorithm: KeyAlgorithm) -> &'static [(SignatureScheme, Padding)] {
    match algorithm {
        KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => {
            &[(SignatureScheme::Ecdsa, Padding::Default)]
        }
        _ => &[
            (SignatureScheme::RsaPkcs1v15, Padding::Default),
            (SignatureScheme::RsaPss, Padding::Pss),
        ],
    }
}

async fn signs_and_openssl_verifies(algorithm: KeyAlgorithm, mode: KeyMode) {
    let key = user_key(algorithm, mode).await;
    assert_eq!(key.algorithm(), algorithm);
    assert_eq!(key.mode(), mode);
    let pem = key.public_key().to_pem();
    for (scheme, padding) in schemes(algorithm) {
        let signature = hsm().sign(key, *scheme, &sha256(DATA)).await.unwrap();
        openssl_verify(&pem, "sha256", DATA, &signature, *padding);
        let signature = hsm().sign(key, *scheme, &sha384(DATA)).await.unwrap();
        openssl_verify(&pem, "sha384", DATA, &signature, *padding);
    }
}

#[tokio::test]
async fn wrapped_ec_p256_key_signs_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::EcP256, KeyMode::Wrapped).await;
}

#[tokio::test]
async fn resident_ec_p256_key_signs_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::EcP256, KeyMode::Resident).await;
}

#[tokio::test]
async fn wrapped_ec_p384_key_signs_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::EcP384, KeyMode::Wrapped).await;
}

#[tokio::test]
async fn resident_ec_p384_key_signs_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::EcP384, KeyMode::Resident).await;
}

#[tokio::test]
async fn wrapped_rsa_2048_key_signs_pkcs1_and_pss_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::Rsa2048, KeyMode::Wrapped).await;
}

#[tokio::test]
async fn resident_rsa_2048_key_signs_pkcs1_and_pss_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::Rsa2048, KeyMode::Resident).await;
}

#[tokio::test]
async fn wrapped_rsa_3072_key_signs_pkcs1_and_pss_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::Rsa3072, KeyMode::Wrapped).await;
}

#[tokio::test]
async fn resident_rsa_3072_key_signs_pkcs1_and_pss_and_openssl_verifies() {
    signs_and_openssl_verifies(KeyAlgorithm::Rsa3072, KeyMode::Resident).await;
}

#[tokio::test]
async fn key_reference_survives_its_byte_encoding() {
    for mode in [KeyMode::Wrapped, KeyMode::Resident] {
        let key = user_key(KeyAlgorithm::EcP256, mode).await;
        let decoded = UserKeyRef::from_bytes(&key.to_bytes()).unwrap();
        assert_eq!(&decoded, key);
        let signature = hsm()
            .sign(&decoded, SignatureScheme::Ecdsa, &sha256(DATA))
            .await
            .unwrap();
        openssl_verify(
            &key.public_key().to_pem(),
            "sha256",
            DATA,
            &signature,
            Padding::Default,
        );
    }
    // A reference that claims another algorithm than its public key's does not decode.
    for mode in [KeyMode::Wrapped, KeyMode::Resident] {
        let mut swapped = user_key(KeyAlgorithm::EcP256, mode).await.to_bytes();
        swapped[5] = 2; // the algorithm byte: EC P-384
        let err = UserKeyRef::from_bytes(&swapped).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
    let mut bytes = user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
        .await
        .to_bytes();
    bytes.push(0);
    assert_eq!(
        UserKeyRef::from_bytes(&bytes).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn sign_each_signs_every_digest_in_order_and_openssl_verifies_them() {
    const OTHER: &[u8] = b"the CMS signed attributes, or any second message";
    for (algorithm, mode) in [
        (KeyAlgorithm::EcP256, KeyMode::Wrapped),
        (KeyAlgorithm::Rsa2048, KeyMode::Resident),
    ] {
        let key = user_key(algorithm, mode).await;
        let pem = key.public_key().to_pem();
        let (scheme, padding) = schemes(algorithm)[0];
        let signatures = hsm()
            .sign_each(key, scheme, &[sha256(DATA), sha384(OTHER), sha256(OTHER)])
            .await
            .unwrap();
        assert_eq!(signatures.len(), 3);
        openssl_verify(&pem, "sha256", DATA, &signatures[0], padding);
        openssl_verify(&pem, "sha384", OTHER, &signatures[1], padding);
        openssl_verify(&pem, "sha256", OTHER, &signatures[2], padding);
        assert!(hsm().sign_each(key, scheme, &[]).await.unwrap().is_empty());
    }
    // A scheme that does not fit the key is refused before anything is signed.
    let key = user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped).await;
    let err = hsm()
        .sign_each(key, SignatureScheme::RsaPss, &[sha256(DATA)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn scheme_that_does_not_fit_the_key_is_refused() {
    let key = user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped).await;
    let err = hsm()
        .sign(key, SignatureScheme::RsaPss, &sha256(DATA))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn sixty_four_concurrent_signers_all_get_valid_signatures() {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::pkcs8::DecodePublicKey;

    let hsm: &'static Hsm = hsm();
    let wrapped = user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped).await;
    let resident = user_key(KeyAlgorithm::EcP256, KeyMode::Resident).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u32 {
        let key: &'static UserKeyRef = if i % 2 == 0 { wrapped } else { resident };
        tasks.spawn(async move {
            let message = format!("document {i}");
            let digest = sha256(message.as_bytes());
            let signature = hsm
                .sign(key, SignatureScheme::Ecdsa, &digest)
                .await
                .unwrap();
            (key, digest, signature)
        });
    }
    let verified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while let Some(result) = tasks.join_next().await {
        let (key, digest, signature) = result.unwrap();
        let verifying_key =
            p256::ecdsa::VerifyingKey::from_public_key_der(key.public_key().as_der()).unwrap();
        let signature = p256::ecdsa::Signature::from_der(&signature).unwrap();
        verifying_key
            .verify_prehash(digest.as_bytes(), &signature)
            .unwrap();
        verified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    assert_eq!(verified.load(std::sync::atomic::Ordering::Relaxed), 64);
}

#[tokio::test]
async fn destroyed_resident_key_no_longer_signs() {
    let key = hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    hsm()
        .sign(&key, SignatureScheme::Ecdsa, &sha256(DATA))
        .await
        .unwrap();
    hsm().destroy_user_key(&key).await.unwrap();
    let err = hsm()
        .sign(&key, SignatureScheme::Ecdsa, &sha256(DATA))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = hsm().destroy_user_key(&key).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn destroying_a_resident_key_while_it_signs_never_signs_with_another_key() {
    let victim = hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let spki = victim.public_key().to_pem();
    let mut signers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let victim = victim.clone();
        signers.spawn(async move {
            hsm()
                .sign(&victim, SignatureScheme::Ecdsa, &sha256(DATA))
                .await
        });
    }
    // Other users' keys come and go meanwhile, so that a module reusing handle numbers would
    // have a candidate to hand out.
    let destroy = hsm().destroy_user_key(&victim);
    let churn = async {
        for _ in 0..4 {
            let other = hsm()
                .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
                .await
                .unwrap();
            hsm().destroy_user_key(&other).await.unwrap();
        }
    };
    let (destroyed, ()) = tokio::join!(destroy, churn);
    destroyed.unwrap();
    while let Some(outcome) = signers.join_next().await {
        match outcome.unwrap() {
            // Signed before the key died: it must be the victim's own signature.
            Ok(signature) => {
                openssl_verify(&spki, "sha256", DATA, &signature, Padding::Default);
            }
            Err(err) => assert_eq!(err.kind(), ErrorKind::NotFound, "{err}"),
        }
    }
    let err = hsm()
        .sign(&victim, SignatureScheme::Ecdsa, &sha256(DATA))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn destroying_a_wrapped_key_evicts_cached_copies() {
    let key = hsm()
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
        .await
        .unwrap();
    // Sign a few times so that both workers may have an unwrapped copy cached.
    for _ in 0..4 {
        hsm()
            .sign(&key, SignatureScheme::Ecdsa, &sha256(DATA))
            .await
            .unwrap();
    }
    hsm().destroy_user_key(&key).await.unwrap();
    // The blob itself still unwraps: deleting it is the caller's job (documented).
    hsm()
        .sign(&key, SignatureScheme::Ecdsa, &sha256(DATA))
        .await
        .unwrap();
}

#[tokio::test]
async fn adapter_without_cache_or_reply_batching_signs_concurrently() {
    let config = common::token()
        .config()
        .with_workers(std::num::NonZeroUsize::new(3).unwrap())
        .with_wrapped_key_cache(0)
        .with_max_reply_delay(std::time::Duration::ZERO);
    let adapter = Arc::new(common::open_another(config).await);
    let key = user_key(KeyAlgorithm::EcP384, KeyMode::Wrapped).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16u32 {
        let adapter = Arc::clone(&adapter);
        tasks.spawn(async move {
            let message = format!("no batching {i}");
            let signature = adapter
                .sign(key, SignatureScheme::Ecdsa, &sha384(message.as_bytes()))
                .await
                .unwrap();
            (message, signature)
        });
    }
    let pem = key.public_key().to_pem();
    while let Some(result) = tasks.join_next().await {
        let (message, signature) = result.unwrap();
        openssl_verify(
            &pem,
            "sha384",
            message.as_bytes(),
            &signature,
            Padding::Default,
        );
    }
    Arc::try_unwrap(adapter).unwrap().shutdown().await;
}

/// Opened inside the test's runtime, the adapter hands replies out through its dispatcher task in
/// batches; every caller still gets its own signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_handed_out_in_batches_reach_their_own_callers() {
    let config = common::token()
        .config()
        .with_workers(std::num::NonZeroUsize::new(2).unwrap());
    // A resident key is found by an adapter opened after it exists.
    let key = user_key(KeyAlgorithm::EcP256, KeyMode::Resident).await;
    let adapter = Arc::new(common::open_another(config).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..256u32 {
        let adapter = Arc::clone(&adapter);
        tasks.spawn(async move {
            let message = format!("batched reply {i}");
            let signature = adapter
                .sign(key, SignatureScheme::Ecdsa, &sha256(message.as_bytes()))
                .await
                .unwrap();
            (message, signature)
        });
    }
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::pkcs8::DecodePublicKey;
    let verifying_key =
        p256::ecdsa::VerifyingKey::from_public_key_der(key.public_key().as_der()).unwrap();
    while let Some(result) = tasks.join_next().await {
        let (message, signature) = result.unwrap();
        let signature = p256::ecdsa::Signature::from_der(&signature).unwrap();
        let digest = sha2::Sha256::digest(message.as_bytes());
        verifying_key
            .verify_prehash(&digest, &signature)
            .expect("each caller gets the signature over its own message");
    }
    Arc::try_unwrap(adapter).unwrap().shutdown().await;
}
