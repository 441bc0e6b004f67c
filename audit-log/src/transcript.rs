//! Key-ceremony transcripts: what the security officers' ceremony did, signed with the HSM audit
//! key, checked offline, and anchored in the audit log by their SHA-256.
//!
//! A transcript is one JSON object (written pretty-printed, for people to read). Its `signature`
//! member, base64 of a DER ECDSA P-256 signature over SHA-256, signs the *signed form*:
//!
//! ```text
//! "smartsign-ceremony-transcript-v1\n" || compact JSON of the object without `signature`,
//!                                         every object's members sorted by name
//! ```
//!
//! so that the check does not depend on how the file was indented or its members ordered.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

use crate::checkpoint::AuditPublicKey;
use crate::error::AuditError;

/// The domain line in front of the signed form.
const DOMAIN: &[u8] = b"smartsign-ceremony-transcript-v1\n";

/// A transcript and its signature, parsed but not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    body: Map<String, Value>,
    signature: Vec<u8>,
}

impl Transcript {
    /// The bytes a transcript's signature covers.
    pub fn signed_form(body: &Map<String, Value>) -> Vec<u8> {
        let mut out = DOMAIN.to_vec();
        // Serialising a Value cannot fail: its keys are strings and its numbers finite.
        #[allow(clippy::expect_used)]
        let json = serde_json::to_vec(&sorted(&Value::Object(body.clone())))
            .expect("a JSON value serialises");
        out.extend(json);
        out
    }

    /// The transcript file: `body` with its `signature` (a DER ECDSA signature over the signed
    /// form), pretty-printed.
    pub fn assemble(body: Map<String, Value>, signature_der: &[u8]) -> Vec<u8> {
        let mut object = body;
        object.insert(
            "signature".to_owned(),
            Value::String(STANDARD.encode(signature_der)),
        );
        // As above: a Value always serialises.
        #[allow(clippy::expect_used)]
        let mut out =
            serde_json::to_vec_pretty(&Value::Object(object)).expect("a JSON value serialises");
        out.push(b'\n');
        out
    }

    /// Parses a transcript file.
    pub fn parse(json: &[u8]) -> Result<Self, AuditError> {
        let invalid = |why: &str| AuditError::InvalidTranscript(why.to_owned());
        let Value::Object(mut body) =
            serde_json::from_slice(json).map_err(|e| invalid(&e.to_string()))?
        else {
            return Err(invalid("not a JSON object"));
        };
        let signature = match body.remove("signature") {
            Some(Value::String(text)) => STANDARD
                .decode(text)
                .map_err(|_| invalid("signature is not base64"))?,
            _ => return Err(invalid("no signature")),
        };
        Ok(Transcript { body, signature })
    }

    /// Checks the signature under the audit public key.
    pub fn verify(&self, key: &AuditPublicKey) -> Result<(), AuditError> {
        key.verify(&Self::signed_form(&self.body), &self.signature)
            .map_err(|_| AuditError::BadTranscriptSignature)
    }

    /// The transcript without its signature.
    pub fn body(&self) -> &Map<String, Value> {
        &self.body
    }
}

/// `value` with every object's members in name order.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::SoftwareSigner;

    /// Signs as the HSM audit key would, with the scalar of `SoftwareSigner::from_secret_scalar`.
    fn sign(body: &Map<String, Value>) -> Vec<u8> {
        use p256::ecdsa::signature::Signer as _;
        let key = p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
        let signature: p256::ecdsa::Signature = key.sign(&Transcript::signed_form(body));
        signature.to_der().as_bytes().to_vec()
    }

    #[test]
    fn a_signed_transcript_verifies_however_it_is_laid_out_and_not_once_changed() {
        let key = SoftwareSigner::from_secret_scalar(&[7; 32])
            .unwrap()
            .public_key();
        let Value::Object(body) =
            json!({"token": {"serial": "1", "label": "a"}, "officers": ["x"]})
        else {
            unreachable!()
        };
        let file = Transcript::assemble(body.clone(), &sign(&body));
        let parsed = Transcript::parse(&file).unwrap();
        parsed.verify(&key).unwrap();
        // The same members compact and in another order verify too.
        let mut value: Value = serde_json::from_slice(&file).unwrap();
        let reordered = json!({"signature": value["signature"].take(), "officers": ["x"],
                               "token": {"label": "a", "serial": "1"}});
        Transcript::parse(&serde_json::to_vec(&reordered).unwrap())
            .unwrap()
            .verify(&key)
            .unwrap();
        // One changed value does not.
        let changed = String::from_utf8(file).unwrap().replace("\"x\"", "\"y\"");
        assert!(matches!(
            Transcript::parse(changed.as_bytes()).unwrap().verify(&key),
            Err(AuditError::BadTranscriptSignature)
        ));
        assert!(Transcript::parse(b"{\"token\": 1}").is_err());
    }
}
