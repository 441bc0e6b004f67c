//! The signing flow (API.md "Signing", DESIGN.md "The signing flow"): a service makes a request
//! for a TAID and a hash; the gateway relays the user's device-signed decision; on an approval
//! the request moves to `approved` (the single-use guard, with the account re-read in the same
//! transaction), the HSM signs, the signature's audit record is made durable, and only then is
//! the request `signed` and its sealed result released.

use std::future::Future;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ca_bridge::signed_data::{SignatureAlg, SignedAttributes};
use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, AuthOutcome, CertStatus, CertificateRecord, Decision,
    FlowError, HashAlgorithm, HkicNumber, Profile, RequestId, ServiceName, SigningRequest,
    SigningStatus, Store, Tier, Transition,
};
use hsm_adapter::KeyAlgorithm;
use serde_json::{Value, json};
use sha2::Digest as _;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::ports::ToSign;
use crate::{AppError, Ports, certificate_status, fields, rfc3339};

/// What signing needs from the configuration.
#[derive(Debug, Clone)]
pub struct SigningSettings {
    /// How long a request waits for the user's decision.
    pub request_ttl: time::Duration,
    /// How many requests an account may have pending at once.
    pub max_pending: usize,
    /// How many hashes one batch request may carry (`policy.max_batch`).
    pub max_batch: usize,
    /// The issuing CA and the root, DER, for the CMS `certificates`.
    pub chain_der: Vec<Vec<u8>>,
    /// The same, PEM, for the result's `chain`.
    pub chain_pem: Vec<String>,
}

/// A service's request to sign, as the edge parsed it.
#[derive(Debug)]
pub struct NewRequest {
    /// The service asking (from its client certificate).
    pub service: ServiceName,
    /// The account's TAID at that service.
    pub taid: String,
    /// The hash's algorithm.
    pub hash_algorithm: HashAlgorithm,
    /// The hash to sign; empty for a batch.
    pub hash: Vec<u8>,
    /// A batch's hashes (`"hashes"` in place of `"hash"`), in order; `None` for one hash.
    pub hashes: Option<Vec<Vec<u8>>>,
    /// The signer's HKIC number, when the service wants it checked; compared and dropped.
    pub hkic: Option<HkicNumber>,
    /// Shown to the user in the app.
    pub description: Option<String>,
}

/// The longest description, in characters.
const MAX_DESCRIPTION: usize = 200;

/// How often an authorisation re-reads after losing a race before it gives up with `conflict`.
const AUTHORISE_TRIES: usize = 4;

/// How long, in all, an authorised signature waits for an HSM whose queue is full before the
/// request fails. The queue is full only for moments (a burst of work ahead of it), so waiting
/// is better than failing an approval the user cannot give again; the caller (the gateway's
/// HTTP request) is held meanwhile, so this stays well below its timeouts.
pub const HSM_BUSY_WAIT: Duration = Duration::from_secs(10);
/// The first pause before a busy HSM is asked again; each next one doubles, up to
/// [`HSM_BUSY_MAX_PAUSE`].
const HSM_BUSY_FIRST_PAUSE: Duration = Duration::from_millis(2);
const HSM_BUSY_MAX_PAUSE: Duration = Duration::from_millis(100);

/// Makes a signing request (pending) for an account that may sign now. A refusal is audited
/// (`signing.create_denied`) before it is returned.
pub async fn create<P: Ports>(
    ports: &P,
    settings: &SigningSettings,
    actor: &str,
    new: NewRequest,
    now: OffsetDateTime,
) -> Result<SigningRequest, AppError> {
    let result = create_checked(ports, settings, actor, new, now).await;
    if let Err(error) = &result {
        refused(ports, actor, error).await?;
    }
    result
}

/// Audits a request to sign that was refused (`signing.create_denied`), by [`create`] or at the
/// edge (a body that does not parse). Only a failing audit log is an error. The refusals of a
/// limit (too many pending, an HKIC lock) are not audited one by one: a flood of them would
/// flood the log.
pub async fn refused<P: Ports>(ports: &P, actor: &str, error: &AppError) -> Result<(), AppError> {
    if matches!(error, AppError::TooManyPending | AppError::TooManyAttempts) {
        return Ok(());
    }
    deny(ports, actor, "signing.create_denied", None, error).await
}

async fn create_checked<P: Ports>(
    ports: &P,
    settings: &SigningSettings,
    actor: &str,
    new: NewRequest,
    now: OffsetDateTime,
) -> Result<SigningRequest, AppError> {
    check_hashes(&new, settings.max_batch)?;
    if let Some(description) = &new.description
        && (description.chars().count() > MAX_DESCRIPTION
            || description.chars().any(char::is_control))
    {
        return Err(AppError::InvalidRequest(format!(
            "description must be at most {MAX_DESCRIPTION} characters without control characters"
        )));
    }
    let account_id = ports
        .read(|store| store.find_taid(&new.service, &new.taid))?
        .ok_or(AppError::NotFound("TAID at this service"))?;
    let account = load_account(ports, &account_id)?;
    let certificate = signable(ports, &account, now).await?;
    confirm_good(ports, &certificate, None, now).await?;
    if let Some(hkic) = &new.hkic {
        check_hkic(ports, actor, &account, hkic, now).await?;
    }
    // At most `max_pending` at once, each with a code of its own, so that neither a flood nor
    // a code the user happens to be looking at can be ground out of the account.
    let id = account.id.clone();
    let pending = ports
        .write(move |store| store.pending_requests(&id, now))
        .await?;
    if pending.len() >= settings.max_pending {
        return Err(AppError::TooManyPending);
    }
    let taken: Vec<String> = pending
        .into_iter()
        .map(|request| request.identification_code)
        .collect();
    let (id, code) = id_and_code(ports, &taken).await?;

    let request = SigningRequest {
        id,
        service: new.service,
        account_id: account.id.clone(),
        certificate: certificate.serial.clone(),
        identification_code: code,
        hash_algorithm: new.hash_algorithm,
        hash: new.hash,
        hashes: new.hashes,
        description: new.description,
        status: SigningStatus::Pending,
        bad_attempts: 0,
        device_generation: account.device_generation,
        created_at: now,
        expires_at: now + settings.request_ttl,
        sealed_result: None,
        signed_at: None,
    };
    let mut record = fields([
        ("request_id", json!(request.id.as_str())),
        ("account_id", json!(account.id.as_str())),
        ("serial", json!(certificate.serial.as_str())),
        ("hash_algorithm", json!(request.hash_algorithm.as_str())),
    ]);
    add_batch_fields(&mut record, &request);
    ports.append("signing.requested", actor, record).await?;
    let (stored, max_pending) = (request.clone(), settings.max_pending);
    match ports
        .write(move |store| store.insert_request(&stored, max_pending, now))
        .await
    {
        Ok(()) => Ok(request),
        Err(AppError::Conflict) => {
            // The account changed while the CA answered (suspended, deregistered): refused for
            // its new state, and nothing of the request is kept. Or another request of the
            // account came first and took the last place (or, rarely, the code).
            let account = load_account(ports, &request.account_id)?;
            if account.status != AccountStatus::Active {
                return Err(AppError::AccountNotActive(account.status.as_str()));
            }
            let id = account.id;
            let pending = ports
                .write(move |store| store.pending_requests(&id, now))
                .await?;
            Err(if pending.len() >= max_pending {
                AppError::TooManyPending
            } else {
                AppError::Conflict
            })
        }
        Err(error) => Err(error),
    }
}

/// Checks the hash, or a batch's hashes: one of them (`hash` or `hashes`), 1 to `max_batch`
/// hashes in a batch, each of the algorithm's length (`invalid_hash` names the one that is not).
fn check_hashes(new: &NewRequest, max_batch: usize) -> Result<(), AppError> {
    let algorithm = new.hash_algorithm;
    let wrong = |which: String, len: usize| {
        AppError::InvalidHash(format!(
            "{which}: a {} hash has {} bytes, not {len}",
            algorithm.as_str(),
            algorithm.output_len(),
        ))
    };
    match &new.hashes {
        None => {
            if new.hash.len() != algorithm.output_len() {
                return Err(wrong("hash".into(), new.hash.len()));
            }
        }
        Some(hashes) => {
            if !new.hash.is_empty() {
                return Err(AppError::InvalidRequest(
                    "hash and hashes: give one of them, not both".into(),
                ));
            }
            if !(1..=max_batch).contains(&hashes.len()) {
                return Err(AppError::InvalidRequest(format!(
                    "hashes: 1 to {max_batch} hashes, not {}",
                    hashes.len()
                )));
            }
            if let Some((index, hash)) = hashes
                .iter()
                .enumerate()
                .find(|(_, hash)| hash.len() != algorithm.output_len())
            {
                return Err(wrong(format!("hashes[{index}]"), hash.len()));
            }
        }
    }
    Ok(())
}

/// A batch's hashes in its audit records: `hashes` (hex, in order) and `batch_size`. A
/// single-hash request adds nothing.
fn add_batch_fields(record: &mut serde_json::Map<String, Value>, request: &SigningRequest) {
    if let Some(hashes) = &request.hashes {
        record.insert(
            "hashes".into(),
            hashes.iter().map(hex::encode).collect::<Vec<_>>().into(),
        );
        record.insert("batch_size".into(), json!(hashes.len()));
    }
}

/// How many HKIC mismatches within [`HKIC_WINDOW`] lock an account's HKIC-carrying requests.
const HKIC_MISMATCHES: usize = 3;

/// The window of [`HKIC_MISMATCHES`].
const HKIC_WINDOW: time::Duration = time::Duration::hours(24);

/// Checks the HKIC number a service sent against the account holder's, unless three mismatches
/// in 24 hours have locked the account's HKIC-carrying requests (429 `too_many_attempts` until
/// the oldest of them leaves the window): the check is no oracle. The third mismatch is audited
/// once with the lock's end; the refusals while locked are not audited one by one.
async fn check_hkic<P: Ports>(
    ports: &P,
    actor: &str,
    account: &AccountRecord,
    hkic: &HkicNumber,
    now: OffsetDateTime,
) -> Result<(), AppError> {
    let since = now - HKIC_WINDOW;
    let mismatches = ports.read(|store| store.hkic_mismatches_since(&account.id, since))?;
    if mismatches.len() >= HKIC_MISMATCHES {
        return Err(AppError::TooManyAttempts);
    }
    // Used only to check the signer, then dropped (zeroized): never stored (DOMAIN.md).
    if ports.hkic_hash(hkic).await? == account.hkic_hash {
        return Ok(());
    }
    let id = account.id.clone();
    ports
        .write(move |store| store.record_hkic_mismatch(&id, now))
        .await?;
    if mismatches.len() + 1 == HKIC_MISMATCHES {
        let until = mismatches.first().copied().unwrap_or(now) + HKIC_WINDOW;
        ports
            .append(
                "signing.hkic_locked",
                actor,
                fields([
                    ("account_id", json!(account.id.as_str())),
                    ("until", json!(rfc3339(until))),
                ]),
            )
            .await?;
    }
    Err(AppError::HkicMismatch)
}

/// A request id (16 bytes) and its four-digit identification code from the HSM's generator, in
/// one call; the code is drawn again in the rare case that its bytes would bias it (rejection
/// sampling, see [`cert_lifecycle::identification_code_from_random`]) or that another pending
/// request of the account shows it (`taken`).
async fn id_and_code<P: Ports>(
    ports: &P,
    taken: &[String],
) -> Result<(RequestId, String), AppError> {
    let random = ports.random(20).await?;
    let (id, code) = random.split_at(16);
    let id = RequestId::from_random(id.try_into().map_err(AppError::fault)?);
    let mut code: [u8; 4] = code.try_into().map_err(AppError::fault)?;
    loop {
        if let Some(code) = cert_lifecycle::identification_code_from_random(code)
            && !taken.contains(&code)
        {
            return Ok((id, code));
        }

        code = ports
            .random(4)
            .await?
            .as_slice()
            .try_into()
            .map_err(AppError::fault)?;
    }
}

/// Audits a refusal; only a failing audit log changes the answer (to `audit_unavailable`).
async fn deny<P: Ports>(
    ports: &P,
    actor: &str,
    event: &'static str,
    request: Option<&SigningRequest>,
    error: &AppError,
) -> Result<(), AppError> {
    if matches!(error, AppError::AuditUnavailable(_)) {
        return Ok(());
    }
    let mut record = fields([("code", json!(error.code()))]);
    if let Some(request) = request {
        record.insert("request_id".into(), json!(request.id.as_str()));
        record.insert("account_id".into(), json!(request.account_id.as_str()));
    }
    ports.append(event, actor, record).await?;
    Ok(())
}

/// A request as its service sees it: its status now and, once signed, the result (a batch's:
/// the list of results, in the order of its hashes).
#[derive(Debug)]
pub struct RequestView {
    /// The stored request.
    pub request: SigningRequest,
    /// Its status at `now` (a pending request past its expiry is expired).
    pub status: SigningStatus,
    /// The signing result (API.md), once signed; for a batch ([`SigningRequest::is_batch`]),
    /// an array of them in the order of its hashes (`results`).
    pub result: Option<Value>,
}

/// The request `id`, only for the service that made it.
pub async fn view<P: Ports>(
    ports: &P,
    service: &ServiceName,
    id: &RequestId,
    now: OffsetDateTime,
) -> Result<RequestView, AppError> {
    let request = load_request(ports, id)?;
    if &request.service != service {
        return Err(AppError::Forbidden);
    }
    let status = request.effective_status(now);
    let result = match (&request.sealed_result, status) {
        (Some(sealed), SigningStatus::Signed) => {
            let plain = ports.unseal("result", request.id.as_str(), sealed).await?;
            Some(serde_json::from_slice(&plain).map_err(AppError::fault)?)
        }
        _ => None,
    };
    Ok(RequestView {
        request,
        status,
        result,
    })
}

/// One page of an account's finished requests, newest first, each with when it finished.
#[derive(Debug)]
pub struct HistoryPage {
    /// The requests of this page.
    pub requests: Vec<(SigningRequest, OffsetDateTime)>,
    /// Whether there are older ones (read from the last of this page on).
    pub more: bool,
}

/// The account's finished requests before `before` (a finish time and id), `limit` of them.
pub async fn history<P: Ports>(
    ports: &P,
    account: &AccountId,
    before: Option<(OffsetDateTime, RequestId)>,
    limit: usize,
    now: OffsetDateTime,
) -> Result<HistoryPage, AppError> {
    let id = load_account(ports, account)?.id;
    // One more than the page: whether there is a next page.
    let mut requests = ports
        .write(move |store| store.signing_history(&id, now, before, limit + 1))
        .await?;
    let more = requests.len() > limit;
    requests.truncate(limit);
    Ok(HistoryPage { requests, more })
}

/// The account's pending requests, oldest first.
pub async fn pending<P: Ports>(
    ports: &P,
    account: &AccountId,
    now: OffsetDateTime,
) -> Result<Vec<SigningRequest>, AppError> {
    let id = load_account(ports, account)?.id;
    ports
        .write(move |store| store.pending_requests(&id, now))
        .await
}

/// What an authorisation came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorised {
    /// The user rejected the request.
    Rejected,
    /// The request is signed; its result is stored (sealed) and audited.
    Signed,
}

/// The user's device-signed decision on request `id`. Each try reads the request and the
/// account afresh; a transition that finds the request changed since (another authorisation, a
/// suspension, a device switch) tries again on the new state, which then answers for itself.
/// Nothing here holds a guarantee in memory: the store's conditional transitions do.
pub async fn authorise<P: Ports>(
    ports: &P,
    settings: &SigningSettings,
    actor: &str,
    id: &RequestId,
    decision: Decision,
    device_signature: &[u8],
    now: OffsetDateTime,
) -> Result<Authorised, AppError> {
    for _ in 0..AUTHORISE_TRIES {
        let attempt = Attempt {
            ports,
            settings,
            actor,
            now,
        };
        match attempt.run(id, decision, device_signature).await? {
            Some(outcome) => return Ok(outcome),
            None => continue,
        }
    }
    Err(AppError::Conflict)
}

/// One try at an authorisation.
struct Attempt<'a, P> {
    ports: &'a P,
    settings: &'a SigningSettings,
    actor: &'a str,
    now: OffsetDateTime,
}

impl<P: Ports> Attempt<'_, P> {
    /// `None` when the request changed between the read and the transition.
    async fn run(
        &self,
        id: &RequestId,
        decision: Decision,
        device_signature: &[u8],
    ) -> Result<Option<Authorised>, AppError> {
        let ports = self.ports;
        let mut request = load_request(ports, id)?;
        let read = (request.status, request.bad_attempts);
        let account = load_account(ports, &request.account_id)?;
        let statement = request.authorisation_statement(decision);
        // The device bound when the request was made must be the one that signs the statement:
        // a request made before a device switch is not the new device's to approve.
        let outcome = if request.device_generation == account.device_generation
            && device_signature_valid(&account.device_public_key, &statement, device_signature)
        {
            AuthOutcome::Valid(decision)
        } else {
            AuthOutcome::BadSignature
        };
        match request.authorise(outcome, self.now) {
            Err(flow) => {
                let error = match flow {
                    FlowError::Expired => AppError::RequestExpired,
                    FlowError::AuthorisationInvalid => AppError::AuthorisationInvalid,
                    FlowError::TooManyAttempts => AppError::TooManyAttempts,
                    _ => AppError::RequestNotPending(request.effective_status(self.now).as_str()),
                };
                if (request.status, request.bad_attempts) != read
                    && !self.transition(&request, read).await?
                {
                    return Ok(None);
                }
                deny(
                    ports,
                    self.actor,
                    "signing.authorisation_denied",
                    Some(&request),
                    &error,
                )
                .await?;
                Err(error)
            }
            Ok(Transition::Rejected) => {
                if !self.transition(&request, read).await? {
                    return Ok(None);
                }
                ports
                    .append(
                        "signing.rejected",
                        self.actor,
                        fields([
                            ("request_id", json!(request.id.as_str())),
                            ("account_id", json!(request.account_id.as_str())),
                        ]),
                    )
                    .await?;
                Ok(Some(Authorised::Rejected))
            }
            Ok(_) => self.approve(&account, request, read).await,
        }
    }

    /// An approval: checks, the single-use transition, the signature, the signed state.
    async fn approve(
        &self,
        account: &AccountRecord,
        mut request: SigningRequest,
        read: (SigningStatus, u8),
    ) -> Result<Option<Authorised>, AppError> {
        // Everything that may take long (the CA's status answer) comes before the approval, so
        // that the approval's own check of the account is the last word before the HSM.
        let prepared = match prepare(self.ports, account, &request, self.now).await {
            Ok(prepared) => prepared,
            Err(error) => {
                request.mark_failed();
                if !self.transition(&request, read).await? {
                    return Ok(None);
                }
                self.fail(&request, &error).await;
                return Err(error);
            }
        };
        // The single-use guard: pending -> approved, durable, with the account still active
        // and bound to the same device. One of any number of authorisations wins.
        if !self.transition(&request, read).await? {
            return Ok(None);
        }
        let approved = (request.status, request.bad_attempts);
        match self.sign(prepared, &mut request).await {
            Ok(algorithm) => {
                // The signature is released only once its state is durable.
                if self.transition(&request, approved).await? {
                    self.ports.signature(&algorithm, "signed");
                    tracing::info!(request = request.id.as_str(), algorithm, "signed");
                    Ok(Some(Authorised::Signed))
                } else {
                    // Recovery failed it meanwhile (another node's restart): the signature is
                    // dropped, never released.
                    Err(AppError::RequestNotPending("failed"))
                }
            }
            Err(error) => {
                request.mark_failed();
                request.sealed_result = None;
                request.signed_at = None;
                if let Err(store) = self.transition(&request, approved).await {
                    // Left approved: the next start's recovery fails it.
                    tracing::error!(error = %store, request = request.id.as_str(),
                        "cannot fail a request whose signing failed");
                }
                self.fail(&request, &error).await;
                Err(error)
            }
        }
    }

    /// Moves the request to its new state if it is still in `from`; `false` when it was not.
    async fn transition(
        &self,
        request: &SigningRequest,
        from: (SigningStatus, u8),
    ) -> Result<bool, AppError> {
        moved(transition(self.ports, request, from, self.now).await)
    }

    /// A signature that failed after the user approved it: counted and audited (if the log
    /// takes it); the request is failed either way.
    async fn fail(&self, request: &SigningRequest, error: &AppError) {
        self.ports.signature("unknown", "failed");
        if let Err(audit) = deny(
            self.ports,
            self.actor,
            "signing.failed",
            Some(request),
            error,
        )
        .await
        {
            tracing::error!(error = %audit, "cannot audit a failed signature");
        }
    }

    /// Audits the approval, signs in the HSM, builds the CMS, audits the signature and seals the
    /// result into `request` (marked signed; the caller stores it). Gives the signature
    /// algorithm's name.
    async fn sign(
        &self,
        prepared: Prepared,
        request: &mut SigningRequest,
    ) -> Result<String, AppError> {
        let ports = self.ports;
        let Prepared {
            certificate,
            certificate_der,
            key_ref,
        } = prepared;
        // Write before acting: the approval (with a batch's hashes) is durable before the HSM
        // signs.
        let mut approved = fields([
            ("request_id", json!(request.id.as_str())),
            ("account_id", json!(request.account_id.as_str())),
            ("serial", json!(certificate.serial.as_str())),
        ]);
        add_batch_fields(&mut approved, request);
        ports
            .append("signing.approved", self.actor, approved)
            .await?;
        let signed_at = self.now.replace_nanosecond(0).unwrap_or(self.now);
        let hashes = request.hashes_to_sign();
        let attributes = hashes
            .iter()
            .map(|hash| {
                SignedAttributes::new(
                    request.hash_algorithm,
                    hash,
                    signed_at.into(),
                    &certificate_der,
                )
                .map_err(AppError::fault)
            })
            .collect::<Result<Vec<_>, _>>()?;
        // For each hash, the raw signature over it and the CMS signature over its signed
        // attributes: all of them in one trip to the HSM (one job), a batch as one request.
        let digests: Vec<Vec<u8>> = attributes
            .iter()
            .map(SignedAttributes::digest_to_sign)
            .collect();
        let items: Vec<ToSign<'_>> = hashes
            .iter()
            .zip(&digests)
            .map(|(hash, attributes)| ToSign {
                raw: hash,
                attributes,
            })
            .collect();
        let signatures = when_hsm_free(ports, || {
            ports.sign(&key_ref, request.hash_algorithm, &items)
        })
        .await?;
        if signatures.len() != hashes.len() {
            return Err(AppError::fault("the HSM gave another number of signatures"));
        }
        let key_algorithm = signatures
            .first()
            .map(|s| s.algorithm)
            .ok_or_else(|| AppError::fault("no signature"))?;
        let algorithm = signature_algorithm(key_algorithm, request.hash_algorithm);
        let cms_signature = cms_signature(key_algorithm, request.hash_algorithm);
        let mut certificates: Vec<&[u8]> = vec![&certificate_der];
        certificates.extend(self.settings.chain_der.iter().map(Vec::as_slice));
        let mut results = Vec::with_capacity(signatures.len());
        for (attributes, signatures) in attributes.into_iter().zip(&signatures) {
            let cms = attributes
                .into_content_info(&signatures.attributes, cms_signature, &certificates)
                .map_err(AppError::fault)?;
            results.push(json!({
                "signature": STANDARD.encode(&signatures.raw),
                "signature_algorithm": algorithm,
                "cms": STANDARD.encode(&cms),
                "certificate": crate::pem("CERTIFICATE", &certificate_der),
                "chain": self.settings.chain_pem,
                "signed_at": rfc3339(signed_at),
            }));
        }

        // The signatures exist only in memory until this record is durable; if it cannot be
        // written, they are dropped and the request fails (fail closed). For a batch, `hash`
        // is the batch's digest (what the device's statement names) and `hashes` lists them.
        let hash = match request.batch_digest() {
            Some(digest) => hex::encode(digest),
            None => hex::encode(&request.hash),
        };
        let mut record = fields([
            ("request_id", json!(request.id.as_str())),
            ("account_id", json!(request.account_id.as_str())),
            // What was signed, for whom, with which key, from this record alone.
            ("service", json!(request.service.as_str())),
            ("hash_algorithm", json!(request.hash_algorithm.as_str())),
            ("hash", json!(hash)),
            ("serial", json!(certificate.serial.as_str())),
            ("signature_algorithm", json!(algorithm)),
        ]);
        let signature_sha256: Vec<String> = signatures
            .iter()
            .map(|s| hex::encode(sha2::Sha256::digest(&s.raw)))
            .collect();
        if request.is_batch() {
            add_batch_fields(&mut record, request);
            record.insert("signatures_sha256".into(), json!(signature_sha256));
        } else {
            record.insert("signature_sha256".into(), json!(signature_sha256[0]));
        }
        ports.append("signing.signed", self.actor, record).await?;
        let result = if request.is_batch() {
            Value::Array(results)
        } else {
            results.swap_remove(0)
        };
        let plain = Zeroizing::new(serde_json::to_vec(&result).map_err(AppError::fault)?);
        let sealed =
            when_hsm_free(ports, || ports.seal("result", request.id.as_str(), &plain)).await?;
        ports.step("signing-after-signed-record");
        request.mark_signed(sealed, signed_at);
        Ok(algorithm)
    }
}

/// Makes an HSM call of an authorised signature, again after a pause each time the HSM is busy
/// (its queue full), for up to [`HSM_BUSY_WAIT`] of pauses in all: a burst of other work must
/// not fail a request the user approved while the HSM is healthy. Any other outcome, and a
/// busy HSM past that, is returned as it is.
async fn when_hsm_free<P, T, F, Fut>(ports: &P, mut call: F) -> Result<T, AppError>
where
    P: Ports,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AppError>>,
{
    let mut waited = Duration::ZERO;
    let mut pause = HSM_BUSY_FIRST_PAUSE;
    loop {
        match call().await {
            Err(AppError::HsmBusy(cause)) if waited + pause <= HSM_BUSY_WAIT => {
                if waited.is_zero() {
                    tracing::warn!(error = %cause, "HSM busy; the signature waits for it");
                }
                ports.busy_pause(pause).await;
                waited += pause;
                pause = (pause * 2).min(HSM_BUSY_MAX_PAUSE);
            }
            other => return other,
        }
    }
}

/// Start-up recovery: every request left `approved` (signing began and did not end) that
/// `scope` covers fails. Its signature, if the HSM made one, was never released, so the user's
/// one approval has not signed; it cannot sign later either. A request is approved before it
/// expires, so its expiry stands for when its signing began. Gives how many were failed.
pub async fn recover<P: Ports>(
    ports: &P,
    now: OffsetDateTime,
    scope: crate::Stranded,
) -> Result<usize, AppError> {
    let stranded = ports.write(|store| store.approved_requests()).await?;
    let mut failed = 0;
    for mut request in stranded {
        if !scope.covers(request.expires_at) {
            continue;
        }
        let approved = (request.status, request.bad_attempts);
        request.mark_failed();
        // `false`: finished meanwhile by whoever was signing it.
        if moved(transition(ports, &request, approved, now).await)? {
            ports
                .append(
                    "signing.failed",
                    "system",
                    fields([
                        ("request_id", json!(request.id.as_str())),
                        ("account_id", json!(request.account_id.as_str())),
                        ("code", json!("interrupted")),
                    ]),
                )
                .await?;
            tracing::warn!(
                request = request.id.as_str(),
                "interrupted signing request failed"
            );
            failed += 1;
        }
    }
    Ok(failed)
}

/// Whether a conditional transition took place: a lost race is `false`, not an error.
fn moved(result: Result<(), AppError>) -> Result<bool, AppError> {
    match result {
        Ok(()) => Ok(true),
        Err(AppError::Conflict) => Ok(false),
        Err(error) => Err(error),
    }
}

async fn transition<P: Ports>(
    ports: &P,
    request: &SigningRequest,
    from: (SigningStatus, u8),
    now: OffsetDateTime,
) -> Result<(), AppError> {
    let request = request.clone();
    ports
        .write(move |store| store.transition_request(&request, from, now))
        .await
}

/// Whether `signature` (ECDSA P-256 / SHA-256, DER) is the device's signature over `statement`.
/// The key is the device's SubjectPublicKeyInfo as registration stored it; anything but a P-256
/// key is refused.
pub fn device_signature_valid(device_spki: &[u8], statement: &str, signature: &[u8]) -> bool {
    use const_oid::db::rfc5912::{ID_EC_PUBLIC_KEY, SECP_256_R_1};
    let Ok(spki) = spki::SubjectPublicKeyInfoRef::try_from(device_spki) else {
        return false;
    };
    if spki.algorithm.oids() != Ok((ID_EC_PUBLIC_KEY, Some(SECP_256_R_1))) {
        return false;
    }
    let Some(point) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(statement.as_bytes(), signature)
        .is_ok()
}

/// What an approved request signs with: its certificate (checked locally and at the CA) and key.
struct Prepared {
    certificate: CertificateRecord,
    certificate_der: Zeroizing<Vec<u8>>,
    key_ref: Vec<u8>,
}

/// Checks that the account may sign with the request's certificate, locally and with the CA.
async fn prepare<P: Ports>(
    ports: &P,
    account: &AccountRecord,
    request: &SigningRequest,
    now: OffsetDateTime,
) -> Result<Prepared, AppError> {
    let certificate = signable(ports, account, now).await?;
    let certificate_der = when_hsm_free(ports, || {
        ports.unseal("certificate", account.id.as_str(), &certificate.sealed_der)
    })
    .await?;
    confirm_good(ports, &certificate, Some(&certificate_der), now).await?;
    if certificate.serial != request.certificate {
        // The certificate changed since the request was made (renewal): the user authorised a
        // signature under the other one.
        return Err(AppError::CertificateRevoked);
    }
    let key_ref = certificate
        .key_ref
        .clone()
        .ok_or(AppError::CertificateRevoked)?;
    Ok(Prepared {
        certificate,
        certificate_der,
        key_ref,
    })
}

/// Checks that `account` may sign now with its current certificate by the local state (the
/// CA's word is [`confirm_good`]); gives the certificate.
async fn signable<P: Ports>(
    ports: &P,
    account: &AccountRecord,
    now: OffsetDateTime,
) -> Result<CertificateRecord, AppError> {
    if account.tier != Tier::IamSmartPlus {
        return Err(AppError::NotIamSmartPlus);
    }
    if account.status != AccountStatus::Active {
        return Err(AppError::AccountNotActive(account.status.as_str()));
    }
    let serial = account
        .current_certificate
        .clone()
        .ok_or(AppError::NoCertificate)?;
    let certificate = ports
        .read(|store| store.get_certificate(&serial))?
        .ok_or(AppError::NoCertificate)?;
    match certificate_status(&certificate, now) {
        CertStatus::Revoked => return Err(AppError::CertificateRevoked),
        CertStatus::Expired => return Err(AppError::CertificateExpired),
        _ => {}
    }
    if certificate.key_ref.is_none() {
        return Err(AppError::CertificateRevoked);
    }
    // A minor's certificate stops at 00:00 Hong Kong time on the 18th birthday, whether or not
    // the revocation has reached the CA yet (DOMAIN.md).
    if certificate.profile == Profile::Minor {
        let dob = crate::date_of_birth(ports, account).await?;
        if now >= cert_lifecycle::minor_certificate_ends(dob) {
            return Err(AppError::CertificateRevoked);
        }
    }
    Ok(certificate)
}

/// Refuses unless the CA says the certificate is good now (or, with a configured grace, was
/// good recently enough). Called when a request is made and again just before the HSM signs.
/// A fresh cached answer is used as it is; otherwise the certificate (unsealed here unless the
/// caller has it) goes to the CA.
pub async fn confirm_good<P: Ports>(
    ports: &P,
    certificate: &CertificateRecord,
    der: Option<&[u8]>,
    now: OffsetDateTime,
) -> Result<(), AppError> {
    use ca_bridge::status::CertStatus as Answer;
    let serial = &certificate.serial;
    let status = match ports.cached(serial, now) {
        Some(status) => status,
        None => match der {
            Some(der) => ports.check(der, now).await?,
            None => {
                let der = ports
                    .unseal(
                        "certificate",
                        certificate.account_id.as_str(),
                        &certificate.sealed_der,
                    )
                    .await?;
                ports.check(&der, now).await?
            }
        },
    };
    match status {
        Answer::Good { within_grace, .. } => {
            if within_grace {
                tracing::warn!(
                    serial = serial.as_str(),
                    "no fresh certificate status: signing within the configured grace"
                );
            }
            Ok(())
        }
        Answer::Revoked { reason_code, .. } => {
            tracing::warn!(
                serial = serial.as_str(),
                reason_code,
                "the CA reports the certificate revoked"
            );
            Err(AppError::CertificateRevoked)
        }
        _ => {
            tracing::error!(
                serial = serial.as_str(),
                "the CA does not know the certificate"
            );
            Err(AppError::CertificateRevoked)
        }
    }
}

fn load_request<P: Ports>(ports: &P, id: &RequestId) -> Result<SigningRequest, AppError> {
    ports
        .read(|store| store.get_request(id))?
        .ok_or(AppError::NotFound("signing request"))
}

fn load_account<P: Ports>(ports: &P, id: &AccountId) -> Result<AccountRecord, AppError> {
    ports
        .read(|store| store.get_account(id))?
        .ok_or(AppError::NotFound("account"))
}

/// The API's name of a signature algorithm: `ecdsa_p256_sha256`, `rsa_pkcs1_sha384`, ...
pub fn signature_algorithm(key: KeyAlgorithm, hash: HashAlgorithm) -> String {
    let prefix = match key {
        KeyAlgorithm::EcP256 => "ecdsa_p256",
        KeyAlgorithm::EcP384 => "ecdsa_p384",
        _ => "rsa_pkcs1",
    };
    format!("{prefix}_{}", hash.as_str())
}

/// The CMS signature algorithm of a key of `key`'s kind over a `hash` digest.
fn cms_signature(key: KeyAlgorithm, hash: HashAlgorithm) -> SignatureAlg {
    match (key.is_ec(), hash) {
        (true, HashAlgorithm::Sha256) => SignatureAlg::EcdsaSha256,
        (true, HashAlgorithm::Sha384) => SignatureAlg::EcdsaSha384,
        (true, HashAlgorithm::Sha512) => SignatureAlg::EcdsaSha512,
        (false, HashAlgorithm::Sha256) => SignatureAlg::RsaPkcs1Sha256,
        (false, HashAlgorithm::Sha384) => SignatureAlg::RsaPkcs1Sha384,
        (false, HashAlgorithm::Sha512) => SignatureAlg::RsaPkcs1Sha512,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;

    /// The SubjectPublicKeyInfo DER of a device key, as registration stores it.
    fn spki_der(key: &impl spki::EncodePublicKey) -> Vec<u8> {
        key.to_public_key_der().unwrap().as_bytes().to_vec()
    }

    #[test]
    fn device_signature_verifies_only_for_the_exact_statement_and_key() {
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let spki = spki_der(key.verifying_key());
        let statement = "smartsign-authorise-v1\nid\n1234\nsha256\n00\napprove";
        let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
        let der = signature.to_der();
        assert!(device_signature_valid(&spki, statement, der.as_bytes()));
        assert!(!device_signature_valid(
            &spki,
            &statement.replace("approve", "reject"),
            der.as_bytes()
        ));
        let other = SigningKey::from_slice(&[8; 32]).unwrap();
        let other_spki = spki_der(other.verifying_key());
        assert!(!device_signature_valid(
            &other_spki,
            statement,
            der.as_bytes()
        ));
    }

    #[test]
    fn device_signature_refuses_keys_other_than_p256_and_malformed_input() {
        use p384::ecdsa::signature::Signer as _;
        let statement = "smartsign-authorise-v1\nid\n1234\nsha256\n00\napprove";
        let key = p384::ecdsa::SigningKey::from_slice(&[7; 48]).unwrap();
        let spki = spki_der(key.verifying_key());
        let signature: p384::ecdsa::Signature = key.sign(statement.as_bytes());
        let der = signature.to_der();
        assert!(!device_signature_valid(&spki, statement, der.as_bytes()));

        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let spki = spki_der(key.verifying_key());
        let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
        let der = signature.to_der();
        assert!(!device_signature_valid(
            &spki[..spki.len() - 1],
            statement,
            der.as_bytes()
        ));
        assert!(!device_signature_valid(
            &spki,
            statement,
            &signature.to_bytes()
        ));
        assert!(!device_signature_valid(&spki, statement, &[]));
    }

    #[test]
    fn signature_algorithm_names_follow_the_api() {
        assert_eq!(
            signature_algorithm(KeyAlgorithm::EcP256, HashAlgorithm::Sha384),
            "ecdsa_p256_sha384"
        );
        assert_eq!(
            signature_algorithm(KeyAlgorithm::Rsa2048, HashAlgorithm::Sha256),
            "rsa_pkcs1_sha256"
        );
    }
}
