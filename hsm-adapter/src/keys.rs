//! The keys the adapter knows: system keys found by label, user keys held by a [`UserKeyRef`],
//! and the checked inputs of a signature ([`Digest`], [`SignatureScheme`]).

use std::fmt;

use crate::error::HsmError;
use crate::public_key::PublicKeySpki;

/// Prefix of every label the adapter gives an object on the token.
pub const LABEL_PREFIX: &str = "smartsign-";

/// Label of resident user keys (both halves); they are told apart by their random CKA_ID.
pub const RESIDENT_KEY_LABEL: &str = "smartsign-user";

/// A key the appliance itself uses, found on the token by its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SystemKey {
    /// AES-256 key-encryption key that wraps user keys (CKA_TRUSTED, WRAP and UNWRAP only).
    Kek,
    /// HMAC-SHA-256 key deriving TAIDs.
    Taid,
    /// HMAC-SHA-256 key protecting HKIC numbers (separate from the TAID key).
    Hkic,
    /// AES-256 key for AES-GCM encryption of personal data fields.
    Data,
    /// EC P-256 key signing audit-log checkpoints.
    Audit,
    /// EC P-384 key of the embedded CA's root.
    CaRoot,
    /// EC P-256 key of the embedded CA's issuing CA.
    CaIssuing,
    /// EC P-256 key the daemon's CMP client signs its messages with (RFC 9483 signature
    /// protection), certified by the CA as the daemon's registration authority.
    CmpClient,
}

/// What a system key is and does; decides its template and its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SystemKeyKind {
    KeyEncryption,
    Hmac,
    Aead,
    Signing(EcCurve),
}

impl SystemKey {
    /// Every system key, in provisioning order.
    pub const ALL: [SystemKey; 8] = [
        SystemKey::Kek,
        SystemKey::Taid,
        SystemKey::Hkic,
        SystemKey::Data,
        SystemKey::Audit,
        SystemKey::CaRoot,
        SystemKey::CaIssuing,
        SystemKey::CmpClient,
    ];

    /// The CKA_LABEL of the key on the token.
    pub fn label(self) -> &'static str {
        match self {
            SystemKey::Kek => "smartsign-kek",
            SystemKey::Taid => "smartsign-taid",
            SystemKey::Hkic => "smartsign-hkic",
            SystemKey::Data => "smartsign-data",
            SystemKey::Audit => "smartsign-audit",
            SystemKey::CaRoot => "smartsign-ca-root",
            SystemKey::CaIssuing => "smartsign-ca-issuing",
            SystemKey::CmpClient => "smartsign-cmp-client",
        }
    }

    pub(crate) fn kind(self) -> SystemKeyKind {
        match self {
            SystemKey::Kek => SystemKeyKind::KeyEncryption,
            SystemKey::Taid | SystemKey::Hkic => SystemKeyKind::Hmac,
            SystemKey::Data => SystemKeyKind::Aead,
            SystemKey::Audit | SystemKey::CaIssuing | SystemKey::CmpClient => {
                SystemKeyKind::Signing(EcCurve::P256)
            }
            SystemKey::CaRoot => SystemKeyKind::Signing(EcCurve::P384),
        }
    }
}

impl fmt::Display for SystemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The NIST curves the adapter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum EcCurve {
    P256,
    P384,
}

impl EcCurve {
    /// Bytes of one coordinate (and of r and s in a raw ECDSA signature).
    pub(crate) fn field_len(self) -> usize {
        match self {
            EcCurve::P256 => 32,
            EcCurve::P384 => 48,
        }
    }
}

/// Algorithm of a user's signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    Rsa3072,
}

impl KeyAlgorithm {
    /// Every algorithm.
    pub const ALL: [KeyAlgorithm; 4] = [
        KeyAlgorithm::EcP256,
        KeyAlgorithm::EcP384,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa3072,
    ];

    pub(crate) fn curve(self) -> Option<EcCurve> {
        match self {
            KeyAlgorithm::EcP256 => Some(EcCurve::P256),
            KeyAlgorithm::EcP384 => Some(EcCurve::P384),
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => None,
        }
    }

    /// Modulus length in bytes for RSA.
    pub(crate) fn modulus_len(self) -> Option<usize> {
        match self {
            KeyAlgorithm::Rsa2048 => Some(256),
            KeyAlgorithm::Rsa3072 => Some(384),
            KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => None,
        }
    }

    /// Its code in the key-reference encoding (never 0).
    pub(crate) fn code(self) -> u8 {
        match self {
            KeyAlgorithm::EcP256 => 1,
            KeyAlgorithm::EcP384 => 2,
            KeyAlgorithm::Rsa2048 => 3,
            KeyAlgorithm::Rsa3072 => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        KeyAlgorithm::ALL.into_iter().find(|a| a.code() == code)
    }

    /// Whether this is an elliptic-curve algorithm.
    pub fn is_ec(self) -> bool {
        self.curve().is_some()
    }

    /// Whether `scheme` can be used with a key of this algorithm.
    pub fn supports(self, scheme: SignatureScheme) -> bool {
        match scheme {
            SignatureScheme::Ecdsa => self.curve().is_some(),
            SignatureScheme::RsaPkcs1v15 | SignatureScheme::RsaPss => self.curve().is_none(),
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::EcP256 => "ec-p256",
            KeyAlgorithm::EcP384 => "ec-p384",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
            KeyAlgorithm::Rsa3072 => "rsa-3072",
        })
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyAlgorithm::ALL
            .into_iter()
            .find(|a| a.to_string() == s)
            .ok_or_else(|| HsmError::InvalidInput(format!("unknown key algorithm {s:?}")))
    }
}

/// How a user key is held (DESIGN.md, "The HSM boundary").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum KeyMode {
    /// Generated as a session object, wrapped under the key-encryption key, and kept outside the
    /// HSM as a blob; unwrapped into a session object to sign.
    #[default]
    Wrapped,
    /// Kept on the token as a non-extractable token object, found by its CKA_ID.
    Resident,
}

impl fmt::Display for KeyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyMode::Wrapped => "wrapped",
            KeyMode::Resident => "resident",
        })
    }
}

impl std::str::FromStr for KeyMode {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wrapped" => Ok(KeyMode::Wrapped),
            "resident" => Ok(KeyMode::Resident),
            _ => Err(HsmError::InvalidInput(format!("unknown key mode {s:?}"))),
        }
    }
}

/// The hash function that produced a [`Digest`]: the vocabulary shared by every crate.
pub use smartsign_types::HashAlgorithm;

/// A digest whose length has been checked against its hash algorithm.
#[derive(Clone, PartialEq, Eq)]
pub struct Digest {
    algorithm: HashAlgorithm,
    bytes: Vec<u8>,
}

impl Digest {
    /// Checks that `bytes` has the length of an `algorithm` digest.
    pub fn new(algorithm: HashAlgorithm, bytes: impl Into<Vec<u8>>) -> Result<Self, HsmError> {
        let bytes = bytes.into();
        if bytes.len() != algorithm.output_len() {
            return Err(HsmError::InvalidInput(format!(
                "a {algorithm:?} digest has {} bytes, not {}",
                algorithm.output_len(),
                bytes.len()
            )));
        }
        Ok(Digest { algorithm, bytes })
    }

    /// The hash algorithm.
    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for Digest {
    // A digest is not secret, but whose document it is may be: show only its algorithm.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Digest")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// How a digest is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignatureScheme {
    /// ECDSA; the signature is a DER `Ecdsa-Sig-Value` (RFC 3279 section 2.2.3).
    Ecdsa,
    /// RSASSA-PKCS1-v1_5 (RFC 8017 section 8.2); the adapter builds the DigestInfo.
    RsaPkcs1v15,
    /// RSASSA-PSS (RFC 8017 section 8.1) with MGF1 on the digest's hash and a salt as long as
    /// the digest.
    RsaPss,
}

/// The name of one key-encryption key: its CKA_ID on the token, 16 random bytes.
///
/// A wrapped key's reference names the KEK it was wrapped under, so that a KEK rotation knows
/// which blobs still need re-wrapping, and so that a blob wrapped under a KEK that is gone (a
/// backup from before a rotation) is refused by name rather than by a failed unwrap.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KekId([u8; KekId::LEN]);

impl KekId {
    /// Bytes of an id.
    pub const LEN: usize = 16;

    /// An id from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HsmError> {
        let id = bytes
            .try_into()
            .map_err(|_| HsmError::InvalidInput(format!("a KEK id has {} bytes", Self::LEN)))?;
        Ok(KekId(id))
    }

    /// The id's bytes (the KEK's CKA_ID).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl KekId {
    /// A KEK for messages: its id in hex, or `without id` for a KEK made before KEKs had ids.
    pub fn describe(id: Option<&KekId>) -> String {
        id.map_or_else(|| "without id".to_owned(), KekId::to_string)
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&HexBytes(&self.0), f)
    }
}

impl fmt::Debug for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekId({self})")
    }
}

/// Where a user key's private half is.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum KeyStorage {
    /// The private key wrapped under a KEK.
    Wrapped {
        /// The KEK it is wrapped under; `None` for a reference made before KEKs had ids
        /// (version 1), wrapped under the KEK that has none.
        kek: Option<KekId>,
        /// `CKM_*` used to wrap (only `CKM_AES_KEY_WRAP_PAD` today).
        mechanism: u64,
        /// `CKK_*` of the wrapped key, needed in the unwrap template.
        key_type: u64,
        /// The wrapped private key.
        blob: Vec<u8>,
    },
    /// A token object found by CKA_ID.
    Resident {
        /// The CKA_ID.
        id: Vec<u8>,
    },
}

/// What a caller persists to use a user key again: where the private key is, its algorithm and
/// its public key.
///
/// A wrapped key lives only in this reference: deleting the reference (after
/// [`crate::Hsm::destroy_user_key`]) deletes the key.
#[derive(Clone, PartialEq, Eq)]
pub struct UserKeyRef {
    pub(crate) algorithm: KeyAlgorithm,
    pub(crate) storage: KeyStorage,
    pub(crate) public_key: PublicKeySpki,
}

/// Leading bytes of an encoded [`UserKeyRef`].
const REF_MAGIC: &[u8; 4] = b"SSKR";
/// Version of the encoding below.
const REF_VERSION: u8 = 2;
/// The version before wrapped keys named their KEK; still read.
const REF_VERSION_NO_KEK: u8 = 1;
const STORAGE_WRAPPED: u8 = 1;
const STORAGE_RESIDENT: u8 = 2;
/// Upper bound of a wrapped blob (an RSA-3072 PKCS#8 wraps to under 2 KiB).
const MAX_BLOB_LEN: usize = 16 * 1024;
/// Upper bound of an SPKI (an RSA-3072 SPKI is 422 bytes).
const MAX_SPKI_LEN: usize = 4 * 1024;
/// CKA_ID lengths accepted for resident keys (the adapter makes 16-byte ids).
const MAX_ID_LEN: usize = 64;

impl UserKeyRef {
    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// Wrapped or resident.
    pub fn mode(&self) -> KeyMode {
        match self.storage {
            KeyStorage::Wrapped { .. } => KeyMode::Wrapped,
            KeyStorage::Resident { .. } => KeyMode::Resident,
        }
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKeySpki {
        &self.public_key
    }

    /// The KEK a wrapped key is wrapped under: `None` for a resident key or for a reference
    /// from before KEKs had ids.
    pub fn kek(&self) -> Option<&KekId> {
        match &self.storage {
            KeyStorage::Wrapped { kek, .. } => kek.as_ref(),
            KeyStorage::Resident { .. } => None,
        }
    }

    /// Whether this is a wrapped key that is not wrapped under `current` (a KEK rotation
    /// re-wraps it).
    pub fn needs_rewrap(&self, current: &KekId) -> bool {
        matches!(&self.storage, KeyStorage::Wrapped { kek, .. } if kek.as_ref() != Some(current))
    }

    /// The CKA_ID of a resident key.
    pub fn resident_id(&self) -> Option<&[u8]> {
        match &self.storage {
            KeyStorage::Resident { id } => Some(id),
            KeyStorage::Wrapped { .. } => None,
        }
    }

    /// Stable, versioned encoding for storage:
    ///
    /// ```text
    /// "SSKR" | version (1) | algorithm (1) | storage (1) | storage fields | spki len (4) | spki
    /// wrapped (storage 1):  kek id len (1) | kek id | mechanism (8) | key type (8) |
    ///                       blob len (4) | blob
    /// resident (storage 2): id len (1) | id
    /// ```
    ///
    /// Integers are big-endian. The version is 2; version 1, which is still read, has no KEK id
    /// field. The KEK id is 16 bytes, or none (length 0) for a key wrapped under a KEK without
    /// an id. The algorithm codes are 1 = EC P-256, 2 = EC P-384, 3 = RSA-2048, 4 = RSA-3072.
    pub fn to_bytes(&self) -> Vec<u8> {
        let spki = self.public_key.as_der();
        let mut out = Vec::with_capacity(64 + spki.len());
        out.extend_from_slice(REF_MAGIC);
        out.push(REF_VERSION);
        out.push(self.algorithm.code());
        match &self.storage {
            KeyStorage::Wrapped {
                kek,
                mechanism,
                key_type,
                blob,
            } => {
                out.push(STORAGE_WRAPPED);
                match kek {
                    Some(kek) => {
                        out.push(KekId::LEN as u8);
                        out.extend_from_slice(kek.as_bytes());
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&mechanism.to_be_bytes());
                out.extend_from_slice(&key_type.to_be_bytes());
                push_len_prefixed_u32(&mut out, blob);
            }
            KeyStorage::Resident { id } => {
                out.push(STORAGE_RESIDENT);
                // Checked at construction: at most MAX_ID_LEN (64) bytes.
                out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(id);
            }
        }
        push_len_prefixed_u32(&mut out, spki);
        out
    }

    /// Decodes [`UserKeyRef::to_bytes`]'s output, checking every field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HsmError> {
        let mut r = Reader(bytes);
        if r.take(4)? != REF_MAGIC {
            return Err(HsmError::MalformedKeyRef("not a smartsign key reference"));
        }
        let version = r.u8()?;
        if version != REF_VERSION && version != REF_VERSION_NO_KEK {
            return Err(HsmError::MalformedKeyRef("unsupported version"));
        }
        let algorithm = KeyAlgorithm::from_code(r.u8()?)
            .ok_or(HsmError::MalformedKeyRef("unknown algorithm"))?;
        let storage = match r.u8()? {
            STORAGE_WRAPPED => {
                let kek = match version {
                    REF_VERSION_NO_KEK => None,
                    _ => match usize::from(r.u8()?) {
                        0 => None,
                        KekId::LEN => Some(KekId::from_bytes(r.take(KekId::LEN)?)?),
                        _ => return Err(HsmError::MalformedKeyRef("KEK id length")),
                    },
                };
                let mechanism = r.u64()?;
                let key_type = r.u64()?;
                let len = r.u32_len(MAX_BLOB_LEN)?;
                let blob = r.take(len)?.to_vec();
                KeyStorage::Wrapped {
                    kek,
                    mechanism,
                    key_type,
                    blob,
                }
            }
            STORAGE_RESIDENT => {
                let len = usize::from(r.u8()?);
                KeyStorage::Resident {
                    id: r.take(len)?.to_vec(),
                }
            }
            _ => return Err(HsmError::MalformedKeyRef("unknown storage")),
        };
        let len = r.u32_len(MAX_SPKI_LEN)?;
        let spki = r.take(len)?.to_vec();
        if !r.0.is_empty() {
            return Err(HsmError::MalformedKeyRef("trailing bytes"));
        }
        let public_key = PublicKeySpki::from_der(spki, algorithm)?;
        Self::new(algorithm, storage, public_key)
    }

    /// Checks the storage fields against the algorithm.
    pub(crate) fn new(
        algorithm: KeyAlgorithm,
        storage: KeyStorage,
        public_key: PublicKeySpki,
    ) -> Result<Self, HsmError> {
        match &storage {
            KeyStorage::Wrapped {
                mechanism,
                key_type,
                blob,
                ..
            } => {
                if *mechanism != crate::templates::wrap_mechanism_code() {
                    return Err(HsmError::MalformedKeyRef("unsupported wrapping mechanism"));
                }
                if *key_type != crate::templates::key_type_code(algorithm) {
                    return Err(HsmError::MalformedKeyRef(
                        "key type does not match algorithm",
                    ));
                }
                if blob.is_empty() || blob.len() > MAX_BLOB_LEN {
                    return Err(HsmError::MalformedKeyRef("wrapped key length out of range"));
                }
            }
            KeyStorage::Resident { id } => {
                if id.is_empty() || id.len() > MAX_ID_LEN {
                    return Err(HsmError::MalformedKeyRef("CKA_ID length out of range"));
                }
            }
        }
        Ok(UserKeyRef {
            algorithm,
            storage,
            public_key,
        })
    }
}

impl fmt::Debug for UserKeyRef {
    // The blob is ciphertext, but there is no reason to print it: show its size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("UserKeyRef");
        s.field("algorithm", &self.algorithm);
        match &self.storage {
            KeyStorage::Wrapped { blob, kek, .. } => {
                s.field("kek", kek);
                s.field("wrapped_len", &blob.len())
            }
            KeyStorage::Resident { id } => s.field("resident_id", &HexBytes(id)),
        };
        s.finish_non_exhaustive()
    }
}

/// Lower-case hex, for ids in messages.
pub(crate) struct HexBytes<'a>(pub(crate) &'a [u8]);

impl fmt::Display for HexBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for HexBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn push_len_prefixed_u32(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers bound the lengths far below 4 GiB (MAX_BLOB_LEN, MAX_SPKI_LEN).
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HsmError> {
        if self.0.len() < n {
            return Err(HsmError::MalformedKeyRef("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HsmError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, HsmError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn u32_len(&mut self, max: usize) -> Result<usize, HsmError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        let len = usize::try_from(u32::from_be_bytes(b))
            .map_err(|_| HsmError::MalformedKeyRef("length out of range"))?;
        if len > max {
            return Err(HsmError::MalformedKeyRef("length out of range"));
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_length_is_checked() {
        assert!(Digest::new(HashAlgorithm::Sha256, vec![0; 32]).is_ok());
        let err = Digest::new(HashAlgorithm::Sha384, vec![0; 32]).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
    }

    #[test]
    fn schemes_fit_algorithms() {
        assert!(KeyAlgorithm::EcP384.supports(SignatureScheme::Ecdsa));
        assert!(!KeyAlgorithm::EcP256.supports(SignatureScheme::RsaPss));
        assert!(KeyAlgorithm::Rsa3072.supports(SignatureScheme::RsaPkcs1v15));
        assert!(!KeyAlgorithm::Rsa2048.supports(SignatureScheme::Ecdsa));
    }

    #[test]
    fn algorithm_and_mode_names_round_trip() {
        for a in KeyAlgorithm::ALL {
            assert_eq!(a.to_string().parse::<KeyAlgorithm>().unwrap(), a);
        }
        for m in [KeyMode::Wrapped, KeyMode::Resident] {
            assert_eq!(m.to_string().parse::<KeyMode>().unwrap(), m);
        }
    }

    #[test]
    fn truncated_or_padded_references_are_refused() {
        assert!(UserKeyRef::from_bytes(b"SSKR").is_err());
        assert!(UserKeyRef::from_bytes(b"XXXX\x01\x01\x02\x01\x00").is_err());
        assert!(UserKeyRef::from_bytes(&[]).is_err());
    }
}
