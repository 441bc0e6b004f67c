//! Consent and authorisation statements: the values from the network that the statements are
//! made of (request, account and service ids, the certificate serial, hash algorithm, decision,
//! consent purpose), parsed as the routes parse them, the statements made, and a device
//! signature over them checked. A statement must keep its number of lines: no parsed value may
//! carry a newline into it.
//!
//! Fields: request id, service, account id, serial, 4 random bytes for the code, hash
//! algorithm, hash, decision, purpose, consent nonce, device key (DER); the rest is the
//! signature.
#![no_main]

use std::str::FromStr;

use cert_lifecycle::{
    AccountId, CertSerial, ConsentPurpose, Decision, HashAlgorithm, RequestId, ServiceName,
    SigningRequest, SigningStatus, identification_code_from_random,
};
use libfuzzer_sys::fuzz_target;
use smartsign_fuzz::Fields;
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields::new(data);
    let id = RequestId::parse(&fields.next_str());
    let service = ServiceName::parse(&fields.next_str());
    let account = AccountId::parse(&fields.next_str());
    let serial = CertSerial::parse(&fields.next_str());
    let code = <[u8; 4]>::try_from(fields.next())
        .ok()
        .and_then(identification_code_from_random);
    let hash_algorithm = HashAlgorithm::from_str(&fields.next_str());
    let hash = fields.next().to_vec();
    let decision = Decision::from_str(&fields.next_str());
    let purpose = ConsentPurpose::from_str(&fields.next_str());
    let nonce = fields.next_str();
    let key = fields.next();
    let signature = fields.rest();

    if let (Ok(account), Ok(purpose)) = (&account, &purpose) {
        let statement = purpose.statement(account, &nonce);
        if !nonce.contains('\n') {
            assert_eq!(statement.split('\n').count(), 4, "consent statement lines");
        }
        let _ = application::signing::device_signature_valid(key, &statement, signature);
    }
    let (Ok(id), Ok(service), Ok(account_id), Ok(certificate), Some(code), Ok(hash_algorithm)) =
        (id, service, account, serial, code, hash_algorithm)
    else {
        return;
    };
    let request = SigningRequest {
        id,
        service,
        account_id,
        certificate,
        identification_code: code,
        hash_algorithm,
        hash,
        hashes: None,
        description: None,
        status: SigningStatus::Pending,
        bad_attempts: 0,
        device_generation: 0,
        created_at: OffsetDateTime::UNIX_EPOCH,
        expires_at: OffsetDateTime::UNIX_EPOCH,
        sealed_result: None,
        signed_at: None,
    };
    for decision in decision
        .into_iter()
        .chain([Decision::Approve, Decision::Reject])
    {
        let statement = request.authorisation_statement(decision);
        assert_eq!(
            statement.split('\n').count(),
            6,
            "authorisation statement lines"
        );
        let _ = application::signing::device_signature_valid(key, &statement, signature);
    }
});
