//! Object handles of the keys on the token, found once so that the signing path never searches.
//!
//! Object handles belong to the application (the process), not to a session: a handle found in
//! one session works in every other session of the process (tests/key_policy.rs checks this on
//! SoftHSM). They go stale when the application logs out or closes its last session; the session
//! pool then builds the directory again.
//!
//! Each entry also carries the key-policy verdict, so the policy is read from the HSM once per
//! handle and rule: a new handle (after a rebuild or a new key) starts unverified, and a verdict
//! for one rule (a P-256 key) says nothing about another (the same id claimed as P-384).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU8, Ordering};

use cryptoki::error::RvError;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::error::HsmError;
use crate::keys::{HexBytes, KekId, RESIDENT_KEY_LABEL, SystemKey, SystemKeyKind};
use crate::policy::Policy;

/// A key's handle and the policy rule it has been checked against, if any.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub(crate) handle: ObjectHandle,
    /// [`Policy::tag`] of the rule the key passed, or [`UNVERIFIED`].
    verified: AtomicU8,
}

/// No rule checked yet.
const UNVERIFIED: u8 = 0;

impl KeyEntry {
    pub(crate) fn new(handle: ObjectHandle, verified: Option<&Policy<'_>>) -> Self {
        let tag = verified.map_or(UNVERIFIED, Policy::tag);
        KeyEntry {
            handle,
            verified: AtomicU8::new(tag),
        }
    }

    pub(crate) fn is_verified(&self, policy: &Policy<'_>) -> bool {
        // Relaxed: the tag only saves a re-check; a stale value means one more check.
        self.verified.load(Ordering::Relaxed) == policy.tag()
    }

    pub(crate) fn mark_verified(&self, policy: &Policy<'_>) {
        self.verified.store(policy.tag(), Ordering::Relaxed);
    }
}

/// One key, or an ambiguity that the adapter refuses to resolve by guessing.
#[derive(Debug)]
pub(crate) enum Found {
    One(KeyEntry),
    Many,
}

/// Handles of the system keys and of the resident user keys.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    system: HashMap<SystemKey, Found>,
    /// The CKA_ID of the one KEK, when it has one.
    kek_id: Option<KekId>,
    resident: HashMap<Vec<u8>, Found>,
}

impl Directory {
    /// Finds every system key and resident user key on the token.
    pub(crate) fn load(session: &Session) -> Result<Directory, HsmError> {
        let mut directory = Directory::default();
        for key in SystemKey::ALL {
            let handles = session.find_objects(&system_key_template(key))?;
            match handles.as_slice() {
                [] => {}
                [handle] => {
                    if key == SystemKey::Kek {
                        directory.kek_id = read_kek_id(session, *handle)?;
                    }
                    directory
                        .system
                        .insert(key, Found::One(KeyEntry::new(*handle, None)));
                }
                _ => {
                    tracing::error!(
                        label = key.label(),
                        "several objects carry a system key label"
                    );
                    directory.system.insert(key, Found::Many);
                }
            }
        }
        let template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Token(true),
            Attribute::Label(RESIDENT_KEY_LABEL.as_bytes().to_vec()),
        ];
        for handle in session.find_objects(&template)? {
            let attributes = match session.get_attributes(handle, &[AttributeType::Id]) {
                Ok(attributes) => attributes,
                // Destroyed between the search and this read (by another session, which may be
                // another process's): a key that is gone is not in the directory.
                Err(cryptoki::error::Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                Err(error) => return Err(error.into()),
            };
            let id = attributes.into_iter().find_map(|a| match a {
                Attribute::Id(id) if !id.is_empty() => Some(id),
                _ => None,
            });
            let Some(id) = id else {
                tracing::warn!("a resident user key without CKA_ID is ignored");
                continue;
            };
            match directory.resident.entry(id) {
                Entry::Vacant(slot) => {
                    slot.insert(Found::One(KeyEntry::new(handle, None)));
                }
                Entry::Occupied(mut slot) => {
                    let id = HexBytes(slot.key()).to_string();
                    tracing::error!(%id, "several resident keys share a CKA_ID");
                    slot.insert(Found::Many);
                }
            }
        }
        Ok(directory)
    }

    pub(crate) fn system(&self, key: SystemKey) -> Result<&KeyEntry, HsmError> {
        match self.system.get(&key) {
            Some(Found::One(entry)) => Ok(entry),
            Some(Found::Many) if key == SystemKey::Kek => Err(HsmError::KekRotationUnfinished),
            Some(Found::Many) => Err(HsmError::DuplicateKey { label: key.label() }),
            None => Err(HsmError::SystemKeyMissing(key)),
        }
    }

    /// The KEK that unwraps a blob wrapped under `kek`: the token's one KEK, if it is that one.
    pub(crate) fn kek_for(&self, kek: Option<&KekId>) -> Result<&KeyEntry, HsmError> {
        let entry = self.system(SystemKey::Kek)?;
        if kek != self.kek_id.as_ref() {
            return Err(HsmError::KekNotOnToken {
                kek: KekId::describe(kek),
            });
        }
        Ok(entry)
    }

    /// The CKA_ID of the token's one KEK.
    pub(crate) fn kek_id(&self) -> Option<KekId> {
        self.kek_id
    }

    pub(crate) fn resident(&self, id: &[u8]) -> Result<&KeyEntry, HsmError> {
        match self.resident.get(id) {
            Some(Found::One(entry)) => Ok(entry),
            Some(Found::Many) => Err(HsmError::DuplicateKey {
                label: RESIDENT_KEY_LABEL,
            }),
            None => Err(HsmError::UserKeyNotFound {
                id: HexBytes(id).to_string(),
            }),
        }
    }

    pub(crate) fn contains_resident(&self, id: &[u8]) -> bool {
        self.resident.contains_key(id)
    }

    pub(crate) fn insert_resident(&mut self, id: Vec<u8>, entry: KeyEntry) {
        self.resident.insert(id, Found::One(entry));
    }

    pub(crate) fn remove_resident(&mut self, id: &[u8]) -> Result<ObjectHandle, HsmError> {
        match self.resident.remove(id) {
            Some(Found::One(entry)) => Ok(entry.handle),
            Some(Found::Many) => {
                self.resident.insert(id.to_vec(), Found::Many);
                Err(HsmError::DuplicateKey {
                    label: RESIDENT_KEY_LABEL,
                })
            }
            None => Err(HsmError::UserKeyNotFound {
                id: HexBytes(id).to_string(),
            }),
        }
    }
}

/// The CKA_ID of a KEK as a [`KekId`]; `None` for a KEK made before KEKs had ids.
pub(crate) fn read_kek_id(session: &Session, kek: ObjectHandle) -> Result<Option<KekId>, HsmError> {
    let attributes = session.get_attributes(kek, &[AttributeType::Id])?;
    match attributes.first() {
        Some(Attribute::Id(id)) if id.is_empty() => Ok(None),
        Some(Attribute::Id(id)) => KekId::from_bytes(id)
            .map(Some)
            .map_err(|_| HsmError::UnexpectedResponse("a KEK's CKA_ID is not 16 bytes")),
        _ => Ok(None),
    }
}

/// Finds a system key's private or secret half by label.
pub(crate) fn system_key_template(key: SystemKey) -> [Attribute; 3] {
    let class = match key.kind() {
        SystemKeyKind::Signing(_) => ObjectClass::PRIVATE_KEY,
        _ => ObjectClass::SECRET_KEY,
    };
    [
        Attribute::Class(class),
        Attribute::Token(true),
        Attribute::Label(key.label().as_bytes().to_vec()),
    ]
}

/// Finds a system signing key's public half by label.
pub(crate) fn system_public_key_template(key: SystemKey) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Token(true),
        Attribute::Label(key.label().as_bytes().to_vec()),
    ]
}

/// Finds a resident user key's public half by CKA_ID.
pub(crate) fn resident_public_key_template(id: &[u8]) -> [Attribute; 4] {
    [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Token(true),
        Attribute::Label(RESIDENT_KEY_LABEL.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}
