//! Registration, upgrade, renewal and re-application, driven directly over in-memory ports
//! (`support`): races with a slow CA, and crashes (a task that dies at a named step) followed by
//! start-up recovery. Invariant after each: every certificate the CA issued is either kept by
//! the store or revoked, no change to the account is lost.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use application::PersonalName;
use application::accounts::{self, Change};
use application::registration::{self, IssuanceSettings, NewAccount};
use application::renewal::{self, Consent, RenewalSettings};
use application::{AppError, Stranded};
use cert_lifecycle::{
    AccountId, AccountStatus, CertStatus, ConsentPurpose, HkicNumber, RevocationReason, Store,
    SuspendedBy, Tier,
};
use support::{Device, Memory};
use time::OffsetDateTime;
use time::macros::date;

const ROUNDS: usize = 50;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// The renewal window of the key changes: every certificate of these tests (a year) is in it.
const WINDOW: time::Duration = time::Duration::days(400);

/// The renewal window the sweeps tell users about: a month before a year's certificate ends.
const SWEEP_WINDOW: time::Duration = time::Duration::days(30);

fn issuance() -> IssuanceSettings {
    IssuanceSettings {
        certificate_validity: time::Duration::days(365),
    }
}

fn renewal_settings() -> RenewalSettings {
    RenewalSettings {
        issuance: issuance(),
        // Every certificate of these tests (a year) is inside the window.
        renewal_window: WINDOW,
        challenge_ttl: time::Duration::minutes(5),
    }
}

/// An HKIC number with a correct check digit, different for each `n` below 1,000,000.
fn hkic(n: u32) -> HkicNumber {
    let digits = format!("{n:06}");
    for check in "0123456789A".chars() {
        if let Ok(number) = HkicNumber::parse(&format!("A{digits}({check})")) {
            return number;
        }
    }
    unreachable!("one check digit fits")
}

fn new_account(id: &str, n: u32, tier: Tier, device: &Device) -> NewAccount {
    NewAccount {
        id: AccountId::parse(id).unwrap(),
        tier,
        name: PersonalName {
            surname: "CHAN".into(),
            given_name: Some("TAI MAN".into()),
        },
        date_of_birth: date!(1990 - 01 - 01),
        hkic: hkic(n),
        device_public_key: device.spki(),
        guardian: None,
    }
}

/// Every certificate valid at the CA (issued, confirmed, not revoked) is the store's.
fn no_orphan_certificate(ports: &Memory) {
    let issued = ports.ca.issued.lock().unwrap().clone();
    for serial in issued {
        let kept = ports
            .store
            .get_certificate(&cert_lifecycle::CertSerial::parse(&serial).unwrap())
            .unwrap()
            .is_some();
        assert!(
            kept || !ports.ca.valid(&serial),
            "certificate {serial} is valid at the CA and not kept"
        );
    }
    assert!(ports.store.issuances().unwrap().is_empty(), "journal ended");
}

/// Runs `work` as a process would, dying where `crash_at` says (a panic in its task).
async fn crashing<T: Send + 'static>(
    ports: &Arc<Memory>,
    step: &'static str,
    work: impl Future<Output = T> + Send + 'static,
) {
    *ports.audit.crash_at.lock().unwrap() = Some(step);
    let died = tokio::spawn(work).await.is_err();
    *ports.audit.crash_at.lock().unwrap() = None;
    assert!(died, "the task reached {step}");
}

#[tokio::test]
async fn registration_stores_the_account_with_its_certificate_and_ends_its_journal() {
    let ports = Memory::new();
    let device = Device::new(1);
    let record = registration::register(
        &ports,
        &issuance(),
        "registrar:reg",
        new_account("u-reg", 1, Tier::IamSmartPlus, &device),
        now(),
    )
    .await
    .unwrap();
    let serial = record.current_certificate.clone().unwrap();
    assert!(ports.ca.valid(serial.as_str()));
    assert!(ports.store.get_account(&record.id).unwrap().is_some());
    no_orphan_certificate(&ports);

    // The same person again, under another id: refused, nothing issued.
    let again = registration::register(
        &ports,
        &issuance(),
        "registrar:reg",
        new_account("u-reg-2", 1, Tier::IamSmartPlus, &device),
        now(),
    )
    .await;
    assert!(matches!(again, Err(AppError::HkicAlreadyRegistered)));
    assert_eq!(ports.ca.issued.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_ca_issued_is_undone_at_recovery() {
    for step in [
        "issuance-after-key",
        "issuance-after-record",
        "issuance-after-issue",
    ] {
        let ports = Arc::new(Memory::new());
        let work = {
            let ports = ports.clone();
            async move {
                let device = Device::new(2);
                let new = new_account("u-crash", 2, Tier::IamSmartPlus, &device);
                registration::register(&*ports, &issuance(), "registrar:reg", new, now()).await
            }
        };
        crashing(&ports, step, work).await;
        assert_eq!(ports.store.issuances().unwrap().len(), 1, "{step}");
        // Another node's recovery leaves an issuance that may still be running alone.
        let recent = Stranded::StartedBefore(now() - time::Duration::minutes(10));
        assert_eq!(registration::recover(&*ports, recent).await.unwrap(), 0);
        assert_eq!(ports.store.issuances().unwrap().len(), 1, "{step}");
        assert!(ports.keys.destroyed.lock().unwrap().is_empty(), "{step}");
        let undone = registration::recover(&*ports, Stranded::All).await.unwrap();
        assert_eq!(undone, 1, "{step}");
        let id = AccountId::parse("u-crash").unwrap();
        assert!(ports.store.get_account(&id).unwrap().is_none(), "{step}");
        no_orphan_certificate(&ports);
        assert_eq!(
            ports.keys.destroyed.lock().unwrap().len(),
            1,
            "{step}: key destroyed"
        );
        if step != "issuance-after-key" {
            // Recorded in the journal: revoked by recovery, whether confirmed or not.
            let issued = ports.ca.issued.lock().unwrap()[0].clone();
            assert_eq!(
                ports.ca.revoked.lock().unwrap().get(&issued),
                Some(&RevocationReason::CessationOfOperation),
                "{step}"
            );
        }
        // The registrar may try again: the id and the person are free.
        let device = Device::new(2);
        let new = new_account("u-crash", 2, Tier::IamSmartPlus, &device);
        registration::register(&*ports, &issuance(), "registrar:reg", new, now())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_store_kept_the_certificate_keeps_it() {
    let ports = Arc::new(Memory::new());
    let work = {
        let ports = ports.clone();
        async move {
            let device = Device::new(3);
            let new = new_account("u-kept", 3, Tier::IamSmartPlus, &device);
            registration::register(&*ports, &issuance(), "registrar:reg", new, now()).await
        }
    };
    crashing(&ports, "issuance-after-store", work).await;
    assert_eq!(
        registration::recover(&*ports, Stranded::All).await.unwrap(),
        0
    );
    let account = ports
        .store
        .get_account(&AccountId::parse("u-kept").unwrap())
        .unwrap()
        .unwrap();
    let serial = account.current_certificate.unwrap();
    assert!(ports.ca.valid(serial.as_str()), "kept, not revoked");
    no_orphan_certificate(&ports);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_upgrades_at_once_leave_one_certificate() {
    let ports = Arc::new(Memory::new());
    for round in 0..ROUNDS {
        let device = Device::new(4);
        let id = format!("u-up-{round}");
        let n = 1000 + u32::try_from(round).unwrap();
        registration::register(
            &*ports,
            &issuance(),
            "registrar:reg",
            new_account(&id, n, Tier::IamSmart, &device),
            now(),
        )
        .await
        .unwrap();
        let id = AccountId::parse(&id).unwrap();
        let upgrades: Vec<_> = (0..2)
            .map(|_| {
                let (ports, id) = (ports.clone(), id.clone());
                tokio::spawn(async move {
                    registration::upgrade(&*ports, &issuance(), "registrar:reg", &id, now()).await
                })
            })
            .collect();
        let mut upgraded = 0;
        for upgrade in upgrades {
            match upgrade.await.unwrap() {
                Ok(record) => {
                    upgraded += 1;
                    assert_eq!(record.tier, Tier::IamSmartPlus);
                }
                Err(AppError::Conflict | AppError::AlreadyIamSmartPlus) => {}
                Err(other) => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(upgraded, 1, "round {round}");
        let account = ports.store.get_account(&id).unwrap().unwrap();
        let valid: Vec<_> = ports
            .store
            .certificates_of(&id)
            .unwrap()
            .into_iter()
            .filter(|certificate| ports.ca.valid(certificate.serial.as_str()))
            .collect();
        assert_eq!(valid.len(), 1, "round {round}: one valid certificate");
        assert_eq!(account.current_certificate, Some(valid[0].serial.clone()));
        no_orphan_certificate(&ports);
    }
}

/// A renewal (with the device's consent) that holds its CA round trip until released.
async fn renewal_in_flight(
    ports: &Arc<Memory>,
    id: &AccountId,
    device: &Device,
) -> tokio::task::JoinHandle<Result<cert_lifecycle::AccountRecord, AppError>> {
    let challenge = renewal::challenge(
        &**ports,
        &renewal_settings(),
        "gateway:app",
        id,
        ConsentPurpose::Renew,
        now(),
    )
    .await
    .unwrap();
    let consent = Consent {
        device_signature: device.sign(&ConsentPurpose::Renew.statement(id, &challenge.nonce)),
        nonce: challenge.nonce,
    };
    ports.ca.slow_issue.store(true, Ordering::SeqCst);
    let task = {
        let (ports, id) = (ports.clone(), id.clone());
        tokio::spawn(async move {
            renewal::renew(
                &*ports,
                &renewal_settings(),
                "gateway:app",
                &id,
                &consent,
                now(),
            )
            .await
        })
    };
    ports.ca.issuing.notified().await;
    task
}

fn release(ports: &Memory) {
    ports.ca.slow_issue.store(false, Ordering::SeqCst);
    ports.ca.release_issue.notify_one();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_keeps_a_device_switch_made_while_the_ca_worked() {
    let ports = Arc::new(Memory::new());
    for round in 0..ROUNDS {
        let device = Device::new(5);
        let name = format!("u-renew-{round}");
        let record = support::account(&ports, &name, &device, now());
        let old = record.current_certificate.clone().unwrap();
        let renewing = renewal_in_flight(&ports, &record.id, &device).await;
        let new_device = Device::new(6);
        accounts::change(
            &*ports,
            "registrar:reg",
            &record.id,
            Change::SwitchDevice(new_device.spki()),
            now(),
        )
        .await
        .unwrap();
        release(&ports);
        let renewed = renewing.await.unwrap().unwrap();
        let stored = ports.store.get_account(&record.id).unwrap().unwrap();
        assert_eq!(stored.device_public_key, new_device.spki(), "round {round}");
        assert_eq!(stored.device_generation, 2, "round {round}");
        assert_eq!(stored.current_certificate, renewed.current_certificate);
        assert_ne!(stored.current_certificate, Some(old.clone()));
        assert_eq!(
            ports.ca.revoked.lock().unwrap().get(old.as_str()),
            Some(&RevocationReason::Superseded),
            "round {round}: the old certificate is superseded"
        );
        assert!(ports.store.key_changes().unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_does_not_undo_a_suspension_or_an_invalidation() {
    let ports = Arc::new(Memory::new());
    for round in 0..ROUNDS {
        let invalidate = round % 2 == 1;
        let device = Device::new(7);
        let name = format!("u-stop-{round}");
        let record = support::account(&ports, &name, &device, now());
        let old = record.current_certificate.clone().unwrap();
        let renewing = renewal_in_flight(&ports, &record.id, &device).await;
        if invalidate {
            accounts::invalidate(&*ports, "registrar:reg", &record.id, now())
                .await
                .unwrap();
        } else {
            let suspend = Change::Suspend(SuspendedBy::Government);
            accounts::change(&*ports, "registrar:reg", &record.id, suspend, now())
                .await
                .unwrap();
        }
        release(&ports);
        let outcome = renewing.await.unwrap();
        assert!(
            matches!(outcome, Err(AppError::AccountNotActive(_))),
            "round {round}: {outcome:?}"
        );
        let stored = ports.store.get_account(&record.id).unwrap().unwrap();
        let expected = if invalidate {
            AccountStatus::Invalidated
        } else {
            AccountStatus::Suspended
        };
        assert_eq!(stored.status, expected, "round {round}");
        assert_eq!(
            stored.current_certificate,
            Some(old.clone()),
            "round {round}"
        );
        // The renewal's certificate is revoked, its key destroyed.
        let issued = ports.ca.issued.lock().unwrap().last().cloned().unwrap();
        assert_ne!(issued, old.as_str());
        assert!(
            !ports.ca.valid(&issued),
            "round {round}: no orphan certificate"
        );
        assert!(ports.store.key_changes().unwrap().is_empty());
        let old_certificate = ports.store.get_certificate(&old).unwrap().unwrap();
        assert_eq!(
            old_certificate.status == CertStatus::Revoked,
            invalidate,
            "round {round}: only an invalidation revokes the old certificate"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_does_not_undo_a_suspension() {
    let ports = Arc::new(Memory::new());
    let device = Device::new(8);
    let record = registration::register(
        &*ports,
        &issuance(),
        "registrar:reg",
        new_account("u-up-stop", 9, Tier::IamSmart, &device),
        now(),
    )
    .await
    .unwrap();
    ports.ca.slow_issue.store(true, Ordering::SeqCst);
    let upgrading = {
        let (ports, id) = (ports.clone(), record.id.clone());
        tokio::spawn(async move {
            registration::upgrade(&*ports, &issuance(), "registrar:reg", &id, now()).await
        })
    };
    ports.ca.issuing.notified().await;
    let suspend = Change::Suspend(SuspendedBy::User);
    accounts::change(&*ports, "registrar:reg", &record.id, suspend, now())
        .await
        .unwrap();
    release(&ports);
    let outcome = upgrading.await.unwrap();
    assert!(
        matches!(outcome, Err(AppError::AccountNotActive("suspended"))),
        "{outcome:?}"
    );
    let stored = ports.store.get_account(&record.id).unwrap().unwrap();
    assert_eq!(stored.status, AccountStatus::Suspended);
    assert_eq!(stored.tier, Tier::IamSmart);
    no_orphan_certificate(&ports);
    assert_eq!(ports.keys.destroyed.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_finishing_inside_an_invalidation_leaves_no_valid_certificate() {
    let ports = Arc::new(Memory::new());
    for round in 0..ROUNDS {
        let device = Device::new(9);
        let record = support::account(&ports, &format!("u-inside-{round}"), &device, now());
        // A renewal waits for the CA to issue...
        let renewing = renewal_in_flight(&ports, &record.id, &device).await;
        // ...an invalidation revokes the old certificate and waits for the CA...
        ports.ca.hold_next_revoke.store(true, Ordering::SeqCst);
        let invalidating = {
            let (ports, id) = (ports.clone(), record.id.clone());
            tokio::spawn(
                async move { accounts::invalidate(&*ports, "registrar:reg", &id, now()).await },
            )
        };
        ports.ca.revoking.notified().await;
        // ...meanwhile the renewal makes its new certificate current...
        release(&ports);
        let renewed = renewing.await.unwrap();
        // ...and then the invalidation goes on.
        ports.ca.release_revoke.notify_one();
        invalidating.await.unwrap().unwrap();
        let stored = ports.store.get_account(&record.id).unwrap().unwrap();
        assert_eq!(stored.status, AccountStatus::Invalidated, "round {round}");
        let valid: Vec<_> = ports
            .store
            .certificates_of(&record.id)
            .unwrap()
            .into_iter()
            .filter(|certificate| ports.ca.valid(certificate.serial.as_str()))
            .map(|certificate| certificate.serial)
            .collect();
        assert!(
            valid.is_empty(),
            "round {round}: valid {valid:?} (renewal: {renewed:?})"
        );
        no_orphan_certificate(&ports);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_leaves_an_account_rectified_meanwhile_active() {
    let ports = Arc::new(Memory::new());
    let device = Device::new(10);
    let record = support::account(&ports, "u-rectify", &device, now());
    let long_ago = now() - time::Duration::days(30);
    let mismatch = Change::Matching(Some(long_ago));
    accounts::change(&*ports, "registrar:reg", &record.id, mismatch, now())
        .await
        .unwrap();
    // The sweep finds the deadline passed and waits for the CA's revocation...
    ports.ca.hold_next_revoke.store(true, Ordering::SeqCst);
    let sweeping = {
        let ports = ports.clone();
        tokio::spawn(async move {
            application::sweeps::run(&*ports, SWEEP_WINDOW, "system:sweep", now()).await
        })
    };
    ports.ca.revoking.notified().await;
    // ...while the registrar records a match.
    accounts::change(
        &*ports,
        "registrar:reg",
        &record.id,
        Change::Matching(None),
        now(),
    )
    .await
    .unwrap();
    ports.ca.release_revoke.notify_one();
    let changes = sweeping.await.unwrap().unwrap();
    assert!(changes.invalidated.is_empty(), "{changes:?}");
    let stored = ports.store.get_account(&record.id).unwrap().unwrap();
    assert_eq!(stored.status, AccountStatus::Active, "the match is kept");
    // A second sweep finds nothing due.
    let again = application::sweeps::run(&*ports, SWEEP_WINDOW, "system:sweep", now())
        .await
        .unwrap();
    assert!(again.invalidated.is_empty());
}

/// A date of birth whose 18th birthday is `days` after today (Hong Kong date), or the day after
/// when that would be a 29 February without its 18-years-earlier twin.
fn born_to_turn_18_in(days: i64) -> time::Date {
    let today = cert_lifecycle::hk_date(now());
    (days..days + 2)
        .find_map(|days| {
            let day = today + time::Duration::days(days);
            day.replace_year(day.year() - 18).ok()
        })
        .unwrap()
}

async fn register_minor(ports: &Memory, id: &str, n: u32, dob: time::Date, tier: Tier) {
    let mut new = new_account(id, n, tier, &Device::new(n as u8));
    new.date_of_birth = dob;
    new.guardian = Some((hkic(900_000 + n), date!(1970 - 01 - 01)));
    registration::register(ports, &issuance(), "registrar:reg", new, now())
        .await
        .unwrap();
}

/// Forgets `id`'s adult-day key, as an account registered before the store kept one.
fn without_adult_day_key(ports: &Memory, id: &str) {
    let id = AccountId::parse(id).unwrap();
    let mut account = ports.store.get_account(&id).unwrap().unwrap();
    account.adult_day_key = None;
    ports.store.update_account(&account, &[]).unwrap();
}

fn adult_day_key(ports: &Memory, id: &str) -> Option<[u8; 32]> {
    let id = AccountId::parse(id).unwrap();
    ports.store.get_account(&id).unwrap().unwrap().adult_day_key
}

#[tokio::test]
async fn the_sweep_finds_minors_turning_18_by_the_keyed_hash_of_their_day_and_unseals_nothing_else()
{
    let ports = Memory::new();
    let soon = born_to_turn_18_in(10);
    register_minor(&ports, "u-soon", 1, soon, Tier::IamSmartPlus).await;
    register_minor(&ports, "u-twin", 2, soon, Tier::IamSmartPlus).await;
    register_minor(&ports, "u-old", 3, soon, Tier::IamSmartPlus).await;
    register_minor(
        &ports,
        "u-later",
        4,
        born_to_turn_18_in(200),
        Tier::IamSmartPlus,
    )
    .await;
    let adult = new_account("u-adult", 5, Tier::IamSmartPlus, &Device::new(5));
    registration::register(&ports, &issuance(), "registrar:reg", adult, now())
        .await
        .unwrap();
    without_adult_day_key(&ports, "u-old");

    // The store keeps a keyed hash of the day, the same for the same day, none for an adult.
    let key = adult_day_key(&ports, "u-soon").unwrap();
    assert_eq!(adult_day_key(&ports, "u-twin"), Some(key));
    assert_ne!(adult_day_key(&ports, "u-later"), Some(key));
    assert_eq!(adult_day_key(&ports, "u-adult"), None);

    // The first run has no mark: it reads every current minor once, and keys the one without.
    let sweep = |at| application::sweeps::run(&ports, SWEEP_WINDOW, "system:sweep", at);
    let first = sweep(now()).await.unwrap();
    assert_eq!(first.count(), 0, "{first:?}");
    assert_eq!(adult_day_key(&ports, "u-old"), Some(key));

    // Then nothing is due until the day, and nothing is decrypted.
    let ends = cert_lifecycle::minor_certificate_ends(soon);
    for at in [
        now() + time::Duration::days(1),
        ends - time::Duration::seconds(1),
    ] {
        ports.keys.unsealed.lock().unwrap().clear();
        let changes = sweep(at).await.unwrap();
        assert_eq!(changes.count(), 0, "{changes:?}");
        assert_eq!(*ports.keys.unsealed.lock().unwrap(), [], "at {at}");
    }

    // On the day, exactly the three who turn 18 lose their certificate, and only their dates
    // of birth are read.
    ports.keys.unsealed.lock().unwrap().clear();
    let changes = sweep(ends).await.unwrap();
    let mut revoked: Vec<_> = changes
        .minors_revoked
        .iter()
        .map(|(id, _)| id.as_str().to_owned())
        .collect();
    revoked.sort();
    assert_eq!(revoked, ["u-old", "u-soon", "u-twin"]);
    let mut dates_read: Vec<_> = (ports.keys.unsealed.lock().unwrap().iter())
        .filter(|(purpose, _)| *purpose == "dob")
        .map(|(_, binding)| binding.clone())
        .collect();
    dates_read.sort();
    assert_eq!(dates_read, revoked);
    for id in ["u-later", "u-adult"] {
        let account = ports
            .store
            .account_with_certificate(&AccountId::parse(id).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(account.1.unwrap().status, CertStatus::Valid, "{id}");
    }
    // The next run finds nothing more.
    let again = sweep(ends + time::Duration::hours(1)).await.unwrap();
    assert_eq!(again.count(), 0, "{again:?}");
}

#[tokio::test]
async fn an_upgrade_to_a_minors_certificate_keys_an_account_registered_without_one() {
    let ports = Memory::new();
    let dob = born_to_turn_18_in(30);
    register_minor(&ports, "u-up", 1, dob, Tier::IamSmart).await;
    without_adult_day_key(&ports, "u-up");
    // The first run sets the mark; the account has no certificate yet, so it stays unkeyed.
    let sweep = |at| application::sweeps::run(&ports, SWEEP_WINDOW, "system:sweep", at);
    sweep(now()).await.unwrap();
    assert_eq!(adult_day_key(&ports, "u-up"), None);
    let id = AccountId::parse("u-up").unwrap();
    registration::upgrade(&ports, &issuance(), "registrar:reg", &id, now())
        .await
        .unwrap();
    assert!(adult_day_key(&ports, "u-up").is_some());
    let changes = sweep(cert_lifecycle::minor_certificate_ends(dob))
        .await
        .unwrap();
    assert_eq!(changes.minors_revoked.len(), 1, "{changes:?}");
}

#[tokio::test]
async fn a_clock_moved_back_past_the_mark_reads_every_minor_again() {
    let ports = Memory::new();
    let dob = born_to_turn_18_in(5);
    register_minor(&ports, "u-back", 1, dob, Tier::IamSmartPlus).await;
    let sweep = |at| application::sweeps::run(&ports, SWEEP_WINDOW, "system:sweep", at);
    // A run far ahead (a clock set forward) revokes it and moves the mark there...
    let ahead = sweep(now() + time::Duration::days(400)).await.unwrap();
    assert_eq!(ahead.minors_revoked.len(), 1);
    // ...a minor registered once the clock is back, turning 18 before that mark, is still found.
    let dob = born_to_turn_18_in(3);
    register_minor(&ports, "u-after", 2, dob, Tier::IamSmartPlus).await;
    sweep(now()).await.unwrap();
    let changes = sweep(cert_lifecycle::minor_certificate_ends(dob))
        .await
        .unwrap();
    assert_eq!(changes.minors_revoked.len(), 1, "{changes:?}");
}

/// The sweeps read a page at a time: more accounts due than one page holds are all handled in
/// one run.
#[tokio::test]
async fn a_sweep_handles_more_than_a_page_of_due_accounts() {
    let ports = Memory::new();
    let long_ago = now() - time::Duration::days(30);
    let due = 501;
    for i in 0..due {
        let record = support::account(&ports, &format!("u-page-{i}"), &Device::new(1), now());
        let mismatch = Change::Matching(Some(long_ago));
        accounts::change(&ports, "registrar:reg", &record.id, mismatch, now())
            .await
            .unwrap();
    }
    let changes = application::sweeps::run(&ports, SWEEP_WINDOW, "system:sweep", now())
        .await
        .unwrap();
    assert_eq!(changes.invalidated.len(), due);
    let again = application::sweeps::run(&ports, SWEEP_WINDOW, "system:sweep", now())
        .await
        .unwrap();
    assert_eq!(again.count(), 0, "{again:?}");
}

/// The user events of an account's changes, read as the store keeps them.
fn told(ports: &Memory) -> Vec<(String, &'static str)> {
    ports
        .store
        .events_after(0, 1000)
        .unwrap()
        .into_iter()
        .map(|stored| {
            (
                stored.event.account_id.as_str().to_owned(),
                stored.event.kind.as_str(),
            )
        })
        .collect()
}

/// Each change tells what it stored, once: a refused change tells nothing, two sweeps at once
/// tell a renewal window once, an invalidation tells its revocation (with the reason) and the
/// invalidation; an invalidation that lost its race to a match tells only the revocation it
/// made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_events_tell_what_was_stored_and_each_once() {
    let ports = Arc::new(Memory::new());
    let device = Device::new(20);
    let new = new_account("u-ev", 20, Tier::IamSmartPlus, &device);
    let record = registration::register(&*ports, &issuance(), "registrar:reg", new, now())
        .await
        .unwrap();
    let id = record.id.clone();
    let change = |change| accounts::change(&*ports, "registrar:reg", &id, change, now());
    change(Change::Suspend(SuspendedBy::User)).await.unwrap();
    assert!(change(Change::Suspend(SuspendedBy::User)).await.is_err());
    assert!(
        change(Change::Resume(SuspendedBy::Government))
            .await
            .is_err()
    );
    change(Change::Resume(SuspendedBy::User)).await.unwrap();
    change(Change::Matching(None)).await.unwrap();
    assert_eq!(
        told(&ports),
        [
            ("u-ev".to_owned(), "certificate.issued"),
            ("u-ev".to_owned(), "account.suspended"),
            ("u-ev".to_owned(), "account.resumed"),
        ]
    );

    // Ten days before the certificate ends, two sweeps at once: one tells the window.
    let at = now() + time::Duration::days(355);
    let sweeps: Vec<_> = (0..2)
        .map(|_| {
            let ports = ports.clone();
            tokio::spawn(async move {
                application::sweeps::run(&*ports, SWEEP_WINDOW, "system:sweep", at).await
            })
        })
        .collect();
    let mut opened = 0;
    for sweep in sweeps {
        opened += sweep.await.unwrap().unwrap().renewal_windows_opened.len();
    }
    assert_eq!(opened, 1);
    accounts::invalidate(&*ports, "registrar:reg", &id, at)
        .await
        .unwrap();
    let events = ports.store.events_after(0, 1000).unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.event.kind.as_str()).collect();
    assert_eq!(
        kinds[3..],
        [
            "certificate.renewal_window_open",
            "certificate.revoked",
            "account.invalidated"
        ]
    );
    assert_eq!(
        events[4].event.details.reason,
        Some(RevocationReason::PrivilegeWithdrawn)
    );

    // An invalidation by the sweep that loses its race to a match: the certificate it revoked
    // is told, the invalidation that was not stored is not.
    let other = support::account(&ports, "u-race", &Device::new(21), now());
    let long_ago = now() - time::Duration::days(30);
    accounts::change(
        &*ports,
        "registrar:reg",
        &other.id,
        Change::Matching(Some(long_ago)),
        now(),
    )
    .await
    .unwrap();
    ports.ca.hold_next_revoke.store(true, Ordering::SeqCst);
    let sweeping = {
        let ports = ports.clone();
        tokio::spawn(async move {
            application::sweeps::run(&*ports, SWEEP_WINDOW, "system:sweep", now()).await
        })
    };
    ports.ca.revoking.notified().await;
    accounts::change(
        &*ports,
        "registrar:reg",
        &other.id,
        Change::Matching(None),
        now(),
    )
    .await
    .unwrap();
    ports.ca.release_revoke.notify_one();
    assert!(sweeping.await.unwrap().unwrap().invalidated.is_empty());
    let race: Vec<_> = told(&ports)
        .into_iter()
        .filter(|(account, _)| account == "u-race")
        .map(|(_, kind)| kind)
        .collect();
    assert_eq!(
        race,
        ["account.rectification_pending", "certificate.revoked"]
    );
}
