//! The signing flow (API.md "Signing", DESIGN.md "The signing flow"): a service creates a
//! request for a TAID and a hash; the gateway relays the user's device-signed decision; on an
//! approval the daemon re-checks the account and certificate, makes the audit record durable,
//! signs in the HSM, wraps the signature in a detached CMS, and keeps the result sealed for the
//! service that asked.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ca_bridge::signed_data::{HashAlg, SignatureAlg};
use cert_lifecycle::Store;
use cert_lifecycle::{
    AccountRecord, AccountStatus, AuthOutcome, CertProfile, CertStatus, CertificateRecord,
    Decision, FlowError, HashAlgorithm, RequestId, ServiceName, SigningRequest, SigningStatus,
    Tier, Transition,
};
use hsm_adapter::{Digest, KeyAlgorithm, SignatureScheme, UserKeyRef};
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest as _;
use spki::DecodePublicKey;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::accounts::{account_id, certificate_status, load, rfc3339};
use crate::app::{App, fields};
use crate::http::{Ctx, Reply};
use crate::problem::ApiError;

/// Parses a device public key: an EC P-256 SubjectPublicKeyInfo in PEM. Returns its DER.
pub(crate) fn device_key(pem: &str) -> Result<Vec<u8>, ApiError> {
    let key = p256::PublicKey::from_public_key_pem(pem.trim()).map_err(|_| {
        ApiError::InvalidRequest(
            "device_public_key must be an EC P-256 public key (SubjectPublicKeyInfo PEM)".into(),
        )
    })?;
    spki::EncodePublicKey::to_public_key_der(&key)
        .map(|der| der.as_bytes().to_vec())
        .map_err(|_| ApiError::Internal)
}

fn signature_algorithm(key: KeyAlgorithm, hash: HashAlgorithm) -> String {
    let prefix = match key {
        KeyAlgorithm::EcP256 => "ecdsa_p256",
        KeyAlgorithm::EcP384 => "ecdsa_p384",
        _ => "rsa_pkcs1",
    };
    format!("{prefix}_{}", hash.as_str())
}

/// The hash algorithm as the HSM adapter and the CMS builder name it, and the CMS signature
/// algorithm for a key of `key`'s kind.
struct Algorithms {
    hsm: hsm_adapter::HashAlgorithm,
    cms: HashAlg,
    cms_signature: SignatureAlg,
}

fn algorithms(key: KeyAlgorithm, hash: HashAlgorithm) -> Result<Algorithms, ApiError> {
    let (hsm, cms, ec, rsa) = match hash {
        HashAlgorithm::Sha256 => (
            hsm_adapter::HashAlgorithm::Sha256,
            HashAlg::Sha256,
            SignatureAlg::EcdsaSha256,
            SignatureAlg::RsaPkcs1Sha256,
        ),
        HashAlgorithm::Sha384 => (
            hsm_adapter::HashAlgorithm::Sha384,
            HashAlg::Sha384,
            SignatureAlg::EcdsaSha384,
            SignatureAlg::RsaPkcs1Sha384,
        ),
        HashAlgorithm::Sha512 => (
            hsm_adapter::HashAlgorithm::Sha512,
            HashAlg::Sha512,
            SignatureAlg::EcdsaSha512,
            SignatureAlg::RsaPkcs1Sha512,
        ),
        _ => {
            return Err(ApiError::InvalidRequest(
                "unsupported hash_algorithm".into(),
            ));
        }
    };
    Ok(Algorithms {
        hsm,
        cms,
        cms_signature: if key.is_ec() { ec } else { rsa },
    })
}

/// Checks that `account` may sign now with its current certificate by the local state (the
/// CA's status is [`crate::ca::confirm_good`]); gives the certificate.
async fn signable(
    app: &App,
    account: &AccountRecord,
    now: OffsetDateTime,
) -> Result<CertificateRecord, ApiError> {
    if account.tier != Tier::IamSmartPlus {
        return Err(ApiError::NotIamSmartPlus);
    }
    if account.status != AccountStatus::Active {
        return Err(ApiError::AccountNotActive(account.status.as_str()));
    }
    let Some(serial) = account.current_certificate.clone() else {
        return Err(ApiError::NoCertificate);
    };
    let certificate = app
        .lookup(|store| store.get_certificate(&serial))?
        .ok_or(ApiError::NoCertificate)?;
    match certificate_status(&certificate, now) {
        CertStatus::Revoked => return Err(ApiError::CertificateRevoked),
        CertStatus::Expired => return Err(ApiError::CertificateExpired),
        _ => {}
    }
    if certificate.key_ref.is_none() {
        return Err(ApiError::CertificateRevoked);
    }
    // A minor's certificate stops at 00:00 Hong Kong time on the 18th birthday, whether or not
    // the revocation has reached the CA yet (DOMAIN.md).
    if certificate.profile == CertProfile::Minor {
        let dob = app.date_of_birth(&account.id, &account.sealed_dob).await?;
        if now >= cert_lifecycle::minor_certificate_ends(dob) {
            return Err(ApiError::CertificateRevoked);
        }
    }
    Ok(certificate)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    taid: String,
    hash_algorithm: String,
    hash: String,
    hkic_number: Option<String>,
    description: Option<String>,
}

fn service_of(ctx: &Ctx) -> Result<ServiceName, ApiError> {
    ServiceName::parse(&ctx.caller.name).map_err(|_| ApiError::Forbidden)
}

/// `POST /v1/signing-requests` (service).
pub(crate) async fn create(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let result = create_checked(&app, &ctx, &service).await;
    if let Err(error) = &result {
        deny(&app, &ctx, "signing.create_denied", None, error).await?;
    }
    result
}

async fn create_checked(app: &App, ctx: &Ctx, service: &ServiceName) -> Result<Reply, ApiError> {
    let body: CreateBody = ctx.json()?;
    let now = app.clock.now();
    let hash_algorithm: HashAlgorithm = body.hash_algorithm.parse().map_err(|_| {
        ApiError::InvalidRequest("hash_algorithm must be sha256, sha384 or sha512".into())
    })?;
    let hash = STANDARD
        .decode(&body.hash)
        .map_err(|_| ApiError::InvalidRequest("hash must be standard base64".into()))?;
    if hash.len() != hash_algorithm.output_len() {
        return Err(ApiError::InvalidHash(format!(
            "a {} hash has {} bytes, not {}",
            hash_algorithm.as_str(),
            hash_algorithm.output_len(),
            hash.len()
        )));
    }
    if let Some(description) = &body.description
        && (description.chars().count() > 200 || description.chars().any(char::is_control))
    {
        return Err(ApiError::InvalidRequest(
            "description must be at most 200 characters without control characters".into(),
        ));
    }
    let hkic = body
        .hkic_number
        .as_deref()
        .map(cert_lifecycle::HkicNumber::parse)
        .transpose()
        .map_err(|error| ApiError::InvalidHkic(format!("hkic_number: {error}")))?;
    let account_id = app
        .lookup(|store| store.find_taid(service, &body.taid))?
        .ok_or(ApiError::NotFound("TAID at this service"))?;
    let account = load(app, &account_id).await?;
    let certificate = signable(app, &account, now).await?;
    crate::ca::confirm_good(app, &certificate, None, now).await?;
    if let Some(hkic) = hkic {
        // Used only to check the signer, then dropped (zeroized): never stored (DOMAIN.md).
        let hash = app.hkic_hash(&hkic).await?;
        if hash != account.hkic_hash {
            return Err(ApiError::HkicMismatch);
        }
    }
    let (id, code) = id_and_code(app).await?;
    let request = SigningRequest {
        id,
        service: service.clone(),
        account_id: account.id.clone(),
        certificate: certificate.serial.clone(),
        identification_code: code,
        hash_algorithm,
        hash,
        description: body.description,
        status: SigningStatus::Pending,
        bad_attempts: 0,
        device_generation: account.device_generation,
        created_at: now,
        expires_at: now + app.policy.request_ttl,
        sealed_result: None,
        signed_at: None,
    };
    app.audit(
        "signing.requested",
        &ctx.caller.to_string(),
        fields([
            ("request_id", json!(request.id.as_str())),
            ("account_id", json!(account.id.as_str())),
            ("serial", json!(certificate.serial.as_str())),
            ("hash_algorithm", json!(hash_algorithm.as_str())),
        ]),
    )
    .await?;
    {
        let request = request.clone();
        app.store(move |store| store.insert_request(&request))
            .await?;
    }
    Ok(Reply::json(
        StatusCode::CREATED,
        &json!({
            "request_id": request.id.as_str(),
            "identification_code": request.identification_code,
            "status": "pending",
            "expires_at": rfc3339(request.expires_at),
        }),
    ))
}

/// A request id (16 bytes) and its four-digit identification code from the HSM's generator, in
/// one call to the HSM; the code is drawn again only in the rare case that its bytes would bias
/// it (rejection sampling, see [`cert_lifecycle::identification_code_from_random`]).
async fn id_and_code(app: &App) -> Result<(RequestId, String), ApiError> {
    let random = app.random::<20>().await?;
    let (id, code) = random.split_at(16);
    let id = RequestId::from_random(id.try_into().map_err(|_| ApiError::Internal)?);
    let mut code = code.try_into().map_err(|_| ApiError::Internal)?;
    loop {
        if let Some(code) = cert_lifecycle::identification_code_from_random(code) {
            return Ok((id, code));
        }
        code = app.random().await?;
    }
}

/// Audits a refusal; only a failing audit log changes the answer (to `audit_unavailable`).
async fn deny(
    app: &App,
    ctx: &Ctx,
    event: &str,
    request: Option<&SigningRequest>,
    error: &ApiError,
) -> Result<(), ApiError> {
    if matches!(error, ApiError::AuditUnavailable) {
        return Ok(());
    }
    let mut record = fields([("code", json!(error.code()))]);
    if let Some(request) = request {
        record.insert("request_id".into(), json!(request.id.as_str()));
        record.insert("account_id".into(), json!(request.account_id.as_str()));
    }
    app.audit(event, &ctx.caller.to_string(), record).await?;
    Ok(())
}

/// `GET /v1/signing-requests/{id}` (only the service that created it).
pub(crate) async fn get(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let request = load_request(&app, ctx.param(0)).await?;
    if request.service != service {
        return Err(ApiError::Forbidden);
    }
    let now = app.clock.now();
    let status = request.effective_status(now);
    let mut body = json!({
        "request_id": request.id.as_str(),
        "status": status.as_str(),
        "expires_at": rfc3339(request.expires_at),
    });
    if status == SigningStatus::Signed
        && let Some(sealed) = &request.sealed_result
    {
        let plain = app
            .unseal_bound("result", request.id.as_str(), sealed)
            .await?;
        let result: Value = serde_json::from_slice(&plain).map_err(|_| ApiError::Internal)?;
        body["result"] = result;
    }
    Ok(Reply::ok(&body))
}

async fn load_request(app: &App, id: &str) -> Result<SigningRequest, ApiError> {
    let id = RequestId::parse(id).map_err(|_| ApiError::NotFound("signing request"))?;
    app.lookup(|store| store.get_request(&id))?
        .ok_or(ApiError::NotFound("signing request"))
}

/// Requests per page of the signing history, by default and at most.
const HISTORY_PAGE: usize = 20;
const HISTORY_MAX: usize = 100;

/// `GET /v1/accounts/{id}/signing-history?before=CURSOR&limit=N` (gateway): the user's own
/// record of what they signed, rejected or let expire, newest first.
pub(crate) async fn history(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let limit = match ctx.query.get("limit") {
        None => HISTORY_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=HISTORY_MAX).contains(n))
            .ok_or_else(|| ApiError::InvalidRequest(format!("limit: 1 to {HISTORY_MAX}")))?,
    };
    let before = ctx
        .query
        .get("before")
        .map(|c| parse_cursor(c))
        .transpose()?;
    let account = load(&app, &account_id(ctx.param(0))?).await?;
    let now = app.clock.now();
    let id = account.id.clone();
    // One more than the page: whether there is a next page.
    let mut rows = app
        .store(move |store| store.signing_history(&id, now, before, limit + 1))
        .await?;
    let next = (rows.len() > limit).then(|| {
        rows.truncate(limit);
        rows.last()
            .map(|(request, finished)| cursor(*finished, &request.id))
    });
    let list: Vec<Value> = rows
        .iter()
        .map(|(request, finished)| {
            json!({
                "request_id": request.id.as_str(),
                "service": request.service.as_str(),
                "hash_algorithm": request.hash_algorithm.as_str(),
                "hash": STANDARD.encode(&request.hash),
                "status": request.effective_status(now).as_str(),
                "finished_at": rfc3339(*finished),
            })
        })
        .collect();
    Ok(Reply::ok(
        &json!({"requests": list, "next": next.flatten()}),
    ))
}

/// A history cursor: the finish time (unix seconds) and id of the last request of a page.
fn cursor(finished: OffsetDateTime, id: &RequestId) -> String {
    format!("{}.{}", finished.unix_timestamp(), id.as_str())
}

fn parse_cursor(text: &str) -> Result<(OffsetDateTime, RequestId), ApiError> {
    let bad = || ApiError::InvalidRequest("before: not a cursor from this route".into());
    let (seconds, id) = text.split_once('.').ok_or_else(bad)?;
    let seconds: i64 = seconds.parse().map_err(|_| bad())?;
    let finished = OffsetDateTime::from_unix_timestamp(seconds).map_err(|_| bad())?;
    Ok((finished, RequestId::parse(id).map_err(|_| bad())?))
}

/// `GET /v1/accounts/{id}/signing-requests?status=pending` (gateway).
pub(crate) async fn pending_for_account(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    match ctx.query.get("status").map(String::as_str) {
        None | Some("pending") => {}
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "status: only pending requests are listed".into(),
            ));
        }
    }
    let account = load(&app, &account_id(ctx.param(0))?).await?;
    let now = app.clock.now();
    let id = account.id.clone();
    let requests = app
        .store(move |store| store.pending_requests(&id, now))
        .await?;
    let list: Vec<Value> = requests
        .iter()
        .map(|request| {
            json!({
                "request_id": request.id.as_str(),
                "service": request.service.as_str(),
                "identification_code": request.identification_code,
                "hash_algorithm": request.hash_algorithm.as_str(),
                "hash": STANDARD.encode(&request.hash),
                "description": request.description,
                "expires_at": rfc3339(request.expires_at),
            })
        })
        .collect();
    Ok(Reply::ok(&json!({"requests": list})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorisationBody {
    decision: String,
    device_signature: String,
}

/// `POST /v1/signing-requests/{id}/authorisation` (gateway).
pub(crate) async fn authorise(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let body: AuthorisationBody = ctx.json()?;
    let decision: Decision = body
        .decision
        .parse()
        .map_err(|_| ApiError::InvalidRequest("decision must be approve or reject".into()))?;
    let signature = STANDARD
        .decode(&body.device_signature)
        .map_err(|_| ApiError::InvalidRequest("device_signature must be standard base64".into()))?;
    // Each try reads the request and the account afresh; a transition that finds the request
    // changed since (another authorisation, a suspension, a device switch) tries again on the
    // new state, which then answers for itself. Nothing here holds a guarantee in memory.
    for _ in 0..AUTHORISE_TRIES {
        match authorise_once(&app, &ctx, decision, &signature).await? {
            Attempt::Done(reply) => return Ok(reply),
            Attempt::Raced => continue,
        }
    }
    Err(ApiError::Conflict)
}

/// How often an authorisation re-reads after losing a race before it answers 409 `conflict`.
const AUTHORISE_TRIES: usize = 4;

/// One try at an authorisation.
enum Attempt {
    Done(Reply),
    /// The request changed between the read and the transition.
    Raced,
}

async fn authorise_once(
    app: &App,
    ctx: &Ctx,
    decision: Decision,
    signature: &[u8],
) -> Result<Attempt, ApiError> {
    let mut request = load_request(app, ctx.param(0)).await?;
    let read = (request.status, request.bad_attempts);
    let now = app.clock.now();
    let account = load(app, &request.account_id).await?;
    let statement = request.authorisation_statement(decision);
    // The device bound when the request was made must be the one that signs the statement: a
    // request made before a device switch is not the new device's to approve.
    let outcome = if request.device_generation == account.device_generation
        && device_signature_valid(&account.device_public_key, &statement, signature)
    {
        AuthOutcome::Valid(decision)
    } else {
        AuthOutcome::BadSignature
    };
    match request.authorise(outcome, now) {
        Err(flow) => {
            let error = match flow {
                FlowError::Expired => ApiError::RequestExpired,
                FlowError::AuthorisationInvalid => ApiError::AuthorisationInvalid,
                FlowError::TooManyAttempts => ApiError::TooManyAttempts,
                _ => ApiError::RequestNotPending(request.effective_status(now).as_str()),
            };
            if request.status != read.0 || request.bad_attempts != read.1 {
                match transition(app, &request, read).await? {
                    Moved::Yes => {}
                    Moved::Raced => return Ok(Attempt::Raced),
                }
            }
            deny(
                app,
                ctx,
                "signing.authorisation_denied",
                Some(&request),
                &error,
            )
            .await?;
            Err(error)
        }
        Ok(Transition::Rejected) => {
            if let Moved::Raced = transition(app, &request, read).await? {
                return Ok(Attempt::Raced);
            }
            app.audit(
                "signing.rejected",
                &ctx.caller.to_string(),
                fields([
                    ("request_id", json!(request.id.as_str())),
                    ("account_id", json!(request.account_id.as_str())),
                ]),
            )
            .await?;
            Ok(Attempt::Done(Reply::ok(
                &json!({"request_id": request.id.as_str(), "status": "rejected"}),
            )))
        }
        Ok(_) => {
            // Everything that may take long (the CA's status answer) comes before the approval,
            // so that the approval's own check of the account is the last word before the HSM.
            let prepared = match prepare(app, &account, &request, now).await {
                Ok(prepared) => prepared,
                Err(error) => {
                    request.mark_failed();
                    if let Moved::Raced = transition(app, &request, read).await? {
                        return Ok(Attempt::Raced);
                    }
                    fail(app, ctx, &request, &error).await;
                    return Err(error);
                }
            };
            // The single-use guard: pending -> approved, durable, with the account still
            // active and bound to the same device. One of any number of authorisations wins.
            if let Moved::Raced = transition(app, &request, read).await? {
                return Ok(Attempt::Raced);
            }
            let approved = (request.status, request.bad_attempts);
            match sign_approved(app, ctx, prepared, &mut request, now).await {
                Ok(()) => {
                    // The signature is released only once its state is durable.
                    match transition(app, &request, approved).await? {
                        Moved::Yes => Ok(Attempt::Done(Reply::ok(
                            &json!({"request_id": request.id.as_str(), "status": "signed"}),
                        ))),
                        // Recovery failed it meanwhile (another node's restart): the signature
                        // is dropped, never released.
                        Moved::Raced => Err(ApiError::RequestNotPending("failed")),
                    }
                }
                Err(error) => {
                    request.mark_failed();
                    request.sealed_result = None;
                    request.signed_at = None;
                    let _ = transition(app, &request, approved).await;
                    fail(app, ctx, &request, &error).await;
                    Err(error)
                }
            }
        }
    }
}

/// Start-up recovery: every request left `approved` (signing began and did not end) fails. Its
/// signature, if the HSM made one, was never released, so the user's one approval has not
/// signed; it cannot sign later either.
pub(crate) async fn recover(app: &App) -> Result<(), String> {
    let stranded = app
        .store(|store| store.approved_requests())
        .await
        .map_err(|error| format!("cannot read interrupted signing requests: {error:?}"))?;
    for mut request in stranded {
        let approved = (request.status, request.bad_attempts);
        request.mark_failed();
        match transition(app, &request, approved).await {
            Ok(Moved::Yes) => {
                app.audit(
                    "signing.failed",
                    "system",
                    fields([
                        ("request_id", json!(request.id.as_str())),
                        ("account_id", json!(request.account_id.as_str())),
                        ("code", json!("interrupted")),
                    ]),
                )
                .await
                .map_err(|error| format!("cannot audit an interrupted request: {error:?}"))?;
                tracing::warn!(
                    request = request.id.as_str(),
                    "interrupted signing request failed"
                );
            }
            // Finished meanwhile by whoever was signing it.
            Ok(Moved::Raced) => {}
            Err(error) => {
                return Err(format!("cannot fail an interrupted request: {error:?}"));
            }
        }
    }
    Ok(())
}

/// Whether a conditional transition took place.
enum Moved {
    Yes,
    Raced,
}

async fn transition(
    app: &App,
    request: &SigningRequest,
    from: (SigningStatus, u8),
) -> Result<Moved, ApiError> {
    let request = request.clone();
    let now = app.clock.now();
    match app
        .store(move |store| store.transition_request(&request, from, now))
        .await
    {
        Ok(()) => Ok(Moved::Yes),
        Err(ApiError::Conflict) => Ok(Moved::Raced),
        Err(error) => Err(error),
    }
}

/// A signature that failed after the user approved it: counted and audited (if the log takes
/// it); the request is failed either way.
async fn fail(app: &App, ctx: &Ctx, request: &SigningRequest, error: &ApiError) {
    app.metrics.count_signature("unknown", "failed");
    let _ = deny(app, ctx, "signing.failed", Some(request), error).await;
}

/// Whether `signature` (ECDSA P-256 / SHA-256, DER) is the device's signature over
/// `statement`. The key is the device's SubjectPublicKeyInfo as registration stored it; anything
/// but a P-256 key is refused.
pub(crate) fn device_signature_valid(
    device_spki: &[u8],
    statement: &str,
    signature: &[u8],
) -> bool {
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
    certificate_der: Vec<u8>,
    key: UserKeyRef,
}

/// Checks that the account may sign with the request's certificate, locally and with the CA.
async fn prepare(
    app: &App,
    account: &AccountRecord,
    request: &SigningRequest,
    now: OffsetDateTime,
) -> Result<Prepared, ApiError> {
    let certificate = signable(app, account, now).await?;
    let certificate_der = app
        .unseal("certificate", &account.id, &certificate.sealed_der)
        .await?;
    crate::ca::confirm_good(app, &certificate, Some(&certificate_der), now).await?;
    if certificate.serial != request.certificate {
        // The certificate changed since the request was made (renewal): the user authorised a
        // signature under the other one.
        return Err(ApiError::CertificateRevoked);
    }
    let key = certificate
        .key_ref
        .as_deref()
        .map(UserKeyRef::from_bytes)
        .transpose()?
        .ok_or(ApiError::CertificateRevoked)?;
    Ok(Prepared {
        certificate,
        certificate_der: certificate_der.to_vec(),
        key,
    })
}

/// Audits the approval, signs in the HSM, builds the CMS, audits the signature and seals the
/// result into `request` (marked signed; the caller stores it).
async fn sign_approved(
    app: &App,
    ctx: &Ctx,
    prepared: Prepared,
    request: &mut SigningRequest,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    let Prepared {
        certificate,
        certificate_der,
        key,
    } = prepared;
    let actor = ctx.caller.to_string();
    // Write before acting: the approval is durable before the HSM signs.
    app.audit(
        "signing.approved",
        &actor,
        fields([
            ("request_id", json!(request.id.as_str())),
            ("account_id", json!(request.account_id.as_str())),
            ("serial", json!(certificate.serial.as_str())),
        ]),
    )
    .await?;
    let scheme = if key.algorithm().is_ec() {
        SignatureScheme::Ecdsa
    } else {
        SignatureScheme::RsaPkcs1v15
    };
    let algorithm = signature_algorithm(key.algorithm(), request.hash_algorithm);
    let names = algorithms(key.algorithm(), request.hash_algorithm)?;
    let digest = Digest::new(names.hsm, request.hash.clone())?;
    let signed_at = now.replace_nanosecond(0).unwrap_or(now);
    let attributes = ca_bridge::signed_data::SignedAttributes::new(
        names.cms,
        &request.hash,
        signed_at.into(),
        &certificate_der,
    )
    .map_err(|error| {
        tracing::error!(%error, "cannot build the CMS signed attributes");
        ApiError::Internal
    })?;
    let attributes_digest = Digest::new(names.hsm, attributes.digest_to_sign())?;
    // The raw signature over the hash and the CMS signature over the signed attributes, in one
    // trip to the HSM.
    let started = Instant::now();
    let [signature, attributes_signature]: [Vec<u8>; 2] = app
        .hsm
        .sign_each(&key, scheme, &[digest, attributes_digest])
        .await?
        .try_into()
        .map_err(|_| ApiError::Internal)?;
    app.metrics.observe_hsm("sign", started.elapsed());
    let mut certificates: Vec<&[u8]> = vec![&certificate_der];
    certificates.extend(app.ca.chain_der.iter().map(Vec::as_slice));
    let cms = attributes
        .into_content_info(&attributes_signature, names.cms_signature, &certificates)
        .map_err(|error| {
            tracing::error!(%error, "cannot assemble the CMS");
            ApiError::Internal
        })?;

    // The signature exists only in memory until this record is durable; if it cannot be
    // written, the signature is dropped and the request fails (fail closed).
    app.audit(
        "signing.signed",
        &actor,
        fields([
            ("request_id", json!(request.id.as_str())),
            ("account_id", json!(request.account_id.as_str())),
            ("serial", json!(certificate.serial.as_str())),
            ("signature_algorithm", json!(algorithm)),
            (
                "signature_sha256",
                json!(hex::encode(sha2::Sha256::digest(&signature))),
            ),
        ]),
    )
    .await?;
    let result = json!({
        "signature": STANDARD.encode(&signature),
        "signature_algorithm": algorithm,
        "cms": STANDARD.encode(&cms),
        "certificate": crate::app::pem("CERTIFICATE", &certificate_der),
        "chain": app.ca.chain_pem,
        "signed_at": rfc3339(signed_at),
    });
    let plain = Zeroizing::new(serde_json::to_vec(&result).map_err(|_| ApiError::Internal)?);
    let sealed = app
        .seal_bound("result", request.id.as_str(), &plain)
        .await?;
    app.failpoint("signing-after-signed-record");
    request.mark_signed(sealed, signed_at);
    app.metrics.count_signature(&algorithm, "signed");
    tracing::info!(request = request.id.as_str(), algorithm, "signed");
    Ok(())
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
