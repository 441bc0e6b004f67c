//! `smartsign-ctl`: the command line of smartsign's security officers and auditors.
//!
//! It provisions the system keys on a token, splits the HSM user PIN into the officers' unseal
//! shares (the key ceremony), verifies audit-log exports offline, and measures the
//! HSM adapter and the audit log against their raw baselines. Commands that open the token run
//! while the daemon is stopped: the daemon is the only process that opens the token while it
//! runs (DESIGN.md).

#![forbid(unsafe_code)]

// Replies cross threads: buffers allocated on an HSM worker are freed on the async caller's
// thread. With glibc's malloc each such free locks the worker's arena, which SoftHSM and OpenSSL
// use for every signature; mimalloc frees across threads without that lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit_cmd;
mod audit_watch;
mod bench_accounts;
mod bench_audit;
mod bench_audit_open;
mod bench_hsm;
mod bench_nodes;
mod bench_populate;
mod bench_rotate;
mod bench_sign;
mod bench_soak;
mod bench_sweep;
mod ceremony;
mod client;
mod clone;
mod docs;
mod hsm_opts;
mod keys;
mod provision;
mod rotate_kek;
mod scratch;
mod status;
mod unseal;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// smartsign-ctl: key ceremonies, audit verification and benchmarks for the smartsign signing
/// appliance.
#[derive(Debug, Parser)]
#[command(name = "smartsign-ctl", version, propagate_version = true)]
#[command(after_help = "Examples:\n  \
    smartsign-ctl keys init --token smartsign --pin-file user.pin --so-pin-file so.pin\n  \
    smartsign-ctl keys rotate-kek --config /etc/smartsign/smartsignd.toml --so-pin-file so.pin \\\n      \
    --officer officer-1\n  \
    smartsign-ctl ceremony split --pin-file user.pin --threshold 2 --shares 3 --out-dir shares\n  \
    smartsign-ctl audit verify --records audit.ndjson --checkpoint checkpoint.json \\\n      \
    --public-key audit-key.pem\n  \
    smartsign-ctl status --url https://appliance:8443 --cert officer.pem --key officer.key \\\n      \
    --ca tls-ca.pem\n  \
    smartsign-ctl docs --out-dir /usr/share\n  \
    smartsign-ctl audit verify-receipt receipt.json --public-key audit-key.pem\n  \
    smartsign-ctl audit watch --url https://appliance:8443 --cert auditor.pem --key auditor.key \\\n      \
    --ca tls-ca.pem --public-key audit-key.pem --state watch.json\n  \
    smartsign-ctl bench hsm --seconds 3\n  \
    smartsign-ctl bench audit --appenders 1,8,64\n  \
    smartsign-ctl bench audit-open --records 1000000 --dir /var/tmp/audit-bench\n  \
    smartsign-ctl bench populate --state-dir /var/tmp/bench --accounts 100000\n  \
    smartsign-ctl bench sign --state-dir /var/tmp/bench --accounts 100000 --half-load")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// System keys on the HSM token (run while the daemon is stopped).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The key ceremony: split the HSM user PIN into the officers' unseal shares, so that the
    /// daemon starts sealed and opens the HSM only when a quorum of officers unseals it.
    #[command(subcommand)]
    Ceremony(CeremonyCommand),
    /// The signed audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Give an officer's share of the user PIN to a sealed daemon (from a file or standard
    /// input, never the command line), with the officer's client certificate.
    Unseal(unseal::UnsealArgs),
    /// A running daemon's state, with an officer's client certificate: sealed or not,
    /// readiness by component, keys, the audit log and its checkpoint's age, the CA and the
    /// status cache, the last lifecycle sweep. Exits 1 unless the daemon is ready.
    Status(status::StatusArgs),
    /// Provision an appliance once from its provisioning medium: write the configuration and,
    /// in the development profile, make the token, certificates and the officers' shares.
    Provision(provision::ProvisionArgs),
    /// Write the man pages and the bash, zsh and fish completions of smartsignd and
    /// smartsign-ctl, laid out as under /usr/share.
    Docs(docs::DocsArgs),
    /// Throughput measurements against the raw baselines, in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create the system keys that are missing (key-encryption key, TAID and HKIC MAC keys,
    /// data key, audit key, embedded-CA keys, CMP client key) and list them all. Needs the SO PIN because only
    /// the security officer may mark the key-encryption key as trusted. Safe to run again: keys
    /// that exist are found, not replaced.
    Init(keys::InitArgs),
    /// List the system keys on the token and check each against the key policy, the
    /// key-encryption key's unwrap and wrap templates included.
    Status(keys::StatusArgs),
    /// Replace the key-encryption key: make a new one with its templates (as the security
    /// officer), re-wrap every stored user key under it inside the HSM (the plaintext never
    /// leaves), then destroy the old one, which also kills the wrapped keys in every earlier
    /// backup of the store. Run it while smartsignd is stopped; if it stops half-way, run it
    /// again: it resumes. Also the fix for a token whose KEK lacks the templates.
    RotateKek(rotate_kek::RotateKekArgs),
    /// On a second HSM's token: make the transport key pair that a clone of the system keys is
    /// wrapped for, and print its fingerprint for the officers.
    CloneRequest(clone::RequestArgs),
    /// On the source token, under the SO quorum: wrap every system key for the second HSM's
    /// transport key (checked against the fingerprint the officers confirmed).
    CloneExport(clone::ExportArgs),
    /// On the second HSM's token: unwrap the system keys from a clone bundle, with the same
    /// templates and attributes, and destroy the transport key.
    CloneImport(clone::ImportArgs),
    /// Write a PKCS#10 request for the daemon's CMP client key (smartsign-cmp-client), signed
    /// in the HSM, for the CA operator to certify as a registration authority. The returned
    /// certificate is `ca.ra_certificate` (CMP signature protection).
    RaRequest(keys::RaRequestArgs),
}

#[derive(Debug, Subcommand)]
enum CeremonyCommand {
    /// Split the user PIN into N shares of which any K rebuild it (Shamir over GF(2^8)), write
    /// one file per officer, and print the [hsm.quorum] section for smartsignd.toml. Needs no
    /// HSM: run it on an offline machine.
    Split(ceremony::SplitArgs),
    /// The whole key ceremony on a new token: PINs from the HSM's generator, the system keys,
    /// each PIN split among the officers, and a transcript signed with the audit key.
    Init(ceremony::InitArgs),
    /// Check a ceremony transcript's signature and compare the token, key by key and attribute
    /// by attribute, with what it recorded.
    Verify(ceremony::VerifyArgs),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify an audit export offline: every record, the Merkle root and the checkpoint
    /// signature; or, with --since-checkpoint, a new checkpoint, the consistency proof from an
    /// old one and the records added since. Exits 0 only when everything checks.
    Verify(audit_cmd::VerifyArgs),
    /// Verify a signing receipt offline: the record, its inclusion proof and the signed
    /// checkpoint it leads to. Exits 0 only when everything checks.
    VerifyReceipt(audit_cmd::VerifyReceiptArgs),
    /// An auditor's monitor: fetch each new checkpoint, prove it consistent with the last one
    /// verified (kept in a state file), and exit non-zero saying why on any inconsistency.
    Watch(audit_watch::WatchArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Signatures per second for each algorithm and key mode, raw cryptoki beside the adapter's
    /// async API. Without --token it makes a scratch SoftHSM token in a temporary directory.
    Hsm(bench_hsm::BenchHsmArgs),
    /// Durable appends per second at several concurrencies, group commit beside one fsync per
    /// append.
    Audit(bench_audit::BenchAuditArgs),
    /// Time to open an audit log of N records and the resident memory after opening it, after
    /// more appends and after proofs, measured in a fresh process; builds (or tops up) the log
    /// in --dir first and keeps it for the next run.
    AuditOpen(bench_audit_open::BenchAuditOpenArgs),
    /// Make N real "iAM Smart+" accounts through a `smartsignd --dev`'s API (keys in the HSM,
    /// certificates from the embedded CA over CMP, personal data sealed), as fast as the machine
    /// allows. Resumable: run it again with the same --state-dir to go on or to grow the
    /// population. Starts the daemon itself unless one runs there.
    Populate(bench_populate::BenchPopulateArgs),
    /// The whole signing flow (create, authorise, fetch) over mutual TLS against a
    /// `smartsignd --dev` with its state on disk, each flow for an account drawn at random from
    /// the population, beside raw cryptoki doing the same HSM work in the same run; with --rate
    /// or --half-load also an open loop at a fixed arrival rate, whose percentiles give the
    /// latency the daemon adds to the HSM work.
    Sign(bench_sign::BenchSignArgs),
    /// How long the lifecycle sweeps take with nothing due over a population of N accounts
    /// (made first when fewer exist), as the daemon times a run of `POST /v1/admin/sweep`.
    Sweep(bench_sweep::BenchSweepArgs),
    /// How long `keys rotate-kek` takes for N wrapped keys in a store on disk, beside the HSM's
    /// share of the work (re-wrapping alone) in the same run. Without --token it makes a
    /// scratch SoftHSM token.
    RotateKek(bench_rotate::BenchRotateArgs),
    /// The aggregate signing rate of 1, 2, ... N nodes on one PostgreSQL database and one
    /// SoftHSM token, with each node's CPU time and database round trips per signature (and
    /// PostgreSQL's CPU time), for sizing a deployment.
    Nodes(bench_nodes::BenchNodesArgs),
    /// The signing flow at a fixed rate for an hour (or --minutes), printing each minute the
    /// flows done, their p99 and the daemon's resident memory, and the memory's growth after
    /// the warm-up.
    Soak(bench_soak::BenchSoakArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("smartsign-ctl: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    // It starts a daemon and runs itself again before it needs a runtime of its own.
    if let Command::Bench(BenchCommand::Sign(args)) = command {
        return bench_sign::run(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Keys(KeysCommand::Init(args)) => keys::init(args).await,
            Command::Keys(KeysCommand::Status(args)) => keys::status(args).await,
            Command::Keys(KeysCommand::RaRequest(args)) => keys::ra_request(args).await,
            Command::Keys(KeysCommand::RotateKek(args)) => rotate_kek::run(args).await,
            Command::Keys(KeysCommand::CloneRequest(args)) => clone::request(args).await,
            Command::Keys(KeysCommand::CloneExport(args)) => clone::export(args).await,
            Command::Keys(KeysCommand::CloneImport(args)) => clone::import(args).await,
            Command::Bench(BenchCommand::Hsm(args)) => match scratch::ensure_token(&args.token)? {
                scratch::Token::Given => bench_hsm::run(args).await,
                // The scratch token lives in a child process's environment; it has already run.
                scratch::Token::RanInScratch => Ok(()),
            },
            Command::Bench(BenchCommand::Audit(args)) => bench_audit::run(args).await,
            Command::Bench(BenchCommand::AuditOpen(args)) => bench_audit_open::run(args).await,
            Command::Bench(BenchCommand::Populate(args)) => bench_populate::run(args).await,
            Command::Bench(BenchCommand::Sweep(args)) => bench_sweep::run(args).await,
            Command::Bench(BenchCommand::Nodes(args)) => bench_nodes::run(args).await,
            Command::Bench(BenchCommand::Soak(args)) => bench_soak::run(args).await,
            Command::Bench(BenchCommand::RotateKek(args)) => {
                match scratch::ensure_token(&args.token)? {
                    scratch::Token::Given => bench_rotate::run(args).await,
                    scratch::Token::RanInScratch => Ok(()),
                }
            }
            Command::Audit(AuditCommand::Verify(args)) => audit_cmd::verify(args),
            Command::Audit(AuditCommand::VerifyReceipt(args)) => {
                audit_cmd::verify_receipt_cmd(args)
            }
            Command::Audit(AuditCommand::Watch(args)) => audit_watch::run(args).await,
            Command::Ceremony(CeremonyCommand::Split(args)) => ceremony::split(args),
            Command::Ceremony(CeremonyCommand::Init(args)) => ceremony::init(args).await,
            Command::Ceremony(CeremonyCommand::Verify(args)) => ceremony::verify(args).await,
            Command::Unseal(args) => unseal::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Provision(args) => provision::run(args),
            Command::Docs(args) => docs::run(args, <Cli as clap::CommandFactory>::command()),
            Command::Bench(BenchCommand::Sign(_)) => Ok(()),
        }
    })
}
