//! What a worker does with its session: every PKCS#11 call of the adapter's operations.
//!
//! These run on HSM worker threads only (`session_pool.rs`), one job at a time per session.

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use secrecy::SecretSlice;

use crate::directory::{KeyEntry, resident_public_key_template, system_public_key_template};
use crate::error::HsmError;
use crate::keys::{
    Digest, EcCurve, HashAlgorithm, KekId, KeyAlgorithm, KeyMode, KeyStorage, SignatureScheme,
    SystemKey, SystemKeyKind, UserKeyRef,
};
use crate::module;
use crate::policy::Policy;
use crate::public_key::{PublicKeySpki, digest_info, ec_spki, ecdsa_der, rsa_spki};
use crate::session_pool::{CachedKey, Shared, WorkerCtx};
use crate::templates::{
    CopyUse, PairTarget, key_pair, key_type_code, system_key_algorithm, unwrap_template,
    wrap_mechanism, wrap_mechanism_code,
};

/// Bytes of a resident key's CKA_ID, drawn from the HSM's generator.
const RESIDENT_ID_LEN: usize = 16;
/// Tries at making a resident key pair when SoftHSM fails the token write (see
/// `generate_resident`).
const RESIDENT_GENERATE_ATTEMPTS: u64 = 3;
/// AES-GCM nonce (NIST SP 800-38D section 8.2.2: 96-bit random IVs) and tag lengths.
pub(crate) const GCM_NONCE_LEN: usize = 12;
pub(crate) const GCM_TAG_LEN: usize = 16;
/// Most random bytes one call returns.
pub(crate) const MAX_RANDOM_LEN: usize = 64 * 1024;

/// A signature request prepared on the caller's side: the mechanism and the exact bytes that
/// PKCS#11 signs, so that the worker only signs. Its `Debug` leaves out the bytes: they are the
/// user's hash, which is never logged (as with [`Digest`]).
#[derive(Clone)]
pub(crate) struct SignRequest {
    kind: SignKind,
    data: Vec<u8>,
}

impl std::fmt::Debug for SignRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignRequest")
            .field("kind", &self.kind)
            .field("data_len", &self.data.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
enum SignKind {
    Ecdsa(EcCurve),
    RsaPkcs1v15 {
        modulus_len: usize,
    },
    RsaPss {
        hash: HashAlgorithm,
        modulus_len: usize,
    },
}

impl SignRequest {
    /// Checks that `scheme` fits `algorithm` and builds what CKM_ECDSA, CKM_RSA_PKCS or
    /// CKM_RSA_PKCS_PSS sign.
    pub(crate) fn new(
        algorithm: KeyAlgorithm,
        scheme: SignatureScheme,
        digest: &Digest,
    ) -> Result<Self, HsmError> {
        let misfit =
            || HsmError::InvalidInput(format!("a {algorithm} key cannot sign with {scheme:?}"));
        let (kind, data) = match (scheme, algorithm.curve(), algorithm.modulus_len()) {
            (SignatureScheme::Ecdsa, Some(curve), _) => {
                (SignKind::Ecdsa(curve), digest.as_bytes().to_vec())
            }
            (SignatureScheme::RsaPkcs1v15, None, Some(modulus_len)) => (
                SignKind::RsaPkcs1v15 { modulus_len },
                digest_info(digest.algorithm(), digest.as_bytes())?,
            ),
            (SignatureScheme::RsaPss, None, Some(modulus_len)) => (
                SignKind::RsaPss {
                    hash: digest.algorithm(),
                    modulus_len,
                },
                digest.as_bytes().to_vec(),
            ),
            _ => return Err(misfit()),
        };
        Ok(SignRequest { kind, data })
    }

    pub(crate) fn mechanism(&self) -> Mechanism<'static> {
        match self.kind {
            SignKind::Ecdsa(_) => Mechanism::Ecdsa,
            SignKind::RsaPkcs1v15 { .. } => Mechanism::RsaPkcs,
            SignKind::RsaPss { hash, .. } => {
                let (hash_alg, mgf) = match hash {
                    HashAlgorithm::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
                    HashAlgorithm::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
                    HashAlgorithm::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
                };
                let salt = hash.output_len() as u64;
                Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg,
                    mgf,
                    s_len: salt.into(),
                })
            }
        }
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }

    /// How to encode what the module returns.
    pub(crate) fn encoding(&self) -> SignatureEncoding {
        SignatureEncoding(self.kind)
    }
}

/// Turns the module's raw signature into the scheme's encoding (on the caller's thread).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignatureEncoding(SignKind);

impl SignatureEncoding {
    pub(crate) fn finish(self, raw: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        match self.0 {
            SignKind::Ecdsa(curve) => ecdsa_der(curve, &raw),
            SignKind::RsaPkcs1v15 { modulus_len } | SignKind::RsaPss { modulus_len, .. } => {
                if raw.len() != modulus_len {
                    return Err(HsmError::UnexpectedResponse("RSA signature length"));
                }
                Ok(raw)
            }
        }
    }
}

/// Which user key to sign with, as the worker needs it.
#[derive(Debug, Clone)]
pub(crate) enum SigningKey {
    Wrapped {
        algorithm: KeyAlgorithm,
        kek: Option<KekId>,
        blob: Box<[u8]>,
    },
    Resident {
        algorithm: KeyAlgorithm,
        id: Vec<u8>,
    },
}

impl SigningKey {
    pub(crate) fn from_ref(key: &UserKeyRef) -> Self {
        match &key.storage {
            KeyStorage::Wrapped { blob, kek, .. } => SigningKey::Wrapped {
                algorithm: key.algorithm,
                kek: *kek,
                blob: blob.clone().into(),
            },
            KeyStorage::Resident { id } => SigningKey::Resident {
                algorithm: key.algorithm,
                id: id.clone(),
            },
        }
    }
}

impl WorkerCtx {
    /// The handle of a key in the directory, after checking its policy once.
    fn checked(
        &self,
        lookup: impl Fn(&crate::directory::Directory) -> Result<&KeyEntry, HsmError>,
        policy: Policy<'_>,
    ) -> Result<ObjectHandle, HsmError> {
        let (handle, verified) = {
            let directory = self.shared.directory();
            let entry = lookup(&directory)?;
            (entry.handle, entry.is_verified(&policy))
        };
        if !verified {
            policy.check(&self.session, &self.shared.arrays, handle)?;
            let directory = self.shared.directory();
            if let Ok(entry) = lookup(&directory)
                && entry.handle == handle
            {
                entry.mark_verified(&policy);
            }
        }
        Ok(handle)
    }

    pub(crate) fn system_key(&self, key: SystemKey) -> Result<ObjectHandle, HsmError> {
        self.checked(|d| d.system(key), Policy::System(key))
    }

    fn resident_key(&self, algorithm: KeyAlgorithm, id: &[u8]) -> Result<ObjectHandle, HsmError> {
        self.checked(|d| d.resident(id), Policy::Resident(algorithm, id))
    }

    /// Generates a user key pair (not idempotent).
    pub(crate) fn generate_user_key(
        &mut self,
        algorithm: KeyAlgorithm,
        mode: KeyMode,
    ) -> Result<UserKeyRef, HsmError> {
        match mode {
            KeyMode::Wrapped => self.generate_wrapped(algorithm),
            KeyMode::Resident => self.generate_resident(algorithm),
        }
    }

    fn generate_wrapped(&mut self, algorithm: KeyAlgorithm) -> Result<UserKeyRef, HsmError> {
        let kek = self.system_key(SystemKey::Kek)?;
        let kek_id = self.shared.directory().kek_id();
        let (mechanism, public_template, private_template) =
            key_pair(algorithm, PairTarget::WrappedSession)?;
        let (public, private) =
            self.session
                .generate_key_pair(&mechanism, &public_template, &private_template)?;
        let result = (|| {
            Policy::Wrapped(algorithm).check(&self.session, &self.shared.arrays, private)?;
            let public_key = self.read_public_key(public, algorithm)?;
            let blob = self.session.wrap_key(&wrap_mechanism(), kek, private)?;
            let storage = KeyStorage::Wrapped {
                kek: kek_id,
                mechanism: wrap_mechanism_code(),
                key_type: key_type_code(algorithm),
                blob,
            };
            UserKeyRef::new(algorithm, storage, public_key)
        })();
        // Only the blob leaves: the session objects go whether or not wrapping worked.
        self.destroy_quietly(private);
        self.destroy_quietly(public);
        result
    }

    fn generate_resident(&mut self, algorithm: KeyAlgorithm) -> Result<UserKeyRef, HsmError> {
        let mut attempt = 1;
        let (id, public, private) = loop {
            let mut id = vec![0u8; RESIDENT_ID_LEN];
            self.session.generate_random_slice(&mut id)?;
            if self.shared.directory().contains_resident(&id) {
                return Err(HsmError::UnexpectedResponse(
                    "the RNG repeated a 128-bit key id",
                ));
            }
            let (mechanism, public_template, private_template) =
                key_pair(algorithm, PairTarget::ResidentToken { id: &id })?;
            let generated = {
                let _token_write = module::token_write_lock();
                self.session
                    .generate_key_pair(&mechanism, &public_template, &private_template)
            };
            match generated {
                Ok((public, private)) => break (id, public, private),
                // SoftHSM's file store now and then fails a token-object write while other
                // sessions use the token, with CKR_GENERAL_ERROR or, when it stores the
                // template's attributes, CKR_TEMPLATE_INCONSISTENT. Another attempt succeeds; it
                // takes a fresh id, so nothing a failed attempt may have left on the token is
                // ever taken for the new key. The template is the same each time: one that is
                // really inconsistent fails every attempt and is reported.
                Err(CryptokiError::Pkcs11(
                    RvError::GeneralError | RvError::TemplateInconsistent,
                    _,
                )) if attempt < RESIDENT_GENERATE_ATTEMPTS => {
                    tracing::warn!(attempt, "resident key generation failed; trying again");
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5 * attempt));
                }
                Err(error) => return Err(error.into()),
            }
        };
        let policy = Policy::Resident(algorithm, &id);
        let result = (|| {
            policy.check(&self.session, &self.shared.arrays, private)?;
            let public_key = self.read_public_key(public, algorithm)?;
            UserKeyRef::new(
                algorithm,
                KeyStorage::Resident { id: id.clone() },
                public_key,
            )
        })();
        match result {
            Ok(key) => {
                self.shared
                    .directory_mut()
                    .insert_resident(id.clone(), KeyEntry::new(private, Some(&policy)));
                Ok(key)
            }
            Err(err) => {
                // Undo the half-made key (parsec destroys both halves the same way).
                self.destroy_quietly(private);
                self.destroy_quietly(public);
                Err(err)
            }
        }
    }

    /// The public key of a resident key already on the token (for a lost reference, or a key
    /// made by someone else). Signing checks the key's policy as for any other key.
    pub(crate) fn resident_key_ref(
        &mut self,
        algorithm: KeyAlgorithm,
        id: &[u8],
    ) -> Result<UserKeyRef, HsmError> {
        // The private half must be on the token; its policy is checked when it is used.
        self.shared.directory().resident(id)?;
        let public = match self
            .session
            .find_objects(&resident_public_key_template(id))?[..]
        {
            [public] => public,
            [] => {
                return Err(HsmError::UnexpectedResponse(
                    "resident key without public half",
                ));
            }
            _ => {
                return Err(HsmError::UnexpectedResponse(
                    "several public halves share a CKA_ID",
                ));
            }
        };
        let public_key = self.read_public_key(public, algorithm)?;
        UserKeyRef::new(
            algorithm,
            KeyStorage::Resident { id: id.to_vec() },
            public_key,
        )
    }

    /// Signs with a user key. Returns the module's raw signature ([`SignRequest::finish`] makes
    /// the final encoding on the caller's thread).
    pub(crate) fn sign_user(
        &mut self,
        key: &SigningKey,
        request: &SignRequest,
    ) -> Result<Vec<u8>, HsmError> {
        match key {
            SigningKey::Resident { algorithm, id } => {
                let handle = self.resident_key(*algorithm, id)?;
                Ok(self
                    .session
                    .sign(&request.mechanism(), handle, request.data())?)
            }
            SigningKey::Wrapped {
                algorithm,
                kek,
                blob,
            } => self.sign_wrapped(*algorithm, kek.as_ref(), blob, request),
        }
    }

    fn sign_wrapped(
        &mut self,
        algorithm: KeyAlgorithm,
        kek: Option<&KekId>,
        blob: &[u8],
        request: &SignRequest,
    ) -> Result<Vec<u8>, HsmError> {
        let mechanism = request.mechanism();
        if let Some(cached) = self.cache.as_mut().and_then(|cache| cache.get(blob)) {
            let handle = cached.handle;
            match self.session.sign(&mechanism, handle, request.data()) {
                Ok(signature) => {
                    self.shared
                        .key_cache_hits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(signature);
                }
                Err(err) => {
                    let err = HsmError::from(err);
                    if err.recovery().is_some() {
                        // The epoch logic forgets the cache after the recovery.
                        return Err(err);
                    }
                    // Anything else: drop the cached copy and unwrap afresh below.
                    if let Some(cache) = self.cache.as_mut() {
                        cache.pop(blob);
                    }
                    self.destroy_quietly(handle);
                }
            }
        }
        if self.cache.is_some() {
            self.shared
                .key_cache_misses
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let kek = self.checked(|d| d.kek_for(kek), Policy::System(SystemKey::Kek))?;
        let handle = self.session.unwrap_key(
            &wrap_mechanism(),
            kek,
            blob,
            &unwrap_template(algorithm, CopyUse::Sign),
        )?;
        let result = self
            .check_unwrapped(algorithm, handle)
            .and_then(|()| Ok(self.session.sign(&mechanism, handle, request.data())?));
        match (&mut self.cache, &result) {
            (Some(cache), Ok(_)) => {
                if let Some((_, evicted)) = cache.push(blob.into(), CachedKey { handle }) {
                    self.destroy_quietly(evicted.handle);
                }
            }
            _ => self.destroy_quietly(handle),
        }
        result
    }

    /// Checks an unwrapped copy against the policy, once per algorithm and session. Its
    /// attributes come from our unwrap template and the module, and neither changes while the
    /// session lives: a module that ignores part of the template is caught on the session's
    /// first unwrap of that algorithm, before that copy signs, and every later copy is made the
    /// same way. A new session, or keys found again after a recovery, check again.
    fn check_unwrapped(
        &mut self,
        algorithm: KeyAlgorithm,
        handle: ObjectHandle,
    ) -> Result<(), HsmError> {
        let bit = 1 << algorithm.code();
        if self.unwraps_checked & bit == 0 {
            Policy::Unwrapped(algorithm).check(&self.session, &self.shared.arrays, handle)?;
            self.unwraps_checked |= bit;
        }
        Ok(())
    }

    /// Drops this worker's unwrapped copy of a wrapped key.
    pub(crate) fn evict(&mut self, blob: &[u8]) {
        if let Some(cached) = self.cache.as_mut().and_then(|cache| cache.pop(blob)) {
            self.destroy_quietly(cached.handle);
        }
    }

    /// Signs a digest with a system signing key; returns the raw `r || s`.
    pub(crate) fn sign_system(
        &mut self,
        key: SystemKey,
        request: &SignRequest,
    ) -> Result<Vec<u8>, HsmError> {
        let handle = self.system_key(key)?;
        Ok(self
            .session
            .sign(&request.mechanism(), handle, request.data())?)
    }

    /// The public key of a system signing key.
    pub(crate) fn system_public_key(&mut self, key: SystemKey) -> Result<PublicKeySpki, HsmError> {
        let SystemKeyKind::Signing(curve) = key.kind() else {
            return Err(HsmError::InvalidInput(format!(
                "system key {key} has no public key"
            )));
        };
        // The private half must be there and sound before its public half is handed out.
        self.system_key(key)?;
        let public = match self
            .session
            .find_objects(&system_public_key_template(key))?[..]
        {
            [public] => public,
            [] => return Err(HsmError::SystemKeyMissing(key)),
            _ => return Err(HsmError::DuplicateKey { label: key.label() }),
        };
        self.read_public_key(public, system_key_algorithm(curve))
    }

    /// HMAC-SHA-256 with a system MAC key.
    pub(crate) fn hmac_sha256(
        &mut self,
        key: SystemKey,
        data: &[u8],
    ) -> Result<[u8; 32], HsmError> {
        if key.kind() != SystemKeyKind::Hmac {
            return Err(HsmError::InvalidInput(format!(
                "system key {key} is not a MAC key"
            )));
        }
        let handle = self.system_key(key)?;
        let mac = self.session.sign(&Mechanism::Sha256Hmac, handle, data)?;
        mac.try_into()
            .map_err(|_| HsmError::UnexpectedResponse("HMAC-SHA-256 length"))
    }

    /// AES-256-GCM under the data key: `nonce || ciphertext || tag`.
    pub(crate) fn encrypt(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
        let handle = self.system_key(SystemKey::Data)?;
        let mut nonce = [0u8; GCM_NONCE_LEN];
        self.session.generate_random_slice(&mut nonce)?;
        let mut iv = nonce;
        let params = GcmParams::new(&mut iv, aad, (8 * GCM_TAG_LEN as u64).into())?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), handle, plaintext)?;
        if sealed.len() != plaintext.len() + GCM_TAG_LEN {
            return Err(HsmError::UnexpectedResponse("AES-GCM output length"));
        }
        let mut out = Vec::with_capacity(GCM_NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Reverses [`WorkerCtx::encrypt`]; any change to nonce, ciphertext, tag or associated data
    /// gives [`HsmError::NotAuthentic`].
    pub(crate) fn decrypt(
        &mut self,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<SecretSlice<u8>, HsmError> {
        if sealed.len() < GCM_NONCE_LEN + GCM_TAG_LEN {
            return Err(HsmError::NotAuthentic);
        }
        let handle = self.system_key(SystemKey::Data)?;
        let (nonce, ciphertext) = sealed.split_at(GCM_NONCE_LEN);
        let mut iv = [0u8; GCM_NONCE_LEN];
        iv.copy_from_slice(nonce);
        let params = GcmParams::new(&mut iv, aad, (8 * GCM_TAG_LEN as u64).into())?;
        match self
            .session
            .decrypt(&Mechanism::AesGcm(params), handle, ciphertext)
        {
            Ok(plaintext) => Ok(SecretSlice::from(plaintext)),
            // PKCS#11 says CKR_ENCRYPTED_DATA_INVALID for a tag that does not match; SoftHSM
            // 2.6 says CKR_GENERAL_ERROR (its final decryption step fails). Only C_Decrypt
            // itself, after C_DecryptInit accepted key and parameters, is read that way.
            Err(CryptokiError::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::FunctionFailed
                | RvError::GeneralError,
                Function::Decrypt,
            )) => Err(HsmError::NotAuthentic),
            Err(err) => Err(err.into()),
        }
    }

    /// Random bytes from the HSM's generator.
    pub(crate) fn random(&mut self, len: usize) -> Result<Vec<u8>, HsmError> {
        let mut out = vec![0u8; len];
        self.session.generate_random_slice(&mut out)?;
        Ok(out)
    }

    /// SPKI of a public key object.
    fn read_public_key(
        &self,
        public: ObjectHandle,
        algorithm: KeyAlgorithm,
    ) -> Result<PublicKeySpki, HsmError> {
        match algorithm.curve() {
            Some(curve) => {
                let attributes = self
                    .session
                    .get_attributes(public, &[AttributeType::EcPoint])?;
                match attributes.first() {
                    Some(Attribute::EcPoint(point)) => ec_spki(curve, point),
                    _ => Err(HsmError::UnexpectedResponse(
                        "public key without CKA_EC_POINT",
                    )),
                }
            }
            None => {
                let attributes = self.session.get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )?;
                match attributes.as_slice() {
                    [Attribute::Modulus(n), Attribute::PublicExponent(e)] => {
                        let spki = rsa_spki(n, e)?;
                        // Checks the modulus size against the algorithm.
                        PublicKeySpki::from_der(spki.as_der().to_vec(), algorithm).map_err(|_| {
                            HsmError::UnexpectedResponse("RSA modulus of the wrong size")
                        })
                    }
                    _ => Err(HsmError::UnexpectedResponse("RSA public key attributes")),
                }
            }
        }
    }

    /// Destroys a session object we made; a failure only leaves it until the session closes.
    fn destroy_quietly(&self, handle: ObjectHandle) {
        if let Err(err) = self.session.destroy_object(handle) {
            tracing::warn!(error = %HsmError::from(err), "could not destroy a session object");
        }
    }
}

/// Destroys a resident key pair (not idempotent), on a session of its own with the pool's gate
/// held exclusively: no job holds the key's handle when the key dies, and none can look it up
/// after. (A module that reuses handle numbers could otherwise hand a job that looked this key up
/// another key under the same number.)
pub(crate) fn destroy_resident(shared: &Shared, id: &[u8]) -> Result<(), HsmError> {
    let session = module::open_user_session(&shared.pkcs11, shared.slot, shared.pin())?;
    let _exclusive = shared.exclusive();
    let private = shared.directory_mut().remove_resident(id)?;
    let _token_write = module::token_write_lock();
    session.destroy_object(private)?;
    for public in session.find_objects(&resident_public_key_template(id))? {
        session.destroy_object(public)?;
    }
    Ok(())
}
