//! The HSM work of one signing flow, through raw cryptoki: the baseline of `smartsign-ctl bench
//! sign`.
//!
//! One flow of the daemon (API.md: create, authorise, read) asks the HSM for:
//! - 20 random bytes (the request id and identification code), when the request is made;
//! - an AES-256-GCM decryption of the sealed certificate (about 700 bytes), before signing;
//! - `C_UnwrapKey` of the user's wrapped key, two signatures (the raw one and the CMS signed
//!   attributes) and `C_DestroyObject`: what the adapter's worker does on a wrapped-key cache miss
//!   (on a hit it skips the unwrap, and destroys the evicted key later);
//! - a 12-byte nonce and an AES-256-GCM encryption of the result (about 2 KB);
//! - an AES-256-GCM decryption of that result when the service reads it.
//!
//! [`run`] does exactly that per operation, from `threads` threads that each own a logged-in
//! session, with the keys found before the clock starts. Closed loop (each thread starts its
//! next operation when one ends) it measures the most the HSM can do; open loop (operation `k`
//! is due at `k / rate` seconds) it measures the latency of the HSM work alone at a given load,
//! from when each operation was due, so that queueing is counted like the daemon's.

use std::num::NonZeroUsize;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

use crate::config::HsmConfig;
use crate::directory::system_key_template;
use crate::error::HsmError;
use crate::hsm::run_blocking;
use crate::keys::{Digest, HashAlgorithm, KeyStorage, SignatureScheme, SystemKey, UserKeyRef};
use crate::module;
use crate::operations::{GCM_NONCE_LEN, GCM_TAG_LEN, SignRequest};
use crate::templates::{CopyUse, unwrap_template, wrap_mechanism};

/// Bytes of the sealed certificate the flow opens before signing.
const CERTIFICATE_LEN: usize = 700;
/// Bytes of the signed result the flow seals, and the service's read opens.
const RESULT_LEN: usize = 2048;
/// Random bytes drawn when a request is made.
const REQUEST_RANDOM_LEN: usize = 20;

/// How operations are started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// Each thread starts its next operation as soon as one ends.
    Closed,
    /// Operation `k` is due `k / rate` seconds after the start (per second).
    Open {
        /// Operations per second.
        rate: f64,
    },
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct FlowWork {
    /// Operations completed.
    pub operations: u64,
    /// From the start to the end of the last operation.
    pub elapsed: Duration,
    /// Each operation's latency, from when it was due (open loop) or started (closed loop).
    pub latencies: Vec<Duration>,
}

impl FlowWork {
    /// Operations per second.
    pub fn per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Adds another run's figures.
    pub fn add(&mut self, mut other: FlowWork) {
        self.operations += other.operations;
        self.elapsed += other.elapsed;
        self.latencies.append(&mut other.latencies);
    }
}

/// Does one flow's HSM work with wrapped `key` over and over from `threads` sessions, for
/// about `duration`.
pub async fn run(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    duration: Duration,
    arrivals: Arrivals,
) -> Result<FlowWork, HsmError> {
    let (config, key) = (config.clone(), key.clone());
    run_blocking("hsm-bench-flow", move || {
        let (sessions, work) = Work::open(&config, &key, threads)?;
        work.run(sessions, duration, arrivals)
    })
    .await
}

/// The handles and inputs found and made before the clock starts.
struct Work {
    kek: ObjectHandle,
    data_key: ObjectHandle,
    blob: Vec<u8>,
    template: Vec<Attribute>,
    request: SignRequest,
    sealed_certificate: Vec<u8>,
}

impl Work {
    /// `threads` logged-in sessions, and the work.
    fn open(
        config: &HsmConfig,
        key: &UserKeyRef,
        threads: NonZeroUsize,
    ) -> Result<(Vec<Session>, Work), HsmError> {
        let KeyStorage::Wrapped { blob, .. } = &key.storage else {
            return Err(HsmError::UnexpectedResponse(
                "the flow baseline needs a wrapped key",
            ));
        };
        let pkcs11 = module::load(&config.module)?.pkcs11;
        let slot = module::find_token(&pkcs11, &config.token)?;
        let mut sessions = Vec::with_capacity(threads.get());
        for _ in 0..threads.get() {
            sessions.push(module::open_user_session(&pkcs11, slot, &config.pin)?);
        }
        let setup = sessions
            .first()
            .ok_or(HsmError::UnexpectedResponse("no session"))?;
        let kek = find_one(setup, &system_key_template(SystemKey::Kek))?;
        let data_key = find_one(setup, &system_key_template(SystemKey::Data))?;
        let digest = Digest::new(HashAlgorithm::Sha256, [0x5a; 32].to_vec())?;
        let scheme = if key.algorithm().is_ec() {
            SignatureScheme::Ecdsa
        } else {
            SignatureScheme::RsaPkcs1v15
        };
        let request = SignRequest::new(key.algorithm(), scheme, &digest)?;
        let sealed_certificate = seal(setup, data_key, &[0x30; CERTIFICATE_LEN])?;
        let work = Work {
            kek,
            data_key,
            blob: blob.clone(),
            template: unwrap_template(key.algorithm(), CopyUse::Sign),
            request,
            sealed_certificate,
        };
        Ok((sessions, work))
    }

    /// One flow's HSM work on `session`.
    fn once(&self, session: &Session) -> Result<(), HsmError> {
        let mut random = [0u8; REQUEST_RANDOM_LEN];
        session.generate_random_slice(&mut random)?;
        open(session, self.data_key, &self.sealed_certificate)?;
        let handle = session.unwrap_key(&wrap_mechanism(), self.kek, &self.blob, &self.template)?;
        let (mechanism, data) = (self.request.mechanism(), self.request.data());
        let signed = session
            .sign(&mechanism, handle, data)
            .and_then(|_| session.sign(&mechanism, handle, data));
        session.destroy_object(handle)?;
        signed?;
        let sealed = seal(session, self.data_key, &[0x5a; RESULT_LEN])?;
        open(session, self.data_key, &sealed)?;
        Ok(())
    }

    fn run(
        &self,
        sessions: Vec<Session>,
        duration: Duration,
        arrivals: Arrivals,
    ) -> Result<FlowWork, HsmError> {
        let next = AtomicU64::new(0);
        let start_line = Barrier::new(sessions.len() + 1);
        let (start, results) = std::thread::scope(|scope| {
            let threads: Vec<_> = sessions
                .into_iter()
                .map(|session| {
                    let (next, start_line) = (&next, &start_line);
                    scope.spawn(move || -> Result<(Instant, Vec<Duration>), HsmError> {
                        let mut latencies = Vec::new();
                        start_line.wait();
                        let start = Instant::now();
                        let deadline = start + duration;
                        loop {
                            let began = match arrivals {
                                Arrivals::Closed => Instant::now(),
                                Arrivals::Open { rate } => {
                                    let k = next.fetch_add(1, Ordering::Relaxed);
                                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                        std::thread::sleep(wait);
                                    }
                                    due
                                }
                            };
                            if began >= deadline {
                                break;
                            }
                            self.once(&session)?;
                            latencies.push(began.elapsed());
                        }
                        Ok((Instant::now(), latencies))
                    })
                })
                .collect();
            release_and_join(&start_line, threads)
        });
        let mut work = FlowWork::default();
        let mut end = start;
        for result in results {
            let (ended, mut latencies) = result?;
            end = end.max(ended);
            work.operations += latencies.len() as u64;
            work.latencies.append(&mut latencies);
        }
        work.elapsed = end - start;
        Ok(work)
    }
}

/// AES-256-GCM as the adapter seals: a nonce from the HSM, then `C_Encrypt`.
fn seal(session: &Session, key: ObjectHandle, plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
    let mut nonce = [0u8; GCM_NONCE_LEN];
    session.generate_random_slice(&mut nonce)?;
    let mut iv = nonce;
    let params = GcmParams::new(&mut iv, b"bench", (8 * GCM_TAG_LEN as u64).into())?;
    let mut sealed = nonce.to_vec();
    sealed.extend(session.encrypt(&Mechanism::AesGcm(params), key, plaintext)?);
    Ok(sealed)
}

/// Reverses [`seal`].
fn open(session: &Session, key: ObjectHandle, sealed: &[u8]) -> Result<(), HsmError> {
    let (nonce, ciphertext) = sealed.split_at(GCM_NONCE_LEN.min(sealed.len()));
    let mut iv = [0u8; GCM_NONCE_LEN];
    iv.copy_from_slice(nonce);
    let params = GcmParams::new(&mut iv, b"bench", (8 * GCM_TAG_LEN as u64).into())?;
    session.decrypt(&Mechanism::AesGcm(params), key, ciphertext)?;
    Ok(())
}

/// Lets the threads waiting at `start_line` go, and gives when they went and what each
/// returned (a panicked thread as an error).
pub(crate) fn release_and_join<T>(
    start_line: &Barrier,
    threads: Vec<std::thread::ScopedJoinHandle<'_, Result<T, HsmError>>>,
) -> (Instant, Vec<Result<T, HsmError>>) {
    start_line.wait();
    let start = Instant::now();
    let results = threads
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap_or(Err(HsmError::UnexpectedResponse("bench thread panicked")))
        })
        .collect();
    (start, results)
}

pub(crate) fn find_one(
    session: &Session,
    template: &[Attribute],
) -> Result<ObjectHandle, HsmError> {
    match session.find_objects(template)?[..] {
        [handle] => Ok(handle),
        [] => Err(HsmError::UnexpectedResponse("bench key not found")),
        _ => Err(HsmError::UnexpectedResponse(
            "bench key found more than once",
        )),
    }
}
