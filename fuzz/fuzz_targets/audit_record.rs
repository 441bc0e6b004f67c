//! Audit log lines, as the log checks each line of `audit.log` when it opens: the one canonical
//! spelling of a record.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = audit_log::fuzzing::record_line(data);
});
