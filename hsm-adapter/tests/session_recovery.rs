//! Workers recover sessions and handles lost behind their back, and retry idempotent work once.
//!
//! One test function on purpose: logging out and finalising act on the whole process, which
//! other tests running beside it would feel.
// Helpers outside #[test] functions: in tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;

use common::{hsm, open_another, pkcs11, raw_session, token, user_key};
use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use hsm_adapter::{
    Digest, ErrorKind, HashAlgorithm, Hsm, KeyAlgorithm, KeyMode, SignatureScheme, SystemKey,
};

async fn everything_works(hsm: &Hsm) {
    let digest = Digest::new(HashAlgorithm::Sha256, vec![3; 32]).unwrap();
    for mode in [KeyMode::Resident, KeyMode::Wrapped] {
        let key = user_key(KeyAlgorithm::EcP256, mode).await;
        hsm.sign(key, SignatureScheme::Ecdsa, &digest)
            .await
            .unwrap();
    }
    hsm.hmac_sha256(SystemKey::Taid, b"x").await.unwrap();
    hsm.sign_with_system_key(SystemKey::Audit, &digest)
        .await
        .unwrap();
}

#[tokio::test]
async fn workers_recover_lost_sessions_logins_and_handles() {
    let hsm = hsm();
    everything_works(hsm).await;

    // 1. The application is logged out (C_Logout from another session): the next calls get
    //    CKR_USER_NOT_LOGGED_IN, log in again, find their keys again, and retry.
    raw_session().logout().unwrap();
    everything_works(hsm).await;

    // 2. Logged out and in again between two calls: the session is fine, but every handle to a
    //    private object went stale (CKR_OBJECT_HANDLE_INVALID / CKR_KEY_HANDLE_INVALID).
    let session = raw_session();
    session.logout().unwrap();
    drop(session);
    let session = raw_session(); // logs in again
    everything_works(hsm).await;
    drop(session);

    // 3. Every session of the process closed (C_Finalize and C_Initialize behind the workers'
    //    back, the strongest form of C_CloseAllSessions): CKR_SESSION_HANDLE_INVALID, then a
    //    new session, a new login and new handles.
    let (module, _) = pkcs11();
    module.clone().finalize().unwrap();
    module
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    everything_works(hsm).await;

    // 4. Key generation is not retried (it is not idempotent) but the session is repaired for
    //    the next request. On an adapter with one worker, opened now: a worker of the shared
    //    one that took no job since step 3 would first replace its lost session, and logging
    //    that session in would hide the logout.
    let single = open_another(token().config().with_workers(NonZeroUsize::MIN)).await;
    raw_session().logout().unwrap();
    let err = single
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let key = single
        .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Resident)
        .await
        .unwrap();
    let digest = Digest::new(HashAlgorithm::Sha256, vec![4; 32]).unwrap();
    single
        .sign(&key, SignatureScheme::Ecdsa, &digest)
        .await
        .unwrap();
    single.shutdown().await;
    everything_works(hsm).await;
}
