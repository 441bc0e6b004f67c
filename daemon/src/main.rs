//! `smartsignd`: the signing daemon. The daemon issue brings the server; until then this binary
//! only says so, rather than pretending to serve.

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "smartsignd: the HTTPS daemon is not built yet; `ops/dev` provisions the development \
         token and `smartsign-ctl` runs the key, audit and benchmark commands"
    );
    ExitCode::from(2)
}
