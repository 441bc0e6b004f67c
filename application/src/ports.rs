//! The small traits the workflows work through. The daemon implements them over the real parts
//! (SQLite or PostgreSQL, the PKCS#11 adapter, the CA's OCSP and CRL, the audit log); the tests
//! of this crate implement them in memory (`tests/support`).

use std::future::Future;
use std::time::Duration;

use ca_bridge::status::CertStatus;
use ca_bridge::{IssueRequest, IssuedCertificate};
use cert_lifecycle::{CertSerial, HashAlgorithm, HkicNumber, RevocationReason, Store, StoreError};
use hsm_adapter::KeyAlgorithm;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::AppError;

/// The records: one [`Store`], read on the caller's thread and written off it.
pub trait Records: Send + Sync {
    /// The store the records live in.
    type Store: Store + ?Sized + 'static;

    /// A read of a few rows by key: fast enough to run where the caller is.
    fn read<T>(
        &self,
        call: impl FnOnce(&Self::Store) -> Result<T, StoreError>,
    ) -> Result<T, AppError>;

    /// A write (it waits for the disk) or a scan, where blocking does not hold up other work.
    fn write<T, F>(&self, call: F) -> impl Future<Output = Result<T, AppError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Self::Store) -> Result<T, StoreError> + Send + 'static;
}

/// What one hash of a signing asks of the HSM: the raw signature over the hash itself and the
/// CMS signature over its signed attributes' digest, both of the request's hash algorithm.
#[derive(Debug, Clone, Copy)]
pub struct ToSign<'a> {
    /// The request's hash.
    pub raw: &'a [u8],
    /// The digest of the CMS signed attributes made for it.
    pub attributes: &'a [u8],
}

/// The two signatures of one hash: the raw one over the hash and the CMS one over the signed
/// attributes, and the algorithm of the key that made them.
#[derive(Debug)]
pub struct Signatures {
    /// The user key's algorithm.
    pub algorithm: KeyAlgorithm,
    /// Over the request's hash.
    pub raw: Vec<u8>,
    /// Over the CMS signed attributes.
    pub attributes: Vec<u8>,
}

/// A user key the HSM just made.
#[derive(Debug)]
pub struct NewKey {
    /// What the store keeps to use it.
    pub key_ref: Vec<u8>,
    /// Its algorithm.
    pub algorithm: KeyAlgorithm,
    /// Its public key, a DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
}

/// The HSM: user keys, sealing under the data key, keyed hashes and random bytes.
///
/// A call that finds the HSM's queue full gives [`AppError::HsmBusy`] at once (the HSM is
/// healthy; the call may be made again); an HSM that cannot serve gives
/// [`AppError::HsmUnavailable`].
pub trait Keys: Send + Sync {
    /// Makes a user key of the configured algorithm and storage.
    fn generate(&self) -> impl Future<Output = Result<NewKey, AppError>> + Send;

    /// Signs the two digests of each of `items` (of `hash`'s algorithm) with the user key
    /// `key_ref` refers to (as the store keeps it), all in one trip (one HSM job, however
    /// many: a batch is signed whole or not at all): ECDSA for an EC key, PKCS#1 v1.5 for RSA.
    /// The signatures come back in the order of `items`.
    fn sign(
        &self,
        key_ref: &[u8],
        hash: HashAlgorithm,
        items: &[ToSign<'_>],
    ) -> impl Future<Output = Result<Vec<Signatures>, AppError>> + Send;

    /// Destroys a user key; a key the HSM no longer has counts as destroyed.
    fn destroy(&self, key_ref: &[u8]) -> impl Future<Output = Result<(), AppError>> + Send;

    /// Seals `plaintext` under the data key, bound to `purpose` and `binding` (an account or a
    /// request id), so that a sealed value cannot be moved to another row.
    fn seal(
        &self,
        purpose: &'static str,
        binding: &str,
        plaintext: &[u8],
    ) -> impl Future<Output = Result<Vec<u8>, AppError>> + Send;

    /// Opens what [`Keys::seal`] sealed for the same purpose and binding.
    fn unseal(
        &self,
        purpose: &'static str,
        binding: &str,
        sealed: &[u8],
    ) -> impl Future<Output = Result<Zeroizing<Vec<u8>>, AppError>> + Send;

    /// The keyed hash under the TAID key (its own HSM key) of `data`.
    fn taid_hash(&self, data: &[u8]) -> impl Future<Output = Result<[u8; 32], AppError>> + Send;

    /// The keyed hash of an HKIC number.
    fn hkic_hash(
        &self,
        hkic: &HkicNumber,
    ) -> impl Future<Output = Result<[u8; 32], AppError>> + Send;

    /// `len` random bytes from the HSM's generator.
    fn random(&self, len: usize) -> impl Future<Output = Result<Vec<u8>, AppError>> + Send;

    /// Waits `pause` before a call that found the HSM busy ([`AppError::HsmBusy`]) is made
    /// again (the daemon sleeps on its runtime's timer).
    fn busy_pause(&self, pause: Duration) -> impl Future<Output = ()> + Send;
}

/// The CA's word on a certificate: OCSP, then the CRL, with a cache of fresh answers.
pub trait CertificateStatus: Send + Sync {
    /// A fresh cached answer for `serial`, if there is one.
    fn cached(&self, serial: &CertSerial, now: OffsetDateTime) -> Option<CertStatus>;

    /// Asks the CA about the certificate `der`.
    fn check(
        &self,
        der: &[u8],
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<CertStatus, AppError>> + Send;
}

/// The CA's certificate services (CMP).
///
/// An issued certificate is unconfirmed until [`Authority::confirm`]: the workflow records it
/// first (its journal names it), then confirms it. A CA revokes a certificate that is never
/// confirmed, so a crash between the two leaves none that nothing refers to.
pub trait Authority: Send + Sync {
    /// What [`Authority::confirm`] needs of an issued certificate.
    type Unconfirmed: Send + Sync + 'static;

    /// Has the CA certify the key `key_ref` (an initial request).
    fn issue(
        &self,
        request: &IssueRequest,
        key_ref: &[u8],
    ) -> impl Future<Output = Result<(IssuedCertificate, Self::Unconfirmed), AppError>> + Send;

    /// Has the CA certify the key `key_ref` in place of the certificate `old_der`, the request
    /// protected by that certificate's key `old_key_ref` (a key update).
    fn rekey(
        &self,
        old_der: &[u8],
        old_key_ref: &[u8],
        request: &IssueRequest,
        key_ref: &[u8],
    ) -> impl Future<Output = Result<(IssuedCertificate, Self::Unconfirmed), AppError>> + Send;

    /// Confirms (`accept`) or rejects an issued certificate; the CA revokes a rejected one.
    fn confirm(
        &self,
        pending: Self::Unconfirmed,
        accept: bool,
    ) -> impl Future<Output = Result<(), AppError>> + Send;

    /// Revokes the certificate `der` at the CA. A certificate the CA reports revoked already
    /// (a revocation repeated after a crash) counts as revoked.
    fn revoke(
        &self,
        serial: &CertSerial,
        der: &[u8],
        reason: RevocationReason,
    ) -> impl Future<Output = Result<(), AppError>> + Send;
}

/// The audit log: each append is durable when it returns.
pub trait AuditTrail: Send + Sync {
    /// Appends one record and waits until it is durable; its index.
    fn append(
        &self,
        event: &'static str,
        actor: &str,
        fields: Map<String, Value>,
    ) -> impl Future<Output = Result<u64, AppError>> + Send;

    /// A named step of a workflow has been reached (crash tests stop the process here).
    fn step(&self, _name: &'static str) {}

    /// A signature was made (`outcome` "signed") or failed after its approval ("failed").
    fn signature(&self, _algorithm: &str, _outcome: &'static str) {}
}

/// Everything a workflow can reach.
pub trait Ports: Records + Keys + CertificateStatus + Authority + AuditTrail {}

impl<T: Records + Keys + CertificateStatus + Authority + AuditTrail> Ports for T {}
