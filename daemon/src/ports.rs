//! The application layer's ports over the real parts: the store (SQLite), the HSM adapter, the
//! CA's status service and CMP, and the audit log. Each call is timed into the metrics; each
//! failure keeps its cause for the log.

use std::time::Instant;

use application::AppError;
use application::ports::{
    AuditTrail, Authority, CertificateStatus, Keys, NewKey, Records, Signatures, ToSign,
};
use audit_log::{Actor, AuditEvent, EventName};
use ca_bridge::cmp::Unconfirmed;
use ca_bridge::status::CertStatus;
use ca_bridge::{IssueRequest, IssuedCertificate};
use cert_lifecycle::{CertSerial, HashAlgorithm, HkicNumber, RevocationReason, Store, StoreError};
use hsm_adapter::{Digest, SignatureScheme, UserKeyRef};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::app::App;

/// An HSM failure: busy when its queue is full (the signing flow waits and tries again),
/// `hsm_unavailable` when it cannot serve now, a fault otherwise.
pub(crate) fn hsm_error(error: hsm_adapter::HsmError) -> AppError {
    if matches!(error, hsm_adapter::HsmError::Busy) {
        return AppError::HsmBusy(error.into());
    }
    match error.kind() {
        hsm_adapter::ErrorKind::Unavailable => AppError::HsmUnavailable(error.into()),
        _ => AppError::fault(error),
    }
}

impl Records for App {
    type Store = dyn Store;

    /// On the caller's thread: from SQLite's page cache (WAL: readers do not wait for the
    /// writer) a read by key takes microseconds, less than a trip to the blocking pool; the
    /// PostgreSQL store waits for its one round trip inside `block_in_place`.
    fn read<T>(
        &self,
        call: impl FnOnce(&Self::Store) -> Result<T, StoreError>,
    ) -> Result<T, AppError> {
        call(self.store.as_ref()).map_err(AppError::from)
    }

    async fn write<T, F>(&self, call: F) -> Result<T, AppError>
    where
        T: Send + 'static,
        F: FnOnce(&Self::Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(store.as_ref()))
            .await
            .map_err(AppError::fault)?
            .map_err(AppError::from)
    }
}

impl Keys for App {
    async fn generate(&self) -> Result<NewKey, AppError> {
        let started = Instant::now();
        let key = self
            .hsm
            .generate_user_key(self.policy.key_algorithm, self.policy.key_mode)
            .await;
        self.metrics.observe_hsm("generate", started.elapsed());
        let key = key.map_err(hsm_error)?;
        Ok(NewKey {
            key_ref: key.to_bytes(),
            algorithm: key.algorithm(),
            public_key_der: key.public_key().as_der().to_vec(),
        })
    }

    async fn sign(
        &self,
        key_ref: &[u8],
        hash: HashAlgorithm,
        items: &[ToSign<'_>],
    ) -> Result<Vec<Signatures>, AppError> {
        let key = UserKeyRef::from_bytes(key_ref).map_err(AppError::fault)?;
        let scheme = if key.algorithm().is_ec() {
            SignatureScheme::Ecdsa
        } else {
            SignatureScheme::RsaPkcs1v15
        };
        // Every digest of every item in one job: one hand-over to an HSM worker and one key
        // lookup (or unwrap) for a whole batch.
        let mut digests = Vec::with_capacity(items.len() * 2);
        for item in items {
            digests.push(Digest::new(hash, item.raw.to_vec()).map_err(hsm_error)?);
            digests.push(Digest::new(hash, item.attributes.to_vec()).map_err(hsm_error)?);
        }
        let started = Instant::now();
        let signatures = self.hsm.sign_each(&key, scheme, &digests).await;
        self.metrics.observe_hsm("sign", started.elapsed());
        let signatures = signatures.map_err(hsm_error)?;
        if signatures.len() != digests.len() {
            return Err(AppError::fault(
                "the HSM gave another number of signatures than digests",
            ));
        }
        let mut signatures = signatures.into_iter();
        let mut pairs = Vec::with_capacity(items.len());
        while let (Some(raw), Some(attributes)) = (signatures.next(), signatures.next()) {
            pairs.push(Signatures {
                algorithm: key.algorithm(),
                raw,
                attributes,
            });
        }
        Ok(pairs)
    }

    async fn destroy(&self, key_ref: &[u8]) -> Result<(), AppError> {
        let key = UserKeyRef::from_bytes(key_ref).map_err(AppError::fault)?;
        match self.hsm.destroy_user_key(&key).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == hsm_adapter::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(hsm_error(error)),
        }
    }

    async fn seal(
        &self,
        purpose: &'static str,
        binding: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, AppError> {
        let aad = format!("smartsign-{purpose}-v1\n{binding}");
        let started = Instant::now();
        let sealed = self.hsm.encrypt(plaintext, aad.as_bytes()).await;
        self.metrics.observe_hsm("encrypt", started.elapsed());
        sealed.map_err(hsm_error)
    }

    async fn unseal(
        &self,
        purpose: &'static str,
        binding: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, AppError> {
        use secrecy::ExposeSecret;
        let aad = format!("smartsign-{purpose}-v1\n{binding}");
        let started = Instant::now();
        let plaintext = self.hsm.decrypt(sealed, aad.as_bytes()).await;
        self.metrics.observe_hsm("decrypt", started.elapsed());
        Ok(Zeroizing::new(
            plaintext.map_err(hsm_error)?.expose_secret().to_vec(),
        ))
    }

    async fn taid_hash(&self, data: &[u8]) -> Result<[u8; 32], AppError> {
        let started = Instant::now();
        let hash = self
            .hsm
            .hmac_sha256(hsm_adapter::SystemKey::Taid, data)
            .await;
        self.metrics.observe_hsm("hmac", started.elapsed());
        hash.map_err(hsm_error)
    }

    async fn hkic_hash(&self, hkic: &HkicNumber) -> Result<[u8; 32], AppError> {
        let started = Instant::now();
        let hash = self
            .hsm
            .hmac_sha256(hsm_adapter::SystemKey::Hkic, hkic.canonical())
            .await;
        self.metrics.observe_hsm("hmac", started.elapsed());
        hash.map_err(hsm_error)
    }

    async fn random(&self, len: usize) -> Result<Vec<u8>, AppError> {
        self.hsm.random(len).await.map_err(hsm_error)
    }

    async fn busy_pause(&self, pause: std::time::Duration) {
        tokio::time::sleep(pause).await;
    }
}

impl CertificateStatus for App {
    fn cached(&self, serial: &CertSerial, now: OffsetDateTime) -> Option<CertStatus> {
        self.ca.status.cached(serial.as_str(), now.into())
    }

    async fn check(&self, der: &[u8], now: OffsetDateTime) -> Result<CertStatus, AppError> {
        self.ca
            .status
            .check(der, now.into())
            .await
            .map_err(|error| AppError::StatusUnavailable(error.into()))
    }
}

impl Authority for App {
    type Unconfirmed = Unconfirmed;

    async fn issue(
        &self,
        request: &IssueRequest,
        key_ref: &[u8],
    ) -> Result<(IssuedCertificate, Unconfirmed), AppError> {
        let key = UserKeyRef::from_bytes(key_ref).map_err(AppError::fault)?;
        let started = Instant::now();
        let issued = self.ca.cmp.issue(request, &key).await;
        self.metrics.observe_cmp(started.elapsed(), issued.is_ok());
        let pending = issued.map_err(AppError::fault)?;
        Ok((pending.certificate().clone(), pending))
    }

    async fn rekey(
        &self,
        old_der: &[u8],
        old_key_ref: &[u8],
        request: &IssueRequest,
        key_ref: &[u8],
    ) -> Result<(IssuedCertificate, Unconfirmed), AppError> {
        let old_key = UserKeyRef::from_bytes(old_key_ref).map_err(AppError::fault)?;
        let key = UserKeyRef::from_bytes(key_ref).map_err(AppError::fault)?;
        let started = Instant::now();
        let issued = self.ca.cmp.rekey(old_der, &old_key, request, &key).await;
        self.metrics.observe_cmp(started.elapsed(), issued.is_ok());
        let pending = issued.map_err(AppError::fault)?;
        Ok((pending.certificate().clone(), pending))
    }

    async fn confirm(&self, pending: Unconfirmed, accept: bool) -> Result<(), AppError> {
        let started = Instant::now();
        let confirmed = self.ca.cmp.confirm(pending, accept).await;
        self.metrics
            .observe_cmp(started.elapsed(), confirmed.is_ok());
        confirmed.map(drop).map_err(AppError::fault)
    }

    /// Over CMP; the cached status of the certificate is forgotten either way. A revocation
    /// repeated after a crash is refused by the CA: then the CA is asked what it has.
    async fn revoke(
        &self,
        serial: &CertSerial,
        der: &[u8],
        reason: RevocationReason,
    ) -> Result<(), AppError> {
        let started = Instant::now();
        let result = self.ca.cmp.revoke(der, reason.crl_reason_code()).await;
        self.metrics.observe_cmp(started.elapsed(), result.is_ok());
        self.ca.status.forget(serial.as_str());
        let Err(error) = result else {
            return Ok(());
        };
        match self.ca.status.check(der, self.clock.now().into()).await {
            Ok(CertStatus::Revoked { .. }) => Ok(()),
            _ => Err(AppError::fault(error)),
        }
    }
}

impl AuditTrail for App {
    async fn append(
        &self,
        event: &'static str,
        actor: &str,
        fields: Map<String, Value>,
    ) -> Result<u64, AppError> {
        let started = Instant::now();
        let event_name = EventName::new(event).map_err(AppError::fault)?;
        let actor = Actor::new(actor).map_err(AppError::fault)?;
        let receipt = self
            .audit
            .append(AuditEvent::new(event_name, actor).with_fields(fields))
            .await
            .map_err(|error| AppError::AuditUnavailable(error.into()))?;
        self.metrics.observe_audit(event, started.elapsed());
        Ok(receipt.index)
    }

    fn step(&self, name: &'static str) {
        self.failpoint(name);
    }

    fn signature(&self, algorithm: &str, outcome: &'static str) {
        self.metrics.count_signature(algorithm, outcome);
    }
}
