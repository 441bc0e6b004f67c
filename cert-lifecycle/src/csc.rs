//! The CSC facade's signature activation data (SAD): what `credentials/authorize` hands a
//! service, kept only as its SHA-256 and bound to that service, that credential (TAID), the
//! signing request it made and exactly those hashes. `signatures/signHash` redeems it once.

use time::OffsetDateTime;

use crate::{RequestId, ServiceName};

/// A SAD as stored: never the SAD itself, which only the service holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CscSad {
    /// SHA-256 of the SAD's text: the lookup key; the SAD cannot be rebuilt from it.
    pub sad_hash: [u8; 32],
    /// The service it was issued to.
    pub service: ServiceName,
    /// The credential (the account's TAID at that service).
    pub taid: String,
    /// The signing request `credentials/authorize` made.
    pub request_id: RequestId,
    /// SHA-256 of the hashes' raw bytes concatenated in order: `signHash` must present exactly
    /// these.
    pub hashes_sha256: [u8; 32],
    /// After this it activates nothing.
    pub expires_at: OffsetDateTime,
    /// When `signHash` redeemed it; a SAD is used once.
    pub used_at: Option<OffsetDateTime>,
}
