//! The unseal quorum: Shamir's secret sharing of the HSM user PIN over GF(2^8).
//!
//! `smartsign-ctl ceremony split` turns the PIN into `n` shares of which any `k` rebuild it, one
//! per officer; the daemon keeps only the SHA-256 digest of each share's text in its
//! configuration (`[hsm.quorum]`) and rebuilds the PIN when `k` officers have given theirs
//! (`POST /v1/admin/unseal`).
//!
//! The secret that is split is not the bare PIN but [`SECRET_LEN`] bytes: a length byte, the
//! PIN, and random padding. Each share is then 64 bytes that are uniformly random on their own,
//! so a share's digest in a configuration file cannot be brute-forced back to a short PIN.
//!
//! Arithmetic is in GF(2^8) with AES's polynomial x^8 + x^4 + x^3 + x + 1, without tables or
//! branches on secret values. A share is text: `smartsign-share-v1.<x>.<base64url payload>`,
//! with `x` the share's point (1 to 255). Every type holding a share or the PIN zeroizes it when
//! dropped and shows nothing of it in `Debug`; errors never quote them.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::{OsRng, RngCore};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// The size of the shared secret, and so of every share's payload.
pub const SECRET_LEN: usize = 64;
/// The longest PIN that fits: the secret holds a length byte and the PIN.
pub const MAX_PIN_LEN: usize = SECRET_LEN - 1;
/// The start of every share's text.
const PREFIX: &str = "smartsign-share-v1.";

/// What went wrong with a split, a share or a combination. Never carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuorumError {
    #[error(
        "a quorum needs a threshold of at least 2 and at most the number of shares, and at most \
         255 shares (threshold {threshold}, {shares} shares)"
    )]
    BadThreshold { threshold: usize, shares: usize },
    #[error("the PIN must be 1 to {MAX_PIN_LEN} bytes of UTF-8 (it is {0} bytes)")]
    BadPin(usize),
    #[error(
        "not a share: a share is the whole text `smartsign-share-v1.<n>.<payload>` from its file"
    )]
    Malformed,
    #[error("the share is not one of this appliance's quorum (its digest is not configured)")]
    UnknownShare,
    #[error("{0} is not a SHA-256 digest in hex (64 hex digits)")]
    BadDigest(String),
    #[error("the digest {0} is listed twice")]
    DuplicateDigest(String),
    #[error("the shares to combine must have distinct points; got {0} shares")]
    RepeatedPoint(usize),
    #[error(
        "the shares do not combine to a PIN: they are from different ceremonies, or fewer than \
         the threshold"
    )]
    NotAPin,
}

/// One officer's share: its point `x` and the 64 bytes of every coefficient polynomial at `x`.
#[derive(Clone)]
pub struct Share {
    x: u8,
    payload: Zeroizing<[u8; SECRET_LEN]>,
}

impl Share {
    /// Parses a share's text (surrounding whitespace ignored). Only the exact encoding the
    /// ceremony writes is accepted, so that one share has one text and one digest.
    pub fn parse(text: &str) -> Result<Self, QuorumError> {
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(QuorumError::Malformed)?;
        let (point, encoded) = rest.split_once('.').ok_or(QuorumError::Malformed)?;
        // Decimal without a sign or leading zeros: one share, one text.
        if point.starts_with('0') || !point.bytes().all(|b| b.is_ascii_digit()) {
            return Err(QuorumError::Malformed);
        }
        let x: u8 = point.parse().map_err(|_| QuorumError::Malformed)?;
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(encoded)
                .map_err(|_| QuorumError::Malformed)?,
        );
        let mut payload = Zeroizing::new([0u8; SECRET_LEN]);
        if bytes.len() != SECRET_LEN {
            return Err(QuorumError::Malformed);
        }
        payload.copy_from_slice(&bytes);
        Ok(Self { x, payload })
    }

    /// The share's text, as written to the officer's file and given to the daemon.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(format!("{PREFIX}{}.", self.x));
        URL_SAFE_NO_PAD.encode_string(self.payload.as_slice(), &mut text);
        text
    }

    /// SHA-256 of the share's text: what the daemon's configuration lists.
    pub fn digest(&self) -> ShareDigest {
        ShareDigest(Sha256::digest(self.to_text().as_bytes()).into())
    }

    /// The share's point (1 to 255), which officers may use to tell their shares apart.
    pub fn index(&self) -> u8 {
        self.x
    }
}

// Written by hand: the point is public, the payload never shows.
impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("index", &self.x)
            .field("payload", &"[redacted]")
            .finish()
    }
}

/// The SHA-256 digest of a share's text. Not secret: it is in the configuration.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShareDigest([u8; 32]);

impl ShareDigest {
    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Result<Self, QuorumError> {
        let bad = || QuorumError::BadDigest(format!("{text:?}"));
        // Checked first: `from_str_radix` would also take a sign.
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for ShareDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for ShareDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShareDigest({self})")
    }
}

/// The quorum an appliance is configured with: how many shares rebuild the PIN, and the digest
/// of each share of its ceremony.
#[derive(Clone, Debug)]
pub struct QuorumPolicy {
    threshold: usize,
    digests: Vec<ShareDigest>,
}

impl QuorumPolicy {
    /// Checks the threshold against the digests (2 <= threshold <= shares <= 255, no repeats).
    pub fn new(threshold: usize, digests: &[String]) -> Result<Self, QuorumError> {
        check_threshold(threshold, digests.len())?;
        let mut parsed: Vec<ShareDigest> = Vec::with_capacity(digests.len());
        for text in digests {
            let digest = ShareDigest::from_hex(text)?;
            if parsed.contains(&digest) {
                return Err(QuorumError::DuplicateDigest(digest.to_string()));
            }
            parsed.push(digest);
        }
        Ok(Self {
            threshold,
            digests: parsed,
        })
    }

    /// How many distinct shares rebuild the PIN.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Parses `text` and accepts it only if its digest is one of the configured ones.
    pub fn accept(&self, text: &str) -> Result<Share, QuorumError> {
        let share = Share::parse(text)?;
        if self.digests.contains(&share.digest()) {
            Ok(share)
        } else {
            Err(QuorumError::UnknownShare)
        }
    }
}

fn check_threshold(threshold: usize, shares: usize) -> Result<(), QuorumError> {
    if threshold < 2 || threshold > shares || shares > 255 {
        return Err(QuorumError::BadThreshold { threshold, shares });
    }
    Ok(())
}

/// Splits `pin` into `shares` shares of which any `threshold` rebuild it, with randomness from
/// the operating system.
pub fn split(
    pin: &SecretString,
    threshold: usize,
    shares: usize,
) -> Result<Vec<Share>, QuorumError> {
    check_threshold(threshold, shares)?;
    let pin = pin.expose_secret().as_bytes();
    if pin.is_empty() || pin.len() > MAX_PIN_LEN {
        return Err(QuorumError::BadPin(pin.len()));
    }
    // [len] || PIN || random padding.
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    OsRng.fill_bytes(secret.as_mut_slice());
    secret[0] = pin.len() as u8; // At most MAX_PIN_LEN (63), checked above.
    secret[1..=pin.len()].copy_from_slice(pin);
    // coefficients[j][i]: the degree-j coefficient of byte i's polynomial; degree 0 is the
    // secret, the others are uniformly random.
    let mut coefficients = Zeroizing::new(vec![[0u8; SECRET_LEN]; threshold]);
    coefficients[0] = *secret;
    for row in coefficients.iter_mut().skip(1) {
        OsRng.fill_bytes(row);
    }
    let out = (1..=shares)
        .map(|x| {
            let x = x as u8; // At most 255, checked above.
            let mut payload = Zeroizing::new([0u8; SECRET_LEN]);
            for (i, byte) in payload.iter_mut().enumerate() {
                // Horner's rule, from the highest degree down.
                *byte = coefficients
                    .iter()
                    .rev()
                    .fold(0, |acc, row| gf_mul(acc, x) ^ row[i]);
            }
            Share { x, payload }
        })
        .collect();
    Ok(out)
}

/// Rebuilds the PIN from shares of one split. Given fewer than the split's threshold, it gives
/// a wrong secret, which is refused here as [`QuorumError::NotAPin`] when it does not decode
/// (nearly always); so callers must give at least the configured threshold.
pub fn combine(shares: &[Share]) -> Result<SecretString, QuorumError> {
    let secret = interpolate(shares, 0)?;
    let len = usize::from(secret[0]);
    if len == 0 || len > MAX_PIN_LEN {
        return Err(QuorumError::NotAPin);
    }
    let pin = std::str::from_utf8(&secret[1..=len]).map_err(|_| QuorumError::NotAPin)?;
    Ok(SecretString::from(pin.to_owned()))
}

/// The value at `x` of the polynomials through the shares' points (Lagrange interpolation).
fn interpolate(shares: &[Share], x: u8) -> Result<Zeroizing<[u8; SECRET_LEN]>, QuorumError> {
    for (n, share) in shares.iter().enumerate() {
        if shares[..n].iter().any(|other| other.x == share.x) {
            return Err(QuorumError::RepeatedPoint(shares.len()));
        }
    }
    let mut out = Zeroizing::new([0u8; SECRET_LEN]);
    for (j, share) in shares.iter().enumerate() {
        // l_j(x) = prod over m != j of (x - x_m) / (x_j - x_m); minus is xor in GF(2^8).
        let mut numerator = 1u8;
        let mut denominator = 1u8;
        for (m, other) in shares.iter().enumerate() {
            if m != j {
                numerator = gf_mul(numerator, x ^ other.x);
                denominator = gf_mul(denominator, share.x ^ other.x);
            }
        }
        let weight = gf_mul(numerator, gf_inverse(denominator));
        for (byte, value) in out.iter_mut().zip(share.payload.iter()) {
            *byte ^= gf_mul(weight, *value);
        }
    }
    Ok(out)
}

/// Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1, in constant time (masks instead of
/// branches on the operands).
fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    for _ in 0..8 {
        product ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (carry & 0x1b);
        b >>= 1;
    }
    product
}

/// The inverse in GF(2^8): a^254, since a^255 = 1 for every non-zero a (0 maps to 0, which the
/// distinct points above never give).
fn gf_inverse(a: u8) -> u8 {
    let mut result = 1u8;
    let mut power = a;
    let mut exponent = 254u8;
    while exponent > 0 {
        if exponent & 1 == 1 {
            result = gf_mul(result, power);
        }
        power = gf_mul(power, power);
        exponent >>= 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(text: &str) -> SecretString {
        SecretString::from(text.to_owned())
    }

    #[test]
    fn field_arithmetic_matches_the_aes_field() {
        // FIPS 197 section 4.2: {57} x {83} = {c1}.
        assert_eq!(gf_mul(0x57, 0x83), 0xc1);
        for a in 1..=255u8 {
            assert_eq!(gf_mul(a, gf_inverse(a)), 1, "{a}");
        }
    }

    #[test]
    fn any_k_of_n_shares_recombine_to_the_pin() {
        let shares = split(&pin("87654321"), 3, 5).unwrap();
        assert_eq!(shares.len(), 5);
        for a in 0..5 {
            for b in 0..5 {
                for c in 0..5 {
                    if a == b || b == c || a == c {
                        continue;
                    }
                    let chosen = [shares[a].clone(), shares[b].clone(), shares[c].clone()];
                    assert_eq!(combine(&chosen).unwrap().expose_secret(), "87654321");
                }
            }
        }
        // More than the threshold works too.
        assert_eq!(combine(&shares).unwrap().expose_secret(), "87654321");
    }

    #[test]
    fn shares_round_trip_through_their_text() {
        let shares = split(&pin("1234"), 2, 3).unwrap();
        for share in &shares {
            let text = share.to_text();
            assert!(text.starts_with(&format!("smartsign-share-v1.{}.", share.index())));
            let parsed = Share::parse(&format!("  {}\n", text.as_str())).unwrap();
            assert_eq!(parsed.digest(), share.digest());
        }
        let parsed: Vec<Share> = shares
            .iter()
            .skip(1)
            .map(|share| Share::parse(&share.to_text()).unwrap())
            .collect();
        assert_eq!(combine(&parsed).unwrap().expose_secret(), "1234");
    }

    /// With k-1 shares every PIN remains possible: for any candidate there is a k-th share that
    /// makes the k-1 real ones combine to it. So k-1 shares say nothing about the PIN, and
    /// combining them alone does not give it.
    #[test]
    fn fewer_than_k_shares_are_consistent_with_any_pin() {
        let shares = split(&pin("secret-pin-1"), 3, 5).unwrap();
        let known = &shares[..2];
        assert!(
            combine(known).map_or(true, |wrong| wrong.expose_secret() != "secret-pin-1"),
            "two shares of a 3-of-5 split must not rebuild the PIN"
        );
        for candidate in ["0000", "another-pin", "secret-pin-2"] {
            // The secret the candidate would be, and the polynomials through it and the two
            // known shares, evaluated at a third point: a forged share.
            let mut secret = [0u8; SECRET_LEN];
            secret[0] = candidate.len() as u8;
            secret[1..=candidate.len()].copy_from_slice(candidate.as_bytes());
            let origin = Share {
                x: 0,
                payload: Zeroizing::new(secret),
            };
            let mut points = known.to_vec();
            points.push(origin);
            let forged = Share {
                x: 200,
                payload: interpolate(&points, 200).unwrap(),
            };
            let mut three = known.to_vec();
            three.push(forged);
            assert_eq!(combine(&three).unwrap().expose_secret(), candidate);
        }
    }

    #[test]
    fn a_tampered_share_is_refused_by_its_digest() {
        let shares = split(&pin("1234"), 2, 3).unwrap();
        let digests: Vec<String> = shares.iter().map(|s| s.digest().to_string()).collect();
        let policy = QuorumPolicy::new(2, &digests).unwrap();
        assert_eq!(policy.threshold(), 2);
        let text = shares[0].to_text();
        assert!(policy.accept(&text).is_ok());

        // One payload character changed: still a well-formed share, but not one of ours.
        let mut tampered = text.to_string();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'Q' } else { 'A' });
        let outcome = policy.accept(&tampered);
        assert!(
            matches!(
                outcome,
                Err(QuorumError::UnknownShare | QuorumError::Malformed)
            ),
            "{outcome:?}"
        );
        // Another point for the same payload.
        let moved = text.replacen("smartsign-share-v1.1.", "smartsign-share-v1.7.", 1);
        assert_eq!(
            policy.accept(&moved).unwrap_err(),
            QuorumError::UnknownShare
        );
        // A share of another ceremony.
        let other = split(&pin("1234"), 2, 3).unwrap();
        assert_eq!(
            policy.accept(&other[0].to_text()).unwrap_err(),
            QuorumError::UnknownShare
        );
        for garbage in [
            "",
            "hello",
            "smartsign-share-v1.0.AAAA",
            "smartsign-share-v1.01.AA",
        ] {
            assert_eq!(policy.accept(garbage).unwrap_err(), QuorumError::Malformed);
        }
    }

    #[test]
    fn thresholds_and_pins_out_of_range_are_refused() {
        for (k, n) in [(1, 3), (4, 3), (2, 256), (0, 0)] {
            assert!(matches!(
                split(&pin("1234"), k, n),
                Err(QuorumError::BadThreshold { .. })
            ));
        }
        assert_eq!(split(&pin(""), 2, 3).unwrap_err(), QuorumError::BadPin(0));
        let long = "x".repeat(64);
        assert_eq!(
            split(&pin(&long), 2, 3).unwrap_err(),
            QuorumError::BadPin(64)
        );
        assert!(split(&pin(&long[..63]), 2, 255).is_ok());
        let digest = "ab".repeat(32);
        assert!(matches!(
            QuorumPolicy::new(2, &[digest.clone(), digest.clone()]),
            Err(QuorumError::DuplicateDigest(_))
        ));
        for bad in [
            "zz".repeat(32),
            format!("+f{}", "0".repeat(62)),
            "ab".repeat(31),
        ] {
            assert!(matches!(
                QuorumPolicy::new(2, &[digest.clone(), bad]),
                Err(QuorumError::BadDigest(_))
            ));
        }
    }

    #[test]
    fn debug_and_errors_show_no_secret() {
        let shares = split(&pin("debug-pin-9"), 2, 2).unwrap();
        let text = shares[0].to_text();
        let payload = text.rsplit('.').next().unwrap().to_owned();
        let debug = format!("{:?}", shares[0]);
        assert!(debug.contains("redacted"), "{debug}");
        assert!(!debug.contains(&payload), "{debug}");
        let digests: Vec<String> = shares.iter().map(|s| s.digest().to_string()).collect();
        let policy = QuorumPolicy::new(2, &digests).unwrap();
        let debug = format!("{policy:?}");
        assert!(!debug.contains(&payload), "{debug}");
        let rebuilt = combine(&shares).unwrap();
        assert!(!format!("{rebuilt:?}").contains("debug-pin-9"));
        let mut broken = text.to_string();
        broken.push('!');
        let error = policy.accept(&broken).unwrap_err().to_string();
        assert!(!error.contains(&payload), "{error}");
    }
}
