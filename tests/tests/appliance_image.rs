//! The appliance image booted in qemu (issue 18), checked from outside as an operator would:
//! over forwarded ports and the serial console only. Run by `ops/image/test`, which builds the
//! image and names it in `SMARTSIGN_IMAGE`; `SMARTSIGN_IMAGE_REBOOT=1` adds the reboot.
//!
//! 1. First boot, no medium: the console and `/readyz` say the appliance waits for its
//!    provisioning; the root is read-only squashfs, and the state partition was made and grew
//!    to the end of a disk larger than the image.
//! 2. The provisioning medium is inserted (hot-plugged): the appliance provisions itself and
//!    comes up sealed; the medium carries back the officers' certificates and shares.
//! 3. Two officers unseal it over the API port; an account registers and signs; openssl on this
//!    machine verifies the signature against the certificate the appliance returned.
//! 4. Only the allowed ports answer.
//! 5. (Reboot) After a power cycle it comes up sealed, the officers unseal it, the same account
//!    signs again, and the audit log verifies.
//! 6. (Reboot) `ops/image/update` writes the image into slot B with the disk offline: the
//!    appliance boots root B on the same state, and the account signs a third time.
//!
//! Root A's bytes are those the build made after every boot (and root B's after the update).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;
use smartsign_tests::flow::{Pending, unseal_from_medium, verify_audit, verify_signature};
use smartsign_tests::{DevDaemon, describe, device_key, run, workspace_root};

/// How long a boot may take under software emulation.
const BOOT: Duration = Duration::from_secs(900);

/// The guest ports the image serves, and some it must not.
const API: u16 = 8443;
const OPS: u16 = 9090;
const CA: u16 = 8080;
const CLOSED: [u16; 4] = [22, 9091, 5432, 8081];

/// One boot of the image in qemu.
struct Vm {
    child: Option<Child>,
    dir: PathBuf,
    /// Host address of each forwarded guest port.
    ports: Vec<(u16, String)>,
}

impl Vm {
    /// Boots the disk; a boot whose kernel has not started systemd after three minutes is an
    /// emulator's hang (seen under TCG before any of the image's code runs): it is powered off
    /// and booted again, twice at most.
    fn boot(dir: &Path, ports: &[(u16, String)]) -> Vm {
        for attempt in 1..=3 {
            let mut vm = Vm::start(dir, ports);
            let deadline = Instant::now() + Duration::from_secs(180);
            while Instant::now() < deadline {
                if vm.console().contains("systemd[1]: ") {
                    return vm;
                }
                if let Some(status) = vm.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    panic!(
                        "qemu exited ({status}):\n{}",
                        std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            eprintln!(
                "boot attempt {attempt}: no systemd after 180 s; the console ends:\n{}",
                tail(&vm.console())
            );
        }
        panic!("the image did not boot in three attempts");
    }

    fn start(dir: &Path, ports: &[(u16, String)]) -> Vm {
        let forwards: String = ports
            .iter()
            .map(|(guest, host)| format!(",hostfwd=tcp:{host}-:{guest}"))
            .collect();
        let _ = std::fs::remove_file(dir.join("monitor.sock"));
        let child = Command::new("qemu-system-x86_64")
            // Software emulation: the same on every machine (a nested KVM may fail mid-boot).
            .args(["-machine", "pc", "-accel", "tcg,thread=multi"])
            // One processor: SMP guests under TCG have hung in early boot here.
            .args(["-m", "1536", "-smp", "1", "-display", "none"])
            .arg("-no-user-config")
            .arg("-drive")
            .arg("if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,file={}",
                dir.join("vars.fd").display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=virtio,format=raw,cache=writeback,file={}",
                dir.join("disk.img").display()
            ))
            .args(["-netdev", &format!("user,id=net0{forwards}")])
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-monitor")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("monitor.sock").display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 (ops/image/test installs it)");
        Vm {
            child: Some(child),
            dir: dir.to_path_buf(),
            ports: ports.to_vec(),
        }
    }

    fn host(&self, guest: u16) -> &str {
        &self
            .ports
            .iter()
            .find(|(port, _)| *port == guest)
            .unwrap()
            .1
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("console.log")).unwrap_or_default())
            .into_owned()
    }

    /// Waits until `found` holds, failing with the console's end after `limit`.
    fn wait(&mut self, what: &str, limit: Duration, mut found: impl FnMut(&Vm) -> bool) {
        let deadline = Instant::now() + limit;
        while !found(self) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "qemu exited ({status}) while waiting for {what}:\n{}\n{}",
                    tail(&self.console()),
                    std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} after {limit:?}; console:\n{}",
                tail(&self.console())
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// One command on qemu's monitor; its answer.
    fn monitor(&self, command: &str) -> String {
        let stream = UnixStream::connect(self.dir.join("monitor.sock")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        writeln!(writer, "{command}").unwrap();
        let mut answer = String::new();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        // The banner, the echo, the answer, the next prompt.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => answer.push_str(&line),
            }
        }
        answer
    }

    /// An orderly shutdown (the power button), or a hard one after two minutes.
    fn power_off(&mut self) {
        self.monitor("system_powerdown");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(180);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                eprintln!("the guest did not power off in time: killing qemu");
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn readyz(vm: &Vm) -> Option<(u16, String)> {
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{}/readyz", vm.host(OPS)))
        .send()
        .ok()?;
    Some((response.status().as_u16(), response.text().ok()?))
}

/// Whether anything answers an HTTP request on the forwarded guest port within 10 s.
fn answers(vm: &Vm, guest: u16) -> bool {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
        .get(format!("http://{}/", vm.host(guest)))
        .send()
        .is_ok()
}

/// Where the root slots start on the disk: after 1 MiB, the 128 MiB ESP, and root A's 768 MiB.
const ROOT_A: u64 = 129 * 1024 * 1024;
const ROOT_B: u64 = (129 + 768) * 1024 * 1024;

/// The SHA-256 of `length` bytes of the disk from `start`.
fn partition_sha256(disk: &Path, start: u64, length: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(disk).unwrap();
    file.seek(SeekFrom::Start(start)).unwrap();
    let mut digest = sha2::Sha256::new();
    let mut left = length;
    let mut buffer = vec![0; 1 << 20];
    while left > 0 {
        let take = usize::try_from(left.min(1 << 20)).unwrap();
        file.read_exact(&mut buffer[..take]).unwrap();
        digest.update(&buffer[..take]);
        left -= take as u64;
    }
    hex::encode(digest.finalize())
}

fn unseal(vm: &Vm, out: &Path, officer: &str) {
    unseal_from_medium(&format!("https://{}", vm.host(API)), out, officer);
}

fn sh(command: &mut Command) {
    let output = run(command);
    assert!(output.status.success(), "{}", describe(&output));
}

#[test]
#[ignore = "boots the appliance image in qemu: run by ops/image/test"]
fn the_image_boots_sealed_provisions_unseals_signs_and_survives_a_reboot() {
    let image = PathBuf::from(
        std::env::var("SMARTSIGN_IMAGE").expect("SMARTSIGN_IMAGE: the image ops/image/build made"),
    );
    let reboot = std::env::var("SMARTSIGN_IMAGE_REBOOT").is_ok_and(|value| value == "1");
    let squashfs = image.with_file_name("root.squashfs");
    let root_sha = hex::encode(sha2::Sha256::digest(std::fs::read(&squashfs).unwrap()));
    let root_len = std::fs::metadata(&squashfs).unwrap().len();

    let scratch = tempfile::Builder::new()
        .prefix("smartsign-image-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = scratch.path();
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(dir.join("disk.img")));
    // Installed on a disk 1 GiB larger than the image: the state partition takes the rest.
    sh(Command::new("truncate")
        .args(["--size", "+1G"])
        .arg(dir.join("disk.img")));
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", dir.join("vars.fd")).unwrap();
    // The provisioning medium: FAT, labelled SMARTSIGN, with provision.toml.
    let medium = dir.join("medium.img");
    sh(Command::new("mkfs.fat")
        .args(["-C", "-n", "SMARTSIGN"])
        .arg(&medium)
        .arg("65536"));
    std::fs::write(
        dir.join("provision.toml"),
        "profile = \"development\"\n[officers]\nnames = [\"officer-1\", \"officer-2\", \
         \"officer-3\"]\nthreshold = 2\n",
    )
    .unwrap();
    sh(Command::new("mcopy")
        .arg("-i")
        .arg(&medium)
        .arg(dir.join("provision.toml"))
        .arg("::provision.toml"));

    // Distinct host ports: each held until all are chosen.
    let held: Vec<std::net::TcpListener> = (0..3 + CLOSED.len())
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<(u16, String)> = [API, OPS, CA]
        .into_iter()
        .chain(CLOSED)
        .zip(&held)
        .map(|(guest, listener)| (guest, listener.local_addr().unwrap().to_string()))
        .collect();
    drop(held);
    let started = Instant::now();
    let mut vm = Vm::boot(dir, &ports);

    // 1. Not provisioned: the console and /readyz say so.
    vm.wait("the unprovisioned /readyz", BOOT, |vm| {
        readyz(vm).is_some_and(|(status, body)| status == 503 && body.contains("not provisioned"))
    });
    let booted = started.elapsed();
    vm.wait("the console's banner", Duration::from_secs(60), |vm| {
        vm.console().contains("insert the provisioning medium")
    });
    let console = vm.console();
    assert!(
        console.contains("smartsign: root / squashfs ro"),
        "{}",
        tail(&console)
    );
    assert!(
        console.contains("smartsign: state /var ext4 rw"),
        "{}",
        tail(&console)
    );
    assert!(
        !console.contains("login:"),
        "a login prompt:\n{}",
        tail(&console)
    );
    let state_bytes: u64 = console
        .lines()
        .find_map(|line| line.split("smartsign: state /var ").nth(1))
        .and_then(|rest| rest.split_whitespace().nth(3))
        .and_then(|bytes| bytes.parse().ok())
        .unwrap_or_else(|| panic!("no state size in the banner:\n{}", tail(&console)));
    assert!(
        state_bytes > 1_800 * 1024 * 1024,
        "the state file system did not grow to the disk's end: {state_bytes} bytes"
    );

    // 2. The medium goes in; the appliance provisions itself and comes up sealed.
    let added = vm.monitor(&format!(
        "drive_add 0 if=none,id=medium,format=raw,file={}",
        medium.display()
    ));
    assert!(added.contains("OK"), "{added}");
    vm.monitor("device_add virtio-blk-pci,drive=medium,id=medium");
    vm.wait("the end of the provisioning", BOOT, |vm| {
        let console = vm.console();
        assert!(
            !console.contains("provisioning failed"),
            "{}",
            tail(&console)
        );
        console.contains("provisioning finished")
    });
    vm.monitor("device_del medium");
    std::thread::sleep(Duration::from_secs(2));
    let out = dir.join("out");
    sh(Command::new("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(&medium)
        .arg("::out")
        .arg(dir));
    vm.wait("the sealed daemon", BOOT, |vm| {
        readyz(vm).is_some_and(|(status, body)| status == 503 && body.contains("\"sealed\":true"))
    });

    // 3. Two officers unseal; an account signs; openssl verifies.
    unseal(&vm, &out, "officer-1");
    unseal(&vm, &out, "officer-2");
    vm.wait("readiness after the unseal", BOOT, |vm| {
        readyz(vm).is_some_and(|(status, _)| status == 200)
    });
    let api = format!("https://{}", vm.host(API));
    let ops = format!("http://{}", vm.host(OPS));
    let daemon = DevDaemon::attach(&out, &api, &ops);
    let key = device_key();
    let registered = daemon
        .client("registrar")
        .post(format!("{api}/v1/accounts"))
        .json(&smartsign_tests::flow::registration(
            "u-image",
            "1990-01-01",
            &key,
        ))
        .send()
        .unwrap();
    assert_eq!(registered.status(), 201);
    let document = b"signed on the appliance image";
    let pending = Pending::for_account(
        &daemon,
        "u-image",
        key.clone(),
        sha2::Sha256::digest(document).to_vec(),
    );
    assert_eq!(pending.approve(&daemon).status(), 200);
    verify_signature(&pending.read(&daemon), document);

    // 4. Only the allowed ports answer.
    assert!(answers(&vm, OPS) && answers(&vm, CA));
    for port in CLOSED {
        assert!(!answers(&vm, port), "port {port} answers");
    }

    if reboot {
        // 5. A power cycle: sealed again, unsealed, the same account signs, the log verifies.
        vm.power_off();
        let mut vm = Vm::boot(dir, &ports);
        vm.wait("the sealed daemon after the reboot", BOOT, |vm| {
            readyz(vm)
                .is_some_and(|(status, body)| status == 503 && body.contains("\"sealed\":true"))
        });
        unseal(&vm, &out, "officer-2");
        unseal(&vm, &out, "officer-3");
        vm.wait("readiness after the second unseal", BOOT, |vm| {
            readyz(vm).is_some_and(|(status, _)| status == 200)
        });
        let again = b"signed after the reboot";
        let pending = Pending::for_account(
            &daemon,
            "u-image",
            key.clone(),
            sha2::Sha256::digest(again).to_vec(),
        );
        assert_eq!(pending.approve(&daemon).status(), 200);
        verify_signature(&pending.read(&daemon), again);
        let audit = dir.join("audit");
        std::fs::create_dir_all(&audit).unwrap();
        let records = verify_audit(&daemon, &audit);
        assert_eq!(records.matches("\"signing.signed\"").count(), 2);
        vm.power_off();

        // 6. An update into slot B (ops/image/update, the disk offline) keeps the state: the
        //    appliance boots root B, sealed, and the same account signs a third time.
        let image_dir = image.parent().unwrap();
        sh(Command::new(workspace_root().join("ops/image/update"))
            .arg("--disk")
            .arg(dir.join("disk.img"))
            .arg("--from")
            .arg(image_dir));
        let mut vm = Vm::boot(dir, &ports);
        vm.wait("the sealed daemon on root B", BOOT, |vm| {
            readyz(vm)
                .is_some_and(|(status, body)| status == 503 && body.contains("\"sealed\":true"))
        });
        let console = vm.console();
        assert!(
            console.contains("smartsign: root / squashfs ro /dev/vda3"),
            "{}",
            tail(&console)
        );
        unseal(&vm, &out, "officer-1");
        unseal(&vm, &out, "officer-3");
        vm.wait("readiness on root B", BOOT, |vm| {
            readyz(vm).is_some_and(|(status, _)| status == 200)
        });
        let third = b"signed after the update";
        let pending = Pending::for_account(
            &daemon,
            "u-image",
            key,
            sha2::Sha256::digest(third).to_vec(),
        );
        assert_eq!(pending.approve(&daemon).status(), 200);
        verify_signature(&pending.read(&daemon), third);
        vm.power_off();
        assert_eq!(
            partition_sha256(&dir.join("disk.img"), ROOT_B, root_len),
            root_sha
        );
    } else {
        vm.power_off();
    }
    // Root A is the squashfs the build made, byte for byte: nothing ever wrote to it.
    assert_eq!(
        partition_sha256(&dir.join("disk.img"), ROOT_A, root_len),
        root_sha
    );
    eprintln!(
        "appliance image: first boot to an unprovisioned /readyz in {:.0} s, whole test {:.0} s",
        booted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
