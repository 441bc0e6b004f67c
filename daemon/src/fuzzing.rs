//! Entry points for the fuzz targets of `fuzz/` (feature `fuzzing`, off in every build of the
//! appliance; docs/fuzzing.md): the daemon's parsers of the configuration file, of device
//! public keys and of the API's request bodies, called as the daemon calls them.

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

/// How many routes [`api_body`] chooses from.
pub const API_BODIES: u8 = 12;

/// A request body as the route `route % API_BODIES` parses it, every field checked, before any
/// workflow runs: registration, device switch, suspension, resumption, matching,
/// invalidation, certificate revocation, signing request, authorisation, consent (renewal,
/// re-application, deregistration), the development clock, and the empty body of an upgrade.
/// Returns whether the body was accepted.
pub fn api_body(route: u8, body: &[u8]) -> bool {
    use crate::{accounts, admin, lifecycle, signing};
    let ctx = crate::api::Ctx {
        caller: crate::tls::Caller {
            role: crate::tls::Role::Service,
            name: "fuzz".into(),
        },
        params: vec!["u-fuzz".into()],
        query: Default::default(),
        body: axum::body::Bytes::copy_from_slice(body),
    };
    let now = time::macros::datetime!(2027-01-01 00:00 UTC);
    match route % API_BODIES {
        0 => accounts::registration_body(&ctx, now.date()).is_ok(),
        1 => accounts::device_body(&ctx).is_ok(),
        2 => accounts::suspension_body(&ctx).is_ok(),
        3 => accounts::resumption_body(&ctx).is_ok(),
        4 => accounts::matching_body(&ctx, now).is_ok(),
        5 => accounts::invalidation_body(&ctx).is_ok(),
        6 => accounts::revocation_body(&ctx).is_ok(),
        7 => cert_lifecycle::ServiceName::parse("demo-a")
            .ok()
            .is_some_and(|service| signing::parse_create(&ctx, service).is_ok()),
        8 => signing::authorisation_body(&ctx).is_ok(),
        9 => lifecycle::consent(&ctx).is_ok(),
        10 => admin::clock_body(&ctx).is_ok(),
        _ => accounts::require_empty_object(&ctx).is_ok(),
    }
}
