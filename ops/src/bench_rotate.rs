//! `smartsign-ctl bench rotate-kek`: how long `keys rotate-kek` takes for N wrapped keys, beside
//! the HSM work alone in the same run.
//!
//! It fills a store with N "iAM Smart+" accounts whose EC P-256 keys are wrapped under the KEK
//! (made by the adapter on the token; the store is filled on tmpfs and then copied to the state
//! directory, which should be on the file system production uses). Then, as the baseline, it
//! re-wraps every key under a scratch KEK inside the HSM and keeps nothing (`Hsm::rewrap`, the
//! HSM's share of the work: unwrap, wrap, unwrap again to prove the blob), a batch at a time as
//! the rotation does. Last it runs the real rotation, which adds reading the store, one
//! conditional commit per batch, the audit records and destroying the old KEK. The ratio is
//! rotation rate / baseline rate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use audit_log::{Actor, AuditLog, AuditLogConfig, AuditPublicKey, Origin};
use cert_lifecycle::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertStatus, CertificateRecord, KeyRefSlot,
    Profile, SqliteStore, Store, Tier,
};
use hsm_adapter::{Hsm, KekId, KeyAlgorithm, KeyMode, SOFTHSM_MODULE, SystemKey};
use time::OffsetDateTime;

use crate::hsm_opts::{open_token, read_secret};
use crate::rotate_kek::{Rotation, keys_of, next_pending};

type BoxError = Box<dyn std::error::Error>;

/// Arguments of `bench rotate-kek`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchRotateArgs {
    /// The PKCS#11 module.
    #[arg(long, default_value = SOFTHSM_MODULE)]
    pub(crate) module: PathBuf,
    /// Label of the token to measure on: it must exist and hold no system keys, since the
    /// rotation destroys the KEK it finds. Without it, a scratch SoftHSM token is made.
    #[arg(long)]
    pub(crate) token: Option<String>,
    /// File holding the user PIN (its first line).
    #[arg(long)]
    pub(crate) pin_file: Option<PathBuf>,
    /// File holding the security officer's PIN (to make the KEKs).
    #[arg(long)]
    pub(crate) so_pin_file: Option<PathBuf>,
    /// Wrapped keys in the store.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Where the store and audit log live during the rotation: put it on the file system that
    /// holds production state. Default: a temporary directory under /var/tmp.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Keys per HSM job and store commit, as `keys rotate-kek --batch`.
    #[arg(long, default_value_t = 256)]
    batch: u16,
}

pub(crate) async fn run(args: BenchRotateArgs) -> Result<(), BoxError> {
    let pin = read_secret(args.pin_file.as_deref().ok_or("give --pin-file")?)?;
    let so_pin = read_secret(args.so_pin_file.as_deref().ok_or("give --so-pin-file")?)?;
    let hsm = Arc::new(open_token(&args.module, args.token.clone(), None, pin).await?);
    // The rotation destroys the KEK it finds: never a token whose KEK wraps anyone's keys.
    if !hsm.key_encryption_keys().await?.is_empty() {
        return Err(format!(
            "token {:?} already holds a key-encryption key, which this benchmark would destroy; \
             it runs only on a token without system keys (leave out --token for a scratch one)",
            args.token.as_deref().unwrap_or("")
        )
        .into());
    }
    hsm.provision_system_keys(&so_pin).await?;
    let scratch = tempfile::Builder::new()
        .prefix("smartsign-bench-rotate-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/var/tmp"
        })?;
    let kept;
    let state = match &args.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            kept = tempfile::Builder::new()
                .prefix("smartsign-bench-rotate-")
                .tempdir_in("/var/tmp")?;
            kept.path().to_path_buf()
        }
    };

    let started = Instant::now();
    populate(&hsm, &scratch.path().join("smartsign.sqlite"), args.keys).await?;
    let populated = started.elapsed().as_secs_f64();
    eprintln!("populated {} wrapped keys in {populated:.1} s", args.keys);
    for suffix in ["", "-wal"] {
        let from = scratch.path().join(format!("smartsign.sqlite{suffix}"));
        if from.exists() {
            std::fs::copy(&from, state.join(format!("smartsign.sqlite{suffix}")))?;
        }
    }
    let store = SqliteStore::open(state.join("smartsign.sqlite"))?;

    // Baseline: the HSM's share, every key re-wrapped under a scratch KEK, nothing kept.
    let scratch_kek = KekId::from_bytes(&hsm.random(KekId::LEN).await?)?;
    hsm.ensure_kek(&so_pin, scratch_kek).await?;
    let started = Instant::now();
    let mut after: Option<KeyRefSlot> = None;
    let mut rewrapped = 0u64;
    let batch = usize::from(args.batch);
    while let Some(pending) = next_pending(&store, &mut after, &scratch_kek, batch)? {
        for result in hsm.rewrap(keys_of(&pending), scratch_kek).await? {
            result?;
            rewrapped += 1;
        }
    }
    let baseline = started.elapsed().as_secs_f64();
    hsm.destroy_kek(Some(scratch_kek)).await?;

    // The rotation, as `keys rotate-kek` runs it, on the store on disk.
    let audit_key = hsm.system_public_key(SystemKey::Audit).await?;
    let audit = AuditLog::open(
        state.join("audit"),
        AuditLogConfig::new(Origin::new("bench.smartsign/audit")?)
            .with_checkpoint_key(AuditPublicKey::from_spki_der(audit_key.as_der())?),
    )
    .await?;
    let started = Instant::now();
    let done = Rotation {
        hsm: &hsm,
        store: &store,
        audit: &audit,
        actor: Actor::new("officer:bench")?,
        batch: usize::from(args.batch),
    }
    .run(&so_pin)
    .await?;
    let rotation = started.elapsed().as_secs_f64();
    audit.close().await?;
    if let Some(hsm) = Arc::into_inner(hsm) {
        hsm.shutdown().await;
    }

    let rate = |n: u64, seconds: f64| n as f64 / seconds.max(1e-9);
    println!("| keys | HSM re-wrap only | rotate-kek | ratio | rotate-kek time |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {:.0}/s | {:.0}/s | {:.2} | {rotation:.1} s |",
        done,
        rate(rewrapped, baseline),
        rate(done, rotation),
        rate(done, rotation) / rate(rewrapped, baseline),
    );
    if args.state_dir.is_some() {
        eprintln!("the store and audit log are in {}", state.display());
    }
    Ok(())
}

/// N accounts with an EC P-256 key wrapped under the token's KEK each, in a store at `path`.
async fn populate(hsm: &Arc<Hsm>, path: &Path, keys: u64) -> Result<(), BoxError> {
    let store = SqliteStore::open(path)?;
    let (sender, mut receiver) = tokio::sync::mpsc::channel(1024);
    let generators = 32;
    for generator in 0..generators {
        let hsm = Arc::clone(hsm);
        let sender = sender.clone();
        tokio::spawn(async move {
            let mut index = generator;
            while index < keys {
                let key = hsm
                    .generate_user_key(KeyAlgorithm::EcP256, KeyMode::Wrapped)
                    .await;
                if sender.send((index, key)).await.is_err() {
                    return;
                }
                index += generators;
            }
        });
    }
    drop(sender);
    let now = OffsetDateTime::now_utc();
    let started = Instant::now();
    let mut stored = 0u64;
    while let Some((index, key)) = receiver.recv().await {
        let key = key?;
        let id = AccountId::parse(&format!("u-bench-{index}"))?;
        let serial = CertSerial::parse(&format!("{:x}", index + 1))?;
        let certificate = CertificateRecord {
            serial: serial.clone(),
            account_id: id.clone(),
            profile: Profile::Adult,
            not_before: now,
            not_after: now + time::Duration::days(730),
            status: CertStatus::Valid,
            revocation_reason: None,
            revoked_at: None,
            sealed_der: vec![0; 64],
            key_ref: Some(key.to_bytes()),
            key_algorithm: "ecdsa_p256".to_owned(),
        };
        let account = AccountRecord {
            id,
            tier: Tier::IamSmartPlus,
            status: AccountStatus::Active,
            status_changed_at: now,
            suspended_by: None,
            rectify_by: None,
            sealed_name: vec![0; 48],
            sealed_dob: vec![0; 40],
            // One person each (the store keeps one account per HKIC hash).
            hkic_hash: {
                let mut hash = [0u8; 32];
                hash[..8].copy_from_slice(&index.to_be_bytes());
                hash
            },
            device_public_key: vec![0; 91],
            device_generation: 1,
            current_certificate: Some(serial),
            created_at: now,
            guardian_hkic_hash: None,
            adult_day_key: None,
            version: 0,
        };
        store.insert_account_with_certificate(&account, &certificate, &[])?;
        stored += 1;
        if stored.is_multiple_of(10_000) {
            eprintln!(
                "populated {stored} of {keys} ({:.0}/s)",
                stored as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
