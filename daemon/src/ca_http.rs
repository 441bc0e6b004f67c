//! The embedded CA this daemon hosts (`[ca.embedded]`; `--dev` sets it up), on its own
//! plain-HTTP listener: CMP (RFC 6712), OCSP (RFC 6960 appendix A, GET and POST), the CRL, and the
//! CA certificates. The daemon's own CMP client and status checker reach it through this
//! listener like any other CA.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{Extension, RawPathParams, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ca_bridge::cmp::{CmpServer, CmpServerConfig};
use ca_bridge::transport::{CMP_CONTENT_TYPE, CRL_CONTENT_TYPE, OCSP_RESPONSE_CONTENT_TYPE};
use ca_bridge::{CaProfileConfig, EmbeddedCa};
use hsm_adapter::{Hsm, SystemKey};

use crate::clock::DaemonClock;
use crate::config::{Config, EmbeddedCaConfig};
use crate::http::{BodyError, Peer, read_body};

/// The answer to one request: status, content type, body.
type Answer = (StatusCode, &'static str, Vec<u8>);

/// The largest CMP message taken: a PKIMessage with a P-384 or RSA-3072 request and its
/// protection is a few KiB.
const CMP_BODY: usize = 64 * 1024;
/// The largest OCSP request taken: a handful of CertIDs and a nonce fit in 1 KiB.
const OCSP_BODY: usize = 8 * 1024;

/// What the CA listener's handlers share.
#[derive(Clone, Debug)]
struct CaState {
    host: Arc<EmbeddedHost>,
    clock: Arc<DaemonClock>,
}

impl CaState {
    /// Now, on the daemon's clock (which `--dev` can move).
    fn now(&self) -> SystemTime {
        self.clock.now().into()
    }
}

/// The embedded CA listener's router: `POST /cmp`, `GET|POST /ocsp`, `GET /crl`,
/// `GET /ca/{root,issuing,chain}.pem`.
pub(crate) fn router(host: Arc<EmbeddedHost>, clock: Arc<DaemonClock>) -> Router {
    let pem_route = |pick: fn(&EmbeddedHost) -> String| {
        get(move |State(state): State<CaState>| async move { answer(pem(&pick(&state.host))) })
    };
    Router::new()
        .route("/cmp", post(cmp))
        .route("/ocsp", post(ocsp_post))
        .route("/ocsp/{*request}", get(ocsp_get))
        .route("/crl", get(crl))
        .route(
            "/ca/root.pem",
            pem_route(|host| host.ca.root_pem().to_owned()),
        )
        .route(
            "/ca/issuing.pem",
            pem_route(|host| host.ca.issuing_pem().to_owned()),
        )
        .route(
            "/ca/chain.pem",
            pem_route(|host| host.ca.chain_pem().concat()),
        )
        .fallback(|| async { answer(text(StatusCode::NOT_FOUND, "not found\n")) })
        .method_not_allowed_fallback(|| async {
            answer(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"))
        })
        .layer(axum::middleware::from_fn(crate::api::plain_context))
        .with_state(CaState { host, clock })
}

fn answer((status, content_type, body): Answer) -> Response {
    (status, [(CONTENT_TYPE, content_type)], body).into_response()
}

/// A request body under `limit`, or the plain-text refusal.
async fn body(peer: &Peer, body: Body, limit: usize) -> Result<Vec<u8>, Response> {
    read_body(body, limit, peer.body_timeout)
        .await
        .map(|bytes| bytes.to_vec())
        .map_err(|error| {
            let status = match error {
                BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
                BodyError::Broken => StatusCode::BAD_REQUEST,
            };
            answer((status, "text/plain", format!("{error}\n").into_bytes()))
        })
}

async fn cmp(
    State(state): State<CaState>,
    Extension(peer): Extension<Peer>,
    request: Body,
) -> Response {
    match body(&peer, request, CMP_BODY).await {
        Ok(message) => answer((
            StatusCode::OK,
            CMP_CONTENT_TYPE,
            state.host.cmp.handle(&message, state.now()).await,
        )),
        Err(refusal) => refusal,
    }
}

async fn ocsp_post(
    State(state): State<CaState>,
    Extension(peer): Extension<Peer>,
    request: Body,
) -> Response {
    match body(&peer, request, OCSP_BODY).await {
        Ok(request) => answer(state.host.ocsp(&request, state.now()).await),
        Err(refusal) => refusal,
    }
}

/// `GET /ocsp/{base64 of the DER request}` (RFC 6960 appendix A.1); the router has undone the
/// percent-escapes of `+`, `/` and `=`.
async fn ocsp_get(
    State(state): State<CaState>,
    params: Result<RawPathParams, RawPathParamsRejection>,
) -> Response {
    let request = params
        .ok()
        .as_ref()
        .and_then(|params| params.iter().next().map(|(_, value)| value.to_owned()))
        .filter(|text| text.len() <= OCSP_BODY * 4 / 3 + 4)
        .and_then(|text| STANDARD.decode(text).ok());
    match request {
        Some(request) => answer(state.host.ocsp(&request, state.now()).await),
        None => answer(text(StatusCode::BAD_REQUEST, "not a base64 OCSP request\n")),
    }
}

async fn crl(State(state): State<CaState>) -> Response {
    let host = &state.host;
    answer(match host.ca.crl(state.now(), host.crl_validity).await {
        Ok(crl) => (StatusCode::OK, CRL_CONTENT_TYPE, crl),
        Err(error) => {
            tracing::error!(%error, "cannot make the CRL");
            text(StatusCode::SERVICE_UNAVAILABLE, "no CRL now\n")
        }
    })
}

/// The hosted CA and its protocol handlers.
pub(crate) struct EmbeddedHost {
    ca: Arc<EmbeddedCa>,
    cmp: CmpServer,
    ocsp_validity: Duration,
    crl_validity: Duration,
}

impl std::fmt::Debug for EmbeddedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedHost")
            .field("dir", &self.ca.dir())
            .finish_non_exhaustive()
    }
}

impl EmbeddedHost {
    /// Opens the embedded CA (making its certificates on first start). When the daemon's RA
    /// certificate is configured but missing, the CA certifies the HSM's CMP client key: the
    /// operator's enrolment of the RA, done in-process because both run here.
    pub(crate) async fn open(
        config: &Config,
        embedded: &EmbeddedCaConfig,
        hsm: Arc<Hsm>,
        now: SystemTime,
    ) -> Result<EmbeddedHost, String> {
        let ca = EmbeddedCa::open(
            hsm.clone(),
            &embedded.dir,
            CaProfileConfig {
                adult_policy_oid: config.ca.adult_policy_oid.clone(),
                minor_policy_oid: config.ca.minor_policy_oid.clone(),
                ..CaProfileConfig::new(
                    config.ca.organisation.clone(),
                    embedded.ocsp_url.clone(),
                    embedded.crl_url.clone(),
                )
            },
            now,
        )
        .await
        .map_err(|error| format!("cannot open the embedded CA: {error}"))?;
        if let Some(path) = &config.ca.ra_certificate
            && !path.exists()
        {
            enrol_ra(&ca, &hsm, path, now).await?;
        }
        let pbm_secrets = match (&config.ca.pbm_reference, &config.ca.pbm_secret_file) {
            (Some(reference), Some(_)) => {
                vec![(
                    reference.clone().into_bytes(),
                    crate::ca::secret_file(config)?,
                )]
            }
            _ => Vec::new(),
        };
        let ca = Arc::new(ca);
        let cmp = CmpServer::new(
            Arc::clone(&ca),
            CmpServerConfig {
                pbm_secrets,
                default_validity: Duration::from_secs(
                    u64::from(config.policy.certificate_validity_days) * 86_400,
                ),
            },
        );
        // The CMP transactions of the previous run are gone: no certConf can come for a
        // certificate it issued and did not have confirmed.
        let revoked = cmp
            .settle_unconfirmed(now)
            .await
            .map_err(|error| format!("cannot settle unconfirmed certificates: {error}"))?;
        if revoked > 0 {
            tracing::warn!(
                revoked,
                "the embedded CA revoked certificates never confirmed"
            );
        }
        Ok(EmbeddedHost {
            ca,
            cmp,
            ocsp_validity: Duration::from_secs(embedded.ocsp_validity_seconds),
            crl_validity: Duration::from_secs(embedded.crl_validity_seconds),
        })
    }

    async fn ocsp(&self, request: &[u8], now: SystemTime) -> Answer {
        let response = self
            .ca
            .ocsp_response(request, now, self.ocsp_validity)
            .await;
        (StatusCode::OK, OCSP_RESPONSE_CONTENT_TYPE, response)
    }
}

async fn enrol_ra(ca: &EmbeddedCa, hsm: &Hsm, path: &Path, now: SystemTime) -> Result<(), String> {
    let key = hsm
        .system_public_key(SystemKey::CmpClient)
        .await
        .map_err(|error| format!("cannot read the CMP client key: {error}"))?;
    let issued = ca
        .issue_ra_certificate(key.as_der(), "smartsignd RA", now)
        .await
        .map_err(|error| format!("cannot certify the CMP client key: {error}"))?;
    std::fs::write(path, issued.to_pem())
        .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    tracing::info!(path = %path.display(), "RA certificate for CMP made by the embedded CA");
    Ok(())
}

fn pem(text: &str) -> Answer {
    (
        StatusCode::OK,
        "application/x-pem-file",
        text.as_bytes().to_vec(),
    )
}

fn text(status: StatusCode, body: &str) -> Answer {
    (status, "text/plain", body.as_bytes().to_vec())
}
