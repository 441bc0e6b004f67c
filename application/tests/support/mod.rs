//! In-memory implementations of the application layer's ports, for its own fast tests. They are
//! stand-ins, named as such: the daemon's tests run the same workflows against SoftHSM, the
//! embedded CA and the real audit log.
//!
//! - The store is the real one (SQLite), on a RAM disk when there is one: its conditional
//!   transitions are what these tests are about.
//! - `MemoryKeys` holds software P-256 keys and "seals" by prefixing the associated data (no
//!   secrecy at all, but a value sealed for one row does not open for another).
//! - `MemoryCa` answers status from a table, optionally holding each answer until released (a
//!   slow CA), and records revocations.
//! - `MemoryAudit` keeps the records in a vector and can be told to fail.

// Test code: a failed unwrap is a failed test.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use application::AppError;
use application::ports::{
    AuditTrail, Authority, CertificateStatus, Keys, NewKey, Records, Signatures, ToSign,
};
use ca_bridge::status::{CertStatus as Answer, StatusSource};
use ca_bridge::{IssueRequest, IssuedCertificate};
use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertStatus, CertificateRecord,
    HashAlgorithm, HkicNumber, Profile, RevocationReason, SqliteStore, Store, StoreError,
    TaidRecord, Tier,
};
use hsm_adapter::KeyAlgorithm;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::Notify;
use zeroize::Zeroizing;

/// Every port, in memory but the store.
pub struct Memory {
    pub store: SqliteStore,
    _dir: tempfile::TempDir,
    pub keys: MemoryKeys,
    pub ca: MemoryCa,
    pub audit: MemoryAudit,
}

impl Memory {
    pub fn new() -> Memory {
        let dir = tempfile::Builder::new()
            .prefix("smartsign-app-")
            .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .unwrap();
        Memory {
            store: SqliteStore::open(dir.path().join("store.sqlite")).unwrap(),
            _dir: dir,
            keys: MemoryKeys::default(),
            ca: MemoryCa::default(),
            audit: MemoryAudit::default(),
        }
    }
}

impl Records for Memory {
    type Store = SqliteStore;

    fn read<T>(
        &self,
        call: impl FnOnce(&SqliteStore) -> Result<T, StoreError>,
    ) -> Result<T, AppError> {
        call(&self.store).map_err(AppError::from)
    }

    async fn write<T, F>(&self, call: F) -> Result<T, AppError>
    where
        T: Send + 'static,
        F: FnOnce(&SqliteStore) -> Result<T, StoreError> + Send + 'static,
    {
        // Yield first, so that concurrent workflows interleave at every write as they would
        // across threads.
        tokio::task::yield_now().await;
        call(&self.store).map_err(AppError::from)
    }
}

/// Software keys, by key reference: the reference is the key's own 32-byte scalar (in memory
/// only: the HSM's references carry no secret).
#[derive(Default)]
pub struct MemoryKeys {
    /// Signing jobs (calls), each one trip to the HSM.
    pub signatures: AtomicUsize,
    /// Hashes signed, over all jobs.
    pub hashes_signed: AtomicUsize,
    /// The next signature waits for `release_sign` (once).
    pub hold_next_sign: AtomicBool,
    pub signing: Notify,
    pub release_sign: Notify,
    pub destroyed: Mutex<Vec<Vec<u8>>>,
    random: AtomicU64,
    /// The next this-many signing calls find the HSM busy (its queue full).
    pub busy_signs: AtomicUsize,
    /// The next this-many seal calls find the HSM busy.
    pub busy_seals: AtomicUsize,
    /// The next this-many unseal calls find the HSM busy.
    pub busy_unseals: AtomicUsize,
    /// Every pause the workflows took before asking a busy HSM again.
    pub busy_pauses: Mutex<Vec<Duration>>,
    /// Every unseal call (decryption) made: its purpose and binding.
    pub unsealed: Mutex<Vec<(&'static str, String)>>,
}

/// Takes one from `counter` if it is not zero: whether the call is to find the HSM busy.
fn take_busy(counter: &AtomicUsize) -> Result<(), AppError> {
    match counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => Err(AppError::HsmBusy(
            "the HSM request queue is full (test)".into(),
        )),
        Err(_) => Ok(()),
    }
}

impl MemoryKeys {
    /// A new user key: its reference and its public key.
    pub fn new_key_ref(&self) -> Vec<u8> {
        self.random_block().to_vec()
    }

    fn random_block(&self) -> [u8; 32] {
        let n = self.random.fetch_add(1, Ordering::Relaxed);
        Sha256::digest(format!("smartsign-memory-keys-{n}")).into()
    }
}

fn aad(purpose: &str, binding: &str) -> Vec<u8> {
    format!("smartsign-{purpose}-v1\n{binding}\0").into_bytes()
}

impl Keys for MemoryKeys {
    async fn generate(&self) -> Result<NewKey, AppError> {
        use p256::pkcs8::EncodePublicKey;
        let key_ref = self.new_key_ref();
        let key = SigningKey::from_slice(&key_ref).map_err(AppError::fault)?;
        Ok(NewKey {
            public_key_der: key
                .verifying_key()
                .to_public_key_der()
                .map_err(AppError::fault)?
                .as_bytes()
                .to_vec(),
            key_ref,
            algorithm: KeyAlgorithm::EcP256,
        })
    }

    async fn sign(
        &self,
        key_ref: &[u8],
        _hash: HashAlgorithm,
        items: &[ToSign<'_>],
    ) -> Result<Vec<Signatures>, AppError> {
        if self.hold_next_sign.swap(false, Ordering::SeqCst) {
            self.signing.notify_one();
            self.release_sign.notified().await;
        }
        take_busy(&self.busy_signs)?;
        if self.destroyed.lock().unwrap().iter().any(|k| k == key_ref) {
            return Err(AppError::fault("key destroyed"));
        }
        let key = SigningKey::from_slice(key_ref).map_err(AppError::fault)?;
        let sign = |digest: &[u8]| -> Result<Vec<u8>, AppError> {
            let signature: p256::ecdsa::Signature =
                key.sign_prehash(digest).map_err(AppError::fault)?;
            Ok(signature.to_der().as_bytes().to_vec())
        };
        // One call is one HSM job, however many hashes it signs.
        self.signatures.fetch_add(1, Ordering::SeqCst);
        self.hashes_signed.fetch_add(items.len(), Ordering::SeqCst);
        items
            .iter()
            .map(|item| {
                Ok(Signatures {
                    algorithm: KeyAlgorithm::EcP256,
                    raw: sign(item.raw)?,
                    attributes: sign(item.attributes)?,
                })
            })
            .collect()
    }

    async fn destroy(&self, key_ref: &[u8]) -> Result<(), AppError> {
        self.destroyed.lock().unwrap().push(key_ref.to_vec());
        Ok(())
    }

    async fn seal(
        &self,
        purpose: &'static str,
        binding: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, AppError> {
        take_busy(&self.busy_seals)?;
        let mut sealed = aad(purpose, binding);
        sealed.extend_from_slice(plaintext);
        Ok(sealed)
    }

    async fn unseal(
        &self,
        purpose: &'static str,
        binding: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, AppError> {
        take_busy(&self.busy_unseals)?;
        self.unsealed
            .lock()
            .unwrap()
            .push((purpose, binding.to_owned()));
        let prefix = aad(purpose, binding);
        sealed
            .strip_prefix(prefix.as_slice())
            .map(|plain| Zeroizing::new(plain.to_vec()))
            .ok_or_else(|| AppError::fault("sealed for another purpose or row"))
    }

    async fn taid_hash(&self, data: &[u8]) -> Result<[u8; 32], AppError> {
        Ok(Sha256::digest([b"taid\0".as_slice(), data].concat()).into())
    }

    async fn hkic_hash(&self, hkic: &HkicNumber) -> Result<[u8; 32], AppError> {
        Ok(Sha256::digest(hkic.canonical()).into())
    }

    async fn random(&self, len: usize) -> Result<Vec<u8>, AppError> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            out.extend_from_slice(&self.random_block());
        }
        out.truncate(len);
        Ok(out)
    }

    /// Records the pause and yields: the tests check the pauses, not the wall clock.
    async fn busy_pause(&self, pause: Duration) {
        self.busy_pauses.lock().unwrap().push(pause);
        tokio::task::yield_now().await;
    }
}

/// The CA's status answers and revocations.
#[derive(Default)]
pub struct MemoryCa {
    pub revoked: Mutex<HashMap<String, RevocationReason>>,
    /// Each status check waits for `release` while this is set.
    pub slow: AtomicBool,
    pub waiting: Notify,
    pub release: Notify,
    pub checks: AtomicUsize,
    /// Serials issued, in order.
    pub issued: Mutex<Vec<String>>,
    /// Serials their requester confirmed. Like a CMP CA, this one counts a certificate never
    /// confirmed as not in use (a real one revokes it; `ca-bridge` tests that).
    pub confirmed: Mutex<Vec<String>>,
    /// Issuance fails while this is set (the CA is down).
    pub down: AtomicBool,
    /// Each issuance waits for `release_issue` while this is set (a slow CA).
    pub slow_issue: AtomicBool,
    /// The next revocation waits for `release_revoke` (once).
    pub hold_next_revoke: AtomicBool,
    /// Revocations fail while this is set.
    pub revocations_down: AtomicBool,
    pub revoking: Notify,
    pub release_revoke: Notify,
    pub issuing: Notify,
    pub release_issue: Notify,
}

impl MemoryCa {
    async fn wait(&self) {
        if self.slow_issue.load(Ordering::SeqCst) {
            self.issuing.notify_one();
            self.release_issue.notified().await;
        }
    }

    /// A certificate for the request's key, self-signed by it: these tests do not check the
    /// chain, only what is kept, revoked and destroyed.
    fn certify(
        &self,
        request: &IssueRequest,
        key_ref: &[u8],
    ) -> Result<IssuedCertificate, AppError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(AppError::fault("the CA is down (test)"));
        }
        let now = OffsetDateTime::from(request.not_before);
        let (der, serial) = self_signed(key_ref, now);
        self.issued.lock().unwrap().push(serial.as_str().to_owned());
        Ok(IssuedCertificate {
            serial_hex: serial.as_str().to_owned(),
            der,
        })
    }

    /// Whether the CA has issued `serial`, had it confirmed, and not revoked it.
    pub fn valid(&self, serial: &str) -> bool {
        self.issued.lock().unwrap().iter().any(|s| s == serial)
            && self.confirmed.lock().unwrap().iter().any(|s| s == serial)
            && !self.revoked.lock().unwrap().contains_key(serial)
    }
}

impl CertificateStatus for Memory {
    fn cached(&self, _serial: &CertSerial, _now: OffsetDateTime) -> Option<Answer> {
        None
    }

    /// The answer is the CA's at the moment of asking; a slow CA delivers it late.
    async fn check(&self, der: &[u8], _now: OffsetDateTime) -> Result<Answer, AppError> {
        self.ca.checks.fetch_add(1, Ordering::SeqCst);
        let serial = serial_of(der);
        let now = SystemTime::now();
        let answer = match self.ca.revoked.lock().unwrap().get(&serial) {
            Some(reason) => Answer::Revoked {
                revoked_at: now,
                reason_code: reason.crl_reason_code(),
            },
            None => Answer::Good {
                source: StatusSource::Ocsp,
                this_update: now,
                within_grace: false,
            },
        };
        if self.ca.slow.load(Ordering::SeqCst) {
            self.ca.waiting.notify_one();
            self.ca.release.notified().await;
        }
        Ok(answer)
    }
}

impl Authority for Memory {
    /// The serial.
    type Unconfirmed = String;

    async fn issue(
        &self,
        request: &IssueRequest,
        key_ref: &[u8],
    ) -> Result<(IssuedCertificate, String), AppError> {
        self.ca.wait().await;
        let issued = self.ca.certify(request, key_ref)?;
        let serial = issued.serial_hex.clone();
        Ok((issued, serial))
    }

    async fn confirm(&self, serial: String, accept: bool) -> Result<(), AppError> {
        if accept {
            self.ca.confirmed.lock().unwrap().push(serial);
        } else {
            self.ca
                .revoked
                .lock()
                .unwrap()
                .insert(serial, RevocationReason::CessationOfOperation);
        }
        Ok(())
    }

    async fn rekey(
        &self,
        _old_der: &[u8],
        _old_key_ref: &[u8],
        request: &IssueRequest,
        key_ref: &[u8],
    ) -> Result<(IssuedCertificate, String), AppError> {
        self.ca.wait().await;
        let issued = self.ca.certify(request, key_ref)?;
        let serial = issued.serial_hex.clone();
        Ok((issued, serial))
    }

    async fn revoke(
        &self,
        serial: &CertSerial,
        _der: &[u8],
        reason: RevocationReason,
    ) -> Result<(), AppError> {
        if self.ca.hold_next_revoke.swap(false, Ordering::SeqCst) {
            self.ca.revoking.notify_one();
            self.ca.release_revoke.notified().await;
        }
        if self.ca.revocations_down.load(Ordering::SeqCst) {
            return Err(AppError::fault("the CA is down (test)"));
        }
        self.ca
            .revoked
            .lock()
            .unwrap()
            .insert(serial.as_str().to_owned(), reason);
        Ok(())
    }
}

/// The audit records, in order.
#[derive(Default)]
pub struct MemoryAudit {
    pub records: Mutex<Vec<(String, Map<String, Value>)>>,
    /// Appends of this event fail (the log is unavailable).
    pub failing: Mutex<Option<&'static str>>,
    /// The workflow step at which the "process" dies: the task panics there, leaving the state
    /// as a crash would (nothing after it runs; nothing is undone).
    pub crash_at: Mutex<Option<&'static str>>,
}

impl MemoryAudit {
    /// How many records of `event` there are, for request or account `id`.
    pub fn count(&self, event: &str, id: &str) -> usize {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, fields)| {
                name == event
                    && (fields.get("request_id").and_then(Value::as_str) == Some(id)
                        || fields.get("account_id").and_then(Value::as_str) == Some(id))
            })
            .count()
    }
}

impl AuditTrail for Memory {
    async fn append(
        &self,
        event: &str,
        _actor: &str,
        fields: Map<String, Value>,
    ) -> Result<u64, AppError> {
        let failing = *self.audit.failing.lock().unwrap();
        if failing.is_some_and(|failing| failing == event) {
            return Err(AppError::AuditUnavailable("the log is down (test)".into()));
        }
        let mut records = self.audit.records.lock().unwrap();
        records.push((event.to_owned(), fields));
        Ok(records.len() as u64)
    }

    fn step(&self, name: &'static str) {
        if *self.audit.crash_at.lock().unwrap() == Some(name) {
            panic!("crash at {name} (test)");
        }
    }
}

impl Keys for Memory {
    async fn generate(&self) -> Result<NewKey, AppError> {
        Keys::generate(&self.keys).await
    }

    async fn sign(
        &self,
        key_ref: &[u8],
        hash: HashAlgorithm,
        items: &[ToSign<'_>],
    ) -> Result<Vec<Signatures>, AppError> {
        self.keys.sign(key_ref, hash, items).await
    }

    async fn destroy(&self, key_ref: &[u8]) -> Result<(), AppError> {
        self.keys.destroy(key_ref).await
    }

    async fn seal(
        &self,
        purpose: &'static str,
        binding: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, AppError> {
        self.keys.seal(purpose, binding, plaintext).await
    }

    async fn unseal(
        &self,
        purpose: &'static str,
        binding: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, AppError> {
        self.keys.unseal(purpose, binding, sealed).await
    }

    async fn taid_hash(&self, data: &[u8]) -> Result<[u8; 32], AppError> {
        self.keys.taid_hash(data).await
    }

    async fn hkic_hash(&self, hkic: &HkicNumber) -> Result<[u8; 32], AppError> {
        self.keys.hkic_hash(hkic).await
    }

    async fn random(&self, len: usize) -> Result<Vec<u8>, AppError> {
        self.keys.random(len).await
    }

    async fn busy_pause(&self, pause: Duration) {
        self.keys.busy_pause(pause).await
    }
}

/// The serial of a certificate, as the store writes it (lower-case hex).
fn serial_of(der: &[u8]) -> String {
    use x509_cert::der::Decode;
    let certificate = x509_cert::Certificate::from_der(der).unwrap();
    hex::encode(certificate.tbs_certificate.serial_number.as_bytes())
}

/// A device: its key and the SubjectPublicKeyInfo the account binds.
pub struct Device {
    pub key: SigningKey,
}

impl Device {
    pub fn new(seed: u8) -> Device {
        Device {
            key: SigningKey::from_slice(&[seed; 32]).unwrap(),
        }
    }

    pub fn spki(&self) -> Vec<u8> {
        use p256::pkcs8::EncodePublicKey;
        self.key
            .verifying_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    /// The device's signature (DER) over a statement.
    pub fn sign(&self, statement: &str) -> Vec<u8> {
        use p256::ecdsa::signature::Signer;
        let signature: p256::ecdsa::Signature = self.key.sign(statement.as_bytes());
        signature.to_der().as_bytes().to_vec()
    }
}

/// The service the tests sign for.
pub const SERVICE: &str = "demo-service";

/// Stores an active "iAM Smart+" adult account bound to `device`, with a valid certificate
/// (self-signed by its own key: these tests do not check the chain) and a TAID at [`SERVICE`].
/// Gives the account and the certificate's public key.
pub fn account(ports: &Memory, id: &str, device: &Device, now: OffsetDateTime) -> AccountRecord {
    let account_id = AccountId::parse(id).unwrap();
    let key_ref = ports.keys.new_key_ref();
    let (der, serial) = self_signed(&key_ref, now);
    let seal = |purpose: &str, plain: &[u8]| {
        let mut sealed = aad(purpose, id);
        sealed.extend_from_slice(plain);
        sealed
    };
    let record = AccountRecord {
        id: account_id.clone(),
        tier: Tier::IamSmartPlus,
        status: AccountStatus::Active,
        status_changed_at: now,
        suspended_by: None,
        rectify_by: None,
        sealed_name: seal("name", br#"{"surname":"CHAN","given_name":"TAI MAN"}"#),
        sealed_dob: seal("dob", b"1990-01-01"),
        hkic_hash: Sha256::digest(id.as_bytes()).into(),
        device_public_key: device.spki(),
        device_generation: 1,
        current_certificate: Some(serial.clone()),
        created_at: now,
        guardian_hkic_hash: None,
        adult_day_key: None,
        version: 0,
    };
    let certificate = CertificateRecord {
        serial,
        account_id: account_id.clone(),
        profile: Profile::Adult,
        not_before: now - time::Duration::days(1),
        not_after: now + time::Duration::days(365),
        status: CertStatus::Valid,
        revocation_reason: None,
        revoked_at: None,
        sealed_der: seal("certificate", &der),
        key_ref: Some(key_ref),
        key_algorithm: "ec-p256".into(),
    };
    ports
        .store
        .insert_account_with_certificate(&record, &certificate, &[])
        .unwrap();
    ports
        .store
        .put_taid(&TaidRecord {
            taid: format!("taid-{id}"),
            service: cert_lifecycle::ServiceName::parse(SERVICE).unwrap(),
            account_id,
        })
        .unwrap();
    record
}

/// A certificate for the key `key_ref`, self-signed, and its serial.
fn self_signed(key_ref: &[u8], now: OffsetDateTime) -> (Vec<u8>, CertSerial) {
    use std::str::FromStr;
    use x509_cert::builder::{Builder, CertificateBuilder, Profile};
    use x509_cert::der::Encode;
    use x509_cert::name::Name;
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::spki::SubjectPublicKeyInfoOwned;
    use x509_cert::time::Validity;

    let key = SigningKey::from_slice(key_ref).unwrap();
    let serial_bytes: [u8; 8] = Sha256::digest(key_ref)[..8].try_into().unwrap();
    let mut serial_bytes = serial_bytes;
    serial_bytes[0] = (serial_bytes[0] & 0x7f) | 0x10;
    let serial = SerialNumber::new(&serial_bytes).unwrap();
    let validity = Validity {
        not_before: x509_cert::time::Time::try_from(SystemTime::from(
            now - time::Duration::days(1),
        ))
        .unwrap(),
        not_after: x509_cert::time::Time::try_from(SystemTime::from(
            now + time::Duration::days(365),
        ))
        .unwrap(),
    };
    let subject = Name::from_str("CN=smartsign application test").unwrap();
    let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).unwrap();
    let builder =
        CertificateBuilder::new(Profile::Root, serial, validity, subject, spki, &key).unwrap();
    let certificate = builder.build::<p256::ecdsa::DerSignature>().unwrap();
    (
        certificate.to_der().unwrap(),
        CertSerial::parse(&hex::encode(serial_bytes)).unwrap(),
    )
}
