//! The detached CMS checked by an independent implementation: openssl makes the test PKI and the
//! document digest, software keys (p256, p384, rsa) sign the signed attributes the way the HSM
//! would, and `openssl cms -verify` must accept the result, and refuse it for changed content.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::SystemTime;

use ca_bridge::signed_data::{HashAlgorithm, SignatureAlg, SignedAttributes};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::pkcs8::DecodePrivateKey;
use tempfile::TempDir;

use common::{P256, cert_der, genkey, openssl, openssl_in};

const EXTENSIONS: &str = "\
[root]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[issuing]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[signer]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,nonRepudiation
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// The signer's key type.
#[derive(Clone, Copy, Debug)]
enum KeyKind {
    P256,
    P384,
    Rsa2048,
}

/// A root, an issuing CA and a signer certificate made by openssl, and a document to sign.
struct TestPki {
    dir: TempDir,
    signer_key: PathBuf,
    signer_der: Vec<u8>,
    issuing_der: Vec<u8>,
    root_der: Vec<u8>,
    document: PathBuf,
}

impl KeyKind {
    /// The `openssl genpkey` options for this kind of key.
    fn genpkey_options(self) -> &'static [&'static str] {
        match self {
            KeyKind::P256 => P256,
            KeyKind::P384 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            KeyKind::Rsa2048 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        }
    }
}

/// Makes `name.pem` with subject `subject`, signed by `issuer` (or by itself).
fn make_certificate(
    dir: &Path,
    name: &str,
    subject: &str,
    extensions: &str,
    serial: &str,
    issuer: Option<&str>,
) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let pem = format!("{name}.pem");
    openssl_in(
        dir,
        &[
            "req", "-new", "-utf8", "-key", &key, "-subj", subject, "-out", &csr,
        ],
    );
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        &csr,
        "-days",
        "30",
        "-set_serial",
        serial,
        "-extfile",
        "ext.cnf",
        "-extensions",
        extensions,
        "-out",
        &pem,
    ];
    let (issuer_pem, issuer_key);
    match issuer {
        Some(issuer) => {
            issuer_pem = format!("{issuer}.pem");
            issuer_key = format!("{issuer}.key");
            args.extend_from_slice(&["-CA", &issuer_pem, "-CAkey", &issuer_key]);
        }
        None => args.extend_from_slice(&["-signkey", &key]),
    }
    openssl_in(dir, &args);
}

impl TestPki {
    fn new(kind: KeyKind) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path();
        std::fs::write(path.join("ext.cnf"), EXTENSIONS).expect("write ext.cnf");

        genkey(path, "root.key", KeyKind::P384.genpkey_options());
        make_certificate(
            path,
            "root",
            "/C=HK/O=smartsign test/CN=Test Root CA",
            "root",
            "1",
            None,
        );
        genkey(path, "issuing.key", KeyKind::P256.genpkey_options());
        make_certificate(
            path,
            "issuing",
            "/C=HK/O=smartsign test/CN=Test Issuing CA",
            "issuing",
            "2",
            Some("root"),
        );
        genkey(path, "signer.key", kind.genpkey_options());
        // Like the embedded CA's end-entity subject: several attributes, a non-ASCII name and a
        // 16-byte serial with the high bit set (a leading zero byte in DER).
        make_certificate(
            path,
            "signer",
            "/C=HK/O=smartsign test/CN=陳大文 Chan Tai Man/SN=Chan/GN=Tai Man/serialNumber=0f1e2d",
            "signer",
            "0x8899aabbccddeeff0011223344556677",
            Some("issuing"),
        );

        // A document with bytes that a text-mode verifier would mangle.
        let document = path.join("document.bin");
        let mut content = b"Tax return 2026\r\n\x00\x01\xff\n".to_vec();
        content.extend((0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
        std::fs::write(&document, content).expect("write document");

        TestPki {
            signer_key: path.join("signer.key"),
            signer_der: cert_der(path, "signer.pem"),
            issuing_der: cert_der(path, "issuing.pem"),
            root_der: cert_der(path, "root.pem"),
            document,
            dir,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The document's digest as openssl computes it, not this crate's sha2.
    fn document_digest(&self, alg: HashAlgorithm) -> Vec<u8> {
        let name = match alg {
            HashAlgorithm::Sha256 => "-sha256",
            HashAlgorithm::Sha384 => "-sha384",
            HashAlgorithm::Sha512 => "-sha512",
        };
        let document = self.document.to_str().expect("utf-8 path");
        openssl_in(self.path(), &["dgst", name, "-binary", document]).stdout
    }

    /// Signs `digest` with the signer's software key, as the HSM signs a digest.
    fn sign_digest(&self, kind: KeyKind, alg: HashAlgorithm, digest: &[u8]) -> Vec<u8> {
        let pem = std::fs::read_to_string(&self.signer_key).expect("read key");
        match kind {
            KeyKind::P256 => {
                let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).expect("P-256 key");
                let signature: p256::ecdsa::Signature =
                    key.sign_prehash(digest).expect("sign prehash");
                signature.to_der().as_bytes().to_vec()
            }
            KeyKind::P384 => {
                let key = p384::ecdsa::SigningKey::from_pkcs8_pem(&pem).expect("P-384 key");
                let signature: p384::ecdsa::Signature =
                    key.sign_prehash(digest).expect("sign prehash");
                signature.to_der().as_bytes().to_vec()
            }
            KeyKind::Rsa2048 => {
                let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).expect("RSA key");
                let padding = match alg {
                    HashAlgorithm::Sha256 => rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
                    HashAlgorithm::Sha384 => rsa::Pkcs1v15Sign::new::<sha2::Sha384>(),
                    HashAlgorithm::Sha512 => rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
                };
                key.sign(padding, digest).expect("RSA sign")
            }
        }
    }

    /// Builds the CMS for the document in two steps, as the daemon does around the HSM.
    fn sign(&self, kind: KeyKind, sig_alg: SignatureAlg, with_root: bool) -> PathBuf {
        let alg = sig_alg.hash();
        let attrs = SignedAttributes::new(
            alg,
            &self.document_digest(alg),
            SystemTime::now(),
            &self.signer_der,
        )
        .expect("signed attributes");
        let to_be_signed = attrs.to_be_signed();
        assert_eq!(
            attrs.digest_to_sign(),
            openssl_digest(self.path(), alg, &to_be_signed)
        );
        let signature = self.sign_digest(kind, alg, &attrs.digest_to_sign());
        let mut certificates: Vec<&[u8]> = vec![&self.signer_der, &self.issuing_der];
        if with_root {
            certificates.push(&self.root_der);
        }
        let cms = attrs
            .into_content_info(&signature, sig_alg, &certificates)
            .expect("content info");
        let out = self.path().join("sig.p7s");
        std::fs::write(&out, cms).expect("write sig.p7s");
        out
    }

    fn verify(&self, cms: &Path, content: &Path) -> Output {
        openssl()
            .current_dir(self.path())
            .args([
                "cms",
                "-verify",
                "-binary",
                "-content",
                content.to_str().expect("utf-8 path"),
                "-inform",
                "DER",
                "-in",
                cms.to_str().expect("utf-8 path"),
                "-CAfile",
                "root.pem",
                "-out",
                "/dev/null",
            ])
            .output()
            .expect("run openssl")
    }

    fn assert_verifies_and_tampering_fails(&self, cms: &Path) {
        let ok = self.verify(cms, &self.document);
        assert!(
            ok.status.success(),
            "openssl cms -verify failed: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(String::from_utf8_lossy(&ok.stderr).contains("Verification successful"));

        let mut tampered = std::fs::read(&self.document).expect("read document");
        tampered[50_000] ^= 0x01;
        let tampered_path = self.path().join("tampered.bin");
        std::fs::write(&tampered_path, tampered).expect("write tampered");
        let bad = self.verify(cms, &tampered_path);
        assert!(!bad.status.success(), "a changed content byte verified");
        // The message-digest attribute no longer matches the content.
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("CMS_SignerInfo_verify_content"),
            "unexpected failure: {}",
            String::from_utf8_lossy(&bad.stderr)
        );
    }
}

fn openssl_digest(dir: &Path, alg: HashAlgorithm, data: &[u8]) -> Vec<u8> {
    let file = dir.join("tbs.der");
    std::fs::write(&file, data).expect("write tbs");
    let name = match alg {
        HashAlgorithm::Sha256 => "-sha256",
        HashAlgorithm::Sha384 => "-sha384",
        HashAlgorithm::Sha512 => "-sha512",
    };
    openssl_in(
        dir,
        &["dgst", name, "-binary", file.to_str().expect("utf-8 path")],
    )
    .stdout
}

fn check(kind: KeyKind, sig_alg: SignatureAlg) {
    let pki = TestPki::new(kind);
    let cms = pki.sign(kind, sig_alg, false);
    pki.assert_verifies_and_tampering_fails(&cms);
}

#[test]
fn ecdsa_p256_sha256_verifies_with_openssl() {
    check(KeyKind::P256, SignatureAlg::EcdsaSha256);
}

#[test]
fn ecdsa_p256_sha384_verifies_with_openssl() {
    check(KeyKind::P256, SignatureAlg::EcdsaSha384);
}

#[test]
fn ecdsa_p256_sha512_verifies_with_openssl() {
    check(KeyKind::P256, SignatureAlg::EcdsaSha512);
}

#[test]
fn ecdsa_p384_sha384_verifies_with_openssl() {
    check(KeyKind::P384, SignatureAlg::EcdsaSha384);
}

#[test]
fn rsa_pkcs1_sha256_sha384_sha512_verify_with_openssl() {
    let pki = TestPki::new(KeyKind::Rsa2048);
    for sig_alg in [
        SignatureAlg::RsaPkcs1Sha256,
        SignatureAlg::RsaPkcs1Sha384,
        SignatureAlg::RsaPkcs1Sha512,
    ] {
        let cms = pki.sign(KeyKind::Rsa2048, sig_alg, false);
        pki.assert_verifies_and_tampering_fails(&cms);
    }
}

#[test]
fn chain_with_the_root_verifies_too() {
    let pki = TestPki::new(KeyKind::P256);
    let cms = pki.sign(KeyKind::P256, SignatureAlg::EcdsaSha256, true);
    pki.assert_verifies_and_tampering_fails(&cms);
}

#[test]
fn a_signature_by_another_key_fails() {
    let pki = TestPki::new(KeyKind::P256);
    let alg = HashAlgorithm::Sha256;
    let attrs = SignedAttributes::new(
        alg,
        &pki.document_digest(alg),
        SystemTime::now(),
        &pki.signer_der,
    )
    .expect("signed attributes");
    let other = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).expect("key");
    let signature: p256::ecdsa::Signature =
        other.sign_prehash(&attrs.digest_to_sign()).expect("sign");
    let cms = attrs
        .into_content_info(
            signature.to_der().as_bytes(),
            SignatureAlg::EcdsaSha256,
            &[&pki.signer_der, &pki.issuing_der],
        )
        .expect("content info");
    let path = pki.path().join("wrong-key.p7s");
    std::fs::write(&path, cms).expect("write");
    let out = pki.verify(&path, &pki.document);
    assert!(!out.status.success(), "a signature by another key verified");
    // The signature over the signed attributes fails, not the message digest.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CMS_SignerInfo_verify:"), "{stderr}");
}

#[test]
fn openssl_prints_the_four_signed_attributes_and_a_detached_signed_data() {
    let pki = TestPki::new(KeyKind::P256);
    let cms = pki.sign(KeyKind::P256, SignatureAlg::EcdsaSha256, false);
    let printed = openssl_in(
        pki.path(),
        &[
            "cms",
            "-cmsout",
            "-print",
            "-noout",
            "-inform",
            "DER",
            "-in",
            cms.to_str().expect("utf-8 path"),
        ],
    );
    let text = String::from_utf8_lossy(&printed.stdout);
    for attribute in [
        "object: contentType (1.2.840.113549.1.9.3)",
        "object: messageDigest (1.2.840.113549.1.9.4)",
        "object: signingTime (1.2.840.113549.1.9.5)",
        "object: id-smime-aa-signingCertificateV2 (1.2.840.113549.1.9.16.2.47)",
    ] {
        assert!(text.contains(attribute), "{attribute} missing in:\n{text}");
    }
    assert!(text.contains("contentType: pkcs7-signedData (1.2.840.113549.1.7.2)"));
    assert!(text.contains("eContent: <ABSENT>"), "not detached:\n{text}");
    assert!(text.contains("algorithm: ecdsa-with-SHA256 (1.2.840.10045.4.3.2)"));
    assert!(text.contains("algorithm: sha256 (2.16.840.1.101.3.4.2.1)"));
    assert!(
        text.contains("UTCTIME:"),
        "signing time is not UTCTime:\n{text}"
    );
    assert!(text.contains("serialNumber: 0x8899AABBCCDDEEFF0011223344556677"));

    // ESSCertIDv2: the SHA-256 of the signer's certificate (as openssl hashes it), then
    // issuerSerial with the issuing CA's name and the signer's serial.
    let cert_hash = openssl_digest(pki.path(), HashAlgorithm::Sha256, &pki.signer_der);
    let cert_hash_hex: String = cert_hash.iter().map(|b| format!("{b:02X}")).collect();
    assert!(
        text.contains(&format!("OCTET STRING      [HEX DUMP]:{cert_hash_hex}")),
        "certificate hash missing in:\n{text}"
    );
    assert!(text.contains(":Test Issuing CA"));
    assert!(text.contains("INTEGER           :8899AABBCCDDEEFF0011223344556677"));
}
