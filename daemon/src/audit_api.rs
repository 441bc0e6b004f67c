//! The auditor's routes (API.md "Audit") and the HSM-backed checkpoint signer.

use std::sync::Arc;

use audit_log::{CheckpointSigner, SignerError};
use hsm_adapter::{Digest, HashAlgorithm, Hsm, SystemKey};
use serde_json::json;
use sha2::Digest as _;

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

/// `GET /v1/audit/records?from=N&limit=M`.
pub(crate) async fn records(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
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
    let body = app.audit.records(from, limit).await.map_err(audit_error)?;
    Ok(Reply::bytes("application/x-ndjson", body))
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
