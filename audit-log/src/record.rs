//! Audit events and the one byte form of a record.
//!
//! A record is one line of compact JSON with its keys in a fixed order:
//!
//! ```text
//! {"index":7,"time":"2026-11-22T10:00:00Z","event":"signing.signed","actor":"service:demo-a","fields":{"request_id":"..."}}
//! ```
//!
//! `fields` is an object whose keys are sorted by their UTF-8 bytes at every depth, with integers
//! but no fractions or exponents, and strings escaped minimally (only `"`, `\` and control
//! characters; `\b \f \n \r \t` by name, other controls as `\u00xx`). Each record therefore has
//! exactly one spelling, which the log writes and which the open-time scan and the offline
//! verifier insist on: a line that parses but is spelt differently was not written by this log.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::AuditError;
use crate::time::Timestamp;

/// The longest record line, without its newline. Bounds what a damaged file can make the scan
/// allocate; real records are a few hundred bytes.
pub const MAX_RECORD_LEN: usize = 64 * 1024;

/// How deep `fields` may nest.
const MAX_DEPTH: usize = 16;

/// What happened: 1 to 64 characters of `a-z 0-9 . _ -`, starting with a letter, e.g.
/// `signing.signed`, `account.suspended`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventName(String);

impl EventName {
    /// Checks and wraps an event name.
    pub fn new(name: impl Into<String>) -> Result<Self, AuditError> {
        let name = name.into();
        let valid = (1..=64).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
        if !valid {
            return Err(AuditError::InvalidEvent(format!(
                "event name {name:?} must be 1 to 64 of a-z 0-9 . _ - starting with a letter"
            )));
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who caused it: 1 to 256 bytes of UTF-8 without control characters, e.g. `service:demo-a`,
/// `officer:alice`, `system`. An id, never a person's name (DESIGN.md).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Actor(String);

impl Actor {
    /// Checks and wraps an actor.
    pub fn new(actor: impl Into<String>) -> Result<Self, AuditError> {
        let actor = actor.into();
        if !(1..=256).contains(&actor.len()) || actor.chars().any(char::is_control) {
            return Err(AuditError::InvalidEvent(format!(
                "actor {actor:?} must be 1 to 256 bytes without control characters"
            )));
        }
        Ok(Self(actor))
    }

    /// The actor.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An event the daemon hands to [`AuditLog::append`](crate::AuditLog::append); the log adds the
/// index and the time.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    event: EventName,
    actor: Actor,
    fields: Map<String, Value>,
}

impl AuditEvent {
    /// An event without fields.
    pub fn new(event: EventName, actor: Actor) -> Self {
        Self {
            event,
            actor,
            fields: Map::new(),
        }
    }

    /// Adds (or replaces) one field. Values are checked when appended: no fractional numbers,
    /// at most 16 levels deep.
    #[must_use]
    pub fn with_field(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.fields.insert(key.into(), value.into());
        self
    }

    /// Replaces all fields.
    #[must_use]
    pub fn with_fields(mut self, fields: Map<String, Value>) -> Self {
        self.fields = fields;
        self
    }

    /// The event name.
    pub fn event(&self) -> &EventName {
        &self.event
    }

    /// The actor.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// The fields.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }
}

/// An event checked and rendered except for the parts the writer assigns (index and time), so
/// that the writer thread only concatenates.
#[derive(Debug)]
pub(crate) struct PreparedEvent {
    /// `,"event":...,"actor":...,"fields":{...}}`: everything after the time.
    tail: Vec<u8>,
}

impl PreparedEvent {
    pub(crate) fn new(event: &AuditEvent) -> Result<Self, AuditError> {
        let mut tail = Vec::with_capacity(128);
        tail.extend_from_slice(b",\"event\":");
        write_string(&mut tail, event.event.as_str());
        tail.extend_from_slice(b",\"actor\":");
        write_string(&mut tail, event.actor.as_str());
        tail.extend_from_slice(b",\"fields\":");
        write_object(&mut tail, &event.fields, 1).map_err(AuditError::InvalidEvent)?;
        tail.push(b'}');
        // index (20 digits) and time (20 bytes) and their keys add well under 64 bytes.
        if tail.len() + 64 > MAX_RECORD_LEN {
            return Err(AuditError::InvalidEvent(format!(
                "record would exceed {MAX_RECORD_LEN} bytes"
            )));
        }
        Ok(Self { tail })
    }

    /// Roughly the size of the rendered line (all but the index and time).
    pub(crate) fn approximate_len(&self) -> usize {
        self.tail.len() + 64
    }

    /// Appends the record line (no newline) for `index` and `time` to `out`.
    pub(crate) fn render(&self, index: u64, time: &Timestamp, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"index\":");
        out.extend_from_slice(index.to_string().as_bytes());
        out.extend_from_slice(b",\"time\":");
        write_string(out, time.as_str());
        out.extend_from_slice(&self.tail);
    }
}

/// The record fields as they are read back; key order and spelling are checked by rendering
/// again.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRecord {
    index: u64,
    time: String,
    event: String,
    actor: String,
    fields: Map<String, Value>,
}

/// Checks that `line` (without its newline) is a record in its one spelling; returns its index
/// or what is wrong.
pub(crate) fn check_line(line: &[u8]) -> Result<u64, String> {
    if line.len() > MAX_RECORD_LEN {
        return Err(format!("record longer than {MAX_RECORD_LEN} bytes"));
    }
    let wire: WireRecord =
        serde_json::from_slice(line).map_err(|error| format!("not a valid record: {error}"))?;
    let time = Timestamp::parse(&wire.time)?;
    let event = AuditEvent {
        event: EventName::new(wire.event).map_err(|error| error.to_string())?,
        actor: Actor::new(wire.actor).map_err(|error| error.to_string())?,
        fields: wire.fields,
    };
    let prepared = PreparedEvent::new(&event).map_err(|error| error.to_string())?;
    let mut canonical = Vec::with_capacity(line.len());
    prepared.render(wire.index, &time, &mut canonical);
    if canonical != line {
        return Err("record is not in its canonical compact form".into());
    }
    Ok(wire.index)
}

fn write_value(out: &mut Vec<u8>, value: &Value, depth: usize) -> Result<(), String> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => {
            // Integers only: a fraction's decimal spelling need not survive a parse and a print.
            let text = if let Some(n) = number.as_u64() {
                n.to_string()
            } else if let Some(n) = number.as_i64() {
                n.to_string()
            } else {
                return Err(format!(
                    "number {number} is not an integer in the 64-bit range"
                ));
            };
            out.extend_from_slice(text.as_bytes());
        }
        Value::String(text) => write_string(out, text),
        Value::Array(items) => {
            check_depth(depth)?;
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map, depth)?,
    }
    Ok(())
}

fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>, depth: usize) -> Result<(), String> {
    check_depth(depth)?;
    // Sorted here rather than relying on serde_json's map type, which another crate's
    // `preserve_order` feature would turn into insertion order.
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push(b'{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, key);
        out.push(b':');
        write_value(out, value, depth + 1)?;
    }
    out.push(b'}');
    Ok(())
}

fn check_depth(depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("fields nest deeper than {MAX_DEPTH} levels"));
    }
    Ok(())
}

/// Writes `text` as a JSON string with the minimal escaping described in the module docs.
pub(crate) fn write_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            // Non-ASCII UTF-8 bytes and printable ASCII go as they are.
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn line(event: &AuditEvent, index: u64) -> Vec<u8> {
        let time = Timestamp::parse("2026-11-22T10:00:00Z").unwrap();
        let mut out = Vec::new();
        PreparedEvent::new(event)
            .unwrap()
            .render(index, &time, &mut out);
        out
    }

    fn event() -> AuditEvent {
        AuditEvent::new(
            EventName::new("signing.signed").unwrap(),
            Actor::new("svc:a").unwrap(),
        )
    }

    #[test]
    fn renders_fixed_key_order_and_sorted_fields() {
        let event = event()
            .with_field("zeta", 1)
            .with_field("alpha", json!({"b": [true, null, -3], "a": "x\n\"\u{1}é"}));
        let text = String::from_utf8(line(&event, 7)).unwrap();
        assert_eq!(
            text,
            r#"{"index":7,"time":"2026-11-22T10:00:00Z","event":"signing.signed","actor":"svc:a","fields":{"alpha":{"a":"x\n\"\u0001é","b":[true,null,-3]},"zeta":1}}"#
        );
        assert_eq!(check_line(text.as_bytes()), Ok(7));
    }

    #[test]
    fn refuses_floats_deep_nesting_and_bad_names() {
        assert!(PreparedEvent::new(&event().with_field("x", 1.5)).is_err());
        let mut deep = json!(1);
        for _ in 0..20 {
            deep = json!([deep]);
        }
        assert!(PreparedEvent::new(&event().with_field("x", deep)).is_err());
        assert!(EventName::new("Signing").is_err());
        assert!(EventName::new("").is_err());
        assert!(EventName::new("1x").is_err());
        assert!(Actor::new("a\nb").is_err());
        assert!(Actor::new("").is_err());
        assert!(PreparedEvent::new(&event().with_field("x", "y".repeat(MAX_RECORD_LEN))).is_err());
    }

    #[test]
    fn check_line_refuses_other_spellings() {
        let good = String::from_utf8(line(&event().with_field("n", 5), 3)).unwrap();
        assert_eq!(check_line(good.as_bytes()), Ok(3));
        let variants = [
            good.replace(":5", ": 5"),
            good.replace("\"n\":5", "\"n\":5.0"),
            good.replace("\"n\":5", "\"n\":5,\"n\":5"),
            good.replace("svc:a", "svc:\\u0061"),
            good.replace("{\"index\":3,", "{\"index\":03,"),
            good.replace(
                "{\"index\":3,\"time\":\"2026-11-22T10:00:00Z\",",
                "{\"time\":\"2026-11-22T10:00:00Z\",\"index\":3,",
            ),
            good.replace("}}", "},\"extra\":1}"),
            good.replace("10:00:00Z", "10:00:00+00:00"),
            format!("{good} "),
            String::new(),
        ];
        for variant in variants {
            assert!(check_line(variant.as_bytes()).is_err(), "{variant}");
        }
    }
}
