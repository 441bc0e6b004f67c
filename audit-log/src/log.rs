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
//! With a shared ledger (several nodes), the ledger is the truth and `audit.log` this node's
//! copy of it: each batch is numbered and made durable in the ledger, then written here with the
//! records other nodes appended before it (the `ledger` module).
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
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::{AuditPublicKey, Checkpoint, CheckpointSigner, Origin};
use crate::error::AuditError;
use crate::files::{append_line, remove_if_exists, sync_dir, write_atomically};
use crate::index::{RecordFilter, RecordIndex, Row};
use crate::ledger::{Ledger, LedgerError};
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
/// Every checkpoint this directory stored, one JSON line each, in order: append-only, for the
/// operator to ship off the appliance, so that a rewritten log cannot also rewrite the
/// checkpoints it was seen with (`smartsign-ctl audit verify --since-checkpoint` checks a new
/// one against any of them).
pub const CHECKPOINT_HISTORY_FILE: &str = "checkpoints.ndjson";
const CHECKPOINT_TEMP_FILE: &str = "checkpoint.json.tmp";
const LOCK_FILE: &str = "lock";

/// Appends waiting for the writer; beyond this, `append` waits for room (back-pressure).
const QUEUE_CAPACITY: usize = 4096;
/// At most this many records, and about this many bytes, go into one write and one fsync.
const MAX_BATCH: usize = 4096;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// The open-time replay writes record offsets in chunks of this many.
const OFFSETS_CHUNK: usize = 8192;
/// Records read from the ledger at a time when catching up; each page is one write and one fsync.
const LEDGER_PAGE: usize = 4096;
/// Records added to the record index in one transaction.
const INDEX_PAGE: u64 = 4096;
/// How long the index thread lets batches gather after a wake-up.
const INDEX_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// How to open an [`AuditLog`].
#[derive(Debug)]
pub struct AuditLogConfig {
    origin: Origin,
    clock: Arc<dyn Clock>,
    checkpoint_key: Option<AuditPublicKey>,
    ledger: Option<Box<dyn Ledger>>,
    record_index: bool,
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
            ledger: None,
            record_index: false,
            #[cfg(feature = "bench")]
            fsync_per_append: false,
        }
    }

    /// Keeps the record index (`index.sqlite`, docs/audit-log.md) that
    /// [`AuditLog::find_records`] answers from: derived from `audit.log`, brought up to date by
    /// a thread of its own at open and after each batch (never on the append path), and before
    /// each query. The daemon sets it; tools that only append or verify need not.
    #[must_use]
    pub fn with_record_index(mut self) -> Self {
        self.record_index = true;
        self
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

    /// The shared ledger of several nodes (PostgreSQL in the daemon), which then holds the truth:
    /// the log directory becomes this node's full local copy of it.
    ///
    /// At open, after the local replay, the log checks that its last record is the ledger's
    /// record at that index (a local copy ahead of the ledger, or differing from it, is refused
    /// as [`AuditError::LedgerMismatch`]), catches up with what other nodes appended, and adopts
    /// the ledger's latest checkpoint when it is newer. Each batch of appends is then stored in
    /// the ledger, which numbers it after whatever other nodes appended, before it is written
    /// locally; see the `ledger` module and docs/audit-log.md.
    ///
    /// Record times: each record carries the clock of the node that wrote it. Records of several
    /// nodes interleave in index order, so a record's time may be up to the nodes' clock skew
    /// earlier than the time of the record before it. Nothing relies on times being in order
    /// (the canonical form, the open-time scan, [`verify_export`](crate::verify_export) and
    /// `smartsign-ctl audit verify` check each time's form only): the index is the log's order.
    #[must_use]
    pub fn with_ledger(mut self, ledger: Box<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
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
    /// Records in the record index (0 without one); behind `tree_size` only briefly, while the
    /// index thread catches up.
    pub records_indexed: u64,
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
    queue: mpsc::Sender<Request>,
    writer: JoinHandle<()>,
    /// The thread that keeps the record index up to date, if the log keeps one.
    indexer: Option<JoinHandle<()>>,
    origin: Origin,
    clock: Arc<dyn Clock>,
    checkpoint_key: Option<AuditPublicKey>,
    /// Whether the log is a copy of a shared ledger (its writer holds the ledger).
    shared_ledger: bool,
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
    /// Held while `checkpoint.json` is replaced, which the writer (adopting the ledger's) and
    /// [`AuditLog::checkpoint`] both do.
    checkpoint_file: Mutex<()>,
    tree_size: AtomicU64,
    appends: AtomicU64,
    fsyncs: AtomicU64,
    /// Set once the open is over (the replay, and the catch-up from the ledger).
    records_scanned_at_open: AtomicU64,
    /// The record index, if the log keeps one; whoever holds the lock brings it up to date.
    /// `None` inside while it cannot be opened (a full disk): appends go on, queries fail, and
    /// the next catch-up tries again.
    index: Option<Mutex<Option<RecordIndex>>>,
    records_indexed: AtomicU64,
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
    /// The failure of the last call to the ledger, cleared by the next one that succeeds.
    ledger_failure: Option<LedgerError>,
}

type Reply<T> = oneshot::Sender<Result<T, AuditError>>;

/// What the writer thread is asked to do.
#[derive(Debug)]
enum Request {
    Append(Job),
    /// Catch up with the ledger and adopt its latest checkpoint when newer.
    Sync(Reply<Synced>),
    /// Store a checkpoint (its JSON) in the ledger if it covers more records than the ledger's
    /// latest.
    PutCheckpoint {
        tree_size: u64,
        note: Vec<u8>,
        reply: Reply<bool>,
    },
}

#[derive(Debug)]
struct Job {
    event: PreparedEvent,
    reply: Reply<AppendReceipt>,
}

/// The log after a sync with the ledger.
#[derive(Clone, Copy, Debug)]
struct Synced {
    tree_size: u64,
    /// The tree size of the ledger's latest checkpoint.
    ledger_checkpoint: Option<u64>,
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
    ///
    /// With a ledger ([`AuditLogConfig::with_ledger`]) the log then catches up with it; a ledger
    /// that cannot be reached fails the open.
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
        let replay = source.replay_checked(checkpoint.as_ref())?;
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
        let size = replay.tree.size();
        let dir_for_index = dir.clone();
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
                ledger_failure: None,
            }),
            latest_checkpoint: RwLock::new(checkpoint),
            checkpoint_file: Mutex::new(()),
            tree_size: AtomicU64::new(size),
            appends: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            records_scanned_at_open: AtomicU64::new(replay.scanned),
            index: config.record_index.then(|| {
                // Derived data: a log whose index cannot be opened still takes appends.
                let index = RecordIndex::open(&dir_for_index)
                    .inspect_err(|error| {
                        tracing::warn!(%error, "the audit record index cannot be opened yet");
                    })
                    .ok();
                Mutex::new(index)
            }),
            records_indexed: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
        });
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let shared_ledger = config.ledger.is_some();
        // One pending wake-up is enough: the index thread catches up to whatever is published.
        let (index_wake, index_wakes) = std::sync::mpsc::sync_channel(1);
        let mut writer = Writer {
            file,
            _lock: lock,
            receiver,
            shared: Arc::clone(&shared),
            clock: Arc::clone(&config.clock),
            ledger: config.ledger,
            ledger_down: false,
            origin: config.origin.clone(),
            checkpoint_key: config.checkpoint_key,
            tree: replay.tree,
            next_index: size,
            end: replay.end,
            failure: None,
            buf: Vec::new(),
            staged: Vec::new(),
            last_line: None,
            index_wake: shared.index.is_some().then_some(index_wake),
            #[cfg(feature = "bench")]
            fsync_per_append: config.fsync_per_append,
        };
        let caught_up = if shared_ledger {
            writer.join_ledger()?
        } else {
            0
        };
        // Records caught up from the ledger were fsynced before they entered the tree, so the
        // tree state may cover them.
        writer.tree.start_persister(
            shared.dir.clone(),
            (
                shared.offsets.path().to_owned(),
                shared.offsets.try_clone()?,
            ),
        )?;
        writer.tree.hand_off(true);
        let scanned = replay.scanned + caught_up;
        shared
            .records_scanned_at_open
            .store(scanned, Ordering::Relaxed);
        tracing::info!(
            path = %shared.log_path.display(),
            records = writer.tree.size(),
            scanned,
            caught_up,
            "audit log opened"
        );
        let indexer = match shared.index.is_some() {
            true => {
                let shared = Arc::clone(&shared);
                let thread = std::thread::Builder::new()
                    .name("audit-log-indexer".into())
                    .spawn(move || shared.run_indexer(&index_wakes))
                    .map_err(|error| AuditError::io("starting the audit index thread", error))?;
                Some(thread)
            }
            false => None,
        };
        let writer = std::thread::Builder::new()
            .name("audit-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|error| AuditError::io("starting the audit log writer thread", error))?;
        Ok(Self {
            shared,
            queue,
            writer,
            indexer,
            origin: config.origin,
            clock: config.clock,
            checkpoint_key: config.checkpoint_key,
            shared_ledger,
            checkpoint_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Appends `event` and returns once its record is durable on disk (written and fsynced,
    /// shared with whatever other appends were queued). Never blocks the async runtime.
    ///
    /// With a ledger, the record is durable in the ledger first (one transaction per batch),
    /// then in the local copy. A ledger that fails fails the append, which may or may not have
    /// reached the ledger; the log is not poisoned: the next append or [`AuditLog::sync`] brings
    /// in whatever the ledger holds, and appends work again once the ledger answers.
    ///
    /// Dropping the returned future after it started does not withdraw the event: it may still
    /// be written, unacknowledged.
    pub async fn append(&self, event: AuditEvent) -> Result<AppendReceipt, AuditError> {
        let event = PreparedEvent::new(&event)?;
        // Not the ledger's last failure: trying again is how the log finds the ledger back.
        self.writer_health()?;
        self.ask(|reply| Request::Append(Job { event, reply }))
            .await
    }

    /// Catches up with the ledger now: brings in the records other nodes appended and adopts the
    /// ledger's latest checkpoint when it is newer (checked as at open). Returns the tree size.
    /// Without a ledger, returns the tree size.
    pub async fn sync(&self) -> Result<u64, AuditError> {
        Ok(self.synced().await?.tree_size)
    }

    /// `Ok` while the log takes appends; otherwise why not (for `/readyz`). With a ledger, the
    /// failure of the last call to it (an append, a sync) is reported until a call succeeds:
    /// [`AuditLog::sync`] probes it.
    pub fn health(&self) -> Result<(), AuditError> {
        self.writer_health()?;
        match &self.state()?.ledger_failure {
            Some(error) => Err(AuditError::Ledger(error.clone())),
            None => Ok(()),
        }
    }

    /// `Ok` unless the writer stopped or failed (until the log is reopened).
    fn writer_health(&self) -> Result<(), AuditError> {
        if self.writer.is_finished() {
            return Err(AuditError::unavailable("the audit log writer has stopped"));
        }
        match &self.state()?.failure {
            Some(reason) => Err(AuditError::unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    /// Sends the writer `request`, made with the channel for its answer, and waits for it.
    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, AuditError> {
        let stopped = || AuditError::unavailable("the audit log writer has stopped");
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(request(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn synced(&self) -> Result<Synced, AuditError> {
        if !self.shared_ledger {
            return Ok(Synced {
                tree_size: self.tree_size(),
                ledger_checkpoint: None,
            });
        }
        self.ask(Request::Sync).await
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

    /// Up to `limit` records that `filter` matches, in index order, as NDJSON (each line exactly
    /// as stored, checked against its leaf hash like [`AuditLog::records`]), found through the
    /// record index ([`AuditLogConfig::with_record_index`]; without it, an error). The index is
    /// first brought up to the durable tree size, so every record durable when the call began
    /// is considered. The HTTP layer bounds `limit`.
    pub async fn find_records(
        &self,
        filter: RecordFilter,
        limit: u64,
    ) -> Result<RecordPage, AuditError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.find_records(&filter, limit))
            .await
            .map_err(|error| AuditError::unavailable(format!("query task failed: {error}")))?
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

    /// The latest stored checkpoint, if any has been made. With a ledger, the ledger's latest as
    /// of the last sync (or checkpoint), when it is newer than this node's.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        self.shared.latest_checkpoint()
    }

    /// Signs a checkpoint of the durable tree with `signer`, stores it durably (temporary file,
    /// fsync, rename, directory fsync) and returns it.
    ///
    /// With a ledger, the log first syncs, so that it signs the ledger's whole tree as this node
    /// knows it. When the ledger already holds a checkpoint of at least that size (another node
    /// signed it), that one is returned instead; otherwise the new one is stored in the ledger
    /// first, then locally. Either way the checkpoints of all nodes form one growing series.
    pub async fn checkpoint<S: CheckpointSigner>(
        &self,
        signer: &S,
    ) -> Result<Checkpoint, AuditError> {
        let _serial = self.checkpoint_lock.lock().await;
        let synced = self.synced().await?;
        let (tree_size, root_hash) = {
            let frontier = self.frontier()?;
            let size = frontier.size();
            // The current size's root needs only the frontier: no tile is read.
            let root = merkle::root(&mut self.shared.view(&frontier), size)?;
            (size, root)
        };
        if synced.ledger_checkpoint >= Some(tree_size)
            && let Some(latest) = self.latest_checkpoint()
            && latest.tree_size() >= tree_size
        {
            return Ok(latest);
        }
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
        if self.shared_ledger {
            let note = checkpoint.to_json();
            let stored = self
                .ask(|reply| Request::PutCheckpoint {
                    tree_size,
                    note,
                    reply,
                })
                .await?;
            if !stored {
                // Another node stored one at least as large since the sync: that one it is.
                self.synced().await?;
                return self
                    .latest_checkpoint()
                    .filter(|latest| latest.tree_size() >= tree_size)
                    .ok_or_else(|| {
                        AuditError::ledger_mismatch(format!(
                            "it refused a checkpoint of {tree_size} records as not the largest, \
                             yet its latest is smaller"
                        ))
                    });
            }
        }
        let shared = Arc::clone(&self.shared);
        let stored = checkpoint.clone();
        tokio::task::spawn_blocking(move || shared.store_checkpoint(&stored))
            .await
            .map_err(|error| {
                AuditError::unavailable(format!("checkpoint task failed: {error}"))
            })??;
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
            records_scanned_at_open: self.shared.records_scanned_at_open.load(Ordering::Relaxed),
            records_indexed: self.shared.records_indexed.load(Ordering::Relaxed),
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
        let Self {
            queue,
            writer,
            indexer,
            ..
        } = self;
        drop(queue);
        tokio::task::spawn_blocking(move || {
            writer
                .join()
                .map_err(|_| AuditError::unavailable("the audit log writer panicked"))?;
            // The writer held the index thread's wake-up sender: that thread ends now too.
            if let Some(indexer) = indexer {
                indexer
                    .join()
                    .map_err(|_| AuditError::unavailable("the audit index thread panicked"))?;
            }
            Ok(())
        })
        .await
        .map_err(|error| AuditError::unavailable(format!("closing task failed: {error}")))?
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

/// One page of [`AuditLog::find_records`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordPage {
    /// The matching records as NDJSON, each line exactly as stored.
    pub records: Vec<u8>,
    /// How many records `records` holds.
    pub count: u64,
    /// Where the next page starts: every record below it was considered. The tree size when the
    /// page was not full; after the last record returned when it was (more may match).
    pub next_from: u64,
}

impl Shared {
    /// The record index thread: catches up at start, then each time the writer publishes. A
    /// failure is logged and tried again at the next wake-up; queries catch up themselves.
    fn run_indexer(&self, wakes: &std::sync::mpsc::Receiver<()>) {
        // A failing index (a full disk) is reported once a minute, not at every batch.
        let mut warned: Option<std::time::Instant> = None;
        loop {
            match self.catch_up_index() {
                Ok(()) => warned = None,
                Err(error) => {
                    if warned.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60)) {
                        tracing::warn!(%error, "the audit record index could not catch up; \
                            appends go on, queries by filter fail until it does");
                        warned = Some(std::time::Instant::now());
                    }
                }
            }
            if wakes.recv().is_err() {
                return;
            }
            // Let a few batches gather: one transaction for all of them costs far less CPU,
            // which the writer shares, than one per batch. Queries catch up themselves.
            std::thread::sleep(INDEX_DELAY);
        }
    }

    fn catch_up_index(&self) -> Result<(), AuditError> {
        if self.index.is_none() {
            return Ok(());
        }
        self.with_index(|index| self.catch_up_locked(index).map(drop))
    }

    /// Runs `call` on the record index under its lock, opening it first if it could not be
    /// opened before.
    fn with_index<T>(
        &self,
        call: impl FnOnce(&mut RecordIndex) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let Some(slot) = &self.index else {
            return Err(AuditError::Index(
                "this log was opened without its record index".into(),
            ));
        };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let index = match &mut *slot {
            Some(index) => index,
            None => slot.insert(RecordIndex::open(&self.dir)?),
        };
        call(index)
    }

    /// Brings the index up to the durable tree: checks that its last record is this log's
    /// (rebuilding it otherwise), then adds the records after it, a page per transaction.
    /// Returns the tree it caught up to and where its last record ends.
    fn catch_up_locked(&self, index: &mut RecordIndex) -> Result<(Arc<Frontier>, u64), AuditError> {
        let (frontier, end) = {
            let state = self
                .state
                .read()
                .map_err(|_| AuditError::unavailable("the audit log writer panicked"))?;
            (Arc::clone(&state.frontier), state.end)
        };
        let size = frontier.size();
        let (mut indexed, last) = index.indexed()?;
        let belongs = match (indexed.checked_sub(1), last) {
            (None, _) => true,
            (Some(last_index), Some(leaf)) if indexed <= size => {
                self.view(&frontier).node(0, last_index)? == leaf
            }
            _ => false,
        };
        if !belongs {
            tracing::warn!(
                indexed,
                tree_size = size,
                "the audit record index does not match the log; rebuilding it"
            );
            index.clear()?;
            indexed = 0;
        }
        while indexed < size {
            let to = indexed.saturating_add(INDEX_PAGE).min(size);
            let page = self.read_records(indexed..to, &frontier, end)?;
            let mut rows = Vec::with_capacity((to - indexed) as usize);
            let mut last_leaf = None;
            for (line, record) in page.split_inclusive(|&b| b == b'\n').zip(indexed..) {
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                let row = Row::of_line(line)
                    .map_err(|reason| AuditError::Index(format!("record {record}: {reason}")))?;
                rows.push(row);
                last_leaf = Some(leaf_hash(line));
            }
            if let Some(last_leaf) = last_leaf {
                index.add(indexed, &rows, &last_leaf)?;
            }
            indexed = to;
            self.records_indexed.store(indexed, Ordering::Relaxed);
        }
        self.records_indexed.store(indexed, Ordering::Relaxed);
        Ok((frontier, end))
    }

    fn find_records(&self, filter: &RecordFilter, limit: u64) -> Result<RecordPage, AuditError> {
        let (frontier, end, found) = self.with_index(|index| {
            let (frontier, end) = self.catch_up_locked(index)?;
            let found = index.find(filter, frontier.size(), limit)?;
            Ok((frontier, end, found))
        })?;
        let size = frontier.size();
        let mut records = Vec::new();
        // Consecutive indexes are read as one range.
        let mut run: Option<Range<u64>> = None;
        for &record in &found {
            match &mut run {
                Some(range) if range.end == record => range.end += 1,
                _ => {
                    if let Some(range) = run.take() {
                        records.extend(self.read_records(range, &frontier, end)?);
                    }
                    run = Some(record..record + 1);
                }
            }
        }
        if let Some(range) = run {
            records.extend(self.read_records(range, &frontier, end)?);
        }
        let count = found.len() as u64;
        let next_from = match found.last() {
            Some(last) if count == limit => last + 1,
            _ => size.max(filter.from),
        };
        Ok(RecordPage {
            records,
            count,
            next_from,
        })
    }

    fn latest_checkpoint(&self) -> Option<Checkpoint> {
        // Only a panic while replacing the value poisons the lock; the value is whole either way.
        self.latest_checkpoint
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `checkpoint` the latest, stored durably (temporary file, fsync, rename, directory
    /// fsync), unless the latest is already it or covers more records: the stored checkpoint
    /// only grows. Returns whether it was stored.
    fn store_checkpoint(&self, checkpoint: &Checkpoint) -> Result<bool, AuditError> {
        let _file = self
            .checkpoint_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(latest) = self.latest_checkpoint()
            && (latest == *checkpoint || latest.tree_size() > checkpoint.tree_size())
        {
            return Ok(false);
        }
        let json = checkpoint.to_json();
        // The history first: a checkpoint in force is always in it (a crash between the two
        // leaves one in the history that the next store repeats, which a reader skips).
        append_line(&self.dir, CHECKPOINT_HISTORY_FILE, &json)?;
        write_atomically(&self.dir, CHECKPOINT_FILE, CHECKPOINT_TEMP_FILE, &json)?;
        *self
            .latest_checkpoint
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(checkpoint.clone());
        Ok(true)
    }

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

/// The writer thread: the only code that writes `audit.log` after open, and the only user of the
/// ledger.
struct Writer {
    file: File,
    /// Holds the directory's advisory lock for as long as the writer lives.
    _lock: File,
    receiver: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    ledger: Option<Box<dyn Ledger>>,
    /// Whether the last call to the ledger failed (mirrored in `State::ledger_failure`).
    ledger_down: bool,
    origin: Origin,
    checkpoint_key: Option<AuditPublicKey>,
    tree: Tree,
    next_index: u64,
    end: u64,
    failure: Option<String>,
    /// The lines of the next write, each with its newline.
    buf: Vec<u8>,
    /// Each line of `buf`: its bytes there, newline included, and its leaf hash.
    staged: Vec<(Range<usize>, TreeHash)>,
    /// The local copy's last line (with a ledger): the ledger's record before the next batch
    /// must be this one.
    last_line: Option<Vec<u8>>,
    /// Wakes the record index thread once a batch is published (after its fsync).
    index_wake: Option<std::sync::mpsc::SyncSender<()>>,
    #[cfg(feature = "bench")]
    fsync_per_append: bool,
}

/// Events of one batch with the times the writer gave them, apart from their appenders' replies
/// so that the ledger's batch closure (which must be `Send`) can borrow them.
type Timed = Vec<(PreparedEvent, Timestamp)>;

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::new();
        // Ends when every sender is gone: the log was dropped or closed.
        while let Some(request) = self.receiver.blocking_recv() {
            let mut next = Some(request);
            while let Some(request) = next.take() {
                match request {
                    Request::Append(job) => {
                        let mut bytes = job.event.approximate_len();
                        batch.push(job);
                        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                            match self.receiver.try_recv() {
                                Ok(Request::Append(job)) => {
                                    bytes += job.event.approximate_len();
                                    batch.push(job);
                                }
                                // Served once this batch is committed.
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.commit(&mut batch);
                    }
                    Request::Sync(reply) => {
                        let _ = reply.send(self.sync());
                    }
                    Request::PutCheckpoint {
                        tree_size,
                        note,
                        reply,
                    } => {
                        let stored =
                            self.ledger_call(|ledger| ledger.put_checkpoint(tree_size, &note));
                        let _ = reply.send(stored);
                    }
                }
            }
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
        let mut events = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            match Timestamp::from_system_time(self.clock.now()) {
                Ok(time) => {
                    events.push((job.event, time));
                    replies.push(job.reply);
                }
                Err(error) => {
                    let _ = job.reply.send(Err(error));
                }
            }
        }
        #[cfg(feature = "bench")]
        if self.fsync_per_append {
            for (event, reply) in events.into_iter().zip(replies) {
                self.record(vec![event], vec![reply]);
            }
            return;
        }
        if !events.is_empty() {
            self.record(events, replies);
        }
    }

    /// Records one batch: in the ledger first when there is one (which numbers it after what
    /// other nodes appended, and hands those records back), then in the local copy with one
    /// write and one fsync; then answers its appenders.
    fn record(&mut self, events: Timed, replies: Vec<Reply<AppendReceipt>>) {
        self.buf.clear();
        self.staged.clear();
        let mut first = self.next_index;
        if self.ledger.is_some() {
            match self.append_to_ledger(&events) {
                Ok(numbered) => first = numbered,
                Err(error) => return answer(replies, || error.duplicate()),
            }
        }
        let ours = self.staged.len();
        for ((event, time), index) in events.iter().zip(first..) {
            let start = self.buf.len();
            event.render(index, time, &mut self.buf);
            let leaf_hash = leaf_hash(&self.buf[start..]);
            self.buf.push(b'\n');
            self.staged.push((start..self.buf.len(), leaf_hash));
        }
        let tree_size = match self.write_staged() {
            Ok(tree_size) => tree_size,
            Err(reason) => return answer(replies, || AuditError::unavailable(reason.clone())),
        };
        self.shared
            .appends
            .fetch_add(replies.len() as u64, Ordering::Relaxed);
        let receipts = events.into_iter().zip(&self.staged[ours..]).zip(first..);
        for ((((_, time), &(_, leaf_hash)), index), reply) in receipts.zip(replies) {
            let receipt = AppendReceipt {
                index,
                leaf_hash,
                time,
                tree_size,
            };
            let _ = reply.send(Ok(receipt));
        }
        self.tree.hand_off(false);
    }

    /// Stores the batch in the ledger and stages the records other nodes appended before it.
    /// Returns the index of the batch's first record.
    ///
    /// A failed append may still have reached the ledger: its records are then brought in as
    /// other nodes' are, by the next append or sync (their appenders were told of the failure,
    /// so nothing acted on them). A record from the ledger that does not check stops the log
    /// until it is reopened, before anything else is stored on top of it.
    fn append_to_ledger(&mut self, events: &Timed) -> Result<u64, AuditError> {
        let from = self.next_index;
        let mut numbered = None;
        let previous = self.last_line.clone();
        let appended = self.ledger_call(|ledger| {
            let others = ledger.append(from, previous.as_deref(), &mut |first| {
                numbered = Some(first);
                let lines = events
                    .iter()
                    .zip(first..)
                    .map(|((event, time), index)| {
                        let mut line = Vec::with_capacity(event.approximate_len());
                        event.render(index, time, &mut line);
                        line
                    })
                    .collect();
                Ok(lines)
            })?;
            let expected = from + others.len() as u64;
            match numbered {
                Some(first) if first == expected => Ok(others),
                _ => Err(LedgerError::Inconsistent(format!(
                    "it returned {} records from index {from} but numbered the batch from {}",
                    others.len(),
                    numbered.map_or_else(|| "nowhere".to_owned(), |first| first.to_string())
                ))),
            }
        });
        let others = match appended {
            Ok(others) => others,
            // Not the log this node holds: nothing more is appended on either side of the fork
            // until an operator looks.
            Err(AuditError::Ledger(LedgerError::Inconsistent(reason))) => {
                let error = AuditError::ledger_mismatch(reason);
                self.fail(error.to_string());
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        self.stage_from_ledger(from, &others)?;
        Ok(from + others.len() as u64)
    }

    /// At open: checks that the local copy is where the ledger's records begin (its last record
    /// is the ledger's record of that index), then syncs. Returns how many records it caught up.
    fn join_ledger(&mut self) -> Result<u64, AuditError> {
        let size = self.tree.size();
        if let Some(last) = size.checked_sub(1) {
            let local = self
                .shared
                .read_records(last..size, self.tree.frontier(), self.end)?;
            let local = local.strip_suffix(b"\n").unwrap_or(&local);
            let ledger = self.ledger_call(|ledger| ledger.read(last, 1))?;
            match ledger.first() {
                None => {
                    return Err(AuditError::ledger_mismatch(format!(
                        "the local copy holds {size} records, the ledger fewer: it was replaced or \
                         restored from an older backup, and records this node acknowledged are \
                         not in it"
                    )));
                }
                Some(line) if line != local => {
                    return Err(AuditError::ledger_mismatch(format!(
                        "record {last} of the local copy differs from the ledger's: they are not \
                         the same log"
                    )));
                }
                Some(_) => {}
            }
            self.last_line = Some(local.to_vec());
        }
        self.sync()?;
        Ok(self.tree.size() - size)
    }

    /// Catches up with the ledger, then adopts its latest checkpoint when newer than the local
    /// one. The checkpoint is read first: one is stored only once the records it covers are, so
    /// the records read after it cover it.
    fn sync(&mut self) -> Result<Synced, AuditError> {
        if self.ledger.is_none() {
            return Ok(Synced {
                tree_size: self.tree.size(),
                ledger_checkpoint: None,
            });
        }
        if let Some(reason) = &self.failure {
            return Err(AuditError::unavailable(reason.clone()));
        }
        let note = self.ledger_call(|ledger| ledger.latest_checkpoint())?;
        self.catch_up()?;
        let ledger_checkpoint = match note {
            Some(note) => Some(self.adopt_checkpoint(&note)?),
            None => None,
        };
        Ok(Synced {
            tree_size: self.tree.size(),
            ledger_checkpoint,
        })
    }

    /// Brings in the records the ledger holds after the local copy, a page at a time: each page
    /// checked, written and fsynced, then published.
    fn catch_up(&mut self) -> Result<(), AuditError> {
        loop {
            let from = self.next_index;
            let lines = self.ledger_call(|ledger| ledger.read(from, LEDGER_PAGE))?;
            if lines.is_empty() {
                return Ok(());
            }
            self.buf.clear();
            self.staged.clear();
            self.stage_from_ledger(from, &lines)?;
            self.write_staged().map_err(AuditError::unavailable)?;
            self.tree.hand_off(false);
        }
    }

    /// Checks lines from the ledger as the open-time scan checks the local file (each a record
    /// in its one spelling, with indexes `from`, `from + 1`, ...) and stages them for the next
    /// write. A line that does not check stops the log until it is reopened.
    fn stage_from_ledger(&mut self, from: u64, lines: &[Vec<u8>]) -> Result<(), AuditError> {
        for (line, index) in lines.iter().zip(from..) {
            let problem = match check_line(line) {
                Ok(found) if found == index => None,
                Ok(found) => Some(format!("it holds index {found}")),
                Err(reason) => Some(reason),
            };
            if let Some(problem) = problem {
                let error = AuditError::ledger_mismatch(format!(
                    "its record {index} is refused: {problem}"
                ));
                self.fail(error.to_string());
                return Err(error);
            }
            let start = self.buf.len();
            self.buf.extend_from_slice(line);
            self.buf.push(b'\n');
            self.staged.push((start..self.buf.len(), leaf_hash(line)));
        }
        Ok(())
    }

    /// Checks a checkpoint from the ledger as the stored one is checked at open (origin,
    /// signature with a key, size and root against the tree) and makes it the latest when it is
    /// newer. Returns its tree size.
    fn adopt_checkpoint(&self, note: &[u8]) -> Result<u64, AuditError> {
        let mismatch = |reason: String| {
            AuditError::ledger_mismatch(format!("its latest checkpoint: {reason}"))
        };
        let checkpoint =
            Checkpoint::from_json(note).map_err(|error| mismatch(error.to_string()))?;
        if checkpoint.origin() != &self.origin {
            return Err(mismatch(format!(
                "origin {:?} is not this log's {:?}",
                checkpoint.origin().as_str(),
                self.origin.as_str()
            )));
        }
        if let Some(key) = &self.checkpoint_key {
            checkpoint
                .verify(key)
                .map_err(|error| mismatch(error.to_string()))?;
        }
        let tree_size = checkpoint.tree_size();
        if tree_size > self.tree.size() {
            return Err(mismatch(format!(
                "it covers {tree_size} records, the ledger holds {}",
                self.tree.size()
            )));
        }
        let root = merkle::root(&mut self.shared.view(self.tree.frontier()), tree_size)?;
        if root != *checkpoint.root_hash() {
            return Err(mismatch(format!(
                "the first {tree_size} records have root {root}, the checkpoint says {}",
                checkpoint.root_hash()
            )));
        }
        if self.shared.store_checkpoint(&checkpoint)? {
            tracing::info!(tree_size, "audit checkpoint adopted from the ledger");
        }
        Ok(tree_size)
    }

    /// Calls the ledger and keeps `State::ledger_failure` up to date with the outcome.
    fn ledger_call<T>(
        &mut self,
        call: impl FnOnce(&mut dyn Ledger) -> Result<T, LedgerError>,
    ) -> Result<T, AuditError> {
        let Some(ledger) = self.ledger.as_mut() else {
            return Err(AuditError::unavailable("the audit log has no ledger"));
        };
        let result = call(ledger.as_mut());
        match &result {
            Err(error) => {
                tracing::error!(%error, "the audit ledger failed; appends fail until it answers");
                self.ledger_down = true;
                self.set_ledger_failure(Some(error.clone()));
            }
            Ok(_) if self.ledger_down => {
                tracing::info!("the audit ledger answers again");
                self.ledger_down = false;
                self.set_ledger_failure(None);
            }
            Ok(_) => {}
        }
        result.map_err(AuditError::from)
    }

    fn set_ledger_failure(&self, failure: Option<LedgerError>) {
        // Only this thread takes the write lock; a poisoned lock holds a whole value.
        self.shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .ledger_failure = failure;
    }

    /// Writes the staged lines at the end of the file with one write and one fsync, then records
    /// their offsets and leaves and publishes them. Returns the new tree size, or why the write
    /// failed (the log then refuses appends until reopened).
    fn write_staged(&mut self) -> Result<u64, String> {
        if let Some(reason) = &self.failure {
            return Err(reason.clone());
        }
        let (Some(first), Some(last)) = (self.staged.first(), self.staged.last()) else {
            return Ok(self.tree.size());
        };
        let range = first.0.start..last.0.end;
        let bytes = &self.buf[range.clone()];
        let path = &self.shared.log_path;
        #[cfg(test)]
        if self.shared.fail_next_write.swap(false, Ordering::Relaxed) {
            let _ = self.file.write_all_at(&bytes[..bytes.len() / 2], self.end);
            let reason = "injected write failure".to_owned();
            self.fail(reason.clone());
            return Err(reason);
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
            return Err(reason);
        }
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.last_line = self
            .staged
            .last()
            .map(|(line, _)| self.buf[line.start..line.end - 1].to_vec());

        let base = self.end - range.start as u64;
        self.end = base + range.end as u64;
        // The offsets and the tiles the lines fill are written before the size that needs them
        // is published. They are derived from audit.log, which now holds the records, so a
        // failure here does not undo the write: the caller answers its appends, and later ones
        // are refused.
        let starts: Vec<u64> = self
            .staged
            .iter()
            .map(|(bytes, _)| base + bytes.start as u64)
            .collect();
        let mut derived = self.shared.offsets.write(self.next_index, &starts);
        for (bytes, leaf_hash) in &self.staged {
            // Every leaf goes in, even after a failure, so that the tree stays the log's.
            let pushed = self.tree.push(*leaf_hash, base + bytes.end as u64);
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
            Err(_) => return Err("audit log state lock poisoned".to_owned()),
        }
        self.next_index = tree_size;
        self.shared.tree_size.store(tree_size, Ordering::Release);
        if let Some(wake) = &self.index_wake {
            // Full means a wake-up is pending already, which covers this batch too.
            let _ = wake.try_send(());
        }
        if let Err(error) = derived {
            // Before the answers, so that an appender told of success sees the refusal next.
            self.tree.stop_persisting();
            self.fail(format!("writing the audit tree failed: {error}"));
        }
        Ok(tree_size)
    }

    /// After a failed write or fsync nothing about the file's tail can be trusted (a failed
    /// fsync may have dropped dirty pages): refuse appends until an operator reopens the log,
    /// whose scan decides what is there. After a failed tile or offsets write the records are
    /// durable and `end` already includes them, so nothing is cut; the reopened log rebuilds
    /// what is missing. With a ledger, records it committed that the local copy lost are
    /// brought back by the catch-up of the reopened log.
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

/// Answers every appender of a batch with the error `error` makes.
fn answer<T>(replies: Vec<Reply<T>>, error: impl Fn() -> AuditError) {
    for reply in replies {
        // The appender may have gone away; nobody else to tell.
        let _ = reply.send(Err(error()));
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

    fn account_event(i: u64) -> AuditEvent {
        let (event, actor) = match i % 3 {
            0 => ("signing.requested", "service:demo-a"),
            1 => ("signing.signed", "gateway:app"),
            _ => ("account.suspended", "registrar:reg"),
        };
        let mut event = AuditEvent::new(EventName::new(event).unwrap(), Actor::new(actor).unwrap())
            .with_field("account_id", format!("u-{}", i % 4))
            .with_field("request_id", format!("r-{i}"));
        if i % 3 == 1 {
            event = event.with_field("service", "demo-b");
        }
        event
    }

    fn indexes(page: &RecordPage) -> Vec<u64> {
        page.records
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| check_line(line).unwrap())
            .collect()
    }

    async fn wait_indexed(log: &AuditLog, size: u64) {
        for _ in 0..500 {
            if log.stats().records_indexed == size {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not indexed: {:?}", log.stats());
    }

    /// Filters find exactly the matching records, in order; paging with `next_from` gives each
    /// once; a query sees every record durable before it.
    #[tokio::test]
    async fn the_record_index_answers_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), config().with_record_index())
            .await
            .unwrap();
        for i in 0..50 {
            log.append(account_event(i)).await.unwrap();
        }
        let account = |from| RecordFilter {
            account_id: Some("u-1".into()),
            ..RecordFilter::from_index(from)
        };
        let all = log.find_records(account(0), 1000).await.unwrap();
        let expected: Vec<u64> = (0..50).filter(|i| i % 4 == 1).collect();
        assert_eq!(indexes(&all), expected);
        assert_eq!(all.next_from, 50);
        // Pages of 3: every record once, in order.
        let mut paged = Vec::new();
        let mut from = 0;
        loop {
            let page = log.find_records(account(from), 3).await.unwrap();
            paged.extend(indexes(&page));
            if page.count < 3 {
                break;
            }
            from = page.next_from;
        }
        assert_eq!(paged, expected);
        let by_event = RecordFilter {
            event: Some("signing.signed".into()),
            ..RecordFilter::default()
        };
        let signed = log.find_records(by_event, 1000).await.unwrap();
        assert_eq!(
            indexes(&signed),
            (0..50).filter(|i| i % 3 == 1).collect::<Vec<_>>()
        );
        // The service: a `service` field, or a service that acted.
        for (service, expected) in [("demo-b", 1), ("demo-a", 0)] {
            let filter = RecordFilter {
                service: Some(service.into()),
                ..RecordFilter::default()
            };
            let page = log.find_records(filter, 1000).await.unwrap();
            assert_eq!(
                indexes(&page),
                (0..50).filter(|i| i % 3 == expected).collect::<Vec<_>>()
            );
        }
        let one = RecordFilter {
            request_id: Some("r-7".into()),
            ..RecordFilter::default()
        };
        assert_eq!(indexes(&log.find_records(one, 10).await.unwrap()), vec![7]);
        // Fixed clock: every record has the same time.
        let time = |text: &str| Some(Timestamp::parse(text).unwrap());
        let window = RecordFilter {
            from_time: time("2026-11-22T10:00:00Z"),
            to_time: time("2026-11-22T10:00:01Z"),
            ..RecordFilter::default()
        };
        assert_eq!(log.find_records(window, 1000).await.unwrap().count, 50);
        let before = RecordFilter {
            to_time: time("2026-11-22T10:00:00Z"),
            ..RecordFilter::default()
        };
        assert_eq!(log.find_records(before, 1000).await.unwrap().count, 0);
        // Appended just now: found at once, whatever the index thread is doing.
        log.append(account_event(53)).await.unwrap();
        let page = log.find_records(account(50), 10).await.unwrap();
        assert_eq!(indexes(&page), vec![50]);
        log.close().await.unwrap();
    }

    /// Records durable on disk but not in the index (a crash between the batch and its
    /// indexing, or appended while the log was opened without the index) are indexed at open;
    /// an index of another log is rebuilt.
    #[tokio::test]
    async fn the_record_index_catches_up_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), config().with_record_index())
            .await
            .unwrap();
        for i in 0..10 {
            log.append(account_event(i)).await.unwrap();
        }
        wait_indexed(&log, 10).await;
        log.close().await.unwrap();
        // Records appended while the log was opened without its index.
        let log = AuditLog::open(dir.path(), config()).await.unwrap();
        let leaf5 = log.leaf_hash(5).unwrap().unwrap();
        for i in 10..20 {
            log.append(account_event(i)).await.unwrap();
        }
        log.close().await.unwrap();
        // And a crash after the batches of records 6..10 were durable, before their rows were
        // committed: the index ends at record 5, as such a crash leaves it.
        let index = rusqlite::Connection::open(dir.path().join(crate::index::INDEX_FILE)).unwrap();
        index
            .execute("DELETE FROM records WHERE idx >= 6", [])
            .unwrap();
        index
            .execute(
                "UPDATE last SET idx = 5, leaf_hash = ?1",
                [leaf5.as_bytes().as_slice()],
            )
            .unwrap();
        drop(index);

        let log = AuditLog::open(dir.path(), config().with_record_index())
            .await
            .unwrap();
        wait_indexed(&log, 20).await;
        let rows = |dir: &Path| {
            let index = rusqlite::Connection::open(dir.join(crate::index::INDEX_FILE)).unwrap();
            index
                .query_row("SELECT count(*), max(idx) FROM records", [], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
                })
                .unwrap()
        };
        assert_eq!(rows(dir.path()), (20, 19));
        let filter = RecordFilter {
            account_id: Some("u-2".into()),
            ..RecordFilter::default()
        };
        let page = log.find_records(filter.clone(), 100).await.unwrap();
        assert_eq!(indexes(&page), vec![2, 6, 10, 14, 18]);
        log.close().await.unwrap();

        // An index whose last record is not this log's: rebuilt from the log.
        let index = rusqlite::Connection::open(dir.path().join(crate::index::INDEX_FILE)).unwrap();
        index
            .execute_batch(
                "UPDATE last SET leaf_hash = zeroblob(32); DELETE FROM records WHERE idx = 3",
            )
            .unwrap();
        drop(index);
        let log = AuditLog::open(dir.path(), config().with_record_index())
            .await
            .unwrap();
        let page = log
            .find_records(RecordFilter::from_index(0), 100)
            .await
            .unwrap();
        assert_eq!(page.count, 20);
        assert_eq!(rows(dir.path()), (20, 19));
        log.close().await.unwrap();
    }

    /// An index that cannot be opened never stops the log: appends go on, queries by filter
    /// fail, and once it can be opened it catches up.
    #[tokio::test]
    async fn a_record_index_that_cannot_be_opened_does_not_stop_appends() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join(crate::index::INDEX_FILE);
        fs::create_dir_all(blocker.join("in-the-way")).unwrap();
        let log = AuditLog::open(dir.path(), config().with_record_index())
            .await
            .unwrap();
        for i in 0..5 {
            log.append(account_event(i)).await.unwrap();
        }
        let error = log
            .find_records(RecordFilter::from_index(0), 10)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Unavailable, "{error}");
        fs::remove_dir_all(&blocker).unwrap();
        let page = log
            .find_records(RecordFilter::from_index(0), 10)
            .await
            .unwrap();
        assert_eq!(page.count, 5);
        log.close().await.unwrap();
    }
}
