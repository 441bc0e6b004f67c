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
//! That caller needs the CPU too, and with as many workers as cores (two on the reference VM)
//! it can only have it by taking a core from a worker. Under the default policy each of its
//! wake-ups preempts a worker at once, often inside SoftHSM while it holds one of the module's
//! locks, so that the other worker then sleeps on that lock as well: up to 5% of the adapter's
//! throughput went there, and none of it to the adapter's own work. By default the caller
//! therefore runs under `SCHED_BATCH` ([`LoadScheduling::Batch`]): the same nice value and fair
//! share of the CPU, but its wake-ups wait for a worker to give way (to sleep on a SoftHSM lock,
//! or at the end of its time slice) instead of cutting in. Its work is still done on the same
//! cores within the measured time. [`LoadScheduling::Normal`] measures the default policy.
//!
//! Raw thread `i` and worker `i` can be pinned to the same CPU ([`Placement::cpus`]; `bench
//! hsm` does so by default), so that both sides run on the same cores and neither loses its
//! caches to a move. The load generator is not pinned.
//!
//! The two alternate in blocks of four short rounds (baseline, adapter, adapter, baseline) so
//! that a machine whose speed drifts (a shared VM does) slows both alike within a block, and the
//! ratio reported is the median of the blocks' ratios ([`Comparison::ratio`]), so that a burst of
//! host noise that falls on one side of one block moves it no more than any other block.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::affinity;
use crate::bench_flow::{find_one, release_and_join};
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
use crate::templates::{CopyUse, unwrap_template, wrap_mechanism};

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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Comparison {
    /// Raw cryptoki.
    pub raw: Throughput,
    /// The adapter's async API.
    pub adapter: Throughput,
    /// The adapter's throughput over the baseline's in each block of four rounds (raw, adapter,
    /// adapter, raw).
    pub block_ratios: Vec<f64>,
}

impl Comparison {
    /// Adapter throughput over raw throughput, over the whole run.
    pub fn overall_ratio(&self) -> f64 {
        let raw = self.raw.per_second();
        if raw > 0.0 {
            self.adapter.per_second() / raw
        } else {
            0.0
        }
    }

    /// The median of the blocks' ratios: the figure the target applies to. A shared VM's
    /// speed jumps by a quarter for a second or two at a time; the overall ratio moves with
    /// whichever side such a burst happens to fall on, the median of the blocks does not.
    pub fn ratio(&self) -> f64 {
        let mut ratios = self.block_ratios.clone();
        ratios.sort_by(f64::total_cmp);
        match ratios.len() {
            0 => self.overall_ratio(),
            n if n % 2 == 1 => ratios[n / 2],
            n => (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0,
        }
    }
}

/// How the thread that sends the adapter its requests is scheduled; see the module's
/// documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadScheduling {
    /// `SCHED_BATCH` at the thread's nice value: a fair share of the CPU, but a wake-up does not
    /// preempt a running worker.
    #[default]
    Batch,
    /// The thread as it is (normally `SCHED_OTHER`, under which every wake-up may preempt a
    /// worker).
    Normal,
}

impl LoadScheduling {
    /// Applies the policy to the calling thread (and to the threads it starts later), keeping
    /// its nice value.
    pub fn apply(self) -> Result<(), HsmError> {
        use thread_priority::{
            Error, NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue,
            ThreadSchedulePolicy, set_thread_priority_and_policy, thread_native_id,
        };
        let policy = match self {
            LoadScheduling::Batch => {
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch)
            }
            LoadScheduling::Normal => return Ok(()),
        };
        // For the normal policies the crate also sets the nice value, from a priority in
        // 0..=99: pick the priority it turns into the thread's present nice value.
        let nice = rustix::process::getpriority_process(None)
            .map_err(|errno| HsmError::Placement(errno.into()))?;
        let priority = (0..=99)
            .filter_map(|p| ThreadPriorityValue::try_from(p).ok())
            .map(ThreadPriority::Crossplatform)
            .find(|priority| priority.to_posix(policy).ok() == Some(nice))
            .ok_or_else(|| {
                HsmError::Placement(std::io::Error::other(format!(
                    "SCHED_BATCH cannot keep nice value {nice}; use the normal scheduling"
                )))
            })?;
        set_thread_priority_and_policy(thread_native_id(), priority, policy).map_err(|err| {
            HsmError::Placement(match err {
                Error::OS(errno) => std::io::Error::from_raw_os_error(errno),
                other => std::io::Error::other(format!("SCHED_BATCH: {other:?}")),
            })
        })
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
/// `duration`: a round of the baseline in [`compare`], and the baseline against which a whole
/// pipeline built on the HSM (the daemon's signing flow) is compared.
/// Thread `i` runs on `cpus[i % cpus.len()]`; with no CPUs the threads float.
pub async fn raw(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    duration: Duration,
    cpus: &[usize],
) -> Result<Throughput, HsmError> {
    let (config, key, cpus) = (config.clone(), key.clone(), cpus.to_vec());
    run_blocking("hsm-bench-raw", move || {
        RawBaseline::new(&config, &key, threads)?.run(duration, &cpus)
    })
    .await
}

/// Where the benchmark's threads run. The default schedules the load generator under
/// `SCHED_BATCH` and pins nothing; `bench hsm` pins by default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// How the thread that sends the adapter its requests is scheduled.
    pub load: LoadScheduling,
    /// Raw thread `i` and adapter worker `i` both run on `cpus[i % cpus.len()]`, so that both
    /// sides get the same cores and neither loses its caches to a move; empty, they float.
    pub cpus: Vec<usize>,
}

/// Measures signing with `key` for about `duration` each through raw cryptoki and through the
/// adapter, both with `threads` sessions, their threads placed by `placement`. Call it inside a
/// tokio runtime.
pub async fn compare(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    duration: Duration,
    placement: &Placement,
) -> Result<Comparison, HsmError> {
    let cpus = &placement.cpus;
    let config = &config.clone().with_worker_cpus(cpus.clone());
    // Blocks of four rounds in the order raw, adapter, adapter, raw: a linear drift within a
    // block cancels out.
    let blocks = (duration.as_nanos() / (2 * ROUND.as_nanos())).max(1) as u32;
    let round = duration / (2 * blocks);
    let mut comparison = Comparison::default();
    for _ in 0..blocks {
        // Each round sets up its side afresh and tears it down after, so that neither side
        // measures with the other's sessions and threads standing by (on SoftHSM, idle sessions
        // of the other side cost the measured one up to a quarter of its throughput).
        let mut block = Comparison::default();
        block.raw.add(raw(config, key, threads, round, cpus).await?);
        block
            .adapter
            .add(adapter_round(config, key, threads, round, placement.load).await?);
        block
            .adapter
            .add(adapter_round(config, key, threads, round, placement.load).await?);
        block.raw.add(raw(config, key, threads, round, cpus).await?);
        comparison.raw.add(block.raw);
        comparison.adapter.add(block.adapter);
        comparison.block_ratios.push(block.overall_ratio());
    }
    Ok(comparison)
}

/// One round of the adapter: opened, driven and closed on the caller's runtime, a
/// single-threaded one on a thread of its own, the leanest async caller there is.
async fn adapter_round(
    config: &HsmConfig,
    key: &UserKeyRef,
    threads: NonZeroUsize,
    round: Duration,
    load: LoadScheduling,
) -> Result<Throughput, HsmError> {
    let (config, key) = (config.clone(), key.clone());
    run_blocking("hsm-bench-load", move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(HsmError::WorkerSpawn)?
            .block_on(async move {
                let adapter = AdapterLoad::open(&config, &key, threads).await?;
                // After the workers started: threads inherit their creator's policy.
                let measured = match load.apply() {
                    Ok(()) => adapter.run(round).await,
                    Err(err) => Err(err),
                };
                adapter.close().await;
                measured
            })
    })
    .await
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
        let pkcs11 = module::load(&config.module)?.pkcs11;
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
                template: unwrap_template(key.algorithm(), CopyUse::Sign),
            },
        };
        Ok(RawBaseline {
            sessions,
            request,
            target,
        })
    }

    /// Every thread signs until `duration` has passed, thread `i` on `cpus[i % cpus.len()]`.
    fn run(&mut self, duration: Duration, cpus: &[usize]) -> Result<Throughput, HsmError> {
        let operations = AtomicU64::new(0);
        let start_line = Barrier::new(self.sessions.len() + 1);
        let (target, request) = (&self.target, &self.request);
        let (start, results) = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .sessions
                .iter_mut()
                .enumerate()
                .map(|(i, session)| {
                    let (operations, start_line) = (&operations, &start_line);
                    let cpu = cpus.get(i % cpus.len().max(1)).copied();
                    scope.spawn(move || -> Result<Instant, HsmError> {
                        let (mechanism, data) = (request.mechanism(), request.data());
                        let pinned = cpu.map(affinity::pin_current_thread).transpose();
                        start_line.wait();
                        pinned.map_err(HsmError::Placement)?;
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
            release_and_join(&start_line, threads)
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
