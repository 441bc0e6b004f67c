//! `smartsignd --dev --state-dir DIR` (API.md, last section): everything a developer needs on one
//! machine, made on first start and reused after.
//!
//! ```text
//! DIR/hsm/            SoftHSM token `smartsign-dev` (softhsm2.conf, user.pin, so.pin)
//! DIR/tls/ca.pem      root of the server and client certificates
//! DIR/tls/server.*    the API's server certificate (localhost, 127.0.0.1, ::1)
//! DIR/clients/NAME.*  client certificates: registrar, gateway, officer, auditor, demo-a, demo-b
//! DIR/ca/root.pem     the embedded CA's root (its keys are in the token), issuing.pem, and
//!                     cmp-client.pem: the daemon's RA certificate for CMP signature protection
//! DIR/smartsign.sqlite, DIR/audit/   the store and the audit log
//! DIR/smartsignd.toml the configuration this run uses, as an example for production
//! DIR/endpoints.json  where the listeners are, written after binding
//! ```
//!
//! SoftHSM reads `SOFTHSM2_CONF` when the module loads, and a running process cannot safely set
//! its own environment, so the first process makes the token and replaces itself (exec) with
//! the same command and that variable set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{
    AuditConfig, CaConfig, Config, EmbeddedCaConfig, HsmSection, LoggingConfig, PolicyConfig,
    ServerConfig, StatusConfig, StoreConfig,
};

/// The token's label.
pub(crate) const TOKEN_LABEL: &str = "smartsign-dev";
/// The daemon's RA certificate, made by the embedded CA on first start (the CA operator's
/// enrolment of the RA, done in-process because both run here).
pub(crate) const RA_CERTIFICATE: &str = "ca/cmp-client.pem";

/// The SoftHSM set-up script: `SMARTSIGN_SOFTHSM_SETUP` when set, else the one in the source tree
/// this binary was built from.
fn setup_script() -> PathBuf {
    std::env::var_os("SMARTSIGN_SOFTHSM_SETUP")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../softhsm-config/softhsm-setup"
            ))
        })
}

/// Where a state directory keeps its token configuration.
pub(crate) fn softhsm_conf(state_dir: &Path) -> PathBuf {
    state_dir.join("hsm").join("softhsm2.conf")
}

/// Makes the state directory and its token (idempotent). Returns whether this process must run
/// itself again with `SOFTHSM2_CONF` pointing at the token.
pub(crate) fn prepare(state_dir: &Path) -> Result<bool, String> {
    std::fs::create_dir_all(state_dir)
        .map_err(|error| format!("cannot create {}: {error}", state_dir.display()))?;
    let conf = softhsm_conf(state_dir);
    let wanted = std::fs::canonicalize(state_dir)
        .map(|dir| softhsm_conf(&dir))
        .unwrap_or(conf.clone());
    if std::env::var_os("SOFTHSM2_CONF").is_some_and(|current| current == wanted.as_os_str()) {
        return Ok(false);
    }
    let hsm = state_dir.join("hsm");
    eprintln!(
        "smartsignd: preparing the SoftHSM token {TOKEN_LABEL} in {}",
        hsm.display()
    );
    let status = Command::new(setup_script())
        .arg("token")
        .arg("--dir")
        .arg(&hsm)
        .args(["--label", TOKEN_LABEL])
        .arg("--so-pin-file")
        .arg(hsm.join("so.pin"))
        .arg("--pin-file")
        .arg(hsm.join("user.pin"))
        .status()
        .map_err(|error| {
            format!(
                "cannot run {} (install SoftHSM with `softhsm-config/softhsm-setup install`): \
                 {error}",
                setup_script().display()
            )
        })?;
    if !status.success() {
        return Err(format!(
            "softhsm-setup could not prepare the token ({status})"
        ));
    }
    Ok(true)
}

/// Replaces this process with the same command, `SOFTHSM2_CONF` set to the token's
/// configuration. (Replacing, not spawning, keeps one process to signal and to wait for.)
/// Returns only if that fails.
pub(crate) fn rerun_with_token(state_dir: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let dir = match std::fs::canonicalize(state_dir) {
        Ok(dir) => dir,
        Err(error) => return error.to_string(),
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => return error.to_string(),
    };
    let error = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", softhsm_conf(&dir))
        .exec();
    format!("cannot run smartsignd again: {error}")
}

/// The configuration of a development run. Listener addresses come from the command line.
pub(crate) fn config(
    state_dir: &Path,
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    ca_address: SocketAddr,
) -> Config {
    Config {
        server: ServerConfig {
            listen,
            metrics_listen,
            tls_certificate: state_dir.join("tls/server.pem"),
            tls_private_key: state_dir.join("tls/server.key"),
            client_ca: state_dir.join("tls/ca.pem"),
            client_crl: None,
            allowed_names: Default::default(),
            shutdown_grace_seconds: 10,
            limits: Default::default(),
            client_limits: Default::default(),
        },
        hsm: HsmSection {
            module: hsm_adapter::SOFTHSM_MODULE.into(),
            token_label: Some(TOKEN_LABEL.into()),
            token_serial: None,
            pin_file: Some(state_dir.join("hsm/user.pin")),
            quorum: None,
            key_mode: "wrapped".into(),
            workers: None,
            worker_cpus: None,
            ceremony_transcript: None,
            // Development machines may not allow it; `--dev` warns and goes on.
            lock_memory: true,
        },
        store: StoreConfig::sqlite(state_dir.join("smartsign.sqlite")),
        audit: AuditConfig {
            dir: state_dir.join("audit"),
            origin: "smartsign-dev".into(),
            checkpoint_interval_seconds: 60,
        },
        ca: CaConfig {
            cmp_url: format!("http://{ca_address}/cmp"),
            issuing_certificate: state_dir.join("ca/issuing.pem"),
            root_certificate: state_dir.join("ca/root.pem"),
            ra_certificate: Some(state_dir.join(RA_CERTIFICATE)),
            pbm_reference: None,
            pbm_secret_file: None,
            timeout_seconds: 10,
            organisation: "smartsign development CA".into(),
            adult_policy_oid: ca_bridge::DEFAULT_ADULT_POLICY_OID.into(),
            minor_policy_oid: ca_bridge::DEFAULT_MINOR_POLICY_OID.into(),
            embedded: Some(EmbeddedCaConfig {
                dir: state_dir.join("ca"),
                listen: ca_address,
                ocsp_url: format!("http://{ca_address}/ocsp"),
                crl_url: format!("http://{ca_address}/crl"),
                ocsp_validity_seconds: 600,
                crl_validity_seconds: 3600,
            }),
        },
        // The listener's port may differ from the one in certificates of an earlier start.
        status: StatusConfig {
            ocsp_url: Some(format!("http://{ca_address}/ocsp")),
            crl_url: Some(format!("http://{ca_address}/crl")),
            ..StatusConfig::default()
        },
        policy: PolicyConfig::default(),
        logging: LoggingConfig::default(),
    }
}

/// Writes `DIR/smartsignd.toml` (the configuration in use, for reference).
pub(crate) fn write_config(state_dir: &Path, config: &Config) -> Result<(), String> {
    let text = toml::to_string_pretty(config).map_err(|error| error.to_string())?;
    let header = "# Written by `smartsignd --dev` at each start: the configuration of this \
                  development run.\n# `smartsignd --check-config FILE` checks a file like it.\n\n";
    std::fs::write(state_dir.join("smartsignd.toml"), format!("{header}{text}"))
        .map_err(|error| format!("cannot write smartsignd.toml: {error}"))
}

/// Writes `endpoints.json` atomically and prints the how-to.
pub(crate) fn announce(
    state_dir: &Path,
    api: SocketAddr,
    metrics: SocketAddr,
    ca: SocketAddr,
) -> Result<(), String> {
    let endpoints = serde_json::json!({
        "api": format!("https://{api}"),
        "metrics": format!("http://{metrics}"),
        "ca": format!("http://{ca}"),
    });
    let path = state_dir.join("endpoints.json");
    let temporary = state_dir.join("endpoints.json.tmp");
    std::fs::write(&temporary, format!("{endpoints}\n"))
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    let dir = std::fs::canonicalize(state_dir).unwrap_or(state_dir.to_path_buf());
    let dir = dir.display();
    let curl = |who: &str| {
        format!(
            "curl -sS --cacert {dir}/tls/ca.pem --cert {dir}/clients/{who}.pem \
             --key {dir}/clients/{who}.key"
        )
    };
    println!(
        "smartsignd (development mode) is ready; state in {dir}

  API      https://{api}   (mutual TLS; client certificates in {dir}/clients)
  metrics  http://{metrics}/metrics   readiness: http://{metrics}/readyz
  CA       http://{ca}   (root: {dir}/ca/root.pem)

Try it:
  # register an iAM Smart+ account (example body with a demo device key):
  {registrar} -H 'content-type: application/json' \\
      --data @{dir}/examples/register.json https://{api}/v1/accounts
  # its TAID at the service demo-a:
  {registrar} 'https://{api}/v1/accounts/u-demo-1/taid?service=demo-a'
  # the signed audit checkpoint:
  {auditor} https://{api}/v1/audit/checkpoint
  curl -sS http://{metrics}/readyz

The device key of the example is {dir}/examples/device.key; the README walks through a signature.
Stop with Ctrl-C: in-flight requests finish and a checkpoint is written.",
        registrar = curl("registrar"),
        auditor = curl("auditor"),
    );
    Ok(())
}

/// Writes `DIR/examples/` once: a demo device key pair and a registration body that uses it.
/// The person is fictional, and the HKIC number is a made-up one with a valid check digit.
pub(crate) fn write_examples(state_dir: &Path) -> Result<(), String> {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let dir = state_dir.join("examples");
    if dir.join("register.json").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|error| error.to_string())?;
    let public = key
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|error| error.to_string())?;
    write_private(&dir.join("device.key"), private.as_bytes())?;
    std::fs::write(dir.join("device.pub.pem"), &public).map_err(|error| error.to_string())?;
    let body = serde_json::json!({
        "account_id": "u-demo-1",
        "tier": "iam_smart_plus",
        "surname": "CHAN",
        "given_name": "Tai Man",
        "date_of_birth": "1990-01-01",
        "hkic_number": "A1234563",
        "device_public_key": public,
    });
    std::fs::write(
        dir.join("register.json"),
        serde_json::to_string_pretty(&body).map_err(|error| error.to_string())?,
    )
    .map_err(|error| error.to_string())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(bytes))
        .map_err(|error| format!("cannot write {}: {error}", path.display()))
}
