//! The configuration file, as `Config::load` reads it (TOML, then the checks), and written back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        smartsignd::fuzzing::config_text(text);
    }
});
