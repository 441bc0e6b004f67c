//! The daemon's side of the CA: the CMP client that issues and revokes certificates, and the
//! status check (OCSP, then the CRL) that every signature waits for. The CA itself is remote in
//! production; in development it is the embedded CA this daemon hosts ([`crate::ca_http`]),
//! reached through the same protocols.

use std::sync::Arc;
use std::time::Duration;

use ca_bridge::cmp::{ClientProtection, CmpClient, CmpClientConfig};
use ca_bridge::status::{StatusChecker, StatusPolicy};
use ca_bridge::transport::HttpTransport;
use der::{DecodePem, Encode};
use hsm_adapter::Hsm;
use secrecy::SecretSlice;
use x509_cert::Certificate;

use crate::config::Config;
use crate::metrics::StatusMetrics;

/// How the daemon reaches its CA.
#[derive(Debug)]
pub(crate) struct CaLink {
    pub(crate) cmp: CmpClient,
    pub(crate) status: StatusChecker,
    /// The issuing CA and root, PEM, for signing results.
    pub(crate) chain_pem: Vec<String>,
    /// The issuing CA and root, DER, for the CMS certificates.
    pub(crate) chain_der: Vec<Vec<u8>>,
}

/// Reads the CA certificates and the CMP protection settings and makes the clients.
pub(crate) fn connect(
    config: &Config,
    hsm: Arc<Hsm>,
    observer: Arc<StatusMetrics>,
) -> Result<CaLink, String> {
    let issuing = read_certificate("ca.issuing_certificate", &config.ca.issuing_certificate)?;
    let root = read_certificate("ca.root_certificate", &config.ca.root_certificate)?;
    let protection = match (&config.ca.ra_certificate, &config.ca.pbm_secret_file) {
        (Some(path), _) => ClientProtection::Signature {
            certificate_der: read_certificate("ca.ra_certificate", path)?,
            extra_certs_der: vec![issuing.clone()],
        },
        (None, Some(_)) => ClientProtection::Pbm {
            reference: config
                .ca
                .pbm_reference
                .clone()
                .unwrap_or_default()
                .into_bytes(),
            secret: secret_file(config)?,
        },
        (None, None) => return Err("no CMP protection is configured".into()),
    };
    let transport = HttpTransport::new(Duration::from_secs(config.ca.timeout_seconds))
        .map_err(|error| error.to_string())?;
    let cmp = CmpClient::new(
        hsm,
        transport.clone(),
        CmpClientConfig {
            url: config.ca.cmp_url.clone(),
            organisation: config.ca.organisation.clone(),
            adult_policy_oid: config.ca.adult_policy_oid.clone(),
            minor_policy_oid: config.ca.minor_policy_oid.clone(),
            protection,
            trusted_der: vec![issuing.clone(), root.clone()],
        },
    )
    .map_err(|error| format!("cannot set up the CMP client: {error}"))?;
    let max_age = Duration::from_secs(config.status.max_age_seconds);
    let status = StatusChecker::new(
        transport,
        issuing.clone(),
        StatusPolicy {
            max_age,
            grace: (config.status.on_unavailable == "grace")
                .then(|| Duration::from_secs(config.status.grace_seconds)),
            timeout: Duration::from_secs(config.ca.timeout_seconds),
            ocsp_url: config.status.ocsp_url.clone(),
            crl_url: config.status.crl_url.clone(),
            first: if config.status.first == "crl" {
                ca_bridge::status::StatusSource::Crl
            } else {
                ca_bridge::status::StatusSource::Ocsp
            },
        },
        observer,
    )
    .map_err(|error| format!("cannot set up the status checker: {error}"))?;
    let chain_der = vec![issuing, root];
    let chain_pem = chain_der
        .iter()
        .map(|der| application::pem("CERTIFICATE", der))
        .collect();
    Ok(CaLink {
        cmp,
        status,
        chain_pem,
        chain_der,
    })
}

fn read_certificate(name: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    let text =
        std::fs::read(path).map_err(|error| format!("{name} {}: {error}", path.display()))?;
    Certificate::from_pem(&text)
        .and_then(|certificate| certificate.to_der())
        .map_err(|error| {
            format!(
                "{name} {} is not a PEM certificate: {error}",
                path.display()
            )
        })
}

/// The PBM shared secret of `ca.pbm_secret_file` (first line).
pub(crate) fn secret_file(config: &Config) -> Result<SecretSlice<u8>, String> {
    let name = "ca.pbm_secret_file";
    let Some(path) = &config.ca.pbm_secret_file else {
        return Err(format!("{name} is not set"));
    };
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {name} {}: {error}", path.display()))?,
    );
    let secret = text.lines().next().unwrap_or_default().trim();
    if secret.is_empty() {
        return Err(format!("{name} {} is empty", path.display()));
    }
    Ok(SecretSlice::from(secret.as_bytes().to_vec()))
}
