//! The audit log's files, as `AuditLog::open` reads them: `audit.log` line by line (lengths,
//! torn tail, indexes, the Merkle tree) and `checkpoint.json` against the tree. Fields: the
//! checkpoint; the rest is the log file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let checkpoint = fields.next();
    let log = fields.rest();
    audit_log::fuzzing::log_and_checkpoint(log, checkpoint);
});
