//! The signing flow end to end, as its users drive it: the registrar registers an account, a
//! service asks for a signature with the user's TAID, the gateway relays the device-signed
//! decision, the service fetches the result. Everything over HTTPS with the dev client
//! certificates, against `smartsignd --dev` on SoftHSM; openssl checks the signatures and CMS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};
use sha2::Digest;
use smartsign_tests::flow::hkic_for;
use smartsign_tests::{DevDaemon, describe, device_key, device_pem, run};

/// An HKIC number with its check digit, computed here independently of the daemon.
fn hkic(letters: &str, digits: &str) -> String {
    let value = |c: char| c as u32 - 'A' as u32 + 10;
    let mut chars: Vec<u32> = letters.chars().map(value).collect();
    if chars.len() == 1 {
        chars.insert(0, 36);
    }
    chars.extend(digits.chars().map(|d| d.to_digit(10).unwrap()));
    let sum: u32 = chars.iter().zip((2..=9).rev()).map(|(v, w)| v * w).sum();
    let check = match 11 - sum % 11 {
        11 => '0',
        10 => 'A',
        n => char::from_digit(n, 10).unwrap(),
    };
    format!("{letters}{digits}{check}")
}

struct Flow {
    daemon: DevDaemon,
    registrar: Client,
    gateway: Client,
    demo_a: Client,
}

impl Flow {
    fn start(extra: &[&str]) -> Flow {
        let daemon = DevDaemon::start(extra);
        Flow {
            registrar: daemon.client("registrar"),
            gateway: daemon.client("gateway"),
            demo_a: daemon.client("demo-a"),
            daemon,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.daemon.api)
    }

    fn register(&self, id: &str, tier: &str, dob: &str, key: &SigningKey) -> Response {
        self.registrar
            .post(self.url("/v1/accounts"))
            .json(&json!({
                "account_id": id,
                "tier": tier,
                "surname": "CHAN",
                "given_name": "Tai Man",
                "date_of_birth": dob,
                "hkic_number": hkic_for(id),
                "device_public_key": device_pem(key),
            }))
            .send()
            .unwrap()
    }

    fn taid(&self, id: &str, service: &str) -> String {
        let response = self
            .registrar
            .get(self.url(&format!("/v1/accounts/{id}/taid?service={service}")))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().unwrap()["taid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn create(&self, client: &Client, body: Value) -> Response {
        client
            .post(self.url("/v1/signing-requests"))
            .json(&body)
            .send()
            .unwrap()
    }

    fn authorise(
        &self,
        request: &Value,
        hash: &[u8],
        decision: &str,
        key: &SigningKey,
    ) -> Response {
        let statement = format!(
            "smartsign-authorise-v1\n{}\n{}\n{}\n{}\n{}",
            request["request_id"].as_str().unwrap(),
            request["identification_code"].as_str().unwrap(),
            request["hash_algorithm"].as_str().unwrap_or("sha256"),
            hex::encode(hash),
            decision
        );
        let signature: p256::ecdsa::Signature = key.sign(statement.as_bytes());
        self.gateway
            .post(self.url(&format!(
                "/v1/signing-requests/{}/authorisation",
                request["request_id"].as_str().unwrap()
            )))
            .json(&json!({
                "decision": decision,
                "device_signature": STANDARD.encode(signature.to_der().as_bytes()),
            }))
            .send()
            .unwrap()
    }
}

fn problem_code(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = response.json().unwrap();
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["status"], status, "{body}");
    (status, body["code"].as_str().unwrap().to_owned())
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// Registers, creates a request over `document`, approves it and returns the signed result.
fn sign_document(
    flow: &Flow,
    id: &str,
    key: &SigningKey,
    document: &[u8],
    algorithm: &str,
) -> Value {
    let taid = flow.taid(id, "demo-a");
    let hash = match algorithm {
        "sha384" => sha2::Sha384::digest(document).to_vec(),
        "sha512" => sha2::Sha512::digest(document).to_vec(),
        _ => sha2::Sha256::digest(document).to_vec(),
    };
    let created = flow.create(
        &flow.demo_a,
        json!({"taid": taid, "hash_algorithm": algorithm, "hash": STANDARD.encode(&hash),
               "description": "Tax return 2026"}),
    );
    assert_eq!(created.status(), 201);
    let mut request: Value = created.json().unwrap();
    assert!(
        request["identification_code"]
            .as_str()
            .is_some_and(|code| code.len() == 4 && code.bytes().all(|b| b.is_ascii_digit())),
        "{request}"
    );

    // The gateway sees it, with the same code and hash the service shows.
    let pending: Value = flow
        .gateway
        .get(flow.url(&format!(
            "/v1/accounts/{id}/signing-requests?status=pending"
        )))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let listed = pending["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["request_id"] == request["request_id"])
        .expect("the gateway lists the pending request")
        .clone();
    assert_eq!(
        listed["identification_code"],
        request["identification_code"]
    );
    assert_eq!(listed["hash"], STANDARD.encode(&hash));
    assert_eq!(listed["service"], "demo-a");
    request["hash_algorithm"] = json!(algorithm);

    let authorised = flow.authorise(&request, &hash, "approve", key);
    assert_eq!(authorised.status(), 200);
    assert_eq!(authorised.json::<Value>().unwrap()["status"], "signed");

    let result: Value = flow
        .demo_a
        .get(flow.url(&format!(
            "/v1/signing-requests/{}",
            request["request_id"].as_str().unwrap()
        )))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(result["status"], "signed", "{result}");
    result
}

/// Verifies the raw signature with `openssl dgst` and the CMS with `openssl cms -verify` against
/// the dev CA root.
fn verify_with_openssl(flow: &Flow, result: &Value, document: &[u8], digest: &str) {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("document");
    write(&doc, document);
    let certificate = result["result"]["certificate"].as_str().unwrap();
    write(&dir.path().join("signer.pem"), certificate.as_bytes());
    let public = run(Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(dir.path().join("signer.pem")));
    assert!(public.status.success(), "{}", describe(&public));
    write(&dir.path().join("signer.pub"), &public.stdout);
    let signature = STANDARD
        .decode(result["result"]["signature"].as_str().unwrap())
        .unwrap();
    write(&dir.path().join("signature"), &signature);
    let verify = run(Command::new("openssl")
        .args(["dgst", &format!("-{digest}"), "-verify"])
        .arg(dir.path().join("signer.pub"))
        .arg("-signature")
        .arg(dir.path().join("signature"))
        .arg(&doc));
    assert!(
        verify.status.success(),
        "raw signature: {}",
        describe(&verify)
    );

    let cms = STANDARD
        .decode(result["result"]["cms"].as_str().unwrap())
        .unwrap();
    write(&dir.path().join("sig.p7s"), &cms);
    let chain: Vec<&str> = result["result"]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pem| pem.as_str().unwrap())
        .collect();
    assert!(!chain.is_empty());
    let cms_verify = || {
        run(Command::new("openssl")
            .args([
                "cms", "-verify", "-binary", "-inform", "DER", "-purpose", "any",
            ])
            .arg("-content")
            .arg(&doc)
            .arg("-in")
            .arg(dir.path().join("sig.p7s"))
            .arg("-CAfile")
            .arg(flow.daemon.state_dir().join("ca/root.pem"))
            .arg("-out")
            .arg("/dev/null"))
    };
    let verified = cms_verify();
    assert!(verified.status.success(), "CMS: {}", describe(&verified));
    // A changed document fails.
    write(&doc, b"something else");
    assert!(
        !cms_verify().status.success(),
        "a changed document must not verify"
    );
}

#[test]
fn ecdsa_p256_flow_signs_and_openssl_verifies_signature_and_cms() {
    let flow = Flow::start(&[]);
    let key = device_key();
    let registered = flow.register("u-ec-1", "iam_smart_plus", "1990-01-01", &key);
    assert_eq!(registered.status(), 201);
    let account: Value = registered.json().unwrap();
    assert_eq!(account["certificate"]["profile"], "adult");
    assert_eq!(account["certificate"]["status"], "valid");
    assert_eq!(account["minor"], false);

    let document = b"Tax return 2026, page 1 of 1";
    let result = sign_document(&flow, "u-ec-1", &key, document, "sha256");
    assert_eq!(result["result"]["signature_algorithm"], "ecdsa_p256_sha256");
    verify_with_openssl(&flow, &result, document, "sha256");

    let result = sign_document(&flow, "u-ec-1", &key, document, "sha384");
    assert_eq!(result["result"]["signature_algorithm"], "ecdsa_p256_sha384");
    verify_with_openssl(&flow, &result, document, "sha384");
}

#[test]
fn rsa_2048_flow_signs_and_openssl_verifies_signature_and_cms() {
    let flow = Flow::start(&["--key-algorithm", "rsa-2048"]);
    let key = device_key();
    assert_eq!(
        flow.register("u-rsa-1", "iam_smart_plus", "1985-06-30", &key)
            .status(),
        201
    );
    let document = b"Contract for the sale of goods";
    let result = sign_document(&flow, "u-rsa-1", &key, document, "sha256");
    assert_eq!(result["result"]["signature_algorithm"], "rsa_pkcs1_sha256");
    verify_with_openssl(&flow, &result, document, "sha256");
}

#[test]
fn resident_keys_sign_too() {
    let flow = Flow::start(&["--key-mode", "resident"]);
    let key = device_key();
    assert_eq!(
        flow.register("u-res-1", "iam_smart_plus", "1970-12-31", &key)
            .status(),
        201
    );
    let document = b"resident";
    let result = sign_document(&flow, "u-res-1", &key, document, "sha512");
    assert_eq!(result["result"]["signature_algorithm"], "ecdsa_p256_sha512");
    verify_with_openssl(&flow, &result, document, "sha512");
}

#[test]
fn refusals_of_the_signing_flow() {
    let flow = Flow::start(&[]);
    let key = device_key();
    assert_eq!(
        flow.register("u-ref-1", "iam_smart_plus", "1990-01-01", &key)
            .status(),
        201
    );
    let taid_a = flow.taid("u-ref-1", "demo-a");
    let hash = sha2::Sha256::digest(b"doc").to_vec();
    let body = |taid: &str| json!({"taid": taid, "hash_algorithm": "sha256", "hash": STANDARD.encode(&hash)});

    // A TAID presented by another service is unknown there.
    let demo_b = flow.daemon.client("demo-b");
    assert_eq!(
        problem_code(flow.create(&demo_b, body(&taid_a))),
        (404, "not_found".into())
    );
    // The TAID differs per service.
    assert_ne!(taid_a, flow.taid("u-ref-1", "demo-b"));
    // The wrong role.
    assert_eq!(
        problem_code(flow.create(&flow.registrar, body(&taid_a))),
        (403, "forbidden".into())
    );
    // Bad inputs.
    assert_eq!(
        problem_code(flow.create(
            &flow.demo_a,
            json!({"taid": taid_a, "hash_algorithm": "sha384", "hash": STANDARD.encode(&hash)})
        )),
        (400, "invalid_hash".into())
    );
    let (status, code) = problem_code(flow.create(
        &flow.demo_a,
        json!({"taid": taid_a, "hash_algorithm": "sha256", "hash": STANDARD.encode(&hash), "colour": "red"}),
    ));
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    let mut with_hkic = body(&taid_a);
    with_hkic["hkic_number"] = json!(hkic("B", "987654"));
    assert_eq!(
        problem_code(flow.create(&flow.demo_a, with_hkic)),
        (422, "hkic_mismatch".into())
    );
    let mut bad_hkic = body(&taid_a);
    bad_hkic["hkic_number"] = json!("A1234560");
    assert_eq!(
        problem_code(flow.create(&flow.demo_a, bad_hkic)),
        (422, "invalid_hkic".into())
    );
    let mut right_hkic = body(&taid_a);
    // The holder's number, written with its check digit in brackets.
    let holder = hkic_for("u-ref-1");
    let (number, check) = holder.split_at(holder.len() - 1);
    right_hkic["hkic_number"] = json!(format!("{number}({check})"));
    assert_eq!(flow.create(&flow.demo_a, right_hkic).status(), 201);

    // A reused authorisation.
    let request: Value = flow.create(&flow.demo_a, body(&taid_a)).json().unwrap();
    assert_eq!(
        flow.authorise(&request, &hash, "approve", &key).status(),
        200
    );
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &key)),
        (409, "request_not_pending".into())
    );
    // Another service may not read the result.
    let id = request["request_id"].as_str().unwrap();
    assert_eq!(
        problem_code(
            demo_b
                .get(flow.url(&format!("/v1/signing-requests/{id}")))
                .send()
                .unwrap()
        ),
        (403, "forbidden".into())
    );

    // Three bad authorisations lock the request.
    let request: Value = flow.create(&flow.demo_a, body(&taid_a)).json().unwrap();
    let stranger = device_key();
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &stranger)),
        (422, "authorisation_invalid".into())
    );
    // A statement over another hash is as bad as a wrong key.
    assert_eq!(
        problem_code(flow.authorise(&request, b"other", "approve", &key)),
        (422, "authorisation_invalid".into())
    );
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &stranger)),
        (429, "too_many_attempts".into())
    );
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &key)),
        (409, "request_not_pending".into())
    );

    // A reject decision ends the request.
    let request: Value = flow.create(&flow.demo_a, body(&taid_a)).json().unwrap();
    let rejected = flow.authorise(&request, &hash, "reject", &key);
    assert_eq!(rejected.json::<Value>().unwrap()["status"], "rejected");
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &key)),
        (409, "request_not_pending".into())
    );

    // The old device stops working after a device switch; the new one works.
    let request: Value = flow.create(&flow.demo_a, body(&taid_a)).json().unwrap();
    let new_device = device_key();
    let switched = flow
        .registrar
        .put(flow.url("/v1/accounts/u-ref-1/device"))
        .json(&json!({"device_public_key": device_pem(&new_device)}))
        .send()
        .unwrap();
    assert_eq!(switched.status(), 200);
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &key)),
        (422, "authorisation_invalid".into())
    );
    // A request made before the switch was made for the old device: the new one cannot approve
    // it either (its device generation is compared). A new request is the new device's.
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &new_device)),
        (422, "authorisation_invalid".into())
    );
    let request: Value = flow.create(&flow.demo_a, body(&taid_a)).json().unwrap();
    assert_eq!(
        flow.authorise(&request, &hash, "approve", &new_device)
            .status(),
        200
    );

    // Suspension stops signing; resuming allows it again.
    let suspended = flow
        .registrar
        .post(flow.url("/v1/accounts/u-ref-1/suspend"))
        .json(&json!({"by": "user", "reason": "lost phone"}))
        .send()
        .unwrap();
    assert_eq!(suspended.json::<Value>().unwrap()["status"], "suspended");
    assert_eq!(
        problem_code(flow.create(&flow.demo_a, body(&taid_a))),
        (409, "account_not_active".into())
    );
    assert_eq!(
        flow.registrar
            .post(flow.url("/v1/accounts/u-ref-1/resume"))
            .json(&json!({}))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(flow.create(&flow.demo_a, body(&taid_a)).status(), 201);

    // A revoked certificate is refused, and its key is gone.
    let revoked = flow
        .registrar
        .post(flow.url("/v1/accounts/u-ref-1/certificate/revoke"))
        .json(&json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    let account: Value = revoked.json().unwrap();
    assert_eq!(account["certificate"]["status"], "revoked");
    assert_eq!(
        account["certificate"]["revocation_reason"],
        "key_compromise"
    );
    assert_eq!(
        problem_code(flow.create(&flow.demo_a, body(&taid_a))),
        (409, "certificate_revoked".into())
    );

    // A plain account cannot sign.
    assert_eq!(
        flow.register("u-plain", "iam_smart", "1990-01-01", &key)
            .status(),
        201
    );
    let taid_plain = flow.taid("u-plain", "demo-a");
    assert_eq!(
        problem_code(flow.create(&flow.demo_a, body(&taid_plain))),
        (409, "not_iam_smart_plus".into())
    );

    // An "iAM Smart+" account whose store row lost its current certificate (a state the daemon
    // never writes, as after a bad restore) fails closed: no signing, no revocation, and the
    // denial is audited with its code.
    assert_eq!(
        flow.register("u-nocert", "iam_smart_plus", "1990-01-01", &key)
            .status(),
        201
    );
    let taid_nocert = flow.taid("u-nocert", "demo-a");
    let store =
        rusqlite::Connection::open(flow.daemon.state_dir().join("smartsign.sqlite")).unwrap();
    store
        .busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let changed = store
        .execute(
            "UPDATE accounts SET current_certificate = NULL WHERE id = 'u-nocert'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(store);
    assert_eq!(
        problem_code(flow.create(&flow.demo_a, body(&taid_nocert))),
        (409, "no_certificate".into())
    );
    let revoke = flow
        .registrar
        .post(flow.url("/v1/accounts/u-nocert/certificate/revoke"))
        .json(&json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    assert_eq!(problem_code(revoke), (409, "no_certificate".into()));
    let export = tempfile::tempdir().unwrap();
    let audit = smartsign_tests::flow::verify_audit(&flow.daemon, export.path());
    assert!(
        audit
            .lines()
            .any(|line| line.contains("\"signing.create_denied\"")
                && line.contains("\"no_certificate\"")),
        "the denial is audited"
    );
}

#[test]
fn requests_and_certificates_expire_on_the_daemon_clock() {
    let flow = Flow::start(&[]);
    let officer = flow.daemon.client("officer");
    let key = device_key();
    let account: Value = flow
        .register("u-exp-1", "iam_smart_plus", "1990-01-01", &key)
        .json()
        .unwrap();
    let taid = flow.taid("u-exp-1", "demo-a");
    let hash = sha2::Sha256::digest(b"doc").to_vec();
    let request: Value = flow
        .create(
            &flow.demo_a,
            json!({"taid": taid, "hash_algorithm": "sha256", "hash": STANDARD.encode(&hash)}),
        )
        .json()
        .unwrap();
    let set_clock = |now: &str| {
        let response = officer
            .post(flow.url("/v1/admin/clock"))
            .json(&json!({"now": now}))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    // Past the request's expiry (120 s): 410.
    let expires = time_plus(request["expires_at"].as_str().unwrap(), 1);
    set_clock(&expires);
    assert_eq!(
        problem_code(flow.authorise(&request, &hash, "approve", &key)),
        (410, "request_expired".into())
    );
    // Past the certificate's notAfter: certificate_expired.
    set_clock(&time_plus(
        account["certificate"]["not_after"].as_str().unwrap(),
        1,
    ));
    assert_eq!(
        problem_code(flow.create(
            &flow.demo_a,
            json!({"taid": taid, "hash_algorithm": "sha256", "hash": STANDARD.encode(&hash)})
        )),
        (409, "certificate_expired".into())
    );
}

/// `time` + `seconds`, for RFC 3339 UTC times with whole seconds, via `date`.
fn time_plus(time: &str, seconds: i64) -> String {
    let output = run(Command::new("date")
        .args(["-u", "-d"])
        .arg(format!("{time} + {seconds} seconds"))
        .arg("+%Y-%m-%dT%H:%M:%SZ"));
    assert!(output.status.success(), "{}", describe(&output));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}
