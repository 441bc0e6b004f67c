//! Key custody in the store. The stored user-key references as a whole, for the KEK rotation
//! (`smartsign-ctl keys rotate-kek`): listing them page by page, replacing one only if it is
//! still what was read, and the rotation's journal, so that a rotation stopped at any point
//! resumes where it was. And which key-ceremony transcripts the audit log records.
//!
//! The store keeps references as opaque bytes (the HSM adapter's encoding); the caller decodes
//! them. A reference lives in two places: a certificate's `key_ref`, and the `new_key_ref` of an
//! unfinished renewal or re-application (`key_changes`).

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::sqlite::{SqliteStore, one_row_changed, opt_time_at, secs, time_at, write_error};
use crate::{AccountId, CertSerial, StoreError};

/// Where a stored user-key reference is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyRefSlot {
    /// The key of this certificate.
    Certificate(CertSerial),
    /// The new key of this account's unfinished renewal or re-application.
    KeyChange(AccountId),
}

/// One stored reference and where it is.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKeyRef {
    /// Where it is.
    pub slot: KeyRefSlot,
    /// The reference's bytes as stored.
    pub key_ref: Vec<u8>,
}

impl std::fmt::Debug for StoredKeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKeyRef")
            .field("slot", &self.slot)
            .field("len", &self.key_ref.len())
            .finish()
    }
}

/// A KEK rotation as its journal records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekRotation {
    /// The CKA_ID of the KEK every key is re-wrapped under.
    pub new_kek: Vec<u8>,
    /// The CKA_ID of the KEK it replaces; `None` for a KEK without an id.
    pub old_kek: Option<Vec<u8>>,
    /// When it began.
    pub started_at: OffsetDateTime,
    /// When the old KEK was destroyed; `None` while it runs.
    pub finished_at: Option<OffsetDateTime>,
}

impl SqliteStore {
    /// Up to `limit` stored references after `after` (from the first when `None`), in slot
    /// order: certificates by serial, then unfinished key changes by account.
    pub fn key_refs_after(
        &self,
        after: Option<&KeyRefSlot>,
        limit: usize,
    ) -> Result<Vec<StoredKeyRef>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let mut page = Vec::new();
            let certificates_after = match after {
                None => Some(String::new()),
                Some(KeyRefSlot::Certificate(serial)) => Some(serial.as_str().to_owned()),
                Some(KeyRefSlot::KeyChange(_)) => None,
            };
            if let Some(after) = certificates_after {
                let mut stmt = conn.prepare_cached(
                    "SELECT serial, key_ref FROM certificates \
                     WHERE key_ref IS NOT NULL AND serial > ?1 ORDER BY serial LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![after, limit], |row| {
                    let serial: String = row.get(0)?;
                    Ok((serial, row.get::<_, Vec<u8>>(1)?))
                })?;
                for row in rows {
                    let (serial, key_ref) = row?;
                    let serial = CertSerial::parse(&serial)
                        .map_err(|e| StoreError::Corrupt(format!("certificate serial: {e}")))?;
                    page.push(StoredKeyRef {
                        slot: KeyRefSlot::Certificate(serial),
                        key_ref,
                    });
                }
            }
            let remaining = limit - page.len() as i64;
            if remaining > 0 {
                let after = match after {
                    Some(KeyRefSlot::KeyChange(account)) => account.as_str().to_owned(),
                    _ => String::new(),
                };
                let mut stmt = conn.prepare_cached(
                    "SELECT account_id, new_key_ref FROM key_changes \
                     WHERE new_key_ref IS NOT NULL AND account_id > ?1 \
                     ORDER BY account_id LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![after, remaining], |row| {
                    let account: String = row.get(0)?;
                    Ok((account, row.get::<_, Vec<u8>>(1)?))
                })?;
                for row in rows {
                    let (account, key_ref) = row?;
                    let account = AccountId::parse(&account)
                        .map_err(|e| StoreError::Corrupt(format!("account id: {e}")))?;
                    page.push(StoredKeyRef {
                        slot: KeyRefSlot::KeyChange(account),
                        key_ref,
                    });
                }
            }
            Ok(page)
        })
    }

    /// Replaces each `(slot, old, new)` in one transaction, each only if its reference is
    /// still `old`: `Conflict` when any changed or went since it was read, and then none is
    /// replaced.
    pub fn replace_key_refs(
        &self,
        changes: &[(KeyRefSlot, Vec<u8>, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.write(|conn| {
            for (slot, old, new) in changes {
                let changed = match slot {
                    KeyRefSlot::Certificate(serial) => conn
                        .prepare_cached(
                            "UPDATE certificates SET key_ref = ?3 \
                             WHERE serial = ?1 AND key_ref = ?2",
                        )?
                        .execute(params![serial.as_str(), old, new]),
                    KeyRefSlot::KeyChange(account) => conn
                        .prepare_cached(
                            "UPDATE key_changes SET new_key_ref = ?3 \
                             WHERE account_id = ?1 AND new_key_ref = ?2",
                        )?
                        .execute(params![account.as_str(), old, new]),
                }
                .map_err(write_error)?;
                // The write's savepoint rolls every earlier replacement back.
                one_row_changed(changed).map_err(|_| StoreError::Conflict)?;
            }
            Ok(())
        })
    }

    /// The open KEK rotation, if one began and has not finished.
    pub fn open_kek_rotation(&self) -> Result<Option<KekRotation>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT new_kek, old_kek, started_at, finished_at FROM kek_rotations \
                     WHERE finished_at IS NULL",
                )?
                .query_row([], |row| {
                    Ok(KekRotation {
                        new_kek: row.get(0)?,
                        old_kek: row.get(1)?,
                        started_at: time_at(row, 2)?,
                        finished_at: opt_time_at(row, 3)?,
                    })
                })
                .optional()?)
        })
    }

    /// Records that a rotation from `old_kek` to `new_kek` begins; `AlreadyExists` when one is
    /// open (or `new_kek` was used before).
    pub fn begin_kek_rotation(
        &self,
        new_kek: &[u8],
        old_kek: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO kek_rotations (new_kek, old_kek, started_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![new_kek, old_kek, secs(now)])
            .map_err(write_error)?;
            Ok(())
        })
    }

    /// Records that the open rotation to `new_kek` finished (its old KEK is destroyed).
    pub fn finish_kek_rotation(
        &self,
        new_kek: &[u8],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.write(|conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE kek_rotations SET finished_at = ?2 \
                     WHERE new_kek = ?1 AND finished_at IS NULL",
                )?
                .execute(params![new_kek, secs(now)])
                .map_err(write_error)?;
            one_row_changed(changed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certificate::tests::record as certificate;
    use crate::{AccountRecord, AccountStatus, Store, Tier};

    fn account(name: &str, serial: &str) -> (AccountRecord, crate::CertificateRecord) {
        let mut certificate = certificate(serial, name);
        certificate.key_ref = Some(format!("ref-{serial}").into_bytes());
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let account = AccountRecord {
            id: AccountId::parse(name).unwrap(),
            tier: Tier::IamSmartPlus,
            status: AccountStatus::Active,
            status_changed_at: now,
            suspended_by: None,
            rectify_by: None,
            sealed_name: vec![1; 40],
            sealed_dob: vec![2; 30],
            hkic_hash: {
                // One person each (the store keeps one account per HKIC hash).
                let mut hash = [3u8; 32];
                hash[..name.len()].copy_from_slice(name.as_bytes());
                hash
            },
            device_public_key: vec![4; 91],
            device_generation: 1,
            current_certificate: Some(certificate.serial.clone()),
            created_at: now,
            guardian_hkic_hash: None,
            adult_day_key: None,
            version: 0,
        };
        (account, certificate)
    }

    #[test]
    fn pages_visit_every_reference_once_and_a_changed_one_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.sqlite")).unwrap();
        for (name, serial) in [("u-1", "a1"), ("u-2", "b1"), ("u-3", "c1")] {
            let (a, c) = account(name, serial);
            store.insert_account_with_certificate(&a, &c, &[]).unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.key_refs_after(after.as_ref(), 2).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.slot.clone());
            seen.extend(page.into_iter().map(|r| r.key_ref));
        }
        assert_eq!(
            seen,
            [b"ref-a1".to_vec(), b"ref-b1".to_vec(), b"ref-c1".to_vec()]
        );

        let slot = KeyRefSlot::Certificate(CertSerial::parse("b1").unwrap());
        let change = |old: &[u8], new: &[u8]| [(slot.clone(), old.to_vec(), new.to_vec())];
        store
            .replace_key_refs(&change(b"ref-b1", b"new-b1"))
            .unwrap();
        // Read before that replacement: stale, so refused, and the stored value stays.
        assert!(matches!(
            store.replace_key_refs(&change(b"ref-b1", b"other")),
            Err(StoreError::Conflict)
        ));
        let page = store.key_refs_after(None, 10).unwrap();
        assert_eq!(page[1].key_ref, b"new-b1");

        // A batch with one stale entry replaces nothing.
        let a1 = KeyRefSlot::Certificate(CertSerial::parse("a1").unwrap());
        assert!(matches!(
            store.replace_key_refs(&[
                (a1.clone(), b"ref-a1".to_vec(), b"new-a1".to_vec()),
                (slot.clone(), b"ref-b1".to_vec(), b"x".to_vec()),
            ]),
            Err(StoreError::Conflict)
        ));
        assert_eq!(
            store.key_refs_after(None, 10).unwrap()[0].key_ref,
            b"ref-a1"
        );
    }

    #[test]
    fn one_rotation_is_open_at_a_time_and_finishing_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.sqlite")).unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(store.open_kek_rotation().unwrap(), None);
        store.begin_kek_rotation(&[2; 16], None, now).unwrap();
        assert!(matches!(
            store.begin_kek_rotation(&[3; 16], Some(&[2; 16]), now),
            Err(StoreError::AlreadyExists)
        ));
        let open = store.open_kek_rotation().unwrap().unwrap();
        assert_eq!((open.new_kek, open.old_kek), (vec![2; 16], None));
        store.finish_kek_rotation(&[2; 16], now).unwrap();
        assert_eq!(store.open_kek_rotation().unwrap(), None);
        assert!(matches!(
            store.finish_kek_rotation(&[2; 16], now),
            Err(StoreError::NotFound)
        ));
        store
            .begin_kek_rotation(&[3; 16], Some(&[2; 16]), now)
            .unwrap();
        assert_eq!(
            store.open_kek_rotation().unwrap().unwrap().old_kek,
            Some(vec![2; 16])
        );
    }
}
