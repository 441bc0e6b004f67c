//! The log directory, its group-commit writer and its readers.
//!
//! Layout of the directory, which the log owns:
//!
//! - `audit.log`: the records, one line each, `\n`-terminated;
//! - `checkpoint.json`: the latest signed checkpoint, replaced atomically;
//! - `lock`: held with an exclusive advisory lock (`flock`) while a log is open, so that two
//!   writers never share the file.
//!
//! Appends are durable when they return: one writer thread takes everything queued, writes it
//! with one `pwrite` and one `fdatasync`, then publishes the records and answers every appender
//! (group commit). Readers see only what has been made durable.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Read, Write as _};
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::{AuditPublicKey, Checkpoint, CheckpointSigner, Origin};
use crate::error::AuditError;
use crate::merkle::{MerkleTree, TreeHash, leaf_hash};
use crate::record::{AuditEvent, MAX_RECORD_LEN, PreparedEvent, check_line};
use crate::time::{Clock, SystemClock, Timestamp};

/// The records file in the log directory.
pub const LOG_FILE: &str = "audit.log";
/// The latest checkpoint in the log directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
const CHECKPOINT_TEMP_FILE: &str = "checkpoint.json.tmp";
const LOCK_FILE: &str = "lock";

/// Appends waiting for the writer; beyond this, `append` waits for room (back-pressure).
const QUEUE_CAPACITY: usize = 4096;
/// At most this many records, and about this many bytes, go into one write and one fsync.
const MAX_BATCH: usize = 4096;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How to open an [`AuditLog`].
#[derive(Clone, Debug)]
pub struct AuditLogConfig {
    origin: Origin,
    clock: Arc<dyn Clock>,
    checkpoint_key: Option<AuditPublicKey>,
    #[cfg(feature = "bench")]
    fsync_per_append: bool,
}

impl AuditLogConfig {
    /// A log named `origin` in its checkpoints, on the system clock, without a checkpoint key.
    pub fn new(origin: Origin) -> Self {
        Self {
            origin,
            clock: Arc::new(SystemClock),
            checkpoint_key: None,
            #[cfg(feature = "bench")]
            fsync_per_append: false,
        }
    }

    /// The clock that times records and checkpoints.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The audit public key. With it, the stored checkpoint's signature is checked at open and
    /// every new checkpoint's signature is checked before it is stored or returned (catching a
    /// signer with the wrong key). The daemon should always set it.
    #[must_use]
    pub fn with_checkpoint_key(mut self, key: AuditPublicKey) -> Self {
        self.checkpoint_key = Some(key);
        self
    }

    /// Benchmark baseline: write and fsync each record on its own instead of group commit.
    #[cfg(feature = "bench")]
    #[must_use]
    pub fn with_fsync_per_append(mut self, fsync_per_append: bool) -> Self {
        self.fsync_per_append = fsync_per_append;
        self
    }
}

/// What an append returns once its record is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppendReceipt {
    /// The record's index (0-based, contiguous).
    pub index: u64,
    /// SHA-256(0x00 || line).
    pub leaf_hash: TreeHash,
    /// The time written into the record.
    pub time: Timestamp,
    /// The tree size once the record's batch was durable (at least `index + 1`); an inclusion
    /// proof for this size exists from now on.
    pub tree_size: u64,
}

/// Counters since the log was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditStats {
    /// Records in the log (durable).
    pub tree_size: u64,
    /// Records appended since open.
    pub appends: u64,
    /// `fdatasync` calls on the records file for appends since open; with group commit,
    /// usually far fewer than `appends`.
    pub fsyncs: u64,
}

/// The audit log: durable appends with group commit, reads, proofs and checkpoints.
///
/// Share it by `Arc`. Dropping it stops the writer once the queue is empty and releases the
/// directory lock; [`AuditLog::close`] does the same and waits for it.
#[derive(Debug)]
pub struct AuditLog {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Job>,
    writer: JoinHandle<()>,
    origin: Origin,
    clock: Arc<dyn Clock>,
    checkpoint_key: Option<AuditPublicKey>,
    /// Serialises checkpoint creation so that stored checkpoints only grow.
    checkpoint_lock: tokio::sync::Mutex<()>,
}

/// What the writer and the readers share.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    log_path: PathBuf,
    /// A read-only handle for positional reads of committed records.
    reader: File,
    state: RwLock<State>,
    latest_checkpoint: RwLock<Option<Checkpoint>>,
    tree_size: AtomicU64,
    appends: AtomicU64,
    fsyncs: AtomicU64,
    /// Test hook: the next write puts half its bytes in the file and then fails.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
}

/// The durable part of the log; changed only by the writer, after fsync.
#[derive(Debug)]
struct State {
    tree: MerkleTree,
    /// Byte offset of each record's line.
    offsets: Vec<u64>,
    /// End of the last durable record.
    end: u64,
    /// Set once a write or fsync failed; the log refuses appends until reopened.
    failure: Option<String>,
}

#[derive(Debug)]
struct Job {
    event: PreparedEvent,
    reply: oneshot::Sender<Result<AppendReceipt, AuditError>>,
}

impl AuditLog {
    /// Opens the log in `dir`, creating the directory and the files when missing.
    ///
    /// Reads every record, checks each (canonical form, contiguous index), rebuilds the tree,
    /// and checks it against the stored checkpoint (origin, signature when a key is configured,
    /// size and root). A torn last line (bytes after the last newline: a write that never
    /// completed, so never acknowledged) is cut off with a warning. Any other damage is an error
    /// naming the line and byte offset, and nothing is changed on disk.
    pub async fn open(dir: impl Into<PathBuf>, config: AuditLogConfig) -> Result<Self, AuditError> {
        let dir = dir.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(dir, config))
            .await
            .map_err(|error| AuditError::unavailable(format!("opening task failed: {error}")))?
    }

    fn open_blocking(dir: PathBuf, config: AuditLogConfig) -> Result<Self, AuditError> {
        ensure_dir(&dir)?;
        let lock = lock_dir(&dir)?;
        remove_if_exists(&dir.join(CHECKPOINT_TEMP_FILE))?;
        let log_path = dir.join(LOG_FILE);
        let file = open_log_file(&dir, &log_path)?;
        let scan = scan(&file, &log_path)?;
        let checkpoint = load_checkpoint(&dir, &config, &scan.tree)?;
        if scan.torn_bytes > 0 {
            tracing::warn!(
                path = %log_path.display(),
                bytes = scan.torn_bytes,
                offset = scan.end,
                "cutting a torn last line off the audit log (an append that never completed)"
            );
            file.set_len(scan.end).map_err(|error| {
                AuditError::io(format!("truncating {}", log_path.display()), error)
            })?;
        }
        // A writer killed between its write and its fsync leaves records in the page cache that
        // nobody acknowledged. Make them durable before anyone reads, proves or checkpoints them,
        // or an OS crash after a checkpoint would lose records the checkpoint covers.
        file.sync_all()
            .map_err(|error| AuditError::io(format!("syncing {}", log_path.display()), error))?;
        let reader = File::open(&log_path)
            .map_err(|error| AuditError::io(format!("opening {}", log_path.display()), error))?;
        let size = scan.tree.size();
        tracing::info!(path = %log_path.display(), records = size, "audit log opened");
        let shared = Arc::new(Shared {
            dir,
            log_path,
            reader,
            state: RwLock::new(State {
                tree: scan.tree,
                offsets: scan.offsets,
                end: scan.end,
                failure: None,
            }),
            latest_checkpoint: RwLock::new(checkpoint),
            tree_size: AtomicU64::new(size),
            appends: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
        });
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            file,
            _lock: lock,
            receiver,
            shared: Arc::clone(&shared),
            clock: Arc::clone(&config.clock),
            next_index: size,
            end: scan.end,
            failure: None,
            buf: Vec::new(),
            #[cfg(feature = "bench")]
            fsync_per_append: config.fsync_per_append,
        };
        let writer = std::thread::Builder::new()
            .name("audit-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|error| AuditError::io("starting the audit log writer thread", error))?;
        Ok(Self {
            shared,
            queue,
            writer,
            origin: config.origin,
            clock: config.clock,
            checkpoint_key: config.checkpoint_key,
            checkpoint_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Appends `event` and returns once its record is durable on disk (written and fsynced,
    /// shared with whatever other appends were queued). Never blocks the async runtime.
    ///
    /// Dropping the returned future after it started does not withdraw the event: it may still
    /// be written, unacknowledged.
    pub async fn append(&self, event: AuditEvent) -> Result<AppendReceipt, AuditError> {
        let event = PreparedEvent::new(&event)?;
        self.health()?;
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { event, reply })
            .await
            .map_err(|_| AuditError::unavailable("the audit log writer has stopped"))?;
        answer
            .await
            .map_err(|_| AuditError::unavailable("the audit log writer has stopped"))?
    }

    /// `Ok` while the log takes appends; otherwise why not (for `/readyz`).
    pub fn health(&self) -> Result<(), AuditError> {
        if self.writer.is_finished() {
            return Err(AuditError::unavailable("the audit log writer has stopped"));
        }
        match &self.state()?.failure {
            Some(reason) => Err(AuditError::unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    /// The number of durable records.
    pub fn tree_size(&self) -> u64 {
        self.shared.tree_size.load(Ordering::Acquire)
    }

    /// The tree hash of the first `tree_size` records.
    pub fn root_hash(&self, tree_size: u64) -> Result<TreeHash, AuditError> {
        self.state()?.tree.root(tree_size)
    }

    /// The leaf hash of record `index`, if it is durable.
    pub fn leaf_hash(&self, index: u64) -> Result<Option<TreeHash>, AuditError> {
        Ok(self.state()?.tree.leaf(index))
    }

    /// Up to `limit` records from index `from`, as NDJSON: each line exactly as stored, with its
    /// newline. Empty when `from` is at or past the end. The range is read into memory whole, so
    /// the HTTP layer bounds `limit` (records are at most [`MAX_RECORD_LEN`] bytes).
    pub async fn records(&self, from: u64, limit: u64) -> Result<Vec<u8>, AuditError> {
        let range = {
            let state = self.state()?;
            let size = state.tree.size();
            if from >= size || limit == 0 {
                return Ok(Vec::new());
            }
            let to = from.saturating_add(limit).min(size);
            let offset = |index: u64| state.offsets[index as usize];
            offset(from)..if to == size { state.end } else { offset(to) }
        };
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            let len = usize::try_from(range.end - range.start)
                .map_err(|_| AuditError::InvalidRange("record range too large".into()))?;
            let mut bytes = vec![0; len];
            shared
                .reader
                .read_exact_at(&mut bytes, range.start)
                .map_err(|error| {
                    AuditError::io(format!("reading {}", shared.log_path.display()), error)
                })?;
            Ok(bytes)
        })
        .await
        .map_err(|error| AuditError::unavailable(format!("reading task failed: {error}")))?
    }

    /// The inclusion proof of record `index` in the tree of `tree_size` records (RFC 9162
    /// §2.1.3.1), leaf side first.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<TreeHash>, AuditError> {
        self.state()?.tree.inclusion_proof(index, tree_size)
    }

    /// The consistency proof from the tree of `first` records to the tree of `second` (RFC 9162
    /// §2.1.4.1); `1 <= first <= second <= tree_size`.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<TreeHash>, AuditError> {
        self.state()?.tree.consistency_proof(first, second)
    }

    /// The latest stored checkpoint, if any has been made.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        match self.shared.latest_checkpoint.read() {
            Ok(checkpoint) => checkpoint.clone(),
            // Only a panic while replacing the value poisons it; the value is whole either way.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs a checkpoint of the durable tree with `signer`, stores it durably (temporary file,
    /// fsync, rename, directory fsync) and returns it.
    pub async fn checkpoint<S: CheckpointSigner>(
        &self,
        signer: &S,
    ) -> Result<Checkpoint, AuditError> {
        let _serial = self.checkpoint_lock.lock().await;
        let (tree_size, root_hash) = {
            let state = self.state()?;
            let size = state.tree.size();
            (size, state.tree.root(size)?)
        };
        let timestamp = Timestamp::from_system_time(self.clock.now())?;
        let statement = Checkpoint::statement(&self.origin, tree_size, &root_hash, &timestamp);
        let signature = signer.sign(&statement).await?;
        let checkpoint = Checkpoint::new(
            self.origin.clone(),
            tree_size,
            root_hash,
            timestamp,
            signature,
        )?;
        if let Some(key) = &self.checkpoint_key {
            checkpoint.verify(key)?;
        }
        let json = checkpoint.to_json();
        let dir = self.shared.dir.clone();
        tokio::task::spawn_blocking(move || write_checkpoint_file(&dir, &json))
            .await
            .map_err(|error| {
                AuditError::unavailable(format!("checkpoint task failed: {error}"))
            })??;
        match self.shared.latest_checkpoint.write() {
            Ok(mut latest) => *latest = Some(checkpoint.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(checkpoint.clone()),
        }
        tracing::info!(tree_size, root_hash = %root_hash, "audit checkpoint stored");
        Ok(checkpoint)
    }

    /// Counters since open.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            tree_size: self.tree_size(),
            appends: self.shared.appends.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
        }
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The origin written into checkpoints.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Stops the writer and waits for it, releasing the directory lock.
    pub async fn close(self) -> Result<(), AuditError> {
        let Self { queue, writer, .. } = self;
        drop(queue);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|error| AuditError::unavailable(format!("closing task failed: {error}")))?
            .map_err(|_| AuditError::unavailable("the audit log writer panicked"))
    }

    fn state(&self) -> Result<RwLockReadGuard<'_, State>, AuditError> {
        // Only the writer takes the write lock; poisoned means it panicked mid-update.
        self.shared
            .state
            .read()
            .map_err(|_| AuditError::unavailable("the audit log writer panicked"))
    }
}

/// The writer thread: the only code that writes `audit.log` after open.
struct Writer {
    file: File,
    /// Holds the directory's advisory lock for as long as the writer lives.
    _lock: File,
    receiver: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    next_index: u64,
    end: u64,
    failure: Option<String>,
    buf: Vec<u8>,
    #[cfg(feature = "bench")]
    fsync_per_append: bool,
}

/// A rendered record waiting for its fsync.
struct Pending {
    reply: oneshot::Sender<Result<AppendReceipt, AuditError>>,
    index: u64,
    leaf_hash: TreeHash,
    time: Timestamp,
    /// The line with its newline, in `Writer::buf`.
    bytes: Range<usize>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::new();
        // Ends when every sender is gone: the log was dropped or closed.
        while let Some(job) = self.receiver.blocking_recv() {
            let mut bytes = job.event.approximate_len();
            batch.push(job);
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match self.receiver.try_recv() {
                    Ok(job) => {
                        bytes += job.event.approximate_len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
    }

    fn commit(&mut self, batch: &mut Vec<Job>) {
        if let Some(reason) = &self.failure {
            for job in batch.drain(..) {
                // The appender may have gone away; nobody else to tell.
                let _ = job.reply.send(Err(AuditError::unavailable(reason.clone())));
            }
            return;
        }
        self.buf.clear();
        let mut pending = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            let time = match Timestamp::from_system_time(self.clock.now()) {
                Ok(time) => time,
                Err(error) => {
                    let _ = job.reply.send(Err(error));
                    continue;
                }
            };
            let index = self.next_index + pending.len() as u64;
            let start = self.buf.len();
            job.event.render(index, &time, &mut self.buf);
            let leaf_hash = leaf_hash(&self.buf[start..]);
            self.buf.push(b'\n');
            pending.push(Pending {
                reply: job.reply,
                index,
                leaf_hash,
                time,
                bytes: start..self.buf.len(),
            });
        }
        #[cfg(feature = "bench")]
        if self.fsync_per_append {
            for one in pending {
                self.write_durably(vec![one]);
            }
            return;
        }
        if !pending.is_empty() {
            self.write_durably(pending);
        }
    }

    /// Writes the consecutive lines of `pending` at the end of the file with one write and one
    /// fsync, publishes them, and answers their appenders.
    fn write_durably(&mut self, pending: Vec<Pending>) {
        let (Some(first), Some(last)) = (pending.first(), pending.last()) else {
            return;
        };
        let range = first.bytes.start..last.bytes.end;
        if let Some(reason) = &self.failure {
            let reason = reason.clone();
            return answer_failure(pending, &reason);
        }
        let bytes = &self.buf[range.clone()];
        let path = &self.shared.log_path;
        #[cfg(test)]
        if self.shared.fail_next_write.swap(false, Ordering::Relaxed) {
            let _ = self.file.write_all_at(&bytes[..bytes.len() / 2], self.end);
            let reason = "injected write failure".to_owned();
            self.fail(reason.clone());
            return answer_failure(pending, &reason);
        }
        let result = self
            .file
            .write_all_at(bytes, self.end)
            .map_err(|error| format!("writing {} failed: {error}", path.display()))
            .and_then(|()| {
                self.file
                    .sync_data()
                    .map_err(|error| format!("fdatasync of {} failed: {error}", path.display()))
            });
        if let Err(reason) = result {
            self.fail(reason.clone());
            return answer_failure(pending, &reason);
        }
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);

        let base = self.end - range.start as u64;
        let tree_size = {
            let Ok(mut state) = self.shared.state.write() else {
                // Unreachable: only this thread takes the write lock.
                return answer_failure(pending, "audit log state lock poisoned");
            };
            for one in &pending {
                state.tree.push(one.leaf_hash);
                state.offsets.push(base + one.bytes.start as u64);
            }
            state.end = base + range.end as u64;
            state.tree.size()
        };
        self.end = base + range.end as u64;
        self.next_index = tree_size;
        self.shared.tree_size.store(tree_size, Ordering::Release);
        self.shared
            .appends
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        for one in pending {
            let receipt = AppendReceipt {
                index: one.index,
                leaf_hash: one.leaf_hash,
                time: one.time,
                tree_size,
            };
            let _ = one.reply.send(Ok(receipt));
        }
    }

    /// After a failed write or fsync nothing about the file's tail can be trusted (a failed
    /// fsync may have dropped dirty pages): refuse appends until an operator reopens the log,
    /// whose scan decides what is there.
    fn fail(&mut self, reason: String) {
        tracing::error!(path = %self.shared.log_path.display(), %reason, "audit log failed; appends refused");
        // Best effort: remove what part of the failed write reached the file, so that records
        // nobody was told about do not linger.
        if let Err(error) = self
            .file
            .set_len(self.end)
            .and_then(|()| self.file.sync_all())
        {
            tracing::error!(%error, "could not cut the failed write off the audit log");
        }
        if let Ok(mut state) = self.shared.state.write() {
            state.failure = Some(reason.clone());
        }
        self.failure = Some(reason);
    }
}

fn answer_failure(pending: Vec<Pending>, reason: &str) {
    for one in pending {
        let _ = one.reply.send(Err(AuditError::unavailable(reason)));
    }
}

/// What the open-time scan found.
pub(crate) struct Scan {
    pub(crate) tree: MerkleTree,
    offsets: Vec<u64>,
    /// End of the last complete record.
    end: u64,
    /// Bytes after the last newline.
    torn_bytes: u64,
}

pub(crate) fn scan(file: impl Read, path: &Path) -> Result<Scan, AuditError> {
    let read_error = |error| AuditError::io(format!("reading {}", path.display()), error);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut tree = MerkleTree::new();
    let mut offsets = Vec::new();
    let mut offset = 0u64;
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        // One byte more than the longest record and its newline tells an overlong line apart.
        let limit = MAX_RECORD_LEN as u64 + 2;
        let read = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .map_err(read_error)?;
        if read == 0 {
            return Ok(Scan {
                tree,
                offsets,
                end: offset,
                torn_bytes: 0,
            });
        }
        let number = tree.size() + 1;
        let corrupt = |reason: String| AuditError::Corrupt {
            path: path.to_owned(),
            line: number,
            offset,
            reason,
        };
        let Some(content) = line.strip_suffix(b"\n") else {
            if read as u64 == limit {
                return Err(corrupt(format!("line longer than {MAX_RECORD_LEN} bytes")));
            }
            // No newline before the end of the file: the last write was cut short.
            return Ok(Scan {
                tree,
                offsets,
                end: offset,
                torn_bytes: read as u64,
            });
        };
        let index = check_line(content).map_err(&corrupt)?;
        if index != tree.size() {
            return Err(corrupt(format!(
                "index {index} where {} was expected",
                tree.size()
            )));
        }
        tree.push(leaf_hash(content));
        offsets.push(offset);
        offset += read as u64;
    }
}

fn load_checkpoint(
    dir: &Path,
    config: &AuditLogConfig,
    tree: &MerkleTree,
) -> Result<Option<Checkpoint>, AuditError> {
    let path = dir.join(CHECKPOINT_FILE);
    let json = match fs::read(&path) {
        Ok(json) => json,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(AuditError::io(format!("reading {}", path.display()), error)),
    };
    let mismatch = |reason: String| AuditError::CheckpointMismatch {
        path: path.clone(),
        reason,
    };
    let checkpoint = Checkpoint::from_json(&json).map_err(|error| mismatch(error.to_string()))?;
    if checkpoint.origin() != &config.origin {
        return Err(mismatch(format!(
            "origin {:?} is not this log's {:?}",
            checkpoint.origin().as_str(),
            config.origin.as_str()
        )));
    }
    if let Some(key) = &config.checkpoint_key {
        checkpoint
            .verify(key)
            .map_err(|error| mismatch(error.to_string()))?;
    }
    if checkpoint.tree_size() > tree.size() {
        return Err(mismatch(format!(
            "it covers {} records but the log holds {}: acknowledged records are missing",
            checkpoint.tree_size(),
            tree.size()
        )));
    }
    let root = tree.root(checkpoint.tree_size())?;
    if root != *checkpoint.root_hash() {
        return Err(mismatch(format!(
            "the first {} records have root {root}, the checkpoint says {}: the log was altered",
            checkpoint.tree_size(),
            checkpoint.root_hash()
        )));
    }
    Ok(Some(checkpoint))
}

/// Creates `dir` when missing and makes its entry in the parent durable.
fn ensure_dir(dir: &Path) -> Result<(), AuditError> {
    match fs::metadata(dir) {
        Ok(metadata) if metadata.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(AuditError::io(
                format!("audit log directory {}", dir.display()),
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(AuditError::io(
                format!("inspecting {}", dir.display()),
                error,
            ));
        }
    }
    fs::create_dir_all(dir)
        .map_err(|error| AuditError::io(format!("creating {}", dir.display()), error))?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

fn lock_dir(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|error| AuditError::io(format!("opening {}", path.display()), error))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(TryLockError::WouldBlock) => Err(AuditError::Locked {
            dir: dir.to_owned(),
        }),
        Err(TryLockError::Error(error)) => {
            Err(AuditError::io(format!("locking {}", path.display()), error))
        }
    }
}

/// Opens the records file for writing, creating it durably (file and directory entry) when
/// missing.
fn open_log_file(dir: &Path, path: &Path) -> Result<File, AuditError> {
    let open_error = |error| AuditError::io(format!("opening {}", path.display()), error);
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => {
            file.sync_all()
                .map_err(|error| AuditError::io(format!("fsync of {}", path.display()), error))?;
            sync_dir(dir)?;
            Ok(file)
        }
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_error),
        Err(error) => Err(open_error(error)),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), AuditError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(AuditError::io(
            format!("removing {}", path.display()),
            error,
        )),
    }
}

/// Replaces `checkpoint.json` atomically: a reader or a crash sees the old file or the new one.
fn write_checkpoint_file(dir: &Path, json: &[u8]) -> Result<(), AuditError> {
    let temp = dir.join(CHECKPOINT_TEMP_FILE);
    let target = dir.join(CHECKPOINT_FILE);
    let io_error = |what: &str, path: &Path| {
        let context = format!("{what} {}", path.display());
        move |error| AuditError::io(context, error)
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .map_err(io_error("creating", &temp))?;
    file.write_all(json).map_err(io_error("writing", &temp))?;
    file.sync_all().map_err(io_error("fsync of", &temp))?;
    drop(file);
    fs::rename(&temp, &target).map_err(io_error("renaming to", &target))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| AuditError::io(format!("fsync of directory {}", dir.display()), error))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::record::{Actor, EventName};

    #[derive(Debug)]
    struct Fixed;

    impl Clock for Fixed {
        fn now(&self) -> std::time::SystemTime {
            UNIX_EPOCH + Duration::from_secs(1_795_341_600)
        }
    }

    fn event(i: u64) -> AuditEvent {
        AuditEvent::new(
            EventName::new("test.event").unwrap(),
            Actor::new("test").unwrap(),
        )
        .with_field("i", i)
    }

    fn config() -> AuditLogConfig {
        AuditLogConfig::new(Origin::new("test/audit").unwrap()).with_clock(Arc::new(Fixed))
    }

    /// A failed write (or fsync) fails closed: the failed appends and every later one are
    /// refused, health says why, and the file keeps only what was acknowledged.
    #[tokio::test]
    async fn a_failed_write_fails_closed_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), config()).await.unwrap();
        for i in 0..3 {
            log.append(event(i)).await.unwrap();
        }
        let acknowledged = log.records(0, 3).await.unwrap();
        log.shared.fail_next_write.store(true, Ordering::Relaxed);

        let error = log.append(event(3)).await.unwrap_err();
        assert!(matches!(error, AuditError::Unavailable { .. }), "{error}");
        assert!(
            error.to_string().contains("injected write failure"),
            "{error}"
        );
        assert!(log.health().is_err());
        let error = log.append(event(4)).await.unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Unavailable);
        assert_eq!(log.tree_size(), 3);
        // Reads and proofs of the durable part go on.
        assert_eq!(log.records(0, 10).await.unwrap(), acknowledged);
        assert_eq!(log.inclusion_proof(2, 3).unwrap().len(), 1);
        log.close().await.unwrap();

        // The half-written record was cut off; the reopened log carries on.
        assert_eq!(fs::read(dir.path().join(LOG_FILE)).unwrap(), acknowledged);
        let log = AuditLog::open(dir.path(), config()).await.unwrap();
        log.health().unwrap();
        assert_eq!(log.append(event(3)).await.unwrap().index, 3);
    }
}
