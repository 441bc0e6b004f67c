//! The development TLS PKI for `smartsignd --dev`: a software (EC P-256) CA, a server
//! certificate for the loopback names, and a client certificate for each dev role and principal.
//! Its keys are ordinary files: it is for development and tests only, never for production,
//! where the TLS certificates come from the operator's own PKI.
//!
//! Layout under the state directory given to [`DevPki::ensure`]:
//!
//! ```text
//! tls/ca.pem, tls/ca.key            the client and server CA (O=smartsign dev, CN=smartsign dev TLS CA)
//! tls/server.pem, tls/server.key    SAN DNS:localhost, IP:127.0.0.1, IP:::1; EKU serverAuth
//! clients/NAME.pem, clients/NAME.key    O=smartsign dev, OU=<role>, CN=<name>; EKU clientAuth
//! ```
//!
//! Keys are PKCS#8 PEM, mode 0600. Certificates are PEM.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use const_oid::db::rfc4519::{COMMON_NAME, ORGANIZATION_NAME, ORGANIZATIONAL_UNIT_NAME};
use const_oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH};
use der::asn1::{Ia5String, OctetString};
use der::pem::LineEnding;
use der::{Decode, DecodePem, Encode, EncodePem};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rand_core::{OsRng, RngCore};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::certificate::Certificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{KeyUsage, KeyUsages, SubjectAltName};
use x509_cert::name::Name;

use crate::embedded_ca::write_atomically;
use crate::error::CaError;
use crate::x509::{
    CaSignatureAlg, NameBuilder, TbsParts, assemble, basic_constraints, extension, key_identifier,
    serial_from_random, signing_end_entity_extensions, subject_key_id, validity,
};

/// The dev clients made by [`DevPki::ensure`]: (role, name). Services use their name as CN.
pub const DEV_CLIENTS: [(&str, &str); 6] = [
    ("registrar", "registrar"),
    ("gateway", "gateway"),
    ("officer", "officer"),
    ("auditor", "auditor"),
    ("service", "demo-a"),
    ("service", "demo-b"),
];

const ORGANISATION: &str = "smartsign dev";
const DAY: Duration = Duration::from_secs(24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
const LEAF_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// One client certificate of the dev PKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevClient {
    /// The role (subject OU).
    pub role: String,
    /// The principal's name (subject CN, and the file name).
    pub name: String,
    /// `clients/NAME.pem`.
    pub cert: PathBuf,
    /// `clients/NAME.key`.
    pub key: PathBuf,
}

/// Where the dev TLS PKI's files are. `Debug` shows paths only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// `tls/ca.pem`: the root for both server and client certificates.
    pub ca_cert: PathBuf,
    /// `tls/ca.key`.
    pub ca_key: PathBuf,
    /// `tls/server.pem`.
    pub server_cert: PathBuf,
    /// `tls/server.key`.
    pub server_key: PathBuf,
    /// One per [`DEV_CLIENTS`] entry, in that order.
    pub clients: Vec<DevClient>,
}

impl DevPki {
    /// Makes whatever of the dev PKI under `state_dir` is missing and returns where it is.
    /// Idempotent: existing files are kept, except that a newly made CA (one of its two files
    /// was missing) re-issues every certificate.
    pub fn ensure(state_dir: &Path) -> Result<DevPki, CaError> {
        let tls = state_dir.join("tls");
        let clients_dir = state_dir.join("clients");
        for dir in [&tls, &clients_dir] {
            std::fs::create_dir_all(dir).map_err(CaError::io(dir))?;
        }
        let pki = DevPki {
            ca_cert: tls.join("ca.pem"),
            ca_key: tls.join("ca.key"),
            server_cert: tls.join("server.pem"),
            server_key: tls.join("server.key"),
            clients: DEV_CLIENTS
                .iter()
                .map(|(role, name)| DevClient {
                    role: (*role).to_owned(),
                    name: (*name).to_owned(),
                    cert: clients_dir.join(format!("{name}.pem")),
                    key: clients_dir.join(format!("{name}.key")),
                })
                .collect(),
        };
        let now = SystemTime::now();
        let (ca, fresh) = if pki.ca_cert.exists() && pki.ca_key.exists() {
            (SoftwareCa::load(&pki.ca_cert, &pki.ca_key)?, false)
        } else {
            (SoftwareCa::create(&pki.ca_cert, &pki.ca_key, now)?, true)
        };
        if fresh || !(pki.server_cert.exists() && pki.server_key.exists()) {
            ca.issue_leaf(&pki.server_cert, &pki.server_key, Leaf::Server, now)?;
        }
        for client in &pki.clients {
            if fresh || !(client.cert.exists() && client.key.exists()) {
                let leaf = Leaf::Client {
                    role: &client.role,
                    name: &client.name,
                };
                ca.issue_leaf(&client.cert, &client.key, leaf, now)?;
            }
        }
        Ok(pki)
    }

    /// The client certificate of `name`.
    pub fn client(&self, name: &str) -> Option<&DevClient> {
        self.clients.iter().find(|c| c.name == name)
    }

    /// Issues one more client certificate, `clients/NAME.pem` and `.key`, with `role` as its
    /// OU (each officer of an appliance's provisioning has their own). An existing pair is kept.
    pub fn add_client(&mut self, role: &str, name: &str) -> Result<DevClient, CaError> {
        let dir = self
            .server_cert
            .parent()
            .and_then(Path::parent)
            .map(|state| state.join("clients"))
            .ok_or_else(|| CaError::Key("the dev PKI has no state directory".into()))?;
        let client = DevClient {
            role: role.to_owned(),
            name: name.to_owned(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        if !(client.cert.exists() && client.key.exists()) {
            let ca = SoftwareCa::load(&self.ca_cert, &self.ca_key)?;
            let leaf = Leaf::Client { role, name };
            ca.issue_leaf(&client.cert, &client.key, leaf, SystemTime::now())?;
        }
        self.clients.retain(|known| known.name != name);
        self.clients.push(client.clone());
        Ok(client)
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy)]
enum Leaf<'a> {
    Server,
    Client { role: &'a str, name: &'a str },
}

/// The dev CA, with its key in memory.
struct SoftwareCa {
    key: SigningKey,
    name: Name,
    key_id: OctetString,
}

impl std::fmt::Debug for SoftwareCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareCa").finish_non_exhaustive()
    }
}

impl SoftwareCa {
    fn create(cert_path: &Path, key_path: &Path, now: SystemTime) -> Result<SoftwareCa, CaError> {
        let key = SigningKey::random(&mut OsRng);
        let spki = spki_of(&key)?;
        let name = NameBuilder::default()
            .utf8(ORGANIZATION_NAME, ORGANISATION)?
            .utf8(COMMON_NAME, "smartsign dev TLS CA")?
            .build();
        let key_id = key_identifier(&spki)?;
        let extensions = vec![
            basic_constraints(true, Some(0))?,
            extension(&KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign), true)?,
            subject_key_id(&spki)?,
        ];
        let ca = SoftwareCa { key, name, key_id };
        let cert = ca.sign(ca.name.clone(), spki, extensions, CA_VALIDITY, now)?;
        write_key(key_path, &ca.key)?;
        write_atomically(cert_path, cert.to_pem(LineEnding::LF)?.as_bytes())?;
        Ok(ca)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<SoftwareCa, CaError> {
        let pem = std::fs::read_to_string(key_path).map_err(CaError::io(key_path))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| CaError::Key(format!("{}: {e}", key_path.display())))?;
        let bytes = std::fs::read(cert_path).map_err(CaError::io(cert_path))?;
        let cert = Certificate::from_pem(&bytes)?;
        let tbs = cert.tbs_certificate;
        if tbs.subject_public_key_info != spki_of(&key)? {
            return Err(CaError::KeyMismatch {
                file: "tls/ca.pem",
                why: "not the key in tls/ca.key",
            });
        }
        Ok(SoftwareCa {
            key_id: key_identifier(&tbs.subject_public_key_info)?,
            name: tbs.subject,
            key,
        })
    }

    fn issue_leaf(
        &self,
        cert_path: &Path,
        key_path: &Path,
        leaf: Leaf<'_>,
        now: SystemTime,
    ) -> Result<(), CaError> {
        let key = SigningKey::random(&mut OsRng);
        let spki = spki_of(&key)?;
        let purpose = match leaf {
            Leaf::Server => ID_KP_SERVER_AUTH,
            Leaf::Client { .. } => ID_KP_CLIENT_AUTH,
        };
        let mut extensions = signing_end_entity_extensions(&spki, &self.key_id, vec![purpose])?;
        let subject = match leaf {
            Leaf::Server => {
                let localhost = Ia5String::new("localhost")?;
                extensions.push(extension(
                    &SubjectAltName(vec![
                        GeneralName::DnsName(localhost),
                        GeneralName::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                        GeneralName::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                    ]),
                    false,
                )?);
                NameBuilder::default()
                    .utf8(ORGANIZATION_NAME, ORGANISATION)?
                    .utf8(COMMON_NAME, "localhost")?
                    .build()
            }
            Leaf::Client { role, name } => NameBuilder::default()
                .utf8(ORGANIZATION_NAME, ORGANISATION)?
                .utf8(ORGANIZATIONAL_UNIT_NAME, role)?
                .utf8(COMMON_NAME, name)?
                .build(),
        };
        let cert = self.sign(subject, spki, extensions, LEAF_VALIDITY, now)?;
        write_key(key_path, &key)?;
        write_atomically(cert_path, cert.to_pem(LineEnding::LF)?.as_bytes())
    }

    /// A certificate for `subject` and `spki` signed by this CA, valid from a day before `now`
    /// for `lifetime`.
    fn sign(
        &self,
        subject: Name,
        spki: SubjectPublicKeyInfoOwned,
        extensions: Vec<Extension>,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Certificate, CaError> {
        let not_before = now - DAY;
        let tbs = TbsParts {
            serial: serial_from_random(random_serial())?.0,
            alg: CaSignatureAlg::EcdsaSha256,
            issuer: self.name.clone(),
            validity: validity(not_before, not_before + lifetime)?,
            subject,
            spki,
            extensions,
        }
        .into_tbs();
        let signature: DerSignature = self.key.sign(&tbs.to_der()?);
        assemble(tbs, signature.as_bytes())
    }
}

fn random_serial() -> Vec<u8> {
    let mut bytes = vec![0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

fn spki_of(key: &SigningKey) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    let der = key
        .verifying_key()
        .to_public_key_der()
        .map_err(|e| CaError::Key(e.to_string()))?;
    Ok(SubjectPublicKeyInfoOwned::from_der(der.as_bytes())?)
}

/// Writes a PKCS#8 PEM private key readable by its owner only.
fn write_key(path: &Path, key: &SigningKey) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| CaError::Key(e.to_string()))?;
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(CaError::io(&tmp))?;
    file.write_all(pem.as_bytes()).map_err(CaError::io(&tmp))?;
    file.sync_all().map_err(CaError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(CaError::io(path))
}
