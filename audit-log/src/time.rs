//! Record and checkpoint times: RFC 3339 UTC with whole seconds (`2026-11-22T10:00:00Z`, the
//! API's convention), read from a [`Clock`] that the caller controls.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::AuditError;

/// Where the log reads the time it writes into records and checkpoints. The daemon passes its own
/// clock (settable in `--dev` mode); tests pass a fixed one.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A time in the one form the log writes: `YYYY-MM-DDTHH:MM:SSZ`, UTC, years 1970 to 9999.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(String);

impl Timestamp {
    /// The time `time`, truncated to whole seconds.
    pub fn from_system_time(time: SystemTime) -> Result<Self, AuditError> {
        let seconds = time
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AuditError::Clock("time before 1970-01-01".into()))?
            .as_secs();
        let days = seconds / 86_400;
        let second_of_day = seconds % 86_400;
        let (year, month, day) = civil_from_days(days);
        if year > 9999 {
            return Err(AuditError::Clock("time after year 9999".into()));
        }
        Ok(Self(format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60
        )))
    }

    /// Parses the exact form above, with valid calendar ranges; anything else (offsets,
    /// fractions, lowercase `t`/`z`) is refused so that a time has one spelling.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let shape_ok = bytes.len() == 20
            && bytes.iter().enumerate().all(|(i, &b)| match i {
                4 | 7 => b == b'-',
                10 => b == b'T',
                13 | 16 => b == b':',
                19 => b == b'Z',
                _ => b.is_ascii_digit(),
            });
        if !shape_ok {
            return Err(format!(
                "time {text:?} is not of the form YYYY-MM-DDTHH:MM:SSZ"
            ));
        }
        let number = |from: usize, to: usize| {
            bytes[from..to]
                .iter()
                .fold(0u64, |acc, &b| acc * 10 + u64::from(b - b'0'))
        };
        let (year, month, day) = (number(0, 4), number(5, 7), number(8, 10));
        let (hour, minute, second) = (number(11, 13), number(14, 16), number(17, 19));
        let valid = year >= 1970
            && (1..=12).contains(&month)
            && day >= 1
            && day <= days_in_month(year, month)
            && hour < 24
            && minute < 60
            && second < 60;
        if !valid {
            return Err(format!("time {text:?} is out of range"));
        }
        Ok(Self(text.to_owned()))
    }

    /// The RFC 3339 text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_leap_year(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The proleptic Gregorian date of the day `days` after 1970-01-01.
///
/// Counts in 400-year eras starting on 1 March, so that the leap day ends each year and every
/// era has the same 146 097 days.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    const DAYS_PER_ERA: u64 = 146_097;
    // 0000-03-01 is 719 468 days before 1970-01-01.
    let shifted = days + 719_468;
    let era = shifted / DAYS_PER_ERA;
    let day_of_era = shifted % DAYS_PER_ERA;
    // Years of 365 days, less the leap days of the 4-, 100- and 400-year cycles already passed.
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March, with lengths 31 30 31 30 31 31 30 31 30 31 31 29/28: 153 days every
    // five months.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64) -> String {
        Timestamp::from_system_time(UNIX_EPOCH + Duration::from_secs(seconds))
            .unwrap()
            .as_str()
            .to_owned()
    }

    #[test]
    fn formats_known_times() {
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_341_600), "2026-11-22T10:00:00Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(at(253_402_300_799), "9999-12-31T23:59:59Z");
        assert!(
            Timestamp::from_system_time(UNIX_EPOCH + Duration::from_secs(253_402_300_800)).is_err()
        );
    }

    #[test]
    fn every_day_round_trips_through_parse() {
        let mut previous = String::new();
        for day in 0..(200 * 366) {
            let text = at(day * 86_400 + 3_723);
            assert!(text > previous, "{text} after {previous}");
            assert_eq!(Timestamp::parse(&text).unwrap().as_str(), text);
            previous = text;
        }
    }

    #[test]
    fn parse_refuses_other_spellings() {
        for bad in [
            "2026-11-22T10:00:00",
            "2026-11-22t10:00:00Z",
            "2026-11-22T10:00:00.5Z",
            "2026-11-22T10:00:00+00:00",
            "2026-02-29T10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T10:60:00Z",
            "2026-11-22T10:00:60Z",
            "1969-12-31T23:59:59Z",
            " 2026-11-22T10:00:00Z",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
        assert!(Timestamp::parse("2024-02-29T10:00:00Z").is_ok());
    }
}
