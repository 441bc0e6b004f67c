//! Entry points for the fuzz targets of `fuzz/` (feature `fuzzing`, off in every build of the
//! appliance): the crate's private readers of what lies on disk, each with the checks the log
//! makes. Each panics only where the code it calls would.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::log::scan;
use crate::merkle::{RootBuilder, empty_root, leaf_hash};
use crate::record::check_line;

/// One record line (without its newline), as the log checks every line when it opens: gives
/// its index or why it is refused.
pub fn record_line(line: &[u8]) -> Result<u64, String> {
    check_line(line)
}

/// A whole log file (`audit.log`) and a checkpoint file (`checkpoint.json`) as
/// [`crate::AuditLog::open`] reads them without a tree state: every line checked and hashed into
/// the tree, then the checkpoint parsed and its root compared with the tree's (the signature is
/// checked by the `audit_checkpoint` target; a fuzzer cannot sign).
pub fn log_and_checkpoint(log: &[u8], checkpoint_json: &[u8]) {
    let Ok(checkpoint) = Checkpoint::from_json(checkpoint_json) else {
        return;
    };
    let mut tree = RootBuilder::new();
    let mut root = (checkpoint.tree_size() == 0).then(empty_root);
    let scanned = scan(log, Path::new("audit.log"), 0, 0, |content, _, _| {
        tree.push(leaf_hash(content));
        if tree.size() == checkpoint.tree_size() {
            root = Some(tree.root());
        }
        Ok(())
    });
    if let (Ok(_), Some(root)) = (scanned, root) {
        let _ = root == *checkpoint.root_hash();
    }
}
