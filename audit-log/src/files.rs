//! Durable file operations shared by the records file, the checkpoint and the tree state.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::Path;

use crate::error::AuditError;

/// Replaces `dir/name` atomically through `dir/temp`: a reader or a crash sees the old file or
/// the new one, never a mix, and the new one is durable when this returns.
pub(crate) fn write_atomically(
    dir: &Path,
    name: &str,
    temp: &str,
    bytes: &[u8],
) -> Result<(), AuditError> {
    let temp = dir.join(temp);
    let target = dir.join(name);
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
    file.write_all(bytes).map_err(io_error("writing", &temp))?;
    file.sync_all().map_err(io_error("fsync of", &temp))?;
    drop(file);
    fs::rename(&temp, &target).map_err(io_error("renaming to", &target))?;
    sync_dir(dir)
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| AuditError::io(format!("fsync of directory {}", dir.display()), error))
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), AuditError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(AuditError::io(
            format!("removing {}", path.display()),
            error,
        )),
    }
}

/// Appends `line` and a newline to `dir/name` (made when missing), durably.
pub(crate) fn append_line(dir: &Path, name: &str, line: &[u8]) -> Result<(), AuditError> {
    let path = dir.join(name);
    let io_error = |what: &str| {
        let context = format!("{what} {}", path.display());
        move |error| AuditError::io(context, error)
    };
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(io_error("opening"))?;
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line);
    bytes.push(b'\n');
    file.write_all(&bytes).map_err(io_error("appending to"))?;
    file.sync_data().map_err(io_error("fsync of"))?;
    if created {
        sync_dir(dir)?;
    }
    Ok(())
}
