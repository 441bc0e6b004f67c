//! Black-box tests of smartsign: they run the built `smartsignd` and `smartsign-ctl` on SoftHSM
//! tokens made in temporary directories and talk to them as their users do, with real peers
//! (openssl, pkcs11-tool) checking what comes out. The tests are in `tests/`; this library holds
//! what they share: finding the freshly built binaries and making tokens.

#![forbid(unsafe_code)]
// Test support: a panic, with the reason, is how it reports a failure.
#![allow(clippy::expect_used)]

pub mod flow;
pub mod pg;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The workspace's root directory.
pub fn workspace_root() -> &'static Path {
    // This crate's manifest sits one level below the workspace root.
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The path of binary `bin` of package `package`, built now from the current sources.
///
/// `cargo test` does not build other packages' binaries, so the first call for each binary runs
/// `cargo build` (cargo releases its build lock while tests run). Panics with cargo's output if
/// the build fails: a test cannot run without its binary.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A relative CARGO_TARGET_DIR is relative to where cargo ran: the workspace, for these tests.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace_root().join(dir))
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target_dir.join("debug").join(bin);
    if !built.iter().any(|name| name == bin) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .args(["build", "--quiet", "--locked", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .output()
            .unwrap_or_else(|error| panic!("cannot run cargo build for {bin}: {error}"));
        assert!(
            output.status.success(),
            "cargo build of {bin} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        built.push(bin.to_owned());
    }
    path
}

/// A SoftHSM token in a directory of its own, with its own `softhsm2.conf`, made by
/// `softhsm-config/softhsm-setup` as the development run and CI make theirs. Processes started
/// with [`SoftHsmToken::command`] see only this token.
#[derive(Debug)]
pub struct SoftHsmToken {
    dir: tempfile::TempDir,
    label: String,
}

impl SoftHsmToken {
    /// Makes a token labelled `label` with random PINs.
    pub fn new(label: &str) -> SoftHsmToken {
        // Token generation is far faster on tmpfs.
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::Builder::new()
                .prefix("smartsign-test-")
                .tempdir_in("/dev/shm"),
            false => tempfile::Builder::new().prefix("smartsign-test-").tempdir(),
        }
        .expect("temporary directory");
        let token = SoftHsmToken {
            dir,
            label: label.to_owned(),
        };
        let output = Command::new(workspace_root().join("softhsm-config/softhsm-setup"))
            .arg("token")
            .arg("--dir")
            .arg(token.hsm_dir())
            .args(["--label", label])
            .arg("--so-pin-file")
            .arg(token.so_pin_file())
            .arg("--pin-file")
            .arg(token.pin_file())
            .output()
            .expect("run softhsm-setup");
        assert!(
            output.status.success(),
            "softhsm-setup: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        token
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The directory holding `softhsm2.conf` and `tokens/`.
    pub fn hsm_dir(&self) -> PathBuf {
        self.dir.path().join("hsm")
    }

    /// The `softhsm2.conf` to put in `SOFTHSM2_CONF`.
    pub fn conf(&self) -> PathBuf {
        self.hsm_dir().join("softhsm2.conf")
    }

    /// The file holding the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user.pin")
    }

    /// The file holding the security officer's PIN.
    pub fn so_pin_file(&self) -> PathBuf {
        self.dir.path().join("so.pin")
    }

    /// The user PIN, for peers (pkcs11-tool) that only take it on the command line.
    pub fn pin(&self) -> String {
        std::fs::read_to_string(self.pin_file())
            .expect("read PIN file")
            .trim()
            .to_owned()
    }

    /// A scratch directory that lives as long as the token.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// A command for `program` that sees this token (and only this one).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("SOFTHSM2_CONF", self.conf());
        command
    }
}

/// Runs `command` and returns its output, panicking if it could not start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"))
}

/// Standard output and error of `output`, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A `smartsignd --dev` on free loopback ports, with its state directory in a temporary
/// directory (on tmpfs when there is one). Stopped with SIGTERM when dropped.
#[derive(Debug)]
pub struct DevDaemon {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    audit_quota_kib: Option<u32>,
    /// A node's configuration file: it runs `smartsignd --config` on another daemon's state.
    config: Option<PathBuf>,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    /// `https://127.0.0.1:PORT` of the API.
    pub api: String,
    /// `http://127.0.0.1:PORT` of the operations listener.
    pub metrics: String,
    /// `http://127.0.0.1:PORT` of the embedded CA.
    pub ca: String,
}

impl DevDaemon {
    /// Starts a daemon with a fresh state directory; `extra_args` go on its command line (for
    /// example `--key-algorithm rsa-2048`).
    pub fn start(extra_args: &[&str]) -> DevDaemon {
        let base = if Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("smartsignd-test-")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::Builder::new()
                .prefix("smartsignd-test-")
                .tempdir()
        }
        .expect("temporary state directory");
        let mut daemon = DevDaemon {
            child: None,
            dir: base,
            audit_quota_kib: None,
            config: None,
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            env: Vec::new(),
            api: String::new(),
            metrics: String::new(),
            ca: String::new(),
        };
        daemon.launch();
        daemon
    }

    /// A handle on a daemon this test did not start (an appliance): `files` holds `clients/`
    /// and `tls/ca.pem` as [`DevDaemon::client`] reads them (a provisioning medium's `out/`),
    /// and `api`, `metrics` are its URLs. Dropping it stops nothing.
    pub fn attach(files: &Path, api: &str, metrics: &str) -> DevDaemon {
        let dir = tempfile::Builder::new()
            .prefix("smartsignd-attached-")
            .tempdir()
            .expect("temporary directory");
        std::os::unix::fs::symlink(files, dir.path().join("state")).expect("link to the files");
        DevDaemon {
            child: None,
            dir,
            audit_quota_kib: None,
            config: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            api: api.to_owned(),
            metrics: metrics.to_owned(),
            ca: String::new(),
        }
    }

    /// Starts a daemon whose audit directory is a tmpfs of `kib` KiB in a mount namespace of its
    /// own (`unshare -m`, which needs root), so that a test can fill it and watch the daemon fail
    /// closed.
    pub fn start_with_audit_quota(kib: u32) -> DevDaemon {
        let base = tempfile::Builder::new()
            .prefix("smartsignd-test-")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .expect("temporary state directory");
        let mut daemon = DevDaemon {
            child: None,
            dir: base,
            audit_quota_kib: Some(kib),
            config: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            api: String::new(),
            metrics: String::new(),
            ca: String::new(),
        };
        daemon.launch();
        daemon
    }

    /// A second `--dev` daemon on a copy of this one's state directory (token, store, audit log,
    /// TLS and clients), started beside it: the two then go their own ways, as a restored or
    /// cloned appliance would (same audit key, separate logs). This one is stopped for the copy,
    /// so that the copy is consistent, and started again.
    pub fn fork(&mut self) -> DevDaemon {
        self.stop();
        let base = tempfile::Builder::new()
            .prefix("smartsignd-fork-")
            .tempdir_in(self.dir.path().parent().expect("a parent"))
            .expect("temporary state directory");
        let copied = run(Command::new("cp")
            .arg("-a")
            .arg(self.state_dir())
            .arg(base.path().join("state")));
        assert!(copied.status.success(), "{}", describe(&copied));
        // The token configuration names the original's token directory; made again, it names
        // the copy's.
        std::fs::remove_file(base.path().join("state/hsm/softhsm2.conf"))
            .expect("the copy's softhsm2.conf");
        let mut copy = DevDaemon {
            child: None,
            dir: base,
            audit_quota_kib: None,
            config: None,
            extra_args: self.extra_args.clone(),
            env: self.env.clone(),
            api: String::new(),
            metrics: String::new(),
            ca: String::new(),
        };
        copy.launch();
        self.launch();
        copy
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's standard error so far (its log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The daemon's standard output so far (the how-to).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// One of the daemon's log files, opened for appending (every run of the test adds to it).
    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .expect("log file")
    }

    /// Has the dev TLS CA certify a new client, `clients/NAME.pem` and `.key`, as a CA operator
    /// would with openssl: an EC P-256 key, subject `OU=ou, CN=name`, clientAuth, a random serial
    /// (openssl 3 with no serial file). Then
    /// [`DevDaemon::client`] connects as it.
    pub fn issue_client_certificate(&self, name: &str, ou: &str) {
        let state = self.state_dir();
        let clients = state.join("clients");
        let scratch = tempfile::tempdir().expect("scratch directory");
        let request = scratch.path().join("client.csr");
        let made = run(Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes",
                "-subj",
                &format!("/O=smartsign dev/OU={ou}/CN={name}"),
            ])
            .arg("-keyout")
            .arg(clients.join(format!("{name}.key")))
            .arg("-out")
            .arg(&request));
        assert!(made.status.success(), "{}", describe(&made));
        let extensions = scratch.path().join("ext.cnf");
        std::fs::write(
            &extensions,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = clientAuth\n",
        )
        .expect("extensions file");
        let signed = run(Command::new("openssl")
            .args(["x509", "-req", "-days", "30", "-in"])
            .arg(&request)
            .arg("-CA")
            .arg(state.join("tls/ca.pem"))
            .arg("-CAkey")
            .arg(state.join("tls/ca.key"))
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(clients.join(format!("{name}.pem"))));
        assert!(signed.status.success(), "{}", describe(&signed));
    }

    /// Another daemon on this one's token, TLS files, clients and CA (which this `--dev` run
    /// hosts): `smartsignd --config` with this run's configuration, on new free ports, without
    /// the embedded CA, and as `edit` changes it (for example a PostgreSQL `[store]` and an
    /// audit directory of its own: a node has its own disk). Returns once the node answers `/healthz`. A node's
    /// [`DevDaemon::start_again`] runs the same configuration again.
    pub fn node(&self, name: &str, edit: impl FnOnce(&mut toml::Table)) -> DevDaemon {
        let text = std::fs::read_to_string(self.state_dir().join("smartsignd.toml"))
            .expect("the dev configuration");
        let mut config: toml::Table = toml::from_str(&text).expect("the dev configuration parses");
        let (api, metrics) = (free_address(), free_address());
        let server = config["server"].as_table_mut().expect("[server]");
        server.insert("listen".into(), api.clone().into());
        server.insert("metrics_listen".into(), metrics.clone().into());
        config["ca"]
            .as_table_mut()
            .expect("[ca]")
            .remove("embedded");
        let dir = tempfile::Builder::new()
            .prefix(&format!("smartsignd-{name}-"))
            .tempdir_in(self.dir.path().parent().expect("a parent"))
            .expect("node directory");
        config["audit"].as_table_mut().expect("[audit]").insert(
            "dir".into(),
            dir.path().join("audit").display().to_string().into(),
        );
        edit(&mut config);
        std::os::unix::fs::symlink(self.state_dir(), dir.path().join("state"))
            .expect("link the shared state");
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&config).expect("serialise")).expect("write");
        let mut node = DevDaemon {
            child: None,
            dir,
            audit_quota_kib: None,
            config: Some(path.clone()),
            extra_args: Vec::new(),
            env: self.env.clone(),
            api: String::new(),
            metrics: String::new(),
            ca: self.ca.clone(),
        };
        node.launch_with_config(
            &path,
            &format!("https://{api}"),
            &format!("http://{metrics}"),
        );
        node
    }

    fn launch(&mut self) {
        if let Some(config) = self.config.clone() {
            let (api, metrics) = (self.api.clone(), self.metrics.clone());
            return self.launch_with_config(&config, &api, &metrics);
        }
        let endpoints = self.state_dir().join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let mut command = match self.audit_quota_kib {
            None => Command::new(binary("smartsignd", "smartsignd")),
            Some(kib) => {
                let mut command = Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(
                        "mkdir -p \"$1\" && mount -t tmpfs -o size=\"$2\"k smartsign-audit \"$1\" \
                         && shift 2 && exec \"$@\"",
                    )
                    .arg("sh")
                    .arg(self.state_dir().join("audit"))
                    .arg(kib.to_string())
                    .arg(binary("smartsignd", "smartsignd"));
                command
            }
        };
        let child = command
            .arg("--dev")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--ca-listen", "127.0.0.1:0"])
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(self.log_file("stdout.log"))
            .stderr(self.log_file("stderr.log"))
            .spawn()
            .expect("start smartsignd");
        self.child = Some(child);
        self.wait_for("write endpoints.json", 120, |daemon| {
            let Ok(text) = std::fs::read_to_string(&endpoints) else {
                return false;
            };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
                return false;
            };
            daemon.api = value["api"].as_str().expect("api").to_owned();
            daemon.metrics = value["metrics"].as_str().expect("metrics").to_owned();
            daemon.ca = value["ca"].as_str().expect("ca").to_owned();
            true
        });
    }

    /// Waits until `ready` says so; fails the test, with the daemon's log, if the daemon exits
    /// first or `seconds` pass.
    fn wait_for(&mut self, what: &str, seconds: u64, mut ready: impl FnMut(&mut Self) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        while !ready(self) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("smartsignd exited early ({status}):\n{}", self.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "smartsignd did not {what} in time:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Starts `smartsignd --config FILE` in place of the `--dev` run (stopped first), on the same
    /// state directory and token, its output appended to the same logs. `api` and `metrics` are
    /// the URLs of the listeners the file configures; it returns once `/healthz` answers, which
    /// a sealed daemon does too.
    pub fn launch_with_config(&mut self, config: &Path, api: &str, metrics: &str) {
        self.stop();
        let child = Command::new(binary("smartsignd", "smartsignd"))
            .arg("--config")
            .arg(config)
            .env("SOFTHSM2_CONF", self.state_dir().join("hsm/softhsm2.conf"))
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(self.log_file("stdout.log"))
            .stderr(self.log_file("stderr.log"))
            .spawn()
            .expect("start smartsignd --config");
        self.child = Some(child);
        self.api = api.to_owned();
        self.metrics = metrics.to_owned();
        let plain = reqwest::blocking::Client::new();
        self.wait_for("answer /healthz", 60, |_| {
            plain
                .get(format!("{metrics}/healthz"))
                .send()
                .is_ok_and(|response| response.status() == 200)
        });
    }

    /// Restarts the daemon with its `--dev` configuration (`DIR/smartsignd.toml`) changed: each
    /// `(key, value)` replaces the first line `key = ...` (the `[server]` section comes first; a
    /// key that is not there is added to it), and the API and operations listeners move to new
    /// free ports. Returns once `/healthz` answers.
    pub fn relaunch_with_settings(&mut self, settings: &[(&str, &str)]) {
        let mut text = std::fs::read_to_string(self.state_dir().join("smartsignd.toml"))
            .expect("the dev configuration");
        let api = free_address();
        let metrics = free_address();
        let listeners = [
            ("listen", format!("\"{api}\"")),
            ("metrics_listen", format!("\"{metrics}\"")),
        ];
        for (key, value) in settings
            .iter()
            .map(|(key, value)| (*key, (*value).to_owned()))
            .chain(listeners.iter().map(|(key, value)| (*key, value.clone())))
        {
            let prefix = format!("{key} = ");
            let lines: Vec<&str> = text.lines().collect();
            let found: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].starts_with(&prefix))
                .collect();
            let mut changed: Vec<String> = lines.iter().map(|line| (*line).to_owned()).collect();
            match found.first() {
                Some(&line) => changed[line] = format!("{prefix}{value}"),
                None => {
                    let server = lines
                        .iter()
                        .position(|line| *line == "[server]")
                        .expect("a [server] section");
                    changed.insert(server + 1, format!("{prefix}{value}"));
                }
            }
            text = changed.join("\n") + "\n";
        }
        let path = self.state_dir().join("tuned.toml");
        std::fs::write(&path, text).expect("write the changed configuration");
        self.launch_with_config(
            &path,
            &format!("https://{api}"),
            &format!("http://{metrics}"),
        );
    }

    /// Stops the daemon with SIGTERM and waits; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            // Exited already (a failpoint's abort): nothing to signal.
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sets (or with `None` removes) an environment variable for the next start, e.g. the test
    /// failpoint `SMARTSIGND_FAILPOINT`.
    pub fn set_env(&mut self, name: &str, value: Option<&str>) {
        self.env.retain(|(known, _)| known != name);
        if let Some(value) = value {
            self.env.push((name.to_owned(), value.to_owned()));
        }
    }

    /// Whether the daemon process has exited (e.g. at a failpoint).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills the daemon from outside with SIGKILL (no chance to finish anything) and waits.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again after [`DevDaemon::kill`] or [`DevDaemon::stop`].
    pub fn start_again(&mut self) {
        self.launch();
    }

    /// Stops and starts the daemon again on the same state directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// An HTTPS client that presents `DIR/clients/NAME.pem` and trusts `DIR/tls/ca.pem`.
    pub fn client(&self, name: &str) -> reqwest::blocking::Client {
        let state = self.state_dir();
        let mut identity = std::fs::read(state.join("clients").join(format!("{name}.pem")))
            .expect("client certificate");
        identity.extend(
            std::fs::read(state.join("clients").join(format!("{name}.key"))).expect("client key"),
        );
        self.client_builder()
            .identity(reqwest::Identity::from_pem(&identity).expect("identity"))
            .build()
            .expect("client")
    }

    /// A client builder that trusts the dev TLS CA but presents no certificate.
    pub fn client_builder(&self) -> reqwest::blocking::ClientBuilder {
        let ca = std::fs::read(self.state_dir().join("tls/ca.pem")).expect("tls ca");
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca"))
            .timeout(std::time::Duration::from_secs(60))
    }
}

impl Drop for DevDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").to_string()
}

/// A new device key, as a user's phone would make it.
pub fn device_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng)
}

/// The device's public key as the registrar sends it: SubjectPublicKeyInfo PEM.
pub fn device_pem(key: &p256::ecdsa::SigningKey) -> String {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    key.verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("a P-256 key encodes")
}
