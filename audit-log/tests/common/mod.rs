//! Helpers shared by the integration tests.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]
// Test helpers: a panic is how they report a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use audit_log::{
    Actor, AuditEvent, AuditLog, AuditLogConfig, AuditPublicKey, Clock, EventName, Origin,
    SoftwareSigner,
};
use sha2::{Digest, Sha256};

pub(crate) const ORIGIN: &str = "test.smartsign.example/audit";

/// A real P-256 key (a fixed scalar, so failures reproduce).
pub(crate) fn signer() -> SoftwareSigner {
    SoftwareSigner::from_secret_scalar(&[0x42; 32]).unwrap()
}

pub(crate) fn public_key() -> AuditPublicKey {
    signer().public_key()
}

pub(crate) fn public_key_pem() -> String {
    public_key().to_spki_pem().unwrap()
}

/// 2026-11-22T10:00:00Z
pub(crate) fn base_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_341_600)
}

/// A clock the test sets.
#[derive(Debug)]
pub(crate) struct FixedClock(Mutex<SystemTime>);

impl FixedClock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(base_time())))
    }

    pub(crate) fn advance(&self, seconds: u64) {
        *self.0.lock().unwrap() += Duration::from_secs(seconds);
    }
}

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// A clock that holds whoever asks for the time until the test opens the gate: it parks the
/// writer thread in the middle of a batch, deterministically.
#[derive(Debug, Default)]
pub(crate) struct GateClock {
    open: Mutex<bool>,
    opened: Condvar,
}

impl GateClock {
    pub(crate) fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Clock for GateClock {
    fn now(&self) -> SystemTime {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        base_time()
    }
}

pub(crate) fn config() -> AuditLogConfig {
    AuditLogConfig::new(Origin::new(ORIGIN).unwrap()).with_checkpoint_key(public_key())
}

pub(crate) fn config_with_clock(clock: Arc<dyn Clock>) -> AuditLogConfig {
    config().with_clock(clock)
}

pub(crate) fn event(i: u64) -> AuditEvent {
    AuditEvent::new(
        EventName::new("signing.signed").unwrap(),
        Actor::new(format!("service:demo-{}", i % 3)).unwrap(),
    )
    .with_field("request_id", format!("req-{i:06}"))
    .with_field("attempt", i % 5)
}

pub(crate) async fn open(dir: &Path) -> AuditLog {
    AuditLog::open(dir, config_with_clock(FixedClock::new()))
        .await
        .unwrap()
}

/// Splits NDJSON into lines without their newlines.
pub(crate) fn lines(ndjson: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = ndjson.split(|&b| b == b'\n').collect();
    assert_eq!(
        lines.pop(),
        Some(&b""[..]),
        "NDJSON must end with a newline"
    );
    lines
}

// The RFC 9162 §2.1 reference, written out naively from the text: recursive over slices,
// rehashing everything on every call.

pub(crate) fn sha(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

pub(crate) fn reference_leaf(line: &[u8]) -> [u8; 32] {
    sha(&[&[0], line])
}

fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

pub(crate) fn reference_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => sha(&[]),
        1 => leaves[0],
        n => {
            let k = split(n);
            sha(&[
                &[1],
                &reference_root(&leaves[..k]),
                &reference_root(&leaves[k..]),
            ])
        }
    }
}

pub(crate) fn reference_path(m: usize, leaves: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if n == 1 {
        return Vec::new();
    }
    let k = split(n);
    let (mut path, sibling) = if m < k {
        (
            reference_path(m, &leaves[..k]),
            reference_root(&leaves[k..]),
        )
    } else {
        (
            reference_path(m - k, &leaves[k..]),
            reference_root(&leaves[..k]),
        )
    };
    path.push(sibling);
    path
}

pub(crate) fn reference_consistency(
    m: usize,
    leaves: &[[u8; 32]],
    complete: bool,
) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if m == n {
        return if complete {
            Vec::new()
        } else {
            vec![reference_root(leaves)]
        };
    }
    let k = split(n);
    let (mut proof, other) = if m <= k {
        (
            reference_consistency(m, &leaves[..k], complete),
            reference_root(&leaves[k..]),
        )
    } else {
        (
            reference_consistency(m - k, &leaves[k..], false),
            reference_root(&leaves[..k]),
        )
    };
    proof.push(other);
    proof
}
