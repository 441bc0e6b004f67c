//! `smartsign-ctl provision`: an appliance's one-time provisioning from its provisioning
//! medium (README, "Appliance image"). The medium holds `provision.toml`; what provisioning
//! makes for the officers goes back onto the medium, under `out/`.
//!
//! - `profile = "production"`: the medium's `etc/` (smartsignd.toml and the files it names) is
//!   copied into the configuration directory and checked with `smartsignd --check-config`. The
//!   officers have run the key ceremony on the vendor's HSM (`ceremony init`).
//! - `profile = "development"`: the appliance makes its own SoftHSM token, system keys,
//!   embedded CA and TLS certificates (`smartsignd --dev --init-only`), one client certificate
//!   per officer, and splits the token's PINs into one share per officer; the PIN files and the
//!   TLS CA's key leave the appliance (the key onto the medium). The configuration names the
//!   quorum, so that every start is sealed.
//!
//! `smartsignd.toml` is written last, atomically: a daemon waiting for it
//! (`--wait-for-config`) starts only on a complete provisioning. An appliance is provisioned
//! once; a second run refuses.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use hsm_adapter::quorum;
use serde::Deserialize;

use crate::hsm_opts::read_secret;

/// Arguments of `provision`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "The medium (a FAT file system labelled SMARTSIGN; the appliance mounts it
and runs this command when it is inserted):
  provision.toml        profile = \"development\" or \"production\", and the officers:
                          profile = \"development\"
                          [officers]
                          names = [\"officer-1\", \"officer-2\", \"officer-3\"]
                          threshold = 2
  etc/                  production only: smartsignd.toml and the files it names, as they go
                        into the configuration directory
What it writes back (development), for the officers and the operator to take away:
  out/officers/NAME/    the officer's client certificate and key, their share of the user PIN
                        (unseal-share.txt) and of the SO PIN (so-pin-share.txt)
  out/clients/          the registrar's, gateway's, auditor's and demo services' certificates
  out/tls/ca.pem, ca.key   the TLS CA (its key is removed from the appliance)
  out/ca/root.pem       the embedded CA's root, for verifying signatures
  out/smartsignd.toml   the configuration as provisioned (no secret in it)

Example (what the appliance's smartsign-provision.service runs):
  smartsign-ctl provision --medium /run/smartsign/medium --config-dir /etc/smartsign \\
      --state-dir /var/lib/smartsign --user smartsign"
)]
pub(crate) struct ProvisionArgs {
    /// The mounted provisioning medium (holds provision.toml).
    #[arg(long, value_name = "DIR")]
    medium: PathBuf,
    /// The configuration directory to write (smartsignd.toml last).
    #[arg(long, value_name = "DIR", default_value = "/etc/smartsign")]
    config_dir: PathBuf,
    /// The daemon's state directory (development: the token, the stores, the certificates).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/smartsign")]
    state_dir: PathBuf,
    /// The system user the daemon runs as; its state is made as that user.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// The daemon's binary.
    #[arg(long, value_name = "FILE", default_value = "/usr/bin/smartsignd")]
    smartsignd: PathBuf,
    /// Development: the API listener (HTTPS, mutual TLS).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    api_listen: SocketAddr,
    /// Development: the operations listener (/readyz, /metrics).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    ops_listen: SocketAddr,
    /// Development: the embedded CA's listener (CMP, OCSP, CRL).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    ca_listen: SocketAddr,
}

/// `provision.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    profile: Profile,
    officers: Option<Officers>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Profile {
    Development,
    Production,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Officers {
    names: Vec<String>,
    threshold: usize,
}

type Failure = Box<dyn std::error::Error>;

pub(crate) fn run(args: ProvisionArgs) -> Result<(), Failure> {
    let config_file = args.config_dir.join("smartsignd.toml");
    if config_file.exists() {
        return Err(format!(
            "{} exists: this appliance is provisioned already (provisioning happens once; to \
             start again, re-image the appliance and wipe its state partition)",
            config_file.display()
        )
        .into());
    }
    let plan_file = args.medium.join("provision.toml");
    let text = std::fs::read_to_string(&plan_file)
        .map_err(|error| format!("cannot read {}: {error}", plan_file.display()))?;
    let plan: Plan =
        toml::from_str(&text).map_err(|error| format!("{}: {error}", plan_file.display()))?;
    let out = args.medium.join("out");
    if out.exists() {
        return Err(format!(
            "{} exists: a medium carries one provisioning's output; use a fresh medium",
            out.display()
        )
        .into());
    }
    std::fs::create_dir_all(&args.config_dir)
        .map_err(|error| format!("cannot create {}: {error}", args.config_dir.display()))?;
    let config = match plan.profile {
        Profile::Production => production(&args)?,
        Profile::Development => {
            let officers = plan
                .officers
                .ok_or("provision.toml: a development profile needs [officers] names, threshold")?;
            development(&args, &officers, &out)?
        }
    };
    // Last, and atomically: a waiting daemon starts when the file appears.
    let staged = args.config_dir.join(".smartsignd.toml.new");
    write_file(&staged, config.as_bytes(), 0o640)?;
    // The daemon's group reads the configuration; only root writes it.
    if let Some(user) = &args.user {
        let (_, gid) = system_user(user)?;
        for path in tree(&args.config_dir)? {
            std::os::unix::fs::chown(&path, Some(0), Some(gid))
                .map_err(|error| format!("cannot chown {}: {error}", path.display()))?;
        }
    }
    std::fs::rename(&staged, &config_file)
        .map_err(|error| format!("cannot write {}: {error}", config_file.display()))?;
    sync_dir(&args.config_dir)?;
    let profile = match plan.profile {
        Profile::Development => "development",
        Profile::Production => "production",
    };
    eprintln!(
        "provisioned ({profile} profile): {} written; the daemon starts sealed",
        config_file.display()
    );
    Ok(())
}

/// Copies the medium's `etc/` into the configuration directory (all but smartsignd.toml, which
/// is returned) and checks the whole with `smartsignd --check-config`.
fn production(args: &ProvisionArgs) -> Result<String, Failure> {
    let etc = args.medium.join("etc");
    let config_text = std::fs::read_to_string(etc.join("smartsignd.toml")).map_err(|error| {
        format!(
            "a production medium has etc/smartsignd.toml ({}: {error})",
            etc.display()
        )
    })?;
    let copied = copy_tree(&etc, &args.config_dir, &|relative| {
        relative != Path::new("smartsignd.toml")
    })?;
    // A medium that does not pass leaves nothing behind.
    let undo = || {
        for path in copied.iter().rev() {
            let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir(path));
        }
    };
    // Checked as it will be read: from the configuration directory.
    let trial = args.config_dir.join(".smartsignd.toml.check");
    write_file(&trial, config_text.as_bytes(), 0o640)?;
    let checked = Command::new(&args.smartsignd)
        .arg("--check-config")
        .arg(&trial)
        .output()
        .map_err(|error| format!("cannot run {}: {error}", args.smartsignd.display()));
    let _ = std::fs::remove_file(&trial);
    let checked = checked.inspect_err(|_| undo())?;
    if !checked.status.success() {
        undo();
        return Err(format!(
            "the medium's smartsignd.toml does not pass --check-config: {}",
            String::from_utf8_lossy(&checked.stderr).trim()
        )
        .into());
    }
    Ok(config_text)
}

/// Makes the development appliance's state, splits its PINs for the officers, writes what they
/// take onto the medium, and returns the sealed configuration.
fn development(args: &ProvisionArgs, officers: &Officers, out: &Path) -> Result<String, Failure> {
    let count = officers.names.len();
    if officers.threshold < 2 || officers.threshold > count {
        return Err(format!(
            "provision.toml: threshold {} must be at least 2 and at most the {count} officers",
            officers.threshold
        )
        .into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for name in &officers.names {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid || !seen.insert(name) {
            return Err(format!(
                "provision.toml: officer name {name:?} must be unique, 1 to 64 of A-Z a-z 0-9 - _"
            )
            .into());
        }
    }
    let owner = args.user.as_deref().map(system_user).transpose()?;
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|error| format!("cannot create {}: {error}", args.state_dir.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&args.state_dir, Some(uid), Some(gid))
            .map_err(|error| format!("cannot chown {}: {error}", args.state_dir.display()))?;
    }

    eprintln!(
        "making the token, system keys, embedded CA and TLS certificates (smartsignd --dev --init-only)"
    );
    // As the daemon's user, without root's groups (setpriv, from util-linux).
    let mut init = match &args.user {
        Some(user) => {
            let mut setpriv = Command::new("setpriv");
            setpriv
                .args(["--reuid", user, "--regid", user, "--clear-groups", "--"])
                .arg(&args.smartsignd);
            setpriv
        }
        None => Command::new(&args.smartsignd),
    };
    // On free loopback ports: a daemon waiting for the configuration holds the operations
    // port meanwhile. The configuration gets the real addresses.
    init.args(["--dev", "--init-only", "--state-dir"])
        .arg(&args.state_dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--ca-listen", "127.0.0.1:0"])
        .env_remove("SOFTHSM2_CONF");
    let status = init
        .status()
        .map_err(|error| format!("cannot run {}: {error}", args.smartsignd.display()))?;
    if !status.success() {
        return Err(format!("smartsignd --dev --init-only failed ({status}); see above").into());
    }

    let state = &args.state_dir;
    let mut pki = ca_bridge::dev_pki::DevPki::ensure(state)?;
    let user_pin = read_secret(&state.join("hsm/user.pin"))?;
    let so_pin = read_secret(&state.join("hsm/so.pin"))?;
    let user_shares = quorum::split(&user_pin, officers.threshold, count)?;
    let so_shares = quorum::split(&so_pin, officers.threshold, count)?;

    make_dir(out)?;
    let mut digests = Vec::with_capacity(count);
    for ((name, user_share), so_share) in officers.names.iter().zip(&user_shares).zip(&so_shares) {
        let dir = out.join("officers").join(name);
        make_dir(&dir)?;
        let client = pki.add_client("officer", name)?;
        copy_file(&client.cert, &dir.join("client.pem"), 0o644)?;
        copy_file(&client.key, &dir.join("client.key"), 0o600)?;
        remove(&client.key)?;
        let mut text = user_share.to_text();
        text.push('\n');
        write_file(&dir.join("unseal-share.txt"), text.as_bytes(), 0o600)?;
        let mut text = so_share.to_text();
        text.push('\n');
        write_file(&dir.join("so-pin-share.txt"), text.as_bytes(), 0o600)?;
        digests.push(user_share.digest().to_string());
        eprintln!("officer {name}: certificate and shares written");
    }
    let clients = out.join("clients");
    make_dir(&clients)?;
    for client in pki.clients.iter().filter(|client| client.role != "officer") {
        copy_file(
            &client.cert,
            &clients.join(format!("{}.pem", client.name)),
            0o644,
        )?;
        copy_file(
            &client.key,
            &clients.join(format!("{}.key", client.name)),
            0o600,
        )?;
        remove(&client.key)?;
    }
    make_dir(&out.join("tls"))?;
    copy_file(&pki.ca_cert, &out.join("tls/ca.pem"), 0o644)?;
    copy_file(&pki.ca_key, &out.join("tls/ca.key"), 0o600)?;
    make_dir(&out.join("ca"))?;
    for name in ["root.pem", "issuing.pem"] {
        copy_file(
            &state.join("ca").join(name),
            &out.join("ca").join(name),
            0o644,
        )?;
    }

    let config = sealed_config(args, officers.threshold, &digests)?;
    write_file(&out.join("smartsignd.toml"), config.as_bytes(), 0o644)?;
    sync_dir(out)?;
    // What rebuilds a PIN or mints a client certificate leaves the appliance.
    for secret in [
        state.join("hsm/user.pin"),
        state.join("hsm/so.pin"),
        pki.ca_key.clone(),
    ] {
        remove(&secret)?;
    }
    sync_dir(&state.join("hsm"))?;
    Ok(config)
}

/// The development configuration (`STATE/smartsignd.toml`) on the appliance's listeners, with
/// `[hsm.quorum]` in place of `hsm.pin_file`.
fn sealed_config(
    args: &ProvisionArgs,
    threshold: usize,
    digests: &[String],
) -> Result<String, Failure> {
    let dev_config = args.state_dir.join("smartsignd.toml");
    let text = std::fs::read_to_string(&dev_config)
        .map_err(|error| format!("cannot read {}: {error}", dev_config.display()))?;
    let mut config: toml::Table =
        toml::from_str(&text).map_err(|error| format!("{}: {error}", dev_config.display()))?;
    // The daemon reaches its own CA on loopback when it listens on every address.
    let ca_url = {
        let mut reach = args.ca_listen;
        if reach.ip().is_unspecified() {
            reach.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        format!("http://{reach}")
    };
    let settings = [
        ("server", "listen", args.api_listen.to_string()),
        ("server", "metrics_listen", args.ops_listen.to_string()),
        ("ca", "cmp_url", format!("{ca_url}/cmp")),
        ("status", "ocsp_url", format!("{ca_url}/ocsp")),
        ("status", "crl_url", format!("{ca_url}/crl")),
    ];
    for (section, key, value) in settings {
        table(&mut config, section, &dev_config)?.insert(key.into(), toml::Value::String(value));
    }
    let embedded = table(&mut config, "ca", &dev_config)?
        .get_mut("embedded")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| format!("{}: no [ca.embedded]", dev_config.display()))?;
    embedded.insert(
        "listen".into(),
        toml::Value::String(args.ca_listen.to_string()),
    );
    embedded.insert(
        "ocsp_url".into(),
        toml::Value::String(format!("{ca_url}/ocsp")),
    );
    embedded.insert(
        "crl_url".into(),
        toml::Value::String(format!("{ca_url}/crl")),
    );
    let hsm = table(&mut config, "hsm", &dev_config)?;
    hsm.remove("pin_file");
    let mut quorum = toml::Table::new();
    quorum.insert(
        "threshold".into(),
        toml::Value::Integer(i64::try_from(threshold)?),
    );
    quorum.insert(
        "share_digests".into(),
        toml::Value::Array(digests.iter().cloned().map(toml::Value::String).collect()),
    );
    hsm.insert("quorum".into(), toml::Value::Table(quorum));
    let body = toml::to_string_pretty(&config)?;
    Ok(format!(
        "# Written by `smartsign-ctl provision` (development profile). The HSM opens when \
         {threshold} officers\n# give their shares (POST /v1/admin/unseal).\n\n{body}"
    ))
}

fn table<'a>(
    config: &'a mut toml::Table,
    section: &str,
    file: &Path,
) -> Result<&'a mut toml::Table, Failure> {
    config
        .get_mut(section)
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| format!("{}: no [{section}]", file.display()).into())
}

/// The uid and gid of system user `name`, from /etc/passwd.
fn system_user(name: &str) -> Result<(u32, u32), Failure> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|error| format!("cannot read /etc/passwd: {error}"))?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .ok_or_else(|| format!("no system user {name} in /etc/passwd").into())
}

/// Every file and directory under `dir`.
fn tree(dir: &Path) -> Result<Vec<PathBuf>, Failure> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|error| format!("cannot read {}: {error}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            }
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Copies the files under `from` into `to`, keeping the tree, those `keep` says; returns what
/// it made, in order.
fn copy_tree(
    from: &Path,
    to: &Path,
    keep: &dyn Fn(&Path) -> bool,
) -> Result<Vec<PathBuf>, Failure> {
    let mut made = Vec::new();
    for path in tree(from)? {
        let relative = path.strip_prefix(from)?;
        let target = to.join(relative);
        if path.is_dir() {
            if !target.exists() {
                make_dir(&target)?;
                made.push(target);
            }
        } else if keep(relative) {
            copy_file(&path, &target, 0o640)?;
            made.push(target);
        }
    }
    Ok(made)
}

fn make_dir(path: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(path)
        .map_err(|error| format!("cannot create {}: {error}", path.display()).into())
}

fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<(), Failure> {
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(from).map_err(|error| format!("cannot read {}: {error}", from.display()))?,
    );
    write_file(to, &bytes, mode)
}

/// Writes `bytes` to a new file `path` with `mode`, synced.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Failure> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| format!("cannot write {}: {error}", path.display()).into())
}

/// Overwrites a secret file with zeros, then removes it.
fn remove(path: &Path) -> Result<(), Failure> {
    let length = std::fs::metadata(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?
        .len();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    file.write_all(&vec![0; usize::try_from(length)?])
        .and_then(|()| file.sync_all())
        .map_err(|error| format!("cannot overwrite {}: {error}", path.display()))?;
    std::fs::remove_file(path)
        .map_err(|error| format!("cannot remove {}: {error}", path.display()).into())
}

fn sync_dir(path: &Path) -> Result<(), Failure> {
    std::fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| format!("cannot sync {}: {error}", path.display()).into())
}
