//! Keeps the daemon's memory out of swap: the HSM user PIN, the officers' unseal shares (which
//! arrive in HTTP bodies, so in buffers no type of ours owns) and unwrapped data keys must never
//! be written to a swap device, where they would outlive the process and any zeroisation.
//!
//! `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` locks every page the process has and will
//! have as it is touched, so nothing is prefaulted and the resident size stays what it was. It
//! holds only when the kernel lets the process lock without bound: `CAP_IPC_LOCK`, or an
//! unlimited `RLIMIT_MEMLOCK` (the unit's `LimitMEMLOCK=infinity`). Under a finite limit the
//! lock would succeed now and make an allocation fail later, so the daemon refuses to start
//! instead (`[hsm] lock_memory = false` turns the lock off, for machines without swap).

use rustix::mm::{MlockAllFlags, mlockall};
use rustix::process::{Resource, getrlimit};
use rustix::thread::{CapabilitySet, capabilities};

/// Whether this process may lock all its memory without running into a limit later.
fn unbounded() -> bool {
    let capable =
        capabilities(None).is_ok_and(|sets| sets.effective.contains(CapabilitySet::IPC_LOCK));
    capable || getrlimit(Resource::Memlock).current.is_none()
}

/// Locks the process's memory. With `required` (production), a process that cannot is an
/// error saying how to allow it; without (development), a warning and nothing locked.
pub(crate) fn lock(required: bool) -> Result<(), String> {
    const HOW: &str = "give the daemon CAP_IPC_LOCK or LimitMEMLOCK=infinity (the unit in \
                       ops/deploy has it), or set [hsm] lock_memory = false on a machine \
                       without swap";
    if !unbounded() {
        let limit = getrlimit(Resource::Memlock).current.unwrap_or_default();
        let reason = format!(
            "cannot keep the PIN and the unseal shares out of swap: RLIMIT_MEMLOCK is \
             {limit} bytes and the process lacks CAP_IPC_LOCK"
        );
        if required {
            return Err(format!("{reason}; {HOW}"));
        }
        tracing::warn!("{reason} (development mode goes on)");
        return Ok(());
    }
    if let Err(error) =
        mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
    {
        if required {
            return Err(format!("mlockall: {error}; {HOW}"));
        }
        tracing::warn!(%error, "mlockall failed (development mode goes on)");
        return Ok(());
    }
    tracing::info!("memory locked: nothing of the process reaches swap");
    Ok(())
}
