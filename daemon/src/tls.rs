//! TLS for the API listener: rustls (TLS 1.2 and 1.3, ring), a client certificate from the
//! configured client CA required on every connection, and the caller's role and name read from
//! that certificate (OU and CN).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use der::Decode;
use der::asn1::{PrintableStringRef, Utf8StringRef};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_cert::Certificate;

/// A caller's role, the OU of its client certificate (API.md "Roles").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Role {
    Registrar,
    Service,
    Gateway,
    Officer,
    Auditor,
}

impl Role {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "registrar" => Self::Registrar,
            "service" => Self::Service,
            "gateway" => Self::Gateway,
            "officer" => Self::Officer,
            "auditor" => Self::Auditor,
            _ => return None,
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Registrar => "registrar",
            Self::Service => "service",
            Self::Gateway => "gateway",
            Self::Officer => "officer",
            Self::Auditor => "auditor",
        }
    }
}

/// Who is calling: taken from a client certificate that rustls already verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) role: Role,
    pub(crate) name: String,
}

/// Why a verified certificate still names no caller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallerError {
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    #[error("the client certificate's OU names no known role")]
    NoRole,
    #[error("the client certificate has no CN")]
    NoName,
    #[error("the name {0:?} is not accepted for its role")]
    NameNotAllowed(String),
}

/// Which names each role accepts (empty: any).
#[derive(Clone, Debug, Default)]
pub(crate) struct NamePolicy(BTreeMap<Role, Vec<String>>);

impl NamePolicy {
    pub(crate) fn new(allowed: &BTreeMap<String, Vec<String>>) -> Self {
        Self(
            allowed
                .iter()
                .filter_map(|(role, names)| Role::parse(role).map(|role| (role, names.clone())))
                .collect(),
        )
    }

    /// The caller that `leaf` (DER) names.
    pub(crate) fn caller(&self, leaf: &[u8]) -> Result<Caller, CallerError> {
        let certificate = Certificate::from_der(leaf).map_err(|_| CallerError::Unparsable)?;
        let mut role = None;
        let mut name = None;
        for rdn in certificate.tbs_certificate.subject.0.iter() {
            for attribute in rdn.0.iter() {
                let text = directory_string(&attribute.value);
                if attribute.oid == const_oids::OU {
                    role = role.or_else(|| text.as_deref().and_then(Role::parse));
                } else if attribute.oid == const_oids::CN {
                    name = name.or(text);
                }
            }
        }
        let role = role.ok_or(CallerError::NoRole)?;
        let name = name
            .filter(|name| !name.is_empty())
            .ok_or(CallerError::NoName)?;
        if let Some(allowed) = self.0.get(&role)
            && !allowed.iter().any(|allowed| allowed == &name)
        {
            return Err(CallerError::NameNotAllowed(name));
        }
        Ok(Caller { role, name })
    }
}

mod const_oids {
    use der::asn1::ObjectIdentifier;

    pub(super) const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    pub(super) const OU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.11");
}

fn directory_string(value: &der::Any) -> Option<String> {
    if let Ok(text) = value.decode_as::<Utf8StringRef<'_>>() {
        return Some(text.as_str().to_owned());
    }
    if let Ok(text) = value.decode_as::<PrintableStringRef<'_>>() {
        return Some(text.as_str().to_owned());
    }
    None
}

/// Why the TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot read {path}: {message}")]
    File { path: String, message: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientVerifier(String),
    #[error(
        "client CRL {path}: {message}; give the client CA's current CRL (PEM or DER) in \
         server.client_crl"
    )]
    ClientCrl { path: String, message: String },
}

/// The rustls server configuration and what the operator should watch in it.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) config: Arc<ServerConfig>,
    /// The client CRL's nextUpdate: past it, every handshake fails until a fresh CRL is loaded.
    pub(crate) crl_next_update: Option<SystemTime>,
}

/// The rustls server configuration of `server` at `now`: TLS 1.2 and 1.3 with the ring
/// provider, client certificates required and verified against the client CA and, when
/// `server.client_crl` is set, against its CRL (checked here at `now`: issued and signed by the
/// client CA, nextUpdate not passed). With a CRL, rustls refuses the certificates it lists and,
/// once its nextUpdate passes, every certificate (fail closed).
pub(crate) fn server_config(
    server: &crate::config::ServerConfig,
    now: SystemTime,
) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certificates(&server.tls_certificate)?;
    let key =
        PrivateKeyDer::from_pem_file(&server.tls_private_key).map_err(|error| TlsError::File {
            path: server.tls_private_key.display().to_string(),
            message: error.to_string(),
        })?;
    let cas = read_certificates(&server.client_ca)?;
    let mut roots = RootCertStore::empty();
    for ca in &cas {
        roots
            .add(ca.clone())
            .map_err(|error| TlsError::ClientVerifier(error.to_string()))?;
    }
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let mut crl_next_update = None;
    if let Some(path) = &server.client_crl {
        let (crl, next_update) = client_crl(path, &cas, now)?;
        verifier = verifier
            .with_crls([crl])
            .only_check_end_entity_revocation()
            .enforce_revocation_expiration();
        crl_next_update = Some(next_update);
    }
    let verifier = verifier
        .build()
        .map_err(|error| TlsError::ClientVerifier(error.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        crl_next_update,
    })
}

/// The client CRL at `path`, verified against one of the client CAs at `now`, and its
/// nextUpdate.
fn client_crl(
    path: &Path,
    cas: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(CertificateRevocationListDer<'static>, SystemTime), TlsError> {
    let refused = |message: String| TlsError::ClientCrl {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|error| refused(error.to_string()))?;
    let crl = if bytes.starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::from_pem_slice(&bytes)
            .map_err(|error| refused(format!("not a PEM X509 CRL: {error}")))?
    } else {
        CertificateRevocationListDer::from(bytes)
    };
    let mut why = String::from("no client CA");
    for ca in cas {
        match ca_bridge::crl::VerifiedCrl::parse(crl.as_ref(), ca.as_ref(), now) {
            Ok(verified) => return Ok((crl, verified.next_update())),
            Err(error) => why = error.to_string(),
        }
    }
    Err(refused(why))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| TlsError::File {
            path: path.display().to_string(),
            message: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certificates)
}

/// The API listener's TLS: the rustls configuration in force (replaced as a whole when the
/// files are reloaded, so a handshake sees the old or the new one, never a mix) and the names
/// each role accepts.
#[derive(Debug)]
pub(crate) struct ServerTls {
    current: std::sync::RwLock<Arc<ServerConfig>>,
    names: NamePolicy,
}

impl ServerTls {
    pub(crate) fn new(config: Arc<ServerConfig>, names: NamePolicy) -> Self {
        Self {
            current: std::sync::RwLock::new(config),
            names,
        }
    }

    /// An acceptor with the configuration in force now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    pub(crate) fn names(&self) -> &NamePolicy {
        &self.names
    }

    /// Puts `config` in force for the handshakes that start from now on.
    pub(crate) fn replace(&self, config: Arc<ServerConfig>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
    }
}

/// The actor string of audit records: `role:name`.
impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.name)
    }
}
