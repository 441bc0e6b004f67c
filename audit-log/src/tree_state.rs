//! The tree as its writer keeps it ([`Tree`]): the frontier, the full tiles it writes as they
//! fill, and the durable tree state from which the next open starts.
//!
//! The tree state file, `tree-state`, names a tree size at a level-0 tile boundary (a multiple of
//! 256), where the leaves' source (`audit.log`) ends at that size, and the partial tiles of levels
//! 1 and up there; every full tile of that tree is on disk. A background thread writes it
//! (temporary file, fsync, rename, directory fsync) only after fsyncing the tiles it covers and the
//! offsets file, every [`STATE_EVERY_TILES`] level-0 tiles and when the log closes: appends never
//! wait for it, and the records an open must hash stay bounded.
//!
//! The tree is fed leaf hashes in order and knows nothing of records, so that another source of
//! leaves (a database) can feed it the same way.
//!
//! Layout of `tree-state`, integers big-endian:
//!
//! ```text
//! "smartsign-tree/1"   16 bytes
//! size                  8 bytes, a multiple of 256
//! log end               8 bytes, the byte offset in audit.log where record `size` starts
//! hashes                32 bytes each: the partial tile of level 1, then of level 2, ...
//!                       ((size / 256^L) mod 256 hashes for level L, up to the top level)
//! SHA-256               32 bytes, of everything above
//! ```

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::mem;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::error::AuditError;
use crate::files::{sync_dir, write_atomically};
use crate::merkle::TreeHash;
use crate::tiles::{Frontier, TILE_WIDTH, TileStore, levels, partial_width};

/// The tree state in the log directory.
pub(crate) const TREE_STATE_FILE: &str = "tree-state";
pub(crate) const TREE_STATE_TEMP_FILE: &str = "tree-state.tmp";
const MAGIC: &[u8; 16] = b"smartsign-tree/1";
/// Magic, size and log end.
const HEADER_LEN: usize = 32;

/// Level-0 tiles (of 256 records) between two writes of the tree state: 16,384 records, so that
/// an open after a crash hashes at most that many more records than after a clean close, while
/// the fixed cost of a state write (about five fsyncs, in the background) stays rare.
const STATE_EVERY_TILES: u64 = 64;

/// A tree at a level-0 tile boundary and where the log ends there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TreeState {
    pub(crate) frontier: Frontier,
    pub(crate) log_end: u64,
}

impl TreeState {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + 32 * (self.frontier.hashes() + 1));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.frontier.size().to_be_bytes());
        bytes.extend_from_slice(&self.log_end.to_be_bytes());
        for hash in self.frontier.upper_rows().flatten() {
            bytes.extend_from_slice(hash.as_bytes());
        }
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        bytes.extend_from_slice(&digest);
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (body, digest) = bytes
            .split_last_chunk::<32>()
            .filter(|(body, _)| body.len() >= HEADER_LEN)
            .ok_or_else(|| format!("{} bytes are too few for a tree state", bytes.len()))?;
        if <[u8; 32]>::from(Sha256::digest(body)) != *digest {
            return Err("its checksum does not match its contents".into());
        }
        let (header, hashes) = body.split_at(HEADER_LEN);
        if header[..16] != MAGIC[..] {
            return Err("it does not start with \"smartsign-tree/1\"".into());
        }
        let word = |at: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&header[at..at + 8]);
            u64::from_be_bytes(word)
        };
        let (size, log_end) = (word(16), word(24));
        if size % TILE_WIDTH as u64 != 0 {
            return Err(format!("its size {size} is not a multiple of {TILE_WIDTH}"));
        }
        let widths: Vec<usize> = (1..levels(size))
            .map(|level| partial_width(size, level))
            .collect();
        if hashes.len() != 32 * widths.iter().sum::<usize>() {
            return Err(format!(
                "it holds {} bytes of hashes, a tree of {size} needs {}",
                hashes.len(),
                32 * widths.iter().sum::<usize>()
            ));
        }
        let mut hashes = hashes.chunks_exact(32).map(|chunk| {
            let mut hash = [0; 32];
            hash.copy_from_slice(chunk);
            TreeHash::from_bytes(hash)
        });
        let rows = widths
            .iter()
            .map(|&width| hashes.by_ref().take(width).collect())
            .collect();
        let frontier = Frontier::at_tile_boundary(size, rows)
            .ok_or_else(|| format!("its partial tiles do not fit a tree of {size}"))?;
        Ok(Self { frontier, log_end })
    }

    /// Reads `tree-state` from `dir`: `None` when there is none, [`AuditError::DerivedMismatch`]
    /// when it is damaged.
    pub(crate) fn load(dir: &Path) -> Result<Option<Self>, AuditError> {
        let path = dir.join(TREE_STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(AuditError::io(format!("reading {}", path.display()), error)),
        };
        Self::decode(&bytes)
            .map(Some)
            .map_err(|reason| AuditError::derived(path, reason))
    }
}

/// What the writer has handed to the persister and the persister has not yet made durable.
#[derive(Debug, Default)]
struct Due {
    /// Full tiles written, per level (tiles of a level are written in order).
    written: Vec<Range<u64>>,
    state: Option<TreeState>,
    stop: bool,
}

#[derive(Debug, Default)]
struct Inbox {
    due: Mutex<Due>,
    wake: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Due> {
        // Only whole values are stored under the lock; a panic cannot leave one half-made.
        self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Adds `more` to the tile ranges of `into`: per level, both are runs of consecutive tiles
/// that meet (or one is empty).
fn merge(into: &mut Vec<Range<u64>>, more: Vec<Range<u64>>) {
    for (level, range) in more.into_iter().enumerate() {
        if into.len() <= level {
            into.push(range);
        } else if into[level].is_empty() {
            into[level] = range;
        } else if !range.is_empty() {
            let known = &mut into[level];
            *known = known.start.min(range.start)..known.end.max(range.end);
        }
    }
}

/// The writer's tree: the frontier, the tiles it fills, and what it hands to the persister.
#[derive(Debug)]
pub(crate) struct Tree {
    frontier: Frontier,
    store: TileStore,
    /// Where the log ends at the last level-0 tile boundary.
    boundary_log_end: u64,
    /// Full tiles written and not yet handed to the persister, per level.
    written: Vec<Range<u64>>,
    /// The size of the last tree state handed to the persister or loaded at open.
    handed_off: u64,
    /// Set when a tile (or a file the state vouches for) could not be written: no later tree
    /// state may claim it.
    damaged: bool,
    inbox: Arc<Inbox>,
    persister: Option<JoinHandle<()>>,
}

impl Tree {
    /// The empty tree, or the tree of a durable state, over the tiles of `store`.
    pub(crate) fn new(store: TileStore, start: Option<TreeState>) -> Self {
        let (frontier, log_end) =
            start.map_or_else(Default::default, |state| (state.frontier, state.log_end));
        Self {
            handed_off: frontier.size(),
            frontier,
            store,
            boundary_log_end: log_end,
            written: Vec::new(),
            damaged: false,
            inbox: Arc::default(),
            persister: None,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.frontier.size()
    }

    pub(crate) fn frontier(&self) -> &Frontier {
        &self.frontier
    }

    /// Appends the leaf of a record that ends at byte `log_end` of the log and writes the tiles
    /// it fills. The frontier takes the leaf even when a tile write fails, so that it stays the
    /// tree of the log; the failed tile is then never claimed by a tree state.
    pub(crate) fn push(&mut self, leaf: TreeHash, log_end: u64) -> Result<(), AuditError> {
        let mut result = Ok(());
        for tile in self.frontier.push(leaf) {
            let level = tile.level as usize;
            if self.written.len() <= level {
                self.written.resize(level + 1, 0..0);
            }
            let range = &mut self.written[level];
            if range.is_empty() {
                *range = tile.index..tile.index;
            }
            range.end = tile.index + 1;
            if level == 0 {
                self.boundary_log_end = log_end;
            }
            if let Err(error) = self.store.write(&tile) {
                self.damaged = true;
                result = result.and(Err(error));
            }
        }
        result
    }

    /// Hands no more tree states to the persister: a file the next one would vouch for (the
    /// log's offsets) could not be written. The next open starts from the last state written.
    pub(crate) fn stop_persisting(&mut self) {
        self.damaged = true;
    }

    /// Starts the thread that makes tiles durable and writes the tree state in `dir`.
    /// `companion` is a file the state vouches for too (the log's offsets), fsynced before it.
    pub(crate) fn start_persister(
        &mut self,
        dir: PathBuf,
        companion: (PathBuf, File),
    ) -> Result<(), AuditError> {
        let inbox = Arc::clone(&self.inbox);
        let store = self.store.clone();
        let thread = std::thread::Builder::new()
            .name("audit-tree-state".into())
            .spawn(move || persist_while_open(&inbox, &store, &dir, &companion))
            .map_err(|error| AuditError::io("starting the audit tree state thread", error))?;
        self.persister = Some(thread);
        Ok(())
    }

    /// Hands the tiles written so far and the state at the last tile boundary to the persister,
    /// once [`STATE_EVERY_TILES`] level-0 tiles have filled since the last time, or at once with
    /// `now`. Does nothing before the persister has started.
    pub(crate) fn hand_off(&mut self, now: bool) {
        let new_tiles = self.size().saturating_sub(self.handed_off) / TILE_WIDTH as u64;
        if self.persister.is_none()
            || self.damaged
            || new_tiles == 0
            || (!now && new_tiles < STATE_EVERY_TILES)
        {
            return;
        }
        let boundary = self.frontier.at_last_tile_boundary();
        self.handed_off = boundary.size();
        let state = TreeState {
            frontier: boundary,
            log_end: self.boundary_log_end,
        };
        let mut due = self.inbox.lock();
        merge(&mut due.written, mem::take(&mut self.written));
        due.state = Some(state);
        self.inbox.wake.notify_one();
    }

    /// Hands off what is left and waits for the persister to write it and stop. Called when the
    /// log closes; the log's directory lock must be held until this returns.
    pub(crate) fn close(&mut self) {
        if self.persister.is_none() {
            return;
        }
        self.hand_off(true);
        self.inbox.lock().stop = true;
        self.inbox.wake.notify_one();
        if let Some(thread) = self.persister.take()
            && thread.join().is_err()
        {
            tracing::error!("the audit tree state thread panicked");
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.close();
    }
}

/// The persister thread: waits for a state, makes it durable, until told to stop.
fn persist_while_open(inbox: &Inbox, store: &TileStore, dir: &Path, companion: &(PathBuf, File)) {
    loop {
        let (written, state, stop) = {
            let mut due = inbox.lock();
            while due.state.is_none() && !due.stop {
                due = inbox.wake.wait(due).unwrap_or_else(PoisonError::into_inner);
            }
            (mem::take(&mut due.written), due.state.take(), due.stop)
        };
        if let Some(state) = state {
            match persist(dir, store, companion, &written, &state) {
                Ok(()) => tracing::debug!(
                    tree_size = state.frontier.size(),
                    "audit tree state written"
                ),
                Err(error) => {
                    tracing::error!(
                        %error,
                        tree_size = state.frontier.size(),
                        "could not write the audit tree state; the next open hashes more of the log"
                    );
                    // Those tiles are still to be made durable before any later state.
                    let mut due = inbox.lock();
                    let later = mem::replace(&mut due.written, written);
                    merge(&mut due.written, later);
                }
            }
        }
        if stop {
            return;
        }
    }
}

/// Fsyncs the `written` tiles, their directories and the companion file, then replaces the tree
/// state with `state`.
fn persist(
    dir: &Path,
    store: &TileStore,
    (companion_path, companion): &(PathBuf, File),
    written: &[Range<u64>],
    state: &TreeState,
) -> Result<(), AuditError> {
    let mut dirs = BTreeSet::new();
    for (level, range) in (0..).zip(written) {
        for index in range.clone() {
            let path = store.path(level, index);
            File::open(&path)
                .and_then(|file| file.sync_data())
                .map_err(|error| AuditError::io(format!("fsync of {}", path.display()), error))?;
            // Its entry, and the entries of the directories made for it, up to the log's.
            for ancestor in path.ancestors().skip(1) {
                if !dirs.insert(ancestor.to_owned()) || ancestor == dir {
                    break;
                }
            }
        }
    }
    for directory in &dirs {
        sync_dir(directory)?;
    }
    companion
        .sync_data()
        .map_err(|error| AuditError::io(format!("fsync of {}", companion_path.display()), error))?;
    write_atomically(dir, TREE_STATE_FILE, TREE_STATE_TEMP_FILE, &state.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state of `size` leaves with made-up hashes of the right widths.
    fn state(size: u64) -> TreeState {
        let rows = (1..levels(size))
            .map(|level| {
                (0..partial_width(size, level))
                    .map(|i| crate::merkle::leaf_hash(&[level as u8, i as u8]))
                    .collect()
            })
            .collect();
        TreeState {
            frontier: Frontier::at_tile_boundary(size, rows).unwrap(),
            log_end: 1234,
        }
    }

    #[test]
    fn the_state_file_round_trips_and_refuses_damage() {
        for n in [0, 256, 69_888, (1 << 40) + (5 << 24) + (7 << 16) + (9 << 8)] {
            let state = state(n);
            let bytes = state.encode();
            assert_eq!(TreeState::decode(&bytes).unwrap(), state, "{n}");
            for at in [0, 20, 28, bytes.len() - 40, bytes.len() - 1] {
                let mut damaged = bytes.clone();
                damaged[at] ^= 0x10;
                assert!(TreeState::decode(&damaged).is_err(), "{n}: byte {at}");
            }
            assert!(TreeState::decode(&bytes[..bytes.len() - 32]).is_err());
        }
        // A well-formed file whose size does not fit its hashes, checksum and all.
        let mut bytes = state(69_888).encode();
        bytes.truncate(bytes.len() - 32);
        bytes[16..24].copy_from_slice(&69_632u64.to_be_bytes());
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        bytes.extend_from_slice(&digest);
        let error = TreeState::decode(&bytes).unwrap_err();
        assert!(error.contains("a tree of 69632 needs"), "{error}");
    }

    #[test]
    fn ranges_merge_per_level() {
        let mut ranges = vec![3..5, 0..0];
        merge(&mut ranges, vec![5..9, 1..2, 0..1]);
        assert_eq!(ranges, vec![3..9, 1..2, 0..1]);
        merge(&mut ranges, vec![0..3, 7..7]);
        assert_eq!(ranges, vec![0..9, 1..2, 0..1]);
    }
}
