//! audit-log: placeholder, being written.
#![forbid(unsafe_code)]
