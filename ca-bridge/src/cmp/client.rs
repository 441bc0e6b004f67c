//! The CMP client (RFC 9483 sections 4.1.1, 4.1.3, 4.2): `ir` and `kur` with certConf, and
//! `rr`, each one transaction over HTTP.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use cmpv2::body::PkiBody;
use cmpv2::certified_key_pair::CertOrEncCert;
use cmpv2::header::PkiHeader;
use cmpv2::message::PkiMessage;
use cmpv2::rev::RevDetails;
use cmpv2::status::CertStatus;
use const_oid::db::rfc5280::{ID_CE_CERTIFICATE_POLICIES, ID_CE_CRL_REASONS};
use const_oid::db::rfc5912::ID_REG_CTRL_OLD_CERT_ID;
use crmf::controls::CertId;
use crmf::pop::{PopoSigningKey, ProofOfPossession};
use crmf::request::{CertRequest, CertTemplate};
use der::asn1::{Any, BitString, Int, OctetString};
use der::{Decode, Encode};
use hsm_adapter::{Digest, HashAlgorithm, Hsm, SignatureScheme, SystemKey, UserKeyRef};
use secrecy::SecretSlice;
use sha2::{Digest as _, Sha256};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::Certificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::Name;

use super::message::{self, HeaderParts, NONCE_LEN, chains_to, describe_status, granted, octets};
use super::pbm;
use crate::embedded_ca::policy_oid::certificate_policies;
use crate::embedded_ca::profile::subscriber_name;
use crate::error::CaError;
use crate::transport::{CMP_CONTENT_TYPE, HttpTransport};
use crate::verify::{serial_hex, verify_signature};
use crate::{IssueRequest, IssuedCertificate, PolicyOid, Profile};

/// How the client protects its requests. `Debug` shows no secret.
pub enum ClientProtection {
    /// Signature protection with the daemon's RA key in the HSM (SystemKey::CmpClient) and its
    /// certificate (DER), plus extra certs (chain) to send.
    Signature {
        /// The RA certificate of `SystemKey::CmpClient`, DER.
        certificate_der: Vec<u8>,
        /// Further certificates for extraCerts (its chain), DER.
        extra_certs_der: Vec<Vec<u8>>,
    },
    /// PBM (RFC 4210 5.1.3.1, owf SHA-256, HMAC-SHA-256) with a shared secret and a reference
    /// (senderKID).
    Pbm {
        /// The reference: the senderKID.
        reference: Vec<u8>,
        /// The shared secret.
        secret: SecretSlice<u8>,
    },
}

/// What the client needs to know. `Debug` shows no secret.
pub struct CmpClientConfig {
    /// The CMP endpoint, e.g. `http://127.0.0.1:8080/cmp`.
    pub url: String,
    /// Organisation (O) of the subscriber subject ([`IssueRequest`] gives the rest).
    pub organisation: String,
    /// Policy OID (dotted) of the adult profile, written into the template's
    /// certificatePolicies extension.
    pub adult_policy_oid: String,
    /// Policy OID (dotted) of the minor profile.
    pub minor_policy_oid: String,
    /// How requests are protected.
    pub protection: ClientProtection,
    /// CA certificates (DER) trusted to sign responses: a signature-protected response must be
    /// signed by one of them or by a certificate in extraCerts that chains to one of them. A
    /// PBM-protected response is checked with the same secret.
    pub trusted_der: Vec<Vec<u8>>,
}

/// A CMP client whose keys are in the HSM. `Debug` shows no secrets.
pub struct CmpClient {
    hsm: Arc<Hsm>,
    transport: HttpTransport,
    url: String,
    organisation: String,
    adult_policy: PolicyOid,
    minor_policy: PolicyOid,
    protection: Protection,
    trusted: Vec<Certificate>,
}

/// The parsed [`ClientProtection`].
enum Protection {
    Signature {
        certificate: Box<Certificate>,
        extra: Vec<Certificate>,
    },
    Pbm {
        reference: Vec<u8>,
        secret: SecretSlice<u8>,
    },
}

/// Who protects one message.
enum Protector<'a> {
    Pbm {
        reference: &'a [u8],
        secret: &'a SecretSlice<u8>,
    },
    Ra {
        certificate: &'a Certificate,
        extra: &'a [Certificate],
    },
    User {
        key: &'a UserKeyRef,
        certificate: &'a Certificate,
    },
}

impl fmt::Debug for ClientProtection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientProtection::Signature {
                extra_certs_der, ..
            } => f
                .debug_struct("Signature")
                .field("extra_certs", &extra_certs_der.len())
                .finish_non_exhaustive(),
            ClientProtection::Pbm { .. } => f.write_str("Pbm { [REDACTED] }"),
        }
    }
}

impl fmt::Debug for CmpClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmpClientConfig")
            .field("url", &self.url)
            .field("protection", &self.protection)
            .field("trusted", &self.trusted_der.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for CmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protection = match self.protection {
            Protection::Signature { .. } => "signature",
            Protection::Pbm { .. } => "pbm",
        };
        f.debug_struct("CmpClient")
            .field("url", &self.url)
            .field("protection", &protection)
            .field("trusted", &self.trusted.len())
            .finish_non_exhaustive()
    }
}

/// A certificate the CA issued and waits to have confirmed (certConf). The caller records it
/// first, so that a crash cannot leave a certificate it does not know of: one never confirmed
/// is revoked by the CA. `Debug` shows the serial only.
pub struct Unconfirmed {
    issued: IssuedCertificate,
    transaction_id: Vec<u8>,
    sender_nonce: Vec<u8>,
    cert_hash: Vec<u8>,
    subject: Name,
    user: Option<(UserKeyRef, Certificate)>,
}

impl Unconfirmed {
    /// The certificate, as issued.
    pub fn certificate(&self) -> &IssuedCertificate {
        &self.issued
    }
}

impl fmt::Debug for Unconfirmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unconfirmed")
            .field("serial", &self.issued.serial_hex)
            .finish_non_exhaustive()
    }
}

impl CmpClient {
    /// Checks the configuration ([`CaError::Config`] for bad OIDs, certificates or an empty
    /// trust list).
    pub fn new(
        hsm: Arc<Hsm>,
        transport: HttpTransport,
        config: CmpClientConfig,
    ) -> Result<CmpClient, CaError> {
        let oid = |field: &str, value: &str| {
            PolicyOid::from_str(value)
                .map_err(|_| CaError::Config(format!("{field} is not a dotted OID")))
        };
        let cert = |what: &str, der: &[u8]| {
            Certificate::from_der(der)
                .map_err(|_| CaError::Config(format!("{what} is not a DER certificate")))
        };
        let trusted = config
            .trusted_der
            .iter()
            .map(|der| cert("trusted_der", der))
            .collect::<Result<Vec<_>, _>>()?;
        if trusted.is_empty() {
            return Err(CaError::Config("trusted_der is empty".into()));
        }
        let protection = match config.protection {
            ClientProtection::Signature {
                certificate_der,
                extra_certs_der,
            } => Protection::Signature {
                certificate: Box::new(cert("certificate_der", &certificate_der)?),
                extra: extra_certs_der
                    .iter()
                    .map(|der| cert("extra_certs_der", der))
                    .collect::<Result<_, _>>()?,
            },
            ClientProtection::Pbm { reference, secret } => {
                if reference.is_empty() {
                    return Err(CaError::Config("PBM reference is empty".into()));
                }
                Protection::Pbm { reference, secret }
            }
        };
        Ok(CmpClient {
            hsm,
            transport,
            adult_policy: oid("adult_policy_oid", &config.adult_policy_oid)?,
            minor_policy: oid("minor_policy_oid", &config.minor_policy_oid)?,
            url: config.url,
            organisation: config.organisation,
            protection,
            trusted,
        })
    }

    /// ir. POP: signature by `key` (the user key in the HSM) over the DER CertRequest (ECDSA
    /// for EC keys, PKCS#1 v1.5 SHA-256 for RSA). The template carries the subject, the
    /// validity, the public key and the profile's certificatePolicies. The certificate is
    /// issued but not confirmed: [`CmpClient::confirm`] accepts (or rejects) it once the caller
    /// has recorded it; a CA revokes a certificate that is never confirmed.
    pub async fn issue(
        &self,
        request: &IssueRequest,
        key: &UserKeyRef,
    ) -> Result<Unconfirmed, CaError> {
        let subject = subscriber_name(
            &self.organisation,
            &request.surname,
            request.given_name.as_deref(),
            &request.hkic_hash_hex,
        )?;
        let body = self
            .cert_request_body(false, subject.clone(), request, key, None)
            .await?;
        let protector = self.own_protector();
        self.enroll(&protector, subject, false, body, request, None)
            .await
    }

    /// kur for re-key: protected by the CURRENT certificate's key (current_key,
    /// current_cert_der as protection cert), POP by new_key. The template keeps the current
    /// subject and names the current certificate in oldCertID. Unconfirmed, as for
    /// [`CmpClient::issue`]; the certConf is protected like the kur.
    pub async fn rekey(
        &self,
        current_cert_der: &[u8],
        current_key: &UserKeyRef,
        request: &IssueRequest,
        new_key: &UserKeyRef,
    ) -> Result<Unconfirmed, CaError> {
        let current = Certificate::from_der(current_cert_der)
            .map_err(|_| CaError::InvalidRequest("current certificate is not DER".into()))?;
        if current.tbs_certificate.subject_public_key_info.to_der()?
            != current_key.public_key().as_der()
        {
            return Err(CaError::InvalidRequest(
                "the current key does not belong to the current certificate".into(),
            ));
        }
        let old_cert_id = AttributeTypeAndValue {
            oid: ID_REG_CTRL_OLD_CERT_ID,
            value: Any::encode_from(&CertId {
                issuer: GeneralName::DirectoryName(current.tbs_certificate.issuer.clone()),
                serial_number: current.tbs_certificate.serial_number.clone(),
            })?,
        };
        let subject = current.tbs_certificate.subject.clone();
        let body = self
            .cert_request_body(
                true,
                subject.clone(),
                request,
                new_key,
                Some(vec![old_cert_id]),
            )
            .await?;
        let protector = Protector::User {
            key: current_key,
            certificate: &current,
        };
        let user = (current_key.clone(), current.clone());
        self.enroll(&protector, subject, true, body, request, Some(user))
            .await
    }

    /// certConf for a certificate of [`CmpClient::issue`] or [`CmpClient::rekey`]: `accept`
    /// confirms it; otherwise the CA revokes it. Gives the certificate once the CA answered
    /// pkiConf.
    pub async fn confirm(
        &self,
        pending: Unconfirmed,
        accept: bool,
    ) -> Result<IssuedCertificate, CaError> {
        let Unconfirmed {
            issued,
            transaction_id,
            sender_nonce,
            cert_hash,
            subject,
            user,
        } = pending;
        let protector = match &user {
            Some((key, certificate)) => Protector::User { key, certificate },
            None => self.own_protector(),
        };
        // certConf (RFC 9483 section 4.1.1), with the CA's nonce echoed; a rejection carries
        // the status rejection (RFC 4210 section 5.3.18).
        let confirm = Transaction {
            id: transaction_id,
            nonce: self.hsm.random(NONCE_LEN).await?,
        };
        let status_info = (!accept).then(message::rejection);
        let cert_conf = PkiBody::CertConf(vec![CertStatus {
            cert_hash: OctetString::new(cert_hash)?,
            cert_req_id: Int::new(&[0])?,
            status_info,
        }]);
        let der = self
            .request(
                &protector,
                &confirm,
                Some(sender_nonce),
                subject,
                self.trusted_recipient(),
                message::body_any(&cert_conf)?,
            )
            .await?;
        let response = self.exchange(der).await?;
        let message = self.check_response(&response, &confirm, &protector)?;
        if !matches!(message.body, PkiBody::PkiConf(_)) {
            return Err(unexpected(&message.body, "pkiconf"));
        }
        Ok(issued)
    }

    /// rr with an RFC 5280 reason code; the revDetails name the certificate's issuer and
    /// serial.
    pub async fn revoke(&self, cert_der: &[u8], reason_code: u8) -> Result<(), CaError> {
        if !matches!(reason_code, 0..=6 | 8..=10) {
            return Err(CaError::InvalidReason(reason_code));
        }
        let cert = Certificate::from_der(cert_der)
            .map_err(|_| CaError::InvalidRequest("certificate is not DER".into()))?;
        let tbs = &cert.tbs_certificate;
        let details = RevDetails {
            cert_details: CertTemplate {
                issuer: Some(tbs.issuer.clone()),
                serial_number: Some(tbs.serial_number.clone()),
                ..empty_template()
            },
            crl_entry_details: Some(vec![Extension {
                extn_id: ID_CE_CRL_REASONS,
                critical: false,
                // CRLReason ::= ENUMERATED, one content octet for the codes above.
                extn_value: OctetString::new(vec![0x0a, 0x01, reason_code])?,
            }]),
        };
        let protector = self.own_protector();
        let transaction = Transaction::new(&self.hsm).await?;
        let request = self
            .request(
                &protector,
                &transaction,
                None,
                tbs.subject.clone(),
                tbs.issuer.clone(),
                message::body_any(&PkiBody::Rr(vec![details]))?,
            )
            .await?;
        let response = self.exchange(request).await?;
        let message = self.check_response(&response, &transaction, &protector)?;
        let PkiBody::Rp(content) = &message.body else {
            return Err(unexpected(&message.body, "rp"));
        };
        let status = content
            .status
            .first()
            .ok_or_else(|| CaError::Protocol("rp without a status".into()))?;
        if !granted(status) {
            return Err(CaError::Refused(describe_status(status)));
        }
        Ok(())
    }

    fn own_protector(&self) -> Protector<'_> {
        match &self.protection {
            Protection::Signature { certificate, extra } => Protector::Ra { certificate, extra },
            Protection::Pbm { reference, secret } => Protector::Pbm { reference, secret },
        }
    }

    fn policy(&self, profile: Profile) -> &PolicyOid {
        match profile {
            Profile::Adult => &self.adult_policy,
            Profile::Minor => &self.minor_policy,
        }
    }

    /// The ir or kur body: one CertReqMsg (certReqId 0) whose template has the subject, the
    /// key, the profile's policy and the request's validity, with a signature POP by `key`.
    async fn cert_request_body(
        &self,
        kur: bool,
        subject: Name,
        request: &IssueRequest,
        key: &UserKeyRef,
        controls: Option<Vec<AttributeTypeAndValue>>,
    ) -> Result<Any, CaError> {
        if key.public_key().as_der() != request.public_key_spki_der.as_slice() {
            return Err(CaError::InvalidRequest(
                "the request's public key is not the signing key's".into(),
            ));
        }
        let spki = SubjectPublicKeyInfoOwned::from_der(&request.public_key_spki_der)
            .map_err(|_| CaError::InvalidRequest("public key is not a DER SPKI".into()))?;
        let cert_req = CertRequest {
            cert_req_id: Int::new(&[0])?,
            cert_template: CertTemplate {
                subject: Some(subject),
                subject_public_key_info: Some(spki),
                extensions: Some(vec![Extension {
                    extn_id: ID_CE_CERTIFICATE_POLICIES,
                    critical: false,
                    extn_value: OctetString::new(certificate_policies(
                        self.policy(request.profile),
                    )?)?,
                }]),
                ..empty_template()
            },
            controls,
        };
        let cert_req =
            message::with_validity(&cert_req.to_der()?, request.not_before, request.not_after)?;
        let (alg_id, signature) = self.sign_with_user_key(key, &cert_req).await?;
        let popo = ProofOfPossession::Signature(Box::new(PopoSigningKey {
            poposk_input: None,
            alg_id,
            signature: BitString::from_bytes(&signature)?,
        }));
        message::cert_request_body(kur, &cert_req, &popo)
    }

    async fn sign_with_user_key(
        &self,
        key: &UserKeyRef,
        data: &[u8],
    ) -> Result<(AlgorithmIdentifierOwned, Vec<u8>), CaError> {
        let ec = key.algorithm().is_ec();
        let scheme = if ec {
            SignatureScheme::Ecdsa
        } else {
            SignatureScheme::RsaPkcs1v15
        };
        let digest = Digest::new(HashAlgorithm::Sha256, Sha256::digest(data).to_vec())?;
        let signature = self.hsm.sign(key, scheme, &digest).await?;
        Ok((message::sha256_signature_alg(ec), signature))
    }

    /// ir or kur, up to the issued certificate (its certConf is [`CmpClient::confirm`]).
    /// `user` is the key and certificate that protect a kur (and so its certConf).
    async fn enroll(
        &self,
        protector: &Protector<'_>,
        subject: Name,
        kur: bool,
        body: Any,
        request: &IssueRequest,
        user: Option<(UserKeyRef, Certificate)>,
    ) -> Result<Unconfirmed, CaError> {
        let recipient = self.trusted_recipient();
        let transaction = Transaction::new(&self.hsm).await?;
        let der = self
            .request(
                protector,
                &transaction,
                None,
                subject.clone(),
                recipient.clone(),
                body,
            )
            .await?;
        let response = self.exchange(der).await?;
        let message = self.check_response(&response, &transaction, protector)?;
        let (issued, cert_hash, sender_nonce) =
            issued_certificate(&message, kur, &request.public_key_spki_der)?;
        Ok(Unconfirmed {
            issued,
            transaction_id: transaction.id,
            sender_nonce,
            cert_hash,
            subject,
            user,
        })
    }

    /// The recipient: the subject of the first trusted certificate (the CA the client talks to).
    fn trusted_recipient(&self) -> Name {
        self.trusted
            .first()
            .map(|c| c.tbs_certificate.subject.clone())
            .unwrap_or_default()
    }

    /// A protected request, DER.
    async fn request(
        &self,
        protector: &Protector<'_>,
        transaction: &Transaction,
        recip_nonce: Option<Vec<u8>>,
        sender: Name,
        recipient: Name,
        body: Any,
    ) -> Result<Vec<u8>, CaError> {
        let (sender, protection_alg, sender_kid, signer) = match protector {
            Protector::Pbm { reference, .. } => (
                sender,
                pbm::algorithm(self.hsm.random(NONCE_LEN).await?)?,
                Some(reference.to_vec()),
                None,
            ),
            Protector::Ra { certificate, .. } => (
                certificate.tbs_certificate.subject.clone(),
                message::sha256_signature_alg(true),
                subject_key_id(certificate),
                Some(*certificate),
            ),
            Protector::User { key, certificate } => (
                certificate.tbs_certificate.subject.clone(),
                message::sha256_signature_alg(key.algorithm().is_ec()),
                subject_key_id(certificate),
                Some(*certificate),
            ),
        };
        let header = HeaderParts {
            sender,
            recipient,
            protection_alg: Some(protection_alg.clone()),
            sender_kid,
            transaction_id: transaction.id.clone(),
            sender_nonce: transaction.nonce.clone(),
            recip_nonce,
        }
        .into_header(SystemTime::now())?;
        let protected = message::protected_part(&header, &body)?;
        let protection = match protector {
            Protector::Pbm { secret, .. } => pbm::mac(&protection_alg, secret, &protected)?,
            Protector::Ra { .. } => {
                let digest =
                    Digest::new(HashAlgorithm::Sha256, Sha256::digest(&protected).to_vec())?;
                self.hsm
                    .sign_with_system_key(SystemKey::CmpClient, &digest)
                    .await?
            }
            Protector::User { key, .. } => self.sign_with_user_key(key, &protected).await?.1,
        };
        let mut extra_certs: Vec<Certificate> = signer.into_iter().cloned().collect();
        if let Protector::Ra { extra, .. } = protector {
            extra_certs.extend(extra.iter().cloned());
        }
        message::encode(&header, body, Some(&protection), extra_certs)
    }

    async fn exchange(&self, request: Vec<u8>) -> Result<Vec<u8>, CaError> {
        self.transport
            .post(&self.url, CMP_CONTENT_TYPE, request, CMP_CONTENT_TYPE)
            .await
    }

    /// Parses a response and checks that it answers `transaction` and is protected by the CA
    /// (or with our PBM secret); an error message becomes [`CaError::Refused`].
    fn check_response<'a>(
        &self,
        der: &'a [u8],
        transaction: &Transaction,
        protector: &Protector<'_>,
    ) -> Result<PkiMessage<'a>, CaError> {
        check_response(&self.trusted, der, transaction, protector)
    }
}

/// Parses a response and checks that it answers `transaction` and is protected by the CA
/// (or with our PBM secret); an error message becomes [`CaError::Refused`].
fn check_response<'a>(
    trusted: &[Certificate],
    der: &'a [u8],
    transaction: &Transaction,
    protector: &Protector<'_>,
) -> Result<PkiMessage<'a>, CaError> {
    let not_cmp = |e: CaError| CaError::Protocol(format!("response is not a PKIMessage: {e}"));
    let received = message::received(der).map_err(not_cmp)?;
    let header = received.header().map_err(not_cmp)?;
    if octets(header.trans_id.as_ref()) != Some(transaction.id.as_slice()) {
        return Err(CaError::Protocol(
            "response for another transactionID".into(),
        ));
    }
    if octets(header.recip_nonce.as_ref()) != Some(transaction.nonce.as_slice()) {
        return Err(CaError::Protocol(
            "response's recipNonce is not our senderNonce".into(),
        ));
    }
    // An unprotected error message answers a request the CA could not authenticate (RFC
    // 9483 section 3.6.4). Its text cannot be trusted, but it only ever fails the request,
    // which is all an attacker on the path could do anyway.
    if header.protection_alg.is_none()
        && received.protection.is_none()
        && let Some(text) = message::describe_error(&received.body)?
    {
        return Err(CaError::Refused(format!(
            "{text} (unprotected: the CA did not authenticate the request)"
        )));
    }
    check_protection(trusted, &header, &received, protector)?;
    if let Some(text) = message::describe_error(&received.body)? {
        return Err(CaError::Refused(text));
    }
    PkiMessage::from_der(der)
        .map_err(|e| CaError::Protocol(format!("response is not a PKIMessage: {e}")))
}

fn check_protection(
    trusted: &[Certificate],
    header: &PkiHeader<'_>,
    received: &message::Received,
    protector: &Protector<'_>,
) -> Result<(), CaError> {
    let alg = header
        .protection_alg
        .as_ref()
        .ok_or_else(|| CaError::Protection("response is not protected".into()))?;
    let protection = received
        .protection
        .as_ref()
        .ok_or_else(|| CaError::Protection("response is not protected".into()))?;
    if alg.oid == pbm::ID_PASSWORD_BASED_MAC {
        let Protector::Pbm { secret, .. } = protector else {
            return Err(CaError::Protection(
                "PBM-protected response to a signed request".into(),
            ));
        };
        return pbm::verify(alg, secret, &received.protected, protection.raw_bytes());
    }
    let extra = &received.extra_certs;
    let signer = extra
        .first()
        .ok_or_else(|| CaError::Protection("signed response without extraCerts".into()))?;
    verify_signature(
        &signer.tbs_certificate.subject_public_key_info,
        alg,
        &received.protected,
        protection,
    )?;
    if !chains_to(signer, &extra[1..], trusted, SystemTime::now()) {
        return Err(CaError::Protection(
            "the response's signer is not trusted".into(),
        ));
    }
    Ok(())
}

/// The certificate of an ip (a kup if `kur`) that grants certReqId 0 with the requested public
/// key (`request_spki_der`), its certHash and the response's senderNonce.
fn issued_certificate(
    message: &PkiMessage<'_>,
    kur: bool,
    request_spki_der: &[u8],
) -> Result<(IssuedCertificate, Vec<u8>, Vec<u8>), CaError> {
    let expected = if kur { "kup" } else { "ip" };
    let content = match &message.body {
        PkiBody::Ip(content) if expected == "ip" => content,
        PkiBody::Kup(content) if expected == "kup" => content,
        other => return Err(unexpected(other, expected)),
    };
    let [cert_response] = content.response.as_slice() else {
        return Err(CaError::Protocol(
            "expected exactly one certResponse".into(),
        ));
    };
    if !granted(&cert_response.status) {
        return Err(CaError::Refused(describe_status(&cert_response.status)));
    }
    if cert_response.cert_req_id.as_bytes() != [0] {
        return Err(CaError::Protocol(
            "certResponse for another certReqId".into(),
        ));
    }
    let Some(CertOrEncCert::Certificate(cert)) = cert_response
        .certified_key_pair
        .as_ref()
        .map(|pair| &pair.cert_or_enc_cert)
    else {
        return Err(CaError::Protocol(
            "certResponse without a certificate".into(),
        ));
    };
    let cert_der = cert.to_der()?;
    if cert.tbs_certificate.subject_public_key_info.to_der()? != request_spki_der {
        return Err(CaError::Protocol(
            "the certificate does not carry the requested public key".into(),
        ));
    }
    let sender_nonce = octets(message.header.sender_nonce.as_ref())
        .ok_or_else(|| CaError::Protocol("response without a senderNonce".into()))?
        .to_vec();
    let issued = IssuedCertificate {
        serial_hex: serial_hex(cert.tbs_certificate.serial_number.as_bytes()),
        der: cert_der.clone(),
    };
    let cert_hash = message::cert_hash(cert, &cert_der);
    Ok((issued, cert_hash, sender_nonce))
}

/// For the fuzz target `cmp_client` ([`crate::fuzzing::cmp_client_response`]): `response` read
/// as [`CmpClient`] reads the answer to a request of transaction `transaction_id` with
/// senderNonce `nonce`, PBM-protected with `secret` (signature-protected when `secret` is
/// empty), trusting `trusted`; then its body as an ip, a kup, a pkiconf and an rp.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_response(
    transaction_id: &[u8],
    nonce: &[u8],
    secret: &[u8],
    trusted: &[Certificate],
    request_spki_der: &[u8],
    response: &[u8],
) {
    use secrecy::ExposeSecret as _;
    let transaction = Transaction {
        id: transaction_id.to_vec(),
        nonce: nonce.to_vec(),
    };
    let secret = SecretSlice::from(secret.to_vec());
    let protector = match trusted.first() {
        Some(certificate) if secret.expose_secret().is_empty() => Protector::Ra {
            certificate,
            extra: &[],
        },
        _ => Protector::Pbm {
            reference: b"fuzz",
            secret: &secret,
        },
    };
    let Ok(message) = check_response(trusted, response, &transaction, &protector) else {
        return;
    };
    for kur in [false, true] {
        let _ = issued_certificate(&message, kur, request_spki_der);
    }
    if let PkiBody::Rp(content) = &message.body
        && let Some(status) = content.status.first()
    {
        let _ = (granted(status), describe_status(status));
    }
}

/// A transaction id and the nonce of our next message.
struct Transaction {
    id: Vec<u8>,
    nonce: Vec<u8>,
}

impl Transaction {
    async fn new(hsm: &Hsm) -> Result<Transaction, CaError> {
        Ok(Transaction {
            id: hsm.random(NONCE_LEN).await?,
            nonce: hsm.random(NONCE_LEN).await?,
        })
    }
}

fn empty_template() -> CertTemplate {
    CertTemplate {
        version: None,
        serial_number: None,
        signature: None,
        issuer: None,
        validity: None,
        subject: None,
        subject_public_key_info: None,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: None,
    }
}

fn subject_key_id(cert: &Certificate) -> Option<Vec<u8>> {
    match cert.tbs_certificate.get::<SubjectKeyIdentifier>() {
        Ok(Some((_, ski))) => Some(ski.0.as_bytes().to_vec()),
        _ => None,
    }
}

fn unexpected(body: &PkiBody<'_>, expected: &str) -> CaError {
    let tag = body
        .to_der()
        .ok()
        .and_then(|der| der.first().copied())
        .map_or(0, |tag| tag & 0x1f);
    CaError::Protocol(format!("expected {expected}, got body type {tag}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let config = CmpClientConfig {
            url: "http://127.0.0.1:1/cmp".into(),
            organisation: "o".into(),
            adult_policy_oid: "1.2.3".into(),
            minor_policy_oid: "1.2.4".into(),
            protection: ClientProtection::Pbm {
                reference: b"ref".to_vec(),
                secret: b"hunter2".to_vec().into(),
            },
            trusted_der: vec![],
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("104, 117"),
            "{shown}"
        );
    }

    #[test]
    fn unexpected_bodies_are_named_by_their_tag() {
        assert_eq!(
            unexpected(&PkiBody::PkiConf(der::asn1::Null), "ip").to_string(),
            "protocol: expected ip, got body type 19"
        );
    }
}
