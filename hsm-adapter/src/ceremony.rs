//! What the security officers' key ceremony needs from the HSM: a token initialised with PINs
//! drawn from the HSM's own generator (never typed, never on a command line), and the token and
//! its system keys described as read back from the HSM, for the signed transcript and its later
//! check.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use pkcs11_arrays::ArrayAttribute;
use rand_core::{OsRng, RngCore as _};
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::error::HsmError;
use crate::hsm::{Hsm, run_blocking};
use crate::keys::{EcCurve, HexBytes, SystemKey, SystemKeyKind};
use crate::module;
use crate::public_key::ec_params;
use crate::session_pool::Shared;

/// Random bytes in a generated PIN (printed as hex: 48 characters, within the quorum's 63).
const PIN_BYTES: usize = 24;

/// The PINs of a token the ceremony initialised or took over.
#[non_exhaustive]
pub struct InitialisedToken {
    /// The security officer's PIN, from the HSM's generator.
    pub so_pin: SecretString,
    /// The user's PIN, from the HSM's generator.
    pub user_pin: SecretString,
    /// Whether the token was initialised here (not taken over).
    pub initialised: bool,
}

impl std::fmt::Debug for InitialisedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitialisedToken")
            .field("initialised", &self.initialised)
            .finish_non_exhaustive()
    }
}

/// The token, as its module reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenDescription {
    /// CKA label of the token.
    pub label: String,
    /// Its serial number.
    pub serial: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
}

/// One key on the token, as read back from the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyDescription {
    /// Its CKA_LABEL.
    pub label: String,
    /// Its attributes by name (`CKA_SENSITIVE` = `CK_TRUE`, `CKA_CLASS` = `CKO_SECRET_KEY`,
    /// `CKA_UNWRAP_TEMPLATE` = the attributes it forces, ...); those the module does not have
    /// for this class are absent.
    pub attributes: BTreeMap<String, String>,
    /// SHA-256 (hex) of the public key's SubjectPublicKeyInfo, for key pairs.
    pub public_key_sha256: Option<String>,
}

/// Initialises a token labelled `label` on the first slot without one, with an SO PIN and a
/// user PIN from the HSM's generator; or, with `existing_so_pin`, takes the initialised token
/// labelled `label` and replaces both its PINs the same way. Blocking.
///
/// A fresh token needs an SO PIN before a session can ask its generator for anything: it gets a
/// random one from the operating system, replaced at once by one from the HSM.
pub fn initialise_token(
    module_path: &Path,
    label: &str,
    existing_so_pin: Option<&SecretString>,
) -> Result<InitialisedToken, HsmError> {
    let pkcs11 = module::load(module_path)?.pkcs11;
    let (slot, current_so_pin, initialised) = match existing_so_pin {
        Some(pin) => {
            let selector = crate::TokenSelector::Label(label.to_owned());
            (module::find_token(&pkcs11, &selector)?, pin.clone(), false)
        }
        None => {
            let slot = free_slot(&pkcs11)?;
            let mut bytes = Zeroizing::new([0u8; PIN_BYTES]);
            OsRng.fill_bytes(bytes.as_mut());
            let temporary = SecretString::from(hex_text(bytes.as_ref()));
            pkcs11.init_token(slot, &temporary, label)?;
            (slot, temporary, true)
        }
    };
    let session = pkcs11.open_rw_session(slot)?;
    module::login(&session, crate::Role::SecurityOfficer, &current_so_pin)?;
    let result = (|| {
        let so_pin = generated_pin(&session)?;
        let user_pin = generated_pin(&session)?;
        // The user PIN first: if the SO PIN change then failed, the SO PIN would still be the
        // one the caller has, and the ceremony could start again.
        session.init_pin(&user_pin)?;
        session.set_pin(&current_so_pin, &so_pin)?;
        Ok(InitialisedToken {
            so_pin,
            user_pin,
            initialised,
        })
    })();
    if let Err(error) = session.logout() {
        tracing::warn!(error = %HsmError::from(error), "security officer logout failed");
    }
    result
}

fn free_slot(pkcs11: &Pkcs11) -> Result<Slot, HsmError> {
    for slot in pkcs11.get_slots_with_token()? {
        if !pkcs11.get_token_info(slot)?.token_initialized() {
            return Ok(slot);
        }
    }
    Err(HsmError::InvalidInput(
        "the module has no slot with an uninitialised token; give the SO PIN of an initialised \
         token to take it over"
            .into(),
    ))
}

fn generated_pin(session: &Session) -> Result<SecretString, HsmError> {
    let mut bytes = Zeroizing::new([0u8; PIN_BYTES]);
    session.generate_random_slice(bytes.as_mut())?;
    Ok(SecretString::from(hex_text(bytes.as_ref())))
}

fn hex_text(bytes: &[u8]) -> String {
    HexBytes(bytes).to_string()
}

impl Hsm {
    /// The token and every system key on it (each KEK, when a rotation left several), as read
    /// back from the HSM now.
    pub async fn describe(&self) -> Result<(TokenDescription, Vec<KeyDescription>), HsmError> {
        let shared = Arc::clone(self.shared());
        run_blocking("hsm-describe", move || describe(&shared)).await
    }
}

/// The boolean and scalar attributes a description reads.
const DESCRIBED: [AttributeType; 26] = [
    AttributeType::Class,
    AttributeType::KeyType,
    AttributeType::Id,
    AttributeType::ValueLen,
    AttributeType::EcParams,
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Modifiable,
    AttributeType::Copyable,
    AttributeType::Destroyable,
    AttributeType::Local,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::AlwaysSensitive,
    AttributeType::NeverExtractable,
    AttributeType::WrapWithTrusted,
    AttributeType::Trusted,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Sign,
    AttributeType::SignRecover,
    AttributeType::Verify,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
    AttributeType::AlwaysAuthenticate,
];

fn describe(shared: &Shared) -> Result<(TokenDescription, Vec<KeyDescription>), HsmError> {
    let info = shared.pkcs11.get_token_info(shared.slot)?;
    let token = TokenDescription {
        label: info.label().to_owned(),
        serial: info.serial_number().to_owned(),
        manufacturer: info.manufacturer_id().to_owned(),
        model: info.model().to_owned(),
    };
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let mut keys = Vec::new();
    for key in SystemKey::ALL {
        let found = session.find_objects(&crate::directory::system_key_template(key))?;
        for handle in found {
            let mut description = KeyDescription {
                label: key.label().to_owned(),
                attributes: read_attributes(shared, &session, handle)?,
                public_key_sha256: None,
            };
            if let SystemKeyKind::Signing(curve) = key.kind() {
                description.public_key_sha256 = public_key_sha256(&session, key, curve)?;
            }
            keys.push(description);
        }
    }
    // A trusted object besides the KEK (only the SO makes one) shows as a key of its own, so
    // that `ceremony verify` reports it.
    for object in crate::kek::foreign_trusted(&session)? {
        keys.push(KeyDescription {
            label: format!("trusted {object}"),
            attributes: BTreeMap::new(),
            public_key_sha256: None,
        });
    }
    Ok((token, keys))
}

fn read_attributes(
    shared: &Shared,
    session: &Session,
    handle: ObjectHandle,
) -> Result<BTreeMap<String, String>, HsmError> {
    let mut out = BTreeMap::new();
    for attribute in session.get_attributes(handle, &DESCRIBED)? {
        out.insert(attribute.attribute_type().to_string(), render(&attribute));
    }
    if out.get("CKA_CLASS").map(String::as_str) == Some("CKO_SECRET_KEY") {
        for which in [ArrayAttribute::UnwrapTemplate, ArrayAttribute::WrapTemplate] {
            let entries = match shared.arrays.read(session, handle, which) {
                Ok(entries) => entries,
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::AttributeTypeInvalid,
                    _,
                )) => continue,
                Err(error) => return Err(error.into()),
            };
            let mut parts: Vec<String> = entries
                .iter()
                .map(|a| format!("{}={}", a.attribute_type(), render(a)))
                .collect();
            parts.sort();
            out.insert(which.to_string(), parts.join(", "));
        }
    }
    Ok(out)
}

fn render(attribute: &Attribute) -> String {
    match attribute {
        Attribute::Class(class) => class.to_string(),
        Attribute::KeyType(key_type) => key_type.to_string(),
        Attribute::ValueLen(len) => u64::from(*len).to_string(),
        Attribute::Id(id) => hex_text(id),
        Attribute::EcParams(params) => {
            match [EcCurve::P256, EcCurve::P384]
                .into_iter()
                .find(|c| ec_params(*c).is_ok_and(|p| p == *params))
            {
                Some(EcCurve::P256) => "P-256".to_owned(),
                Some(EcCurve::P384) => "P-384".to_owned(),
                None => hex_text(params),
            }
        }
        other => match crate::policy::bool_value(other) {
            Some(true) => "CK_TRUE".to_owned(),
            Some(false) => "CK_FALSE".to_owned(),
            None => format!("{other:?}"),
        },
    }
}

fn public_key_sha256(
    session: &Session,
    key: SystemKey,
    curve: EcCurve,
) -> Result<Option<String>, HsmError> {
    let public = session.find_objects(&crate::directory::system_public_key_template(key))?;
    let [public] = public[..] else {
        return Ok(None);
    };
    let point = session.get_attributes(public, &[AttributeType::EcPoint])?;
    let Some(Attribute::EcPoint(point)) = point.first() else {
        return Ok(None);
    };
    let spki = crate::public_key::ec_spki(curve, point)?;
    Ok(Some(hex_text(&Sha256::digest(spki.as_der()))))
}
