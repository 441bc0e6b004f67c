//! The Merkle tree of RFC 9162 §2.1 over the log's leaf hashes: tree hashes, inclusion proofs
//! (§2.1.3) and consistency proofs (§2.1.4), their generation and their verification.
//!
//! Generation walks the RFC's recursion over a [`Nodes`]: anything that can give the hash of a
//! complete aligned subtree (a block of `2^height` leaves starting at a multiple of `2^height`).
//! Every subtree the recursion visits is either such a block or splits into one and a smaller
//! remainder, so any tree hash or proof for any tree size up to the current one costs O(log² n)
//! blocks and no rehashing of the leaves. The log's [`Nodes`] reads the blocks from hash tiles
//! (the `tiles` module); the tests' is an in-memory tree of every level.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::AuditError;

/// A SHA-256 value in the tree: a leaf hash, an interior node or a root.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TreeHash([u8; 32]);

impl TreeHash {
    /// Wraps 32 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, as in checkpoints and proofs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses exactly 64 lowercase hex digits. Uppercase is refused so that a value has one
    /// spelling only (a changed byte in an export must never leave its meaning intact).
    pub fn from_hex(text: &str) -> Result<Self, AuditError> {
        if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(AuditError::InvalidProof(format!(
                "hash must be 64 lowercase hex digits, got {text:?}"
            )));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes)
            .map_err(|error| AuditError::InvalidProof(format!("bad hex hash: {error}")))?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TreeHash({})", self.to_hex())
    }
}

impl fmt::Display for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for TreeHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for TreeHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// The leaf hash of a record: SHA-256(0x00 || line), the line without its newline (RFC 9162
/// §2.1.1).
pub fn leaf_hash(line: &[u8]) -> TreeHash {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(line);
    TreeHash(hasher.finalize().into())
}

/// The hash of an interior node: SHA-256(0x01 || left || right) (RFC 9162 §2.1.1).
pub(crate) fn node_hash(left: &TreeHash, right: &TreeHash) -> TreeHash {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left.0);
    hasher.update(right.0);
    TreeHash(hasher.finalize().into())
}

/// The root of the empty tree: SHA-256 of the empty string (RFC 9162 §2.1.1).
pub fn empty_root() -> TreeHash {
    TreeHash(Sha256::digest([]).into())
}

/// The largest power of two strictly below `n`; `n` must be at least 2 (the RFC's `k`).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The hashes of complete aligned subtrees of a tree of [`Nodes::size`] leaves: what the RFC's
/// recursion needs to compute tree hashes and proofs.
pub(crate) trait Nodes {
    /// The number of leaves.
    fn size(&self) -> u64;

    /// MTH(D[index * 2^height : (index + 1) * 2^height]). Callers ask only for blocks that lie
    /// within the tree.
    fn node(&mut self, height: u32, index: u64) -> Result<TreeHash, AuditError>;
}

/// `MTH(D[0:tree_size])`; `tree_size` must not exceed the tree's size.
pub(crate) fn root(nodes: &mut impl Nodes, tree_size: u64) -> Result<TreeHash, AuditError> {
    check_size(nodes, tree_size)?;
    if tree_size == 0 {
        return Ok(empty_root());
    }
    subtree(nodes, 0, tree_size)
}

/// `PATH(index, D[0:tree_size])` of RFC 9162 §2.1.3.1, leaf side first.
pub(crate) fn inclusion_proof(
    nodes: &mut impl Nodes,
    index: u64,
    tree_size: u64,
) -> Result<Vec<TreeHash>, AuditError> {
    check_size(nodes, tree_size)?;
    if index >= tree_size {
        return Err(AuditError::InvalidRange(format!(
            "index {index} is not below tree size {tree_size}"
        )));
    }
    let (mut start, mut end) = (0, tree_size);
    let mut path = Vec::new();
    while end - start > 1 {
        let k = split_point(end - start);
        if index < start + k {
            path.push(subtree(nodes, start + k, end)?);
            end = start + k;
        } else {
            path.push(subtree(nodes, start, start + k)?);
            start += k;
        }
    }
    path.reverse();
    Ok(path)
}

/// `PROOF(first, D[0:second])` of RFC 9162 §2.1.4.1, innermost first. Empty when
/// `first == second`; `first` must be at least 1.
pub(crate) fn consistency_proof(
    nodes: &mut impl Nodes,
    first: u64,
    second: u64,
) -> Result<Vec<TreeHash>, AuditError> {
    check_size(nodes, second)?;
    if first == 0 || first > second {
        return Err(AuditError::InvalidRange(format!(
            "a consistency proof needs 1 <= first <= second, got first {first}, second {second}"
        )));
    }
    // SUBPROOF(m, D[start:end], complete) unrolled; `complete` is the RFC's `b`.
    let (mut start, mut end, mut m, mut complete) = (0, second, first, true);
    let mut path = Vec::new();
    loop {
        let n = end - start;
        if m == n {
            if !complete {
                path.push(subtree(nodes, start, end)?);
            }
            break;
        }
        let k = split_point(n);
        if m <= k {
            path.push(subtree(nodes, start + k, end)?);
            end = start + k;
        } else {
            path.push(subtree(nodes, start, start + k)?);
            start += k;
            m -= k;
            complete = false;
        }
    }
    path.reverse();
    Ok(path)
}

fn check_size(nodes: &impl Nodes, tree_size: u64) -> Result<(), AuditError> {
    if tree_size > nodes.size() {
        return Err(AuditError::InvalidRange(format!(
            "tree size {tree_size} exceeds the log's {}",
            nodes.size()
        )));
    }
    Ok(())
}

/// `MTH(D[start:end])` for a range the RFC's recursion visits: `start < end <= size`, and `start` a
/// multiple of the smallest power of two not below `end - start`. Such a range is a complete
/// block, or a complete block followed by a smaller range of the same kind.
fn subtree(nodes: &mut impl Nodes, start: u64, end: u64) -> Result<TreeHash, AuditError> {
    let n = end - start;
    if n.is_power_of_two() {
        debug_assert_eq!(start % n, 0, "unaligned subtree");
        return nodes.node(n.trailing_zeros(), start >> n.trailing_zeros());
    }
    let k = split_point(n);
    Ok(node_hash(
        &subtree(nodes, start, start + k)?,
        &subtree(nodes, start + k, end)?,
    ))
}

/// Every level of the tree in memory (level 0 the leaf hashes, level `l` the hash of each block
/// of `2^l` leaves): the oracle that the tiled tree is tested against. About 64 bytes per leaf,
/// which is why the log does not keep one.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct MerkleTree {
    levels: Vec<Vec<TreeHash>>,
}

#[cfg(test)]
impl MerkleTree {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf and the complete subtrees it closes.
    pub(crate) fn push(&mut self, leaf: TreeHash) {
        let mut hash = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            let nodes = &mut self.levels[level];
            nodes.push(hash);
            let len = nodes.len();
            if len % 2 == 1 {
                return;
            }
            hash = node_hash(&nodes[len - 2], &nodes[len - 1]);
            level += 1;
        }
    }

    pub(crate) fn leaf(&self, index: u64) -> Option<TreeHash> {
        self.levels
            .first()?
            .get(usize::try_from(index).ok()?)
            .copied()
    }

    pub(crate) fn root(&mut self, tree_size: u64) -> Result<TreeHash, AuditError> {
        root(self, tree_size)
    }

    pub(crate) fn inclusion_proof(
        &mut self,
        index: u64,
        tree_size: u64,
    ) -> Result<Vec<TreeHash>, AuditError> {
        inclusion_proof(self, index, tree_size)
    }

    pub(crate) fn consistency_proof(
        &mut self,
        first: u64,
        second: u64,
    ) -> Result<Vec<TreeHash>, AuditError> {
        consistency_proof(self, first, second)
    }
}

#[cfg(test)]
impl Nodes for MerkleTree {
    fn size(&self) -> u64 {
        self.levels.first().map_or(0, |leaves| leaves.len() as u64)
    }

    fn node(&mut self, height: u32, index: u64) -> Result<TreeHash, AuditError> {
        Ok(self.levels[height as usize][index as usize])
    }
}

/// Computes MTH over leaves streamed in order, in O(log n) memory (the offline verifier's tree).
#[derive(Debug, Default)]
pub(crate) struct RootBuilder {
    /// Complete subtrees, left to right, strictly decreasing power-of-two sizes.
    stack: Vec<(u64, TreeHash)>,
    size: u64,
}

impl RootBuilder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The builder of a tree of `size` leaves from its frontier: the hashes of its complete
    /// subtrees, left to right (sizes the powers of two of `size`'s binary form, descending), as
    /// [`frontier_from_consistency`] gives them.
    pub(crate) fn from_frontier(size: u64, frontier: &[TreeHash]) -> Result<Self, AuditError> {
        if frontier.len() != size.count_ones() as usize {
            return Err(AuditError::InvalidProof(format!(
                "a tree of {size} leaves has {} complete subtrees, not {}",
                size.count_ones(),
                frontier.len()
            )));
        }
        let sizes = (0..64u32)
            .rev()
            .map(|bit| 1u64 << bit)
            .filter(|bit| size & bit != 0);
        Ok(Self {
            stack: sizes.zip(frontier.iter().copied()).collect(),
            size,
        })
    }

    pub(crate) fn push(&mut self, leaf: TreeHash) {
        self.size += 1;
        let mut node = (1, leaf);
        while let Some(&(size, left)) = self.stack.last() {
            if size != node.0 {
                break;
            }
            self.stack.pop();
            node = (size * 2, node_hash(&left, &node.1));
        }
        self.stack.push(node);
    }

    /// MTH of the leaves pushed so far: the subtrees folded from the right, which is the RFC's
    /// split at the largest power of two applied repeatedly.
    pub(crate) fn root(&self) -> TreeHash {
        let mut nodes = self.stack.iter().rev();
        let Some(&(_, mut root)) = nodes.next() else {
            return empty_root();
        };
        for (_, left) in nodes {
            root = node_hash(left, &root);
        }
        root
    }
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2): that `leaf` is the leaf at `index` of the tree
/// of `tree_size` leaves whose root is `root`.
pub fn verify_inclusion(
    leaf: &TreeHash,
    index: u64,
    tree_size: u64,
    proof: &[TreeHash],
    root: &TreeHash,
) -> Result<(), AuditError> {
    if index >= tree_size {
        return Err(AuditError::InvalidProof(format!(
            "index {index} is not below tree size {tree_size}"
        )));
    }
    let (mut fnode, mut snode) = (index, tree_size - 1);
    let mut hash = *leaf;
    for sibling in proof {
        if snode == 0 {
            return Err(AuditError::InvalidProof(
                "inclusion proof is too long".into(),
            ));
        }
        if fnode & 1 == 1 || fnode == snode {
            hash = node_hash(sibling, &hash);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            hash = node_hash(&hash, sibling);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(AuditError::InvalidProof(
            "inclusion proof is too short".into(),
        ));
    }
    if hash != *root {
        return Err(AuditError::InvalidProof(format!(
            "inclusion proof of leaf {index} leads to root {hash}, expected {root}"
        )));
    }
    Ok(())
}

/// The frontier of the tree of `first` leaves (its complete subtrees' hashes, left to right) that
/// a consistency proof from `first` to `second` carries: the nodes that the RFC 9162 §2.1.4.2
/// verification folds into the first root. Meaningful only for a proof that
/// [`verify_consistency`] accepted, which checks that they fold to the first root; a frontier
/// that folds to a signed root is, by the hash's collision resistance, the tree's own.
pub(crate) fn frontier_from_consistency(
    first: u64,
    second: u64,
    first_root: &TreeHash,
    proof: &[TreeHash],
) -> Result<Vec<TreeHash>, AuditError> {
    if first == 0 || first > second {
        return Err(AuditError::InvalidProof(format!(
            "a consistency proof needs 1 <= first <= second, got first {first}, second {second}"
        )));
    }
    if first.is_power_of_two() {
        // The first tree is one complete subtree: its root.
        return Ok(vec![*first_root]);
    }
    let Some((start, rest)) = proof.split_first() else {
        return Err(AuditError::InvalidProof(
            "the proof is empty: it carries no frontier of the first tree".into(),
        ));
    };
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let mut right_to_left = vec![*start];
    for node in rest {
        if snode == 0 {
            break;
        }
        if fnode & 1 == 1 || fnode == snode {
            right_to_left.push(*node);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        }
        fnode >>= 1;
        snode >>= 1;
    }
    right_to_left.reverse();
    Ok(right_to_left)
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2): that the tree of `first` leaves with root
/// `first_root` is a prefix of the tree of `second` leaves with root `second_root`.
/// With `first == second` the proof must be empty and the roots equal.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &TreeHash,
    second_root: &TreeHash,
    proof: &[TreeHash],
) -> Result<(), AuditError> {
    if first == 0 || first > second {
        return Err(AuditError::InvalidProof(format!(
            "a consistency proof needs 1 <= first <= second, got first {first}, second {second}"
        )));
    }
    if first == second {
        if !proof.is_empty() {
            return Err(AuditError::InvalidProof(
                "consistency proof between equal sizes must be empty".into(),
            ));
        }
        if first_root != second_root {
            return Err(AuditError::InvalidProof(format!(
                "trees of equal size {first} have different roots {first_root} and {second_root}"
            )));
        }
        return Ok(());
    }
    let Some((head, tail)) = proof.split_first() else {
        return Err(AuditError::InvalidProof(
            "consistency proof is empty".into(),
        ));
    };
    // A first tree that is a complete subtree is its own first node and is not sent.
    let (start, rest) = if first.is_power_of_two() {
        (first_root, proof)
    } else {
        (head, tail)
    };
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut first_hash, mut second_hash) = (*start, *start);
    for node in rest {
        if snode == 0 {
            return Err(AuditError::InvalidProof(
                "consistency proof is too long".into(),
            ));
        }
        if fnode & 1 == 1 || fnode == snode {
            first_hash = node_hash(node, &first_hash);
            second_hash = node_hash(node, &second_hash);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            second_hash = node_hash(&second_hash, node);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(AuditError::InvalidProof(
            "consistency proof is too short".into(),
        ));
    }
    if first_hash != *first_root {
        return Err(AuditError::InvalidProof(format!(
            "consistency proof gives first root {first_hash}, expected {first_root}"
        )));
    }
    if second_hash != *second_root {
        return Err(AuditError::InvalidProof(format!(
            "consistency proof gives second root {second_hash}, expected {second_root}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    // An independent, literal transcription of RFC 9162 §2.1: recursive over slices, hashing
    // with sha2 directly, rehashing everything on every call.

    fn sha(parts: &[&[u8]]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    fn k_of(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    fn mth(leaves: &[[u8; 32]]) -> [u8; 32] {
        match leaves.len() {
            0 => sha(&[]),
            1 => leaves[0],
            n => {
                let k = k_of(n);
                sha(&[&[1], &mth(&leaves[..k]), &mth(&leaves[k..])])
            }
        }
    }

    fn path(m: usize, leaves: &[[u8; 32]]) -> Vec<[u8; 32]> {
        let n = leaves.len();
        if n == 1 {
            return Vec::new();
        }
        let k = k_of(n);
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    fn subproof(m: usize, leaves: &[[u8; 32]], b: bool) -> Vec<[u8; 32]> {
        let n = leaves.len();
        if m == n {
            return if b { Vec::new() } else { vec![mth(leaves)] };
        }
        let k = k_of(n);
        if m <= k {
            let mut p = subproof(m, &leaves[..k], b);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = subproof(m - k, &leaves[k..], false);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| sha(&[&[0], format!("record {i}").as_bytes()]))
            .collect()
    }

    fn tree_of(leaves: &[[u8; 32]]) -> MerkleTree {
        let mut tree = MerkleTree::new();
        for leaf in leaves {
            tree.push(TreeHash::from_bytes(*leaf));
        }
        tree
    }

    fn bytes(hashes: &[TreeHash]) -> Vec<[u8; 32]> {
        hashes.iter().map(|h| *h.as_bytes()).collect()
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

    /// Checks every tree size up to `all.len()` of one tree against the reference, exhaustively
    /// for the sizes in `exhaustive` and on `samples` random choices otherwise.
    fn check_against_reference(all: &[[u8; 32]], sizes: &[usize], rng: &mut Rng, samples: usize) {
        let mut tree = tree_of(all);
        for &n in sizes {
            let prefix = &all[..n];
            let root = TreeHash::from_bytes(mth(prefix));
            assert_eq!(tree.root(n as u64).unwrap(), root, "root of {n}");
            let mut builder = RootBuilder::new();
            prefix
                .iter()
                .for_each(|leaf| builder.push(TreeHash::from_bytes(*leaf)));
            assert_eq!(builder.root(), root, "streamed root of {n}");

            let pick = |rng: &mut Rng, bound: usize| -> Vec<usize> {
                if samples == 0 {
                    (0..bound).collect()
                } else {
                    (0..samples)
                        .map(|_| rng.below(bound as u64) as usize)
                        .collect()
                }
            };
            for m in pick(rng, n) {
                let proof = tree.inclusion_proof(m as u64, n as u64).unwrap();
                assert_eq!(bytes(&proof), path(m, prefix), "inclusion {m} in {n}");
                let leaf = TreeHash::from_bytes(all[m]);
                verify_inclusion(&leaf, m as u64, n as u64, &proof, &root).unwrap();
                let wrong = TreeHash::from_bytes(all[(m + 1) % all.len()]);
                if n > 1 {
                    assert!(verify_inclusion(&wrong, m as u64, n as u64, &proof, &root).is_err());
                    assert!(
                        verify_inclusion(&leaf, (m as u64 + 1) % n as u64, n as u64, &proof, &root)
                            .is_err()
                    );
                }
                let mut longer = proof.clone();
                longer.push(root);
                assert!(verify_inclusion(&leaf, m as u64, n as u64, &longer, &root).is_err());
                if let Some((_, shorter)) = proof.split_last() {
                    assert!(verify_inclusion(&leaf, m as u64, n as u64, shorter, &root).is_err());
                }
            }
            for first in pick(rng, n).into_iter().map(|m| m + 1) {
                let proof = tree.consistency_proof(first as u64, n as u64).unwrap();
                assert_eq!(
                    bytes(&proof),
                    subproof(first, prefix, true),
                    "consistency {first}->{n}"
                );
                let first_root = TreeHash::from_bytes(mth(&all[..first]));
                verify_consistency(first as u64, n as u64, &first_root, &root, &proof).unwrap();
                if first < n {
                    assert!(
                        verify_consistency(first as u64, n as u64, &root, &root, &proof).is_err()
                    );
                    assert!(
                        verify_consistency(
                            first as u64,
                            n as u64,
                            &first_root,
                            &first_root,
                            &proof
                        )
                        .is_err()
                    );
                    for i in 0..proof.len() {
                        let mut bad = proof.clone();
                        bad[i] = TreeHash::from_bytes([0xaa; 32]);
                        assert!(
                            verify_consistency(first as u64, n as u64, &first_root, &root, &bad)
                                .is_err()
                        );
                    }
                    let mut longer = proof.clone();
                    longer.push(root);
                    assert!(
                        verify_consistency(first as u64, n as u64, &first_root, &root, &longer)
                            .is_err()
                    );
                    assert!(
                        verify_consistency(
                            first as u64,
                            n as u64,
                            &first_root,
                            &root,
                            &proof[..proof.len() - 1]
                        )
                        .is_err()
                    );
                }
            }
        }
    }

    #[test]
    fn all_sizes_up_to_64_match_the_rfc_reference() {
        let all = leaves(64);
        let sizes: Vec<usize> = (1..=64).collect();
        check_against_reference(&all, &sizes, &mut Rng(1), 0);
    }

    #[test]
    fn a_random_larger_tree_matches_the_rfc_reference() {
        let mut rng = Rng(0x5eed_1234_abcd_9876);
        let n = 1000 + rng.below(3000) as usize;
        let all = leaves(n);
        let mut sizes: Vec<usize> = (0..6).map(|_| 1 + rng.below(n as u64) as usize).collect();
        sizes.extend([n, 1024, 1023, 1025].into_iter().filter(|&s| s <= n));
        check_against_reference(&all, &sizes, &mut rng, 40);
    }

    #[test]
    fn empty_tree_and_out_of_range_requests() {
        let mut tree = tree_of(&leaves(5));
        assert_eq!(tree.root(0).unwrap(), empty_root());
        assert_eq!(empty_root().to_hex(), hex::encode(sha(&[])));
        assert!(tree.root(6).is_err());
        assert!(tree.inclusion_proof(5, 5).is_err());
        assert!(tree.inclusion_proof(0, 6).is_err());
        assert!(tree.consistency_proof(0, 5).is_err());
        assert!(tree.consistency_proof(3, 2).is_err());
        assert!(tree.consistency_proof(3, 6).is_err());
        assert!(tree.consistency_proof(5, 5).unwrap().is_empty());
        assert_eq!(tree.leaf(4), Some(TreeHash::from_bytes(leaves(5)[4])));
        assert_eq!(tree.leaf(5), None);
    }

    #[test]
    fn hex_is_strict() {
        let hash = TreeHash::from_bytes([0xab; 32]);
        assert_eq!(TreeHash::from_hex(&hash.to_hex()).unwrap(), hash);
        assert!(TreeHash::from_hex(&hash.to_hex().to_uppercase()).is_err());
        assert!(TreeHash::from_hex(&hash.to_hex()[1..]).is_err());
        assert!(TreeHash::from_hex(&format!("{}0", hash.to_hex())).is_err());
        assert_eq!(leaf_hash(b"x").as_bytes(), &sha(&[&[0], b"x"]));
    }

    #[test]
    fn the_frontier_from_a_consistency_proof_extends_to_the_second_root() {
        let mut tree = MerkleTree::new();
        let leaves: Vec<TreeHash> = (0..70u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for leaf in &leaves {
            tree.push(*leaf);
        }
        for first in 1..=40u64 {
            for second in first + 1..=70 {
                let proof = tree.consistency_proof(first, second).unwrap();
                let first_root = tree.root(first).unwrap();
                let second_root = tree.root(second).unwrap();
                verify_consistency(first, second, &first_root, &second_root, &proof).unwrap();
                let frontier =
                    frontier_from_consistency(first, second, &first_root, &proof).unwrap();
                let mut expected = RootBuilder::new();
                for leaf in &leaves[..first as usize] {
                    expected.push(*leaf);
                }
                let mut builder = RootBuilder::from_frontier(first, &frontier).unwrap();
                assert_eq!(builder.stack, expected.stack, "{first} -> {second}");
                for leaf in &leaves[first as usize..second as usize] {
                    builder.push(*leaf);
                }
                assert_eq!(builder.root(), second_root, "{first} -> {second}");
            }
        }
        assert!(RootBuilder::from_frontier(3, &[leaves[0]]).is_err());
    }
}
