//! TLS for the API listener: rustls (TLS 1.2 and 1.3, ring), a client certificate from the
//! configured client CA required on every connection, and the caller's role and name read from
//! that certificate (OU and CN).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use der::Decode;
use der::asn1::{PrintableStringRef, Utf8StringRef};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
}

/// The rustls server configuration: TLS 1.2 and 1.3 with the ring provider, client certificates
/// required and verified against `client_ca`.
pub(crate) fn server_config(
    certificate: &Path,
    private_key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certificates(certificate)?;
    let key = PrivateKeyDer::from_pem_file(private_key).map_err(|error| TlsError::File {
        path: private_key.display().to_string(),
        message: error.to_string(),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in read_certificates(client_ca)? {
        roots
            .add(ca)
            .map_err(|error| TlsError::ClientVerifier(error.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| TlsError::ClientVerifier(error.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
}

/// The actor string of audit records: `role:name`.
impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.name)
    }
}
