//! Where accounts, certificates, TAIDs and signing requests are kept.
//!
//! The trait is synchronous: the daemon calls it from `tokio::task::spawn_blocking`. Two
//! backends implement it: [`SqliteStore`], the embedded default, and [`PgStore`], a PostgreSQL
//! database shared by several daemons in front of one HSM cluster. One suite of tests
//! (`conformance`) runs against both.

#[cfg(test)]
mod conformance;
mod custody;
mod postgres;
mod sqlite;

use time::OffsetDateTime;

pub use custody::{KekRotation, KeyRefSlot, StoredKeyRef};
pub use postgres::{Leadership, PgStore};
pub use sqlite::SqliteStore;

use crate::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertificateNotice, CertificateRecord,
    ConsentChallenge, CscSad, IssuanceJournal, KeyChangeJournal, RequestId, RevocationReason,
    ServiceName, SigningRequest, SigningStatus, StoreError, StoredEvent, UserEvent,
};

/// A tokenised account identifier: the account's name at one online service (DESIGN.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaidRecord {
    /// base64url of the truncated HMAC, made by the daemon.
    pub taid: String,
    /// The service it was made for.
    pub service: ServiceName,
    /// The account it stands for.
    pub account_id: AccountId,
}

/// An audit record written in the same transaction as the change it records, waiting to be
/// appended to the audit log (which is not in the store), then deleted. Its fields are JSON
/// text and name ids only, never personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAudit {
    /// Its place in the outbox, oldest first.
    pub id: i64,
    /// The audit event name.
    pub event: String,
    /// Who made the change.
    pub actor: String,
    /// The record's fields, a JSON object.
    pub fields: String,
}

/// The records the appliance keeps. Every method is one transaction.
///
/// The methods that change an account or a certificate take the user events (`events`) that
/// the change yields, by the application's rule, and store them in the same transaction, only
/// when the change is made: a refused or conflicting change stores none. Events are numbered in
/// the order their transactions commit (see [`Store::events_after`]).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Adds a new account; `AlreadyExists` when the id is taken.
    fn insert_account(&self, account: &AccountRecord) -> Result<(), StoreError>;

    /// The account with this id.
    fn get_account(&self, id: &AccountId) -> Result<Option<AccountRecord>, StoreError>;

    /// Replaces the record, only if the stored one is still at `account.version` (and bumps the
    /// version): `Conflict` when another change came first, `NotFound` when there is none.
    fn update_account(
        &self,
        account: &AccountRecord,
        events: &[UserEvent],
    ) -> Result<(), StoreError>;

    /// Inserts an "iAM Smart+" account with its first certificate, in one transaction.
    fn insert_account_with_certificate(
        &self,
        account: &AccountRecord,
        certificate: &CertificateRecord,
        events: &[UserEvent],
    ) -> Result<(), StoreError>;

    /// Stores a new certificate and the account that now points at it, in one transaction, only
    /// if the account is still at `account.version` (`Conflict` otherwise, and nothing is
    /// stored).
    fn attach_certificate(
        &self,
        account: &AccountRecord,
        certificate: &CertificateRecord,
        events: &[UserEvent],
    ) -> Result<(), StoreError>;

    /// [`Store::update_account`], and in the same transaction the audit record of the change
    /// into the outbox. Gives the outbox id of the record.
    fn update_account_audited(
        &self,
        account: &AccountRecord,
        event: &str,
        actor: &str,
        fields: &str,
        events: &[UserEvent],
    ) -> Result<i64, StoreError>;

    /// Records that an HKIC number sent with a signing request for `account` was not the
    /// holder's.
    fn record_hkic_mismatch(
        &self,
        account: &AccountId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// When HKIC numbers sent for `account` since `since` were not the holder's, oldest first.
    fn hkic_mismatches_since(
        &self,
        account: &AccountId,
        since: OffsetDateTime,
    ) -> Result<Vec<OffsetDateTime>, StoreError>;

    /// The audit records not yet appended to the audit log, oldest first.
    fn pending_audits(&self) -> Result<Vec<PendingAudit>, StoreError>;

    /// Removes an audit record the audit log now holds.
    fn delete_pending_audit(&self, id: i64) -> Result<(), StoreError>;

    /// Ids of the accounts whose HKIC hash is `hkic_hash` (one person, one account at a time).
    fn accounts_with_hkic_hash(&self, hkic_hash: &[u8; 32]) -> Result<Vec<AccountId>, StoreError>;

    /// Stores `account` (deregistered by the caller) and erases, in the same transaction, every
    /// personal datum the store holds for it: the sealed name and date of birth, the HKIC hash
    /// (to zeros), its certificates' sealed DER (they carry the name and the keyed HKIC hash;
    /// one whose key is still there keeps it until [`Store::forget_key`]), and its signing
    /// requests' sealed results, hashes and descriptions; a request still pending or approved
    /// fails. The pseudonymous records stay for audit. Conditional on `account.version` like
    /// `update_account`.
    fn deregister(&self, account: &AccountRecord, events: &[UserEvent]) -> Result<(), StoreError>;

    /// Adds a certificate of an existing account; `AlreadyExists` for a known serial, `Conflict`
    /// for an unknown account.
    fn insert_certificate(&self, certificate: &CertificateRecord) -> Result<(), StoreError>;

    /// The certificate with this serial.
    fn get_certificate(&self, serial: &CertSerial)
    -> Result<Option<CertificateRecord>, StoreError>;

    /// Marks a certificate revoked (a revoked one keeps its first reason and time); whether it
    /// changed it, and only then are `events` stored. `NotFound` when there is none.
    fn mark_revoked(
        &self,
        serial: &CertSerial,
        reason: RevocationReason,
        at: OffsetDateTime,
        events: &[UserEvent],
    ) -> Result<bool, StoreError>;

    /// Valid (not revoked) certificates whose time-based event `notice` is not told yet (nor a
    /// later one) and whose `not_after` is at or before `until`, the earliest first, up to
    /// `limit`: through an index that holds only valid certificates not yet told they expired.
    fn certificates_to_notify(
        &self,
        notice: CertificateNotice,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError>;

    /// Notes that the certificate's `notice` is told, only if it is still valid and neither it
    /// nor a later notice is told already (a compare-and-set), and stores `events` with it;
    /// whether it did. Two sweeps that race tell it once.
    fn record_notice(
        &self,
        serial: &CertSerial,
        notice: CertificateNotice,
        events: &[UserEvent],
    ) -> Result<bool, StoreError>;

    /// The events after position `after` (0: from the first), in position order, up to
    /// `limit`. Positions follow commit order: an event committed after a reader saw position
    /// `p` gets a position above `p`, so a reader that goes on from the last position it saw
    /// misses none (PostgreSQL serialises the transactions that store events for this).
    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Forgets a certificate's key reference, if it is still `key_ref` (the key is destroyed).
    /// The certificate of a deregistered account loses its sealed DER with it: it was kept only
    /// until its revocation reached the CA.
    fn forget_key(&self, serial: &CertSerial, key_ref: &[u8]) -> Result<(), StoreError>;
    /// The account's certificates, oldest `not_before` first.
    fn certificates_of(&self, account: &AccountId) -> Result<Vec<CertificateRecord>, StoreError>;

    /// The account and its current certificate, read together.
    fn account_with_certificate(
        &self,
        id: &AccountId,
    ) -> Result<Option<(AccountRecord, Option<CertificateRecord>)>, StoreError>;

    /// Revoked certificates that still have their key reference (a revocation that stopped
    /// before the CA had it or the key was gone), up to `limit`.
    fn unfinished_revocations(&self, limit: usize) -> Result<Vec<CertificateRecord>, StoreError>;

    /// Valid certificates past `not_after` at `now` that still have their key reference, the
    /// earliest first, up to `limit`.
    fn expired_with_keys(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError>;

    /// The accounts whose 18th birthday has the keyed hash `key`.
    fn accounts_with_adult_day(&self, key: &[u8; 32]) -> Result<Vec<AccountRecord>, StoreError>;

    /// Accounts with a valid minor's certificate in use, in id order after `after`, up to
    /// `limit` (the sweep's first run over a store that kept no `adult_day_key`).
    fn current_minors(
        &self,
        after: Option<&AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError>;

    /// Accounts pending rectification whose deadline is at or before `now`, the earliest first,
    /// up to `limit`.
    fn rectifications_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError>;

    /// Accounts in `status` whose status changed before `before`, the oldest change first, up
    /// to `limit` (the retention sweep).
    fn accounts_changed_before(
        &self,
        status: AccountStatus,
        before: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError>;

    /// A sweep's mark (how far a rule got), if set.
    fn sweep_mark(&self, name: &str) -> Result<Option<i64>, StoreError>;

    /// Moves a sweep's mark from `from` (`None`: unset) to `to`; false, changing nothing, when
    /// the mark is no longer at `from` (another run moved it).
    fn advance_sweep_mark(
        &self,
        name: &str,
        from: Option<i64>,
        to: i64,
    ) -> Result<bool, StoreError>;

    /// Stores a TAID unless the account has one at this service already, and returns the stored
    /// one. `AlreadyExists` when `taid` is taken by another (service, account): a collision.
    fn put_taid(&self, taid: &TaidRecord) -> Result<TaidRecord, StoreError>;

    /// The account a TAID stands for at `service`; `None` for a TAID of another service.
    fn find_taid(&self, service: &ServiceName, taid: &str)
    -> Result<Option<AccountId>, StoreError>;

    /// The TAIDs `service` holds (its CSC credentials), in TAID order, after `after`, at most
    /// `limit`: through the (service, taid) index, never another service's, and never a
    /// deregistered account's (its certificate data is erased: no credential any more).
    fn taids_of(
        &self,
        service: &ServiceName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// Stores a CSC signature activation datum (`AlreadyExists` for a known one).
    fn insert_sad(&self, sad: &CscSad) -> Result<(), StoreError>;

    /// The SAD whose SHA-256 is `sad_hash`.
    fn get_sad(&self, sad_hash: &[u8; 32]) -> Result<Option<CscSad>, StoreError>;

    /// Redeems the SAD at `now`, only if it is unused and unexpired (a conditional update):
    /// whether this call did. Two concurrent `signHash` calls cannot both redeem it.
    fn redeem_sad(&self, sad_hash: &[u8; 32], now: OffsetDateTime) -> Result<bool, StoreError>;

    /// Adds a signing request, only while its account is active, has fewer than `max_pending`
    /// requests pending at `now`, and none of them shows the same identification code:
    /// `Conflict` otherwise (and for an unknown account or certificate), `AlreadyExists` for a
    /// known id. The limit holds across threads and processes.
    fn insert_request(
        &self,
        request: &SigningRequest,
        max_pending: usize,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// The signing request with this id.
    fn get_request(&self, id: &RequestId) -> Result<Option<SigningRequest>, StoreError>;

    /// Moves a request to the state of `request` (status, attempts, result), only if it is still
    /// in `from` (its status and bad-attempt count as read): `Conflict` when another change came
    /// first, `NotFound` when there is no such request. Moving to `Approved` also needs, in the
    /// same transaction, the account active, still bound to the device generation the request
    /// was made for, and its current certificate the request's, valid and with its key: the
    /// single-use guard, across threads, processes and restarts.
    fn transition_request(
        &self,
        request: &SigningRequest,
        from: (SigningStatus, u8),
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// The account's finished requests (signed, rejected, expired, locked, failed; a pending one
    /// past its expiry counts as expired), newest first, each with when it finished: up to
    /// `limit` of them before `before` (the finish time and id of the last one seen).
    fn signing_history(
        &self,
        account: &AccountId,
        now: OffsetDateTime,
        before: Option<(OffsetDateTime, RequestId)>,
        limit: usize,
    ) -> Result<Vec<(SigningRequest, OffsetDateTime)>, StoreError>;

    /// Requests left `Approved`: signing began and did not end (a crash). Recovery fails them.
    fn approved_requests(&self) -> Result<Vec<SigningRequest>, StoreError>;

    /// The account's requests that are pending and not expired at `now`, oldest first.
    fn pending_requests(
        &self,
        account: &AccountId,
        now: OffsetDateTime,
    ) -> Result<Vec<SigningRequest>, StoreError>;

    /// How many requests of all accounts are pending and not expired at `now` (a metric).
    fn count_pending(&self, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// Checks that the store answers a read (for readiness).
    fn health(&self) -> Result<(), StoreError>;

    /// Stores a consent challenge, replacing the account's live one for the same purpose.
    fn put_consent_challenge(&self, challenge: &ConsentChallenge) -> Result<(), StoreError>;

    /// Removes and returns the account's challenge with this nonce, whatever its purpose (used
    /// once, even when the answer is refused).
    fn take_consent_challenge(
        &self,
        account: &AccountId,
        nonce: &str,
    ) -> Result<Option<ConsentChallenge>, StoreError>;

    /// Starts a key change: `AlreadyExists` while the account has one in progress.
    fn insert_key_change(&self, journal: &KeyChangeJournal) -> Result<(), StoreError>;

    /// Records a key change's progress; `NotFound` when there is none for the account.
    fn update_key_change(&self, journal: &KeyChangeJournal) -> Result<(), StoreError>;

    /// Ends a key change (done, or undone by recovery).
    fn delete_key_change(&self, account: &AccountId) -> Result<(), StoreError>;

    /// The unfinished key changes, oldest first.
    fn key_changes(&self) -> Result<Vec<KeyChangeJournal>, StoreError>;

    /// Starts a first issuance: `AlreadyExists` while the account id has one in progress.
    fn insert_issuance(&self, journal: &IssuanceJournal) -> Result<(), StoreError>;

    /// Records what the CA issued; `NotFound` when there is no issuance for the account.
    fn update_issuance(&self, journal: &IssuanceJournal) -> Result<(), StoreError>;

    /// Ends a first issuance (kept, or undone).
    fn delete_issuance(&self, account: &AccountId) -> Result<(), StoreError>;

    /// The unfinished first issuances, oldest first.
    fn issuances(&self) -> Result<Vec<IssuanceJournal>, StoreError>;

    /// The audit index of the record of the ceremony transcript with this SHA-256, if the log
    /// has one.
    fn ceremony_record(&self, sha256: &[u8; 32]) -> Result<Option<u64>, StoreError>;

    /// Notes that audit record `audit_index` holds the ceremony transcript with this SHA-256;
    /// `AlreadyExists` when another node noted it first.
    fn record_ceremony(
        &self,
        sha256: &[u8; 32],
        audit_index: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Writes asked and transactions committed since the store was opened, for a store that
    /// groups writes into shared commits (SQLite); `None` for one that does not.
    fn commit_counts(&self) -> Option<(u64, u64)> {
        None
    }

    /// Round trips to a database server since the store was opened (PostgreSQL); `None` for
    /// an embedded store.
    fn round_trips(&self) -> Option<u64> {
        None
    }

    /// The active "iAM Smart+" accounts whose current certificate is not revoked and has
    /// `not_after` in `(after, until]`, with that certificate, soonest `not_after` first.
    fn current_certificates_ending(
        &self,
        after: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<(AccountId, CertificateRecord)>, StoreError>;
}
