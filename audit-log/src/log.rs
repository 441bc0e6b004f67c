//! The log directory, its group-commit writer and its readers.
//!
//! Layout of the directory, which the log owns (docs/audit-log.md describes it in full):
//!
//! - `audit.log`: the records, one line each, `\n`-terminated: the source of truth;
//! - `checkpoint.json`: the latest signed checkpoint, replaced atomically;
//! - `tile/`: the Merkle tree's full hash tiles, C2SP tlog-tiles layout (the `tiles` module);
//! - `offsets`: where each record starts in `audit.log` (the `offsets` module);
//! - `tree-state`: a tree size at a multiple of 256 up to which `tile/` and `offsets` are durable,
//!   where `audit.log` ends there, and the partial tiles above it (the `tree_state` module);
//! - `lock`: held with an exclusive advisory lock (`flock`) while a log is open, so that two
//!   writers never share the file.
//!
//! `tile/`, `offsets` and `tree-state` are derived from `audit.log` and rebuilt from it when they
//! are missing, damaged or do not match it.
//!
//! Appends are durable when they return: one writer thread takes everything queued, writes it
//! with one `pwrite` and one `fdatasync`, then publishes the records and answers every appender
//! (group commit). Readers see only what has been made durable. Before publishing a batch, the
//! writer writes its offsets and the tiles it filled, without fsync; a background thread fsyncs
//! them and writes `tree-state` every 16,384 records and at close.
//!
//! Memory holds the partial tile of each tree level with the nodes above its hashes (fewer than
//! 512 hashes a level), a cache of 64 checked full tiles, and nothing per record: roots of earlier
//! sizes and proofs read tiles, pages of records read `offsets`. An
//! open hashes only the records after `tree-state` (fewer than 16,384 + 256 after a crash, fewer
//! than 256 after a clean close), besides the checks that tie the derived files to the log.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::{AuditPublicKey, Checkpoint, CheckpointSigner, Origin};
use crate::error::AuditError;
use crate::files::{remove_if_exists, sync_dir, write_atomically};
use crate::merkle::{self, Nodes as _, TreeHash, leaf_hash};
use crate::offsets::Offsets;
use crate::record::{AuditEvent, MAX_RECORD_LEN, PreparedEvent, check_line};
use crate::tiles::{Frontier, TileCache, TileStore, TileView};
use crate::time::{Clock, SystemClock, Timestamp};
use crate::tree_state::{TREE_STATE_FILE, TREE_STATE_TEMP_FILE, Tree, TreeState};

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
/// The open-time replay writes record offsets in chunks of this many.
const OFFSETS_CHUNK: usize = 8192;

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
    /// Records read and hashed at open: those after the durable tree state, and the one that
    /// ties the tree state to the log (every record when the tree was rebuilt).
    pub records_scanned_at_open: u64,
    /// Tree hashes held in memory, whatever the log's size: the partial tile of each level with
    /// the nodes above its hashes (fewer than 512 a level), and up to 64 checked full tiles with
    /// theirs (511 each) that readers reuse.
    pub hashes_in_memory: u64,
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
    offsets: Offsets,
    tiles: TileStore,
    tile_cache: TileCache,
    state: RwLock<State>,
    latest_checkpoint: RwLock<Option<Checkpoint>>,
    tree_size: AtomicU64,
    appends: AtomicU64,
    fsyncs: AtomicU64,
    records_scanned_at_open: u64,
    /// Test hook: the next write puts half its bytes in the file and then fails.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
}

/// The durable part of the log as readers see it; replaced only by the writer, after fsync.
#[derive(Debug)]
struct State {
    /// The tree's right edge; its full tiles are on disk.
    frontier: Arc<Frontier>,
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
    /// Reads the records after the durable tree state (all of them when there is none, or when it
    /// does not match the log), checks each (canonical form, contiguous index), extends the tree,
    /// and checks it against the stored checkpoint (origin, signature when a key is configured,
    /// size and root). A torn last line (bytes after the last newline: a write that never
    /// completed, so never acknowledged) is cut off with a warning. Any other damage to
    /// `audit.log` is an error naming the line and byte offset, and the file is left as it is.
    ///
    /// The derived files (tiles, offsets, tree state) are checked where they meet the log: the
    /// record just before the tree state's end must be the one it names, with the leaf hash its
    /// tiles hold, and the tree's root at the checkpoint's size must be the checkpoint's. When
    /// they do not match, or are missing or damaged, the log warns and rebuilds them from
    /// `audit.log`, whose records are the truth, rather than refusing to open: the rebuilt tree is
    /// held to the signed checkpoint just the same.
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
        remove_if_exists(&dir.join(TREE_STATE_TEMP_FILE))?;
        let log_path = dir.join(LOG_FILE);
        let file = open_log_file(&dir, &log_path)?;
        // A writer killed between its write and its fsync leaves records in the page cache that
        // nobody acknowledged. Make them durable before the tree state, a reader, a proof or a
        // checkpoint covers them, or an OS crash would lose records that those vouch for.
        file.sync_all()
            .map_err(|error| AuditError::io(format!("syncing {}", log_path.display()), error))?;
        let checkpoint = load_checkpoint(&dir, &config)?;
        let tiles = TileStore::new(&dir);
        let offsets = Offsets::open(&dir)?;
        let source = Source {
            dir: &dir,
            file: &file,
            log_path: &log_path,
            tiles: &tiles,
            offsets: &offsets,
        };
        let mut replay = source.replay_checked(checkpoint.as_ref())?;
        if replay.torn_bytes > 0 {
            tracing::warn!(
                path = %log_path.display(),
                bytes = replay.torn_bytes,
                offset = replay.end,
                "cutting a torn last line off the audit log (an append that never completed)"
            );
            file.set_len(replay.end)
                .and_then(|()| file.sync_all())
                .map_err(|error| {
                    AuditError::io(format!("truncating {}", log_path.display()), error)
                })?;
        }
        let reader = File::open(&log_path)
            .map_err(|error| AuditError::io(format!("opening {}", log_path.display()), error))?;
        replay.tree.start_persister(
            dir.clone(),
            (offsets.path().to_owned(), offsets.try_clone()?),
        )?;
        replay.tree.hand_off(true);
        let size = replay.tree.size();
        tracing::info!(
            path = %log_path.display(),
            records = size,
            scanned = replay.scanned,
            "audit log opened"
        );
        let shared = Arc::new(Shared {
            dir,
            log_path,
            reader,
            offsets,
            tiles,
            tile_cache: TileCache::default(),
            state: RwLock::new(State {
                frontier: Arc::new(replay.tree.frontier().clone()),
                end: replay.end,
                failure: None,
            }),
            latest_checkpoint: RwLock::new(checkpoint),
            tree_size: AtomicU64::new(size),
            appends: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            records_scanned_at_open: replay.scanned,
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
            tree: replay.tree,
            next_index: size,
            end: replay.end,
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
        let frontier = self.frontier()?;
        merkle::root(&mut self.shared.view(&frontier), tree_size)
    }

    /// The leaf hash of record `index`, if it is durable.
    pub fn leaf_hash(&self, index: u64) -> Result<Option<TreeHash>, AuditError> {
        let frontier = self.frontier()?;
        if index >= frontier.size() {
            return Ok(None);
        }
        self.shared.view(&frontier).node(0, index).map(Some)
    }

    /// Up to `limit` records from index `from`, as NDJSON: each line exactly as stored, with its
    /// newline. Empty when `from` is at or past the end. The range is read into memory whole, so
    /// the HTTP layer bounds `limit` (records are at most [`MAX_RECORD_LEN`] bytes). Each line is
    /// checked against its leaf hash in the tree before it is served.
    pub async fn records(&self, from: u64, limit: u64) -> Result<Vec<u8>, AuditError> {
        let (frontier, end) = {
            let state = self.state()?;
            (Arc::clone(&state.frontier), state.end)
        };
        let size = frontier.size();
        if from >= size || limit == 0 {
            return Ok(Vec::new());
        }
        let to = from.saturating_add(limit).min(size);
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.read_records(from..to, &frontier, end))
            .await
            .map_err(|error| AuditError::unavailable(format!("reading task failed: {error}")))?
    }

    /// The inclusion proof of record `index` in the tree of `tree_size` records (RFC 9162
    /// §2.1.3.1), leaf side first.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<TreeHash>, AuditError> {
        let frontier = self.frontier()?;
        merkle::inclusion_proof(&mut self.shared.view(&frontier), index, tree_size)
    }

    /// The consistency proof from the tree of `first` records to the tree of `second` (RFC 9162
    /// §2.1.4.1); `1 <= first <= second <= tree_size`.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<TreeHash>, AuditError> {
        let frontier = self.frontier()?;
        merkle::consistency_proof(&mut self.shared.view(&frontier), first, second)
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
            let frontier = self.frontier()?;
            let size = frontier.size();
            // The current size's root needs only the frontier: no tile is read.
            let root = merkle::root(&mut self.shared.view(&frontier), size)?;
            (size, root)
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
        tokio::task::spawn_blocking(move || {
            write_atomically(&dir, CHECKPOINT_FILE, CHECKPOINT_TEMP_FILE, &json)
        })
        .await
        .map_err(|error| AuditError::unavailable(format!("checkpoint task failed: {error}")))??;
        match self.shared.latest_checkpoint.write() {
            Ok(mut latest) => *latest = Some(checkpoint.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(checkpoint.clone()),
        }
        tracing::info!(tree_size, root_hash = %root_hash, "audit checkpoint stored");
        Ok(checkpoint)
    }

    /// Counters since open.
    pub fn stats(&self) -> AuditStats {
        let frontier = self
            .frontier()
            .map_or(0, |frontier| frontier.hashes() as u64);
        let hashes_in_memory = frontier + self.shared.tile_cache.hashes() as u64;
        AuditStats {
            tree_size: self.tree_size(),
            appends: self.shared.appends.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
            records_scanned_at_open: self.shared.records_scanned_at_open,
            hashes_in_memory,
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

    /// The durable tree's frontier, shared: tiles are read without holding the lock.
    fn frontier(&self) -> Result<Arc<Frontier>, AuditError> {
        Ok(Arc::clone(&self.state()?.frontier))
    }
}

impl Shared {
    /// The tree of `frontier` for one request, its full tiles through the cache.
    fn view<'a>(&'a self, frontier: &'a Frontier) -> TileView<'a> {
        TileView::new(frontier, &self.tiles).with_cache(&self.tile_cache)
    }

    /// Reads the lines of records `range` of the tree of `frontier`, whose last record ends at
    /// byte `end` of the log. The page must lie on record boundaries, start with the first record
    /// asked for (else the offsets file is wrong), and every line must have the leaf hash the
    /// tree holds for it (else the log was changed after it was hashed): only records that the
    /// tree, and so the checkpoints, vouch for are served.
    fn read_records(
        &self,
        range: Range<u64>,
        frontier: &Frontier,
        end: u64,
    ) -> Result<Vec<u8>, AuditError> {
        let start = self.offsets.read(range.start)?;
        let stop = if range.end == frontier.size() {
            end
        } else {
            self.offsets.read(range.end)?
        };
        let count = range.end - range.start;
        let misplaced = |reason: String| AuditError::derived(self.offsets.path(), reason);
        let longest = count.saturating_mul(MAX_RECORD_LEN as u64 + 1);
        if start >= stop || stop > end || stop - start > longest {
            return Err(misplaced(format!(
                "records {}..{} would span bytes {start}..{stop} of a log of {end} bytes",
                range.start, range.end
            )));
        }
        // The byte before the page too, which must end the previous record.
        let before = u64::from(start > 0);
        let len = usize::try_from(stop - start + before)
            .map_err(|_| AuditError::InvalidRange("record range too large".into()))?;
        let mut bytes = vec![0; len];
        self.reader
            .read_exact_at(&mut bytes, start - before)
            .map_err(|error| {
                AuditError::io(format!("reading {}", self.log_path.display()), error)
            })?;
        let (previous, page) = bytes.split_at(before as usize);
        let first_line = page.split(|&b| b == b'\n').next().unwrap_or_default();
        let on_boundaries = previous.iter().all(|&b| b == b'\n')
            && page.ends_with(b"\n")
            && page.split_inclusive(|&b| b == b'\n').count() as u64 == count
            && check_line(first_line).ok() == Some(range.start);
        if !on_boundaries {
            return Err(misplaced(format!(
                "bytes {start}..{stop} of the log are not records {}..{}",
                range.start, range.end
            )));
        }
        let mut tree = self.view(frontier);
        let mut offset = start;
        for (index, line) in range.zip(page.split_inclusive(|&b| b == b'\n')) {
            let leaf = leaf_hash(&line[..line.len() - 1]);
            let held = tree.node(0, index)?;
            if leaf != held {
                return Err(AuditError::Corrupt {
                    path: self.log_path.clone(),
                    line: index + 1,
                    offset,
                    reason: format!(
                        "its leaf hash is {leaf}, the tree holds {held}: the record was changed \
                         after it was written"
                    ),
                });
            }
            offset += line.len() as u64;
        }
        bytes.drain(..before as usize);
        Ok(bytes)
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
    tree: Tree,
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
        // The last tree state is written while the directory lock is still held.
        self.tree.close();
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
        self.end = base + range.end as u64;
        // The batch's offsets and the tiles it fills are written before the size that needs them
        // is published. They are derived from audit.log, which now holds the records, so a
        // failure here does not undo the appends: they are answered, and later ones refused.
        let starts: Vec<u64> = pending
            .iter()
            .map(|one| base + one.bytes.start as u64)
            .collect();
        let mut derived = self.shared.offsets.write(self.next_index, &starts);
        for one in &pending {
            // Every leaf goes in, even after a failure, so that the tree stays the log's.
            let pushed = self.tree.push(one.leaf_hash, base + one.bytes.end as u64);
            derived = derived.and(pushed);
        }
        let tree_size = self.tree.size();
        let frontier = Arc::new(self.tree.frontier().clone());
        match self.shared.state.write() {
            Ok(mut state) => {
                state.frontier = frontier;
                state.end = self.end;
            }
            // Unreachable: only this thread takes the write lock.
            Err(_) => return answer_failure(pending, "audit log state lock poisoned"),
        }
        self.next_index = tree_size;
        self.shared.tree_size.store(tree_size, Ordering::Release);
        self.shared
            .appends
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        if let Err(error) = derived {
            // Before the answers, so that an appender told of success sees the refusal next.
            self.tree.stop_persisting();
            self.fail(format!("writing the audit tree failed: {error}"));
        }
        for one in pending {
            let receipt = AppendReceipt {
                index: one.index,
                leaf_hash: one.leaf_hash,
                time: one.time,
                tree_size,
            };
            let _ = one.reply.send(Ok(receipt));
        }
        self.tree.hand_off(false);
    }

    /// After a failed write or fsync nothing about the file's tail can be trusted (a failed
    /// fsync may have dropped dirty pages): refuse appends until an operator reopens the log,
    /// whose scan decides what is there. After a failed tile or offsets write the records are
    /// durable and `end` already includes them, so nothing is cut; the reopened log rebuilds
    /// what is missing.
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

/// What [`scan`] found after the records it read.
#[derive(Debug)]
pub(crate) struct Tail {
    /// End of the last complete record.
    pub(crate) end: u64,
    /// Bytes after the last newline.
    pub(crate) torn_bytes: u64,
    /// Records read.
    pub(crate) records: u64,
}

/// Reads the records of `file` (positioned at byte `start` of the log at `path`, where record
/// `first_index` begins), checks each, and hands each to `record` with its start and end
/// offsets. Stops at the end of the file or before a torn last line; any other damage is
/// [`AuditError::Corrupt`].
pub(crate) fn scan(
    file: impl Read,
    path: &Path,
    first_index: u64,
    start: u64,
    mut record: impl FnMut(&[u8], u64, u64) -> Result<(), AuditError>,
) -> Result<Tail, AuditError> {
    let read_error = |error| AuditError::io(format!("reading {}", path.display()), error);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut offset = start;
    let mut index = first_index;
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        // One byte more than the longest record and its newline tells an overlong line apart.
        let limit = MAX_RECORD_LEN as u64 + 2;
        let read = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .map_err(read_error)?;
        let tail = |torn_bytes| Tail {
            end: offset,
            torn_bytes,
            records: index - first_index,
        };
        if read == 0 {
            return Ok(tail(0));
        }
        let corrupt = |reason: String| AuditError::Corrupt {
            path: path.to_owned(),
            line: index + 1,
            offset,
            reason,
        };
        let Some(content) = line.strip_suffix(b"\n") else {
            if read as u64 == limit {
                return Err(corrupt(format!("line longer than {MAX_RECORD_LEN} bytes")));
            }
            // No newline before the end of the file: the last write was cut short.
            return Ok(tail(read as u64));
        };
        let found = check_line(content).map_err(&corrupt)?;
        if found != index {
            return Err(corrupt(format!("index {found} where {index} was expected")));
        }
        record(content, offset, offset + read as u64)?;
        offset += read as u64;
        index += 1;
    }
}

/// The tree rebuilt at open and what the records file looked like.
#[derive(Debug)]
struct Replay {
    tree: Tree,
    /// End of the last complete record.
    end: u64,
    /// Bytes after the last newline.
    torn_bytes: u64,
    /// Records read and hashed.
    scanned: u64,
}

/// Where the tree comes from at open: the records file and the files derived from it.
struct Source<'a> {
    dir: &'a Path,
    file: &'a File,
    log_path: &'a Path,
    tiles: &'a TileStore,
    offsets: &'a Offsets,
}

impl Source<'_> {
    /// Rebuilds the tree from the durable tree state and the log's tail, or from the whole log
    /// when the derived files do not match the log or the checkpoint.
    fn replay_checked(&self, checkpoint: Option<&Checkpoint>) -> Result<Replay, AuditError> {
        let start = match self.load_state() {
            Ok(start) => start,
            Err(error @ AuditError::DerivedMismatch { .. }) => {
                self.discard_state(&error)?;
                None
            }
            Err(error) => return Err(error),
        };
        let from_state = start.is_some();
        let mut replay = self.replay(start)?;
        let Some(checkpoint) = checkpoint else {
            return Ok(replay);
        };
        let path = self.dir.join(CHECKPOINT_FILE);
        if checkpoint.tree_size() > replay.tree.size() {
            return Err(AuditError::CheckpointMismatch {
                path,
                reason: format!(
                    "it covers {} records but the log holds {}: acknowledged records are missing",
                    checkpoint.tree_size(),
                    replay.tree.size()
                ),
            });
        }
        let root_at_checkpoint = |replay: &Replay| {
            merkle::root(
                &mut TileView::new(replay.tree.frontier(), self.tiles),
                checkpoint.tree_size(),
            )
        };
        let mut verdict = root_at_checkpoint(&replay);
        let derived_wrong = match &verdict {
            Ok(root) => root != checkpoint.root_hash(),
            Err(error) => matches!(error, AuditError::DerivedMismatch { .. }),
        };
        if from_state && derived_wrong {
            // The tiles or the tree state may be what is wrong: hash the whole log and look again.
            let why = match verdict {
                Ok(root) => AuditError::derived(
                    self.dir.join(TREE_STATE_FILE),
                    format!(
                        "the tree it starts has root {root} at size {}, the checkpoint says {}",
                        checkpoint.tree_size(),
                        checkpoint.root_hash()
                    ),
                ),
                Err(error) => error,
            };
            self.discard_state(&why)?;
            let scanned = replay.scanned;
            replay = self.replay(None)?;
            replay.scanned += scanned;
            verdict = root_at_checkpoint(&replay);
        }
        let root = verdict?;
        if root != *checkpoint.root_hash() {
            return Err(AuditError::CheckpointMismatch {
                path,
                reason: format!(
                    "the first {} records have root {root}, the checkpoint says {}: the log was \
                     altered",
                    checkpoint.tree_size(),
                    checkpoint.root_hash()
                ),
            });
        }
        Ok(replay)
    }

    /// The durable tree state, if there is one and it matches the log where it ends: the log
    /// reaches that far, the offsets file covers it, and the record just before its end is the
    /// one it names, with the leaf hash its tiles hold.
    fn load_state(&self) -> Result<Option<TreeState>, AuditError> {
        let Some(state) = TreeState::load(self.dir)? else {
            return Ok(None);
        };
        let size = state.frontier.size();
        let mismatch = |reason: String| AuditError::derived(self.dir.join(TREE_STATE_FILE), reason);
        let log_len = self
            .file
            .metadata()
            .map_err(|error| {
                AuditError::io(format!("inspecting {}", self.log_path.display()), error)
            })?
            .len();
        if state.log_end > log_len {
            return Err(mismatch(format!(
                "it covers {} bytes of audit.log, which holds {log_len}",
                state.log_end
            )));
        }
        if size == 0 {
            return Err(mismatch("it covers no record".into()));
        }
        if self.offsets.len()? < size {
            return Err(mismatch(format!(
                "it covers {size} records, the offsets file fewer"
            )));
        }
        let last = size - 1;
        let start = self.offsets.read(last)?;
        let Some(len) = state
            .log_end
            .checked_sub(start)
            .filter(|len| (1..=MAX_RECORD_LEN as u64 + 1).contains(len))
        else {
            return Err(mismatch(format!(
                "record {last} would span bytes {start}..{} of audit.log",
                state.log_end
            )));
        };
        let mut line = vec![0; len as usize];
        self.file.read_exact_at(&mut line, start).map_err(|error| {
            AuditError::io(format!("reading {}", self.log_path.display()), error)
        })?;
        let content = line
            .strip_suffix(b"\n")
            .filter(|content| !content.contains(&b'\n'))
            .ok_or_else(|| {
                mismatch(format!(
                    "bytes {start}..{} of audit.log are not one line",
                    state.log_end
                ))
            })?;
        if check_line(content).ok() != Some(last) {
            return Err(mismatch(format!(
                "bytes {start}..{} of audit.log are not record {last}",
                state.log_end
            )));
        }
        let tiled = TileView::new(&state.frontier, self.tiles).node(0, last)?;
        if leaf_hash(content) != tiled {
            return Err(mismatch(format!(
                "record {last} in audit.log has leaf hash {}, its tile holds {tiled}",
                leaf_hash(content)
            )));
        }
        Ok(Some(state))
    }

    /// Removes a tree state that does not match the log, so that a crash during the rebuild
    /// does not trust it again.
    fn discard_state(&self, why: &AuditError) -> Result<(), AuditError> {
        tracing::warn!(
            error = %why,
            "the audit log's derived files do not match it; rebuilding them from the whole log"
        );
        remove_if_exists(&self.dir.join(TREE_STATE_FILE))?;
        sync_dir(self.dir)
    }

    /// Extends the tree of `start` (or the empty tree) with the records after it, rewriting
    /// their offsets and the tiles they fill.
    fn replay(&self, start: Option<TreeState>) -> Result<Replay, AuditError> {
        let (first_index, from, checked) = start
            .as_ref()
            .map_or((0, 0, 0), |state| (state.frontier.size(), state.log_end, 1));
        let mut tree = Tree::new(self.tiles.clone(), start);
        self.offsets.truncate(first_index)?;
        let mut file = self.file;
        file.seek(SeekFrom::Start(from)).map_err(|error| {
            AuditError::io(format!("reading {}", self.log_path.display()), error)
        })?;
        let mut starts = Vec::with_capacity(OFFSETS_CHUNK);
        let mut written = first_index;
        let tail = scan(
            file,
            self.log_path,
            first_index,
            from,
            |content, start, end| {
                starts.push(start);
                if starts.len() == OFFSETS_CHUNK {
                    self.offsets.write(written, &starts)?;
                    written += OFFSETS_CHUNK as u64;
                    starts.clear();
                }
                tree.push(leaf_hash(content), end)
            },
        )?;
        self.offsets.write(written, &starts)?;
        Ok(Replay {
            tree,
            end: tail.end,
            torn_bytes: tail.torn_bytes,
            scanned: tail.records + checked,
        })
    }
}

/// Reads the stored checkpoint and checks its origin and, with a key, its signature; its size
/// and root are checked against the tree once it is built.
fn load_checkpoint(dir: &Path, config: &AuditLogConfig) -> Result<Option<Checkpoint>, AuditError> {
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

    /// A tile write that fails after the records' fsync stands for a crash between the log's
    /// write and the tile's: the append is durable and answered, later appends are refused, no
    /// tree state claims the lost tile, and the reopened log rebuilds it from the records.
    #[tokio::test]
    async fn a_failed_tile_write_keeps_the_append_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), config()).await.unwrap();
        for i in 0..255 {
            log.append(event(i)).await.unwrap();
        }
        log.shared
            .tiles
            .fail_next_write
            .store(true, Ordering::Relaxed);
        // Record 255 fills the first tile.
        assert_eq!(log.append(event(255)).await.unwrap().index, 255);
        let error = log.health().unwrap_err();
        assert!(
            error.to_string().contains("injected tile write failure"),
            "{error}"
        );
        assert!(log.append(event(256)).await.is_err());
        let error = log.inclusion_proof(3, 256).unwrap_err();
        assert!(
            matches!(error, AuditError::DerivedMismatch { .. }),
            "{error}"
        );
        log.close().await.unwrap();
        assert!(!dir.path().join(TREE_STATE_FILE).exists());

        let log = AuditLog::open(dir.path(), config()).await.unwrap();
        log.health().unwrap();
        assert_eq!(log.tree_size(), 256);
        assert_eq!(log.stats().records_scanned_at_open, 256);
        let root = log.root_hash(256).unwrap();
        let leaf = log.leaf_hash(3).unwrap().unwrap();
        let proof = log.inclusion_proof(3, 256).unwrap();
        crate::verify_inclusion(&leaf, 3, 256, &proof, &root).unwrap();
        assert_eq!(log.append(event(256)).await.unwrap().index, 256);
    }

    /// The same for the offsets file: the batch whose entries were lost also filled a tile,
    /// yet no tree state vouches for it, and the reopened log rewrites the entries.
    #[tokio::test]
    async fn a_failed_offsets_write_keeps_the_append_and_no_tree_state_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), config()).await.unwrap();
        for i in 0..255 {
            log.append(event(i)).await.unwrap();
        }
        log.shared
            .offsets
            .fail_next_write
            .store(true, Ordering::Relaxed);
        assert_eq!(log.append(event(255)).await.unwrap().index, 255);
        let error = log.health().unwrap_err();
        assert!(
            error.to_string().contains("injected offsets write failure"),
            "{error}"
        );
        let error = log.records(255, 1).await.unwrap_err();
        assert!(
            matches!(error, AuditError::DerivedMismatch { .. }),
            "{error}"
        );
        log.close().await.unwrap();
        assert!(!dir.path().join(TREE_STATE_FILE).exists());

        let log = AuditLog::open(dir.path(), config()).await.unwrap();
        assert_eq!(log.stats().records_scanned_at_open, 256);
        let records = log.records(0, 256).await.unwrap();
        assert_eq!(records, fs::read(dir.path().join(LOG_FILE)).unwrap());
    }
}
