//! The async API: every method queues a job for an HSM worker and awaits its reply, so a tokio
//! caller never blocks on PKCS#11.

use std::sync::Arc;

use secrecy::{SecretSlice, SecretString};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::clone::{self, CloneBundle, TransportKey};
use crate::config::HsmConfig;
use crate::error::HsmError;
use crate::kek::{self, KekStatus};
use crate::keys::{
    Digest, KekId, KeyAlgorithm, KeyMode, KeyStorage, SignatureScheme, SystemKey, SystemKeyKind,
    UserKeyRef,
};
use crate::operations::{self, MAX_RANDOM_LEN, SignRequest, SigningKey};
use crate::provision::{self, ProvisionReport};
use crate::public_key::PublicKeySpki;
use crate::session_pool::{self, Cost, Lane, Pool, Retry, WorkerCtx, job};
use crate::templates::system_key_algorithm;

/// A token, opened: a pool of worker threads each holding a logged-in session.
///
/// Calls queue in one of two lanes ([`Lane`]): [`Hsm::sign_with_system_key`] (CA, OCSP, CRL,
/// audit checkpoints) in the background lane, everything else (user signatures first of all) in
/// the signing lane, which the workers always serve first.
///
/// Share it with `Arc<Hsm>`. Replies travel over tokio oneshot channels, which work under any
/// executor. Opened inside a tokio runtime, it also runs a small task there that hands out the
/// workers' replies in batches (one cross-thread wake-up for many replies; `session_pool.rs`):
/// open it on the runtime that will call it. If that runtime shuts down first, the workers
/// reply from their own threads; requests in a batch that was on its way are answered with
/// [`HsmError::Closed`].
#[derive(Debug)]
pub struct Hsm {
    pool: Pool,
}

impl Hsm {
    /// Loads the module, finds the token by label or serial, logs every worker's session in and
    /// finds the keys. A wrong PIN gives [`HsmError::PinRejected`].
    ///
    /// Login state belongs to the process: if another `Hsm` in this process is already logged
    /// in to the same token, the module answers `CKR_USER_ALREADY_LOGGED_IN` without checking
    /// this configuration's PIN.
    pub async fn open(config: HsmConfig) -> Result<Hsm, HsmError> {
        let dispatcher = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (batches, receiver) = tokio::sync::mpsc::unbounded_channel();
            runtime.spawn(session_pool::dispatch(receiver));
            batches
        });
        let pool = run_blocking("hsm-open", move || Pool::start(&config, dispatcher)).await?;
        Ok(Hsm { pool })
    }

    pub(crate) fn shared(&self) -> &Arc<session_pool::Shared> {
        self.pool.shared()
    }

    /// Number of worker threads (and sessions).
    pub fn workers(&self) -> usize {
        self.pool.worker_count()
    }

    /// Finds or creates every [`SystemKey`], then checks each against the key policy.
    ///
    /// The KEK needs the security officer: if it is missing, the user is logged out, the SO logs
    /// in with `so_pin` to create it (CKA_TRUSTED can only be set by the SO, on a public
    /// object), and the user logs in again. Other requests wait meanwhile. Idempotent.
    pub async fn provision_system_keys(
        &self,
        so_pin: &SecretString,
    ) -> Result<ProvisionReport, HsmError> {
        let shared = Arc::clone(self.pool.shared());
        let so_pin = so_pin.clone();
        run_blocking("hsm-provision", move || provision::run(&shared, &so_pin)).await
    }

    /// Generates a user signing key in `mode`. The returned reference is all the caller needs
    /// to persist; for [`KeyMode::Wrapped`] it *is* the key.
    pub async fn generate_user_key(
        &self,
        algorithm: KeyAlgorithm,
        mode: KeyMode,
    ) -> Result<UserKeyRef, HsmError> {
        self.call(Retry::Never, Cost::Long, move |ctx| {
            ctx.generate_user_key(algorithm, mode)
        })
        .await
    }

    /// A reference to a resident key already on the token, found by CKA_ID (for a lost
    /// reference, or a key created outside the adapter). Its policy is checked when it signs.
    /// Only keys present when this `Hsm` was opened, or generated through it, are found.
    pub async fn resident_key_ref(
        &self,
        id: &[u8],
        algorithm: KeyAlgorithm,
    ) -> Result<UserKeyRef, HsmError> {
        if id.is_empty() || id.len() > 64 {
            return Err(HsmError::InvalidInput("a CKA_ID has 1 to 64 bytes".into()));
        }
        let id = id.to_vec();
        self.call(Retry::Once, Cost::Long, move |ctx| {
            ctx.resident_key_ref(algorithm, &id)
        })
        .await
    }

    /// Signs `digest` with a user key. ECDSA signatures are DER `Ecdsa-Sig-Value`s; RSA
    /// signatures are the raw modulus-sized integers.
    pub async fn sign(
        &self,
        key: &UserKeyRef,
        scheme: SignatureScheme,
        digest: &Digest,
    ) -> Result<Vec<u8>, HsmError> {
        let request = SignRequest::new(key.algorithm(), scheme, digest)?;
        let encoding = request.encoding();
        let signing_key = SigningKey::from_ref(key);
        let raw = self
            .call(Retry::Once, Cost::Short, move |ctx| {
                ctx.sign_user(&signing_key, &request)
            })
            .await?;
        encoding.finish(raw)
    }

    /// Signs each of `digests` with one user key, in one job on one worker: one hand-over and
    /// one key lookup (or unwrap, when the wrapped-key cache keeps the copy) for all of them.
    /// The signatures come back in the order of `digests`, encoded as [`Hsm::sign`] encodes
    /// them. A retry after a lost session signs them all again.
    pub async fn sign_each(
        &self,
        key: &UserKeyRef,
        scheme: SignatureScheme,
        digests: &[Digest],
    ) -> Result<Vec<Vec<u8>>, HsmError> {
        let requests = digests
            .iter()
            .map(|digest| SignRequest::new(key.algorithm(), scheme, digest))
            .collect::<Result<Vec<_>, _>>()?;
        let encodings: Vec<_> = requests.iter().map(SignRequest::encoding).collect();
        let signing_key = SigningKey::from_ref(key);
        let raw = self
            .call(Retry::Once, Cost::Short, move |ctx| {
                let mut signatures = Vec::with_capacity(requests.len());
                for request in &requests {
                    signatures.push(ctx.sign_user(&signing_key, request)?);
                }
                Ok(signatures)
            })
            .await?;
        raw.into_iter()
            .zip(encodings)
            .map(|(raw, encoding)| encoding.finish(raw))
            .collect()
    }

    /// Destroys a user key. A resident key is destroyed on the token. A wrapped key has nothing
    /// in the HSM but the workers' unwrapped copies, which are destroyed here: **the caller must
    /// delete the stored reference**, which is the key.
    pub async fn destroy_user_key(&self, key: &UserKeyRef) -> Result<(), HsmError> {
        match &key.storage {
            KeyStorage::Wrapped { blob, .. } => {
                for done in self.pool.evict_everywhere(blob) {
                    // A worker that has exited has no copy left.
                    let _ = done.await;
                }
                Ok(())
            }
            KeyStorage::Resident { id } => {
                let shared = Arc::clone(self.pool.shared());
                let id = id.clone();
                run_blocking("hsm-destroy", move || {
                    operations::destroy_resident(&shared, &id)
                })
                .await
            }
        }
    }

    /// HMAC-SHA-256 of `data` under a MAC system key ([`SystemKey::Taid`] or
    /// [`SystemKey::Hkic`]).
    pub async fn hmac_sha256(&self, key: SystemKey, data: &[u8]) -> Result<[u8; 32], HsmError> {
        let data = Zeroizing::new(data.to_vec());
        self.call(Retry::Once, Cost::Short, move |ctx| {
            ctx.hmac_sha256(key, &data)
        })
        .await
    }

    /// AES-256-GCM under [`SystemKey::Data`] with a fresh 96-bit nonce from the HSM's
    /// generator; returns `nonce (12) || ciphertext || tag (16)`.
    pub async fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, HsmError> {
        let plaintext = Zeroizing::new(plaintext.to_vec());
        let aad = aad.to_vec();
        self.call(Retry::Once, Cost::Short, move |ctx| {
            ctx.encrypt(&aad, &plaintext)
        })
        .await
    }

    /// Opens what [`Hsm::encrypt`] sealed with the same `aad`; [`HsmError::NotAuthentic`] if
    /// anything was changed. The plaintext comes back as a secret: zeroed when dropped, redacted
    /// in `Debug`.
    pub async fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretSlice<u8>, HsmError> {
        let sealed = sealed.to_vec();
        let aad = aad.to_vec();
        self.call(Retry::Once, Cost::Short, move |ctx| {
            ctx.decrypt(&aad, &sealed)
        })
        .await
    }

    /// `len` bytes (at most 64 KiB) from the HSM's random generator.
    pub async fn random(&self, len: usize) -> Result<Vec<u8>, HsmError> {
        if len > MAX_RANDOM_LEN {
            return Err(HsmError::InvalidInput(format!(
                "at most {MAX_RANDOM_LEN} random bytes"
            )));
        }
        self.call(Retry::Once, Cost::Short, move |ctx| ctx.random(len))
            .await
    }

    /// Signs `digest` with a system signing key (audit, CA); returns a DER ECDSA signature.
    ///
    /// It runs in the background lane ([`Lane::Background`]): after any waiting user signature,
    /// on at most the configured number of workers, with its own queue bound
    /// ([`HsmError::Busy`] when that is full). Every other call of this API runs in the signing
    /// lane.
    pub async fn sign_with_system_key(
        &self,
        key: SystemKey,
        digest: &Digest,
    ) -> Result<Vec<u8>, HsmError> {
        let SystemKeyKind::Signing(curve) = key.kind() else {
            return Err(HsmError::InvalidInput(format!(
                "system key {key} does not sign"
            )));
        };
        let request =
            SignRequest::new(system_key_algorithm(curve), SignatureScheme::Ecdsa, digest)?;
        let encoding = request.encoding();
        let raw = self
            .call_in(Lane::Background, Retry::Once, Cost::Short, move |ctx| {
                ctx.sign_system(key, &request)
            })
            .await?;
        encoding.finish(raw)
    }

    /// Checks that `key` is on the token and passes the key policy (for `keys status` and the
    /// daemon's readiness check).
    pub async fn check_system_key(&self, key: SystemKey) -> Result<(), HsmError> {
        self.call(Retry::Once, Cost::Long, move |ctx| {
            ctx.system_key(key).map(|_| ())
        })
        .await
    }

    /// The public key of a system signing key as SPKI.
    pub async fn system_public_key(&self, key: SystemKey) -> Result<PublicKeySpki, HsmError> {
        self.call(Retry::Once, Cost::Long, move |ctx| {
            ctx.system_public_key(key)
        })
        .await
    }

    /// The key-encryption keys on the token, each checked against the key policy (templates
    /// included). One, with no refusal, is the healthy state; two mean a rotation is under way.
    pub async fn key_encryption_keys(&self) -> Result<Vec<KekStatus>, HsmError> {
        let shared = Arc::clone(self.pool.shared());
        run_blocking("hsm-kek-list", move || kek::list(&shared)).await
    }

    /// The trusted objects on the token other than the KEKs (class and label each). Only the SO
    /// can make one, and a trusted wrapping key could take the system keys out of the HSM: the
    /// daemon refuses to start while there is any, and `keys status` lists them.
    pub async fn foreign_trusted_objects(&self) -> Result<Vec<String>, HsmError> {
        let shared = Arc::clone(self.pool.shared());
        run_blocking("hsm-trusted", move || kek::list_foreign_trusted(&shared)).await
    }

    /// The id of the token's one KEK (`None` for a KEK without an id); fails while a rotation
    /// leaves two on the token.
    pub async fn current_kek(&self) -> Result<Option<KekId>, HsmError> {
        self.call(Retry::Once, Cost::Short, |ctx| {
            let directory = ctx.shared.directory();
            directory.system(SystemKey::Kek)?;
            Ok(directory.kek_id())
        })
        .await
    }

    /// Creates the KEK `id`, with its templates, unless it is on the token already (as the
    /// security officer, like [`Hsm::provision_system_keys`]). Returns whether it was created.
    pub async fn ensure_kek(&self, so_pin: &SecretString, id: KekId) -> Result<bool, HsmError> {
        let shared = Arc::clone(self.pool.shared());
        let so_pin = so_pin.clone();
        run_blocking("hsm-kek-create", move || kek::ensure(&shared, &so_pin, &id)).await
    }

    /// Re-wraps each key under the KEK `to` inside the HSM (the plaintext never leaves it), and
    /// proves each new blob unwraps before returning it. Keys already under `to`, and resident
    /// keys, come back unchanged. One result per key, in order; the outer error means nothing
    /// was done (no session, `to` missing or refused by the policy).
    pub async fn rewrap(
        &self,
        keys: Vec<UserKeyRef>,
        to: KekId,
    ) -> Result<Vec<Result<UserKeyRef, HsmError>>, HsmError> {
        let shared = Arc::clone(self.pool.shared());
        run_blocking("hsm-kek-rewrap", move || kek::rewrap(&shared, &keys, &to)).await
    }

    /// Destroys the KEK `id` (`None`: the KEK without an id). Every blob wrapped under it,
    /// including those in backups, can no longer be unwrapped.
    pub async fn destroy_kek(&self, id: Option<KekId>) -> Result<(), HsmError> {
        let shared = Arc::clone(self.pool.shared());
        run_blocking("hsm-kek-destroy", move || {
            kek::destroy(&shared, id.as_ref())
        })
        .await
    }

    /// On the token that will receive a clone: the transport key pair (made by the SO unless it
    /// exists), whose public key and fingerprint go to the source's officers.
    pub async fn clone_request(&self, so_pin: &SecretString) -> Result<TransportKey, HsmError> {
        let shared = Arc::clone(self.pool.shared());
        let so_pin = so_pin.clone();
        run_blocking("hsm-clone-request", move || {
            clone::request(&shared, &so_pin)
        })
        .await
    }

    /// On the source token, under the SO PIN: every system key wrapped for `transport`, whose
    /// fingerprint the officers confirmed as `fingerprint`. Nothing leaves in plaintext.
    pub async fn clone_export(
        &self,
        so_pin: &SecretString,
        transport: TransportKey,
        fingerprint: String,
    ) -> Result<CloneBundle, HsmError> {
        let shared = Arc::clone(self.pool.shared());
        let so_pin = so_pin.clone();
        run_blocking("hsm-clone-export", move || {
            clone::export(&shared, &so_pin, &transport, &fingerprint)
        })
        .await
    }

    /// On the token that made the transport key: unwraps every system key of `bundle` with its
    /// own template and attributes, checks that they are the source's (its audit key hashes to
    /// `source_audit_sha256` and signed the bundle; every pair matches), then destroys the
    /// transport key pair. A failed import leaves no key behind.
    pub async fn clone_import(
        &self,
        so_pin: &SecretString,
        bundle: CloneBundle,
        source_audit_sha256: String,
    ) -> Result<(), HsmError> {
        let shared = Arc::clone(self.pool.shared());
        let so_pin = so_pin.clone();
        run_blocking("hsm-clone-import", move || {
            clone::import(&shared, &so_pin, &bundle, &source_audit_sha256)
        })
        .await
    }

    /// Stops the workers after the queued requests and waits until their sessions are closed.
    /// Dropping an `Hsm` does the same without waiting.
    pub async fn shutdown(self) {
        let threads = self.pool.stop();
        let joined = run_blocking("hsm-shutdown", move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("an HSM worker thread panicked");
                }
            }
            Ok(())
        });
        // Only fails if the joining thread could not start; the workers stop regardless.
        let _ = joined.await;
    }

    /// Signatures with a wrapped key since open: (found unwrapped in a worker's cache, had to
    /// unwrap). Both stay 0 with the cache off.
    pub fn key_cache(&self) -> (u64, u64) {
        let shared = self.shared();
        (
            shared
                .key_cache_hits
                .load(std::sync::atomic::Ordering::Relaxed),
            shared
                .key_cache_misses
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// How many requests wait in `lane` now (for metrics and tests).
    pub fn queued(&self, lane: Lane) -> usize {
        self.pool.queued(lane)
    }

    /// Runs `op` on a worker, queued in the signing lane.
    async fn call<T, F>(&self, retry: Retry, cost: Cost, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnMut(&mut WorkerCtx) -> Result<T, HsmError> + Send + 'static,
    {
        self.call_in(Lane::Signing, retry, cost, op).await
    }

    /// Runs `op` on a worker, queued in `lane`; [`HsmError::Busy`] at once when it is full.
    async fn call_in<T, F>(
        &self,
        lane: Lane,
        retry: Retry,
        cost: Cost,
        op: F,
    ) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnMut(&mut WorkerCtx) -> Result<T, HsmError> + Send + 'static,
    {
        let (job, reply) = job(retry, cost, op);
        self.pool.submit(lane, job)?;
        reply.await.map_err(|_| HsmError::Closed)?
    }
}

/// Runs blocking work (module loading, provisioning) on a thread of its own.
pub(crate) async fn run_blocking<T, F>(name: &str, work: F) -> Result<T, HsmError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, HsmError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(HsmError::WorkerSpawn)?;
    rx.await.map_err(|_| HsmError::Closed)?
}
