//! The embedded CA this daemon hosts (`[ca.embedded]`; `--dev` sets it up), on its own
//! plain-HTTP listener: CMP (RFC 6712), OCSP (RFC 6960 appendix A, GET and POST), the CRL, and the
//! CA certificates. The daemon's own CMP client and status checker reach it through this
//! listener like any other CA.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ca_bridge::cmp::{CmpServer, CmpServerConfig};
use ca_bridge::transport::{CMP_CONTENT_TYPE, CRL_CONTENT_TYPE, OCSP_RESPONSE_CONTENT_TYPE};
use ca_bridge::{CaProfileConfig, EmbeddedCa};
use hsm_adapter::{Hsm, SystemKey};
use hyper::{Method, StatusCode};

use crate::config::{Config, EmbeddedCaConfig};

/// The answer to one request: status, content type, body.
pub(crate) type Answer = (StatusCode, &'static str, Vec<u8>);

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

    /// Answers one request at `now` (the daemon's clock, which `--dev` can move).
    pub(crate) async fn answer(
        &self,
        method: &Method,
        path: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Answer {
        match (method, path) {
            (&Method::POST, "/cmp") => (
                StatusCode::OK,
                CMP_CONTENT_TYPE,
                self.cmp.handle(body, now).await,
            ),
            (&Method::POST, "/ocsp") => self.ocsp(body, now).await,
            (&Method::GET, _) if path.starts_with("/ocsp/") => {
                match percent_decode(&path["/ocsp/".len()..])
                    .and_then(|text| STANDARD.decode(text).ok())
                {
                    Some(request) => self.ocsp(&request, now).await,
                    None => text(StatusCode::BAD_REQUEST, "not a base64 OCSP request\n"),
                }
            }
            (&Method::GET, "/crl") => match self.ca.crl(now, self.crl_validity).await {
                Ok(crl) => (StatusCode::OK, CRL_CONTENT_TYPE, crl),
                Err(error) => {
                    tracing::error!(%error, "cannot make the CRL");
                    text(StatusCode::SERVICE_UNAVAILABLE, "no CRL now\n")
                }
            },
            (&Method::GET, "/ca/root.pem") => pem(self.ca.root_pem()),
            (&Method::GET, "/ca/issuing.pem") => pem(self.ca.issuing_pem()),
            (&Method::GET, "/ca/chain.pem") => pem(&self.ca.chain_pem().concat()),
            (
                _,
                "/cmp" | "/ocsp" | "/crl" | "/ca/root.pem" | "/ca/issuing.pem" | "/ca/chain.pem",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
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

/// `%XX` escapes decoded (base64's `+`, `/` and `=` arrive escaped in OCSP GET paths).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn ocsp_get_paths_are_unescaped() {
        assert_eq!(
            percent_decode("MEow%2BAB%3D%3D").as_deref(),
            Some("MEow+AB==")
        );
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
    }
}
