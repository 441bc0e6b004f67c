//! Ages in Hong Kong time (DOMAIN.md, "iAM Smart-Cert lifecycle").
//!
//! A person attains an age at the start (00:00 Hong Kong time, UTC+8, no daylight saving) of the
//! anniversary of the date of birth. For a 29 February birthday the anniversary in a common year
//! is 1 March (our decision): until then the person has not completed the year.

use time::{Date, Month, OffsetDateTime, UtcOffset};

/// Hong Kong time: UTC+8 all year (no daylight saving since 1979).
pub const HK_OFFSET: UtcOffset = time::macros::offset!(+8);

/// The youngest age at which a person may register (DOMAIN.md, "The actors").
pub const MIN_REGISTRATION_AGE: u32 = 11;

/// The age of majority: a guardian's minimum age, and the age at which a minor's certificate is
/// revoked.
pub const ADULT_AGE: u32 = 18;

/// The calendar date in Hong Kong at the instant `now`.
pub fn hk_date(now: OffsetDateTime) -> Date {
    now.to_offset(HK_OFFSET).date()
}

/// The instant a Hong Kong calendar day starts: 00:00 HKT, which is 16:00 UTC the day before.
pub fn start_of_hk_day(date: Date) -> OffsetDateTime {
    date.midnight()
        .assume_offset(HK_OFFSET)
        .to_offset(UtcOffset::UTC)
}

/// The `years`th anniversary of `dob`; 29 February falls on 1 March in a common year.
///
/// Saturates at the last date `time` can represent (9999-12-31), far beyond any rule's reach.
pub fn anniversary(dob: Date, years: u32) -> Date {
    let year = i32::try_from(years)
        .ok()
        .and_then(|y| dob.year().checked_add(y));
    let Some(year) = year else {
        return Date::MAX;
    };
    match Date::from_calendar_date(year, dob.month(), dob.day()) {
        Ok(date) => date,
        // Only 29 February can be missing in the target year, unless the year is out of range.
        Err(_) if dob.month() == Month::February && dob.day() == 29 => {
            Date::from_calendar_date(year, Month::March, 1).unwrap_or(Date::MAX)
        }
        Err(_) => Date::MAX,
    }
}

/// The day a person born on `dob` turns 18.
pub fn adult_on(dob: Date) -> Date {
    anniversary(dob, ADULT_AGE)
}

/// The age in completed years on `date` (0 before birth).
pub fn age_on(dob: Date, date: Date) -> u32 {
    if date <= dob {
        return 0;
    }
    let years = u32::try_from(date.year() - dob.year()).unwrap_or(0);
    if anniversary(dob, years) > date {
        years.saturating_sub(1)
    } else {
        years
    }
}

/// Years of inaction after a suspension or invalidation before the account is deregistered and
/// its personal data deleted (DOMAIN.md).
pub const RETENTION_YEARS: u32 = 7;

/// The instant a minor's certificate stops: 00:00 Hong Kong time on the 18th birthday.
pub fn minor_certificate_ends(dob: Date) -> OffsetDateTime {
    start_of_hk_day(adult_on(dob))
}

/// The instant an account suspended or invalidated at `changed` (and left so) is deregistered:
/// 00:00 Hong Kong time on the seventh anniversary of that Hong Kong date, counted like ages
/// (29 February falls on 1 March in a common year).
pub fn retention_ends(changed: OffsetDateTime) -> OffsetDateTime {
    start_of_hk_day(anniversary(hk_date(changed), RETENTION_YEARS))
}

/// Whether a person born on `dob` is under 18 at `now` (Hong Kong date).
pub fn is_minor(dob: Date, now: OffsetDateTime) -> bool {
    age_on(dob, hk_date(now)) < ADULT_AGE
}

#[cfg(test)]
mod tests {
    use time::macros::{date, datetime};

    use super::*;

    #[test]
    fn a_minor_certificate_ends_at_hk_midnight_of_the_18th_birthday() {
        assert_eq!(
            minor_certificate_ends(date!(2008 - 06 - 15)),
            datetime!(2026-06-14 16:00 UTC)
        );
        // 29 February: 1 March in the common year 2026.
        assert_eq!(
            minor_certificate_ends(date!(2008 - 02 - 29)),
            datetime!(2026-02-28 16:00 UTC)
        );
    }

    #[test]
    fn retention_counts_seven_years_from_the_hk_date_of_the_change() {
        // 2026-03-01 02:00 HKT is 2026-02-28 18:00 UTC: the HK date is 1 March.
        assert_eq!(
            retention_ends(datetime!(2026-02-28 18:00 UTC)),
            datetime!(2033-02-28 16:00 UTC)
        );
        // Suspended on 29 February 2028 (HK): ends on 1 March 2035.
        assert_eq!(
            retention_ends(datetime!(2028-02-29 04:00 UTC)),
            datetime!(2035-02-28 16:00 UTC)
        );
    }

    #[test]
    fn hk_date_is_utc_plus_8() {
        assert_eq!(
            hk_date(datetime!(2026-03-01 15:59:59 UTC)),
            date!(2026 - 03 - 01)
        );
        assert_eq!(
            hk_date(datetime!(2026-03-01 16:00:00 UTC)),
            date!(2026 - 03 - 02)
        );
        assert_eq!(
            hk_date(datetime!(2026-03-02 00:30 +8)),
            date!(2026 - 03 - 02)
        );
    }

    #[test]
    fn hk_day_starts_at_16_00_utc_the_day_before() {
        let start = start_of_hk_day(date!(2027 - 05 - 01));
        assert_eq!(start, datetime!(2027-04-30 16:00 UTC));
        assert_eq!(start.offset(), UtcOffset::UTC);
        assert_eq!(hk_date(start), date!(2027 - 05 - 01));
        assert_eq!(
            hk_date(start - time::Duration::SECOND),
            date!(2027 - 04 - 30)
        );
    }

    #[test]
    fn anniversary_of_29_february_is_1_march_in_a_common_year() {
        assert_eq!(
            anniversary(date!(2008 - 02 - 29), 18),
            date!(2026 - 03 - 01)
        );
        assert_eq!(
            anniversary(date!(2008 - 02 - 29), 20),
            date!(2028 - 02 - 29)
        );
        assert_eq!(
            anniversary(date!(2008 - 02 - 28), 18),
            date!(2026 - 02 - 28)
        );
        assert_eq!(anniversary(date!(2000 - 12 - 31), 1), date!(2001 - 12 - 31));
        assert_eq!(anniversary(date!(2000 - 01 - 01), u32::MAX), Date::MAX);
    }

    #[test]
    fn minor_born_29_february_is_adult_on_1_march_in_common_year() {
        let dob = date!(2008 - 02 - 29);
        assert_eq!(adult_on(dob), date!(2026 - 03 - 01));
        assert_eq!(age_on(dob, date!(2026 - 02 - 28)), 17);
        assert_eq!(age_on(dob, date!(2026 - 03 - 01)), 18);
        // The last second of 28 February in Hong Kong, and the first of 1 March.
        assert!(is_minor(dob, datetime!(2026-02-28 15:59:59 UTC)));
        assert!(!is_minor(dob, datetime!(2026-02-28 16:00:00 UTC)));
    }

    #[test]
    fn minor_born_29_february_is_adult_on_29_february_in_leap_year() {
        let dob = date!(2012 - 02 - 29);
        assert_eq!(adult_on(dob), date!(2030 - 03 - 01));
        let dob = date!(2014 - 02 - 28);
        assert_eq!(adult_on(dob), date!(2032 - 02 - 28));
        let dob = date!(1996 - 02 - 29);
        assert_eq!(adult_on(dob), date!(2014 - 03 - 01));
        assert_eq!(anniversary(dob, 20), date!(2016 - 02 - 29));
        assert_eq!(age_on(dob, date!(2016 - 02 - 28)), 19);
        assert_eq!(age_on(dob, date!(2016 - 02 - 29)), 20);
    }

    #[test]
    fn person_attains_age_at_start_of_birthday_hong_kong_time() {
        let dob = date!(2009 - 05 - 01);
        assert_eq!(adult_on(dob), date!(2027 - 05 - 01));
        // 23:59:59 on 30 April in Hong Kong is 15:59:59 UTC: still a minor.
        assert!(is_minor(dob, datetime!(2027-04-30 15:59:59 UTC)));
        // 00:00 on 1 May in Hong Kong is 16:00 UTC on 30 April: an adult, though UTC's date
        // is still the 30th.
        assert!(!is_minor(dob, datetime!(2027-04-30 16:00:00 UTC)));
        assert!(!is_minor(dob, start_of_hk_day(adult_on(dob))));
    }

    #[test]
    fn age_is_zero_before_birth_and_counts_completed_years() {
        let dob = date!(2000 - 06 - 15);
        assert_eq!(age_on(dob, date!(1999 - 01 - 01)), 0);
        assert_eq!(age_on(dob, dob), 0);
        assert_eq!(age_on(dob, date!(2001 - 06 - 14)), 0);
        assert_eq!(age_on(dob, date!(2001 - 06 - 15)), 1);
        assert_eq!(age_on(dob, date!(2026 - 06 - 14)), 25);
        assert_eq!(age_on(dob, date!(2026 - 06 - 15)), 26);
    }
}
