//! The tree's interior on disk as hash tiles in the C2SP tlog-tiles layout
//! (<https://c2sp.org/tlog-tiles>), and its right edge in memory.
//!
//! A tile holds 256 consecutive tree hashes of one height: tile `N` of level `L` holds
//! MTH(D[(N·256 + i)·256^L : (N·256 + i + 1)·256^L]) for `i` in 0..256. Level-0 tiles hold leaf
//! hashes, and each hash of a level-`L + 1` tile is the root of a full level-`L` tile. The nodes
//! between two levels are kept beside a tile's hashes wherever it is in memory ([`TileNodes`]), so
//! that a proof looks them up instead of rehashing up to 127 hashes for each.
//!
//! A full tile is written once, when it fills, to `tile/<L>/<N>` in the log directory, `N` in
//! 3-digit path elements, all but the last prefixed with `x` (`x001/x234/067`), as 8,192 bytes of
//! raw hashes; it never changes. The partial tile of each level (its last
//! `(size / 256^L) mod 256` hashes) is the [`Frontier`], kept in memory with its nodes: fewer than
//! 512 hashes per level, O(log n) in all. The current tree's root and right edge need nothing else; proofs and
//! the roots of earlier sizes read full tiles.
//!
//! A tile read from disk is used only once its root equals the hash the level above holds for it,
//! checked level by level up to the frontier (the top level is always partial, so the chain ends
//! in memory). A damaged, truncated or swapped tile therefore fails the request that reads it
//! with [`AuditError::DerivedMismatch`]; it never yields a wrong proof.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::AuditError;
use crate::merkle::{Nodes, TreeHash, node_hash};

/// The tiles' directory in the log directory.
pub(crate) const TILE_DIR: &str = "tile";
/// Hashes in a full tile.
pub(crate) const TILE_WIDTH: usize = 256;
/// log2 of [`TILE_WIDTH`]: the tree height between two tile levels.
const TILE_HEIGHT: u32 = 8;
/// Checked full tiles kept for the log's readers, with their nodes: about 1 MB at most. Enough
/// for the upper-level tiles every proof passes through and the level-0 tiles of recent records.
const CACHED_TILES: usize = 64;
const HASH_LEN: usize = 32;

/// The number of full tiles of `level` in a tree of `size` leaves.
fn full_tiles(size: u64, level: u32) -> u64 {
    size.checked_shr(TILE_HEIGHT * (level + 1)).unwrap_or(0)
}

/// The number of hashes in the partial tile of `level` in a tree of `size` leaves.
pub(crate) fn partial_width(size: u64, level: u32) -> usize {
    (size.checked_shr(TILE_HEIGHT * level).unwrap_or(0) % TILE_WIDTH as u64) as usize
}

/// The number of levels that hold hashes in a tree of `size` leaves.
pub(crate) fn levels(size: u64) -> u32 {
    (0..)
        .take_while(|&level| size.checked_shr(TILE_HEIGHT * level).unwrap_or(0) > 0)
        .count() as u32
}

/// `tile/<level>/<index>` under `dir`, the index in the spec's path elements.
fn tile_path(dir: &Path, level: u32, index: u64) -> PathBuf {
    let mut groups = vec![index % 1000];
    let mut rest = index / 1000;
    while rest > 0 {
        groups.push(rest % 1000);
        rest /= 1000;
    }
    let mut path = dir.join(level.to_string());
    let last = groups.len() - 1;
    for (position, group) in groups.iter().rev().enumerate() {
        let prefix = if position < last { "x" } else { "" };
        path.push(format!("{prefix}{group:03}"));
    }
    path
}

/// A tile that a push filled, for the writer to store.
#[derive(Debug)]
pub(crate) struct FullTile {
    pub(crate) level: u32,
    pub(crate) index: u64,
    pub(crate) hashes: Vec<TreeHash>,
}

/// The hashes of a tile (full or partial) and the nodes above them inside it: `by_height[0]` the
/// tile's hashes, `by_height[h]` the root of each complete block of `2^h` of them, up to the
/// tile's root at height 8. At most 511 hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TileNodes {
    by_height: Vec<Vec<TreeHash>>,
}

impl TileNodes {
    fn of(hashes: impl IntoIterator<Item = TreeHash>) -> Self {
        let mut nodes = Self::default();
        for hash in hashes {
            nodes.push(hash);
        }
        nodes
    }

    /// Appends a hash and the blocks it completes; returns the tile's root once the tile is
    /// full.
    fn push(&mut self, hash: TreeHash) -> Option<TreeHash> {
        let mut hash = hash;
        for height in 0..=TILE_HEIGHT as usize {
            if self.by_height.len() == height {
                self.by_height.push(Vec::new());
            }
            let row = &mut self.by_height[height];
            row.push(hash);
            let len = row.len();
            if height == TILE_HEIGHT as usize {
                return Some(hash);
            }
            if len % 2 == 1 {
                break;
            }
            hash = node_hash(&row[len - 2], &row[len - 1]);
        }
        None
    }

    /// The tile's hashes.
    fn hashes(&self) -> &[TreeHash] {
        self.by_height.first().map_or(&[], Vec::as_slice)
    }

    /// The root of block `index` of `2^height` hashes, if it is complete.
    fn node(&self, height: u32, index: usize) -> Option<TreeHash> {
        self.by_height.get(height as usize)?.get(index).copied()
    }

    fn len(&self) -> usize {
        self.by_height.iter().map(Vec::len).sum()
    }
}

/// The partial tile of every level, with its nodes: all of the tree that is kept in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Frontier {
    size: u64,
    /// `rows[L]`: the level-`L` partial tile, [`partial_width`] hashes.
    rows: Vec<TileNodes>,
}

impl Frontier {
    /// The frontier of a tree of `size` leaves, a multiple of 256, from the hashes of its partial
    /// tiles of levels 1 and up (level 0 is empty there); `None` if they do not fit `size`.
    pub(crate) fn at_tile_boundary(size: u64, upper: Vec<Vec<TreeHash>>) -> Option<Self> {
        let fits = size.is_multiple_of(TILE_WIDTH as u64)
            && upper.len() == levels(size).saturating_sub(1) as usize
            && (1..)
                .zip(&upper)
                .all(|(level, row)| row.len() == partial_width(size, level));
        let rows = if size == 0 {
            Vec::new()
        } else {
            std::iter::once(TileNodes::default())
                .chain(upper.into_iter().map(TileNodes::of))
                .collect()
        };
        fits.then_some(Self { size, rows })
    }

    /// The number of leaves.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The hashes held: fewer than 512 per level.
    pub(crate) fn hashes(&self) -> usize {
        self.rows.iter().map(TileNodes::len).sum()
    }

    /// The frontier at the last multiple of 256 leaves: the partial tiles of levels 1 and up
    /// change only when a level-0 tile fills, so they are the same there as now.
    pub(crate) fn at_last_tile_boundary(&self) -> Self {
        let mut rows = self.rows.clone();
        if let Some(leaves) = rows.first_mut() {
            *leaves = TileNodes::default();
        }
        Self {
            size: self.size - self.size % TILE_WIDTH as u64,
            rows,
        }
    }

    /// The hashes of the partial tiles of levels 1 and up (what the tree state stores).
    pub(crate) fn upper_rows(&self) -> impl Iterator<Item = &[TreeHash]> {
        self.rows.iter().skip(1).map(TileNodes::hashes)
    }

    /// Appends a leaf; returns the tiles it filled, lowest level first.
    pub(crate) fn push(&mut self, leaf: TreeHash) -> Vec<FullTile> {
        self.size += 1;
        let mut filled = Vec::new();
        let mut hash = leaf;
        let mut level = 0;
        loop {
            if self.rows.len() == level {
                self.rows.push(TileNodes::default());
            }
            let row = &mut self.rows[level];
            let Some(root) = row.push(hash) else {
                return filled;
            };
            let mut full = std::mem::take(row);
            hash = root;
            let level_u32 = level as u32;
            filled.push(FullTile {
                level: level_u32,
                index: full_tiles(self.size, level_u32) - 1,
                hashes: full.by_height.swap_remove(0),
            });
            level += 1;
        }
    }
}

/// The full tiles in the log directory.
#[derive(Clone, Debug)]
pub(crate) struct TileStore {
    dir: PathBuf,
    /// Test hook: the next write fails.
    #[cfg(test)]
    pub(crate) fail_next_write: Arc<std::sync::atomic::AtomicBool>,
}

impl TileStore {
    /// The tiles of the log in `log_dir`.
    pub(crate) fn new(log_dir: &Path) -> Self {
        Self {
            dir: log_dir.join(TILE_DIR),
            #[cfg(test)]
            fail_next_write: Arc::default(),
        }
    }

    pub(crate) fn path(&self, level: u32, index: u64) -> PathBuf {
        tile_path(&self.dir, level, index)
    }

    /// Writes a full tile, replacing what a crashed writer may have left there, without fsync:
    /// the tree state is written only after the tiles it covers are made durable.
    pub(crate) fn write(&self, tile: &FullTile) -> Result<(), AuditError> {
        let path = self.path(tile.level, tile.index);
        let io_error = |error| AuditError::io(format!("writing {}", path.display()), error);
        #[cfg(test)]
        if self
            .fail_next_write
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Err(io_error(io::Error::other("injected tile write failure")));
        }
        let bytes: Vec<u8> = tile.hashes.iter().flat_map(|h| *h.as_bytes()).collect();
        let create = || {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
        };
        let mut file = match create() {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io_error)?;
                }
                create()
            }
            other => other,
        }
        .map_err(io_error)?;
        file.write_all(&bytes).map_err(io_error)
    }

    /// Reads a full tile as it is on disk (unchecked: [`TileView`] checks it).
    fn read(&self, level: u32, index: u64) -> Result<Vec<TreeHash>, AuditError> {
        let path = self.path(level, index);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(AuditError::derived(path, "the tile is missing"));
            }
            Err(error) => {
                return Err(AuditError::io(format!("reading {}", path.display()), error));
            }
        };
        if bytes.len() != TILE_WIDTH * HASH_LEN {
            return Err(AuditError::derived(
                path,
                format!(
                    "the tile has {} bytes, a full tile {}",
                    bytes.len(),
                    TILE_WIDTH * HASH_LEN
                ),
            ));
        }
        Ok(bytes
            .chunks_exact(HASH_LEN)
            .map(|chunk| {
                let mut hash = [0; HASH_LEN];
                hash.copy_from_slice(chunk);
                TreeHash::from_bytes(hash)
            })
            .collect())
    }
}

/// Full tiles already checked, shared by the log's readers. A full tile never changes, nor does
/// the hash the level above holds for it, so a tile checked once is not checked again. Holds
/// [`CACHED_TILES`] tiles at most; the least recently used goes first.
#[derive(Debug, Default)]
pub(crate) struct TileCache {
    slots: Mutex<CacheSlots>,
}

#[derive(Debug, Default)]
struct CacheSlots {
    tiles: Vec<CachedTile>,
    /// Counts lookups, to order the tiles by last use.
    clock: u64,
}

#[derive(Debug)]
struct CachedTile {
    level: u32,
    index: u64,
    nodes: Arc<TileNodes>,
    used: u64,
}

impl TileCache {
    fn slots(&self) -> std::sync::MutexGuard<'_, CacheSlots> {
        // Every change under the lock leaves whole entries; a panic cannot leave a torn one.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, level: u32, index: u64) -> Option<Arc<TileNodes>> {
        let mut slots = self.slots();
        slots.clock += 1;
        let now = slots.clock;
        let tile = slots
            .tiles
            .iter_mut()
            .find(|tile| tile.level == level && tile.index == index)?;
        tile.used = now;
        Some(Arc::clone(&tile.nodes))
    }

    fn put(&self, level: u32, index: u64, nodes: &Arc<TileNodes>) {
        let mut slots = self.slots();
        let used = slots.clock;
        let tile = CachedTile {
            level,
            index,
            nodes: Arc::clone(nodes),
            used,
        };
        if slots.tiles.len() < CACHED_TILES {
            slots.tiles.push(tile);
        } else if let Some(oldest) = slots.tiles.iter_mut().min_by_key(|tile| tile.used) {
            *oldest = tile;
        }
    }

    /// The hashes held.
    pub(crate) fn hashes(&self) -> usize {
        self.slots().tiles.iter().map(|tile| tile.nodes.len()).sum()
    }
}

/// The tree of a [`Frontier`] with its full tiles read from a [`TileStore`], each checked against
/// the level above before use. Make one per request: it keeps the tiles it has read (a few per
/// level) until dropped.
#[derive(Debug)]
pub(crate) struct TileView<'a> {
    frontier: &'a Frontier,
    store: &'a TileStore,
    cache: Option<&'a TileCache>,
    read: Vec<ReadTile>,
}

/// A full tile read and checked by a [`TileView`].
#[derive(Debug)]
struct ReadTile {
    level: u32,
    index: u64,
    nodes: Arc<TileNodes>,
}

impl<'a> TileView<'a> {
    pub(crate) fn new(frontier: &'a Frontier, store: &'a TileStore) -> Self {
        Self {
            frontier,
            store,
            cache: None,
            read: Vec::new(),
        }
    }

    /// Takes checked tiles from `cache`, and puts the tiles it checks there.
    pub(crate) fn with_cache(mut self, cache: &'a TileCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Tile `index` of `level` with its nodes: the partial one from the frontier, or a full one
    /// from disk, checked.
    fn tile(&mut self, level: u32, index: u64) -> Result<&TileNodes, AuditError> {
        let full = full_tiles(self.frontier.size, level);
        if index < full {
            let at = self.full_tile(level, index)?;
            return Ok(&self.read[at].nodes);
        }
        match self.frontier.rows.get(level as usize) {
            Some(row) if index == full => Ok(row),
            _ => Err(AuditError::InvalidRange(format!(
                "no tile {index} at level {level} in a tree of {} leaves",
                self.frontier.size
            ))),
        }
    }

    /// Reads full tile `index` of `level` and checks its root against the level above (unless
    /// the cache has it, checked); returns where it is in `self.read`.
    fn full_tile(&mut self, level: u32, index: u64) -> Result<usize, AuditError> {
        if let Some(at) = self
            .read
            .iter()
            .position(|tile| tile.level == level && tile.index == index)
        {
            return Ok(at);
        }
        let cached = self.cache.and_then(|cache| cache.get(level, index));
        let nodes = match cached {
            Some(nodes) => nodes,
            None => {
                let nodes = Arc::new(TileNodes::of(self.store.read(level, index)?));
                let slot = (index % TILE_WIDTH as u64) as usize;
                let expected = self
                    .tile(level + 1, index / TILE_WIDTH as u64)?
                    .node(0, slot)
                    .ok_or_else(|| {
                        AuditError::InvalidRange(format!(
                            "tile {index} of level {level} has no parent hash"
                        ))
                    })?;
                let root = nodes.node(TILE_HEIGHT, 0);
                if root != Some(expected) {
                    let made = root.map_or_else(|| "no root".to_owned(), |root| root.to_hex());
                    return Err(AuditError::derived(
                        self.store.path(level, index),
                        format!("its hashes make {made}, the level above holds {expected} for it"),
                    ));
                }
                if let Some(cache) = self.cache {
                    cache.put(level, index, &nodes);
                }
                nodes
            }
        };
        self.read.push(ReadTile {
            level,
            index,
            nodes,
        });
        Ok(self.read.len() - 1)
    }
}

impl Nodes for TileView<'_> {
    fn size(&self) -> u64 {
        self.frontier.size
    }

    fn node(&mut self, height: u32, index: u64) -> Result<TreeHash, AuditError> {
        // The block is 2^below hashes of one tile of `level`, starting at `first` in that level.
        let level = height / TILE_HEIGHT;
        let below = height % TILE_HEIGHT;
        let first = index << below;
        let at = (first % TILE_WIDTH as u64) as usize >> below;
        self.tile(level, first / TILE_WIDTH as u64)?
            .node(below, at)
            .ok_or_else(|| {
                AuditError::InvalidRange(format!(
                    "no subtree {index} of height {height} in the tree"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{MerkleTree, consistency_proof, inclusion_proof, root};

    fn leaf(i: u64) -> TreeHash {
        crate::merkle::leaf_hash(format!("record {i}").as_bytes())
    }

    /// A tree of `n` leaves: its tiles in `dir`, its frontier, and the in-memory oracle.
    fn build(dir: &Path, n: u64) -> (TileStore, Frontier, MerkleTree) {
        let store = TileStore::new(dir);
        let mut frontier = Frontier::default();
        let mut oracle = MerkleTree::new();
        for i in 0..n {
            for tile in frontier.push(leaf(i)) {
                store.write(&tile).unwrap();
            }
            oracle.push(leaf(i));
        }
        (store, frontier, oracle)
    }

    /// xorshift64*: reproducible choices without a dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    /// Roots of `sizes`, consistency proofs from each to the whole tree and to a random larger
    /// size, and inclusion proofs of random leaves, all from the tiles, against the oracle.
    fn check_sizes(store: &TileStore, frontier: &Frontier, oracle: &mut MerkleTree, sizes: &[u64]) {
        let n = frontier.size();
        let mut rng = Rng(n ^ 0x5eed);
        let mut view = TileView::new(frontier, store);
        for &m in sizes {
            assert_eq!(
                root(&mut view, m).unwrap(),
                oracle.root(m).unwrap(),
                "root {m}"
            );
            let second = m + rng.below(n - m + 1);
            for (first, second) in [(m, n), (m, second), (1 + rng.below(m), m)] {
                assert_eq!(
                    consistency_proof(&mut view, first, second).unwrap(),
                    oracle.consistency_proof(first, second).unwrap(),
                    "consistency {first} -> {second}"
                );
            }
            for index in [rng.below(m), m - 1, 0] {
                assert_eq!(
                    inclusion_proof(&mut view, index, m).unwrap(),
                    oracle.inclusion_proof(index, m).unwrap(),
                    "inclusion {index} in {m}"
                );
            }
            // A fresh view now and then, so that tiles are read and checked again.
            if m % 97 == 0 {
                view = TileView::new(frontier, store);
            }
        }
    }

    #[test]
    fn tile_paths_follow_the_spec() {
        let dir = Path::new("tile");
        assert_eq!(tile_path(dir, 0, 0), Path::new("tile/0/000"));
        assert_eq!(tile_path(dir, 1, 999), Path::new("tile/1/999"));
        assert_eq!(tile_path(dir, 0, 1000), Path::new("tile/0/x001/000"));
        assert_eq!(
            tile_path(dir, 2, 1_234_067),
            Path::new("tile/2/x001/x234/067")
        );
    }

    #[test]
    fn widths_and_levels_follow_the_spec() {
        // The spec's example: 70,000 leaves are 273 full level-0 tiles and one of width 112,
        // one full level-1 tile and one of width 17, and a level-2 tile of width 1.
        assert_eq!(
            (full_tiles(70_000, 0), partial_width(70_000, 0)),
            (273, 112)
        );
        assert_eq!((full_tiles(70_000, 1), partial_width(70_000, 1)), (1, 17));
        assert_eq!((full_tiles(70_000, 2), partial_width(70_000, 2)), (0, 1));
        assert_eq!(levels(70_000), 3);
        assert_eq!(levels(256), 2);
        assert_eq!((levels(1), levels(255), levels(0)), (1, 1, 0));
        assert_eq!(levels(u64::MAX), 8);
    }

    /// Every size up to a few thousand, each root computed when it was the current size (from
    /// the frontier alone) and again at the end (from tiles), with proofs, against the oracle.
    #[test]
    fn every_size_up_to_3000_matches_the_in_memory_tree() {
        let dir = tempfile::tempdir().unwrap();
        let store = TileStore::new(dir.path());
        let mut frontier = Frontier::default();
        let mut oracle = MerkleTree::new();
        for i in 0..3000 {
            for tile in frontier.push(leaf(i)) {
                store.write(&tile).unwrap();
            }
            oracle.push(leaf(i));
            let mut view = TileView::new(&frontier, &store);
            assert_eq!(
                root(&mut view, i + 1).unwrap(),
                oracle.root(i + 1).unwrap(),
                "current root at {}",
                i + 1
            );
            assert!(view.read.is_empty(), "the current root read tiles");
            assert!(frontier.hashes() < 2 * TILE_WIDTH * levels(frontier.size()) as usize);
        }
        let sizes: Vec<u64> = (1..=3000).collect();
        check_sizes(&store, &frontier, &mut oracle, &sizes);
        for index in 0..3000 {
            assert_eq!(
                TileView::new(&frontier, &store).node(0, index).unwrap(),
                leaf(index)
            );
        }
    }

    /// Three levels (full level-1 tiles, a partial level 2), sizes around the tile boundaries
    /// and a random sample.
    #[test]
    fn a_larger_tree_matches_the_in_memory_tree() {
        let dir = tempfile::tempdir().unwrap();
        let n = 140_000;
        let (store, frontier, mut oracle) = build(dir.path(), n);
        assert_eq!(levels(n), 3);
        let mut rng = Rng(7);
        let mut sizes: Vec<u64> = [255, 256, 257, 65_535, 65_536, 65_537, 131_072, 131_073, n]
            .into_iter()
            .chain((0..150).map(|_| 1 + rng.below(n)))
            .collect();
        sizes.sort_unstable();
        check_sizes(&store, &frontier, &mut oracle, &sizes);
    }

    fn upper(frontier: &Frontier) -> Vec<Vec<TreeHash>> {
        frontier.upper_rows().map(<[TreeHash]>::to_vec).collect()
    }

    #[test]
    fn the_frontier_at_a_boundary_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (_, frontier, _) = build(dir.path(), 70_000);
        let boundary = frontier.at_last_tile_boundary();
        assert_eq!(boundary.size(), 69_888);
        let rebuilt = Frontier::at_tile_boundary(boundary.size(), upper(&boundary)).unwrap();
        assert_eq!(rebuilt, boundary);
        let (_, expected, _) = build(dir.path(), 69_888);
        assert_eq!(rebuilt, expected);
        assert!(Frontier::at_tile_boundary(69_889, upper(&boundary)).is_none());
        assert!(Frontier::at_tile_boundary(69_632, upper(&boundary)).is_none());
    }

    /// The cache keeps at most its fixed number of checked tiles, serves them unchecked (a tile
    /// damaged after it was checked is not read again), and its answers are the tiles'.
    #[test]
    fn the_cache_is_bounded_and_serves_checked_tiles() {
        let dir = tempfile::tempdir().unwrap();
        let n = 140_000;
        let (store, frontier, mut oracle) = build(dir.path(), n);
        let cache = TileCache::default();
        for index in (0..n).step_by(101) {
            let mut view = TileView::new(&frontier, &store).with_cache(&cache);
            assert_eq!(
                inclusion_proof(&mut view, index, n).unwrap(),
                oracle.inclusion_proof(index, n).unwrap()
            );
            assert!(cache.hashes() <= CACHED_TILES * (2 * TILE_WIDTH - 1));
        }
        assert_eq!(cache.hashes(), CACHED_TILES * (2 * TILE_WIDTH - 1));
        // The last full level-0 tile used is cached, so damage to it is not seen through the
        // cache, and is seen without it.
        let last = (0..n - n % 256).step_by(101).last().unwrap();
        let path = store.path(0, last / 256);
        fs::write(&path, [0u8; 8192]).unwrap();
        let mut view = TileView::new(&frontier, &store).with_cache(&cache);
        assert_eq!(
            inclusion_proof(&mut view, last, n).unwrap(),
            oracle.inclusion_proof(last, n).unwrap()
        );
        let mut view = TileView::new(&frontier, &store);
        assert!(inclusion_proof(&mut view, last, n).is_err());
    }

    /// Any change to a tile on disk is caught when the tile is read, at every level: the
    /// request fails, naming the tile, and no proof is made from it.
    #[test]
    fn a_damaged_missing_or_swapped_tile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let n = 70_000;
        let (store, frontier, mut oracle) = build(dir.path(), n);
        let refused = |level: u32, index: u64, leaf_index: u64| {
            let mut view = TileView::new(&frontier, &store);
            let error = inclusion_proof(&mut view, leaf_index, n).unwrap_err();
            assert!(
                matches!(&error, AuditError::DerivedMismatch { path, .. }
                    if *path == store.path(level, index)),
                "tile {level}/{index}: {error}"
            );
        };
        for (level, index, leaf_index) in [(0, 0, 5), (0, 200, 200 * 256 + 3), (1, 0, 5)] {
            let path = store.path(level, index);
            let intact = fs::read(&path).unwrap();
            let mut flipped = intact.clone();
            flipped[8000] ^= 1;
            fs::write(&path, &flipped).unwrap();
            refused(level, index, leaf_index);
            fs::write(&path, &intact[..4096]).unwrap();
            refused(level, index, leaf_index);
            fs::remove_file(&path).unwrap();
            refused(level, index, leaf_index);
            fs::write(&path, &intact).unwrap();
        }
        // Another full tile of the same level in its place.
        let (zero, one) = (store.path(0, 0), store.path(0, 1));
        let intact = fs::read(&zero).unwrap();
        fs::copy(&one, &zero).unwrap();
        refused(0, 0, 5);
        fs::write(&zero, &intact).unwrap();
        let mut view = TileView::new(&frontier, &store);
        assert_eq!(
            inclusion_proof(&mut view, 5, n).unwrap(),
            oracle.inclusion_proof(5, n).unwrap()
        );
    }
}
