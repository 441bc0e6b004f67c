//! Unseal share texts, as the unseal gate takes them from officers: parsed and checked against
//! the configured digests (QuorumPolicy::accept). Fields: the threshold (1 byte), the digests
//! (one per line); the rest is the share text.
#![no_main]

use hsm_adapter::quorum::QuorumPolicy;
use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let threshold = fields.next().first().copied().unwrap_or(2);
    let digests: Vec<String> = fields.next_str().lines().map(str::to_owned).collect();
    let Ok(text) = std::str::from_utf8(fields.rest()) else {
        return;
    };
    if let Ok(policy) = QuorumPolicy::new(usize::from(threshold), &digests) {
        let _ = policy.accept(text);
    }
    let _ = hsm_adapter::quorum::Share::parse(text);
});
