//! systemd's service notifications (sd_notify(3)) without libsystemd: `READY=1` once the daemon
//! serves signatures (at start with a PIN file, after the quorum's unseal otherwise), `STATUS=`
//! lines on the way, `STOPPING=1` at shutdown, and `WATCHDOG=1` pings at half the unit's
//! `WatchdogSec=` from a task on the runtime, so that a runtime that stops turning gets the
//! daemon restarted. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=value` lines) to the service manager, if there is one.
/// A failure is logged, never fatal: the daemon serves whether or not systemd hears it.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = socket_address(&path).and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &address)
    });
    if let Err(error) = sent {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket.
fn socket_address(path: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(path),
    }
}

/// The watchdog's ping interval: half of `WATCHDOG_USEC` when systemd set it for this process.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Makes the process impossible to dump or attach to without privilege: the HSM PIN, the
/// officers' shares and unwrapped data keys live in its memory (`PR_SET_DUMPABLE` 0, which
/// also makes `/proc/PID/mem` and friends root's only). Called first thing in `main`.
pub(crate) fn refuse_core_dumps() -> std::io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Pings the watchdog every `interval` until `shutdown`.
pub(crate) async fn watchdog(interval: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        notify("WATCHDOG=1");
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_is_not_dumpable_once_refused() {
        super::refuse_core_dumps().unwrap();
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
