//! The signing routes (API.md "Signing"): they parse and type the input, call the signing
//! workflow of the application layer ([`application::signing`]), and map its outcome.

use std::sync::Arc;

use application::signing::{self as flow, Authorised, NewRequest};
use application::{AppError, rfc3339};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cert_lifecycle::{Decision, HashAlgorithm, HkicNumber, RequestId, ServiceName, SigningStatus};
use serde::Deserialize;
use serde_json::{Value, json};
use spki::DecodePublicKey;
use time::OffsetDateTime;

use crate::accounts::account_id;
use crate::api::{Ctx, Reply};
use crate::app::App;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    taid: String,
    hash_algorithm: String,
    hash: Option<String>,
    hashes: Option<Vec<String>>,
    hkic_number: Option<String>,
    description: Option<String>,
}

fn service_of(ctx: &Ctx) -> Result<ServiceName, ApiError> {
    ServiceName::parse(&ctx.caller.name).map_err(|_| ApiError::Forbidden)
}

/// `POST /v1/signing-requests` (service).
pub(crate) async fn create(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let actor = ctx.caller.to_string();
    let new = match parse_create(&ctx, service) {
        Ok(new) => new,
        Err(error) => {
            flow::refused(&*app, &actor, &error).await?;
            return Err(error.into());
        }
    };
    let request = flow::create(&*app, &app.signing, &actor, new, app.clock.now()).await?;
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

/// The body of `POST /v1/signing-requests` from `service`, each field checked where it is
/// parsed.
pub(crate) fn parse_create(ctx: &Ctx, service: ServiceName) -> Result<NewRequest, AppError> {
    let body: CreateBody = ctx.json_or_detail().map_err(AppError::InvalidRequest)?;
    // A TAID is the base64url of a keyed hash; anything else names no account anywhere.
    if !(1..=64).contains(&body.taid.len())
        || !body
            .taid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(AppError::InvalidRequest(
            "taid must be the TAID this service was given (base64url)".into(),
        ));
    }
    let hash_algorithm: HashAlgorithm = body.hash_algorithm.parse().map_err(|_| {
        AppError::InvalidRequest("hash_algorithm must be sha256, sha384 or sha512".into())
    })?;
    // `hash` (one) or `hashes` (a batch, API.md "Batch signing"): exactly one of them.
    let (hash, hashes) = match (body.hash, body.hashes) {
        (Some(hash), None) => (
            STANDARD
                .decode(&hash)
                .map_err(|_| AppError::InvalidRequest("hash must be standard base64".into()))?,
            None,
        ),
        (None, Some(hashes)) => {
            let decoded = hashes
                .iter()
                .enumerate()
                .map(|(index, hash)| {
                    STANDARD.decode(hash).map_err(|_| {
                        AppError::InvalidRequest(format!("hashes[{index}] must be standard base64"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (Vec::new(), Some(decoded))
        }
        (Some(_), Some(_)) => {
            return Err(AppError::InvalidRequest(
                "hash, hashes: give one of them, not both".into(),
            ));
        }
        (None, None) => {
            return Err(AppError::InvalidRequest(
                "hash: missing (or hashes, for a batch)".into(),
            ));
        }
    };
    let hkic = body
        .hkic_number
        .as_deref()
        .map(HkicNumber::parse)
        .transpose()
        .map_err(|error| AppError::InvalidHkic(format!("hkic_number: {error}")))?;
    Ok(NewRequest {
        service,
        taid: body.taid,
        hash_algorithm,
        hash,
        hashes,
        hkic,
        description: body.description,
    })
}

fn request_id(text: &str) -> Result<RequestId, ApiError> {
    RequestId::parse(text).map_err(|_| ApiError::NotFound("signing request"))
}

/// `GET /v1/signing-requests/{id}` (only the service that created it).
pub(crate) async fn get(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let id = request_id(ctx.param(0))?;
    let view = flow::view(&*app, &service, &id, app.clock.now()).await?;
    let mut body = json!({
        "request_id": view.request.id.as_str(),
        "status": view.status.as_str(),
        "expires_at": rfc3339(view.request.expires_at),
    });
    if let Some(result) = view.result {
        // A batch answers `results`, one per hash in order; a single hash keeps `result`.
        let key = if view.request.is_batch() {
            "results"
        } else {
            "result"
        };
        body[key] = result;
    }
    Ok(Reply::ok(&body))
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
    let account = account_id(ctx.param(0))?;
    let now = app.clock.now();
    let page = flow::history(&*app, &account, before, limit, now).await?;
    let next = page
        .more
        .then(|| page.requests.last())
        .flatten()
        .map(|(request, finished)| cursor(*finished, &request.id));
    let list: Vec<Value> = page
        .requests
        .iter()
        .map(|(request, finished)| {
            let mut item = json!({
                "request_id": request.id.as_str(),
                "service": request.service.as_str(),
                "hash_algorithm": request.hash_algorithm.as_str(),
                "status": request.effective_status(now).as_str(),
                "finished_at": rfc3339(*finished),
            });
            put_hashes(&mut item, request);
            item
        })
        .collect();
    Ok(Reply::ok(&json!({"requests": list, "next": next})))
}

/// What a listed request signs: `"hash"` (base64), or for a batch `"hashes"` (base64, in
/// order) in its place.
fn put_hashes(item: &mut Value, request: &cert_lifecycle::SigningRequest) {
    match &request.hashes {
        Some(hashes) => {
            item["hashes"] = hashes.iter().map(|h| STANDARD.encode(h)).collect();
        }
        None => item["hash"] = json!(STANDARD.encode(&request.hash)),
    }
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
    let account = account_id(ctx.param(0))?;
    let requests = flow::pending(&*app, &account, app.clock.now()).await?;
    let list: Vec<Value> = requests
        .iter()
        .map(|request| {
            let mut item = json!({
                "request_id": request.id.as_str(),
                "service": request.service.as_str(),
                "identification_code": request.identification_code,
                "hash_algorithm": request.hash_algorithm.as_str(),
                "description": request.description,
                "expires_at": rfc3339(request.expires_at),
            });
            put_hashes(&mut item, request);
            item
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

/// The largest DER signature a device key makes (ECDSA P-256: at most 72 bytes), with room.
const MAX_DEVICE_SIGNATURE: usize = 256;

/// A device signature from the network: standard base64 of a DER signature of a plausible
/// size. Anything else is a malformed request (400), not a bad authorisation: it does not count
/// towards the request's lock.
pub(crate) fn device_signature(text: &str) -> Result<Vec<u8>, ApiError> {
    STANDARD
        .decode(text)
        .ok()
        .filter(|der| (8..=MAX_DEVICE_SIGNATURE).contains(&der.len()))
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "device_signature must be standard base64 of a DER signature of 8 to \
                 {MAX_DEVICE_SIGNATURE} bytes"
            ))
        })
}

/// The body of `POST /v1/signing-requests/{id}/authorisation`: the decision and the device's
/// signature (DER).
pub(crate) fn authorisation_body(ctx: &Ctx) -> Result<(Decision, Vec<u8>), ApiError> {
    let body: AuthorisationBody = ctx.json()?;
    let decision: Decision = body
        .decision
        .parse()
        .map_err(|_| ApiError::InvalidRequest("decision must be approve or reject".into()))?;
    Ok((decision, device_signature(&body.device_signature)?))
}

/// `POST /v1/signing-requests/{id}/authorisation` (gateway).
pub(crate) async fn authorise(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let (decision, signature) = authorisation_body(&ctx)?;
    let id = request_id(ctx.param(0))?;
    let actor = ctx.caller.to_string();
    let outcome = flow::authorise(
        &*app,
        &app.signing,
        &actor,
        &id,
        decision,
        &signature,
        app.clock.now(),
    )
    .await?;
    let status = match outcome {
        Authorised::Rejected => SigningStatus::Rejected,
        Authorised::Signed => SigningStatus::Signed,
    };
    Ok(Reply::ok(
        &json!({"request_id": id.as_str(), "status": status.as_str()}),
    ))
}
