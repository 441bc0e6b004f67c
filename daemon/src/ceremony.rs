//! The key ceremony's transcript, tied to the audit log: at each start the configured
//! transcript (`hsm.ceremony_transcript`) must verify under this token's audit key, and the
//! first start that sees it records its SHA-256 as `ceremony.transcript` (the log's first record
//! when the ceremony came first). The store remembers which transcript is recorded, so later
//! starts do not record it again.

use application::ports::AuditTrail;
use std::path::Path;

use audit_log::{AuditPublicKey, Transcript};
use cert_lifecycle::StoreError;
use hsm_adapter::SystemKey;
use serde_json::Value;
use sha2::Digest as _;

use crate::app::App;
use application::fields;

pub(crate) async fn anchor(app: &App, path: &Path) -> Result<(), String> {
    let shown = path.display();
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|error| format!("cannot read hsm.ceremony_transcript {shown}: {error}"))?;
    let transcript = Transcript::parse(&bytes)
        .map_err(|error| format!("hsm.ceremony_transcript {shown}: {error}"))?;
    let audit_key = app
        .hsm
        .system_public_key(SystemKey::Audit)
        .await
        .map_err(|error| format!("cannot read the audit public key: {error}"))?;
    let audit_key = AuditPublicKey::from_spki_der(audit_key.as_der()).map_err(|e| e.to_string())?;
    transcript.verify(&audit_key).map_err(|error| {
        format!(
            "hsm.ceremony_transcript {shown}: {error}; it is not this token's ceremony, or it \
             was changed"
        )
    })?;
    let sha256: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    let store = app.store.clone();
    let recorded = tokio::task::spawn_blocking(move || store.ceremony_record(&sha256))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| format!("cannot read the store: {error}"))?;
    if let Some(index) = recorded {
        tracing::info!(index, "the ceremony transcript is in the audit log");
        return Ok(());
    }
    let body = transcript.body();
    let index = app
        .append(
            "ceremony.transcript",
            "system",
            fields([
                ("sha256", hex::encode(sha256).into()),
                ("token_serial", body["token"]["serial"].clone()),
                (
                    "officers",
                    body.get("officers").cloned().unwrap_or(Value::Null),
                ),
                (
                    "threshold",
                    body.get("threshold").cloned().unwrap_or(Value::Null),
                ),
            ]),
        )
        .await
        .map_err(|error| {
            format!("cannot write the ceremony transcript's audit record ({error:?})")
        })?;
    let store = app.store.clone();
    let now = app.clock.now();
    match tokio::task::spawn_blocking(move || store.record_ceremony(&sha256, index, now))
        .await
        .map_err(|error| error.to_string())?
    {
        Ok(()) => tracing::info!(index, "ceremony transcript recorded in the audit log"),
        // Another node that started at the same time recorded it first: the log holds it
        // twice, which an auditor reads as two starts that saw the same transcript.
        Err(StoreError::AlreadyExists) => {
            tracing::info!(
                index,
                "ceremony transcript recorded in the audit log (again)"
            )
        }
        Err(error) => return Err(format!("cannot write the store: {error}")),
    }
    Ok(())
}
