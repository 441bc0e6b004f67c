//! The embedded CA's CMP server (RFC 9483 section 4 from the CA's side): ir/cr, kur, certConf
//! and rr, one DER message in and one out.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cmpv2::body::PkiBody;
use cmpv2::certified_key_pair::{CertOrEncCert, CertifiedKeyPair};
use cmpv2::header::PkiHeader;
use cmpv2::message::PkiMessage;
use cmpv2::response::{CertRepMessage, CertResponse};
use cmpv2::rev::{RevDetails, RevRepContent};
use cmpv2::status::CertStatus;
use const_oid::db::rfc5280::ID_CE_CRL_REASONS;
use const_oid::db::rfc5912::ID_REG_CTRL_OLD_CERT_ID;
use crmf::controls::CertId;
use crmf::pop::ProofOfPossession;
use crmf::request::CertReqMsg;
use der::asn1::Null;
use der::{Decode, Encode};
use secrecy::SecretSlice;
use x509_cert::certificate::Certificate;
use x509_cert::ext::pkix::ExtendedKeyUsage;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::Name;

use super::message::{
    self, Failure as Fail, HeaderParts, NONCE_LEN, Received, RequestExtras, accepted, granted,
    issued_by, octets, policies,
};
use super::pbm;
use crate::embedded_ca::cmp_support::ID_KP_CMC_RA;
use crate::error::CaError;
use crate::verify::{serial_hex, verify_signature};
use crate::{CertificateState, EmbeddedCa, Profile};

/// How long the CA waits for the certConf of an issued certificate.
const CONFIRM_WAIT: Duration = Duration::from_secs(600);
/// The most transactions waiting for certConf (older ones are dropped first).
const MAX_PENDING: usize = 10_000;
/// CRLReason cessationOfOperation: a certificate its requester rejected in certConf.
const REASON_REJECTED_IN_CONFIRM: u8 = 5;

/// The server's configuration. `Debug` shows no secrets.
pub struct CmpServerConfig {
    /// PBM references (senderKID) and their shared secrets.
    pub pbm_secrets: Vec<(Vec<u8>, SecretSlice<u8>)>,
    /// Validity of a certificate whose template has none.
    pub default_validity: Duration,
}

/// The CMP server of the embedded CA. `Debug` shows no secrets.
pub struct CmpServer {
    ca: Arc<EmbeddedCa>,
    config: CmpServerConfig,
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
}

impl fmt::Debug for CmpServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmpServerConfig")
            .field("pbm_references", &self.pbm_secrets.len())
            .field("default_validity", &self.default_validity)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for CmpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmpServer")
            .field("pbm_references", &self.config.pbm_secrets.len())
            .field("default_validity", &self.config.default_validity)
            .finish_non_exhaustive()
    }
}

/// A certificate issued and waiting for its certConf.
struct Pending {
    serial_hex: String,
    cert_hash: Vec<u8>,
    /// The senderNonce of our ip/cp/kup, which certConf must echo.
    nonce: Vec<u8>,
    /// Who asked (certConf must come from the same sender).
    requester: Vec<u8>,
    expires: SystemTime,
}

/// NONCE_LEN unpredictable bytes from the operating system.
fn local_random() -> Vec<u8> {
    use rand_core::RngCore;
    let mut bytes = vec![0u8; NONCE_LEN];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Removes the transactions past their wait from `map`; their certificates' serials.
fn expired(map: &mut HashMap<Vec<u8>, Pending>, now: SystemTime) -> Vec<String> {
    let late: Vec<Vec<u8>> = map
        .iter()
        .filter(|(_, pending)| pending.expires < now)
        .map(|(id, _)| id.clone())
        .collect();
    late.into_iter()
        .filter_map(|id| map.remove(&id))
        .map(|pending| pending.serial_hex)
        .collect()
}

/// Who sent an authenticated request.
enum Sender {
    /// PBM with the secret at this index.
    Pbm(usize),
    /// A registration authority certified by our issuing CA (id-kp-cmcRA).
    Ra(Certificate),
    /// A subscriber with a good certificate of ours.
    Subscriber {
        cert: Certificate,
        serial_hex: String,
    },
}

impl Sender {
    /// An identity to compare the senders of ir and certConf.
    fn identity(&self) -> Vec<u8> {
        match self {
            Sender::Pbm(index) => index.to_be_bytes().to_vec(),
            Sender::Ra(cert) | Sender::Subscriber { cert, .. } => cert.to_der().unwrap_or_default(),
        }
    }
}

/// Why a request is refused: the failInfo bit and a text for the requester.
struct Refusal {
    fail: Fail,
    text: String,
}

fn refuse(fail: Fail, text: impl Into<String>) -> Refusal {
    Refusal {
        fail,
        text: text.into(),
    }
}

impl CmpServer {
    /// A server issuing and revoking with `ca`.
    pub fn new(ca: Arc<EmbeddedCa>, config: CmpServerConfig) -> CmpServer {
        CmpServer {
            ca,
            config,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// One CMP request (DER PKIMessage) in, one DER PKIMessage out (an error message with
    /// PKIFailureInfo for anything refused; never a panic). `now` is the caller's clock (the
    /// daemon's dev clock can be moved). A sender that is not authenticated gets an
    /// unprotected error, made without the HSM; an authenticated one gets a protected answer.
    /// Empty only if even the error message cannot be made (the HSM is gone).
    pub async fn handle(&self, request_der: &[u8], now: SystemTime) -> Vec<u8> {
        // From the operating system, not the HSM: nothing is asked of the HSM before the
        // sender is authenticated. A nonce need not be secret, only unpredictable.
        let nonce = local_random();
        let split = message::received(request_der).and_then(|received| {
            let (rewritten, extras) = message::split_validity(request_der)?;
            Ok((received, rewritten, extras))
        });
        let (received, rewritten, extras) = match split {
            Ok(parsed) => parsed,
            Err(_) => {
                let refusal = refuse(Fail::BadDataFormat, "not a DER PKIMessage");
                return self.error_response(None, None, nonce, refusal, now).await;
            }
        };
        let message = match PkiMessage::from_der(&rewritten) {
            Ok(message) => message,
            Err(_) => {
                let refusal = refuse(Fail::BadDataFormat, "not a DER PKIMessage");
                return self.error_response(None, None, nonce, refusal, now).await;
            }
        };
        let header = &message.header;
        if header.trans_id.is_none() || header.sender_nonce.is_none() {
            let refusal = refuse(
                Fail::BadRequest,
                "transactionID and senderNonce are required",
            );
            return self
                .error_response(Some(header), None, nonce, refusal, now)
                .await;
        }
        let sender = match self.authenticate(&message, &received, now).await {
            Ok(sender) => sender,
            Err(refusal) => {
                tracing::info!(reason = %refusal.text, "CMP request not authenticated");
                return self
                    .error_response(Some(header), None, nonce, refusal, now)
                    .await;
            }
        };
        match self.dispatch(&message, &extras, &sender, &nonce, now).await {
            Ok(body) => match self
                .respond_with(Some(header), Some(&sender), nonce.clone(), &body, now)
                .await
            {
                Ok(der) => der,
                Err(e) => {
                    tracing::error!(error = %e, "CMP: response not made");
                    let refusal = refuse(Fail::SystemFailure, "internal error");
                    self.error_response(Some(header), Some(&sender), nonce, refusal, now)
                        .await
                }
            },
            Err(refusal) => {
                tracing::info!(reason = %refusal.text, "CMP request refused");
                self.error_response(Some(header), Some(&sender), nonce, refusal, now)
                    .await
            }
        }
    }

    /// Checks the protection and says who sent the request.
    async fn authenticate(
        &self,
        message: &PkiMessage<'_>,
        received: &Received,
        now: SystemTime,
    ) -> Result<Sender, Refusal> {
        let header = &message.header;
        let (Some(alg), Some(protection)) = (&header.protection_alg, &received.protection) else {
            return Err(refuse(
                Fail::BadMessageCheck,
                "the request is not protected",
            ));
        };
        let protected = &received.protected;
        if alg.oid == pbm::ID_PASSWORD_BASED_MAC {
            let kid = octets(header.sender_kid.as_ref())
                .ok_or_else(|| refuse(Fail::BadMessageCheck, "PBM without a senderKID"))?;
            let index = self
                .config
                .pbm_secrets
                .iter()
                .position(|(reference, _)| reference.as_slice() == kid)
                .ok_or_else(|| refuse(Fail::NotAuthorized, "unknown PBM reference"))?;
            let secret = &self.config.pbm_secrets[index].1;
            pbm::verify(alg, secret, protected, protection.raw_bytes())
                .map_err(|e| refuse(Fail::BadMessageCheck, e.to_string()))?;
            return Ok(Sender::Pbm(index));
        }
        let signer = received
            .extra_certs
            .first()
            .ok_or_else(|| refuse(Fail::BadMessageCheck, "signed request without extraCerts"))?;
        verify_signature(
            &signer.tbs_certificate.subject_public_key_info,
            alg,
            protected,
            protection,
        )
        .map_err(|_| {
            refuse(
                Fail::BadMessageCheck,
                "signature protection does not verify",
            )
        })?;
        if !issued_by(signer, self.ca.issuing_certificate(), now) {
            return Err(refuse(
                Fail::NotAuthorized,
                "the signer is not certified by this CA, or expired",
            ));
        }
        let is_ra = matches!(
            signer.tbs_certificate.get::<ExtendedKeyUsage>(),
            Ok(Some((_, eku))) if eku.0.contains(&ID_KP_CMC_RA)
        );
        if is_ra {
            return Ok(Sender::Ra(signer.clone()));
        }
        let serial_hex = serial_hex(signer.tbs_certificate.serial_number.as_bytes());
        match self.ca.status(&serial_hex).await {
            Ok(CertificateState::Good { .. }) => Ok(Sender::Subscriber {
                cert: signer.clone(),
                serial_hex,
            }),
            Ok(_) => Err(refuse(
                Fail::NotAuthorized,
                "the signer's certificate is not good",
            )),
            Err(_) => Err(refuse(Fail::SystemUnavail, "CA state unavailable")),
        }
    }

    async fn dispatch(
        &self,
        message: &PkiMessage<'_>,
        extras: &[RequestExtras],
        sender: &Sender,
        nonce: &[u8],
        now: SystemTime,
    ) -> Result<PkiBody<'static>, Refusal> {
        let header = &message.header;
        match (&message.body, sender) {
            (PkiBody::Ir(msgs), Sender::Pbm(_) | Sender::Ra(_)) => {
                let content = self
                    .enroll(header, msgs, extras, None, sender, nonce, now)
                    .await?;
                Ok(PkiBody::Ip(content))
            }
            (PkiBody::Cr(msgs), Sender::Pbm(_) | Sender::Ra(_)) => {
                let content = self
                    .enroll(header, msgs, extras, None, sender, nonce, now)
                    .await?;
                Ok(PkiBody::Cp(content))
            }
            (PkiBody::KUr(msgs), Sender::Subscriber { cert, .. }) => {
                let content = self
                    .enroll(header, msgs, extras, Some(cert), sender, nonce, now)
                    .await?;
                Ok(PkiBody::Kup(content))
            }
            (PkiBody::KUr(msgs), Sender::Ra(_)) => {
                self.check_old_cert_id(msgs).await?;
                let content = self
                    .enroll(header, msgs, extras, None, sender, nonce, now)
                    .await?;
                Ok(PkiBody::Kup(content))
            }
            (PkiBody::CertConf(statuses), _) => {
                self.confirm(header, statuses, sender, now).await?;
                Ok(PkiBody::PkiConf(Null))
            }
            (PkiBody::Rr(details), _) => {
                self.revoke(details, sender, now).await?;
                Ok(PkiBody::Rp(RevRepContent {
                    status: vec![accepted()],
                    rev_certs: None,
                    crls: None,
                }))
            }
            (PkiBody::Ir(_) | PkiBody::Cr(_), Sender::Subscriber { .. }) => Err(refuse(
                Fail::NotAuthorized,
                "ir/cr need an RA certificate or PBM",
            )),
            (PkiBody::KUr(_), Sender::Pbm(_)) => Err(refuse(
                Fail::NotAuthorized,
                "kur needs the certificate being updated or an RA certificate",
            )),
            _ => Err(refuse(Fail::BadRequest, "unsupported message type")),
        }
    }

    /// ir/cr (`old` is None) or kur (`old` is the certificate being updated).
    #[allow(clippy::too_many_arguments)] // one transaction's parts, each used once
    async fn enroll(
        &self,
        header: &PkiHeader<'_>,
        msgs: &[CertReqMsg],
        extras: &[RequestExtras],
        old: Option<&Certificate>,
        sender: &Sender,
        nonce: &[u8],
        now: SystemTime,
    ) -> Result<CertRepMessage<'static>, Refusal> {
        let ([msg], [extra]) = (msgs, extras) else {
            return Err(refuse(
                Fail::BadRequest,
                "exactly one certReqMsg is accepted",
            ));
        };
        let transaction = octets(header.trans_id.as_ref())
            .unwrap_or_default()
            .to_vec();
        if self.pending_lock().contains_key(&transaction) {
            return Err(refuse(Fail::TransactionIdInUse, "transactionID in use"));
        }
        let template = &msg.cert_req.cert_template;
        let spki = template
            .subject_public_key_info
            .as_ref()
            .ok_or_else(|| refuse(Fail::BadCertTemplate, "template without a public key"))?;
        let bad_pop = || refuse(Fail::BadPOP, "proof of possession does not verify");
        match &msg.popo {
            Some(ProofOfPossession::Signature(popo)) if popo.poposk_input.is_none() => {
                let request = &extra.cert_req_der;
                verify_signature(spki, &popo.alg_id, request, &popo.signature)
                    .map_err(|_| bad_pop())?;
            }
            _ => return Err(refuse(Fail::BadPOP, "a signature POP is required")),
        }
        let (subject, profile) = match old {
            None => {
                let subject = template
                    .subject
                    .clone()
                    .filter(|name| !name.0.is_empty())
                    .ok_or_else(|| refuse(Fail::BadCertTemplate, "template without a subject"))?;
                let profile = self.profile(template.extensions.as_ref())?;
                (subject, profile)
            }
            Some(old) => (
                old.tbs_certificate.subject.clone(),
                self.profile(old.tbs_certificate.extensions.as_ref())?,
            ),
        };
        // The template's validity (RFC 4211 OptionalValidity), else from now.
        let not_before = extra.not_before.unwrap_or(now);
        let not_after = extra
            .not_after
            .unwrap_or(not_before + self.config.default_validity);
        let spki_der = spki
            .to_der()
            .map_err(|_| refuse(Fail::BadCertTemplate, "bad public key"))?;
        let issued = self
            .ca
            .issue_named(subject, &spki_der, profile, not_before, not_after, false)
            .await
            .map_err(|e| match e {
                CaError::InvalidRequest(_) | CaError::OutsideCaValidity | CaError::Der(_) => {
                    refuse(Fail::BadCertTemplate, e.to_string())
                }
                _ => {
                    tracing::error!(error = %e, "CMP: issuing failed");
                    refuse(Fail::SystemFailure, "issuing failed")
                }
            })?;
        let cert = Certificate::from_der(&issued.der)
            .map_err(|_| refuse(Fail::SystemFailure, "issued certificate does not parse"))?;
        let dropped = self.remember(
            transaction,
            Pending {
                serial_hex: issued.serial_hex,
                cert_hash: message::cert_hash(&cert, &issued.der),
                nonce: nonce.to_vec(),
                requester: sender.identity(),
                expires: now + CONFIRM_WAIT,
            },
            now,
        );
        self.revoke_unconfirmed(dropped, now).await;
        Ok(CertRepMessage {
            ca_pubs: None,
            response: vec![CertResponse {
                cert_req_id: msg.cert_req.cert_req_id.clone(),
                status: accepted(),
                certified_key_pair: Some(CertifiedKeyPair {
                    cert_or_enc_cert: CertOrEncCert::Certificate(Box::new(cert)),
                    priv_key: None,
                    publication_info: None,
                }),
                rsp_info: None,
            }],
        })
    }

    /// An RA's kur names the certificate it updates in the oldCertID control (RFC 4211
    /// section 6.5), which must be a good certificate of this CA. The CA keeps no copy of the
    /// certificates it issued, so the new one takes the subject and profile of the template.
    async fn check_old_cert_id(&self, msgs: &[CertReqMsg]) -> Result<(), Refusal> {
        let bad = |text: &str| refuse(Fail::BadCertId, text);
        let control = msgs
            .first()
            .and_then(|msg| msg.cert_req.controls.as_ref())
            .into_iter()
            .flatten()
            .find(|control| control.oid == ID_REG_CTRL_OLD_CERT_ID)
            .ok_or_else(|| bad("an RA's kur must name the old certificate in oldCertID"))?;
        let id: CertId = control
            .value
            .decode_as()
            .map_err(|_| bad("malformed oldCertID"))?;
        let issuer = &self.ca.issuing_certificate().tbs_certificate.subject;
        if !matches!(&id.issuer, GeneralName::DirectoryName(name) if name == issuer) {
            return Err(bad("oldCertID names another CA"));
        }
        match self
            .ca
            .status(&serial_hex(id.serial_number.as_bytes()))
            .await
        {
            Ok(CertificateState::Good { .. }) => Ok(()),
            Ok(CertificateState::Revoked { .. }) => {
                Err(refuse(Fail::CertRevoked, "the old certificate is revoked"))
            }
            Ok(_) | Err(CaError::InvalidRequest(_)) => Err(bad("unknown old certificate")),
            Err(_) => Err(refuse(Fail::SystemUnavail, "CA state unavailable")),
        }
    }

    /// The profile named by exactly one configured policy in `extensions`' certificatePolicies.
    fn profile(&self, extensions: Option<&x509_cert::ext::Extensions>) -> Result<Profile, Refusal> {
        let bad = |text: &str| refuse(Fail::BadCertTemplate, text);
        let oids = policies(extensions).map_err(|_| bad("malformed certificatePolicies"))?;
        let mut found = Vec::new();
        for oid in &oids {
            if let Some(profile) = self
                .ca
                .profile_of_policy(oid)
                .map_err(|_| bad("malformed policy"))?
            {
                found.push(profile);
            }
        }
        match found.as_slice() {
            [profile] => Ok(*profile),
            [] => Err(bad(
                "certificatePolicies must name the adult or the minor policy",
            )),
            _ => Err(bad("certificatePolicies names more than one profile")),
        }
    }

    async fn confirm(
        &self,
        header: &PkiHeader<'_>,
        statuses: &[CertStatus<'_>],
        sender: &Sender,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let transaction = octets(header.trans_id.as_ref()).unwrap_or_default();
        let (pending, dropped) = {
            let mut map = self.pending_lock();
            (map.remove(transaction), expired(&mut map, now))
        };
        self.revoke_unconfirmed(dropped, now).await;
        let pending = match pending {
            Some(pending) if pending.expires >= now => pending,
            Some(late) => {
                self.revoke_unconfirmed(vec![late.serial_hex], now).await;
                return Err(refuse(Fail::BadRequest, "the certConf came too late"));
            }
            None => {
                return Err(refuse(
                    Fail::BadRequest,
                    "no certificate waits for this certConf",
                ));
            }
        };
        if pending.requester != sender.identity() {
            return Err(refuse(Fail::NotAuthorized, "certConf from another sender"));
        }
        if octets(header.recip_nonce.as_ref()) != Some(pending.nonce.as_slice()) {
            return Err(refuse(
                Fail::BadRecipientNonce,
                "recipNonce is not our senderNonce",
            ));
        }
        let [status] = statuses else {
            return Err(refuse(
                Fail::BadRequest,
                "exactly one certStatus is accepted",
            ));
        };
        if status.cert_hash.as_bytes() != pending.cert_hash.as_slice() {
            return Err(refuse(Fail::BadCertId, "certHash does not match"));
        }
        let accepted = status.status_info.as_ref().is_none_or(granted);
        if accepted {
            self.ca
                .confirm(&pending.serial_hex, now)
                .await
                .map_err(|_| refuse(Fail::SystemFailure, "confirmation failed"))?;
        } else {
            self.ca
                .revoke(&pending.serial_hex, REASON_REJECTED_IN_CONFIRM, now)
                .await
                .map_err(|_| refuse(Fail::SystemFailure, "revocation failed"))?;
            tracing::info!(serial = %pending.serial_hex, "certificate rejected in certConf, revoked");
        }
        Ok(())
    }

    async fn revoke(
        &self,
        details: &[RevDetails],
        sender: &Sender,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let [detail] = details else {
            return Err(refuse(
                Fail::BadRequest,
                "exactly one revDetails is accepted",
            ));
        };
        let template = &detail.cert_details;
        let serial = template
            .serial_number
            .as_ref()
            .ok_or_else(|| refuse(Fail::BadCertId, "revDetails without a serial number"))?;
        if template
            .issuer
            .as_ref()
            .is_some_and(|issuer| *issuer != self.ca.issuing_certificate().tbs_certificate.subject)
        {
            return Err(refuse(Fail::BadCertId, "not a certificate of this CA"));
        }
        let reason = match detail
            .crl_entry_details
            .iter()
            .flatten()
            .find(|e| e.extn_id == ID_CE_CRL_REASONS)
        {
            None => 0,
            Some(extension) => match extension.extn_value.as_bytes() {
                [0x0a, 0x01, code] => *code,
                _ => return Err(refuse(Fail::BadRequest, "malformed reasonCode")),
            },
        };
        let serial_hex = serial_hex(serial.as_bytes());
        if matches!(sender, Sender::Subscriber { serial_hex: own, .. } if *own != serial_hex) {
            return Err(refuse(
                Fail::NotAuthorized,
                "a subscriber may revoke only its own certificate",
            ));
        }
        match self.ca.status(&serial_hex).await {
            Ok(CertificateState::Good { .. }) => {}
            Ok(CertificateState::Revoked { .. }) => {
                return Err(refuse(Fail::CertRevoked, "already revoked"));
            }
            Ok(_) | Err(CaError::InvalidRequest(_)) => {
                return Err(refuse(Fail::BadCertId, "unknown certificate"));
            }
            Err(_) => return Err(refuse(Fail::SystemUnavail, "CA state unavailable")),
        }
        self.ca
            .revoke(&serial_hex, reason, now)
            .await
            .map_err(|e| match e {
                CaError::InvalidReason(_) => refuse(Fail::BadRequest, e.to_string()),
                _ => refuse(Fail::SystemFailure, "revocation failed"),
            })
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Pending>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes): keep using it.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for the certConf of `pending`. Gives the certificates no longer waited for (past
    /// the wait, or the oldest beyond [`MAX_PENDING`]): the caller revokes them.
    fn remember(&self, transaction: Vec<u8>, pending: Pending, now: SystemTime) -> Vec<String> {
        let mut map = self.pending_lock();
        let mut dropped = expired(&mut map, now);
        if map.len() >= MAX_PENDING {
            let oldest = map
                .iter()
                .min_by_key(|(_, p)| p.expires)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest.and_then(|oldest| map.remove(&oldest)) {
                dropped.push(oldest.serial_hex);
            }
        }
        map.insert(transaction, pending);
        dropped
    }

    /// Revokes certificates whose certConf will never be accepted (cessationOfOperation, as a
    /// rejected one): an unconfirmed certificate is one its requester may not know it has.
    async fn revoke_unconfirmed(&self, serials: Vec<String>, now: SystemTime) {
        for serial in serials {
            match self
                .ca
                .revoke(&serial, REASON_REJECTED_IN_CONFIRM, now)
                .await
            {
                Ok(()) => tracing::warn!(%serial, "certificate never confirmed, revoked"),
                Err(error) => {
                    tracing::error!(%error, %serial, "cannot revoke an unconfirmed certificate")
                }
            }
        }
    }

    /// At start: revokes every certificate issued over CMP and never confirmed. The
    /// transactions they belonged to were lost with the previous run, so no certConf can come
    /// for them. Gives how many were revoked.
    pub async fn settle_unconfirmed(&self, now: SystemTime) -> Result<usize, CaError> {
        let waiting: Vec<String> = self
            .pending_lock()
            .values()
            .map(|pending| pending.serial_hex.clone())
            .collect();
        let orphans: Vec<String> = self
            .ca
            .unconfirmed()
            .await?
            .into_iter()
            .filter(|serial| !waiting.contains(serial))
            .collect();
        let count = orphans.len();
        self.revoke_unconfirmed(orphans, now).await;
        Ok(count)
    }

    async fn error_response(
        &self,
        request: Option<&PkiHeader<'_>>,
        sender: Option<&Sender>,
        nonce: Vec<u8>,
        refusal: Refusal,
        now: SystemTime,
    ) -> Vec<u8> {
        let made = async {
            let body = message::error_body(refusal.fail, &refusal.text)?;
            self.respond(request, sender, nonce, body, now).await
        };
        match made.await {
            Ok(der) => der,
            Err(e) => {
                tracing::error!(error = %e, "CMP: error message not made");
                Vec::new()
            }
        }
    }

    async fn respond_with(
        &self,
        request: Option<&PkiHeader<'_>>,
        sender: Option<&Sender>,
        nonce: Vec<u8>,
        body: &PkiBody<'_>,
        now: SystemTime,
    ) -> Result<Vec<u8>, CaError> {
        let body = message::body_any(body)?;
        self.respond(request, sender, nonce, body, now).await
    }

    /// A response to `request`, protected as the request was (PBM with the same secret) or by
    /// the issuing CA's signature. To a sender that was not authenticated (`None`: a message
    /// that does not parse or whose protection does not verify) the answer is an unprotected
    /// error message (RFC 9483 section 3.6.4 allows it): no HSM work for an unknown sender.
    async fn respond(
        &self,
        request: Option<&PkiHeader<'_>>,
        sender: Option<&Sender>,
        nonce: Vec<u8>,
        body: der::asn1::Any,
        now: SystemTime,
    ) -> Result<Vec<u8>, CaError> {
        let recipient = match request.map(|h| &h.sender) {
            Some(GeneralName::DirectoryName(name)) => name.clone(),
            _ => Name::default(),
        };
        let transaction_id = match request.and_then(|h| octets(h.trans_id.as_ref())) {
            Some(id) => id.to_vec(),
            None => local_random(),
        };
        let recip_nonce = request
            .and_then(|h| octets(h.sender_nonce.as_ref()))
            .map(<[u8]>::to_vec);
        let issuing = self.ca.issuing_certificate();
        let Some(sender) = sender else {
            let header = HeaderParts {
                sender: issuing.tbs_certificate.subject.clone(),
                recipient,
                protection_alg: None,
                sender_kid: None,
                transaction_id,
                sender_nonce: nonce,
                recip_nonce,
            }
            .into_header(now)?;
            return message::encode(&header, body, None, Vec::new());
        };
        let pbm_secret = match sender {
            Sender::Pbm(index) => self.config.pbm_secrets.get(*index),
            _ => None,
        };
        let (protection_alg, sender_kid) = match pbm_secret {
            Some((reference, _)) => (
                pbm::algorithm(self.ca.random(NONCE_LEN).await?)?,
                reference.clone(),
            ),
            None => (
                message::sha256_signature_alg(true),
                self.ca.issuing_key_id().as_bytes().to_vec(),
            ),
        };
        let header = HeaderParts {
            sender: issuing.tbs_certificate.subject.clone(),
            recipient,
            protection_alg: Some(protection_alg.clone()),
            sender_kid: Some(sender_kid),
            transaction_id,
            sender_nonce: nonce,
            recip_nonce,
        }
        .into_header(now)?;
        let protected = message::protected_part(&header, &body)?;
        let (protection, extra_certs) = match pbm_secret {
            Some((_, secret)) => (pbm::mac(&protection_alg, secret, &protected)?, Vec::new()),
            None => (
                self.ca.sign_as_issuing(&protected).await?,
                self.ca
                    .chain_der()
                    .iter()
                    .map(|der| Certificate::from_der(der))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        message::encode(&header, body, Some(&protection), extra_certs)
    }
}
