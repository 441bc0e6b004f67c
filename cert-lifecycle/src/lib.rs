//! Accounts, iAM Smart-Certs and signing requests as state machines, and the rules that move
//! them: the age rules (11 to register, a guardian under 18, the certificate of a minor revoked at
//! 18), the renewal window, validity, the rectification deadline and the seven-year retention.
//!
//! It owns the store (SQLite by default) and the sweeps. It does no network I/O and makes no
//! PKCS#11 call: the HSM and the CA reach it as traits, and every rule takes `now` as a parameter.
//!
//! The daemon issue fills this crate; for now it only marks its place in the workspace.

#![forbid(unsafe_code)]
