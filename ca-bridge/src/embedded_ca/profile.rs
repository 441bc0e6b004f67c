//! The certificate profiles of the embedded CA: its root, its issuing CA, and the subscribers'
//! iAM Smart-Certs (adult and minor, told apart by the certificate policy).

use const_oid::db::rfc4519::{
    COMMON_NAME, COUNTRY_NAME, GIVEN_NAME, ORGANIZATION_NAME, SERIAL_NUMBER, SURNAME,
};
use const_oid::db::rfc5280::{ID_AD_OCSP, ID_CE_CERTIFICATE_POLICIES};
use der::asn1::{Ia5String, OctetString};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{
    AccessDescription, AuthorityInfoAccessSyntax, CrlDistributionPoints, KeyUsage, KeyUsages,
};
use x509_cert::name::Name;

use super::policy_oid::{PolicyOid, certificate_policies};
use crate::error::CaError;
use crate::x509::{NameBuilder, authority_key_id, basic_constraints, extension, subject_key_id};

/// Longest common name written (X.520 ub-common-name); longer "given surname" strings are cut
/// there, the full names stay in the surname and givenName attributes.
const MAX_COMMON_NAME: usize = 64;
/// Longest surname or given name accepted (a sanity bound, far above real names).
const MAX_NAME: usize = 128;

/// `C=HK, O=<organisation>`: the start of every name the embedded CA writes.
pub(super) fn organisation_name(organisation: &str) -> Result<NameBuilder, CaError> {
    NameBuilder::default()
        .printable(COUNTRY_NAME, "HK")?
        .utf8(ORGANIZATION_NAME, organisation)
}

/// `C=HK, O=<organisation>, CN=<organisation> <what>` for the CA certificates.
pub(super) fn ca_name(organisation: &str, what: &str) -> Result<Name, CaError> {
    Ok(organisation_name(organisation)?
        .utf8(COMMON_NAME, &format!("{organisation} {what}"))?
        .build())
}

/// Root: CA without a path length limit, signs certificates and CRLs.
pub(super) fn root_extensions(spki: &SubjectPublicKeyInfoOwned) -> Result<Vec<Extension>, CaError> {
    Ok(vec![
        basic_constraints(true, None)?,
        extension(&KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign), true)?,
        subject_key_id(spki)?,
    ])
}

/// Issuing CA: issues end-entity certificates only (path length 0); digitalSignature lets it
/// sign OCSP responses itself.
pub(super) fn issuing_extensions(
    spki: &SubjectPublicKeyInfoOwned,
    root_key_id: &OctetString,
) -> Result<Vec<Extension>, CaError> {
    Ok(vec![
        basic_constraints(true, Some(0))?,
        extension(
            &KeyUsage(KeyUsages::DigitalSignature | KeyUsages::KeyCertSign | KeyUsages::CRLSign),
            true,
        )?,
        subject_key_id(spki)?,
        authority_key_id(root_key_id)?,
    ])
}

/// The subscriber's name: `C=HK, O=..., CN=<given_name surname | surname>, SN=surname,
/// GN=given_name, serialNumber=<keyed HKIC hash, hex>` (never the HKIC number itself).
pub(crate) fn subscriber_name(
    organisation: &str,
    surname: &str,
    given_name: Option<&str>,
    hkic_hash_hex: &str,
) -> Result<Name, CaError> {
    check_name("surname", surname)?;
    if let Some(given) = given_name {
        check_name("given_name", given)?;
    }
    if hkic_hash_hex.is_empty()
        || hkic_hash_hex.len() > 128
        || !hkic_hash_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(CaError::InvalidRequest(
            "hkic_hash_hex must be 1 to 128 lowercase hex digits".into(),
        ));
    }
    let full = match given_name {
        Some(given) => format!("{given} {surname}"),
        None => surname.to_owned(),
    };
    let common: String = full.chars().take(MAX_COMMON_NAME).collect();
    let mut name = organisation_name(organisation)?
        .utf8(COMMON_NAME, &common)?
        .utf8(SURNAME, surname)?;
    if let Some(given) = given_name {
        name = name.utf8(GIVEN_NAME, given)?;
    }
    Ok(name.printable(SERIAL_NUMBER, hkic_hash_hex)?.build())
}

fn check_name(field: &str, value: &str) -> Result<(), CaError> {
    let chars = value.chars().count();
    if value.trim().is_empty() || chars > MAX_NAME || value.chars().any(char::is_control) {
        return Err(CaError::InvalidRequest(format!(
            "{field} must be 1 to {MAX_NAME} characters without control characters"
        )));
    }
    Ok(())
}

/// The URLs and policies written into subscriber certificates.
#[derive(Debug, Clone)]
pub(super) struct SubscriberProfile {
    pub(super) ocsp_url: Ia5String,
    pub(super) crl_url: Ia5String,
    pub(super) adult_policy: PolicyOid,
    pub(super) minor_policy: PolicyOid,
}

/// End entity: not a CA; keyUsage digitalSignature + nonRepudiation (critical); the profile's
/// certificate policy; AIA with the OCSP URL; the CRL distribution point; SKI and AKI.
pub(super) fn subscriber_extensions(
    profile: &SubscriberProfile,
    policy: &PolicyOid,
    spki: &SubjectPublicKeyInfoOwned,
    issuer_key_id: &OctetString,
) -> Result<Vec<Extension>, CaError> {
    Ok(vec![
        basic_constraints(false, None)?,
        extension(
            &KeyUsage(KeyUsages::DigitalSignature | KeyUsages::NonRepudiation),
            true,
        )?,
        Extension {
            extn_id: ID_CE_CERTIFICATE_POLICIES,
            critical: false,
            extn_value: OctetString::new(certificate_policies(policy)?)?,
        },
        extension(
            &AuthorityInfoAccessSyntax(vec![AccessDescription {
                access_method: ID_AD_OCSP,
                access_location: GeneralName::UniformResourceIdentifier(profile.ocsp_url.clone()),
            }]),
            false,
        )?,
        extension(
            &CrlDistributionPoints(vec![DistributionPoint {
                distribution_point: Some(DistributionPointName::FullName(vec![
                    GeneralName::UniformResourceIdentifier(profile.crl_url.clone()),
                ])),
                reasons: None,
                crl_issuer: None,
            }]),
            false,
        )?,
        subject_key_id(spki)?,
        authority_key_id(issuer_key_id)?,
    ])
}
