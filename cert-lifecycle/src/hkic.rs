//! The Hong Kong Identity Card number: its form and its check digit.
//!
//! A number is one or two letters, six digits and a check digit (0-9 or A), the check digit often
//! written in brackets: `A123456(3)`. The check digit makes the weighted sum divisible by 11:
//! with weights 9 down to 2 over the eight characters before it (a one-letter number is padded
//! with a leading space worth 36, letters are A=10 .. Z=35), the check digit is `11 - sum mod 11`,
//! written `A` for 10 and `0` for 11.
//!
//! The number is personal data: it is held in zeroizing memory, never printed by `Debug`, and the
//! daemon keeps only a keyed hash of [`HkicNumber::canonical`] (DOMAIN.md, "Data protection").

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::{HkicReason, ParseError};

/// A checked HKIC number in canonical form (upper case, no brackets).
#[derive(Clone)]
pub struct HkicNumber {
    canonical: Zeroizing<String>,
}

impl HkicNumber {
    /// Parses a number with or without brackets around the check digit, in either case, and
    /// verifies its check digit.
    pub fn parse(input: &str) -> Result<HkicNumber, ParseError> {
        parse(input.as_bytes()).map_err(ParseError::InvalidHkic)
    }

    /// The number as ASCII bytes, upper case, without brackets: the input of the keyed hash.
    pub fn canonical(&self) -> &[u8] {
        self.canonical.as_bytes()
    }
}

impl FromStr for HkicNumber {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HkicNumber::parse(s)
    }
}

impl fmt::Debug for HkicNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HkicNumber(<redacted>)")
    }
}

/// The value of the space that pads a one-letter number on the left.
const SPACE_VALUE: u32 = 36;

fn parse(input: &[u8]) -> Result<HkicNumber, HkicReason> {
    // Longest form: two letters, six digits, "(", check digit, ")".
    if !(8..=11).contains(&input.len()) {
        return Err(HkicReason::Malformed);
    }
    let letters = input
        .iter()
        .take_while(|b| b.is_ascii_alphabetic())
        .count()
        .min(2);
    if letters == 0 {
        return Err(HkicReason::Malformed);
    }
    let (prefix, rest) = input.split_at(letters);
    if rest.len() < 7 || !rest[..6].iter().all(u8::is_ascii_digit) {
        return Err(HkicReason::Malformed);
    }
    let (digits, check) = rest.split_at(6);
    let check = match check {
        [c] => *c,
        [b'(', c, b')'] => *c,
        [b'(', ..] | [.., b')'] => return Err(HkicReason::Brackets),
        _ => return Err(HkicReason::Malformed),
    };
    let check = check.to_ascii_uppercase();
    if !(check.is_ascii_digit() || check == b'A') {
        return Err(HkicReason::CheckDigitForm);
    }

    let mut canonical = Zeroizing::new(String::with_capacity(9));
    for &b in prefix {
        canonical.push(char::from(b.to_ascii_uppercase()));
    }
    for &b in digits {
        canonical.push(char::from(b));
    }
    if expected_check_digit(canonical.as_bytes()) != check {
        return Err(HkicReason::CheckDigitMismatch);
    }
    canonical.push(char::from(check));
    Ok(HkicNumber { canonical })
}

/// The check digit of the letters and six digits in `body` (upper case, checked by the caller).
fn expected_check_digit(body: &[u8]) -> u8 {
    let padding = (body.len() == 7).then_some(SPACE_VALUE);
    let values = padding.into_iter().chain(body.iter().map(|&b| {
        if b.is_ascii_digit() {
            u32::from(b - b'0')
        } else {
            u32::from(b - b'A') + 10
        }
    }));
    let sum: u32 = values.zip((2..=9).rev()).map(|(v, w)| v * w).sum();
    match 11 - sum % 11 {
        10 => b'A',
        11 => b'0',
        d => b'0' + d as u8, // 1..=9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(s: &str) -> String {
        String::from_utf8(HkicNumber::parse(s).unwrap().canonical().to_vec()).unwrap()
    }

    fn reason(s: &str) -> HkicReason {
        match HkicNumber::parse(s) {
            Err(ParseError::InvalidHkic(r)) => r,
            other => panic!("{s}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn hkic_check_digit_is_verified_for_the_api_examples() {
        // A1234563 and AB9876543 are right. API.md's guardian example "Y5432105" is not: the
        // check digit of Y543210 is 1 (36*9 + 34*8 + 5*7 + 4*6 + 3*5 + 2*4 + 1*3 = 681,
        // 681 mod 11 = 10, 11 - 10 = 1).
        assert_eq!(canonical("A1234563"), "A1234563");
        assert_eq!(canonical("AB9876543"), "AB9876543");
        assert_eq!(canonical("Y5432101"), "Y5432101");
        assert_eq!(reason("Y5432105"), HkicReason::CheckDigitMismatch);
    }

    #[test]
    fn hkic_check_digit_matches_published_examples() {
        // Worked examples published with the algorithm: A123456(3) and AB123456(9)
        // (hong.ddns.net, mrszeto.net), D288754(2) (a school check-digit lesson), and
        // G123456(A), a check digit of 10.
        assert_eq!(canonical("A123456(3)"), "A1234563");
        assert_eq!(canonical("AB123456(9)"), "AB1234569");
        assert_eq!(canonical("D288754(2)"), "D2887542");
        assert_eq!(canonical("G123456(A)"), "G123456A");
    }

    #[test]
    fn hkic_check_digit_of_eleven_is_written_zero() {
        // K123456: 36*9 + 20*8 + 1*7 + 2*6 + 3*5 + 4*4 + 5*3 + 6*2 = 561 = 51 * 11.
        assert_eq!(canonical("K1234560"), "K1234560");
        assert_eq!(reason("K1234561"), HkicReason::CheckDigitMismatch);
    }

    #[test]
    fn hkic_accepts_lower_case_and_brackets_and_canonicalises() {
        assert_eq!(canonical("g123456(a)"), "G123456A");
        assert_eq!(canonical("g123456a"), "G123456A");
        assert_eq!(canonical("ab9876543"), "AB9876543");
    }

    #[test]
    fn hkic_refuses_malformed_numbers_with_a_reason() {
        assert_eq!(reason(""), HkicReason::Malformed);
        assert_eq!(reason("1234563"), HkicReason::Malformed);
        assert_eq!(reason("ABC1234563"), HkicReason::Malformed);
        assert_eq!(reason("A12345"), HkicReason::Malformed);
        assert_eq!(reason("A12345X3"), HkicReason::Malformed);
        assert_eq!(reason("A1234567890"), HkicReason::Malformed);
        assert_eq!(reason("A 1234563"), HkicReason::Malformed);
        assert_eq!(reason("A123456(3"), HkicReason::Brackets);
        assert_eq!(reason("A1234563)"), HkicReason::Brackets);
        assert_eq!(reason("A123456B"), HkicReason::CheckDigitForm);
        assert_eq!(reason("A123456(B)"), HkicReason::CheckDigitForm);
        assert_eq!(reason("A1234564"), HkicReason::CheckDigitMismatch);
    }

    #[test]
    fn hkic_debug_and_errors_never_show_the_number() {
        let n = HkicNumber::parse("A123456(3)").unwrap();
        assert!(!format!("{n:?}").contains("123456"));
        let e = HkicNumber::parse("A1234564").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("123456"));
    }
}
