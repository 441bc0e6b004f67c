//! The command line: `--config FILE` (production), `--check-config FILE`, and `--dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::Config;

/// smartsignd: the signing appliance's daemon. It fronts a PKCS#11 HSM, keeps one signing key per
/// "iAM Smart+" user, and signs a hash only after that user's bound device authorised the exact
/// request. Clients reach it over HTTPS with mutual TLS (see API.md).
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:
  smartsignd --dev                          development mode in ./.dev-state (SoftHSM, dev CA,
                                            TLS and client certificates made on first start)
  smartsignd --dev --state-dir /tmp/s --listen 127.0.0.1:0
                                            port 0 picks free ports; see /tmp/s/endpoints.json
  smartsignd --check-config /etc/smartsign/smartsignd.toml
  smartsignd --config /etc/smartsign/smartsignd.toml
  smartsignd --dev --state-dir /var/lib/smartsign --init-only
                                            make a development state directory and exit
  smartsignd --config /etc/smartsign/smartsignd.toml --wait-for-config 0.0.0.0:9090
                                            an appliance: wait (503 /readyz) until provisioned

Production tokens get their system keys from `smartsign-ctl keys init` while the daemon is stopped.
With [hsm.quorum] instead of hsm.pin_file (`smartsign-ctl ceremony split` prints it) the daemon
starts sealed and opens the HSM when enough officers give their shares (POST /v1/admin/unseal).
SIGTERM or Ctrl-C stops the daemon: in-flight requests finish and a final checkpoint is signed."
)]
struct Cli {
    /// Run with this configuration file (TOML).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["check_config", "dev"])]
    config: Option<PathBuf>,

    /// Check this configuration file, explain what is wrong, and exit (0 when it is valid).
    #[arg(long, value_name = "FILE", conflicts_with = "dev")]
    check_config: Option<PathBuf>,

    /// Development mode: make (first start) or reuse a state directory with a SoftHSM token, the
    /// embedded CA, TLS server and client certificates, and serve on loopback.
    #[arg(long)]
    dev: bool,

    /// The state directory of --dev.
    #[arg(
        long,
        value_name = "DIR",
        default_value = ".dev-state",
        requires = "dev"
    )]
    state_dir: PathBuf,

    /// API listener of --dev (HTTPS, mutual TLS); port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8443",
        requires = "dev"
    )]
    listen: SocketAddr,

    /// Operations listener of --dev (/healthz, /readyz, /metrics; plain HTTP).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:9090",
        requires = "dev"
    )]
    metrics_listen: SocketAddr,

    /// Embedded CA listener of --dev (plain HTTP).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8080",
        requires = "dev"
    )]
    ca_listen: SocketAddr,

    /// Algorithm of new user keys in --dev: ec-p256, ec-p384, rsa-2048 or rsa-3072.
    #[arg(long, value_name = "ALG", default_value = "ec-p256", requires = "dev",
          value_parser = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"])]
    key_algorithm: String,

    /// How user keys are held in --dev: wrapped (blobs under the KEK) or resident (token objects).
    #[arg(long, value_name = "MODE", default_value = "wrapped", requires = "dev",
          value_parser = ["wrapped", "resident"])]
    key_mode: String,

    /// Ask for certificate status (`/ocsp` and `/crl`) under this base URL instead of the
    /// embedded CA's listener in --dev, e.g. a proxy that a test can stop.
    #[arg(long, value_name = "URL", requires = "dev")]
    status_via: Option<String>,

    /// Where the certificate status check looks first in --dev: ocsp or crl (`[status] first`).
    #[arg(long, value_name = "SOURCE", default_value = "ocsp", requires = "dev",
          value_parser = ["ocsp", "crl"])]
    status_first: String,

    /// When no fresh certificate status can be had in --dev, accept a good answer this many
    /// seconds past its maximum age (default 0: refuse with `status_unavailable`).
    #[arg(long, value_name = "SECONDS", default_value_t = 0, requires = "dev")]
    status_grace: u64,

    /// With --dev: make the state directory (token, system keys, embedded CA, TLS and client
    /// certificates, configuration), start once to check it, and exit.
    #[arg(long, requires = "dev")]
    init_only: bool,

    /// With --config: while FILE does not exist (an appliance not provisioned yet), serve only
    /// /healthz, a 503 /readyz saying so and /metrics on ADDR (plain HTTP), and start as soon
    /// as FILE appears.
    #[arg(long, value_name = "ADDR", requires = "config")]
    wait_for_config: Option<SocketAddr>,

    /// Log format, overriding the configuration: text or json.
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
}

/// The command line's definition: its man page and shell completions are made from it.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Runs the command line; the binary's `main`.
pub fn main() -> ExitCode {
    if let Err(error) = crate::systemd::refuse_core_dumps() {
        eprintln!("smartsignd: cannot refuse core dumps (PR_SET_DUMPABLE): {error}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        return match Config::load(path) {
            Ok(_) => {
                println!("{}: valid", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("smartsignd: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let result = if cli.dev {
        run_dev(&cli)
    } else if let Some(path) = &cli.config {
        match cli
            .wait_for_config
            .map(|address| crate::provisioning::wait(path, address))
        {
            Some(Ok(crate::provisioning::Waited::Stopped)) => return ExitCode::SUCCESS,
            Some(Err(error)) => {
                eprintln!("smartsignd: {error}");
                return ExitCode::FAILURE;
            }
            Some(Ok(crate::provisioning::Waited::Provisioned)) | None => {}
        }
        Config::load(path)
            .map_err(|error| error.to_string())
            .and_then(|config| run(config, cli.log_format.as_deref()))
            .map(|()| ExitCode::SUCCESS)
    } else {
        Err("give --config FILE, --check-config FILE or --dev (see --help)".into())
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("smartsignd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run_dev(cli: &Cli) -> Result<ExitCode, String> {
    if crate::dev::prepare(&cli.state_dir)? {
        return Err(crate::dev::rerun_with_token(&cli.state_dir));
    }
    let state_dir = std::fs::canonicalize(&cli.state_dir).map_err(|error| error.to_string())?;
    let runtime = runtime()?;
    runtime
        .block_on(async {
            let ca_listener = crate::http::bind(cli.ca_listen, "embedded CA").await?;
            let ca_address = ca_listener
                .local_addr()
                .map_err(|error| error.to_string())?;
            ca_bridge::dev_pki::DevPki::ensure(&state_dir).map_err(|error| {
                format!("cannot make the development TLS certificates: {error}")
            })?;
            crate::dev::write_examples(&state_dir)?;
            let mut config =
                crate::dev::config(&state_dir, cli.listen, cli.metrics_listen, ca_address);
            config.policy.key_algorithm = cli.key_algorithm.clone();
            config.hsm.key_mode = cli.key_mode.clone();
            if let Some(base) = &cli.status_via {
                let base = base.trim_end_matches('/');
                config.status.ocsp_url = Some(format!("{base}/ocsp"));
                config.status.crl_url = Some(format!("{base}/crl"));
            }
            config.status.first = cli.status_first.clone();
            if cli.status_grace > 0 {
                config.status.on_unavailable = "grace".into();
                config.status.grace_seconds = cli.status_grace;
            }
            crate::dev::write_config(&state_dir, &config)?;
            init_logging(&config, cli.log_format.as_deref())?;
            if config.hsm.lock_memory {
                crate::memory::lock(false)?;
            }
            let so_pin = crate::server::read_pin(&state_dir.join("hsm/so.pin"))?;
            crate::server::run(
                config,
                Some(crate::server::DevOptions {
                    so_pin,
                    state_dir,
                    ca_listener: Some(ca_listener),
                    ca_address: None,
                    exit_when_ready: cli.init_only,
                }),
            )
            .await
        })
        .map(|()| ExitCode::SUCCESS)
}

fn run(config: Config, log_format: Option<&str>) -> Result<(), String> {
    init_logging(&config, log_format)?;
    if config.hsm.lock_memory {
        crate::memory::lock(true)?;
    } else {
        tracing::warn!("[hsm] lock_memory = false: the PIN and the unseal shares may reach swap");
    }
    runtime()?.block_on(crate::server::run(config, None))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("smartsignd")
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))
}

fn init_logging(config: &Config, format: Option<&str>) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.logging.level)
        .map_err(|error| format!("logging.level: {error}"))?;
    // Colours only for a person at a terminal: never in the journal or a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = if format.unwrap_or(&config.logging.format) == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|error| format!("cannot start logging: {error}"))
}
