//! The auditor's routes (API.md "Audit"), the signing receipt of a service's request, and the
//! HSM-backed checkpoint signer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use audit_log::{CheckpointSigner, EventName, RecordFilter, SignerError, Timestamp};
use cert_lifecycle::{AccountId, RequestId, ServiceName, SigningStatus};
use hsm_adapter::{Digest, HashAlgorithm, Hsm, SystemKey};
use serde_json::{Value, json};
use sha2::Digest as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;

/// Most records one `GET /v1/audit/records` returns.
const MAX_RECORDS: u64 = 10_000;

/// Signs checkpoints with the HSM audit key (ECDSA P-256 over SHA-256).
#[derive(Debug, Clone)]
pub(crate) struct HsmCheckpointSigner(pub(crate) Arc<Hsm>);

impl CheckpointSigner for HsmCheckpointSigner {
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        let digest = Digest::new(
            HashAlgorithm::Sha256,
            sha2::Sha256::digest(message).to_vec(),
        )
        .map_err(|error| SignerError::new(error.to_string()))?;
        self.0
            .sign_with_system_key(SystemKey::Audit, &digest)
            .await
            .map_err(|error| SignerError::new(format!("HSM audit key: {error}")))
    }
}

fn audit_error(error: audit_log::AuditError) -> ApiError {
    match error.kind() {
        audit_log::ErrorKind::InvalidInput => ApiError::InvalidRequest(error.to_string()),
        _ => {
            tracing::error!(%error, "audit log read failed");
            ApiError::AuditUnavailable
        }
    }
}

/// A refusal of the query's values, naming the parameters.
fn named(error: ApiError, parameters: &str) -> ApiError {
    match error {
        ApiError::InvalidRequest(detail) => {
            ApiError::InvalidRequest(format!("{parameters}: {detail}"))
        }
        other => other,
    }
}

/// The log's size once this node's copy has what the other nodes appended (with several
/// nodes; one round trip to the ledger).
async fn synced(app: &App) -> Result<u64, ApiError> {
    if !app.leader.shared() {
        return Ok(app.audit.tree_size());
    }
    app.audit.sync().await.map_err(|error| {
        tracing::error!(%error, "cannot bring the audit log up to date from the ledger");
        ApiError::AuditUnavailable
    })
}

/// The response header naming the cursor of the next page of `GET /v1/audit/records`: the
/// `after` that continues where this page ended (an extension of API.md).
const NEXT_AFTER: &str = "x-next-after";

/// The filters of `GET /v1/audit/records` other than the range, each checked; `None` when none
/// was given (the plain export, read without the index).
fn record_filter(ctx: &Ctx) -> Result<Option<RecordFilter>, ApiError> {
    let text = |name: &str| ctx.query.get(name).map(String::as_str);
    let bad = |name: &str, why: String| ApiError::InvalidRequest(format!("{name}: {why}"));
    let mut filter = RecordFilter::default();
    let mut any = false;
    if let Some(value) = text("account_id") {
        let id = AccountId::parse(value).map_err(|error| bad("account_id", error.to_string()))?;
        filter.account_id = Some(id.as_str().to_owned());
        any = true;
    }
    if let Some(value) = text("service") {
        let service =
            ServiceName::parse(value).map_err(|error| bad("service", error.to_string()))?;
        filter.service = Some(service.as_str().to_owned());
        any = true;
    }
    if let Some(value) = text("event") {
        let event = EventName::new(value).map_err(|error| bad("event", error.to_string()))?;
        filter.event = Some(event.as_str().to_owned());
        any = true;
    }
    if let Some(value) = text("request_id") {
        let id = RequestId::parse(value).map_err(|_| {
            bad(
                "request_id",
                "must be a signing request id (32 lowercase hex digits)".into(),
            )
        })?;
        filter.request_id = Some(id.as_str().to_owned());
        any = true;
    }
    for name in ["from_time", "to_time"] {
        if let Some(value) = text(name) {
            let time = record_time(value, name == "to_time").map_err(|why| bad(name, why))?;
            match name {
                "from_time" => filter.from_time = Some(time),
                _ => filter.to_time = Some(time),
            }
            any = true;
        }
    }
    Ok(any.then_some(filter))
}

/// An RFC 3339 time as a record time. Records carry their time truncated to whole seconds, so a
/// fraction is dropped from `from_time` (inclusive: a record of the same second, logged after
/// it, is kept) and rounded up in `to_time` (exclusive, with `round_up`): the answer holds every
/// record of the window, and at most the rest of its first and last seconds.
fn record_time(text: &str, round_up: bool) -> Result<Timestamp, String> {
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| "must be an RFC 3339 time, e.g. 2026-11-22T10:00:00Z".to_owned())?;
    let seconds = time.unix_timestamp() + i64::from(round_up && time.nanosecond() > 0);
    let seconds = u64::try_from(seconds).map_err(|_| "must be a time from 1970 on".to_owned())?;
    Timestamp::from_system_time(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
        .map_err(|_| "must be a time from 1970 to 9999".to_owned())
}

/// `GET /v1/audit/records?from=N&limit=M` and the filters of API.md "Additions":
/// `account_id`, `service`, `event`, `from_time`, `to_time` (and `request_id`, an extension),
/// `after` (an index: records above it). Filters are answered from the record index; every
/// answer names the next page's `after` in `x-next-after`.
pub(crate) async fn records(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let filter = record_filter(&ctx)?;
    let after = match ctx.query.get("after") {
        None => None,
        Some(_) => Some(ctx.query_u64("after", None)?),
    };
    let from = ctx.query_u64("from", Some(0))?;
    // A page holds at most MAX_RECORDS: a larger limit gets a full page (the auditor asks
    // again from where it ended), a limit of 0 is a mistake.
    let limit = ctx.query_u64("limit", Some(1000))?;
    if limit == 0 {
        return Err(ApiError::InvalidRequest(format!(
            "limit must be 1 or more (a page holds at most {MAX_RECORDS})"
        )));
    }
    let limit = limit.min(MAX_RECORDS);
    let size = synced(&app).await?;
    if from > size {
        return Err(ApiError::InvalidRequest(format!(
            "from must be at most the log's size, {size}"
        )));
    }
    // `after` past the end is no mistake: a monitor asks from where it stopped.
    let start = match after {
        Some(after) => from.max(after.saturating_add(1)),
        None => from,
    };
    let (body, next_from) = match filter {
        None => {
            let body = app
                .audit
                .records(start.min(size), limit)
                .await
                .map_err(audit_error)?;
            let count = body.iter().filter(|&&b| b == b'\n').count() as u64;
            let next_from = match count == limit {
                true => start + count,
                // Every record up to the end was considered; the cursor never goes back.
                false => start.max(size),
            };
            (body, next_from)
        }
        // Past the end there is nothing to look up (and an index the store could not hold).
        Some(_) if start >= size => (Vec::new(), start),
        Some(mut filter) => {
            filter.from = start;
            let page = app
                .audit
                .find_records(filter, limit)
                .await
                .map_err(audit_error)?;
            (page.records, page.next_from)
        }
    };
    let reply = Reply::bytes("application/x-ndjson", body);
    Ok(match next_from.checked_sub(1) {
        Some(next_after) => reply.with_header(NEXT_AFTER, next_after.to_string()),
        None => reply,
    })
}

/// `GET /v1/signing-requests/{id}/receipt` (the service that owns the request): its
/// `signing.signed` record, the record's index, the inclusion proof to the latest signed
/// checkpoint, and that checkpoint, once it covers the record. Before then (the request not
/// signed yet, or no checkpoint since), 404 with `Retry-After`. Another service's request is
/// 403 `forbidden`, as its `GET` is.
pub(crate) async fn receipt(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let unknown = ApiError::NotFound("signing request");
    let service = ServiceName::parse(&ctx.caller.name).map_err(|_| ApiError::Forbidden)?;
    let Ok(id) = RequestId::parse(ctx.param(0)) else {
        return Err(unknown);
    };
    let lookup = id.clone();
    let request = app
        .store(move |store| store.get_request(&lookup))
        .await?
        .ok_or(unknown)?;
    // As `GET /v1/signing-requests/{id}` answers (API.md: 403 when not the request's owner).
    if request.service != service {
        return Err(ApiError::Forbidden);
    }
    let retry_after = u32::try_from(app.checkpoint_interval.as_secs())
        .unwrap_or(u32::MAX)
        .max(1);
    let not_yet = ApiError::NotYet {
        what: "receipt",
        retry_after,
    };
    let status = request.effective_status(app.clock.now());
    if !matches!(
        status,
        SigningStatus::Signed | SigningStatus::Approved | SigningStatus::Pending
    ) {
        // Rejected, expired, locked or failed: no signature, and there never will be one.
        return Err(ApiError::NotFound("receipt: the request was not signed"));
    }
    synced(&app).await?;
    let filter = RecordFilter {
        request_id: Some(id.as_str().to_owned()),
        event: Some("signing.signed".to_owned()),
        ..RecordFilter::default()
    };
    let page = app
        .audit
        .find_records(filter, 1)
        .await
        .map_err(audit_error)?;
    let Some(line) = page.records.strip_suffix(b"\n") else {
        return Err(not_yet);
    };
    let record: Value = serde_json::from_slice(line).map_err(|error| {
        tracing::error!(%error, "a logged record does not parse");
        ApiError::Internal
    })?;
    let index = record["index"].as_u64().ok_or(ApiError::Internal)?;
    // With several nodes, the leader's latest as of the sync above.
    let checkpoint = match app.audit.latest_checkpoint() {
        Some(checkpoint) if checkpoint.tree_size() > index => checkpoint,
        _ => return Err(not_yet),
    };
    let proof = app
        .audit
        .inclusion_proof(index, checkpoint.tree_size())
        .map_err(audit_error)?;
    let record_text = std::str::from_utf8(line).map_err(|_| ApiError::Internal)?;
    let hashes: Vec<String> = proof.iter().map(audit_log::TreeHash::to_hex).collect();
    let head = json!({"record": record_text, "index": index, "inclusion_proof": hashes});
    // The checkpoint goes in byte for byte as `GET /v1/audit/checkpoint` serves it.
    let mut body = serde_json::to_vec(&head).map_err(|_| ApiError::Internal)?;
    body.pop();
    body.extend_from_slice(b",\"checkpoint\":");
    body.extend_from_slice(&checkpoint.to_json());
    body.push(b'}');
    Ok(Reply::bytes("application/json", body))
}

/// `GET /v1/audit/checkpoint`.
pub(crate) async fn checkpoint(app: Arc<App>, _ctx: Ctx) -> Result<Reply, ApiError> {
    let size = synced(&app).await?;
    let checkpoint = match app.audit.latest_checkpoint() {
        Some(checkpoint) if checkpoint.tree_size() == size => checkpoint,
        // With several nodes, the leader signs the series; the others serve its latest.
        Some(checkpoint) if !app.leader.leads() => checkpoint,
        _ => app
            .audit
            .checkpoint(&HsmCheckpointSigner(app.hsm.clone()))
            .await
            .map_err(|error| {
                tracing::error!(%error, "cannot write a checkpoint");
                ApiError::AuditUnavailable
            })?,
    };
    Ok(Reply::bytes("application/json", checkpoint.to_json()))
}

fn hashes(hashes: Vec<audit_log::TreeHash>) -> Reply {
    let hex: Vec<String> = hashes.iter().map(audit_log::TreeHash::to_hex).collect();
    Reply::ok(&json!({"hashes": hex}))
}

/// `GET /v1/audit/proofs/inclusion?index=&tree_size=`.
pub(crate) async fn inclusion(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let index = ctx.query_u64("index", None)?;
    let tree_size = ctx.query_u64("tree_size", None)?;
    synced(&app).await?;
    app.audit
        .inclusion_proof(index, tree_size)
        .map(hashes)
        .map_err(|error| named(audit_error(error), "index and tree_size"))
}

/// `GET /v1/audit/proofs/consistency?first=&second=`.
pub(crate) async fn consistency(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let first = ctx.query_u64("first", None)?;
    let second = ctx.query_u64("second", None)?;
    synced(&app).await?;
    app.audit
        .consistency_proof(first, second)
        .map(hashes)
        .map_err(|error| named(audit_error(error), "first and second"))
}

/// `GET /v1/audit/public-key`: the audit key, PEM.
pub(crate) async fn public_key(app: Arc<App>, _ctx: Ctx) -> Result<Reply, ApiError> {
    let key = app.hsm.system_public_key(SystemKey::Audit).await?;
    Ok(Reply::bytes(
        "application/x-pem-file",
        key.to_pem().into_bytes(),
    ))
}
