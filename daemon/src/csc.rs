//! The Cloud Signature Consortium API v1 (1.0.4.0) facade, `/csc/v1/...`, for services (their
//! client certificate): `info`, `credentials/list`, `credentials/info`, `credentials/authorize`
//! and `signatures/signHash`. The handlers parse the CSC bodies, call the workflows of
//! [`application::csc`], and answer in the specification's shapes: errors are
//! `{"error", "error_description"}` with HTTP 400.
//!
//! A credential is the account's TAID at the calling service. Authorisation is the user's app,
//! out of band (`authMode` `implicit`: the client sends no PIN or OTP): `authorize` answers at
//! once with the SAD, the request id and the identification code the app shows; `signHash`
//! waits (up to [`SIGN_WAIT`]) for the user's decision.

use std::sync::Arc;
use std::time::Duration;

use application::csc::{self as flow, Authorize, CscRefusal, SignOutcome};
use application::{AppError, rfc3339};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cert_lifecycle::ServiceName;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;

/// The CSC specification this facade follows.
const SPECS: &str = "1.0.4.0";
/// How long `signHash` waits for the user's decision before it answers that none came.
pub(crate) const SIGN_WAIT: Duration = Duration::from_secs(60);
/// How often it looks again meanwhile.
const SIGN_POLL: Duration = Duration::from_millis(250);
/// Credentials per `credentials/list` page, by default and at most.
const LIST_PAGE: usize = 100;
const LIST_MAX: usize = 1000;

/// A CSC error answer.
fn csc_error(status: StatusCode, error: &str, description: impl Into<String>) -> Reply {
    Reply::json(
        status,
        &json!({"error": error, "error_description": description.into()}),
    )
}

fn invalid(description: impl Into<String>) -> Reply {
    csc_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// The workflow's refusals in CSC's shape (400 `invalid_request`); the failures of a part stay
/// the native problems (503), which a client retries.
fn answer(result: Result<Reply, AppError>) -> Result<Reply, ApiError> {
    match result {
        Ok(reply) => Ok(reply),
        Err(
            error @ (AppError::HsmUnavailable(_)
            | AppError::HsmBusy(_)
            | AppError::AuditUnavailable(_)
            | AppError::StatusUnavailable(_)
            | AppError::StoreUnavailable(_)
            | AppError::Store(_)
            | AppError::Fault(_)),
        ) => Err(error.into()),
        Err(refusal) => Ok(invalid(refusal.to_string())),
    }
}

fn service_of(ctx: &Ctx) -> Result<ServiceName, ApiError> {
    ServiceName::parse(&ctx.caller.name).map_err(|_| ApiError::Forbidden)
}

/// The JSON body as `T`, or the CSC error naming what is wrong.
fn body<T: serde::de::DeserializeOwned>(ctx: &Ctx) -> Result<T, Reply> {
    ctx.json_or_detail()
        .map_err(|detail| invalid(format!("the body: {detail}")))
}

fn decode_hashes(hashes: &[String]) -> Result<Vec<Vec<u8>>, Reply> {
    hashes
        .iter()
        .map(|hash| {
            STANDARD
                .decode(hash)
                .map_err(|_| invalid("Invalid parameter hash: standard base64"))
        })
        .collect()
}

/// `POST /csc/v1/info`.
pub(crate) async fn info(app: Arc<App>, _ctx: Ctx) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&json!({
        "specs": SPECS,
        "name": "smartsign",
        "logo": "",
        "region": "HK",
        "lang": "en-US",
        "description": format!(
            "iAM Smart-Cert signing ({}): each signature is authorised by the user's app",
            if app.dev { "development" } else { "production" }
        ),
        "authType": ["TLS"],
        "methods": [
            "credentials/list",
            "credentials/info",
            "credentials/authorize",
            "signatures/signHash"
        ],
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListBody {
    max_results: Option<usize>,
    page_token: Option<String>,
    #[serde(rename = "userID")]
    user_id: Option<String>,
    client_data: Option<String>,
}

/// `POST /csc/v1/credentials/list`: the TAIDs this service holds.
pub(crate) async fn list(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let asked: ListBody = match body(&ctx) {
        Ok(asked) => asked,
        Err(reply) => return Ok(reply),
    };
    let _ = (&asked.user_id, &asked.client_data);
    let limit = asked.max_results.unwrap_or(LIST_PAGE).clamp(1, LIST_MAX);
    answer(
        async {
            // One more than asked tells whether there is a next page.
            let mut taids =
                flow::credentials(&*app, &service, asked.page_token.clone(), limit + 1).await?;
            let next = (taids.len() > limit).then(|| {
                taids.truncate(limit);
                taids.last().cloned()
            });
            let mut out = json!({"credentialIDs": taids});
            if let Some(Some(token)) = next {
                out["nextPageToken"] = json!(token);
            }
            Ok(Reply::ok(&out))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InfoBody {
    #[serde(rename = "credentialID")]
    credential_id: String,
    certificates: Option<String>,
    cert_info: Option<bool>,
    auth_info: Option<bool>,
    lang: Option<String>,
    client_data: Option<String>,
}

/// The signature algorithms (OIDs) of a key, and its length in bits.
fn key_algorithms(key_algorithm: &str) -> (Vec<&'static str>, u32, Option<&'static str>) {
    match key_algorithm {
        "ec-p256" => (
            vec![
                "1.2.840.10045.4.3.2",
                "1.2.840.10045.4.3.3",
                "1.2.840.10045.4.3.4",
            ],
            256,
            Some("1.2.840.10045.3.1.7"),
        ),
        "ec-p384" => (
            vec![
                "1.2.840.10045.4.3.3",
                "1.2.840.10045.4.3.4",
                "1.2.840.10045.4.3.2",
            ],
            384,
            Some("1.3.132.0.34"),
        ),
        "rsa-3072" => (
            vec![
                "1.2.840.113549.1.1.11",
                "1.2.840.113549.1.1.12",
                "1.2.840.113549.1.1.13",
            ],
            3072,
            None,
        ),
        _ => (
            vec![
                "1.2.840.113549.1.1.11",
                "1.2.840.113549.1.1.12",
                "1.2.840.113549.1.1.13",
            ],
            2048,
            None,
        ),
    }
}

/// `POST /csc/v1/credentials/info`.
pub(crate) async fn credential_info(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let asked: InfoBody = match body(&ctx) {
        Ok(asked) => asked,
        Err(reply) => return Ok(reply),
    };
    let _ = (&asked.auth_info, &asked.lang, &asked.client_data);
    let chain = match asked.certificates.as_deref().unwrap_or("single") {
        "none" => 0,
        "single" => 1,
        "chain" => usize::MAX,
        _ => {
            return Ok(invalid(
                "Invalid parameter certificates: none, single or chain",
            ));
        }
    };
    let now = app.clock.now();
    answer(
        async {
            let credential = flow::credential(&*app, &service, &asked.credential_id, now).await?;
            let record = &credential.certificate;
            let (algo, len, curve) = key_algorithms(&record.key_algorithm);
            let mut certificates = Vec::new();
            if chain > 0 {
                certificates.push(STANDARD.encode(&credential.der));
                if chain > 1 {
                    certificates.extend(app.signing.chain_der.iter().map(|d| STANDARD.encode(d)));
                }
            }
            let mut cert = json!({
                "status": credential.status.as_str(),
                "certificates": certificates,
            });
            if asked.cert_info == Some(true) {
                cert["serialNumber"] = json!(record.serial.as_str());
                cert["validFrom"] = json!(rfc3339(record.not_before));
                cert["validTo"] = json!(rfc3339(record.not_after));
            }
            let mut key = json!({
                "status": if record.key_ref.is_some() { "enabled" } else { "disabled" },
                "algo": algo,
                "len": len,
            });
            if let Some(curve) = curve {
                key["curve"] = json!(curve);
            }
            Ok(Reply::ok(&json!({
                "description": "the user's iAM Smart-Cert; each signature is approved in the app",
                "key": key,
                "cert": cert,
                "authMode": "implicit",
                "SCAL": "2",
                "multisign": app.signing.max_batch,
                "lang": "en-US",
            })))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizeBody {
    #[serde(rename = "credentialID")]
    credential_id: String,
    num_signatures: usize,
    hash: Option<Vec<String>>,
    #[serde(rename = "PIN")]
    pin: Option<String>,
    #[serde(rename = "OTP")]
    otp: Option<String>,
    description: Option<String>,
    client_data: Option<String>,
}

/// `POST /csc/v1/credentials/authorize`: a signing request for exactly these hashes, approved
/// in the user's app; the SAD activates only its signatures.
pub(crate) async fn authorize(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let asked: AuthorizeBody = match body(&ctx) {
        Ok(asked) => asked,
        Err(reply) => return Ok(reply),
    };
    let _ = &asked.client_data;
    if asked.pin.is_some() || asked.otp.is_some() {
        return Ok(invalid(
            "PIN and OTP are not used: the user authorises in the iAM Smart app (authMode implicit)",
        ));
    }
    // SCAL 2: the SAD is bound to the hashes, so they come now.
    let Some(hashes) = asked.hash.as_deref() else {
        return Ok(invalid("Missing parameter hash (SCAL 2)"));
    };
    if hashes.len() != asked.num_signatures {
        return Ok(invalid("Invalid parameter numSignatures: one per hash"));
    }
    let hashes = match decode_hashes(hashes) {
        Ok(hashes) => hashes,
        Err(reply) => return Ok(reply),
    };
    let actor = ctx.caller.to_string();
    let now = app.clock.now();
    answer(
        async {
            let authorized = flow::authorize(
                &*app,
                &app.signing,
                &actor,
                Authorize {
                    service,
                    taid: asked.credential_id.clone(),
                    hashes,
                    description: asked.description.clone(),
                },
                now,
            )
            .await?;
            Ok(Reply::ok(&json!({
                "SAD": authorized.sad,
                "expiresIn": authorized.expires_in,
                "request_id": authorized.request.id.as_str(),
                "identification_code": authorized.request.identification_code,
            })))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignHashBody {
    #[serde(rename = "credentialID")]
    credential_id: String,
    #[serde(rename = "SAD")]
    sad: String,
    hash: Vec<String>,
    hash_algo: Option<String>,
    sign_algo: String,
    sign_algo_params: Option<String>,
    client_data: Option<String>,
}

/// `POST /csc/v1/signatures/signHash`: the raw signatures, once the user approved.
pub(crate) async fn sign_hash(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let service = service_of(&ctx)?;
    let asked: SignHashBody = match body(&ctx) {
        Ok(asked) => asked,
        Err(reply) => return Ok(reply),
    };
    let _ = (&asked.hash_algo, &asked.client_data);
    // The key decides the signature; an algorithm no key of the appliance has is refused.
    const SIGN_ALGOS: &[&str] = &[
        "1.2.840.10045.2.1",
        "1.2.840.10045.4.3.2",
        "1.2.840.10045.4.3.3",
        "1.2.840.10045.4.3.4",
        "1.2.840.113549.1.1.1",
        "1.2.840.113549.1.1.11",
        "1.2.840.113549.1.1.12",
        "1.2.840.113549.1.1.13",
    ];
    if !SIGN_ALGOS.contains(&asked.sign_algo.as_str()) {
        return Ok(invalid("Invalid parameter signAlgo"));
    }
    if asked.sign_algo_params.is_some() {
        return Ok(invalid(
            "Invalid parameter signAlgoParams: not used by these keys",
        ));
    }
    let hashes = match decode_hashes(&asked.hash) {
        Ok(hashes) => hashes,
        Err(reply) => return Ok(reply),
    };
    let actor = ctx.caller.to_string();
    let started = tokio::time::Instant::now();
    loop {
        let outcome = flow::sign_hash(
            &*app,
            &actor,
            &service,
            &asked.credential_id,
            &asked.sad,
            &hashes,
            app.clock.now(),
        )
        .await;
        let refusal = match outcome {
            Ok(SignOutcome::Signed(signatures)) => {
                let list: Vec<Value> = signatures
                    .iter()
                    .map(|signature| json!(STANDARD.encode(signature)))
                    .collect();
                return Ok(Reply::ok(&json!({"signatures": list})));
            }
            Ok(SignOutcome::Waiting) if started.elapsed() < SIGN_WAIT => {
                tokio::time::sleep(SIGN_POLL).await;
                continue;
            }
            Ok(SignOutcome::Waiting) => {
                return Ok(invalid(
                    "the user has not approved the request yet; call signHash again",
                ));
            }
            Ok(SignOutcome::Refused(refusal)) => refusal,
            Err(error) => return answer(Err(error)),
        };
        let description = match refusal {
            CscRefusal::InvalidSad => "Invalid parameter SAD".to_owned(),
            CscRefusal::OtherHashes => {
                "Invalid parameter hash: not the hashes the SAD authorises".to_owned()
            }
            CscRefusal::Used => "SAD already used".to_owned(),
            CscRefusal::Expired => "SAD expired".to_owned(),
            other => other.to_string(),
        };
        return Ok(invalid(description));
    }
}
