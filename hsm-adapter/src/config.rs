//! How to reach the token: module path, token selector, PIN, and the size of the worker pool.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

/// Path of the SoftHSM module on Debian, the development default.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Which token to use. Never a slot index: slot numbers change when tokens are added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenSelector {
    /// The token's label (CKA_LABEL of the token, up to 32 bytes).
    Label(String),
    /// The token's serial number.
    Serial(String),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(label) => write!(f, "label {label:?}"),
            TokenSelector::Serial(serial) => write!(f, "serial number {serial:?}"),
        }
    }
}

/// Configuration of an [`crate::Hsm`]. Holds the user PIN, so its `Debug` is written by hand and
/// shows no secret.
#[derive(Clone)]
pub struct HsmConfig {
    pub(crate) module: PathBuf,
    pub(crate) token: TokenSelector,
    pub(crate) pin: SecretString,
    pub(crate) workers: NonZeroUsize,
    pub(crate) wrapped_key_cache: usize,
    pub(crate) queue_capacity: usize,
    pub(crate) background_queue_capacity: usize,
    pub(crate) background_workers: Option<NonZeroUsize>,
    pub(crate) max_reply_delay: Duration,
    pub(crate) worker_cpus: Vec<usize>,
}

impl HsmConfig {
    /// Default number of HSM worker threads (one per core on the reference machine).
    pub const DEFAULT_WORKERS: usize = 2;
    /// Default number of unwrapped keys each worker keeps.
    pub const DEFAULT_WRAPPED_KEY_CACHE: usize = 64;
    /// Default number of requests that may wait for a worker in the signing lane.
    pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
    /// Default number of requests that may wait in the background lane (CA, OCSP, CRL, audit
    /// checkpoints): a few hundred milliseconds of CA signatures, beyond which callers are told
    /// [`crate::HsmError::Busy`] at once.
    pub const DEFAULT_BACKGROUND_QUEUE_CAPACITY: usize = 256;
    /// Default longest time a busy worker holds a finished reply back.
    pub const DEFAULT_MAX_REPLY_DELAY: Duration = Duration::from_millis(2);

    /// A configuration with the default pool size.
    pub fn new(module: impl Into<PathBuf>, token: TokenSelector, pin: SecretString) -> Self {
        HsmConfig {
            module: module.into(),
            token,
            pin,
            workers: NonZeroUsize::MIN.saturating_add(Self::DEFAULT_WORKERS - 1),
            wrapped_key_cache: Self::DEFAULT_WRAPPED_KEY_CACHE,
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            background_queue_capacity: Self::DEFAULT_BACKGROUND_QUEUE_CAPACITY,
            background_workers: None,
            max_reply_delay: Self::DEFAULT_MAX_REPLY_DELAY,
            worker_cpus: Vec::new(),
        }
    }

    /// Number of HSM worker threads, each with one logged-in session.
    pub fn with_workers(mut self, workers: NonZeroUsize) -> Self {
        self.workers = workers;
        self
    }

    /// Number of unwrapped wrapped keys each worker keeps as session objects (0 disables the
    /// cache: every signature then unwraps, signs and destroys).
    pub fn with_wrapped_key_cache(mut self, entries: usize) -> Self {
        self.wrapped_key_cache = entries;
        self
    }

    /// Number of requests that may wait in the signing lane ([`crate::Lane::Signing`]) before
    /// callers get [`crate::HsmError::Busy`].
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Number of requests that may wait in the background lane ([`crate::Lane::Background`])
    /// before its callers get [`crate::HsmError::Busy`]. It has its own bound: background work
    /// can never take the signing lane's room.
    pub fn with_background_queue_capacity(mut self, capacity: usize) -> Self {
        self.background_queue_capacity = capacity.max(1);
        self
    }

    /// At most this many workers run background jobs at a time (capped at the number of
    /// workers). The default is every worker but one (one when there is one worker), so that a
    /// worker is always free for a user signature. Workers always take the signing lane first.
    pub fn with_background_workers(mut self, workers: NonZeroUsize) -> Self {
        self.background_workers = Some(workers);
        self
    }

    /// How many workers may run background jobs at once.
    pub(crate) fn background_worker_limit(&self) -> usize {
        let workers = self.workers.get();
        match self.background_workers {
            Some(limit) => limit.get().min(workers),
            None => workers.saturating_sub(1).max(1),
        }
    }

    /// How long a busy worker may hold finished replies back to hand several over with one
    /// wake-up of the async runtime (which costs about as much as a fifth of a P-256
    /// signature on a VM). Replies are held only while more jobs wait in the queue, so an idle
    /// adapter adds no latency; under load it trades up to this much latency for throughput.
    /// `Duration::ZERO` hands every reply over at once.
    pub fn with_max_reply_delay(mut self, delay: Duration) -> Self {
        self.max_reply_delay = delay;
        self
    }

    /// Pins worker `i` to CPU `cpus[i % cpus.len()]` (numbers as in `/proc/cpuinfo`); empty, the
    /// default, lets the workers float. Each CPU must be one the process may run on
    /// ([`crate::allowed_cpus`]), or opening fails. Worth it where the HSM's work is CPU work
    /// (a software token) and the workers share the cores with the async runtime.
    pub fn with_worker_cpus(mut self, cpus: Vec<usize>) -> Self {
        self.worker_cpus = cpus;
        self
    }

    /// The module path.
    pub fn module(&self) -> &std::path::Path {
        &self.module
    }

    /// The token selector.
    pub fn token(&self) -> &TokenSelector {
        &self.token
    }

    /// The number of worker threads.
    pub fn workers(&self) -> NonZeroUsize {
        self.workers
    }

    /// The per-worker wrapped-key cache size.
    pub fn wrapped_key_cache(&self) -> usize {
        self.wrapped_key_cache
    }
}

impl fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("pin", &"[REDACTED]")
            .field("workers", &self.workers)
            .field("wrapped_key_cache", &self.wrapped_key_cache)
            .field("queue_capacity", &self.queue_capacity)
            .field("background_queue_capacity", &self.background_queue_capacity)
            .field("background_workers", &self.background_workers)
            .field("max_reply_delay", &self.max_reply_delay)
            .field("worker_cpus", &self.worker_cpus)
            .finish()
    }
}
