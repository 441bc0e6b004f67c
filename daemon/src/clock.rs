//! The daemon's one clock. Every rule takes `now` from here; in `--dev` mode
//! `POST /v1/admin/clock` moves it (an offset from the system clock), so demonstrations and tests
//! can reach a birthday or an expiry. Without `--dev` the offset is always zero.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

/// The system clock plus a settable offset, in nanoseconds (±292 years), so that a clock set to a
/// boundary instant reads that instant, not up to a second before it.
#[derive(Debug, Default)]
pub(crate) struct DaemonClock {
    offset_nanos: AtomicI64,
}

impl DaemonClock {
    /// Now, as the rules see it.
    pub(crate) fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from(self.system_now())
    }

    fn system_now(&self) -> SystemTime {
        let offset = self.offset_nanos.load(Ordering::Relaxed);
        let real = SystemTime::now();
        if offset >= 0 {
            real + Duration::from_nanos(offset.unsigned_abs())
        } else {
            real - Duration::from_nanos(offset.unsigned_abs())
        }
    }

    /// Moves the clock so that it reads `now` at this instant.
    pub(crate) fn set(&self, now: OffsetDateTime) {
        let real = OffsetDateTime::now_utc();
        let offset = (now - real).whole_nanoseconds();
        let offset = i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX });
        self.offset_nanos.store(offset, Ordering::Relaxed);
    }
}

/// The system's own time, unmoved by `--dev`: for what others check against it (rustls checks
/// the client CRL's nextUpdate against it, so the daemon checks the CRL it loads alike).
pub(crate) fn wall() -> SystemTime {
    SystemTime::now()
}

impl audit_log::Clock for DaemonClock {
    fn now(&self) -> SystemTime {
        self.system_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_the_clock_moves_now_and_the_audit_clock_alike() {
        let clock = DaemonClock::default();
        let target = time::macros::datetime!(2030-01-01 0:00 UTC);
        clock.set(target);
        let now = clock.now();
        // Never before the instant set (a boundary test sets the clock to the boundary).
        assert!(now >= target && (now - target).whole_seconds() < 1, "{now}");
        let audit_now = OffsetDateTime::from(audit_log::Clock::now(&clock));
        assert!((audit_now - target).whole_seconds().abs() <= 1);
    }
}
