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
//! requests in flight per worker so that no worker waits for the caller. The requests come from
//! a single-threaded tokio runtime on a thread of its own, the leanest async caller there is, so
//! that what is measured is the adapter (queue, worker, reply) and not the caller's scheduler.
//!
//! The two alternate in short rounds (baseline, adapter, adapter, baseline, ...) so that a
//! machine whose speed drifts (a shared VM does) slows both alike.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::config::HsmConfig;
use crate::directory::system_key_template;
use crate::error::HsmError;
use crate::hsm::{Hsm, run_blocking};
use crate::keys::{
    Digest, HashAlgorithm, KeyAlgorithm, KeyStorage, RESIDENT_KEY_LABEL, SignatureScheme,
    SystemKey, UserKeyRef,
};
use crate::module;
use crate::operations::SignRequest;
use crate::templates::{unwrap_template, wrap_mechanism};

/// The digest every benchmark signs.
const DIGEST: [u8; 32] = [0x5a; 32];
/// Length of one measuring round.
const ROUND: Duration = Duration::from_millis(250);

/// Operations completed in a measured time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Throughput {
    /// Completed signatures.
    pub operations: u64,
    /// Time spent measuring.
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

    fn add(&mut self, other: Throughput) {
        self.operations += other.operations;
        self.elapsed += other.elapsed;
    }
}

/// The baseline and the adapter, measured in alternating rounds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Comparison {
    /// Raw cryptoki.
    pub raw: Throughput,
    /// The adapter's async API.
    pub adapter: Throughput,
}

impl Comparison {
    /// Adapter throughput over raw throughput.
    pub fn ratio(&self) -> f64 {
        let raw = self.raw.per_second();
        if raw > 0.0 {
            self.adapter.per_second() / raw
        } else {
            0.0
        }
    }
}

/// The scheme benchmarked for an algorithm: ECDSA, or RSA PKCS#1 v1.5.
fn scheme_for(algorithm: KeyAlgorithm) -> SignatureScheme {
    match algorithm {
        KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => SignatureScheme::Ecdsa,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => SignatureScheme::RsaPkcs1v15,
    }
}

/// Requests kept in flight per worker: many times the replies a busy worker may hold back (32),
/// so that it always finds the next job queued while replies travel back and while the caller
/// waits for a core (on two cores with two workers, the caller runs only when one gives way).
const IN_FLIGHT_PER_WORKER: usize = 256;

/// Measures signing with `key` through raw cryptoki alone, with `threads` sessions, for about
/// `duration`: the baseline against which a whole pipeline built on the HSM (the daemon's signing
/// flow) is compared.
pub async fn raw(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    duration: Duration,
) -> Result<Throughput, HsmError> {
    let (config, key) = (config.clone(), key.clone());
    run_blocking("hsm-bench-raw", move || {
        RawBaseline::new(&config, &key, threads)?.run(duration)
    })
    .await
}

/// Measures signing with `key` for about `duration` each through raw cryptoki and through the
/// adapter, both with `threads` sessions. Call it inside a tokio runtime.
pub async fn compare(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    duration: Duration,
) -> Result<Comparison, HsmError> {
    // An even number of rounds, in the order ABBA ABBA ...: a linear drift cancels out.
    let rounds = (duration.as_nanos() / ROUND.as_nanos()).max(1) as u32;
    let round = duration / rounds;
    let mut comparison = Comparison::default();
    for i in 0..rounds * 2 {
        // Each round sets up its side afresh and tears it down after, so that neither side
        // measures with the other's sessions and threads standing by (on SoftHSM, idle
        // sessions of the other side cost the measured one up to a quarter of its throughput).
        if (i % 4 == 0) || (i % 4 == 3) {
            let (config, key) = (config.clone(), key.clone());
            let measured = run_blocking("hsm-bench-raw", move || {
                RawBaseline::new(&config, &key, threads)?.run(round)
            })
            .await?;
            comparison.raw.add(measured);
        } else {
            let (config, key) = (config.clone(), key.clone());
            // The adapter is opened, driven and closed on the caller's runtime, a
            // single-threaded one on a thread of its own, the leanest async caller there is.
            let measured = run_blocking("hsm-bench-load", move || {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .map_err(HsmError::WorkerSpawn)?
                    .block_on(async move {
                        let adapter = AdapterLoad::open(&config, &key, threads).await?;
                        let measured = adapter.run(round).await;
                        adapter.close().await;
                        measured
                    })
            })
            .await?;
            comparison.adapter.add(measured);
        }
    }
    Ok(comparison)
}

/// Sessions and handles of the baseline threads, set up before the clock starts.
struct RawBaseline {
    sessions: Vec<Session>,
    request: SignRequest,
    target: Target,
}

enum Target {
    Resident(ObjectHandle),
    Wrapped {
        kek: ObjectHandle,
        blob: Vec<u8>,
        template: Vec<Attribute>,
    },
}

impl RawBaseline {
    fn new(
        config: &HsmConfig,
        key: &UserKeyRef,
        threads: NonZeroUsize,
    ) -> Result<RawBaseline, HsmError> {
        let pkcs11 = module::load(&config.module)?;
        let slot = module::find_token(&pkcs11, &config.token)?;
        let digest = Digest::new(HashAlgorithm::Sha256, DIGEST.to_vec())?;
        let request = SignRequest::new(key.algorithm(), scheme_for(key.algorithm()), &digest)?;
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
                blob: blob.clone(),
                template: unwrap_template(key.algorithm()),
            },
        };
        Ok(RawBaseline {
            sessions,
            request,
            target,
        })
    }

    /// Every thread signs until `duration` has passed.
    fn run(&mut self, duration: Duration) -> Result<Throughput, HsmError> {
        let operations = AtomicU64::new(0);
        let start_line = Barrier::new(self.sessions.len() + 1);
        let (target, request) = (&self.target, &self.request);
        let (start, results) = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .sessions
                .iter_mut()
                .map(|session| {
                    let (operations, start_line) = (&operations, &start_line);
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
                                    let handle = session.unwrap_key(
                                        &wrap_mechanism(),
                                        *kek,
                                        blob,
                                        template,
                                    )?;
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
            let results: Vec<_> = threads
                .into_iter()
                .map(|t| {
                    t.join()
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

/// An [`Hsm`] with `threads` workers and no wrapped-key cache, and the requests to keep it busy.
struct AdapterLoad {
    hsm: Arc<Hsm>,
    key: UserKeyRef,
    digest: Digest,
    in_flight: usize,
}

impl AdapterLoad {
    async fn open(
        config: &HsmConfig,
        key: &UserKeyRef,
        threads: NonZeroUsize,
    ) -> Result<AdapterLoad, HsmError> {
        let config = config
            .clone()
            .with_workers(threads)
            .with_wrapped_key_cache(0);
        let hsm = Hsm::open(config).await?;
        let digest = Digest::new(HashAlgorithm::Sha256, DIGEST.to_vec())?;
        // One signature first: checks the key's policy and fails fast on a broken setup.
        hsm.sign(key, scheme_for(key.algorithm()), &digest).await?;
        Ok(AdapterLoad {
            hsm: Arc::new(hsm),
            key: key.clone(),
            digest,
            in_flight: threads.get() * IN_FLIGHT_PER_WORKER,
        })
    }

    /// Keeps the requests in flight until `duration` has passed.
    async fn run(&self, duration: Duration) -> Result<Throughput, HsmError> {
        let (hsm, key, digest) = (Arc::clone(&self.hsm), self.key.clone(), self.digest.clone());
        drive(hsm, key, digest, self.in_flight, duration).await
    }

    async fn close(self) {
        if let Ok(hsm) = Arc::try_unwrap(self.hsm) {
            hsm.shutdown().await;
        }
    }
}

/// Keeps `in_flight` signatures outstanding until `duration` has passed.
async fn drive(
    hsm: Arc<Hsm>,
    key: UserKeyRef,
    digest: Digest,
    in_flight: usize,
    duration: Duration,
) -> Result<Throughput, HsmError> {
    let scheme = scheme_for(key.algorithm());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
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
    Ok(Throughput {
        operations,
        elapsed: start.elapsed(),
    })
}
