//! The store's behaviour, one suite for every backend: each function takes a fresh, empty
//! store; `suite!` makes a test of each for a backend's test module.

use time::Duration;
use time::macros::datetime;

use super::{Store, TaidRecord};
use crate::certificate::tests::record as certificate;
use crate::signing::tests::{CREATED, request};
use crate::{
    AccountId, AccountRecord, AccountStatus, CertSerial, CertStatus, CertificateNotice,
    ConsentChallenge, ConsentPurpose, EventDetails, EventKind, KeyChangeJournal, RequestId,
    RevocationReason, ServiceName, SigningRequest, SigningStatus, StoreError, SuspendedBy, Tier,
    UserEvent,
};

/// A test of each function of the suite, each over a store from `$fresh`, an expression giving
/// `Option<(guard, store)>` (`None`: the backend is skipped here; the guard lives to the end).
macro_rules! suite {
    ($fresh:expr) => {
        $crate::store::conformance::suite!(@each $fresh;
            one_account_per_person_until_deregistered,
            an_approval_needs_the_account_active_and_on_the_same_device,
            account_round_trips_with_every_field,
            an_update_from_a_stale_copy_is_refused_and_changes_nothing,
            account_id_is_unique,
            updating_an_unknown_record_is_not_found,
            current_certificate_must_exist,
            deregistered_account_keeps_no_personal_data,
            certificate_round_trips_and_is_listed_by_account,
            certificate_needs_a_known_account_and_a_new_serial,
            account_with_certificate_reads_both,
            taid_is_made_once_per_service_and_account,
            taid_of_another_service_is_not_found,
            taid_collision_and_unknown_account_are_refused,
            a_service_lists_only_its_own_taids_in_pages,
            a_sad_is_redeemed_once_and_only_before_it_expires,
            signing_request_round_trips_through_its_states,
            a_batch_keeps_its_hashes_in_order_and_counts_once,
            signing_request_needs_known_account_and_certificate,
            signing_history_lists_finished_requests_newest_first_in_pages,
            pending_requests_leave_out_expired_finished_and_other_accounts,
            account_and_first_certificate_are_stored_together_or_not_at_all,
            attached_certificate_becomes_current_or_nothing_changes,
            an_account_has_a_bounded_number_of_pending_requests_with_distinct_codes,
            pending_count_and_health,
            consent_challenge_is_replaced_per_purpose_and_taken_once,
            key_change_journal_is_one_per_account_and_follows_its_steps,
            certificates_ending_lists_only_active_plus_accounts_with_valid_current_certificates,
            events_are_stored_with_their_change_and_read_in_order_in_pages,
            a_refused_change_stores_no_event,
            certificate_notices_are_told_once_each
        );
    };
    (@each $fresh:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let Some((_guard, store)) = $fresh else { return };
                $crate::store::conformance::$name(&store);
            }
        )*
    };
}
pub(super) use suite;

pub(super) fn id(s: &str) -> AccountId {
    AccountId::parse(s).unwrap()
}

pub(super) fn account(name: &str) -> AccountRecord {
    AccountRecord {
        id: id(name),
        tier: Tier::IamSmartPlus,
        status: AccountStatus::Active,
        status_changed_at: datetime!(2026-01-01 00:00 UTC),
        suspended_by: None,
        rectify_by: None,
        sealed_name: vec![1; 40],
        sealed_dob: vec![2; 30],
        // One person each: the HKIC hash is unique among accounts not deregistered.
        hkic_hash: hkic_hash_of(name),
        device_public_key: vec![4; 91],
        device_generation: 1,
        current_certificate: None,
        created_at: datetime!(2026-01-01 00:00 UTC),
        guardian_hkic_hash: None,
        adult_day_key: None,
        version: 0,
    }
}

/// One person per account name: the HKIC hash is unique among accounts not deregistered.
pub(super) fn hkic_hash_of(name: &str) -> [u8; 32] {
    let mut hash = [3u8; 32];
    for (slot, byte) in hash.iter_mut().zip(name.bytes()) {
        *slot = byte;
    }
    hash
}

/// An account with its current certificate, as registration leaves it.
pub(super) fn registered(store: &dyn Store, name: &str, serial: &str) -> AccountRecord {
    let mut a = account(name);
    store.insert_account(&a).unwrap();
    store
        .insert_certificate(&certificate(serial, name))
        .unwrap();
    a.current_certificate = Some(CertSerial::parse(serial).unwrap());
    store.update_account(&a, &[]).unwrap();
    a.version += 1;
    a
}

pub(super) fn taid(taid: &str, service: &str, account: &str) -> TaidRecord {
    TaidRecord {
        taid: taid.to_owned(),
        service: ServiceName::parse(service).unwrap(),
        account_id: id(account),
    }
}

pub(super) fn one_account_per_person_until_deregistered(store: &dyn Store) {
    let first = account("u-1");
    store.insert_account(&first).unwrap();
    let mut same_person = account("u-2");
    same_person.hkic_hash = first.hkic_hash;
    assert!(matches!(
        store.insert_account(&same_person),
        Err(StoreError::AlreadyExists)
    ));
    let mut gone = first.clone();
    gone.status = AccountStatus::Deregistered;
    store.update_account(&gone, &[]).unwrap();
    store.insert_account(&same_person).unwrap();
}

pub(super) fn an_approval_needs_the_account_active_and_on_the_same_device(store: &dyn Store) {
    let mut account = registered(store, "u-1", "3f9a");
    let approve = |r: &SigningRequest| {
        let mut approved = r.clone();
        approved.status = SigningStatus::Approved;
        store.transition_request(&approved, (SigningStatus::Pending, 0), CREATED)
    };
    let first = request(1, "u-1", "3f9a");
    store
        .insert_request(&first, usize::MAX, first.created_at)
        .unwrap();
    approve(&first).unwrap();
    // The same approval again (another thread, process or restart): refused.
    assert!(matches!(approve(&first), Err(StoreError::Conflict)));

    let second = request(2, "u-1", "3f9a");
    store
        .insert_request(&second, usize::MAX, second.created_at)
        .unwrap();
    account.status = AccountStatus::Suspended;
    store.update_account(&account, &[]).unwrap();
    account.version += 1;
    assert!(matches!(approve(&second), Err(StoreError::Conflict)));
    account.status = AccountStatus::Active;
    account.device_generation = 2;
    store.update_account(&account, &[]).unwrap();
    assert!(matches!(approve(&second), Err(StoreError::Conflict)));
    assert_eq!(
        store.get_request(&second.id).unwrap().unwrap().status,
        SigningStatus::Pending
    );
    assert_eq!(
        store.approved_requests().unwrap(),
        vec![{
            let mut approved = first.clone();
            approved.status = SigningStatus::Approved;
            approved
        }]
    );
}

pub(super) fn account_round_trips_with_every_field(store: &dyn Store) {
    let mut a = registered(store, "u-000123", "3f9a");
    a.status = AccountStatus::Suspended;
    a.suspended_by = Some(SuspendedBy::Government);
    a.rectify_by = Some(datetime!(2026-02-08 12:34:56 UTC));
    a.device_generation = 7;
    store.update_account(&a, &[]).unwrap();
    a.version += 1;
    assert_eq!(store.get_account(&a.id).unwrap(), Some(a.clone()));
    assert_eq!(store.get_account(&id("nobody")).unwrap(), None);
}

pub(super) fn an_update_from_a_stale_copy_is_refused_and_changes_nothing(store: &dyn Store) {
    let read = registered(store, "u-1", "3f9a");
    // Two changes made from the same read: the first wins...
    let mut suspended = read.clone();
    suspended.status = AccountStatus::Suspended;
    suspended.suspended_by = Some(SuspendedBy::User);
    store.update_account(&suspended, &[]).unwrap();
    // ...and the second, whose copy is stale, would have undone it.
    let mut switched = read.clone();
    switched.device_generation = 2;
    assert!(matches!(
        store.update_account(&switched, &[]),
        Err(StoreError::Conflict)
    ));
    let stored = store.get_account(&read.id).unwrap().unwrap();
    assert_eq!(stored.status, AccountStatus::Suspended);
    assert_eq!(stored.device_generation, 1);
    assert_eq!(stored.version, read.version + 1);
    // Re-read and applied on top, it goes through.
    let mut again = stored;
    again.device_generation = 2;
    store.update_account(&again, &[]).unwrap();
    let stored = store.get_account(&read.id).unwrap().unwrap();
    assert_eq!(
        (stored.status, stored.device_generation),
        (AccountStatus::Suspended, 2)
    );
}

pub(super) fn account_id_is_unique(store: &dyn Store) {
    store.insert_account(&account("u-1")).unwrap();
    assert!(matches!(
        store.insert_account(&account("u-1")),
        Err(StoreError::AlreadyExists)
    ));
}

pub(super) fn updating_an_unknown_record_is_not_found(store: &dyn Store) {
    assert!(matches!(
        store.update_account(&account("u-1"), &[]),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.mark_revoked(
            &CertSerial::parse("1").unwrap(),
            RevocationReason::Superseded,
            CREATED,
            &[]
        ),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.transition_request(
            &request(1, "u-1", "1"),
            (SigningStatus::Pending, 0),
            CREATED
        ),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.deregister(&account("u-1"), &[]),
        Err(StoreError::NotFound)
    ));
}

pub(super) fn current_certificate_must_exist(store: &dyn Store) {
    let mut a = account("u-1");
    a.current_certificate = Some(CertSerial::parse("abc").unwrap());
    assert!(matches!(
        store.insert_account(&a),
        Err(StoreError::Conflict)
    ));
}

pub(super) fn deregistered_account_keeps_no_personal_data(store: &dyn Store) {
    let mut a = account("u-1");
    a.sealed_name = b"SEALED-NAME-MARKER".to_vec();
    store.insert_account(&a).unwrap();
    let mut c = certificate("3f9a", "u-1");
    c.sealed_der = b"SEALED-CERT-MARKER".to_vec();
    store.insert_certificate(&c).unwrap();
    let mut r = request(1, "u-1", "3f9a");
    r.hash = b"HASH-OF-THE-DOCUMENT-MARKER-0123".to_vec();
    r.description = Some("DESCRIPTION-MARKER".to_owned());
    store.insert_request(&r, usize::MAX, r.created_at).unwrap();
    assert_eq!(
        store.accounts_with_hkic_hash(&hkic_hash_of("u-1")).unwrap(),
        vec![id("u-1")]
    );
    a.status = AccountStatus::Deregistered;
    store.deregister(&a, &[]).unwrap();
    let after = store.get_account(&a.id).unwrap().unwrap();
    assert!(after.personal_data_deleted());
    assert_eq!(after.status, AccountStatus::Deregistered);
    assert_eq!(after.device_public_key, a.device_public_key);
    assert!(
        store
            .accounts_with_hkic_hash(&hkic_hash_of("u-1"))
            .unwrap()
            .is_empty()
    );
    let request = store.get_request(&r.id).unwrap().unwrap();
    assert_eq!((request.hash.len(), request.description), (0, None));
    // A request still open ended with the account.
    assert_eq!(request.status, SigningStatus::Failed);
    // The certificate whose key is still there (its revocation has not reached the CA)
    // keeps its sealed DER until the key goes.
    let kept = store.get_certificate(&c.serial).unwrap().unwrap();
    assert_eq!(kept.sealed_der, c.sealed_der);
    store
        .forget_key(&c.serial, c.key_ref.as_deref().unwrap())
        .unwrap();
    let gone = store.get_certificate(&c.serial).unwrap().unwrap();
    assert!(gone.sealed_der.is_empty() && gone.key_ref.is_none());
}

pub(super) fn certificate_round_trips_and_is_listed_by_account(store: &dyn Store) {
    let a = registered(store, "u-1", "3f9a");
    let mut old = store
        .get_certificate(&CertSerial::parse("3f9a").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(old, certificate("3f9a", "u-1"));

    let revoked_at = datetime!(2027-06-01 08:00 UTC);
    assert!(
        store
            .mark_revoked(&old.serial, RevocationReason::Superseded, revoked_at, &[])
            .unwrap()
    );
    // A second revocation changes nothing: the first reason and time stand.
    assert!(
        !store
            .mark_revoked(&old.serial, RevocationReason::KeyCompromise, CREATED, &[])
            .unwrap()
    );
    // The key is forgotten only if it is still the one named.
    store.forget_key(&old.serial, b"another key").unwrap();
    assert!(
        store
            .get_certificate(&old.serial)
            .unwrap()
            .unwrap()
            .key_ref
            .is_some()
    );
    store
        .forget_key(&old.serial, old.key_ref.as_deref().unwrap())
        .unwrap();
    old.status = CertStatus::Revoked;
    old.revocation_reason = Some(RevocationReason::Superseded);
    old.revoked_at = Some(revoked_at);
    old.key_ref = None;
    let mut new = certificate("4000", "u-1");
    new.not_before = datetime!(2027-06-01 08:00 UTC);
    store.insert_certificate(&new).unwrap();

    assert_eq!(store.certificates_of(&a.id).unwrap(), vec![old, new]);
    assert!(store.certificates_of(&id("u-2")).unwrap().is_empty());
}

pub(super) fn certificate_needs_a_known_account_and_a_new_serial(store: &dyn Store) {
    assert!(matches!(
        store.insert_certificate(&certificate("1", "u-1")),
        Err(StoreError::Conflict)
    ));
    registered(store, "u-1", "1");
    assert!(matches!(
        store.insert_certificate(&certificate("1", "u-1")),
        Err(StoreError::AlreadyExists)
    ));
}

pub(super) fn account_with_certificate_reads_both(store: &dyn Store) {
    let a = registered(store, "u-1", "3f9a");
    let (got, cert) = store.account_with_certificate(&a.id).unwrap().unwrap();
    assert_eq!(got, a);
    assert_eq!(cert, Some(certificate("3f9a", "u-1")));
    store.insert_account(&account("plain")).unwrap();
    let (_, cert) = store
        .account_with_certificate(&id("plain"))
        .unwrap()
        .unwrap();
    assert_eq!(cert, None);
    assert!(
        store
            .account_with_certificate(&id("nobody"))
            .unwrap()
            .is_none()
    );
}

pub(super) fn taid_is_made_once_per_service_and_account(store: &dyn Store) {
    store.insert_account(&account("u-1")).unwrap();
    assert_eq!(
        store.put_taid(&taid("T1", "demo-a", "u-1")).unwrap(),
        taid("T1", "demo-a", "u-1")
    );
    // Asking again returns the stored TAID, whatever the caller computed.
    assert_eq!(
        store.put_taid(&taid("T9", "demo-a", "u-1")).unwrap(),
        taid("T1", "demo-a", "u-1")
    );
    assert_eq!(
        store.put_taid(&taid("T2", "demo-b", "u-1")).unwrap(),
        taid("T2", "demo-b", "u-1")
    );
}

pub(super) fn taid_of_another_service_is_not_found(store: &dyn Store) {
    store.insert_account(&account("u-1")).unwrap();
    store.put_taid(&taid("T1", "demo-a", "u-1")).unwrap();
    let demo_a = ServiceName::parse("demo-a").unwrap();
    let demo_b = ServiceName::parse("demo-b").unwrap();
    assert_eq!(store.find_taid(&demo_a, "T1").unwrap(), Some(id("u-1")));
    assert_eq!(store.find_taid(&demo_b, "T1").unwrap(), None);
    assert_eq!(store.find_taid(&demo_a, "T2").unwrap(), None);
}

pub(super) fn taid_collision_and_unknown_account_are_refused(store: &dyn Store) {
    store.insert_account(&account("u-1")).unwrap();
    store.insert_account(&account("u-2")).unwrap();
    store.put_taid(&taid("T1", "demo-a", "u-1")).unwrap();
    assert!(matches!(
        store.put_taid(&taid("T1", "demo-a", "u-2")),
        Err(StoreError::AlreadyExists)
    ));
    assert!(matches!(
        store.put_taid(&taid("T1", "demo-b", "u-2")),
        Err(StoreError::AlreadyExists)
    ));
    assert!(matches!(
        store.put_taid(&taid("T3", "demo-a", "u-9")),
        Err(StoreError::Conflict)
    ));
}

pub(super) fn a_service_lists_only_its_own_taids_in_pages(store: &dyn Store) {
    for (account, taid_a, taid_b) in [
        ("u-1", "Tb", "X1"),
        ("u-2", "Ta", "X2"),
        ("u-3", "Tc", "X3"),
    ] {
        store.insert_account(&self::account(account)).unwrap();
        store.put_taid(&taid(taid_a, "demo-a", account)).unwrap();
        store.put_taid(&taid(taid_b, "demo-b", account)).unwrap();
    }
    // A deregistered account's TAID is no credential: never listed, even inside a page.
    let gone = AccountRecord {
        status: AccountStatus::Deregistered,
        ..account("u-4")
    };
    store.insert_account(&gone).unwrap();
    store.put_taid(&taid("Tbb", "demo-a", "u-4")).unwrap();
    let demo_a = ServiceName::parse("demo-a").unwrap();
    assert_eq!(store.taids_of(&demo_a, None, 2).unwrap(), ["Ta", "Tb"]);
    assert_eq!(store.taids_of(&demo_a, Some("Tb"), 2).unwrap(), ["Tc"]);
    assert_eq!(
        store.taids_of(&demo_a, Some("Ta"), 10).unwrap(),
        ["Tb", "Tc"]
    );
    assert!(store.taids_of(&demo_a, Some("Tc"), 2).unwrap().is_empty());
    let other = ServiceName::parse("demo-c").unwrap();
    assert!(store.taids_of(&other, None, 10).unwrap().is_empty());
}

pub(super) fn a_sad_is_redeemed_once_and_only_before_it_expires(store: &dyn Store) {
    registered(store, "u-1", "3f9a");
    let r = request(1, "u-1", "3f9a");
    store.insert_request(&r, usize::MAX, r.created_at).unwrap();
    let sad = |byte: u8| crate::CscSad {
        sad_hash: [byte; 32],
        service: ServiceName::parse("demo-a").unwrap(),
        taid: "T1".into(),
        request_id: r.id.clone(),
        hashes_sha256: [7; 32],
        expires_at: CREATED + Duration::minutes(10),
        used_at: None,
    };
    store.insert_sad(&sad(1)).unwrap();
    store.insert_sad(&sad(2)).unwrap();
    assert_eq!(store.get_sad(&[1; 32]).unwrap(), Some(sad(1)));
    assert_eq!(store.get_sad(&[3; 32]).unwrap(), None);
    let now = CREATED + Duration::minutes(1);
    assert!(store.redeem_sad(&[1; 32], now).unwrap());
    assert!(!store.redeem_sad(&[1; 32], now).unwrap(), "a second use");
    assert_eq!(store.get_sad(&[1; 32]).unwrap().unwrap().used_at, Some(now));
    assert!(
        !store
            .redeem_sad(&[2; 32], CREATED + Duration::minutes(10))
            .unwrap(),
        "expired"
    );
    assert!(!store.redeem_sad(&[3; 32], now).unwrap(), "unknown");
}

pub(super) fn signing_request_round_trips_through_its_states(store: &dyn Store) {
    registered(store, "u-1", "3f9a");
    let mut r = request(1, "u-1", "3f9a");
    store.insert_request(&r, usize::MAX, r.created_at).unwrap();
    assert_eq!(store.get_request(&r.id).unwrap(), Some(r.clone()));
    assert!(matches!(
        store.insert_request(&r, usize::MAX, r.created_at),
        Err(StoreError::AlreadyExists)
    ));

    r.bad_attempts = 2;
    store
        .transition_request(&r, (SigningStatus::Pending, 0), CREATED)
        .unwrap();
    r.status = SigningStatus::Approved;
    store
        .transition_request(&r, (SigningStatus::Pending, 2), CREATED)
        .unwrap();
    r.mark_signed(vec![5; 600], CREATED + Duration::seconds(40));
    store
        .transition_request(&r, (SigningStatus::Approved, 2), CREATED)
        .unwrap();
    assert_eq!(store.get_request(&r.id).unwrap(), Some(r.clone()));
    // A copy read before any of that is stale: refused, and nothing changes.
    let mut stale = request(1, "u-1", "3f9a");
    stale.status = SigningStatus::Approved;
    assert!(matches!(
        store.transition_request(&stale, (SigningStatus::Pending, 0), CREATED),
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.get_request(&r.id).unwrap(), Some(r.clone()));

    let mut plain = request(2, "u-1", "3f9a");
    plain.description = None;
    plain.hash_algorithm = crate::HashAlgorithm::Sha512;
    plain.hash = vec![1; 64];
    store
        .insert_request(&plain, usize::MAX, plain.created_at)
        .unwrap();
    assert_eq!(store.get_request(&plain.id).unwrap(), Some(plain));
    assert_eq!(
        store.get_request(&RequestId::from_random([9; 16])).unwrap(),
        None
    );
}

pub(super) fn signing_request_needs_known_account_and_certificate(store: &dyn Store) {
    registered(store, "u-1", "3f9a");
    assert!(matches!(
        store.insert_request(&request(1, "u-9", "3f9a"), usize::MAX, CREATED),
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.insert_request(&request(1, "u-1", "ffff"), usize::MAX, CREATED),
        Err(StoreError::Conflict)
    ));
}

pub(super) fn signing_history_lists_finished_requests_newest_first_in_pages(store: &dyn Store) {
    registered(store, "u-1", "1");
    registered(store, "u-2", "2");
    let at = |s: i64| CREATED + Duration::seconds(s);
    // Signed at 10 s, rejected at 20 s, a pending one that expires at 30 s, one still
    // pending, and another account's.
    let mut signed = request(1, "u-1", "1");
    let mut rejected = request(2, "u-1", "1");
    let mut lapsed = request(3, "u-1", "1");
    lapsed.expires_at = at(30);
    let open = request(4, "u-1", "1");
    let mut other = request(5, "u-2", "2");
    for r in [&signed, &rejected, &lapsed, &open, &other] {
        store.insert_request(r, usize::MAX, r.created_at).unwrap();
    }
    signed.mark_signed(vec![1; 40], at(10));
    store
        .transition_request(&signed, (SigningStatus::Pending, 0), at(10))
        .unwrap();
    rejected.status = SigningStatus::Rejected;
    store
        .transition_request(&rejected, (SigningStatus::Pending, 0), at(20))
        .unwrap();
    other.status = SigningStatus::Rejected;
    store
        .transition_request(&other, (SigningStatus::Pending, 0), at(25))
        .unwrap();

    let u1 = id("u-1");
    let now = at(40);
    let all = store.signing_history(&u1, now, None, 10).unwrap();
    let ids: Vec<_> = all.iter().map(|(r, f)| (r.id.clone(), *f)).collect();
    assert_eq!(
        ids,
        vec![
            (lapsed.id.clone(), at(30)),
            (rejected.id.clone(), at(20)),
            (signed.id.clone(), at(10)),
        ]
    );
    // Two pages of two and one.
    let page = store.signing_history(&u1, now, None, 2).unwrap();
    assert_eq!(page.len(), 2);
    let (last, finished) = page.last().unwrap();
    let rest = store
        .signing_history(&u1, now, Some((*finished, last.id.clone())), 2)
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].0.id, signed.id);
}

pub(super) fn pending_requests_leave_out_expired_finished_and_other_accounts(store: &dyn Store) {
    registered(store, "u-1", "1");
    registered(store, "u-2", "2");
    let first = request(1, "u-1", "1");
    let mut second = request(2, "u-1", "1");
    second.created_at = CREATED + Duration::seconds(10);
    second.expires_at = CREATED + Duration::seconds(60);
    let mut signed = request(3, "u-1", "1");
    signed.status = SigningStatus::Signed;
    let other = request(4, "u-2", "2");
    for r in [&first, &second, &signed, &other] {
        store.insert_request(r, usize::MAX, r.created_at).unwrap();
    }
    let u1 = id("u-1");
    assert_eq!(
        store
            .pending_requests(&u1, CREATED + Duration::seconds(5))
            .unwrap(),
        vec![first.clone(), second.clone()]
    );
    // At its expiry instant a request no longer counts as pending.
    assert_eq!(
        store.pending_requests(&u1, second.expires_at).unwrap(),
        vec![first.clone()]
    );
    assert!(
        store
            .pending_requests(&u1, first.expires_at)
            .unwrap()
            .is_empty()
    );
}

pub(super) fn account_and_first_certificate_are_stored_together_or_not_at_all(store: &dyn Store) {
    let mut a = account("u-1");
    a.current_certificate = Some(CertSerial::parse("3f9a").unwrap());
    store
        .insert_account_with_certificate(&a, &certificate("3f9a", "u-1"), &[])
        .unwrap();
    let (got, cert) = store.account_with_certificate(&a.id).unwrap().unwrap();
    assert_eq!(got, a);
    assert_eq!(cert, Some(certificate("3f9a", "u-1")));

    // A taken serial rolls the new account back.
    let mut b = account("u-2");
    b.current_certificate = Some(CertSerial::parse("3f9a").unwrap());
    assert!(matches!(
        store.insert_account_with_certificate(&b, &certificate("3f9a", "u-2"), &[]),
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.get_account(&b.id).unwrap(), None);

    // An account pointing at a certificate that is not the one stored beside it.
    let mut c = account("u-3");
    c.current_certificate = Some(CertSerial::parse("ffff").unwrap());
    assert!(
        store
            .insert_account_with_certificate(&c, &certificate("3000", "u-3"), &[])
            .is_err()
    );
    assert_eq!(store.get_account(&c.id).unwrap(), None);
    assert_eq!(
        store
            .get_certificate(&CertSerial::parse("3000").unwrap())
            .unwrap(),
        None
    );
    // The failed commit left no transaction open on the writer.
    store.insert_account(&account("u-4")).unwrap();
}

pub(super) fn attached_certificate_becomes_current_or_nothing_changes(store: &dyn Store) {
    let mut a = account("u-1");
    store.insert_account(&a).unwrap();
    a.tier = Tier::IamSmartPlus;
    a.current_certificate = Some(CertSerial::parse("4000").unwrap());
    store
        .attach_certificate(&a, &certificate("4000", "u-1"), &[])
        .unwrap();
    a.version += 1;
    let (got, cert) = store.account_with_certificate(&a.id).unwrap().unwrap();
    assert_eq!(got, a);
    assert_eq!(cert.map(|c| c.serial), a.current_certificate);

    // An unknown account: the certificate is not kept either.
    let mut ghost = account("u-9");
    ghost.current_certificate = Some(CertSerial::parse("5000").unwrap());
    assert!(
        store
            .attach_certificate(&ghost, &certificate("5000", "u-9"), &[])
            .is_err()
    );
    assert_eq!(
        store
            .get_certificate(&CertSerial::parse("5000").unwrap())
            .unwrap(),
        None
    );
}

/// A batch is one request: its hashes come back in their order through every transition, it
/// takes one place among the account's pending requests, and deregistration erases them.
pub(super) fn a_batch_keeps_its_hashes_in_order_and_counts_once(store: &dyn Store) {
    registered(store, "u-1", "3f9a");
    let mut batch = request(1, "u-1", "3f9a");
    batch.hash_algorithm = crate::HashAlgorithm::Sha384;
    batch.hash = Vec::new();
    batch.hashes = Some((1..=20u8).rev().map(|n| vec![n; 48]).collect());
    let now = CREATED + Duration::seconds(1);
    store.insert_request(&batch, 2, now).unwrap();
    assert_eq!(store.get_request(&batch.id).unwrap(), Some(batch.clone()));
    assert_eq!(
        store.pending_requests(&id("u-1"), now).unwrap(),
        [batch.clone()]
    );
    // One place of two: one more request fits, a third does not.
    store
        .insert_request(&request(2, "u-1", "3f9a"), 2, now)
        .unwrap();
    assert!(matches!(
        store.insert_request(&request(3, "u-1", "3f9a"), 2, now),
        Err(StoreError::Conflict)
    ));
    batch.status = SigningStatus::Approved;
    store
        .transition_request(&batch, (SigningStatus::Pending, 0), now)
        .unwrap();
    assert_eq!(store.approved_requests().unwrap(), [batch.clone()]);
    batch.mark_signed(vec![5; 900], now);
    store
        .transition_request(&batch, (SigningStatus::Approved, 0), now)
        .unwrap();
    let history = store.signing_history(&id("u-1"), now, None, 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].0, batch);

    let mut a = store.get_account(&id("u-1")).unwrap().unwrap();
    a.status = AccountStatus::Deregistered;
    store.deregister(&a, &[]).unwrap();
    let erased = store.get_request(&batch.id).unwrap().unwrap();
    assert_eq!(erased.hashes, Some(Vec::new()));
    assert!(erased.is_batch() && erased.sealed_result.is_none());
    let single = store
        .get_request(&request(2, "u-1", "3f9a").id)
        .unwrap()
        .unwrap();
    assert_eq!((single.hashes, single.hash.len()), (None, 0));
}

pub(super) fn an_account_has_a_bounded_number_of_pending_requests_with_distinct_codes(
    store: &dyn Store,
) {
    registered(store, "u-1", "3f9a");
    let now = CREATED + Duration::seconds(1);
    store
        .insert_request(&request(1, "u-1", "3f9a"), 2, now)
        .unwrap();
    // The same code as a pending request of the account: refused.
    let mut same_code = request(2, "u-1", "3f9a");
    same_code.identification_code = request(1, "u-1", "3f9a").identification_code;
    assert!(matches!(
        store.insert_request(&same_code, 2, now),
        Err(StoreError::Conflict)
    ));
    store
        .insert_request(&request(3, "u-1", "3f9a"), 2, now)
        .unwrap();
    // Two pending: the limit.
    assert!(matches!(
        store.insert_request(&request(4, "u-1", "3f9a"), 2, now),
        Err(StoreError::Conflict)
    ));
    // Once they have expired they no longer count, nor do their codes.
    let later = CREATED + Duration::seconds(121);
    store
        .insert_request(&request(4, "u-1", "3f9a"), 2, later)
        .unwrap();
    same_code.id = RequestId::from_random([9; 16]);
    store.insert_request(&same_code, 2, later).unwrap();
}

pub(super) fn pending_count_and_health(store: &dyn Store) {
    store.health().unwrap();
    registered(store, "u-1", "1");
    registered(store, "u-2", "2");
    let mut signed = request(3, "u-1", "1");
    signed.status = SigningStatus::Signed;
    for r in [&request(1, "u-1", "1"), &request(2, "u-2", "2"), &signed] {
        store.insert_request(r, usize::MAX, r.created_at).unwrap();
    }
    assert_eq!(store.count_pending(CREATED).unwrap(), 2);
    assert_eq!(
        store
            .count_pending(CREATED + Duration::seconds(120))
            .unwrap(),
        0
    );
}

pub(super) fn consent_challenge_is_replaced_per_purpose_and_taken_once(store: &dyn Store) {
    registered(store, "u-1", "a1");
    let challenge = |purpose, nonce: &str| ConsentChallenge {
        account_id: id("u-1"),
        purpose,
        nonce: nonce.to_owned(),
        expires_at: datetime!(2027-01-01 00:00 UTC),
    };
    store
        .put_consent_challenge(&challenge(ConsentPurpose::Renew, "n1"))
        .unwrap();
    store
        .put_consent_challenge(&challenge(ConsentPurpose::Renew, "n2"))
        .unwrap();
    store
        .put_consent_challenge(&challenge(ConsentPurpose::Reapply, "n3"))
        .unwrap();
    assert_eq!(
        store.take_consent_challenge(&id("u-1"), "n1").unwrap(),
        None
    );
    assert_eq!(
        store.take_consent_challenge(&id("u-1"), "n2").unwrap(),
        Some(challenge(ConsentPurpose::Renew, "n2"))
    );
    assert_eq!(
        store.take_consent_challenge(&id("u-1"), "n2").unwrap(),
        None
    );
    assert_eq!(
        store.take_consent_challenge(&id("u-2"), "n3").unwrap(),
        None
    );
    assert!(
        store
            .take_consent_challenge(&id("u-1"), "n3")
            .unwrap()
            .is_some()
    );
}

pub(super) fn key_change_journal_is_one_per_account_and_follows_its_steps(store: &dyn Store) {
    registered(store, "u-1", "a1");
    let mut journal = KeyChangeJournal {
        account_id: id("u-1"),
        purpose: ConsentPurpose::Renew,
        old_serial: Some(CertSerial::parse("a1").unwrap()),
        new_key_ref: None,
        new_serial: None,
        new_sealed_der: None,
        started_at: datetime!(2027-01-01 00:00 UTC),
    };
    store.insert_key_change(&journal).unwrap();
    assert!(matches!(
        store.insert_key_change(&journal),
        Err(StoreError::AlreadyExists)
    ));
    journal.new_key_ref = Some(vec![7; 8]);
    journal.new_serial = Some(CertSerial::parse("b1").unwrap());
    journal.new_sealed_der = Some(vec![1, 2]);
    store.update_key_change(&journal).unwrap();
    assert_eq!(store.key_changes().unwrap(), vec![journal.clone()]);
    store.delete_key_change(&id("u-1")).unwrap();
    assert!(store.key_changes().unwrap().is_empty());
    assert!(matches!(
        store.update_key_change(&journal),
        Err(StoreError::NotFound)
    ));
}

pub(super) fn certificates_ending_lists_only_active_plus_accounts_with_valid_current_certificates(
    store: &dyn Store,
) {
    let ends = certificate("a1", "u-1").not_after;
    registered(store, "u-1", "a1");
    let mut revoked = registered(store, "u-2", "b1");
    let c = store
        .get_certificate(&CertSerial::parse("b1").unwrap())
        .unwrap()
        .unwrap();
    store
        .mark_revoked(&c.serial, RevocationReason::KeyCompromise, CREATED, &[])
        .unwrap();
    revoked.status = AccountStatus::Active;
    let mut suspended = registered(store, "u-3", "c1");
    suspended.status = AccountStatus::Suspended;
    store.update_account(&suspended, &[]).unwrap();
    suspended.version += 1;
    let found = store
        .current_certificates_ending(ends - Duration::days(60), ends)
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, id("u-1"));
    assert!(
        store
            .current_certificates_ending(ends, ends + Duration::days(60))
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .current_certificates_ending(ends - Duration::days(60), ends - Duration::SECOND)
            .unwrap()
            .is_empty()
    );
}

/// An event about `account` at the suite's creation time.
pub(super) fn event(kind: EventKind, account: &str) -> UserEvent {
    UserEvent::new(kind, id(account), CREATED)
}

/// Every event in the store, from the first, read `page` at a time: (position, event).
pub(super) fn all_events(store: &dyn Store, page: usize) -> Vec<(i64, UserEvent)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let got = store.events_after(after, page).unwrap();
        assert!(got.len() <= page);
        let Some(last) = got.last() else {
            return out;
        };
        after = last.position;
        out.extend(
            got.into_iter()
                .map(|stored| (stored.position, stored.event)),
        );
    }
}

pub(super) fn events_are_stored_with_their_change_and_read_in_order_in_pages(store: &dyn Store) {
    assert!(store.events_after(0, 10).unwrap().is_empty());
    let serial = CertSerial::parse("3f9a").unwrap();
    let cert = certificate("3f9a", "u-1");
    let mut a = account("u-1");
    a.current_certificate = Some(serial.clone());
    let issued = event(EventKind::CertificateIssued, "u-1").with(EventDetails {
        serial: Some(serial.clone()),
        not_after: Some(cert.not_after),
        ..EventDetails::default()
    });
    store
        .insert_account_with_certificate(&a, &cert, std::slice::from_ref(&issued))
        .unwrap();

    a.status = AccountStatus::Suspended;
    a.suspended_by = Some(SuspendedBy::Government);
    let suspended = event(EventKind::AccountSuspended, "u-1").with(EventDetails {
        by: Some(SuspendedBy::Government),
        ..EventDetails::default()
    });
    store
        .update_account_audited(
            &a,
            "account.suspended",
            "registrar:r",
            "{}",
            std::slice::from_ref(&suspended),
        )
        .unwrap();
    a.version += 1;

    let revoked = event(EventKind::CertificateRevoked, "u-1").with(EventDetails {
        serial: Some(serial.clone()),
        reason: Some(RevocationReason::CessationOfOperation),
        ..EventDetails::default()
    });
    let turned = event(EventKind::AccountTurned18, "u-1").with(EventDetails {
        serial: Some(serial.clone()),
        ..EventDetails::default()
    });
    assert!(
        store
            .mark_revoked(
                &serial,
                RevocationReason::CessationOfOperation,
                CREATED,
                &[revoked.clone(), turned.clone(),]
            )
            .unwrap()
    );

    a.status = AccountStatus::Deregistered;
    let deregistered = event(EventKind::AccountDeregistered, "u-1");
    store
        .deregister(&a, std::slice::from_ref(&deregistered))
        .unwrap();

    // In the order of their changes, each with every detail, whatever the page size; still
    // there after the account's personal data is gone.
    let expected = vec![issued, suspended, revoked, turned, deregistered];
    for page in [1, 2, 3, 100] {
        let got = all_events(store, page);
        assert_eq!(
            got.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            expected
        );
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(got[0].0 > 0);
    }
    let last = all_events(store, 100).last().unwrap().0;
    assert!(store.events_after(last, 10).unwrap().is_empty());
    assert!(store.events_after(last + 1000, 10).unwrap().is_empty());
}

pub(super) fn a_refused_change_stores_no_event(store: &dyn Store) {
    let a = registered(store, "u-1", "3f9a");
    let any = || vec![event(EventKind::AccountSuspended, "u-1")];
    // From a stale copy: Conflict, nothing stored.
    let mut stale = a.clone();
    stale.version = 0;
    stale.status = AccountStatus::Suspended;
    assert!(matches!(
        store.update_account(&stale, &any()),
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.update_account_audited(&stale, "account.suspended", "x", "{}", &any()),
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.deregister(&stale, &any()),
        Err(StoreError::Conflict)
    ));
    assert!(
        store
            .attach_certificate(&stale, &certificate("4000", "u-1"), &any())
            .is_err()
    );
    // A second registration of the same id.
    assert!(
        store
            .insert_account_with_certificate(&a, &certificate("5000", "u-1"), &any())
            .is_err()
    );
    // An unknown account or certificate.
    assert!(matches!(
        store.update_account(&account("u-9"), &any()),
        Err(StoreError::NotFound)
    ));
    let ghost = CertSerial::parse("ffff").unwrap();
    assert!(matches!(
        store.mark_revoked(&ghost, RevocationReason::KeyCompromise, CREATED, &any()),
        Err(StoreError::NotFound)
    ));
    assert!(store.events_after(0, 100).unwrap().is_empty());

    // A revocation stores its events once: a repeated one changes nothing.
    let serial = CertSerial::parse("3f9a").unwrap();
    let revoked = || vec![event(EventKind::CertificateRevoked, "u-1")];
    assert!(
        store
            .mark_revoked(
                &serial,
                RevocationReason::KeyCompromise,
                CREATED,
                &revoked()
            )
            .unwrap()
    );
    assert!(
        !store
            .mark_revoked(&serial, RevocationReason::Superseded, CREATED, &revoked())
            .unwrap()
    );
    assert_eq!(all_events(store, 100).len(), 1);
}

pub(super) fn certificate_notices_are_told_once_each(store: &dyn Store) {
    let window = CertificateNotice::RenewalWindowOpen;
    let expired = CertificateNotice::Expired;
    // Three certificates of one account ending on three days; the last one revoked.
    store.insert_account(&account("u-1")).unwrap();
    let ends = |serial: &str, day: i64| {
        let mut c = certificate(serial, "u-1");
        c.not_after = datetime!(2029-01-01 00:00 UTC) + Duration::days(day);
        store.insert_certificate(&c).unwrap();
        c.serial
    };
    let (first, second, revoked) = (ends("2000", 0), ends("3000", 10), ends("4000", 20));
    store
        .mark_revoked(&revoked, RevocationReason::KeyCompromise, CREATED, &[])
        .unwrap();
    let serials = |notice, until: time::OffsetDateTime| -> Vec<String> {
        store
            .certificates_to_notify(notice, until, 100)
            .unwrap()
            .into_iter()
            .map(|c| c.serial.as_str().to_owned())
            .collect()
    };
    let at = |day: i64| datetime!(2029-01-01 00:00 UTC) + Duration::days(day);
    assert!(serials(window, at(-1)).is_empty());
    assert_eq!(serials(window, at(15)), ["2000", "3000"]);
    assert_eq!(
        store
            .certificates_to_notify(window, at(15), 1)
            .unwrap()
            .len(),
        1
    );

    let told = |serial: &CertSerial, notice| {
        store
            .record_notice(
                serial,
                notice,
                &[event(EventKind::CertificateRenewalWindowOpen, "u-1")],
            )
            .unwrap()
    };
    // Told once: a second (a racing sweep) changes nothing and stores no event.
    assert!(told(&first, window));
    assert!(!told(&first, window));
    assert_eq!(serials(window, at(15)), ["3000"]);
    // Expiry comes after the window: still to be told.
    assert_eq!(serials(expired, at(15)), ["2000", "3000"]);
    assert!(told(&first, expired));
    assert!(!told(&first, expired));
    assert!(!told(&first, window));
    // Expired without its window told: the window is moot then.
    assert!(told(&second, expired));
    assert!(serials(window, at(100)).is_empty());
    assert!(serials(expired, at(100)).is_empty());
    // A revoked certificate is told nothing.
    assert!(!told(&revoked, window));
    assert!(!told(&revoked, expired));
    assert_eq!(all_events(store, 100).len(), 3);
}
