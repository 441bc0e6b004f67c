//! smartsign-ctl: placeholder, being written by the lead; see bench_hsm.rs, bench_audit.rs and
//! audit_cmd.rs for the parts helpers own.
#![forbid(unsafe_code)]
fn main() {}
