//! `smartsign-ctl keys rotate-kek`: replaces the key-encryption key and re-wraps every stored
//! user key under the new one, inside the HSM.
//!
//! It runs while the daemon is stopped, on the daemon's own configuration. Why not through the
//! running daemon: the daemon is the only process that opens the token while it runs (a second
//! process writing a SoftHSM token stalls it), creating the KEK needs the security officer's
//! login, which logs the daemon's user out, and while two KEKs are on the token no wrapped key
//! signs (the daemon refuses to start then). The audit log's lock proves the daemon is stopped:
//! if the log cannot be opened, nothing is touched.
//!
//! The steps, each durable before the next, so that a crash at any point resumes with the same
//! command and never leaves a key wrapped only under a destroyed KEK:
//!
//! 1. the store's journal records the rotation (old and new KEK ids) before the new KEK exists;
//! 2. the new KEK is made with its templates (skipped when a resumed rotation made it already);
//! 3. each stored reference not yet under the new KEK is re-wrapped in the HSM (unwrap under the
//!    old, wrap under the new, the new blob proved to unwrap) and replaced in the store only if
//!    it is still what was read, a batch per transaction;
//! 4. once no reference is left under another KEK, the old KEK is destroyed, which makes every
//!    blob in every backup from before the rotation useless;
//! 5. the journal closes.
//!
//! The audit log gets `kek.rotation_started` (or `_resumed`), `kek.rotation_progress` at each
//! tenth, and `kek.rotation_finished`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use audit_log::{Actor, AuditEvent, AuditLog, AuditLogConfig, AuditPublicKey, EventName, Origin};
use cert_lifecycle::{KeyRefSlot, SqliteStore, StoreError};
use hsm_adapter::{Hsm, HsmError, KekId, SystemKey, UserKeyRef};
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::hsm_opts::{SoPinArgs, UserPinArgs, open_configured};

type BoxError = Box<dyn std::error::Error>;

/// Arguments of `keys rotate-kek`.
#[derive(Debug, clap::Args)]
pub(crate) struct RotateKekArgs {
    /// The daemon's configuration file: the token (`[hsm]`), the store (`[store] path`) and the
    /// audit log (`[audit] dir` and `origin`).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The user PIN, when the configuration has no `hsm.pin_file` (the daemon unseals with a
    /// quorum).
    #[command(flatten)]
    pin: UserPinArgs,
    /// The security officer's PIN: only the SO may mark the new KEK trusted.
    #[command(flatten)]
    so_pin: SoPinArgs,
    /// Who runs the rotation, as the audit records name them (an officer id such as
    /// `officer-1`, not a person's name).
    #[arg(long)]
    officer: String,
    /// Keys re-wrapped per HSM job; each is then stored in its own commit.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    batch: u16,
}

/// The parts of the daemon's configuration the rotation needs beside the token.
#[derive(serde::Deserialize)]
struct DaemonPaths {
    store: StorePaths,
    audit: AuditPaths,
}

#[derive(serde::Deserialize)]
struct StorePaths {
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    path: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
struct AuditPaths {
    dir: PathBuf,
    origin: String,
}

impl DaemonPaths {
    fn read(path: &Path) -> Result<Self, BoxError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        Ok(toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?)
    }
}

pub(crate) async fn run(args: RotateKekArgs) -> Result<(), BoxError> {
    let paths = DaemonPaths::read(&args.config)?;
    let store_path = match (paths.store.backend.as_deref(), &paths.store.path) {
        (None | Some("sqlite"), Some(path)) => path.clone(),
        (Some("postgres"), _) => {
            return Err(
                "keys rotate-kek re-wraps the keys of an SQLite store only; with \
                        [store] backend = \"postgres\" it is not available yet (see the README)"
                    .into(),
            );
        }
        _ => return Err(format!("{}: [store] has no path", args.config.display()).into()),
    };
    let so_pin = args.so_pin.pin()?;
    let actor = Actor::new(format!("officer:{}", args.officer))?;
    let hsm = open_configured(&args.config, args.pin.pin()?).await?;
    let audit_key = hsm
        .system_public_key(SystemKey::Audit)
        .await
        .map_err(|error| format!("cannot read the audit public key: {error}"))?;
    let audit = AuditLog::open(
        &paths.audit.dir,
        AuditLogConfig::new(Origin::new(&paths.audit.origin)?)
            .with_checkpoint_key(AuditPublicKey::from_spki_der(audit_key.as_der())?),
    )
    .await
    .map_err(|error| {
        format!(
            "cannot open the audit log {} ({error}); is smartsignd running? Stop it first: \
             the rotation runs while the daemon is stopped",
            paths.audit.dir.display()
        )
    })?;
    let store = SqliteStore::open(&store_path)
        .map_err(|error| format!("cannot open the store {}: {error}", store_path.display()))?;
    let rotation = Rotation {
        hsm: &hsm,
        store: &store,
        audit: &audit,
        actor,
        batch: usize::from(args.batch),
    };
    let result = rotation.run(&so_pin).await.map(drop);
    if let Err(error) = audit.close().await {
        eprintln!("closing the audit log: {error}");
    }
    hsm.shutdown().await;
    result
}

/// One rotation over an opened token, store and audit log (also what `bench rotate-kek` runs).
pub(crate) struct Rotation<'a> {
    pub(crate) hsm: &'a Hsm,
    pub(crate) store: &'a SqliteStore,
    pub(crate) audit: &'a AuditLog,
    pub(crate) actor: Actor,
    pub(crate) batch: usize,
}

/// A stored reference that is not under the new KEK yet.
pub(crate) struct Pending {
    slot: KeyRefSlot,
    stored: Vec<u8>,
    key: UserKeyRef,
}

impl Rotation<'_> {
    /// Runs (or resumes) the rotation; returns how many keys it re-wrapped.
    pub(crate) async fn run(&self, so_pin: &SecretString) -> Result<u64, BoxError> {
        let started = Instant::now();
        let (old, new, resumed) = self.begin().await?;
        let describe = |id: Option<KekId>| KekId::describe(id.as_ref());
        self.record(
            if resumed {
                "kek.rotation_resumed"
            } else {
                "kek.rotation_started"
            },
            json!({"old_kek": old.map(|id| id.to_string()), "new_kek": new.to_string()}),
        )
        .await?;
        eprintln!(
            "{} the rotation from KEK {} to KEK {new}",
            if resumed { "resuming" } else { "starting" },
            describe(old)
        );
        if self.hsm.ensure_kek(so_pin, new).await? {
            eprintln!("created KEK {new} with its unwrap and wrap templates");
        }

        let total = self.count_pending(&new)?;
        eprintln!("{total} wrapped keys to re-wrap");
        let mut progress = Progress::new(total);
        let mut after: Option<KeyRefSlot> = None;
        let mut failures: Vec<(KeyRefSlot, HsmError)> = Vec::new();
        while let Some(batch) = next_pending(self.store, &mut after, &new, self.batch)? {
            let results = self.hsm.rewrap(keys_of(&batch), new).await?;
            let mut changes = Vec::with_capacity(batch.len());
            for (pending, result) in batch.into_iter().zip(results) {
                match result {
                    Ok(rewrapped) => {
                        changes.push((pending.slot, pending.stored, rewrapped.to_bytes()))
                    }
                    Err(error) => failures.push((pending.slot, error)),
                }
            }
            self.replace(&changes)?;
            if let Some(tenth) = progress.add(changes.len() as u64) {
                self.record(
                    "kek.rotation_progress",
                    json!({"new_kek": new.to_string(), "rewrapped": progress.done,
                           "total": total, "tenths": tenth}),
                )
                .await?;
            }
        }
        progress.finish();
        if let Some((slot, error)) = failures.first() {
            return Err(format!(
                "{} key(s) could not be re-wrapped (the first: {slot:?}: {error}); KEK {} is \
                 kept, so nothing is lost. A key whose KEK is gone cannot be recovered: revoke \
                 its certificate, then run the rotation again",
                failures.len(),
                describe(old)
            )
            .into());
        }
        let left = self.count_pending(&new)?;
        if left > 0 {
            return Err(format!(
                "{left} key(s) appeared under another KEK during the rotation; is smartsignd \
                 running? Stop it and run the rotation again"
            )
            .into());
        }

        match self.hsm.destroy_kek(old).await {
            Ok(()) => eprintln!("destroyed KEK {}", describe(old)),
            // A resumed rotation that destroyed it before it stopped.
            Err(HsmError::KekNotOnToken { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        self.record(
            "kek.rotation_finished",
            json!({"old_kek": old.map(|id| id.to_string()), "new_kek": new.to_string(),
                   "rewrapped": progress.done, "seconds": started.elapsed().as_secs()}),
        )
        .await?;
        self.store
            .finish_kek_rotation(new.as_bytes(), OffsetDateTime::now_utc())?;
        println!(
            "KEK rotated to {new}: {} keys re-wrapped in {:.1} s; KEK {} is destroyed, and with \
             it every blob of every earlier backup of the store",
            progress.done,
            started.elapsed().as_secs_f64(),
            describe(old)
        );
        Ok(progress.done)
    }

    /// The rotation to run: the one the journal records as open, or a new one from the token's
    /// one KEK. Returns (old, new, resumed).
    async fn begin(&self) -> Result<(Option<KekId>, KekId, bool), BoxError> {
        if let Some(open) = self.store.open_kek_rotation()? {
            let new = KekId::from_bytes(&open.new_kek)?;
            let old = open.old_kek.as_deref().map(KekId::from_bytes).transpose()?;
            return Ok((old, new, true));
        }
        let keks = self.hsm.key_encryption_keys().await?;
        let [current] = keks.as_slice() else {
            let ids: Vec<String> = keks
                .iter()
                .map(|k| KekId::describe(k.id.as_ref()))
                .collect();
            return Err(format!(
                "the token holds {} key-encryption keys ({}) and the store records no rotation \
                 between them; this store does not belong to this token, or the token was \
                 changed by hand",
                keks.len(),
                ids.join(", ")
            )
            .into());
        };
        let new = KekId::from_bytes(&self.hsm.random(KekId::LEN).await?)?;
        self.store.begin_kek_rotation(
            new.as_bytes(),
            current.id.as_ref().map(KekId::as_bytes),
            OffsetDateTime::now_utc(),
        )?;
        Ok((current.id, new, false))
    }

    /// How many stored wrapped keys are not under `new`.
    pub(crate) fn count_pending(&self, new: &KekId) -> Result<u64, BoxError> {
        let mut count = 0;
        let mut after: Option<KeyRefSlot> = None;
        loop {
            let page = self.store.key_refs_after(after.as_ref(), 4096)?;
            let Some(last) = page.last() else {
                return Ok(count);
            };
            after = Some(last.slot.clone());
            count += pending_in(page, new)?.len() as u64;
        }
    }

    /// Stores a batch of re-wrapped references in one transaction, each only if it is still
    /// what was read.
    fn replace(&self, changes: &[(KeyRefSlot, Vec<u8>, Vec<u8>)]) -> Result<(), BoxError> {
        match self.store.replace_key_refs(changes) {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict) => Err("a stored key reference changed while it was \
                 re-wrapped; is smartsignd running? Stop it and run the rotation again"
                .into()),
            Err(error) => Err(error.into()),
        }
    }

    async fn record(&self, event: &str, fields: Value) -> Result<(), BoxError> {
        let fields: Map<String, Value> = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        self.audit
            .append(AuditEvent::new(EventName::new(event)?, self.actor.clone()).with_fields(fields))
            .await?;
        Ok(())
    }
}

/// The next batch of stored references after `after` that are not under `new` yet (reading
/// on past pages with none), or `None` at the end.
pub(crate) fn next_pending(
    store: &SqliteStore,
    after: &mut Option<KeyRefSlot>,
    new: &KekId,
    batch: usize,
) -> Result<Option<Vec<Pending>>, BoxError> {
    loop {
        let page = store.key_refs_after(after.as_ref(), batch)?;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        *after = Some(last.slot.clone());
        let pending = pending_in(page, new)?;
        if !pending.is_empty() {
            return Ok(Some(pending));
        }
    }
}

/// The keys of a batch, for `Hsm::rewrap`. One batch at a time: two at once, on two sessions,
/// ran at two thirds of the rate on SoftHSM (its token objects, the KEKs, are shared by both).
pub(crate) fn keys_of(batch: &[Pending]) -> Vec<UserKeyRef> {
    batch.iter().map(|p| p.key.clone()).collect()
}

/// The references of `page` that are wrapped keys not yet under `new`.
pub(crate) fn pending_in(
    page: Vec<cert_lifecycle::StoredKeyRef>,
    new: &KekId,
) -> Result<Vec<Pending>, BoxError> {
    let mut pending = Vec::new();
    for stored in page {
        let key = UserKeyRef::from_bytes(&stored.key_ref)
            .map_err(|error| format!("{:?}: {error}", stored.slot))?;
        if key.needs_rewrap(new) {
            pending.push(Pending {
                slot: stored.slot,
                stored: stored.key_ref,
                key,
            });
        }
    }
    Ok(pending)
}

/// Progress on standard error: after the first batch, then at most once a second.
struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    printed: Option<Instant>,
    tenths: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            total,
            done: 0,
            started: Instant::now(),
            printed: None,
            tenths: 0,
        }
    }

    /// Counts `n` more keys; returns the tenth of the total just passed, if one was.
    fn add(&mut self, n: u64) -> Option<u64> {
        self.done += n;
        if self
            .printed
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.print();
        }
        let tenths = (self.done * 10)
            .checked_div(self.total)
            .unwrap_or(10)
            .min(10);
        (tenths > self.tenths).then(|| {
            self.tenths = tenths;
            tenths
        })
    }

    fn print(&mut self) {
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / seconds.max(1e-3);
        let left = self.total.saturating_sub(self.done) as f64 / rate.max(1e-3);
        eprintln!(
            "re-wrapped {} of {} keys ({rate:.0}/s, about {left:.0} s left)",
            self.done, self.total
        );
        self.printed = Some(Instant::now());
    }

    fn finish(&mut self) {
        if self.done > 0 {
            self.print();
        }
    }
}
