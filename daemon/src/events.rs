//! `GET /v1/events?after=CURSOR&limit=N` (gateway, registrar; API.md, "Receipts, audit filters
//! and events"): the lifecycle events a user must be told about, in the order their changes
//! were committed. It parses the cursor and limit, reads one page through
//! [`application::events::page`], and writes it out.
//!
//! The cursor is an opaque string, like the signing history's: here the decimal position of the
//! last event seen (`0`, the start, when none was). `next` is always a cursor: with no new
//! events it is the position asked from, so a gateway polls again with it.

use std::sync::Arc;

use application::{events, rfc3339};
use cert_lifecycle::{CertSerial, StoredEvent};
use serde_json::{Map, Value, json};

use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;

/// Events per page, by default and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 500;

/// `GET /v1/events?after=CURSOR&limit=N`.
pub(crate) async fn feed(app: Arc<App>, ctx: Ctx) -> Result<Reply, ApiError> {
    let limit = match ctx.query.get("limit") {
        None => PAGE,
        Some(text) => parse_limit(text)?,
    };
    let after = match ctx.query.get("after") {
        None => 0,
        Some(text) => parse_cursor(text)?,
    };
    let page = events::page(&*app, after, limit).await?;
    let next = page.last().map_or(after, |stored| stored.position);
    let list: Vec<Value> = page.iter().map(event_view).collect();
    Ok(Reply::ok(&json!({"events": list, "next": cursor(next)})))
}

fn parse_limit(text: &str) -> Result<usize, ApiError> {
    // Digits only: `+5` or ` 5` is no limit of this route.
    text.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse::<usize>().ok())
        .flatten()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| ApiError::InvalidRequest(format!("limit: 1 to {MAX_PAGE}")))
}

/// An event cursor: the position of the last event seen.
fn cursor(position: i64) -> String {
    position.to_string()
}

fn parse_cursor(text: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::InvalidRequest("after: not a cursor from this route".into());
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse::<i64>().map_err(|_| bad())
}

/// One event as API.md gives it: ids and facts only.
fn event_view(stored: &StoredEvent) -> Value {
    let event = &stored.event;
    let details = &event.details;
    let mut out = Map::new();
    if let Some(serial) = &details.serial {
        out.insert("serial".into(), json!(CertSerial::as_str(serial)));
    }
    if let Some(reason) = details.reason {
        out.insert("reason".into(), json!(reason.as_str()));
    }
    if let Some(not_after) = details.not_after {
        out.insert("not_after".into(), json!(rfc3339(not_after)));
    }
    if let Some(by) = details.by {
        out.insert("by".into(), json!(by.as_str()));
    }
    if let Some(rectify_by) = details.rectify_by {
        out.insert("rectify_by".into(), json!(rfc3339(rectify_by)));
    }
    json!({
        "cursor": cursor(stored.position),
        "time": rfc3339(event.at),
        "account_id": event.account_id.as_str(),
        "event": event.kind.as_str(),
        "details": out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_positions_and_anything_else_is_refused() {
        assert_eq!(parse_cursor("0").unwrap(), 0);
        assert_eq!(parse_cursor(&cursor(42)).unwrap(), 42);
        assert_eq!(parse_cursor(&cursor(i64::MAX)).unwrap(), i64::MAX);
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1.5",
            "abc",
            "99999999999999999999",
            "１",
        ] {
            assert!(
                matches!(parse_cursor(bad), Err(ApiError::InvalidRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_are_1_to_the_maximum() {
        assert_eq!(parse_limit("1").unwrap(), 1);
        assert_eq!(parse_limit("500").unwrap(), MAX_PAGE);
        for bad in ["0", "501", "-1", "+5", "", "x", "18446744073709551616"] {
            assert!(
                matches!(parse_limit(bad), Err(ApiError::InvalidRequest(_))),
                "{bad:?}"
            );
        }
    }
}
