//! `smartsign-ctl ceremony split`: the key ceremony that turns the HSM user PIN into the
//! officers' unseal shares and prints the `[hsm.quorum]` section for the daemon.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hsm_adapter::quorum;

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
  3. At each start the daemon serves sealed until K officers send their share:
       curl --cert officer.pem --key officer.key --cacert ca.pem \\
            -H 'content-type: application/json' \\
            --data \"{\\\"share\\\": \\\"$(cat share-1.txt)\\\"}\" \\
            https://appliance:8443/v1/admin/unseal

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
