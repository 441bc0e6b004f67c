//! HSM worker threads, each owning one logged-in session, fed from two queues (lanes).
//!
//! PKCS#11 never runs on an async runtime thread: the async API (`hsm.rs`) turns each call into a
//! [`Job`], pushes it onto one of two bounded multi-consumer queues, and awaits a oneshot reply.
//! Any idle worker takes the next job, so a slow job (RSA key generation) does not hold up the
//! others.
//!
//! The two lanes ([`Lane`]): user signing and what a user waits for go to [`Lane::Signing`]; CA,
//! OCSP, CRL and audit-checkpoint signatures go to [`Lane::Background`]. A worker always takes
//! from the signing lane first, and at most `background_workers` workers (by default all but
//! one) run background jobs at a time, so that a flood of background work (the CA listener is
//! reachable without authentication) can neither fill the signing lane, which has its own bound,
//! nor keep every worker busy: a user signature waits at most for the job a free worker is
//! finishing.
//!
//! Finished replies go back in batches through a dispatcher task on the caller's runtime
//! ([`dispatch`]), so that one cross-thread wake-up carries many replies.
//!
//! Failure handling: when a job fails because the session or the login is gone
//! (`CKR_SESSION_HANDLE_INVALID`, `CKR_USER_NOT_LOGGED_IN`, ...), the worker opens a new session,
//! logs in again, finds the keys' handles again, and retries the job once if it is idempotent.
//! Stale object handles (`CKR_OBJECT_HANDLE_INVALID`) get the same treatment minus the new
//! session. These rebuilds take the pool's `gate` exclusively, so no job is using a handle while
//! the handles change: a module that reuses handle numbers can never have a job sign with a
//! different key than the one it looked up.

use std::fmt;
use std::num::NonZeroUsize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use cryptoki::context::Pkcs11;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use lru::LruCache;
use pkcs11_arrays::Arrays;
use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::affinity;
use crate::config::HsmConfig;
use crate::directory::Directory;
use crate::error::{HsmError, Recovery, Role};
use crate::module;

/// State shared by the workers of one [`crate::Hsm`].
pub(crate) struct Shared {
    pub(crate) pkcs11: Pkcs11,
    /// The array attributes (the KEK's templates) that cryptoki cannot pass.
    pub(crate) arrays: Arc<Arrays>,
    pub(crate) slot: Slot,
    pin: SecretString,
    /// Held shared by every running job, exclusively while handles change (recovery,
    /// provisioning).
    gate: RwLock<()>,
    /// Bumped whenever the directory is rebuilt; workers then forget their cached handles.
    epoch: AtomicU64,
    /// Bumped when a worker finds its session gone; the others then replace theirs too, since
    /// what lost one session (C_Finalize, a removed token) usually lost them all.
    sessions_lost: AtomicU64,
    directory: RwLock<Directory>,
    /// Signatures with a wrapped key whose unwrapped copy the worker had cached.
    pub(crate) key_cache_hits: AtomicU64,
    /// Signatures with a wrapped key that had to unwrap it (with the cache on).
    pub(crate) key_cache_misses: AtomicU64,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("slot", &self.slot)
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn pin(&self) -> &SecretString {
        &self.pin
    }

    pub(crate) fn directory(&self) -> RwLockReadGuard<'_, Directory> {
        // The directory is replaced or changed one entry at a time; a panic while the lock
        // was held cannot leave it half-written.
        self.directory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn directory_mut(&self) -> RwLockWriteGuard<'_, Directory> {
        self.directory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no job runs and keeps new jobs out until the guard is dropped.
    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn shared_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Installs a freshly loaded directory. Call with [`Shared::exclusive`] held.
    pub(crate) fn replace_directory(&self, directory: Directory) {
        *self.directory_mut() = directory;
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// A wrapped key unwrapped into a session object of one worker.
#[derive(Debug)]
pub(crate) struct CachedKey {
    pub(crate) handle: ObjectHandle,
}

/// What a worker owns: its session and its cache of unwrapped keys.
pub(crate) struct WorkerCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) session: Session,
    seen_epoch: u64,
    seen_sessions_lost: u64,
    /// Unwrapped keys by wrapped blob; `None` when the cache is disabled.
    pub(crate) cache: Option<LruCache<Box<[u8]>, CachedKey>>,
    /// Algorithms (bit `1 << code`) whose unwrapped copies this session has checked against the
    /// policy; see `WorkerCtx::check_unwrapped`.
    pub(crate) unwraps_checked: u8,
}

impl fmt::Debug for WorkerCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerCtx")
            .field("session", &self.session)
            .field("seen_epoch", &self.seen_epoch)
            .field("cached_keys", &self.cache.as_ref().map(LruCache::len))
            .finish_non_exhaustive()
    }
}

impl WorkerCtx {
    fn new(shared: Arc<Shared>, session: Session, cache_size: usize) -> Self {
        let seen_epoch = shared.epoch();
        let seen_sessions_lost = shared.sessions_lost.load(Ordering::Acquire);
        WorkerCtx {
            shared,
            session,
            seen_epoch,
            seen_sessions_lost,
            cache: NonZeroUsize::new(cache_size).map(LruCache::new),
            unwraps_checked: 0,
        }
    }

    /// Catches up with the other workers' recoveries: replaces this worker's session if another
    /// worker lost its own, and forgets cached handles if the directory was rebuilt (the session
    /// objects behind them died with the login or session that made the handles stale).
    fn sync_epoch(&mut self) {
        let sessions_lost = self.shared.sessions_lost.load(Ordering::Acquire);
        if sessions_lost != self.seen_sessions_lost {
            self.seen_sessions_lost = sessions_lost;
            self.replace_session(Recovery::SessionLost);
        }
        let epoch = self.shared.epoch();
        if epoch != self.seen_epoch {
            if let Some(cache) = &mut self.cache {
                cache.clear();
            }
            self.unwraps_checked = 0;
            self.seen_epoch = epoch;
        }
    }

    /// Opens and logs in a new session in place of the current one. Returns whether it worked.
    fn replace_session(&mut self, recovery: Recovery) -> bool {
        // Open the new session before the old one closes, so that the application never drops
        // to zero sessions (which would invalidate every handle again).
        let shared = &self.shared;
        match module::open_user_session(&shared.pkcs11, shared.slot, shared.pin()) {
            Ok(session) => {
                // Cached unwrapped keys were objects of the old session.
                if let Some(cache) = &mut self.cache {
                    cache.clear();
                }
                self.unwraps_checked = 0;
                let old = std::mem::replace(&mut self.session, session);
                if recovery == Recovery::SessionLost {
                    // Closing a lost session's handle could close a session that now carries
                    // the same number (after C_Finalize and C_Initialize, numbering starts
                    // again): drop the handle without calling C_CloseSession. If the session
                    // did survive, the module keeps it open until the process ends.
                    std::mem::forget(old);
                } else if let Err(err) = old.close() {
                    tracing::debug!(error = %HsmError::from(err), "closing the old session");
                }
                tracing::warn!(?recovery, "HSM session re-opened");
                true
            }
            Err(err) => {
                tracing::error!(error = %err, "could not re-open the HSM session");
                false
            }
        }
    }

    /// Brings the session (and the handles) back after a failure seen at `epoch_at_failure`.
    fn recover(&mut self, recovery: Recovery, epoch_at_failure: u64) {
        let shared = Arc::clone(&self.shared);
        let _exclusive = shared.exclusive();
        // Stale handles usually mean the application was logged out (and maybe in again), so
        // log in first: keys found while logged out would miss every private object. If the
        // session itself is gone, that login fails and a new session is opened instead.
        let recovery = match recovery {
            Recovery::Handles => match module::login(&self.session, Role::User, shared.pin()) {
                Ok(()) => Recovery::Handles,
                Err(err) => match err.recovery() {
                    Some(Recovery::SessionLost) => Recovery::SessionLost,
                    _ => Recovery::Session,
                },
            },
            other => other,
        };
        if recovery != Recovery::Handles && !self.replace_session(recovery) {
            return;
        }
        if recovery == Recovery::SessionLost {
            self.seen_sessions_lost = shared.sessions_lost.fetch_add(1, Ordering::AcqRel) + 1;
        }
        // Another worker may have found the keys again after our failure already.
        if shared.epoch() == epoch_at_failure {
            match Directory::load(&self.session) {
                Ok(directory) => shared.replace_directory(directory),
                Err(err) => tracing::error!(error = %err, "could not find the keys again"),
            }
        }
        self.sync_epoch();
    }
}

/// Whether a job may run a second time after a recovered session failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Idempotent: signing, MAC, encryption, decryption, random, find, read.
    Once,
    /// Not idempotent: key generation, destruction.
    Never,
}

/// How long a job may keep its worker busy, which decides whether replies may wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cost {
    /// A cryptographic operation: tens of microseconds to a few milliseconds (signature, MAC,
    /// AES-GCM, random bytes), about as long as the job before it of the same kind.
    Short,
    /// Key generation (RSA-3072 takes seconds), searching the token, destroying keys.
    Long,
}

/// What an attempt left to do.
enum Step {
    /// The result is ready to hand back (or the caller is gone).
    Done,
    /// The result (an error) is ready; the session or the handles need recovering.
    Failed(Recovery),
    /// Recover, then run the job again.
    Retry(Recovery),
}

/// A job's operation, its reply channel, and its result until it is handed back.
trait Task: Send {
    fn attempt(&mut self, ctx: &mut WorkerCtx, may_retry: bool) -> Step;
    fn reply(self: Box<Self>);
}

struct OpTask<T, F> {
    op: F,
    retry: Retry,
    reply: oneshot::Sender<Result<T, HsmError>>,
    result: Option<Result<T, HsmError>>,
}

impl<T, F> Task for OpTask<T, F>
where
    T: Send + 'static,
    F: FnMut(&mut WorkerCtx) -> Result<T, HsmError> + Send + 'static,
{
    fn attempt(&mut self, ctx: &mut WorkerCtx, may_retry: bool) -> Step {
        if self.reply.is_closed() {
            // The caller went away (its future was dropped): skip the work.
            return Step::Done;
        }
        let result = (self.op)(ctx);
        let recovery = result.as_ref().err().and_then(HsmError::recovery);
        match recovery {
            Some(recovery) if may_retry && self.retry == Retry::Once => Step::Retry(recovery),
            Some(recovery) => {
                self.result = Some(result);
                Step::Failed(recovery)
            }
            None => {
                self.result = Some(result);
                Step::Done
            }
        }
    }

    fn reply(self: Box<Self>) {
        if let Some(result) = self.result {
            // The caller may have gone in the meantime; the result is then dropped.
            let _ = self.reply.send(result);
        }
    }
}

/// One request for a worker.
pub(crate) struct Job {
    task: Box<dyn Task>,
    cost: Cost,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

/// Wraps `op` into a job and returns the receiver of its result.
pub(crate) fn job<T, F>(
    retry: Retry,
    cost: Cost,
    op: F,
) -> (Job, oneshot::Receiver<Result<T, HsmError>>)
where
    T: Send + 'static,
    F: FnMut(&mut WorkerCtx) -> Result<T, HsmError> + Send + 'static,
{
    let (reply, rx) = oneshot::channel();
    let task = OpTask {
        op,
        retry,
        reply,
        result: None,
    };
    (
        Job {
            task: Box::new(task),
            cost,
        },
        rx,
    )
}

/// Most replies a busy worker holds back before handing them over together.
const MAX_HELD_REPLIES: usize = 32;

/// Replies of finished jobs not yet handed back.
///
/// Handing a reply to an async task wakes a parked runtime thread: a futex call and, when that
/// thread's CPU is idle, an inter-processor interrupt, about 13 us on the reference VM, a fifth
/// of a P-256 signature. So while more short jobs wait in the queue, a worker holds replies back
/// and hands them over together (one wake-up for several): at most [`MAX_HELD_REPLIES`] of them,
/// and only while the next job, expected to take as long as the last one, would end within
/// the configured delay ([`HsmConfig::with_max_reply_delay`]) of the oldest reply (if the job
/// mix changes, the one job that proves longer than expected may overrun that). When the queue
/// is empty, before a long job, and before a recovery, it hands them over at once: an idle
/// adapter adds no latency. A batch goes to the dispatcher task in one message: handing the
/// replies out one by one from the worker would wake the caller's runtime about once per three
/// replies (measured), each wake preempting a worker.
struct HeldReplies {
    tasks: Vec<Box<dyn Task>>,
    oldest: Option<Instant>,
    max_delay: Duration,
    dispatcher: Option<Dispatcher>,
}

/// A task on the caller's async runtime that hands out batches of replies (see
/// [`Pool::start`]).
pub(crate) type Dispatcher = tokio::sync::mpsc::UnboundedSender<ReplyBatch>;

/// Finished jobs whose replies the dispatcher hands out.
pub(crate) struct ReplyBatch(Vec<Box<dyn Task>>);

/// Hands out every reply of each batch the workers send, from the caller's own runtime: one
/// cross-thread wake-up brings a whole batch, and the callers' tasks are then woken from their
/// runtime's own thread, which costs no system call. Ends when the pool stops.
pub(crate) async fn dispatch(mut batches: tokio::sync::mpsc::UnboundedReceiver<ReplyBatch>) {
    while let Some(ReplyBatch(batch)) = batches.recv().await {
        for task in batch {
            task.reply();
        }
    }
}

impl HeldReplies {
    fn new(max_delay: Duration, dispatcher: Option<Dispatcher>) -> Self {
        HeldReplies {
            tasks: Vec::with_capacity(MAX_HELD_REPLIES),
            oldest: None,
            max_delay,
            dispatcher,
        }
    }

    fn hold(&mut self, task: Box<dyn Task>) {
        self.oldest.get_or_insert_with(Instant::now);
        self.tasks.push(task);
    }

    /// Whether the replies must go now, given that the next job may take `next_job`.
    fn is_due(&self, next_job: Duration) -> bool {
        self.tasks.len() >= MAX_HELD_REPLIES
            || self
                .oldest
                .is_some_and(|t| t.elapsed() + next_job >= self.max_delay)
    }

    fn hand_over(&mut self) {
        self.oldest = None;
        if self.tasks.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.tasks, Vec::with_capacity(MAX_HELD_REPLIES));
        let batch = match &self.dispatcher {
            Some(dispatcher) => match dispatcher.send(ReplyBatch(batch)) {
                Ok(()) => return,
                // The runtime that ran the dispatcher has shut down: reply from here.
                Err(returned) => {
                    self.dispatcher = None;
                    returned.0.0
                }
            },
            None => batch,
        };
        for task in batch {
            task.reply();
        }
    }
}

/// Messages to one particular worker.
#[derive(Debug)]
pub(crate) enum Control {
    /// Destroy the unwrapped copy of this wrapped key, if cached, then acknowledge.
    Evict {
        blob: Arc<[u8]>,
        done: oneshot::Sender<()>,
    },
}

/// The queue a job waits in (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Lane {
    /// User signatures and the calls of the user-facing flows: served first.
    Signing,
    /// CA, OCSP, CRL and audit-checkpoint signatures: served when no signing job waits, by at
    /// most the configured number of workers at a time.
    Background,
}

/// The receiving side of both lanes, shared by the workers.
struct Lanes {
    signing: Receiver<Job>,
    background: Receiver<Job>,
    /// Workers running (or waiting for) a background job.
    background_running: Arc<AtomicUsize>,
    background_limit: usize,
}

/// How long a worker that may not take background work now waits on the signing lane before it
/// looks again. A background worker that finishes takes the next background job itself, so this
/// only bounds how long background work waits when the worker holding the permit went to a
/// signing job meanwhile; it also sets how often an idle worker without the permit wakes.
const BACKGROUND_RECHECK: Duration = Duration::from_millis(20);

/// A permit to run background work; returned when dropped.
struct BackgroundPermit(Arc<AtomicUsize>);

impl Drop for BackgroundPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lanes {
    /// A permit, unless `background_limit` workers hold one already.
    fn background_permit(&self) -> Option<BackgroundPermit> {
        self.background_running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < self.background_limit).then_some(running + 1)
            })
            .ok()
            .map(|_| BackgroundPermit(Arc::clone(&self.background_running)))
    }
}

/// What a worker does next.
enum Next {
    Job(Job, Option<BackgroundPermit>),
    Control(Control),
    /// Nothing came within [`BACKGROUND_RECHECK`]: look again.
    Again,
    /// The pool is stopping: finish what is queued and exit.
    Stop,
}

/// The worker threads of one [`crate::Hsm`].
#[derive(Debug)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
    signing: Sender<Job>,
    background: Sender<Job>,
    controls: Vec<Sender<Control>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Loads the module, logs in one session per worker, finds the keys, starts the workers.
    /// Blocking: call it off the async runtime.
    ///
    /// With a `dispatcher`, workers send finished replies there in batches; without one, they
    /// reply from their own thread.
    pub(crate) fn start(
        config: &HsmConfig,
        dispatcher: Option<Dispatcher>,
    ) -> Result<Pool, HsmError> {
        if !config.worker_cpus.is_empty() {
            let allowed = affinity::allowed_cpus().map_err(HsmError::Placement)?;
            if let Some(cpu) = config.worker_cpus.iter().find(|cpu| !allowed.contains(cpu)) {
                return Err(HsmError::InvalidInput(format!(
                    "CPU {cpu} for the HSM workers is not one this process may run on ({})",
                    affinity::describe(&allowed)
                )));
            }
        }
        let module::Module { pkcs11, arrays } = module::load(&config.module)?;
        let slot = module::find_token(&pkcs11, &config.token)?;
        let mut sessions = Vec::with_capacity(config.workers.get());
        for _ in 0..config.workers.get() {
            sessions.push(module::open_user_session(&pkcs11, slot, &config.pin)?);
        }
        let directory = match sessions.first() {
            Some(session) => Directory::load(session)?,
            None => Directory::default(),
        };
        let shared = Arc::new(Shared {
            pkcs11,
            arrays,
            slot,
            pin: config.pin.clone(),
            gate: RwLock::new(()),
            epoch: AtomicU64::new(0),
            sessions_lost: AtomicU64::new(0),
            key_cache_hits: AtomicU64::new(0),
            key_cache_misses: AtomicU64::new(0),
            directory: RwLock::new(directory),
        });
        let (signing, signing_queue) = crossbeam_channel::bounded(config.queue_capacity);
        let (background, background_queue) =
            crossbeam_channel::bounded(config.background_queue_capacity);
        let background_running = Arc::new(AtomicUsize::new(0));
        let background_limit = config.background_worker_limit();
        let max_reply_delay = config.max_reply_delay;
        let mut controls = Vec::with_capacity(sessions.len());
        let mut threads = Vec::with_capacity(sessions.len());
        let (placed_tx, placed_rx) = std::sync::mpsc::channel();
        for (i, session) in sessions.into_iter().enumerate() {
            let (control, control_queue) = crossbeam_channel::unbounded();
            let ctx = WorkerCtx::new(Arc::clone(&shared), session, config.wrapped_key_cache);
            let lanes = Lanes {
                signing: signing_queue.clone(),
                background: background_queue.clone(),
                background_running: Arc::clone(&background_running),
                background_limit,
            };
            let dispatcher = dispatcher.clone();
            let cpu = match config.worker_cpus.len() {
                0 => None,
                n => config.worker_cpus.get(i % n).copied(),
            };
            let placed = placed_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("hsm-worker-{i}"))
                .spawn(move || {
                    let pinned = cpu.map(affinity::pin_current_thread).transpose();
                    let failed = pinned.is_err();
                    let _ = placed.send(pinned.map(|_| ()));
                    if failed {
                        return;
                    }
                    let held = HeldReplies::new(max_reply_delay, dispatcher);
                    worker_loop(ctx, &lanes, control_queue, held)
                })
                .map_err(HsmError::WorkerSpawn)?;
            controls.push(control);
            threads.push(thread);
        }
        // Opening returns once every worker is on its CPU. On an error, dropping the queues
        // stops the workers already running.
        for _ in 0..threads.len() {
            match placed_rx.recv() {
                Ok(placed) => placed.map_err(HsmError::Placement)?,
                Err(_) => return Err(HsmError::Closed),
            }
        }
        Ok(Pool {
            shared,
            signing,
            background,
            controls,
            threads,
        })
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.threads.len()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Queues a job in `lane`; fails at once when that lane is full rather than blocking the
    /// caller.
    pub(crate) fn submit(&self, lane: Lane, job: Job) -> Result<(), HsmError> {
        let queue = match lane {
            Lane::Signing => &self.signing,
            Lane::Background => &self.background,
        };
        queue.try_send(job).map_err(|err| match err {
            TrySendError::Full(_) => HsmError::Busy,
            TrySendError::Disconnected(_) => HsmError::Closed,
        })
    }

    /// How many jobs wait in `lane`.
    pub(crate) fn queued(&self, lane: Lane) -> usize {
        match lane {
            Lane::Signing => self.signing.len(),
            Lane::Background => self.background.len(),
        }
    }

    /// Asks every worker to drop its unwrapped copy of `blob`; the receivers fire when done.
    pub(crate) fn evict_everywhere(&self, blob: &[u8]) -> Vec<oneshot::Receiver<()>> {
        let blob: Arc<[u8]> = Arc::from(blob);
        self.controls
            .iter()
            .filter_map(|control| {
                let (done, rx) = oneshot::channel();
                control
                    .send(Control::Evict {
                        blob: Arc::clone(&blob),
                        done,
                    })
                    .ok()
                    .map(|()| rx)
            })
            .collect()
    }

    /// Stops taking jobs; the workers finish what is queued, close their sessions and exit.
    /// Returns the threads to join.
    pub(crate) fn stop(self) -> Vec<JoinHandle<()>> {
        drop(self.signing);
        drop(self.background);
        drop(self.controls);
        self.threads
    }
}

fn worker_loop(
    mut ctx: WorkerCtx,
    lanes: &Lanes,
    control: Receiver<Control>,
    mut held: HeldReplies,
) {
    // One reference for the loop, so that jobs do not touch the shared reference count.
    let shared = Arc::clone(&ctx.shared);
    loop {
        let next = match control.try_recv() {
            Ok(message) => Next::Control(message),
            Err(_) => match take_job(lanes) {
                Some((job, permit)) => Next::Job(job, permit),
                None => {
                    // Nothing waiting: hand back what is done before sleeping.
                    held.hand_over();
                    wait(lanes, &control)
                }
            },
        };
        match next {
            Next::Job(job, permit) => {
                if job.cost == Cost::Long {
                    held.hand_over();
                }
                let started = Instant::now();
                run_job(&shared, &mut ctx, job, &mut held);
                drop(permit);
                if held.is_due(started.elapsed()) {
                    held.hand_over();
                }
            }
            Next::Control(message) => run_control(&shared, &mut ctx, message),
            Next::Again => {}
            Next::Stop => break,
        }
    }
    // Stopping: the queues are closed, what is still queued is run (any worker may, past the
    // background limit: nothing new can arrive).
    while let Ok(job) = lanes
        .signing
        .try_recv()
        .or_else(|_| lanes.background.try_recv())
    {
        run_job(&shared, &mut ctx, job, &mut held);
    }
    held.hand_over();
    // Dropping the context closes the session, which destroys its session objects.
}

/// The next queued job without waiting: the signing lane first, then the background lane if
/// this worker may take background work now.
fn take_job(lanes: &Lanes) -> Option<(Job, Option<BackgroundPermit>)> {
    if let Ok(job) = lanes.signing.try_recv() {
        return Some((job, None));
    }
    let permit = lanes.background_permit()?;
    match lanes.background.try_recv() {
        Ok(job) => Some((job, Some(permit))),
        Err(_) => None,
    }
}

/// Sleeps until a job or a control message comes. A worker that may take background work waits
/// on both lanes (holding the permit while it waits, so that the limit counts it); one that may
/// not waits on the signing lane only, looking again every [`BACKGROUND_RECHECK`].
fn wait(lanes: &Lanes, control: &Receiver<Control>) -> Next {
    match lanes.background_permit() {
        Some(permit) => crossbeam_channel::select! {
            recv(lanes.signing) -> job => match job {
                Ok(job) => Next::Job(job, None),
                Err(_) => Next::Stop,
            },
            recv(lanes.background) -> job => match job {
                Ok(job) => Next::Job(job, Some(permit)),
                Err(_) => Next::Stop,
            },
            recv(control) -> message => match message {
                Ok(message) => Next::Control(message),
                Err(_) => Next::Stop,
            },
        },
        None => crossbeam_channel::select! {
            recv(lanes.signing) -> job => match job {
                Ok(job) => Next::Job(job, None),
                Err(_) => Next::Stop,
            },
            recv(control) -> message => match message {
                Ok(message) => Next::Control(message),
                Err(_) => Next::Stop,
            },
            // A closed lane is always ready above, so stopping never waits here.
            default(BACKGROUND_RECHECK) => Next::Again,
        },
    }
}

fn run_job(shared: &Shared, ctx: &mut WorkerCtx, job: Job, held: &mut HeldReplies) {
    let mut task = job.task;
    let mut may_retry = true;
    loop {
        let (step, epoch_at_start) = {
            let _gate = shared.shared_gate();
            ctx.sync_epoch();
            let epoch = ctx.seen_epoch;
            let step = match catch_unwind(AssertUnwindSafe(|| task.attempt(ctx, may_retry))) {
                Ok(step) => step,
                Err(_) => {
                    // Dropping the task drops its reply sender: the caller gets an error.
                    tracing::error!("an HSM job panicked");
                    return;
                }
            };
            (step, epoch)
        };
        match step {
            Step::Done => {
                held.hold(task);
                return;
            }
            Step::Failed(recovery) => {
                held.hold(task);
                // Recovery waits for the other workers: hand back the finished work first.
                held.hand_over();
                ctx.recover(recovery, epoch_at_start);
                return;
            }
            Step::Retry(recovery) => {
                tracing::warn!(
                    ?recovery,
                    "HSM operation failed on a lost session; retrying once"
                );
                held.hand_over();
                ctx.recover(recovery, epoch_at_start);
                may_retry = false;
            }
        }
    }
}

fn run_control(shared: &Shared, ctx: &mut WorkerCtx, message: Control) {
    match message {
        Control::Evict { blob, done } => {
            let _gate = shared.shared_gate();
            ctx.sync_epoch();
            ctx.evict(&blob);
            let _ = done.send(());
        }
    }
}
