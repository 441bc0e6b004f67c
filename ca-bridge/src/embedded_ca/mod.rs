//! The embedded CA: a root (EC P-384, [`SystemKey::CaRoot`]) and an issuing CA (EC P-256,
//! [`SystemKey::CaIssuing`]) whose keys live in the HSM, issuing the subscribers' certificates
//! and recording what it issued and revoked in a small SQLite file of its own.
//!
//! On disk, in the directory given to [`EmbeddedCa::open`]:
//!
//! ```text
//! root.pem      the self-signed root certificate (the trust anchor for iAM Smart-Certs)
//! issuing.pem   the issuing CA certificate, signed by the root
//! ca.sqlite     serial, profile, validity, revocation time and reason (no names)
//! ```
//!
//! Issuing and revocation are kept apart from any protocol so that the CMP, OCSP and CRL
//! services of the CA-bridge issue can sit on top of [`EmbeddedCa::issue`],
//! [`EmbeddedCa::revoke`], [`EmbeddedCa::status`] and [`EmbeddedCa::revocations`].

pub(crate) mod cmp_support;
pub(crate) mod policy_oid;
pub(crate) mod profile;
mod revocation_support;
mod state;

pub use policy_oid::PolicyOid;
pub use revocation_support::{MAX_OCSP_CERT_IDS, OcspStats};

use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use der::asn1::{Ia5String, OctetString};
use der::pem::LineEnding;
use der::{Decode, DecodePem, Encode};
use hsm_adapter::{Digest, HashAlgorithm, Hsm, SystemKey};
use sha2::{Digest as _, Sha256, Sha384};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::certificate::Certificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use x509_cert::name::Name;
use x509_cert::time::Validity;

use crate::error::CaError;
use crate::x509::{
    CaSignatureAlg, TbsParts, assemble, key_identifier, serial_from_random, subject_key, validity,
};
use profile::SubscriberProfile;
use state::{CaState, IssuedRow};

/// Default certificate policy of the adult profile: an OID under the `2.25` arc (UUID-derived
/// OIDs, ITU-T X.667), which needs no registration. A deployment replaces it with its CA's own.
pub const DEFAULT_ADULT_POLICY_OID: &str = "2.25.329800735698586629295641978511506172918.1";
/// Default certificate policy of the minor profile (same arc as the adult one).
pub const DEFAULT_MINOR_POLICY_OID: &str = "2.25.329800735698586629295641978511506172918.2";

/// File names in the CA directory.
const ROOT_FILE: &str = "root.pem";
const ISSUING_FILE: &str = "issuing.pem";
const STATE_FILE: &str = "ca.sqlite";

/// CA certificates start this long before `now`, so a slightly slow clock elsewhere accepts them.
const CA_BACKDATE: Duration = Duration::from_secs(3600);
/// Bytes of random serial numbers (RFC 5280 allows up to 20; CA/B asks for 64 random bits).
const SERIAL_LEN: usize = 16;
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// The subscriber certificate profile: adult or minor ("iAM Smart-Cert for Minor"), told apart
/// by the certificate policy OID. The vocabulary shared by every crate.
pub use smartsign_types::Profile;

/// What the CA writes into the certificates it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaProfileConfig {
    /// Organisation (O) of the CA and subscriber subjects; the CA common names are
    /// `<organisation> Root CA` and `<organisation> Issuing CA`.
    pub organisation: String,
    /// OCSP responder URL, written into the subscribers' AIA extension.
    pub ocsp_url: String,
    /// CRL URL, written into the subscribers' CRL distribution points.
    pub crl_url: String,
    /// Certificate policy OID (dotted) of the adult profile. Check it with [`PolicyOid`]'s
    /// `FromStr`, not with `const-oid`, which cannot hold the default's 128-bit arc.
    pub adult_policy_oid: String,
    /// Certificate policy OID (dotted) of the minor profile; must differ from the adult one.
    pub minor_policy_oid: String,
    /// Validity of a newly made root certificate.
    pub root_validity: Duration,
    /// Validity of a newly made issuing CA certificate (subscriber certificates cannot outlive
    /// it).
    pub issuing_validity: Duration,
}

impl CaProfileConfig {
    /// The default policy OIDs, a 30-year root and a 25-year issuing CA (long enough for the
    /// dev clock to be moved years ahead).
    pub fn new(
        organisation: impl Into<String>,
        ocsp_url: impl Into<String>,
        crl_url: impl Into<String>,
    ) -> CaProfileConfig {
        CaProfileConfig {
            organisation: organisation.into(),
            ocsp_url: ocsp_url.into(),
            crl_url: crl_url.into(),
            adult_policy_oid: DEFAULT_ADULT_POLICY_OID.into(),
            minor_policy_oid: DEFAULT_MINOR_POLICY_OID.into(),
            root_validity: 30 * YEAR,
            issuing_validity: 25 * YEAR,
        }
    }

    fn subscriber_profile(&self) -> Result<SubscriberProfile, CaError> {
        let oid = |field: &str, value: &str| {
            PolicyOid::from_str(value)
                .map_err(|_| CaError::Config(format!("{field} is not a dotted OID")))
        };
        let url = |field: &str, value: &str| {
            if !(value.starts_with("http://") || value.starts_with("https://")) {
                return Err(CaError::Config(format!("{field} must be an http(s) URL")));
            }
            Ia5String::new(value)
                .map_err(|_| CaError::Config(format!("{field} must be ASCII (IA5)")))
        };
        let profile = SubscriberProfile {
            ocsp_url: url("ocsp_url", &self.ocsp_url)?,
            crl_url: url("crl_url", &self.crl_url)?,
            adult_policy: oid("adult_policy_oid", &self.adult_policy_oid)?,
            minor_policy: oid("minor_policy_oid", &self.minor_policy_oid)?,
        };
        if profile.adult_policy == profile.minor_policy {
            return Err(CaError::Config(
                "adult_policy_oid and minor_policy_oid must differ".into(),
            ));
        }
        if self.organisation.trim().is_empty() || self.organisation.chars().count() > 64 {
            return Err(CaError::Config(
                "organisation must be 1 to 64 characters".into(),
            ));
        }
        if self.issuing_validity > self.root_validity {
            return Err(CaError::Config(
                "issuing_validity must not exceed root_validity".into(),
            ));
        }
        Ok(profile)
    }
}

/// A request for a subscriber certificate. `Debug` shows no personal data.
#[derive(Clone)]
pub struct IssueRequest {
    /// Surname (SN, and the end of CN).
    pub surname: String,
    /// Given name (GN, and the start of CN), when the subscriber has one.
    pub given_name: Option<String>,
    /// The keyed hash of the HKIC number, lowercase hex: the subject serialNumber.
    pub hkic_hash_hex: String,
    /// The subscriber's public key, a DER SubjectPublicKeyInfo (EC P-256/P-384 or RSA >= 2048).
    pub public_key_spki_der: Vec<u8>,
    /// Adult or minor.
    pub profile: Profile,
    /// Start of validity (seconds precision).
    pub not_before: SystemTime,
    /// End of validity (seconds precision).
    pub not_after: SystemTime,
}

impl fmt::Debug for IssueRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueRequest")
            .field("profile", &self.profile)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate the CA issued. `Debug` shows the serial only (the certificate names a person).
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// Serial number, lowercase hex without leading zeros (API.md).
    pub serial_hex: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
}

impl IssuedCertificate {
    /// The certificate as PEM.
    pub fn to_pem(&self) -> String {
        pem(&self.der)
    }
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("serial_hex", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

/// The CA's record of one serial (RFC 6960 section 2.2's good / revoked / unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateState {
    /// Never issued by this CA.
    Unknown,
    /// Issued and not revoked (it may have expired: see `not_after`).
    Good {
        /// End of validity.
        not_after: SystemTime,
    },
    /// Revoked.
    Revoked {
        /// When.
        revoked_at: SystemTime,
        /// RFC 5280 CRLReason code.
        reason_code: u8,
    },
}

/// One revoked certificate, as a CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Serial number, lowercase hex without leading zeros.
    pub serial_hex: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// RFC 5280 CRLReason code.
    pub reason_code: u8,
}

/// One of the CA's own certificates, parsed and encoded.
#[derive(Debug, Clone)]
struct CaCertificate {
    cert: Certificate,
    der: Vec<u8>,
    pem: String,
    key_id: OctetString,
}

impl CaCertificate {
    fn new(cert: Certificate) -> Result<CaCertificate, CaError> {
        let der = cert.to_der()?;
        let key_id = match cert.tbs_certificate.get::<SubjectKeyIdentifier>() {
            Ok(Some((_, ski))) => ski.0,
            _ => key_identifier(&cert.tbs_certificate.subject_public_key_info)?,
        };
        Ok(CaCertificate {
            pem: pem(&der),
            cert,
            der,
            key_id,
        })
    }
}

/// The embedded CA. Share it as `Arc<EmbeddedCa>`.
#[derive(Debug)]
pub struct EmbeddedCa {
    hsm: Arc<Hsm>,
    organisation: String,
    subscriber: SubscriberProfile,
    root: CaCertificate,
    issuing: CaCertificate,
    state: Arc<CaState>,
    dir: PathBuf,
    crl_cache: revocation_support::CrlCache,
    ocsp_cache: revocation_support::OcspCache,
}

impl EmbeddedCa {
    /// Opens the CA in `dir` (created if missing). The first open makes the self-signed root
    /// (ecdsa-with-SHA384 by [`SystemKey::CaRoot`]) and the issuing CA certificate (signed by
    /// the root) and writes `root.pem` and `issuing.pem`; later opens reuse them after checking
    /// that they carry the HSM's CA public keys ([`CaError::KeyMismatch`] otherwise). A missing
    /// `issuing.pem` is made again from the root. The system keys must have been provisioned.
    pub async fn open(
        hsm: Arc<Hsm>,
        dir: &Path,
        config: CaProfileConfig,
        now: SystemTime,
    ) -> Result<EmbeddedCa, CaError> {
        let subscriber = config.subscriber_profile()?;
        std::fs::create_dir_all(dir).map_err(CaError::io(dir))?;
        let root_key = hsm.system_public_key(SystemKey::CaRoot).await?;
        let issuing_key = hsm.system_public_key(SystemKey::CaIssuing).await?;
        let root_spki = SubjectPublicKeyInfoOwned::from_der(root_key.as_der())?;
        let issuing_spki = SubjectPublicKeyInfoOwned::from_der(issuing_key.as_der())?;

        let root_path = dir.join(ROOT_FILE);
        let issuing_path = dir.join(ISSUING_FILE);
        let (root, root_made) = match read_pem(&root_path)? {
            Some(cert) => {
                check_key(ROOT_FILE, &cert, &root_spki)?;
                if cert.tbs_certificate.issuer != cert.tbs_certificate.subject {
                    return Err(CaError::KeyMismatch {
                        file: ROOT_FILE,
                        why: "not self-signed",
                    });
                }
                (CaCertificate::new(cert)?, false)
            }
            None => {
                let cert = make_root(&hsm, &config, root_spki, now).await?;
                let root = CaCertificate::new(cert)?;
                write_atomically(&root_path, root.pem.as_bytes())?;
                tracing::info!(path = %root_path.display(), "embedded CA root created");
                (root, true)
            }
        };
        let existing = if root_made {
            None
        } else {
            read_pem(&issuing_path)?
        };
        let issuing = match existing {
            Some(cert) => {
                check_key(ISSUING_FILE, &cert, &issuing_spki)?;
                if cert.tbs_certificate.issuer != root.cert.tbs_certificate.subject {
                    return Err(CaError::KeyMismatch {
                        file: ISSUING_FILE,
                        why: "not issued by root.pem",
                    });
                }
                CaCertificate::new(cert)?
            }
            None => {
                let cert = make_issuing(&hsm, &config, &root, issuing_spki, now).await?;
                let issuing = CaCertificate::new(cert)?;
                write_atomically(&issuing_path, issuing.pem.as_bytes())?;
                tracing::info!(path = %issuing_path.display(), "embedded CA issuing certificate created");
                issuing
            }
        };

        let state_path = dir.join(STATE_FILE);
        let state = blocking(move || CaState::open(&state_path)).await?;
        Ok(EmbeddedCa {
            hsm,
            organisation: config.organisation,
            subscriber,
            root,
            issuing,
            state: Arc::new(state),
            dir: dir.to_path_buf(),
            crl_cache: Default::default(),
            ocsp_cache: revocation_support::OcspCache::new(
                NonZeroUsize::new(revocation_support::OCSP_CACHE_ENTRIES)
                    .unwrap_or(NonZeroUsize::MIN),
            ),
        })
    }

    /// Issues a subscriber certificate signed by the issuing CA in the HSM and records it. The
    /// serial is 16 random bytes from the HSM's generator.
    pub async fn issue(&self, request: IssueRequest) -> Result<IssuedCertificate, CaError> {
        let subject = profile::subscriber_name(
            &self.organisation,
            &request.surname,
            request.given_name.as_deref(),
            &request.hkic_hash_hex,
        )?;
        self.issue_named(
            subject,
            &request.public_key_spki_der,
            request.profile,
            request.not_before,
            request.not_after,
            true,
        )
        .await
    }

    /// [`EmbeddedCa::issue`] for a subject name made elsewhere (a CMP certificate template, or
    /// the subject of the certificate a key update replaces). Unless `confirmed`, the
    /// certificate waits for its requester's confirmation ([`EmbeddedCa::confirm`]).
    pub(crate) async fn issue_named(
        &self,
        subject: Name,
        public_key_spki_der: &[u8],
        profile: Profile,
        not_before: SystemTime,
        not_after: SystemTime,
        confirmed: bool,
    ) -> Result<IssuedCertificate, CaError> {
        let spki = subject_key(public_key_spki_der)?;
        let validity = validity(not_before, not_after)?;
        if validity.not_after.to_system_time() > self.issuing_not_after() {
            return Err(CaError::OutsideCaValidity);
        }
        let policy = match profile {
            Profile::Adult => &self.subscriber.adult_policy,
            Profile::Minor => &self.subscriber.minor_policy,
        };
        let extensions =
            profile::subscriber_extensions(&self.subscriber, policy, &spki, &self.issuing.key_id)?;
        let IssuedCertificate { serial_hex, der } = self
            .sign_certificate(subject, spki, validity, extensions)
            .await?;

        let state = Arc::clone(&self.state);
        let row_serial = serial_hex.clone();
        blocking(move || {
            state.insert(&IssuedRow {
                serial_hex: &row_serial,
                profile,
                not_before,
                not_after,
                issued_at: SystemTime::now(),
                confirmed,
            })
        })
        .await?;
        // A response "unknown" to a query that guessed this serial is no longer true.
        if let Ok(serial) = normalise_serial(&serial_hex) {
            self.forget_ocsp(&serial);
        }
        tracing::info!(serial = %serial_hex, profile = profile.as_str(), "certificate issued");
        Ok(IssuedCertificate { serial_hex, der })
    }

    /// Revokes the certificate with this serial (hex, any case, leading zeros allowed) with an
    /// RFC 5280 CRLReason code (0-6, 9, 10). Revoking again succeeds and keeps the first time
    /// and reason. [`CaError::UnknownSerial`] if this CA never issued it.
    pub async fn revoke(
        &self,
        serial_hex: &str,
        reason_code: u8,
        at: SystemTime,
    ) -> Result<(), CaError> {
        if !matches!(reason_code, 0..=6 | 9 | 10) {
            return Err(CaError::InvalidReason(reason_code));
        }
        let serial = normalise_serial(serial_hex)?;
        let state = Arc::clone(&self.state);
        let stored = serial.clone();
        let revoked = blocking(move || state.revoke(&stored, reason_code, at)).await;
        // After the store has it (a response read before is refused from now on), and whatever
        // the outcome: a failed write may still have reached the disk.
        self.forget_ocsp(&serial);
        revoked?;
        tracing::info!(serial = %serial, reason_code, "certificate revoked");
        Ok(())
    }

    /// Records the requester's confirmation of a certificate issued over CMP.
    pub(crate) async fn confirm(&self, serial_hex: &str, at: SystemTime) -> Result<(), CaError> {
        let serial = normalise_serial(serial_hex)?;
        let state = Arc::clone(&self.state);
        blocking(move || state.confirm(&serial, at)).await
    }

    /// The certificates issued over CMP that were neither confirmed nor revoked.
    pub(crate) async fn unconfirmed(&self) -> Result<Vec<String>, CaError> {
        let state = Arc::clone(&self.state);
        blocking(move || state.unconfirmed()).await
    }

    /// What the CA knows of a serial (for OCSP).
    pub async fn status(&self, serial_hex: &str) -> Result<CertificateState, CaError> {
        let serial = normalise_serial(serial_hex)?;
        let state = Arc::clone(&self.state);
        blocking(move || state.status(&serial)).await
    }

    /// Every revoked certificate (for a CRL).
    pub async fn revocations(&self) -> Result<Vec<Revocation>, CaError> {
        let state = Arc::clone(&self.state);
        blocking(move || state.revocations()).await
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root.der
    }

    /// The root certificate, PEM (what `dir/root.pem` holds).
    pub fn root_pem(&self) -> &str {
        &self.root.pem
    }

    /// The issuing CA certificate, DER.
    pub fn issuing_der(&self) -> &[u8] {
        &self.issuing.der
    }

    /// The issuing CA certificate, PEM.
    pub fn issuing_pem(&self) -> &str {
        &self.issuing.pem
    }

    /// The chain above a subscriber certificate, DER: issuing CA, then root.
    pub fn chain_der(&self) -> Vec<Vec<u8>> {
        vec![self.issuing.der.clone(), self.root.der.clone()]
    }

    /// The chain above a subscriber certificate, PEM: issuing CA, then root.
    pub fn chain_pem(&self) -> Vec<String> {
        vec![self.issuing.pem.clone(), self.root.pem.clone()]
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The end of the issuing CA's validity: no certificate it issues outlives it.
    pub(crate) fn issuing_not_after(&self) -> SystemTime {
        self.issuing
            .cert
            .tbs_certificate
            .validity
            .not_after
            .to_system_time()
    }

    /// A certificate for `subject` and `spki` signed by the issuing CA (ecdsa-with-SHA256), with
    /// a serial of random bytes from the HSM.
    pub(crate) async fn sign_certificate(
        &self,
        subject: Name,
        spki: SubjectPublicKeyInfoOwned,
        validity: Validity,
        extensions: Vec<Extension>,
    ) -> Result<IssuedCertificate, CaError> {
        let (serial, serial_hex) = serial_from_random(self.hsm.random(SERIAL_LEN).await?)?;
        let tbs = TbsParts {
            serial,
            alg: CaSignatureAlg::EcdsaSha256,
            issuer: self.issuing.cert.tbs_certificate.subject.clone(),
            validity,
            subject,
            spki,
            extensions,
        }
        .into_tbs();
        let signature = self.sign_as_issuing(&tbs.to_der()?).await?;
        let der = assemble(tbs, &signature)?.to_der()?;
        Ok(IssuedCertificate { serial_hex, der })
    }

    /// Signs `data` (a TBSCertificate, and later a TBSCertList or an OCSP ResponseData) with
    /// the issuing CA key: ecdsa-with-SHA256, DER `Ecdsa-Sig-Value`.
    pub(crate) async fn sign_as_issuing(&self, data: &[u8]) -> Result<Vec<u8>, CaError> {
        let digest = Digest::new(HashAlgorithm::Sha256, Sha256::digest(data).to_vec())?;
        Ok(self
            .hsm
            .sign_with_system_key(SystemKey::CaIssuing, &digest)
            .await?)
    }
}

async fn make_root(
    hsm: &Hsm,
    config: &CaProfileConfig,
    spki: SubjectPublicKeyInfoOwned,
    now: SystemTime,
) -> Result<Certificate, CaError> {
    let name = profile::ca_name(&config.organisation, "Root CA")?;
    let not_before = now - CA_BACKDATE;
    let validity = validity(not_before, not_before + config.root_validity)?;
    let extensions = profile::root_extensions(&spki)?;
    sign_with_root(hsm, name.clone(), name, validity, spki, extensions).await
}

async fn make_issuing(
    hsm: &Hsm,
    config: &CaProfileConfig,
    root: &CaCertificate,
    spki: SubjectPublicKeyInfoOwned,
    now: SystemTime,
) -> Result<Certificate, CaError> {
    let not_before = now - CA_BACKDATE;
    let mut not_after = not_before + config.issuing_validity;
    let root_not_after = root
        .cert
        .tbs_certificate
        .validity
        .not_after
        .to_system_time();
    if not_after > root_not_after {
        not_after = root_not_after;
    }
    let extensions = profile::issuing_extensions(&spki, &root.key_id)?;
    sign_with_root(
        hsm,
        root.cert.tbs_certificate.subject.clone(),
        profile::ca_name(&config.organisation, "Issuing CA")?,
        validity(not_before, not_after)?,
        spki,
        extensions,
    )
    .await
}

/// A CA certificate signed by the root key (ecdsa-with-SHA384), with a serial of random bytes
/// from the HSM.
async fn sign_with_root(
    hsm: &Hsm,
    issuer: Name,
    subject: Name,
    validity: Validity,
    spki: SubjectPublicKeyInfoOwned,
    extensions: Vec<Extension>,
) -> Result<Certificate, CaError> {
    let (serial, _) = serial_from_random(hsm.random(SERIAL_LEN).await?)?;
    let tbs = TbsParts {
        serial,
        alg: CaSignatureAlg::EcdsaSha384,
        issuer,
        validity,
        subject,
        spki,
        extensions,
    }
    .into_tbs();
    let digest = Digest::new(
        HashAlgorithm::Sha384,
        Sha384::digest(tbs.to_der()?).to_vec(),
    )?;
    let signature = hsm.sign_with_system_key(SystemKey::CaRoot, &digest).await?;
    assemble(tbs, &signature)
}

fn check_key(
    file: &'static str,
    cert: &Certificate,
    spki: &SubjectPublicKeyInfoOwned,
) -> Result<(), CaError> {
    if &cert.tbs_certificate.subject_public_key_info != spki {
        return Err(CaError::KeyMismatch {
            file,
            why: "another public key",
        });
    }
    Ok(())
}

/// Lowercase hex without leading zeros, as the state file keys serials.
fn normalise_serial(serial_hex: &str) -> Result<String, CaError> {
    let trimmed = serial_hex.trim_start_matches('0');
    if trimmed.is_empty() || trimmed.len() > 42 || !trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CaError::InvalidRequest(
            "a serial is 1 to 42 hex digits, not zero".into(),
        ));
    }
    Ok(trimmed.to_ascii_lowercase())
}

fn pem(der: &[u8]) -> String {
    // Encoding cannot fail for the CERTIFICATE label and a buffer of certificate size.
    der::pem::encode_string("CERTIFICATE", LineEnding::LF, der).unwrap_or_default()
}

fn read_pem(path: &Path) -> Result<Option<Certificate>, CaError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(Certificate::from_pem(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CaError::io(path)(e)),
    }
}

/// Writes `path` through a temporary file and a rename, so a crash never leaves half a file.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(CaError::io(&tmp))?;
    file.write_all(contents).map_err(CaError::io(&tmp))?;
    file.sync_all().map_err(CaError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(CaError::io(path))
}

/// Runs synchronous state work off the async threads.
async fn blocking<T, F>(work: F) -> Result<T, CaError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CaError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CaError::Internal(format!("CA state task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalised() {
        assert_eq!(normalise_serial("004A0f").unwrap(), "4a0f");
        assert!(normalise_serial("000").is_err());
        assert!(normalise_serial("xyz").is_err());
    }

    #[test]
    fn config_rejects_equal_policies_and_bad_urls() {
        let mut config = CaProfileConfig::new("smartsign", "http://127.0.0.1/ocsp", "http://x/crl");
        assert!(config.subscriber_profile().is_ok());
        config.minor_policy_oid = config.adult_policy_oid.clone();
        assert!(matches!(
            config.subscriber_profile(),
            Err(CaError::Config(_))
        ));
        let mut config = CaProfileConfig::new("smartsign", "ftp://x", "http://x/crl");
        assert!(config.subscriber_profile().is_err());
        config.ocsp_url = "http://x/ocsp".into();
        config.adult_policy_oid = "not an oid".into();
        assert!(config.subscriber_profile().is_err());
    }

    #[test]
    fn issue_request_debug_hides_personal_data() {
        let request = IssueRequest {
            surname: "CHAN".into(),
            given_name: Some("Tai Man".into()),
            hkic_hash_hex: "abcdef".into(),
            public_key_spki_der: vec![],
            profile: Profile::Adult,
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("CHAN") && !shown.contains("Tai") && !shown.contains("abcdef"));
    }
}
