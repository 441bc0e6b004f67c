//! The offsets file: where each record starts in `audit.log`, one 8-byte big-endian entry per
//! record, read with `pread`.
//!
//! One entry per record rather than one per 256 records: it costs 8 bytes a record on disk (about
//! 3% of a record of a few hundred bytes) and nothing in memory, and a page of records is then two
//! reads of 8 bytes and one read of the page, where a sparse index would first scan up to 255
//! records (up to 16 MB at `MAX_RECORD_LEN`) to find where the page starts.
//!
//! Like the tiles, it is derived from `audit.log`: the writer writes each batch's entries without
//! fsync, the tree state is written only after it has been fsynced, and the entries past the tree
//! state are rewritten from the log at open. A page read checks that it starts and ends on record
//! boundaries with the records asked for, so a damaged entry fails the read instead of serving the
//! wrong bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use crate::error::AuditError;

/// The offsets file in the log directory.
pub(crate) const OFFSETS_FILE: &str = "offsets";
const ENTRY_LEN: u64 = 8;

#[derive(Debug)]
pub(crate) struct Offsets {
    path: PathBuf,
    file: File,
    /// Test hook: the next write fails.
    #[cfg(test)]
    pub(crate) fail_next_write: std::sync::atomic::AtomicBool,
}

impl Offsets {
    /// Opens (or creates) the offsets file of the log in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Self, AuditError> {
        let path = dir.join(OFFSETS_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|error| AuditError::io(format!("opening {}", path.display()), error))?;
        Ok(Self {
            path,
            file,
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the file, for the thread that fsyncs it.
    pub(crate) fn try_clone(&self) -> Result<File, AuditError> {
        self.file
            .try_clone()
            .map_err(|error| AuditError::io(format!("opening {}", self.path.display()), error))
    }

    /// The number of whole entries in the file.
    pub(crate) fn len(&self) -> Result<u64, AuditError> {
        let metadata = self.file.metadata().map_err(|error| {
            AuditError::io(format!("inspecting {}", self.path.display()), error)
        })?;
        Ok(metadata.len() / ENTRY_LEN)
    }

    /// Keeps the first `count` entries.
    pub(crate) fn truncate(&self, count: u64) -> Result<(), AuditError> {
        self.file
            .set_len(count * ENTRY_LEN)
            .map_err(|error| AuditError::io(format!("truncating {}", self.path.display()), error))
    }

    /// Writes the entries of records `first`, `first + 1`, ...
    pub(crate) fn write(&self, first: u64, offsets: &[u64]) -> Result<(), AuditError> {
        #[cfg(test)]
        if self
            .fail_next_write
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Err(AuditError::io(
                format!("writing {}", self.path.display()),
                io::Error::other("injected offsets write failure"),
            ));
        }
        let bytes: Vec<u8> = offsets
            .iter()
            .flat_map(|offset| offset.to_be_bytes())
            .collect();
        self.file
            .write_all_at(&bytes, first * ENTRY_LEN)
            .map_err(|error| AuditError::io(format!("writing {}", self.path.display()), error))
    }

    /// Where record `index` starts in the log.
    pub(crate) fn read(&self, index: u64) -> Result<u64, AuditError> {
        let mut entry = [0; ENTRY_LEN as usize];
        match self.file.read_exact_at(&mut entry, index * ENTRY_LEN) {
            Ok(()) => Ok(u64::from_be_bytes(entry)),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Err(AuditError::derived(
                &self.path,
                format!("it has no entry for record {index}"),
            )),
            Err(error) => Err(AuditError::io(
                format!("reading {}", self.path.display()),
                error,
            )),
        }
    }
}
