//! The signing request and its state machine (DESIGN.md, "The signing flow").
//!
//! ```text
//!            Valid(Reject)                    caller: signed / failed
//!   Pending ----------------> Rejected   Pending ---------------------> Signed | Failed
//!      |  \  BadSignature x3                 ^
//!      |   `----------------> Locked         | Valid(Approve): Transition::Approve
//!      |  now >= expires_at                  |  (stays Pending until the caller records it)
//!      `--------------------> Expired
//! ```

use std::fmt;

use time::OffsetDateTime;

use crate::wire::wire_enum;
use crate::{AccountId, CertSerial, FlowError, HashAlgorithm, RequestId, ServiceName};

/// Bad authorisations that lock a request.
pub const MAX_BAD_ATTEMPTS: u8 = 3;

wire_enum! {
    /// Where a signing request stands.
    pub enum SigningStatus ("signing status") {
        /// Waiting for the user's authorisation.
        Pending => "pending",
        /// Approved by the user's device, and durably so before the HSM is asked: the
        /// single-use guard. It ends signed or failed, never pending again.
        Approved => "approved",
        /// Signed; the result is stored.
        Signed => "signed",
        /// The user rejected it.
        Rejected => "rejected",
        /// Not authorised in time.
        Expired => "expired",
        /// Locked after three bad authorisations.
        Locked => "locked",
        /// Approved, but signing failed (HSM, audit or certificate status); final.
        Failed => "failed",
    }
}

wire_enum! {
    /// The user's decision in an authorisation statement.
    pub enum Decision ("decision") {
        /// Sign.
        Approve => "approve",
        /// Do not sign; ends the request.
        Reject => "reject",
    }
}

/// What the daemon found when it checked an authorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The statement verified under the bound device key and its fields match the request.
    Valid(Decision),
    /// The signature does not verify, or the statement does not match the request.
    BadSignature,
}

/// What the caller must do after an accepted authorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Sign now, then record `Signed` (or `Failed`); the request is still `Pending`.
    Approve,
    /// The request is now `Rejected`; store it.
    Rejected,
}

/// A signing request as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningRequest {
    /// Random id from the HSM.
    pub id: RequestId,
    /// The service that created it; the only one that may read it.
    pub service: ServiceName,
    /// The account whose key signs.
    pub account_id: AccountId,
    /// The certificate in use when the request was made.
    pub certificate: CertSerial,
    /// Four decimal digits shown by the service and by the app.
    pub identification_code: String,
    /// The hash function of `hash`.
    pub hash_algorithm: HashAlgorithm,
    /// The hash to sign, as given; empty for a batch.
    pub hash: Vec<u8>,
    /// A batch's hashes, in the order given, each of `hash_algorithm`'s length: `None` for a
    /// single-hash request. A batch is one request (one code, one approval, one state): its
    /// hashes are signed together or not at all.
    pub hashes: Option<Vec<Vec<u8>>>,
    /// What the user is signing, for the app (at most 200 characters).
    pub description: Option<String>,
    /// Where it stands (see [`SigningRequest::effective_status`]).
    pub status: SigningStatus,
    /// Bad authorisations so far.
    pub bad_attempts: u8,
    /// The account's device generation at creation: a device switch invalidates the request.
    pub device_generation: u32,
    /// When it was made.
    pub created_at: OffsetDateTime,
    /// When it expires unless authorised.
    pub expires_at: OffsetDateTime,
    /// Signature, CMS, certificate and chain, sealed by the daemon; once `Signed`.
    pub sealed_result: Option<Vec<u8>>,
    /// When it was signed.
    pub signed_at: Option<OffsetDateTime>,
}

impl SigningRequest {
    /// The status at `now`: a pending request past its expiry reads as expired.
    pub fn effective_status(&self, now: OffsetDateTime) -> SigningStatus {
        match self.status {
            SigningStatus::Pending if now >= self.expires_at => SigningStatus::Expired,
            status => status,
        }
    }

    /// Applies an authorisation checked by the caller. On `Err`, the record may have changed
    /// (expired, one more bad attempt, locked) and must be stored too.
    ///
    /// An expired request answers `Expired` whether or not its expiry was stored yet, so that the
    /// answer does not depend on when a sweep ran; other finished requests answer `NotPending`.
    /// A bad signature on a finished request is not counted.
    pub fn authorise(
        &mut self,
        outcome: AuthOutcome,
        now: OffsetDateTime,
    ) -> Result<Transition, FlowError> {
        match self.effective_status(now) {
            SigningStatus::Pending => {}
            SigningStatus::Expired => {
                self.status = SigningStatus::Expired;
                return Err(FlowError::Expired);
            }
            _ => return Err(FlowError::NotPending),
        }
        match outcome {
            AuthOutcome::Valid(Decision::Approve) => {
                self.status = SigningStatus::Approved;
                Ok(Transition::Approve)
            }
            AuthOutcome::Valid(Decision::Reject) => {
                self.status = SigningStatus::Rejected;
                Ok(Transition::Rejected)
            }
            AuthOutcome::BadSignature => {
                self.bad_attempts = self.bad_attempts.saturating_add(1);
                if self.bad_attempts >= MAX_BAD_ATTEMPTS {
                    self.status = SigningStatus::Locked;
                    Err(FlowError::TooManyAttempts)
                } else {
                    Err(FlowError::AuthorisationInvalid)
                }
            }
        }
    }

    /// Records the signature after an approval.
    pub fn mark_signed(&mut self, sealed_result: Vec<u8>, at: OffsetDateTime) {
        self.status = SigningStatus::Signed;
        self.sealed_result = Some(sealed_result);
        self.signed_at = Some(at);
    }

    /// Records that signing failed after an approval; the request cannot be retried.
    pub fn mark_failed(&mut self) {
        self.status = SigningStatus::Failed;
    }

    /// Whether this is a batch (made with `hashes`), even of one hash.
    pub fn is_batch(&self) -> bool {
        self.hashes.is_some()
    }

    /// What the HSM signs, in order: the one hash, or a batch's hashes.
    pub fn hashes_to_sign(&self) -> Vec<&[u8]> {
        match &self.hashes {
            Some(hashes) => hashes.iter().map(Vec::as_slice).collect(),
            None => vec![self.hash.as_slice()],
        }
    }

    /// A batch's digest: SHA-256 of its hashes' raw bytes concatenated in order (API.md, the
    /// batch statement). `None` for a single-hash request.
    pub fn batch_digest(&self) -> Option<[u8; 32]> {
        use sha2::Digest as _;
        let hashes = self.hashes.as_ref()?;
        let mut digest = sha2::Sha256::new();
        for hash in hashes {
            digest.update(hash);
        }
        Some(digest.finalize().into())
    }

    /// The statement the device signs for `decision` (API.md): lines joined by `\n`, no
    /// trailing newline. A batch has its own statement (`smartsign-authorise-batch-v1`, with
    /// the number of hashes and their digest), so that a single-hash statement never approves
    /// a batch, nor a batch statement a single hash.
    pub fn authorisation_statement(&self, decision: Decision) -> String {
        match (&self.hashes, self.batch_digest()) {
            (Some(hashes), Some(digest)) => format!(
                "smartsign-authorise-batch-v1\n{}\n{}\n{}\n{}\n{}\n{}",
                self.id,
                self.identification_code,
                self.hash_algorithm,
                hashes.len(),
                hex::encode(digest),
                decision,
            ),
            _ => format!(
                "smartsign-authorise-v1\n{}\n{}\n{}\n{}\n{}",
                self.id,
                self.identification_code,
                self.hash_algorithm,
                hex::encode(&self.hash),
                decision,
            ),
        }
    }
}

impl fmt::Debug for SigningRequest {
    // No hash, code or description: they say what a person signs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningRequest")
            .field("id", &self.id)
            .field("service", &self.service)
            .field("account_id", &self.account_id)
            .field("certificate", &self.certificate)
            .field("hash_algorithm", &self.hash_algorithm)
            .field("batch", &self.hashes.as_ref().map(Vec::len))
            .field("status", &self.status)
            .field("bad_attempts", &self.bad_attempts)
            .field("device_generation", &self.device_generation)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("signed_at", &self.signed_at)
            .finish_non_exhaustive()
    }
}

/// A batch's hashes as the store keeps them: concatenated (each has its algorithm's length).
pub(crate) fn joined_hashes(hashes: Option<&Vec<Vec<u8>>>) -> Option<Vec<u8>> {
    hashes.map(|hashes| hashes.concat())
}

/// The stored form back: `None` (a single-hash request) stays `None`; an empty value is a
/// batch whose hashes were erased with its account. A length that is not a multiple of the
/// algorithm's is corrupt.
pub(crate) fn split_hashes(
    algorithm: HashAlgorithm,
    joined: Option<Vec<u8>>,
) -> Result<Option<Vec<Vec<u8>>>, &'static str> {
    let Some(joined) = joined else {
        return Ok(None);
    };
    let len = algorithm.output_len();
    if joined.len() % len != 0 {
        return Err("a batch's stored hashes do not fit its hash algorithm");
    }
    Ok(Some(joined.chunks(len).map(<[u8]>::to_vec).collect()))
}

/// A four-digit identification code from four random bytes (the caller takes them from the HSM),
/// or `None` for the top 7296 of the 2^32 values, which would make some codes likelier than
/// others: the caller then draws again (rejection sampling, so every code is equally likely).
pub fn identification_code_from_random(bytes: [u8; 4]) -> Option<String> {
    const UNBIASED: u32 = 4_294_960_000; // 10_000 * floor(2^32 / 10_000)
    let value = u32::from_be_bytes(bytes);
    (value < UNBIASED).then(|| format!("{:04}", value % 10_000))
}

#[cfg(test)]
pub(crate) mod tests {
    use time::Duration;
    use time::macros::datetime;

    use super::*;

    pub(crate) const CREATED: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

    pub(crate) fn request(id_byte: u8, account: &str, serial: &str) -> SigningRequest {
        SigningRequest {
            id: RequestId::from_random([id_byte; 16]),
            service: ServiceName::parse("demo-a").unwrap(),
            account_id: AccountId::parse(account).unwrap(),
            certificate: CertSerial::parse(serial).unwrap(),
            // Distinct per request, as an account's pending requests' codes must be.
            identification_code: format!("{:04}", 4820 + u32::from(id_byte)),
            hash_algorithm: HashAlgorithm::Sha256,
            hash: vec![0xab; 32],
            hashes: None,
            description: Some("Tax return 2026".to_owned()),
            status: SigningStatus::Pending,
            bad_attempts: 0,
            device_generation: 1,
            created_at: CREATED,
            expires_at: CREATED + Duration::seconds(120),
            sealed_result: None,
            signed_at: None,
        }
    }

    fn now() -> OffsetDateTime {
        CREATED + Duration::seconds(30)
    }

    #[test]
    fn approval_moves_the_request_to_approved_until_signed() {
        let mut r = request(1, "u-1", "1");
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Approve), now()),
            Ok(Transition::Approve)
        );
        assert_eq!(r.status, SigningStatus::Approved);
        // Approved is not pending: a second authorisation is refused, even past the expiry.
        assert_eq!(
            r.clone()
                .authorise(AuthOutcome::Valid(Decision::Approve), now()),
            Err(FlowError::NotPending)
        );
        assert_eq!(
            r.effective_status(r.expires_at + Duration::seconds(1)),
            SigningStatus::Approved
        );
        r.mark_signed(vec![7], now());
        assert_eq!(r.status, SigningStatus::Signed);
        assert_eq!(r.signed_at, Some(now()));
    }

    #[test]
    fn reject_decision_ends_request() {
        let mut r = request(1, "u-1", "1");
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Reject), now()),
            Ok(Transition::Rejected)
        );
        assert_eq!(r.status, SigningStatus::Rejected);
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Approve), now()),
            Err(FlowError::NotPending)
        );
    }

    #[test]
    fn signed_request_cannot_be_authorised_again() {
        let mut r = request(1, "u-1", "1");
        r.authorise(AuthOutcome::Valid(Decision::Approve), now())
            .unwrap();
        r.mark_signed(vec![7], now());
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Approve), now()),
            Err(FlowError::NotPending)
        );
        assert_eq!(r.status, SigningStatus::Signed);
    }

    #[test]
    fn failed_request_cannot_be_retried() {
        let mut r = request(1, "u-1", "1");
        r.authorise(AuthOutcome::Valid(Decision::Approve), now())
            .unwrap();
        r.mark_failed();
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Approve), now()),
            Err(FlowError::NotPending)
        );
    }

    #[test]
    fn third_bad_authorisation_locks_request() {
        let mut r = request(1, "u-1", "1");
        assert_eq!(
            r.authorise(AuthOutcome::BadSignature, now()),
            Err(FlowError::AuthorisationInvalid)
        );
        assert_eq!(
            r.authorise(AuthOutcome::BadSignature, now()),
            Err(FlowError::AuthorisationInvalid)
        );
        assert_eq!(r.status, SigningStatus::Pending);
        assert_eq!(r.bad_attempts, 2);
        assert_eq!(
            r.authorise(AuthOutcome::BadSignature, now()),
            Err(FlowError::TooManyAttempts)
        );
        assert_eq!(r.status, SigningStatus::Locked);
        assert_eq!(r.bad_attempts, 3);
        // Even a good authorisation is refused now.
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Approve), now()),
            Err(FlowError::NotPending)
        );
        assert_eq!(r.bad_attempts, 3);
    }

    #[test]
    fn good_authorisation_after_two_bad_ones_still_signs() {
        let mut r = request(1, "u-1", "1");
        for _ in 0..2 {
            r.authorise(AuthOutcome::BadSignature, now()).unwrap_err();
        }
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Approve), now()),
            Ok(Transition::Approve)
        );
    }

    #[test]
    fn request_expires_at_expires_at() {
        let mut r = request(1, "u-1", "1");
        let just_before = r.expires_at - Duration::SECOND;
        assert_eq!(r.effective_status(just_before), SigningStatus::Pending);
        assert_eq!(r.effective_status(r.expires_at), SigningStatus::Expired);
        let at = r.expires_at;
        assert_eq!(
            r.authorise(AuthOutcome::Valid(Decision::Approve), at),
            Err(FlowError::Expired)
        );
        assert_eq!(r.status, SigningStatus::Expired);
        // Once stored as expired it answers the same, and a bad signature is not counted.
        assert_eq!(
            r.authorise(AuthOutcome::BadSignature, at),
            Err(FlowError::Expired)
        );
        assert_eq!(r.bad_attempts, 0);
    }

    #[test]
    fn expired_request_reports_expired_even_for_a_bad_signature() {
        let mut r = request(1, "u-1", "1");
        assert_eq!(
            r.authorise(AuthOutcome::BadSignature, r.expires_at),
            Err(FlowError::Expired)
        );
        assert_eq!(r.bad_attempts, 0);
    }

    #[test]
    fn only_pending_requests_read_as_expired() {
        let mut r = request(1, "u-1", "1");
        r.status = SigningStatus::Signed;
        assert_eq!(
            r.effective_status(r.expires_at + Duration::HOUR),
            SigningStatus::Signed
        );
    }

    #[test]
    fn authorisation_statement_has_the_api_form() {
        let mut r = request(0xab, "u-1", "1");
        r.identification_code = "4821".to_owned();
        assert_eq!(
            r.authorisation_statement(Decision::Approve),
            format!(
                "smartsign-authorise-v1\n{}\n4821\nsha256\n{}\napprove",
                "ab".repeat(16),
                "ab".repeat(32)
            )
        );
        assert!(
            r.authorisation_statement(Decision::Reject)
                .ends_with("\nreject")
        );
    }

    /// The batch statement of API.md, worked by hand: the digest is SHA-256 over the raw
    /// hashes concatenated, and the count is its own line.
    #[test]
    fn batch_statement_has_the_api_form() {
        use sha2::Digest as _;
        let mut r = request(0xab, "u-1", "1");
        r.identification_code = "4821".to_owned();
        r.hash = Vec::new();
        r.hashes = Some(vec![vec![1; 32], vec![2; 32], vec![3; 32]]);
        let mut concatenated = vec![1; 32];
        concatenated.extend([2; 32]);
        concatenated.extend([3; 32]);
        let digest = hex::encode(sha2::Sha256::digest(&concatenated));
        assert_eq!(
            r.authorisation_statement(Decision::Approve),
            format!(
                "smartsign-authorise-batch-v1\n{}\n4821\nsha256\n3\n{digest}\napprove",
                "ab".repeat(16)
            )
        );
        assert!(r.is_batch());
        assert_eq!(r.hashes_to_sign(), [&[1u8; 32][..], &[2; 32], &[3; 32]]);
        // Another order is another statement.
        r.hashes = Some(vec![vec![2; 32], vec![1; 32], vec![3; 32]]);
        assert!(
            !r.authorisation_statement(Decision::Approve)
                .contains(&digest)
        );
        // A batch of one is still a batch.
        r.hashes = Some(vec![vec![1; 32]]);
        assert!(
            r.authorisation_statement(Decision::Reject)
                .starts_with("smartsign-authorise-batch-v1\n")
        );
        let single = request(0xab, "u-1", "1");
        assert!(!single.is_batch());
        assert_eq!(single.hashes_to_sign(), [&[0xab; 32][..]]);
        assert_eq!(single.batch_digest(), None);
    }

    #[test]
    fn identification_code_is_four_digits() {
        assert_eq!(
            identification_code_from_random([0, 0, 0, 7]).unwrap(),
            "0007"
        );
        assert_eq!(identification_code_from_random([0xff; 4]), None);
        assert_eq!(
            identification_code_from_random(4_294_959_999u32.to_be_bytes()).unwrap(),
            "9999"
        );
        assert_eq!(
            identification_code_from_random(4_294_960_000u32.to_be_bytes()),
            None
        );
        assert_eq!(
            identification_code_from_random([0, 0, 0x27, 0x0f]).unwrap(),
            "9999"
        );
    }

    #[test]
    fn hash_lengths_and_wire_names() {
        let lens: Vec<_> = HashAlgorithm::ALL
            .iter()
            .map(|h| (h.as_str(), h.output_len()))
            .collect();
        assert_eq!(lens, [("sha256", 32), ("sha384", 48), ("sha512", 64)]);
        assert_eq!(
            "locked".parse::<SigningStatus>().unwrap(),
            SigningStatus::Locked
        );
        assert_eq!(
            serde_json::from_str::<Decision>("\"approve\"").unwrap(),
            Decision::Approve
        );
        assert!("SHA256".parse::<HashAlgorithm>().is_err());
    }

    #[test]
    fn signing_request_debug_hides_what_is_signed() {
        let r = request(1, "u-1", "1");
        let s = format!("{r:?}");
        assert!(!s.contains("4821") && !s.contains("Tax") && !s.contains("171"));
    }
}
