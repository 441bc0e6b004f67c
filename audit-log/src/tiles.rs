//! The tree's interior on disk as hash tiles in the C2SP tlog-tiles layout
//! (<https://c2sp.org/tlog-tiles>), and its right edge in memory.
//!
//! A tile holds 256 consecutive tree hashes of one height: tile `N` of level `L` holds
//! MTH(D[(N·256 + i)·256^L : (N·256 + i + 1)·256^L]) for `i` in 0..256. Level-0 tiles hold leaf
//! hashes, and each hash of a level-`L + 1` tile is the root of a full level-`L` tile. The heights
//! between two levels are rehashed from a tile when asked for (at most 127 hashes).
//!
//! A full tile is written once, when it fills, to `tile/<L>/<N>` in the log directory, `N` in
//! 3-digit path elements, all but the last prefixed with `x` (`x001/x234/067`), as 8,192 bytes of
//! raw hashes; it never changes. The partial tile of each level (its last
//! `(size / 256^L) mod 256` hashes) is the [`Frontier`], kept in memory: fewer than 256 hashes per
//! level, O(log n) in all. The current tree's root and right edge need nothing else; proofs and
//! the roots of earlier sizes read full tiles.
//!
//! A tile read from disk is used only once its root equals the hash the level above holds for it,
//! checked level by level up to the frontier (the top level is always partial, so the chain ends
//! in memory). A damaged, truncated or swapped tile therefore fails the request that reads it
//! with [`AuditError::DerivedMismatch`]; it never yields a wrong proof.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::error::AuditError;
use crate::merkle::{Nodes, TreeHash, perfect_root};

/// The tiles' directory in the log directory.
pub(crate) const TILE_DIR: &str = "tile";
/// Hashes in a full tile.
pub(crate) const TILE_WIDTH: usize = 256;
/// log2 of [`TILE_WIDTH`]: the tree height between two tile levels.
const TILE_HEIGHT: u32 = 8;
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

/// The partial tile of every level: all of the tree that is kept in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Frontier {
    size: u64,
    /// `rows[L]`: the level-`L` partial tile, [`partial_width`] hashes.
    rows: Vec<Vec<TreeHash>>,
}

impl Frontier {
    /// The frontier of a tree of `size` leaves, a multiple of 256, from its partial tiles of
    /// levels 1 and up (level 0 is empty there); `None` if their widths do not fit `size`.
    pub(crate) fn at_tile_boundary(size: u64, upper: Vec<Vec<TreeHash>>) -> Option<Self> {
        let fits = size.is_multiple_of(TILE_WIDTH as u64)
            && upper.len() == levels(size).saturating_sub(1) as usize
            && (1..)
                .zip(&upper)
                .all(|(level, row)| row.len() == partial_width(size, level));
        let rows = if size == 0 {
            Vec::new()
        } else {
            std::iter::once(Vec::new()).chain(upper).collect()
        };
        fits.then_some(Self { size, rows })
    }

    /// The number of leaves.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The hashes held: fewer than 256 per level.
    pub(crate) fn hashes(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// The frontier at the last multiple of 256 leaves: the partial tiles of levels 1 and up
    /// change only when a level-0 tile fills, so they are the same there as now.
    pub(crate) fn at_last_tile_boundary(&self) -> Self {
        let mut rows = self.rows.clone();
        if let Some(leaves) = rows.first_mut() {
            leaves.clear();
        }
        Self {
            size: self.size - self.size % TILE_WIDTH as u64,
            rows,
        }
    }

    /// The partial tiles of levels 1 and up (what the tree state stores).
    pub(crate) fn upper_rows(&self) -> &[Vec<TreeHash>] {
        self.rows.get(1..).unwrap_or_default()
    }

    /// Appends a leaf; returns the tiles it filled, lowest level first.
    pub(crate) fn push(&mut self, leaf: TreeHash) -> Vec<FullTile> {
        self.size += 1;
        let mut filled = Vec::new();
        let mut hash = leaf;
        let mut level = 0;
        loop {
            if self.rows.len() == level {
                self.rows.push(Vec::with_capacity(TILE_WIDTH));
            }
            let row = &mut self.rows[level];
            row.push(hash);
            if row.len() < TILE_WIDTH {
                return filled;
            }
            let hashes = std::mem::replace(row, Vec::with_capacity(TILE_WIDTH));
            hash = perfect_root(&hashes);
            let level_u32 = level as u32;
            filled.push(FullTile {
                level: level_u32,
                index: full_tiles(self.size, level_u32) - 1,
                hashes,
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
    pub(crate) fail_next_write: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TileStore {
    /// The tiles of the log in `log_dir`.
    pub(crate) fn new(log_dir: &Path) -> Self {
        Self {
            dir: log_dir.join(TILE_DIR),
            #[cfg(test)]
            fail_next_write: std::sync::Arc::default(),
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

/// The tree of a [`Frontier`] with its full tiles read from a [`TileStore`], each checked against
/// the level above before use. Make one per request: it keeps the tiles it has read (a few per
/// level) until dropped.
#[derive(Debug)]
pub(crate) struct TileView<'a> {
    frontier: &'a Frontier,
    store: &'a TileStore,
    read: Vec<ReadTile>,
}

/// A full tile read and checked by a [`TileView`].
#[derive(Debug)]
struct ReadTile {
    level: u32,
    index: u64,
    hashes: Vec<TreeHash>,
}

impl<'a> TileView<'a> {
    pub(crate) fn new(frontier: &'a Frontier, store: &'a TileStore) -> Self {
        Self {
            frontier,
            store,
            read: Vec::new(),
        }
    }

    /// The hashes of tile `index` of `level`: the partial one from the frontier, or a full one
    /// from disk, checked.
    fn tile(&mut self, level: u32, index: u64) -> Result<&[TreeHash], AuditError> {
        let full = full_tiles(self.frontier.size, level);
        if index < full {
            let at = self.full_tile(level, index)?;
            return Ok(&self.read[at].hashes);
        }
        match self.frontier.rows.get(level as usize) {
            Some(row) if index == full => Ok(row),
            _ => Err(AuditError::InvalidRange(format!(
                "no tile {index} at level {level} in a tree of {} leaves",
                self.frontier.size
            ))),
        }
    }

    /// Reads full tile `index` of `level` and checks its root against the level above; returns
    /// where it is in `self.read`.
    fn full_tile(&mut self, level: u32, index: u64) -> Result<usize, AuditError> {
        if let Some(at) = self
            .read
            .iter()
            .position(|tile| tile.level == level && tile.index == index)
        {
            return Ok(at);
        }
        let hashes = self.store.read(level, index)?;
        let slot = (index % TILE_WIDTH as u64) as usize;
        let above = self.tile(level + 1, index / TILE_WIDTH as u64)?;
        let expected = *above.get(slot).ok_or_else(|| {
            AuditError::InvalidRange(format!("tile {index} of level {level} has no parent hash"))
        })?;
        let actual = perfect_root(&hashes);
        if actual != expected {
            return Err(AuditError::derived(
                self.store.path(level, index),
                format!("its hashes make {actual}, the level above holds {expected} for it"),
            ));
        }
        self.read.push(ReadTile {
            level,
            index,
            hashes,
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
        let at = (first % TILE_WIDTH as u64) as usize;
        let tile = self.tile(level, first / TILE_WIDTH as u64)?;
        let block = tile.get(at..at + (1 << below)).ok_or_else(|| {
            AuditError::InvalidRange(format!("no subtree {index} of height {height} in the tree"))
        })?;
        Ok(perfect_root(block))
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
            assert!(frontier.hashes() < TILE_WIDTH * levels(frontier.size()) as usize);
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

    #[test]
    fn the_frontier_at_a_boundary_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (_, frontier, _) = build(dir.path(), 70_000);
        let boundary = frontier.at_last_tile_boundary();
        assert_eq!(boundary.size(), 69_888);
        let rebuilt =
            Frontier::at_tile_boundary(boundary.size(), boundary.upper_rows().to_vec()).unwrap();
        assert_eq!(rebuilt, boundary);
        let (_, expected, _) = build(dir.path(), 69_888);
        assert_eq!(rebuilt, expected);
        assert!(Frontier::at_tile_boundary(69_889, boundary.upper_rows().to_vec()).is_none());
        assert!(Frontier::at_tile_boundary(69_632, boundary.upper_rows().to_vec()).is_none());
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
