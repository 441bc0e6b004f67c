//! Entry points for the fuzz targets of `fuzz/` (feature `fuzzing`, off in every build of the
//! appliance; docs/fuzzing.md): the daemon's parsers of the configuration file and of device
//! public keys, called as the daemon calls them.

use crate::config::Config;

/// The configuration file's text, as `Config::load` reads it: TOML into `Config`, then
/// `Config::check` (which looks at the files it names). A configuration that parses must
/// also survive a round trip through its own TOML (`--dev` writes one so).
///
/// A `hsm.ceremony_transcript` that is not a regular file is left out: `check` reads it whole,
/// and a fuzzer that names `/dev/zero` would only measure the machine's memory.
pub fn config_text(text: &str) {
    let Ok(mut config) = toml::from_str::<Config>(text) else {
        return;
    };
    if config
        .hsm
        .ceremony_transcript
        .as_ref()
        .is_some_and(|path| !path.is_file())
    {
        config.hsm.ceremony_transcript = None;
    }
    let _ = config.check();
    let _ = config.hsm.quorum.as_ref().map(|quorum| quorum.policy());
    if let Ok(written) = toml::to_string(&config) {
        // What the daemon writes it must read back.
        #[allow(clippy::expect_used)]
        toml::from_str::<Config>(&written).expect("a written configuration reads back");
    }
}

/// A device public key as the account routes take it (`device_public_key`: an EC P-256
/// SubjectPublicKeyInfo in PEM); its DER when accepted.
pub fn device_public_key_pem(pem: &str) -> Option<Vec<u8>> {
    crate::signing::device_key(pem).ok()
}
