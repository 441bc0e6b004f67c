//! `GET /v1/events` on a `--dev` daemon (real TLS, SoftHSM): each of API.md's eleven lifecycle
//! events is driven through the API (registration, suspension, matching, the sweeps with the
//! clock moved, renewal and re-application with the device's consent, invalidation,
//! deregistration) and read from the feed with its cursor, across a daemon restart, missing
//! none and repeating none; the feed holds no personal data; roles and bad input are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use p256::ecdsa::SigningKey;
use serde_json::{Value, json};
use smartsign_tests::DevDaemon;
use smartsign_tests::flow::{consent, hkic_for, problem, registration};

/// The guardian of the minor (their HKIC number must never show).
const GUARDIAN_HKIC: &str = "A1234563";

struct Feed {
    daemon: DevDaemon,
}

impl Feed {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.daemon.api)
    }

    fn set_clock(&self, now: &str) {
        let response = self.post("officer", "/v1/admin/clock", json!({"now": now}));
        assert_eq!(response.status(), 200, "{}", response.text().unwrap());
    }

    fn sweep(&self) -> Value {
        let response = self
            .daemon
            .client("officer")
            .post(self.url("/v1/admin/sweep"))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().unwrap()
    }

    fn post(&self, who: &str, path: &str, body: Value) -> reqwest::blocking::Response {
        self.daemon
            .client(who)
            .post(self.url(path))
            .json(&body)
            .send()
            .unwrap()
    }

    fn ok(&self, who: &str, path: &str, body: Value) -> Value {
        let response = self.post(who, path, body);
        let status = response.status().as_u16();
        let body: Value = response.json().unwrap();
        assert!(status == 200 || status == 201, "{path}: {status} {body}");
        body
    }

    fn register(&self, id: &str, dob: &str, key: &SigningKey) -> Value {
        let mut body = registration(id, dob, key);
        if dob > "2008" {
            body["guardian"] = json!({"hkic_number": GUARDIAN_HKIC, "date_of_birth": "1980-01-01"});
        }
        self.ok("registrar", "/v1/accounts", body)
    }

    /// Renewal or re-application with the device's consent.
    fn key_change(&self, id: &str, purpose: &str, route: &str, key: &SigningKey) -> Value {
        let consent = consent(&self.daemon, id, purpose, key).expect("a consent challenge");
        self.ok(
            "gateway",
            &format!("/v1/accounts/{id}/certificate/{route}"),
            consent,
        )
    }

    /// One page of the feed as `who` reads it: the raw answer.
    fn page(&self, who: &str, query: &str) -> reqwest::blocking::Response {
        self.daemon
            .client(who)
            .get(self.url(&format!("/v1/events{query}")))
            .send()
            .unwrap()
    }

    /// Every event after `cursor` (`None`: from the beginning), read `limit` at a time; the
    /// cursor to go on from.
    fn read_from(&self, cursor: Option<&str>, limit: usize) -> (Vec<Value>, String) {
        let mut events = Vec::new();
        let mut cursor = cursor.map(str::to_owned);
        loop {
            let query = match &cursor {
                Some(after) => format!("?after={after}&limit={limit}"),
                None => format!("?limit={limit}"),
            };
            let response = self.page("gateway", &query);
            assert_eq!(response.status(), 200);
            let body: Value = response.json().unwrap();
            let page = body["events"].as_array().unwrap().clone();
            let next = body["next"]
                .as_str()
                .expect("next is always a cursor")
                .to_owned();
            assert!(page.len() <= limit);
            if page.is_empty() {
                // No new events: the same position, to poll again with.
                if let Some(cursor) = &cursor {
                    assert_eq!(&next, cursor);
                }
                return (events, next);
            }
            assert_eq!(page.last().unwrap()["cursor"].as_str().unwrap(), next);
            events.extend(page);
            cursor = Some(next);
        }
    }
}

/// `(account_id, event)` of each event.
fn names(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["account_id"].as_str().unwrap().to_owned(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, e)| ((*a).to_owned(), (*e).to_owned()))
        .collect()
}

/// The event `event` of `account` among `events`, the only one.
fn the<'a>(events: &'a [Value], account: &str, event: &str) -> &'a Value {
    let found: Vec<_> = events
        .iter()
        .filter(|e| e["account_id"] == account && e["event"] == event)
        .collect();
    assert_eq!(found.len(), 1, "{account} {event} in {events:?}");
    found[0]
}

/// Every lifecycle event through the API, read from the feed across a restart.
#[test]
fn each_lifecycle_event_reaches_the_feed_in_order_across_a_restart() {
    let mut feed = Feed {
        daemon: DevDaemon::start(&[]),
    };
    let (key_a, key_b, key_m) = (
        smartsign_tests::device_key(),
        smartsign_tests::device_key(),
        smartsign_tests::device_key(),
    );

    // Nothing yet: an empty page, and `next` is the start.
    let (none, start) = feed.read_from(None, 10);
    assert!(none.is_empty());
    assert_eq!(feed.read_from(Some(&start), 10).1, start);

    // 2027: two adults and a minor (18 on 15 June 2028, from 2028-06-14T16:00:00Z) register.
    feed.set_clock("2027-01-01T00:00:00Z");
    let a = feed.register("u-ev-a", "1990-01-01", &key_a);
    let b = feed.register("u-ev-b", "1991-02-02", &key_b);
    let m = feed.register("u-ev-m", "2010-06-15", &key_m);
    assert_eq!(m["certificate"]["profile"], "minor");
    let serial = |account: &Value| {
        account["certificate"]["serial"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (a1, b1, m1) = (serial(&a), serial(&b), serial(&m));

    feed.ok(
        "registrar",
        "/v1/accounts/u-ev-a/suspend",
        json!({"by": "user", "reason": "phone lost"}),
    );
    feed.ok(
        "registrar",
        "/v1/accounts/u-ev-a/resume",
        json!({"by": "user"}),
    );
    feed.ok(
        "registrar",
        "/v1/accounts/u-ev-a/matching",
        json!({"result": "mismatch", "acknowledged_at": "2027-01-01T00:00:00Z"}),
    );
    // A match clears it: no event of API.md's list.
    feed.ok(
        "registrar",
        "/v1/accounts/u-ev-a/matching",
        json!({"result": "matched"}),
    );
    // A refused change tells nothing: the account is active, not suspended.
    let refused = feed.post(
        "registrar",
        "/v1/accounts/u-ev-a/resume",
        json!({"by": "user"}),
    );
    assert_eq!(problem(refused), (409, "account_not_active".into()));

    // The gateway reads part of it, 4 at a time, and keeps its cursor...
    let first = feed.page("gateway", "?limit=4").json::<Value>().unwrap();
    let first_page = first["events"].as_array().unwrap().clone();
    assert_eq!(first_page.len(), 4);
    let saved = first["next"].as_str().unwrap().to_owned();
    let mut seen = first_page;

    // ...and the daemon restarts (its clock back to the real one).
    feed.daemon.restart();

    feed.set_clock("2028-06-14T16:00:00Z");
    let swept = feed.sweep();
    assert_eq!(
        swept["minors_revoked"][0]["account_id"], "u-ev-m",
        "{swept}"
    );
    let m2 = feed.key_change("u-ev-m", "reapply", "reapply", &key_m);
    assert_eq!(m2["certificate"]["profile"], "adult");
    let m2 = serial(&m2);

    // Inside the renewal window (60 days) of the 2027 certificates (not of the minor's new one).
    feed.set_clock("2029-11-20T00:00:00Z");
    let swept = feed.sweep();
    assert_eq!(
        swept["renewal_windows_opened"].as_array().unwrap().len(),
        2,
        "{swept}"
    );
    assert!(
        feed.sweep()["renewal_windows_opened"]
            .as_array()
            .unwrap()
            .is_empty(),
        "told once"
    );
    let a2 = serial(&feed.key_change("u-ev-a", "renew", "renewal", &key_a));

    // Past b's not_after (2030-01-01): expired; a's new certificate lasts to 2032.
    feed.set_clock("2030-01-02T00:00:00Z");
    let swept = feed.sweep();
    assert_eq!(swept["expiries_told"][0]["account_id"], "u-ev-b", "{swept}");
    assert!(feed.sweep()["expiries_told"].as_array().unwrap().is_empty());

    feed.ok(
        "registrar",
        "/v1/accounts/u-ev-a/invalidate",
        json!({"reason": "residency not valid"}),
    );
    let deleted = feed
        .daemon
        .client("registrar")
        .delete(feed.url("/v1/accounts/u-ev-b"))
        .send()
        .unwrap();
    assert_eq!(deleted.status(), 204);

    // The gateway goes on from its saved cursor: the rest, in order, nothing twice.
    let (rest, end) = feed.read_from(Some(&saved), 3);
    seen.extend(rest);
    let expected = pairs(&[
        ("u-ev-a", "certificate.issued"),
        ("u-ev-b", "certificate.issued"),
        ("u-ev-m", "certificate.issued"),
        ("u-ev-a", "account.suspended"),
        ("u-ev-a", "account.resumed"),
        ("u-ev-a", "account.rectification_pending"),
        ("u-ev-m", "certificate.revoked"),
        ("u-ev-m", "account.turned_18"),
        ("u-ev-m", "certificate.issued"),
        // The two windows open in one sweep; their order is that of their not_after.
        ("?", "certificate.renewal_window_open"),
        ("?", "certificate.renewal_window_open"),
        ("u-ev-a", "certificate.renewed"),
        ("u-ev-a", "certificate.revoked"),
        ("u-ev-b", "certificate.expired"),
        ("u-ev-a", "certificate.revoked"),
        ("u-ev-a", "account.invalidated"),
        ("u-ev-b", "certificate.revoked"),
        ("u-ev-b", "account.deregistered"),
    ]);
    let mut got = names(&seen);
    let mut windows: Vec<String> = Vec::new();
    for (account, event) in &mut got {
        if event == "certificate.renewal_window_open" {
            windows.push(std::mem::replace(account, "?".into()));
        }
    }
    assert_eq!(got, expected, "{seen:#?}");
    windows.sort();
    assert_eq!(windows, ["u-ev-a", "u-ev-b"]);

    // Cursors increase; the whole feed read again, in any page size, is the same list.
    let cursors: Vec<u64> = seen
        .iter()
        .map(|e| e["cursor"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    for limit in [1, 7, 500] {
        let (all, next) = feed.read_from(None, limit);
        assert_eq!(all, seen);
        assert_eq!(next, end);
    }
    // The registrar reads the same feed.
    let registrar: Value = feed.page("registrar", "?limit=500").json().unwrap();
    assert_eq!(registrar["events"].as_array().unwrap(), &seen);

    // Details: ids and facts.
    let issued = the(&seen[..3], "u-ev-a", "certificate.issued");
    assert_eq!(issued["details"]["serial"], a1.as_str());
    assert_eq!(
        issued["details"]["not_after"],
        a["certificate"]["not_after"]
    );
    assert!(
        issued["time"]
            .as_str()
            .unwrap()
            .starts_with("2027-01-01T00:00")
    );
    assert_eq!(
        the(&seen, "u-ev-b", "certificate.issued")["details"]["serial"],
        b1.as_str()
    );
    assert_eq!(
        the(&seen, "u-ev-a", "account.suspended")["details"],
        json!({"by": "user"})
    );
    assert_eq!(
        the(&seen, "u-ev-a", "account.resumed")["details"],
        json!({"by": "user"})
    );
    assert_eq!(
        the(&seen, "u-ev-a", "account.rectification_pending")["details"],
        json!({"rectify_by": "2027-01-08T00:00:00Z"})
    );
    let revoked_at_18 = &seen[6];
    assert_eq!(
        revoked_at_18["details"],
        json!({"serial": m1, "reason": "cessation_of_operation"})
    );
    assert_eq!(seen[7]["details"], json!({"serial": m1}));
    assert!(
        seen[7]["time"]
            .as_str()
            .unwrap()
            .starts_with("2028-06-14T16:00")
    );
    assert_eq!(seen[8]["details"]["serial"], m2.as_str());
    assert_eq!(seen[11]["details"]["serial"], a2.as_str());
    assert_eq!(
        seen[12]["details"],
        json!({"serial": a1, "reason": "superseded"})
    );
    assert_eq!(seen[13]["details"]["serial"], b1.as_str());
    assert_eq!(
        seen[14]["details"],
        json!({"serial": a2, "reason": "privilege_withdrawn"})
    );
    assert_eq!(seen[15]["details"], json!({}));
    assert_eq!(
        seen[16]["details"],
        json!({"serial": b1, "reason": "cessation_of_operation"})
    );
    for event in &seen {
        let keys: Vec<&str> = event
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 5, "{event}");
        for key in ["cursor", "time", "account_id", "event", "details"] {
            assert!(event.get(key).is_some(), "{event}");
        }
    }

    // Never personal data: no name, date of birth or HKIC number (the holders' or the
    // guardian's), even for the deregistered account, whose events stay.
    let text = serde_json::to_string(&seen).unwrap();
    let mut personal = vec![
        "WONGSURNAME".to_owned(),
        "Siu Ming".to_owned(),
        "1990-01-01".to_owned(),
        "1991-02-02".to_owned(),
        "2010-06-15".to_owned(),
        "1980-01-01".to_owned(),
        GUARDIAN_HKIC.to_owned(),
    ];
    for id in ["u-ev-a", "u-ev-b", "u-ev-m"] {
        personal.push(hkic_for(id));
    }
    for datum in &personal {
        assert!(!text.contains(datum.as_str()), "{datum} in the feed");
    }
}

/// The feed is the gateway's and the registrar's: every other role is refused; a malformed
/// cursor or limit is `invalid_request`.
#[test]
fn the_feed_refuses_other_roles_and_bad_cursors() {
    let feed = Feed {
        daemon: DevDaemon::start(&[]),
    };
    for who in ["demo-a", "officer", "auditor"] {
        assert_eq!(
            problem(feed.page(who, "")),
            (403, "forbidden".into()),
            "{who}"
        );
    }
    for query in [
        "?after=abc",
        "?after=-1",
        "?after=1.5",
        "?after=",
        "?after=99999999999999999999",
        "?limit=0",
        "?limit=501",
        "?limit=x",
    ] {
        assert_eq!(
            problem(feed.page("gateway", query)),
            (400, "invalid_request".into()),
            "{query}"
        );
    }
    // A cursor past the end is a position like any other: nothing new, the same cursor.
    let body: Value = feed
        .page("registrar", "?after=42&limit=500")
        .json()
        .unwrap();
    assert_eq!(body, json!({"events": [], "next": "42"}));
    let body: Value = feed.page("gateway", "").json().unwrap();
    assert_eq!(body, json!({"events": [], "next": "0"}));
}
