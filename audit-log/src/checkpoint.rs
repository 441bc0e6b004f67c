//! Signed checkpoints: the tree size and root at a moment, signed with ECDSA P-256 / SHA-256 by
//! the audit key (in the HSM for the daemon), in the API's JSON form:
//!
//! ```text
//! {"origin":"...","tree_size":7,"root_hash":"<hex>","timestamp":"2026-11-22T10:00:00Z","signature":"<base64 DER>"}
//! ```
//!
//! The signature covers `smartsign-checkpoint-v1\n<origin>\n<tree_size>\n<root_hash>\n<timestamp>`
//! (no trailing newline).

use std::fmt;
use std::future::Future;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _, LineEnding};
use serde::Deserialize;

use crate::error::{AuditError, SignerError};
use crate::merkle::TreeHash;
use crate::record::write_string;
use crate::time::Timestamp;

/// The first line of the signed checkpoint statement.
const STATEMENT_TAG: &str = "smartsign-checkpoint-v1";

/// The name of the log in its checkpoints: 1 to 255 bytes of printable ASCII without spaces,
/// e.g. `smartsign.example.gov.hk/audit`. Fixed for the life of a log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin(String);

impl Origin {
    /// Checks and wraps an origin.
    pub fn new(origin: impl Into<String>) -> Result<Self, AuditError> {
        let origin = origin.into();
        if !(1..=255).contains(&origin.len()) || !origin.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuditError::InvalidCheckpoint(format!(
                "origin {origin:?} must be 1 to 255 printable ASCII characters without spaces"
            )));
        }
        Ok(Self(origin))
    }

    /// The origin.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Signs checkpoint statements: the HSM audit key in the daemon, [`SoftwareSigner`] in tests and
/// tools.
pub trait CheckpointSigner: Send + Sync {
    /// An ECDSA P-256 signature over SHA-256(`message`), DER-encoded.
    fn sign(&self, message: &[u8]) -> impl Future<Output = Result<Vec<u8>, SignerError>> + Send;
}

/// A P-256 audit key held in memory. For tests, development tools and the offline tooling; the
/// daemon signs with the HSM.
pub struct SoftwareSigner {
    key: SigningKey,
}

impl SoftwareSigner {
    /// A signer from a PKCS#8 private key in PEM.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SignerError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(|key| Self { key })
            .map_err(|error| SignerError::new(format!("not a P-256 PKCS#8 key: {error}")))
    }

    /// A signer from the 32-byte big-endian secret scalar.
    pub fn from_secret_scalar(scalar: &[u8; 32]) -> Result<Self, SignerError> {
        SigningKey::from_slice(scalar)
            .map(|key| Self { key })
            .map_err(|_| SignerError::new("secret scalar is zero or not below the group order"))
    }

    /// The matching public key.
    pub fn public_key(&self) -> AuditPublicKey {
        AuditPublicKey {
            key: *self.key.verifying_key(),
        }
    }
}

impl fmt::Debug for SoftwareSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("SoftwareSigner")
            .field("public_key", &self.public_key())
            .finish()
    }
}

impl CheckpointSigner for SoftwareSigner {
    fn sign(&self, message: &[u8]) -> impl Future<Output = Result<Vec<u8>, SignerError>> + Send {
        let signature: Signature = self.key.sign(message);
        std::future::ready(Ok(signature.to_der().as_bytes().to_vec()))
    }
}

/// The audit public key: ECDSA P-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AuditPublicKey {
    key: VerifyingKey,
}

impl AuditPublicKey {
    /// Parses a SubjectPublicKeyInfo in PEM (`-----BEGIN PUBLIC KEY-----`) for a P-256 key.
    pub fn from_spki_pem(pem: &str) -> Result<Self, AuditError> {
        VerifyingKey::from_public_key_pem(pem.trim())
            .map(|key| Self { key })
            .map_err(|error| AuditError::InvalidPublicKey(error.to_string()))
    }

    /// Parses a DER SubjectPublicKeyInfo for a P-256 key (what the HSM adapter gives).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, AuditError> {
        VerifyingKey::from_public_key_der(der)
            .map(|key| Self { key })
            .map_err(|error| AuditError::InvalidPublicKey(error.to_string()))
    }

    /// The SubjectPublicKeyInfo in PEM, for `GET /v1/audit/public-key`.
    pub fn to_spki_pem(&self) -> Result<String, AuditError> {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .map_err(|error| AuditError::InvalidPublicKey(error.to_string()))
    }

    /// Checks a DER ECDSA signature over SHA-256(`message`).
    pub(crate) fn verify(&self, message: &[u8], signature_der: &[u8]) -> Result<(), AuditError> {
        let signature =
            Signature::from_der(signature_der).map_err(|_| AuditError::BadCheckpointSignature)?;
        self.key
            .verify(message, &signature)
            .map_err(|_| AuditError::BadCheckpointSignature)
    }
}

impl fmt::Debug for AuditPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let point = self.key.to_encoded_point(true);
        write!(f, "AuditPublicKey(P-256 {})", hex::encode(point.as_bytes()))
    }
}

/// A signed checkpoint (API.md, "Audit").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    origin: Origin,
    tree_size: u64,
    root_hash: TreeHash,
    timestamp: Timestamp,
    signature: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCheckpoint {
    origin: String,
    tree_size: u64,
    root_hash: String,
    timestamp: String,
    signature: String,
}

impl Checkpoint {
    /// The statement the audit key signs.
    pub fn statement(
        origin: &Origin,
        tree_size: u64,
        root_hash: &TreeHash,
        timestamp: &Timestamp,
    ) -> Vec<u8> {
        format!(
            "{STATEMENT_TAG}\n{}\n{tree_size}\n{root_hash}\n{timestamp}",
            origin.as_str()
        )
        .into_bytes()
    }

    /// Assembles a checkpoint from its parts; the signature must be strict DER (it is not
    /// verified here: see [`Checkpoint::verify`]).
    pub fn new(
        origin: Origin,
        tree_size: u64,
        root_hash: TreeHash,
        timestamp: Timestamp,
        signature_der: Vec<u8>,
    ) -> Result<Self, AuditError> {
        check_der(&signature_der)?;
        Ok(Self {
            origin,
            tree_size,
            root_hash,
            timestamp,
            signature: signature_der,
        })
    }

    /// Parses the JSON form. Strict: no unknown or missing field, lowercase hex, canonical
    /// base64 with padding, strict DER, the record time format.
    pub fn from_json(json: &[u8]) -> Result<Self, AuditError> {
        let wire: WireCheckpoint = serde_json::from_slice(json)
            .map_err(|error| AuditError::InvalidCheckpoint(format!("not valid JSON: {error}")))?;
        let root_hash = TreeHash::from_hex(&wire.root_hash).map_err(|_| {
            AuditError::InvalidCheckpoint("root_hash is not 64 lowercase hex".into())
        })?;
        let timestamp = Timestamp::parse(&wire.timestamp)
            .map_err(|reason| AuditError::InvalidCheckpoint(format!("timestamp: {reason}")))?;
        let signature = BASE64.decode(&wire.signature).map_err(|error| {
            AuditError::InvalidCheckpoint(format!("signature is not base64: {error}"))
        })?;
        // base64 0.22 refuses non-zero trailing bits, so each signature has one spelling.
        Self::new(
            Origin::new(wire.origin)?,
            wire.tree_size,
            root_hash,
            timestamp,
            signature,
        )
    }

    /// The compact JSON form, fields in the API's order.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"origin\":");
        write_string(&mut out, self.origin.as_str());
        out.extend_from_slice(
            format!(",\"tree_size\":{},\"root_hash\":", self.tree_size).as_bytes(),
        );
        write_string(&mut out, &self.root_hash.to_hex());
        out.extend_from_slice(b",\"timestamp\":");
        write_string(&mut out, self.timestamp.as_str());
        out.extend_from_slice(b",\"signature\":");
        write_string(&mut out, &BASE64.encode(&self.signature));
        out.push(b'}');
        out
    }

    /// Checks the signature under the audit public key.
    pub fn verify(&self, key: &AuditPublicKey) -> Result<(), AuditError> {
        key.verify(&self.signed_statement(), &self.signature)
    }

    /// The statement this checkpoint's signature covers.
    pub fn signed_statement(&self) -> Vec<u8> {
        Self::statement(
            &self.origin,
            self.tree_size,
            &self.root_hash,
            &self.timestamp,
        )
    }

    /// The log's name.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The number of records covered.
    pub fn tree_size(&self) -> u64 {
        self.tree_size
    }

    /// MTH of the first `tree_size` records.
    pub fn root_hash(&self) -> &TreeHash {
        &self.root_hash
    }

    /// When it was made.
    pub fn timestamp(&self) -> &Timestamp {
        &self.timestamp
    }

    /// The DER ECDSA signature.
    pub fn signature_der(&self) -> &[u8] {
        &self.signature
    }
}

/// Refuses a signature that is not strict DER of an ECDSA (r, s) pair, so that an altered byte
/// cannot leave an equivalent encoding.
fn check_der(signature_der: &[u8]) -> Result<(), AuditError> {
    let signature = Signature::from_der(signature_der).map_err(|error| {
        AuditError::InvalidCheckpoint(format!("signature is not DER ECDSA: {error}"))
    })?;
    if signature.to_der().as_bytes() != signature_der {
        return Err(AuditError::InvalidCheckpoint(
            "signature is not in strict DER".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn signs_round_trips_and_verifies() {
        let signer = SoftwareSigner::from_secret_scalar(&[7; 32]).unwrap();
        let origin = Origin::new("test/audit").unwrap();
        let root = TreeHash::from_bytes([9; 32]);
        let timestamp = Timestamp::parse("2026-11-22T10:00:00Z").unwrap();
        let statement = Checkpoint::statement(&origin, 5, &root, &timestamp);
        assert_eq!(
            String::from_utf8(statement.clone()).unwrap(),
            format!("smartsign-checkpoint-v1\ntest/audit\n5\n{root}\n2026-11-22T10:00:00Z")
        );
        let signature = signer.sign(&statement).await.unwrap();
        let checkpoint = Checkpoint::new(origin, 5, root, timestamp, signature).unwrap();
        checkpoint.verify(&signer.public_key()).unwrap();
        let parsed = Checkpoint::from_json(&checkpoint.to_json()).unwrap();
        assert_eq!(parsed, checkpoint);
        let pem = signer.public_key().to_spki_pem().unwrap();
        assert_eq!(
            AuditPublicKey::from_spki_pem(&pem).unwrap(),
            signer.public_key()
        );
        let other = SoftwareSigner::from_secret_scalar(&[8; 32]).unwrap();
        assert!(matches!(
            checkpoint.verify(&other.public_key()),
            Err(AuditError::BadCheckpointSignature)
        ));
        assert!(format!("{signer:?}").starts_with("SoftwareSigner { public_key"));
    }

    #[test]
    fn origin_rules() {
        assert!(Origin::new("a b").is_err());
        assert!(Origin::new("a\nb").is_err());
        assert!(Origin::new("").is_err());
        assert!(Origin::new("smartsign.example/audit").is_ok());
    }
}
