//! The embedded CA's own record of what it issued and revoked: one small SQLite file, holding
//! serials, validity and revocation only (no names, no certificates: those carry personal data,
//! which the daemon keeps sealed in its own store).
//!
//! Synchronous; the CA calls it from `spawn_blocking`.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::embedded_ca::{CertificateState, Profile, Revocation};
use crate::error::CaError;

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE certificates (
        serial      TEXT PRIMARY KEY NOT NULL,
        profile     TEXT NOT NULL,
        not_before  INTEGER NOT NULL,
        not_after   INTEGER NOT NULL,
        issued_at   INTEGER NOT NULL,
        revoked_at  INTEGER,
        reason      INTEGER,
        CHECK ((revoked_at IS NULL) = (reason IS NULL))
    ) STRICT;
    CREATE INDEX certificates_revoked ON certificates (revoked_at)
        WHERE revoked_at IS NOT NULL;",
    // Version 2: when a certificate issued over CMP was confirmed (certConf). One never
    // confirmed is revoked. Certificates issued before this version count as confirmed.
    "ALTER TABLE certificates ADD COLUMN confirmed_at INTEGER;
    UPDATE certificates SET confirmed_at = issued_at;
    CREATE INDEX certificates_unconfirmed ON certificates (issued_at)
        WHERE confirmed_at IS NULL AND revoked_at IS NULL;",
];

#[derive(Debug)]
pub(crate) struct CaState {
    conn: Mutex<Connection>,
}

/// What to record for a newly issued certificate.
#[derive(Debug)]
pub(crate) struct IssuedRow<'a> {
    pub(crate) serial_hex: &'a str,
    pub(crate) profile: Profile,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    pub(crate) issued_at: SystemTime,
    /// Whether it counts as accepted at once (issued directly, not over CMP, where the
    /// requester's certConf confirms it).
    pub(crate) confirmed: bool,
}

impl CaState {
    pub(crate) fn open(path: &Path) -> Result<CaState, CaError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > MIGRATIONS.len() {
            return Err(CaError::Config(format!(
                "{} has schema version {version}, newer than this build knows",
                path.display()
            )));
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", index + 1)?;
            tx.commit()?;
        }
        Ok(CaState {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, CaError> {
        self.conn
            .lock()
            .map_err(|_| CaError::Internal("CA state lock poisoned".into()))
    }

    /// Records an issued certificate; a serial that exists already is an error (the caller drew
    /// it at random, so this only happens on a broken generator).
    pub(crate) fn insert(&self, row: &IssuedRow<'_>) -> Result<(), CaError> {
        self.conn()?.execute(
            "INSERT INTO certificates (serial, profile, not_before, not_after, issued_at,
                 confirmed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.serial_hex,
                row.profile.as_str(),
                unix(row.not_before),
                unix(row.not_after),
                unix(row.issued_at),
                row.confirmed.then(|| unix(row.issued_at)),
            ],
        )?;
        Ok(())
    }

    /// Marks `serial` confirmed by its requester (a second confirmation changes nothing).
    pub(crate) fn confirm(&self, serial_hex: &str, at: SystemTime) -> Result<(), CaError> {
        self.conn()?.execute(
            "UPDATE certificates SET confirmed_at = ?2
             WHERE serial = ?1 AND confirmed_at IS NULL",
            params![serial_hex, unix(at)],
        )?;
        Ok(())
    }

    /// The certificates neither confirmed nor revoked, oldest first.
    pub(crate) fn unconfirmed(&self) -> Result<Vec<String>, CaError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT serial FROM certificates
             WHERE confirmed_at IS NULL AND revoked_at IS NULL ORDER BY issued_at, serial",
        )?;
        let rows = stmt.query_map([], |row| row.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks `serial` revoked. Revoking a revoked certificate changes nothing (the first time
    /// and reason stand) and succeeds.
    pub(crate) fn revoke(
        &self,
        serial_hex: &str,
        reason: u8,
        at: SystemTime,
    ) -> Result<(), CaError> {
        let conn = self.conn()?;
        let changed = conn.execute(
            "UPDATE certificates SET revoked_at = ?2, reason = ?3
             WHERE serial = ?1 AND revoked_at IS NULL",
            params![serial_hex, unix(at), reason],
        )?;
        if changed == 0 {
            let known: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM certificates WHERE serial = ?1",
                    [serial_hex],
                    |row| row.get(0),
                )
                .optional()?;
            if known.is_none() {
                return Err(CaError::UnknownSerial);
            }
        }
        Ok(())
    }

    pub(crate) fn status(&self, serial_hex: &str) -> Result<CertificateState, CaError> {
        let row: Option<(i64, Option<i64>, Option<u8>)> = self
            .conn()?
            .query_row(
                "SELECT not_after, revoked_at, reason FROM certificates WHERE serial = ?1",
                [serial_hex],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        Ok(match row {
            None => CertificateState::Unknown,
            Some((not_after, revoked_at, reason)) => row_state(not_after, revoked_at, reason),
        })
    }

    /// What the CA knows of each of `serials` (normalised), in one query: an OCSP request's
    /// CertIDs are looked up together.
    pub(crate) fn statuses(&self, serials: &[String]) -> Result<Vec<CertificateState>, CaError> {
        if serials.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; serials.len()].join(", ");
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT serial, not_after, revoked_at, reason FROM certificates
             WHERE serial IN ({placeholders})"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(serials), |row| {
            Ok((
                row.get::<_, String>(0)?,
                row_state(row.get(1)?, row.get(2)?, row.get(3)?),
            ))
        })?;
        let found: std::collections::HashMap<String, CertificateState> =
            rows.collect::<Result<_, _>>()?;
        Ok(serials
            .iter()
            .map(|serial| {
                found
                    .get(serial)
                    .copied()
                    .unwrap_or(CertificateState::Unknown)
            })
            .collect())
    }

    /// Every revoked certificate, in revocation order (for a CRL).
    pub(crate) fn revocations(&self) -> Result<Vec<Revocation>, CaError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT serial, revoked_at, reason FROM certificates
             WHERE revoked_at IS NOT NULL ORDER BY revoked_at, serial",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(Revocation {
                serial_hex: row.get(0)?,
                revoked_at: from_unix(row.get(1)?),
                reason_code: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The state of a stored row: revoked when it has a revocation time and reason.
fn row_state(not_after: i64, revoked_at: Option<i64>, reason: Option<u8>) -> CertificateState {
    match (revoked_at, reason) {
        (Some(revoked_at), Some(reason_code)) => CertificateState::Revoked {
            revoked_at: from_unix(revoked_at),
            reason_code,
        },
        _ => CertificateState::Good {
            not_after: from_unix(not_after),
        },
    }
}

fn unix(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn records_issues_and_revocations_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.sqlite");
        let state = CaState::open(&path).unwrap();
        let row = IssuedRow {
            serial_hex: "4a01",
            profile: Profile::Minor,
            not_before: at(1_000),
            not_after: at(2_000),
            issued_at: at(1_000),
            confirmed: true,
        };
        state.insert(&row).unwrap();
        assert!(state.insert(&row).is_err(), "a serial is unique");
        assert_eq!(
            state.status("4a01").unwrap(),
            CertificateState::Good {
                not_after: at(2_000)
            }
        );
        assert_eq!(state.status("4a02").unwrap(), CertificateState::Unknown);
        assert!(matches!(
            state.revoke("4a02", 1, at(1_500)),
            Err(CaError::UnknownSerial)
        ));
        state.revoke("4a01", 9, at(1_500)).unwrap();
        // A second revocation keeps the first time and reason.
        state.revoke("4a01", 1, at(1_600)).unwrap();
        drop(state);

        let state = CaState::open(&path).unwrap();
        let revoked = CertificateState::Revoked {
            revoked_at: at(1_500),
            reason_code: 9,
        };
        assert_eq!(state.status("4a01").unwrap(), revoked);
        // One query for several serials, in the order asked, unknown ones included.
        assert_eq!(
            state
                .statuses(&["4a09".into(), "4a01".into(), "4a01".into()])
                .unwrap(),
            vec![CertificateState::Unknown, revoked, revoked]
        );
        assert!(state.statuses(&[]).unwrap().is_empty());
        let list = state.revocations().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].serial_hex, "4a01");
        assert_eq!(list[0].reason_code, 9);
        let mode: String = state
            .conn()
            .unwrap()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
