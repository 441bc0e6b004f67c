//! `smartsign-ctl ceremony split`: the key ceremony that turns the HSM user PIN into the
//! officers' unseal shares and prints the `[hsm.quorum]` section for the daemon.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hsm_adapter::quorum;
use sha2::Digest as _;

use crate::hsm_opts::read_secret;

/// Arguments of `ceremony split`.
#[derive(Debug, clap::Args)]
#[command(after_help = "What it does:
  The user PIN (first line of --pin-file) is padded to 64 bytes with random bytes and split with
  Shamir's scheme into N shares, any K of which rebuild it; K-1 shares reveal nothing. Each share
  goes to DIR/share-<i>.txt (mode 0600): hand one file to each officer, who keeps it offline.
  The command prints the [hsm.quorum] section to put in smartsignd.toml in place of pin_file:
  it lists only the SHA-256 digest of each share, so the daemon's configuration holds nothing
  that rebuilds the PIN.

Afterwards:
  1. Put the printed section in the configuration, remove hsm.pin_file, and check it:
       smartsignd --check-config /etc/smartsign/smartsignd.toml
  2. Destroy the PIN file and the share files' copies on this machine once each officer has
     theirs (shred -u DIR/share-*.txt).
  3. At each start the daemon serves sealed until K officers send their share to
     POST /v1/admin/unseal, each with their own client certificate, from the file (or standard
     input), never on a command line:
       smartsign-ctl unseal --url https://appliance:8443 --cert officer.pem --key officer.key \\
           --ca ca.pem --share-file share-1.txt

Example:
  smartsign-ctl ceremony split --pin-file user.pin --threshold 2 --shares 3 --out-dir shares/")]
pub(crate) struct SplitArgs {
    /// File holding the HSM user PIN (its first line), as `keys init` reads it.
    #[arg(long, value_name = "FILE")]
    pin_file: PathBuf,
    /// How many shares rebuild the PIN (K, at least 2).
    #[arg(long, value_name = "K")]
    threshold: usize,
    /// How many shares to make (N, K to 255): one per officer.
    #[arg(long, value_name = "N")]
    shares: usize,
    /// The directory for share-1.txt ... share-N.txt (created if missing; existing share files
    /// are not overwritten).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

pub(crate) fn split(args: SplitArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.threshold < 2 {
        return Err("--threshold must be at least 2: one officer alone must not unseal".into());
    }
    if args.threshold > args.shares {
        return Err(format!(
            "--threshold {} is more than --shares {}: the PIN could never be rebuilt",
            args.threshold, args.shares
        )
        .into());
    }
    if args.shares > 255 {
        return Err("--shares must be at most 255 (one byte names a share's point)".into());
    }
    let pin = read_secret(&args.pin_file)?;
    eprintln!(
        "splitting the PIN of {} into {} shares, any {} of which rebuild it",
        args.pin_file.display(),
        args.shares,
        args.threshold
    );
    let shares = quorum::split(&pin, args.threshold, args.shares)?;
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|error| format!("cannot create {}: {error}", args.out_dir.display()))?;
    let path_of = |index: u8| args.out_dir.join(format!("share-{index}.txt"));
    if let Some(existing) = shares
        .iter()
        .map(|s| path_of(s.index()))
        .find(|p| p.exists())
    {
        return Err(format!(
            "{} exists; a share file is never overwritten: choose an empty --out-dir",
            existing.display()
        )
        .into());
    }
    let mut digests = Vec::with_capacity(shares.len());
    for share in &shares {
        let path = path_of(share.index());
        let mut text = share.to_text();
        text.push('\n');
        write_new_private(&path, text.as_bytes())?;
        let digest = share.digest().to_string();
        eprintln!("wrote {} (digest {digest})", path.display());
        digests.push(digest);
    }
    eprintln!(
        "\nPut this in smartsignd.toml, in place of hsm.pin_file (the digests are not secret):\n"
    );
    println!("[hsm.quorum]");
    println!("threshold = {}", args.threshold);
    println!("share_digests = [");
    for digest in &digests {
        println!("    \"{digest}\",");
    }
    println!("]");
    eprintln!(
        "\nGive each officer one share file and delete the copies here; the daemon will wait \
         sealed for {} of them at each start (POST /v1/admin/unseal).",
        args.threshold
    );
    Ok(())
}

/// Writes a file that must not exist yet, readable by its owner only.
fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| {
            format!(
                "cannot create {} ({error}); a share file is never overwritten: choose an \
                 empty --out-dir",
                path.display()
            )
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| format!("cannot write {}: {error}", path.display()).into())
}

/// Arguments of `ceremony init`.
#[derive(Debug, clap::Args)]
#[command(after_help = "What it does, each step in the transcript with its time:
  1. Initialises the token LABEL on a free slot (or, with --take-token-so-pin-file, takes the
     initialised token LABEL over) and sets its SO PIN and user PIN to values drawn from the
     HSM's own generator. No PIN is ever typed, shown, or put on a command line or in a file.
  2. Creates the system keys with their templates (the key-encryption key with its unwrap and
     wrap templates, as the security officer).
  3. Splits the user PIN and the SO PIN, each into one share per officer, any K of which
     rebuild it: DIR/<officer>.user-pin-share.txt and DIR/<officer>.so-pin-share.txt (0600).
  4. Writes DIR/transcript.json: the token, every system key's attributes as read back from the
     HSM, public-key fingerprints, share digests and the officers, signed with the audit key.
  5. Prints the [hsm] lines for smartsignd.toml: the token, the quorum, the transcript.

Afterwards: hand each officer their two files, delete the copies here (shred -u), and check the
token against the transcript at any time with `smartsign-ctl ceremony verify`.

Example:
  smartsign-ctl ceremony init --token smartsign --officer officer-1 --officer officer-2 \\
      --officer officer-3 --threshold 2 --out-dir ceremony/")]
pub(crate) struct InitArgs {
    /// The PKCS#11 module.
    #[arg(long, env = "SMARTSIGN_PKCS11_MODULE", default_value = hsm_adapter::SOFTHSM_MODULE)]
    module: PathBuf,
    /// The token's label.
    #[arg(long)]
    token: String,
    /// Take over the initialised token LABEL, whose current SO PIN is in this file, instead of
    /// initialising a free slot; both its PINs are replaced.
    #[arg(long, value_name = "FILE")]
    take_token_so_pin_file: Option<PathBuf>,
    /// An officer, by id (one option each, at least two): gets one share of each PIN.
    #[arg(long = "officer", value_name = "ID", required = true)]
    officers: Vec<String>,
    /// How many officers' shares rebuild a PIN (K, at least 2).
    #[arg(long, value_name = "K")]
    threshold: usize,
    /// Where the share files and the transcript go (created if missing; nothing is overwritten).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

/// One step of the transcript.
fn step(name: &str, details: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"time": now_text(), "step": name, "details": details})
}

fn now_text() -> String {
    // RFC 3339 formats every UTC time from year 0 to 9999; the clock is inside that.
    #[allow(clippy::expect_used)]
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now formats as RFC 3339")
}

pub(crate) async fn init(args: InitArgs) -> Result<(), Box<dyn std::error::Error>> {
    let officers = &args.officers;
    if officers.len() < 2 || args.threshold < 2 || args.threshold > officers.len() {
        return Err(format!(
            "{} officers with threshold {}: give at least two --officer and a --threshold from \
             2 to their number",
            officers.len(),
            args.threshold
        )
        .into());
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = officers.iter().find(|o| !seen.insert(o.as_str())) {
        return Err(format!("officer {twice} is named twice").into());
    }
    // Ids name the share files: letters, digits, '.', '_' and '-' only, not starting with '.'.
    if let Some(bad) = officers.iter().find(|o| {
        o.is_empty()
            || o.len() > 64
            || o.starts_with('.')
            || !o
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    }) {
        return Err(format!(
            "officer id {bad:?}: use 1 to 64 letters, digits, '.', '_' and '-' (an id, not a name)"
        )
        .into());
    }
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|error| format!("cannot create {}: {error}", args.out_dir.display()))?;
    let transcript_path = args.out_dir.join("transcript.json");
    if transcript_path.exists() {
        return Err(format!(
            "{} exists: choose an empty --out-dir",
            transcript_path.display()
        )
        .into());
    }
    // Every share file must be free before the token's PINs change.
    for officer in officers {
        for suffix in ["user-pin-share", "so-pin-share"] {
            let path = args.out_dir.join(format!("{officer}.{suffix}.txt"));
            if path.exists() {
                return Err(format!(
                    "{} exists; a share file is never overwritten: choose an empty --out-dir",
                    path.display()
                )
                .into());
            }
        }
    }
    let mut steps = Vec::new();

    let existing = args
        .take_token_so_pin_file
        .as_deref()
        .map(read_secret)
        .transpose()?;
    eprintln!("initialising token {:?}", args.token);
    let (module, label) = (args.module.clone(), args.token.clone());
    let token = tokio::task::spawn_blocking(move || {
        hsm_adapter::ceremony::initialise_token(&module, &label, existing.as_ref())
    })
    .await??;
    steps.push(step(
        if token.initialised {
            "token initialised"
        } else {
            "token taken over"
        },
        serde_json::json!({"label": args.token,
            "pins": "SO PIN and user PIN drawn from the HSM's generator, never shown"}),
    ));

    // The shares first: they are the only copy of the PINs, so nothing may fail before they
    // are on disk.
    let mut digests = serde_json::Map::new();
    for (what, pin, suffix, key) in [
        ("user PIN", &token.user_pin, "user-pin-share", "user_pin"),
        ("SO PIN", &token.so_pin, "so-pin-share", "so_pin"),
    ] {
        let shares = quorum::split(pin, args.threshold, officers.len())?;
        let mut by_officer = serde_json::Map::new();
        for (officer, share) in officers.iter().zip(&shares) {
            let path = args.out_dir.join(format!("{officer}.{suffix}.txt"));
            let mut text = share.to_text();
            text.push('\n');
            write_new_private(&path, text.as_bytes())?;
            by_officer.insert(officer.clone(), share.digest().to_string().into());
            eprintln!("wrote {}", path.display());
        }
        steps.push(step(
            &format!("{what} split"),
            serde_json::json!({"threshold": args.threshold, "shares": officers.len()}),
        ));
        digests.insert(key.to_owned(), by_officer.into());
    }

    let hsm = crate::hsm_opts::open_token(
        &args.module,
        Some(args.token.clone()),
        None,
        token.user_pin.clone(),
    )
    .await?;
    eprintln!("creating the system keys");
    let report = hsm.provision_system_keys(&token.so_pin).await?;
    let labels =
        |keys: &[hsm_adapter::SystemKey]| -> Vec<&str> { keys.iter().map(|k| k.label()).collect() };
    steps.push(step(
        "system keys created",
        serde_json::json!({"created": labels(&report.created), "found": labels(&report.found)}),
    ));

    let (described, keys) = hsm.describe().await?;
    let audit_key = hsm.system_public_key(hsm_adapter::SystemKey::Audit).await?;
    let body = serde_json::json!({
        "format": "smartsign-ceremony-transcript-v1",
        "token": token_json(&described),
        "officers": officers,
        "threshold": args.threshold,
        "steps": steps,
        "keys": keys.iter().map(key_json).collect::<Vec<_>>(),
        "share_digests": digests,
        "audit_public_key": audit_key.to_pem(),
        "completed_at": now_text(),
    });
    let serde_json::Value::Object(body) = body else {
        return Err("transcript body".into());
    };
    let signed = audit_log::Transcript::signed_form(&body);
    let digest = hsm_adapter::Digest::new(
        hsm_adapter::HashAlgorithm::Sha256,
        sha2::Sha256::digest(&signed).to_vec(),
    )?;
    let signature = hsm
        .sign_with_system_key(hsm_adapter::SystemKey::Audit, &digest)
        .await?;
    let file = audit_log::Transcript::assemble(body, &signature);
    std::fs::write(&transcript_path, &file)
        .map_err(|error| format!("cannot write {}: {error}", transcript_path.display()))?;
    hsm.shutdown().await;
    eprintln!(
        "wrote {} (SHA-256 {}), signed with the audit key",
        transcript_path.display(),
        hex::encode(sha2::Sha256::digest(&file))
    );

    let user_digests = digests
        .get("user_pin")
        .and_then(|d| d.as_object())
        .map(|d| d.values().filter_map(|v| v.as_str()).collect::<Vec<_>>())
        .unwrap_or_default();
    eprintln!("\nPut this in smartsignd.toml (no secret in it):\n");
    println!("[hsm]");
    println!("module = {:?}", args.module.display().to_string());
    println!("token_label = {:?}", args.token);
    println!(
        "ceremony_transcript = {:?}",
        transcript_path.display().to_string()
    );
    println!();
    println!("[hsm.quorum]");
    println!("threshold = {}", args.threshold);
    println!("share_digests = [");
    for digest in user_digests {
        println!("    \"{digest}\",");
    }
    println!("]");
    eprintln!(
        "\nGive each officer their two share files and delete the copies here. Commands that \
         need the SO PIN (keys rotate-kek, keys clone-export) take {} officers' \
         --so-share-file.",
        args.threshold
    );
    Ok(())
}

fn token_json(token: &hsm_adapter::ceremony::TokenDescription) -> serde_json::Value {
    serde_json::json!({"label": token.label, "serial": token.serial,
                       "manufacturer": token.manufacturer, "model": token.model})
}

fn key_json(key: &hsm_adapter::ceremony::KeyDescription) -> serde_json::Value {
    serde_json::json!({"label": key.label, "attributes": key.attributes,
                       "public_key_sha256": key.public_key_sha256})
}

/// Arguments of `ceremony verify`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "It checks the transcript's signature with the token's audit key, then \
compares the token and every system key, attribute by attribute, with what the transcript \
recorded, and lists each difference. Exit status 0 only when the signature verifies and nothing \
differs. A KEK rotation since the ceremony shows as a changed key-encryption key."
)]
pub(crate) struct VerifyArgs {
    /// The transcript (`transcript.json` from `ceremony init`).
    transcript: PathBuf,
    #[command(flatten)]
    token: crate::hsm_opts::TokenChoice,
    #[command(flatten)]
    pin: crate::hsm_opts::UserPinArgs,
}

pub(crate) async fn verify(args: VerifyArgs) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = std::fs::read(&args.transcript)
        .map_err(|error| format!("cannot read {}: {error}", args.transcript.display()))?;
    let transcript = audit_log::Transcript::parse(&bytes)?;
    let hsm = args.token.open(args.pin.pin()?).await?;
    let audit_key = hsm.system_public_key(hsm_adapter::SystemKey::Audit).await?;
    let (token, keys) = hsm.describe().await?;
    hsm.shutdown().await;
    let key = audit_log::AuditPublicKey::from_spki_der(audit_key.as_der())?;
    transcript.verify(&key).map_err(|error| {
        format!("{error}: the transcript was not signed by this token's audit key, or was changed")
    })?;
    println!(
        "signature: verifies under the token's audit key (transcript SHA-256 {})",
        hex::encode(sha2::Sha256::digest(&bytes))
    );
    let differences = compare(transcript.body(), &token_json(&token), &keys);
    if differences.is_empty() {
        println!("token: matches the transcript ({} system keys)", keys.len());
        return Ok(());
    }
    for difference in &differences {
        println!("DIFFERS: {difference}");
    }
    Err(format!(
        "{} difference(s) between the token and the transcript",
        differences.len()
    )
    .into())
}

/// What differs between the transcript's token and keys and the token's now.
fn compare(
    body: &serde_json::Map<String, serde_json::Value>,
    token: &serde_json::Value,
    keys: &[hsm_adapter::ceremony::KeyDescription],
) -> Vec<String> {
    let mut out = Vec::new();
    for field in ["label", "serial"] {
        if body["token"][field] != token[field] {
            out.push(format!(
                "token {field}: transcript {}, token {}",
                body["token"][field], token[field]
            ));
        }
    }
    let now: Vec<serde_json::Value> = keys.iter().map(key_json).collect();
    let identity = |k: &serde_json::Value| {
        format!(
            "{} (CKA_ID {})",
            k["label"].as_str().unwrap_or("?"),
            k["attributes"]["CKA_ID"].as_str().unwrap_or("")
        )
    };
    let recorded = body["keys"].as_array().cloned().unwrap_or_default();
    for then in &recorded {
        match now.iter().find(|k| identity(k) == identity(then)) {
            None => out.push(format!(
                "{}: in the transcript, not on the token",
                identity(then)
            )),
            Some(current) => {
                if then["public_key_sha256"] != current["public_key_sha256"] {
                    out.push(format!("{}: the public key changed", identity(then)));
                }
                let empty = serde_json::Map::new();
                let a = then["attributes"].as_object().unwrap_or(&empty);
                let b = current["attributes"].as_object().unwrap_or(&empty);
                for name in a
                    .keys()
                    .chain(b.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    if a.get(name) != b.get(name) {
                        out.push(format!(
                            "{} {name}: transcript {}, token {}",
                            identity(then),
                            a.get(name).map_or("absent".into(), |v| v.to_string()),
                            b.get(name).map_or("absent".into(), |v| v.to_string())
                        ));
                    }
                }
            }
        }
    }
    for current in &now {
        if !recorded.iter().any(|k| identity(k) == identity(current)) {
            out.push(format!(
                "{}: on the token, not in the transcript",
                identity(current)
            ));
        }
    }
    out
}
