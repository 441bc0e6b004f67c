//! Black-box tests of smartsign: they run the built `smartsignd` and `smartsign-ctl` on SoftHSM
//! tokens made in temporary directories and talk to them as their users do, with real peers
//! (openssl) checking what comes out. The library itself is empty; the tests are in `tests/`.

#![forbid(unsafe_code)]
