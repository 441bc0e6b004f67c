//! Throughput of the adapter against raw cryptoki doing the same work, for
//! `smartsign-ctl bench hsm`.
//!
//! The baseline is what the adapter's worker does per signature, called straight through
//! cryptoki from `threads` threads that each own a logged-in session:
//! - resident key: `C_SignInit` + `C_Sign` with a handle found once before the clock starts;
//! - wrapped key: `C_UnwrapKey` with the adapter's template, `C_SignInit` + `C_Sign`,
//!   `C_DestroyObject`.
//!
//! The adapter is measured through its async API with as many workers as baseline threads, its
//! wrapped-key cache off (so that it unwraps every time, like the baseline), and several
//! requests in flight per worker so that no worker waits for the caller.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::config::HsmConfig;
use crate::directory::system_key_template;
use crate::error::HsmError;
use crate::hsm::Hsm;
use crate::keys::{
    Digest, HashAlgorithm, KeyAlgorithm, KeyStorage, RESIDENT_KEY_LABEL, SignatureScheme,
    SystemKey, UserKeyRef,
};
use crate::module;
use crate::operations::SignRequest;
use crate::templates::{unwrap_template, wrap_mechanism};

/// The digest every benchmark signs (SHA-256 of a fixed message).
const DIGEST: [u8; 32] = [0x5a; 32];

/// Operations completed in a measured time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Completed signatures.
    pub operations: u64,
    /// From the start until the last of them completed.
    pub elapsed: Duration,
}

impl Throughput {
    /// Signatures per second.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.operations as f64 / secs
        } else {
            0.0
        }
    }
}

/// The scheme benchmarked for an algorithm: ECDSA, or RSA PKCS#1 v1.5.
pub fn scheme_for(algorithm: KeyAlgorithm) -> SignatureScheme {
    match algorithm {
        KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => SignatureScheme::Ecdsa,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => SignatureScheme::RsaPkcs1v15,
    }
}

fn request_for(key: &UserKeyRef) -> Result<SignRequest, HsmError> {
    let digest = Digest::new(HashAlgorithm::Sha256, DIGEST.to_vec())?;
    SignRequest::new(key.algorithm(), scheme_for(key.algorithm()), &digest)
}

/// The baseline: `threads` threads calling cryptoki directly for `duration`. Blocking: run it
/// off the async runtime (`spawn_blocking`).
pub fn raw_cryptoki(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    duration: Duration,
) -> Result<Throughput, HsmError> {
    let pkcs11 = module::load(&config.module)?;
    let slot = module::find_token(&pkcs11, &config.token)?;
    let request = request_for(key)?;
    let mut sessions = Vec::with_capacity(threads.get());
    for _ in 0..threads.get() {
        sessions.push(module::open_user_session(&pkcs11, slot, &config.pin)?);
    }
    let setup = sessions
        .first()
        .ok_or(HsmError::UnexpectedResponse("no session"))?;
    let target = match &key.storage {
        KeyStorage::Resident { id } => Target::Resident(find_one(
            setup,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Token(true),
                Attribute::Label(RESIDENT_KEY_LABEL.as_bytes().to_vec()),
                Attribute::Id(id.clone()),
            ],
        )?),
        KeyStorage::Wrapped { blob, .. } => Target::Wrapped {
            kek: find_one(setup, &system_key_template(SystemKey::Kek))?,
            blob,
            template: unwrap_template(key.algorithm()),
        },
    };

    let operations = AtomicU64::new(0);
    let start_line = Barrier::new(threads.get() + 1);
    let (start, results) = std::thread::scope(|scope| {
        let workers: Vec<_> = sessions
            .into_iter()
            .map(|session| {
                let (target, operations, start_line) = (&target, &operations, &start_line);
                let request = &request;
                scope.spawn(move || -> Result<Instant, HsmError> {
                    let (mechanism, data) = (request.mechanism(), request.data());
                    start_line.wait();
                    let deadline = Instant::now() + duration;
                    let mut done = 0;
                    while Instant::now() < deadline {
                        match target {
                            Target::Resident(handle) => {
                                session.sign(&mechanism, *handle, data)?;
                            }
                            Target::Wrapped {
                                kek,
                                blob,
                                template,
                            } => {
                                let handle =
                                    session.unwrap_key(&wrap_mechanism(), *kek, blob, template)?;
                                let signed = session.sign(&mechanism, handle, data);
                                session.destroy_object(handle)?;
                                signed?;
                            }
                        }
                        done += 1;
                    }
                    operations.fetch_add(done, Ordering::Relaxed);
                    Ok(Instant::now())
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let results: Vec<_> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or(Err(HsmError::UnexpectedResponse("bench thread panicked")))
            })
            .collect();
        (start, results)
    });
    let mut end = start;
    for result in results {
        end = end.max(result?);
    }
    Ok(Throughput {
        operations: operations.into_inner(),
        elapsed: end - start,
    })
}

enum Target<'a> {
    Resident(ObjectHandle),
    Wrapped {
        kek: ObjectHandle,
        blob: &'a [u8],
        template: Vec<Attribute>,
    },
}

fn find_one(session: &Session, template: &[Attribute]) -> Result<ObjectHandle, HsmError> {
    match session.find_objects(template)?[..] {
        [handle] => Ok(handle),
        [] => Err(HsmError::UnexpectedResponse("bench key not found")),
        _ => Err(HsmError::UnexpectedResponse(
            "bench key found more than once",
        )),
    }
}

/// The adapter through its async API: a new [`Hsm`] with `threads` workers and no wrapped-key
/// cache, kept busy by `in_flight` concurrent requests for `duration`. Call it inside a tokio
/// runtime (it spawns the requests as tasks).
pub async fn adapter(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    in_flight: NonZeroUsize,
    duration: Duration,
) -> Result<Throughput, HsmError> {
    let hsm = Arc::new(
        Hsm::open(
            config
                .clone()
                .with_workers(threads)
                .with_wrapped_key_cache(0),
        )
        .await?,
    );
    let digest = Digest::new(HashAlgorithm::Sha256, DIGEST.to_vec())?;
    let scheme = scheme_for(key.algorithm());
    // One signature first: checks the key's policy and fails fast on a broken setup.
    hsm.sign(key, scheme, &digest).await?;

    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight.get() {
        let (hsm, key, digest) = (Arc::clone(&hsm), key.clone(), digest.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                hsm.sign(&key, scheme, &digest).await?;
                done += 1;
            }
            Ok::<_, HsmError>(done)
        });
    }
    let mut operations = 0;
    while let Some(result) = tasks.join_next().await {
        operations += result.map_err(|_| HsmError::UnexpectedResponse("bench task failed"))??;
    }
    let elapsed = start.elapsed();
    if let Ok(hsm) = Arc::try_unwrap(hsm) {
        hsm.shutdown().await;
    }
    Ok(Throughput {
        operations,
        elapsed,
    })
}
