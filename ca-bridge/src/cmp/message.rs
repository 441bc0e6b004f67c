//! What the CMP client and server share: headers, protection, signature verification, status
//! texts and the certificatePolicies of a template.

use std::time::SystemTime;

use cmpv2::body::PkiBody;
use cmpv2::header::{PkiFreeText, PkiHeader, Pvno};

use cmpv2::status::{PkiStatus, PkiStatusInfo};
use const_oid::db::rfc5280::ID_CE_CERTIFICATE_POLICIES;
use const_oid::db::rfc5912::{ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, SHA_256_WITH_RSA_ENCRYPTION};
use der::asn1::{Any, BitString, GeneralizedTime, OctetString, Utf8StringRef};
use der::{Decode, Encode, Sequence, Tag, TagNumber, Tagged as _};
use sha2::{Digest as _, Sha256, Sha384};
use spki::AlgorithmIdentifierOwned;
use x509_cert::certificate::Certificate;
use x509_cert::ext::Extensions;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::Name;
use x509_cert::time::Time;

use crate::error::CaError;
use crate::verify::{valid_at, verify_issued_by};

/// Bytes of transaction ids and nonces (RFC 9483 section 3.1: at least 128 bits).
pub(crate) const NONCE_LEN: usize = 16;

/// PKIFailureInfo bits (RFC 4210 section 5.2.3) this crate sends. cmpv2 0.2's
/// `PkiFailureInfoValues` uses the bit numbers as masks, so its failInfo is wrong on the wire:
/// failure bits are written and read here, through [`StatusInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // RFC 4210 names the bits so (systemFailure)
pub(crate) enum Failure {
    BadMessageCheck = 1,
    BadRequest = 2,
    BadCertId = 4,
    BadDataFormat = 5,
    BadPOP = 9,
    CertRevoked = 10,
    BadRecipientNonce = 13,
    BadCertTemplate = 19,
    TransactionIdInUse = 21,
    NotAuthorized = 23,
    SystemUnavail = 24,
    SystemFailure = 25,
}

/// The names of PKIFailureInfo's bits, by bit number.
const FAILURE_NAMES: [&str; 27] = [
    "badAlg",
    "badMessageCheck",
    "badRequest",
    "badTime",
    "badCertId",
    "badDataFormat",
    "wrongAuthority",
    "incorrectData",
    "missingTimeStamp",
    "badPOP",
    "certRevoked",
    "certConfirmed",
    "wrongIntegrity",
    "badRecipientNonce",
    "timeNotAvailable",
    "unacceptedPolicy",
    "unacceptedExtension",
    "addInfoNotAvailable",
    "badSenderNonce",
    "badCertTemplate",
    "signerNotTrusted",
    "transactionIdInUse",
    "unsupportedVersion",
    "notAuthorized",
    "systemUnavail",
    "systemFailure",
    "duplicateCertReq",
];

/// PKIStatusInfo (RFC 4210 section 5.2.3) with failInfo as a plain BIT STRING.
#[derive(Clone, Debug, Sequence)]
pub(crate) struct StatusInfo<'a> {
    pub(crate) status: PkiStatus,
    pub(crate) status_string: Option<PkiFreeText<'a>>,
    pub(crate) fail_info: Option<BitString>,
}

/// ErrorMsgContent (RFC 4210 section 5.3.21) over [`StatusInfo`].
#[derive(Clone, Debug, Sequence)]
pub(crate) struct ErrorContent<'a> {
    pub(crate) status: StatusInfo<'a>,
    pub(crate) error_code: Option<u64>,
    pub(crate) error_details: Option<PkiFreeText<'a>>,
}

/// PKIMessage with the header and body kept as they came: protection is checked over the
/// received bytes, never over a re-encoding.
#[derive(Clone, Debug, Sequence)]
struct RawMessage {
    header: Any,
    body: Any,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    protection: Option<BitString>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    extra_certs: Option<Vec<Certificate>>,
}

/// ProtectedPart (RFC 4210 section 5.1.3) over raw header and body.
#[derive(Clone, Debug, Sequence)]
struct RawProtectedPart {
    header: Any,
    body: Any,
}

/// The body tag of an error message: [23] EXPLICIT.
fn error_tag() -> Tag {
    Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::new(23),
    }
}

/// The error body for `failure` with `text`.
pub(crate) fn error_body(failure: Failure, text: &str) -> Result<Any, CaError> {
    let bit = failure as usize;
    let mut bits = vec![0u8; bit / 8 + 1];
    bits[bit / 8] = 0x80 >> (bit % 8);
    let content = ErrorContent {
        status: StatusInfo {
            status: PkiStatus::Rejection,
            status_string: Some(vec![Utf8StringRef::new(text)?]),
            fail_info: Some(BitString::new((7 - bit % 8) as u8, bits)?),
        },
        error_code: None,
        error_details: None,
    };
    Ok(Any::new(error_tag(), content.to_der()?)?)
}

/// The text of an error body (`None` if `body` is another message type).
pub(crate) fn describe_error(body: &Any) -> Result<Option<String>, CaError> {
    if body.tag() != error_tag() {
        return Ok(None);
    }
    let content = ErrorContent::from_der(body.value())?;
    Ok(Some(describe_status_info(&content.status)))
}

fn describe_status_info(status: &StatusInfo<'_>) -> String {
    let mut text = format!("{:?}", status.status);
    for line in status.status_string.iter().flatten() {
        text.push_str(": ");
        text.push_str(line.as_str());
    }
    if let Some(fail_info) = &status.fail_info {
        let names: Vec<&str> = fail_info
            .bits()
            .enumerate()
            .filter(|(_, set)| *set)
            .map(|(bit, _)| FAILURE_NAMES.get(bit).copied().unwrap_or("unknown"))
            .collect();
        text.push_str(&format!(" (failInfo {})", names.join(", ")));
    }
    text
}

/// The received message's protected part (DER of ProtectedPart from the received header and
/// body), its raw body, protection and extraCerts.
pub(crate) struct Received {
    header: Any,
    pub(crate) protected: Vec<u8>,
    pub(crate) body: Any,
    pub(crate) protection: Option<BitString>,
    pub(crate) extra_certs: Vec<Certificate>,
}

impl Received {
    /// The header, parsed.
    pub(crate) fn header(&self) -> Result<PkiHeader<'_>, CaError> {
        Ok(self.header.decode_as()?)
    }
}

/// Splits a received DER PKIMessage.
pub(crate) fn received(der: &[u8]) -> Result<Received, CaError> {
    let raw = RawMessage::from_der(der)?;
    let protected = RawProtectedPart {
        header: raw.header.clone(),
        body: raw.body.clone(),
    }
    .to_der()?;
    Ok(Received {
        header: raw.header,
        protected,
        body: raw.body,
        protection: raw.protection,
        extra_certs: raw.extra_certs.unwrap_or_default(),
    })
}

/// CertReqMsg (RFC 4211 section 3) with its parts kept as DER: the CertRequest is signed by
/// the POP as it is, and crmf 0.2 cannot hold a template's OptionalValidity.
#[derive(Clone, Debug, Sequence)]
struct RawCertReqMsg {
    cert_req: Any,
    popo: Option<Any>,
    reg_info: Option<Any>,
}

/// CertRequest (RFC 4211 section 5) with its parts kept as DER.
#[derive(Clone, Debug, Sequence)]
struct RawCertRequest {
    cert_req_id: Any,
    cert_template: Any,
    controls: Option<Any>,
}

/// OptionalValidity (RFC 4211 section 5), with its fields' tags EXPLICIT and constructed
/// (crmf 0.2's type marks them primitive).
#[derive(Clone, Debug, Sequence)]
struct TemplateValidity {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    not_before: Option<Time>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    not_after: Option<Time>,
}

/// The tag of OptionalValidity in a CertTemplate: [4] IMPLICIT.
fn validity_tag() -> Tag {
    Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::new(4),
    }
}

/// What crmf 0.2 loses of a received certificate request: the DER of the CertRequest (what the
/// POP signs) and the template's validity.
#[derive(Clone, Debug, Default)]
pub(crate) struct RequestExtras {
    pub(crate) cert_req_der: Vec<u8>,
    pub(crate) not_before: Option<SystemTime>,
    pub(crate) not_after: Option<SystemTime>,
}

/// For ir, cr and kur: the message without the templates' validities (which crmf 0.2 cannot
/// decode), and per CertReqMsg what was taken out. Other messages come back unchanged.
pub(crate) fn split_validity(der: &[u8]) -> Result<(Vec<u8>, Vec<RequestExtras>), CaError> {
    let raw = RawMessage::from_der(der)?;
    let is_request = matches!(
        raw.body.tag(),
        Tag::ContextSpecific { constructed: true, number } if [0, 2, 7].contains(&number.value())
    );
    if !is_request {
        return Ok((der.to_vec(), Vec::new()));
    }
    let msgs = Vec::<RawCertReqMsg>::from_der(raw.body.value())?;
    let mut extras = Vec::with_capacity(msgs.len());
    let mut rewritten = Vec::with_capacity(msgs.len());
    for mut msg in msgs {
        let cert_req_der = msg.cert_req.to_der()?;
        let mut request: RawCertRequest = msg.cert_req.decode_as()?;
        let fields: Vec<Any> = request.cert_template.decode_as()?;
        let mut extra = RequestExtras {
            cert_req_der,
            ..RequestExtras::default()
        };
        let mut kept = Vec::new();
        for field in fields {
            if field.tag() == validity_tag() {
                let validity =
                    TemplateValidity::from_der(&Any::new(Tag::Sequence, field.value())?.to_der()?)?;
                extra.not_before = validity.not_before.map(|t| t.to_system_time());
                extra.not_after = validity.not_after.map(|t| t.to_system_time());
            } else {
                kept.extend(field.to_der()?);
            }
        }
        request.cert_template = Any::new(Tag::Sequence, kept)?;
        msg.cert_req = Any::encode_from(&request)?;
        extras.push(extra);
        rewritten.push(msg);
    }
    let body = Any::new(raw.body.tag(), rewritten.to_der()?)?;
    let message = RawMessage { body, ..raw }.to_der()?;
    Ok((message, extras))
}

/// `cert_request` (DER CertRequest without a validity) with the template's OptionalValidity
/// set to `not_before`..`not_after`, in its place among the template's fields.
pub(crate) fn with_validity(
    cert_request: &[u8],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<Vec<u8>, CaError> {
    let mut request = RawCertRequest::from_der(cert_request)?;
    let validity = TemplateValidity {
        not_before: Some(crate::x509::x509_time(not_before)?),
        not_after: Some(crate::x509::x509_time(not_after)?),
    };
    let validity = Any::new(validity_tag(), Any::encode_from(&validity)?.value())?;
    let mut fields: Vec<Any> = request.cert_template.decode_as()?;
    let position = fields
        .iter()
        .position(|field| match field.tag() {
            Tag::ContextSpecific { number, .. } => number.value() > 4,
            _ => true,
        })
        .unwrap_or(fields.len());
    fields.insert(position, validity);
    let mut contents = Vec::new();
    for field in &fields {
        contents.extend(field.to_der()?);
    }
    request.cert_template = Any::new(Tag::Sequence, contents)?;
    Ok(request.to_der()?)
}

/// The body of an ir (`kur` false) or kur with one CertReqMsg: `cert_request` as it was
/// signed, and its POP.
pub(crate) fn cert_request_body(
    kur: bool,
    cert_request: &[u8],
    popo: &crmf::pop::ProofOfPossession,
) -> Result<Any, CaError> {
    let msg = RawCertReqMsg {
        cert_req: Any::from_der(cert_request)?,
        popo: Some(Any::encode_from(popo)?),
        reg_info: None,
    };
    let tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::new(if kur { 7 } else { 0 }),
    };
    Ok(Any::new(tag, vec![msg].to_der()?)?)
}

/// A body as raw DER.
pub(crate) fn body_any(body: &PkiBody<'_>) -> Result<Any, CaError> {
    Ok(Any::from_der(&body.to_der()?)?)
}

/// The header fields that differ between messages.
pub(crate) struct HeaderParts {
    pub(crate) sender: Name,
    pub(crate) recipient: Name,
    /// `None` for an unprotected message (an error to a sender we could not authenticate).
    pub(crate) protection_alg: Option<AlgorithmIdentifierOwned>,
    pub(crate) sender_kid: Option<Vec<u8>>,
    pub(crate) transaction_id: Vec<u8>,
    pub(crate) sender_nonce: Vec<u8>,
    pub(crate) recip_nonce: Option<Vec<u8>>,
}

impl HeaderParts {
    pub(crate) fn into_header<'a>(self, now: SystemTime) -> Result<PkiHeader<'a>, CaError> {
        Ok(PkiHeader {
            pvno: Pvno::Cmp2000,
            sender: GeneralName::DirectoryName(self.sender),
            recipient: GeneralName::DirectoryName(self.recipient),
            message_time: Some(GeneralizedTime::from_system_time(now)?),
            protection_alg: self.protection_alg,
            sender_kid: self.sender_kid.map(OctetString::new).transpose()?,
            recip_kid: None,
            trans_id: Some(OctetString::new(self.transaction_id)?),
            sender_nonce: Some(OctetString::new(self.sender_nonce)?),
            recip_nonce: self.recip_nonce.map(OctetString::new).transpose()?,
            free_text: None,
            general_info: None,
        })
    }
}

/// DER of ProtectedPart (RFC 4210 section 5.1.3): what the protection covers.
pub(crate) fn protected_part(header: &PkiHeader<'_>, body: &Any) -> Result<Vec<u8>, CaError> {
    Ok(RawProtectedPart {
        header: Any::from_der(&header.to_der()?)?,
        body: body.clone(),
    }
    .to_der()?)
}

/// A complete message, DER.
pub(crate) fn encode(
    header: &PkiHeader<'_>,
    body: Any,
    protection: Option<&[u8]>,
    extra_certs: Vec<Certificate>,
) -> Result<Vec<u8>, CaError> {
    Ok(RawMessage {
        header: Any::from_der(&header.to_der()?)?,
        body,
        protection: protection.map(BitString::from_bytes).transpose()?,
        extra_certs: (!extra_certs.is_empty()).then_some(extra_certs),
    }
    .to_der()?)
}

/// The AlgorithmIdentifier of a signature with SHA-256 by a key of this SPKI algorithm.
pub(crate) fn sha256_signature_alg(ec: bool) -> AlgorithmIdentifierOwned {
    if ec {
        AlgorithmIdentifierOwned {
            oid: ECDSA_WITH_SHA_256,
            parameters: None,
        }
    } else {
        AlgorithmIdentifierOwned {
            oid: SHA_256_WITH_RSA_ENCRYPTION,
            parameters: Some(Any::null()),
        }
    }
}

/// Whether `cert` was signed by `issuer` (names and signature) and is valid at `now`.
pub(crate) fn issued_by(cert: &Certificate, issuer: &Certificate, now: SystemTime) -> bool {
    valid_at(cert, now) && verify_issued_by(cert, issuer).is_ok()
}

/// Whether `signer` is one of `trusted` or chains to one of them through `untrusted` (at most
/// four steps), every certificate valid at `now`.
pub(crate) fn chains_to(
    signer: &Certificate,
    untrusted: &[Certificate],
    trusted: &[Certificate],
    now: SystemTime,
) -> bool {
    let mut current = signer.clone();
    for _ in 0..4 {
        if trusted.contains(&current) && valid_at(&current, now) {
            return true;
        }
        if trusted
            .iter()
            .any(|anchor| issued_by(&current, anchor, now))
        {
            return true;
        }
        match untrusted
            .iter()
            .find(|candidate| *candidate != &current && issued_by(&current, candidate, now))
        {
            Some(next) => current = next.clone(),
            None => return false,
        }
    }
    false
}

/// The certHash of certConf (RFC 4210 section 5.3.18): the hash of the certificate's own
/// signature algorithm (SHA-384 for the *-with-SHA384 ones, else SHA-256).
pub(crate) fn cert_hash(cert: &Certificate, der: &[u8]) -> Vec<u8> {
    match cert.signature_algorithm.oid {
        ECDSA_WITH_SHA_384 => Sha384::digest(der).to_vec(),
        oid if oid == const_oid::db::rfc5912::SHA_384_WITH_RSA_ENCRYPTION => {
            Sha384::digest(der).to_vec()
        }
        _ => Sha256::digest(der).to_vec(),
    }
}

/// The policy identifiers (as `Any`, since they may hold arcs above 64 bits) of the
/// certificatePolicies extension among `extensions`; empty without one.
pub(crate) fn policies(extensions: Option<&Extensions>) -> Result<Vec<Any>, CaError> {
    let Some(extension) = extensions
        .into_iter()
        .flatten()
        .find(|e| e.extn_id == ID_CE_CERTIFICATE_POLICIES)
    else {
        return Ok(Vec::new());
    };
    let infos = Vec::<Any>::from_der(extension.extn_value.as_bytes())?;
    infos
        .iter()
        .map(|info| {
            let fields = info.decode_as::<Vec<Any>>()?;
            fields
                .into_iter()
                .next()
                .filter(|oid| oid.tag() == Tag::ObjectIdentifier)
                .ok_or_else(|| CaError::Protocol("policyInformation without a policy".into()))
        })
        .collect()
}

/// A status text for errors: the status and its texts. (cmpv2 0.2 misreads failInfo bits,
/// so they are left out here; error messages are read with [`describe_error`].)
pub(crate) fn describe_status(status: &PkiStatusInfo<'_>) -> String {
    let mut text = format!("{:?}", status.status);
    for line in status.status_string.iter().flatten() {
        text.push_str(": ");
        text.push_str(line.as_str());
    }
    text
}

/// Whether a status grants a request (accepted or grantedWithMods).
pub(crate) fn granted(status: &PkiStatusInfo<'_>) -> bool {
    matches!(
        status.status,
        PkiStatus::Accepted | PkiStatus::GrantedWithMods
    )
}

/// An accepted status without text.
pub(crate) fn accepted<'a>() -> PkiStatusInfo<'a> {
    PkiStatusInfo {
        status: PkiStatus::Accepted,
        status_string: None,
        fail_info: None,
    }
}

/// A rejection without text (a certConf that refuses the certificate).
pub(crate) fn rejection<'a>() -> PkiStatusInfo<'a> {
    PkiStatusInfo {
        status: PkiStatus::Rejection,
        status_string: None,
        fail_info: None,
    }
}

/// The bytes of an optional OCTET STRING header field.
pub(crate) fn octets(field: Option<&OctetString>) -> Option<&[u8]> {
    field.map(OctetString::as_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_message() {
        use cmpv2::message::PkiMessage;
        assert!(PkiMessage::from_der(b"\x30\x03\x02\x01\x02").is_err());
        assert!(PkiMessage::from_der(b"not DER at all").is_err());
    }

    #[test]
    fn error_bodies_carry_the_right_failure_bit() {
        let body = error_body(Failure::NotAuthorized, "no").unwrap();
        let text = describe_error(&body).unwrap().unwrap();
        assert_eq!(text, "Rejection: no (failInfo notAuthorized)");
        let body = error_body(Failure::BadMessageCheck, "bad").unwrap();
        // failInfo BIT STRING: one content octet 0x40 with 6 unused bits.
        assert!(
            body.value()
                .windows(4)
                .any(|w| w == [0x03, 0x02, 0x06, 0x40])
        );
        let ok = body_any(&PkiBody::PkiConf(der::asn1::Null)).unwrap();
        assert_eq!(describe_error(&ok).unwrap(), None);
    }

    #[test]
    fn template_validity_is_inserted_with_explicit_constructed_tags() {
        let request = crmf::request::CertRequest {
            cert_req_id: der::asn1::Int::new(&[0]).unwrap(),
            cert_template: crmf::request::CertTemplate {
                version: None,
                serial_number: None,
                signature: None,
                issuer: None,
                validity: None,
                subject: Some(Name::default()),
                subject_public_key_info: None,
                issuer_unique_id: None,
                subject_unique_id: None,
                extensions: None,
            },
            controls: None,
        };
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let der = with_validity(&request.to_der().unwrap(), at, at).unwrap();
        // CertRequest { INTEGER 0, CertTemplate { [4] { [0] { UTCTime }, [1] { UTCTime } },
        // [5] { Name } } }
        let hex = hex::encode(&der);
        assert!(
            hex.contains(
                "a422a00f170d3233313131343232313332305aa10f170d3233313131343232313332305aa502"
            ),
            "{hex}"
        );
    }

    #[test]
    fn truncated_messages_are_refused() {
        assert!(received(b"\x30\x03\x02\x01\x02").is_err());
        assert!(received(&[]).is_err());
    }
}
