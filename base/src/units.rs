//! Durations, sizes and rates as every migmon command line writes them, with one rule: a number always carries its
//! unit. A bare `30` is refused, because it meant 30 s in one option and 30 ms in another.
//!
//! | quantity | units | examples |
//! |---|---|---|
//! | duration | `ns`, `us` (`µs`), `ms`, `s`, `m` (`min`), `h` | `250ms`, `1.5s`, `2m` |
//! | size | `B`, `K`/`KiB`/`KB`, `M`/`MiB`/`MB`, `G`/`GiB`/`GB`, `T`/`TiB`/`TB` | `4096B`, `256M`, `32MiB` |
//! | rate | a size per second, the `/s` optional | `125MiB/s`, `125M`, `1G/s` |
//!
//! Sizes and rates are binary whichever spelling is used (`K` = `KB` = `KiB` = 1024), as QEMU's `max-bandwidth`
//! is; the letter of a size unit may be lower case (`256m`). Numbers may have a decimal fraction (`1.5s`,
//! `0.5GiB`); the arithmetic is exact (no floating point) and checked: a value that does not fit is an error, never
//! a panic or a wrap. Space between the number and its unit is allowed.
//!
//! [`DurationArg`], [`Size`] and [`Rate`] are the [`FromStr`] newtypes for clap fields; [`parse_duration`],
//! [`parse_size`] and [`parse_rate`] are the same parsers as plain functions. Each type displays in the largest
//! unit that writes it exactly (`250ms`, `32MiB`, `125MiB/s`), so a displayed value parses back to itself.

use std::{fmt, str::FromStr, time::Duration};

/// Which kind of value a text was meant to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    Duration,
    Size,
    Rate,
}

impl Quantity {
    fn units(self) -> &'static str {
        match self {
            Self::Duration => "ns, us, ms, s, m, h",
            Self::Size => "B, K (KiB), M (MiB), G (GiB), T (TiB)",
            Self::Rate => "B/s, K/s (KiB/s), M/s (MiB/s), G/s (GiB/s), T/s (TiB/s)",
        }
    }

    /// Two examples built on the number the user wrote.
    fn examples(self, number: &str) -> String {
        let n = if number.is_empty() { "30" } else { number };
        match self {
            Self::Duration => format!("{n}s or {n}ms"),
            Self::Size => format!("{n}B or {n}MiB"),
            Self::Rate => format!("{n}MiB/s or {n}M"),
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Duration => "duration",
            Self::Size => "size",
            Self::Rate => "rate",
        })
    }
}

/// A duration, size or rate that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("`{input}`: a {quantity} needs a unit: {units} (for example {examples})",
        units = quantity.units(), examples = quantity.examples(number))]
    MissingUnit {
        input: String,
        number: String,
        quantity: Quantity,
    },
    #[error("`{input}`: `{unit}` is not a {quantity} unit: use {units} (for example {examples})",
        units = quantity.units(), examples = quantity.examples(number))]
    UnknownUnit {
        input: String,
        number: String,
        unit: String,
        quantity: Quantity,
    },
    #[error("`{input}` is not a {quantity}: write a number and a unit, {units} (for example {examples})",
        units = quantity.units(), examples = quantity.examples(""))]
    NotANumber { input: String, quantity: Quantity },
    #[error("`{input}` is too large for a {quantity}")]
    TooLarge { input: String, quantity: Quantity },
    #[error("`{input}`: a rate must be above zero")]
    ZeroRate { input: String },
}

/// A non-negative decimal number as written: `mantissa / 10^scale`.
struct Decimal {
    mantissa: u128,
    scale: u32,
}

impl Decimal {
    /// `self * factor`, truncated (`round` false) or rounded to the nearest integer; `None` when it overflows.
    fn times(&self, factor: u128, round: bool) -> Option<u128> {
        let product = self.mantissa.checked_mul(factor)?;
        let divisor = 10u128.checked_pow(self.scale)?;
        let (quotient, remainder) = (product / divisor, product % divisor);
        // `remainder < divisor <= 10^38`, so doubling it cannot overflow.
        Some(if round && remainder * 2 >= divisor {
            quotient + 1
        } else {
            quotient
        })
    }
}

/// Splits `text` into its number and its unit, or says what is wrong with the number (naming `s`, the whole input).
fn split<'a>(s: &str, text: &'a str, quantity: Quantity) -> Result<(Decimal, &'a str, &'a str), UnitError> {
    let trimmed = text.trim();
    let end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(end);
    let not_a_number = || UnitError::NotANumber {
        input: s.to_owned(),
        quantity,
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(not_a_number());
    }
    let too_large = || UnitError::TooLarge {
        input: s.to_owned(),
        quantity,
    };
    let mut mantissa: u128 = 0;
    for digit in int.bytes().chain(frac.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(digit - b'0')))
            .ok_or_else(too_large)?;
    }
    let scale = u32::try_from(frac.len()).map_err(|_| too_large())?;
    Ok((Decimal { mantissa, scale }, number, unit.trim()))
}

fn missing_or_unknown(s: &str, number: &str, unit: &str, quantity: Quantity) -> UnitError {
    if unit.is_empty() {
        UnitError::MissingUnit {
            input: s.to_owned(),
            number: number.to_owned(),
            quantity,
        }
    } else {
        UnitError::UnknownUnit {
            input: s.to_owned(),
            number: number.to_owned(),
            unit: unit.to_owned(),
            quantity,
        }
    }
}

const NS_PER_SEC: u128 = 1_000_000_000;

/// Nanoseconds per duration unit, largest first (the order [`fmt_duration`] tries them in).
const DURATION_UNITS: [(&str, u128); 6] = [
    ("h", 3600 * NS_PER_SEC),
    ("m", 60 * NS_PER_SEC),
    ("s", NS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

fn duration_unit(unit: &str) -> Option<u128> {
    let unit = match unit {
        "µs" => "us",
        "min" => "m",
        other => other,
    };
    DURATION_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, ns)| ns)
}

/// Reads a duration: `250ms`, `1.5s`, `2m`, `500us`, `1h`. Rounded to the nearest nanosecond.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let quantity = Quantity::Duration;
    let (value, number, unit) = split(s, s, quantity)?;
    let ns_per_unit = duration_unit(unit).ok_or_else(|| missing_or_unknown(s, number, unit, quantity))?;
    let too_large = || UnitError::TooLarge {
        input: s.to_owned(),
        quantity,
    };
    let ns = value.times(ns_per_unit, true).ok_or_else(too_large)?;
    let secs = u64::try_from(ns / NS_PER_SEC).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (ns % NS_PER_SEC) as u32))
}

/// Formats a duration in ns for people, three figures at most: `812 µs`, `12.4 ms`, `5.30 s`.
pub fn fmt_ns(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{} µs", ns / 1000)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}

/// Writes `d` in the largest unit that writes it exactly: `250ms`, `30s`, `2m`, `1500ms`; zero is `0s`.
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_owned();
    }
    let (name, per) = DURATION_UNITS
        .iter()
        .copied()
        .find(|(_, per)| ns.is_multiple_of(*per))
        .unwrap_or(("ns", 1));
    format!("{}{name}", ns / per)
}

/// Binary size units, largest first (the order [`fmt_size`] tries them in).
const SIZE_UNITS: [(&str, u128); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

fn size_unit(unit: &str) -> Option<u128> {
    if unit == "B" {
        return Some(1);
    }
    let mut chars = unit.chars();
    let shift = match chars.next()?.to_ascii_uppercase() {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return None,
    };
    matches!(chars.as_str(), "" | "B" | "iB").then_some(1 << shift)
}

fn parse_bytes(s: &str, text: &str, quantity: Quantity) -> Result<u64, UnitError> {
    let (value, number, unit) = split(s, text, quantity)?;
    let input = || s.to_owned();
    let per = size_unit(unit).ok_or_else(|| missing_or_unknown(&input(), number, unit, quantity))?;
    value
        .times(per, false)
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or_else(|| UnitError::TooLarge {
            input: input(),
            quantity,
        })
}

/// Reads a size in bytes: `4096B`, `256M`, `32MiB`, `1.5G`. Binary units; a fraction of a byte is dropped.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    parse_bytes(s, s, Quantity::Size)
}

/// Writes `bytes` in the largest binary unit that writes it exactly: `32MiB`, `1536KiB`, `4097B`.
pub fn fmt_size(bytes: u64) -> String {
    let bytes = u128::from(bytes);
    if bytes == 0 {
        return "0B".to_owned();
    }
    let (name, per) = SIZE_UNITS
        .iter()
        .copied()
        .find(|(_, per)| bytes.is_multiple_of(*per))
        .unwrap_or(("B", 1));
    format!("{}{name}", bytes / per)
}

/// Reads a rate in bytes per second: `125MiB/s`, `125M`, `1G/s`. Zero is refused.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let trimmed = s.trim();
    let per_second = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    let rate = parse_bytes(s, per_second, Quantity::Rate)?;
    if rate == 0 {
        return Err(UnitError::ZeroRate { input: s.to_owned() });
    }
    Ok(rate)
}

/// Writes a rate as a size per second: `125MiB/s`.
pub fn fmt_rate(bytes_per_sec: u64) -> String {
    format!("{}/s", fmt_size(bytes_per_sec))
}

/// A duration read from a command line (see the [module doc](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationArg(pub Duration);

impl FromStr for DurationArg {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_duration(s).map(Self)
    }
}

impl fmt::Display for DurationArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&fmt_duration(self.0))
    }
}

impl From<Duration> for DurationArg {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<DurationArg> for Duration {
    fn from(d: DurationArg) -> Self {
        d.0
    }
}

/// A size in bytes read from a command line (see the [module doc](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_size(s).map(Self)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&fmt_size(self.0))
    }
}

/// A rate in bytes per second read from a command line (see the [module doc](self)); never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(pub u64);

impl FromStr for Rate {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_rate(s).map(Self)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&fmt_rate(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn durations_in_every_unit() {
        for (text, want) in [
            ("30ms", Duration::from_millis(30)),
            ("8s", Duration::from_secs(8)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("2.s", Duration::from_secs(2)),
            ("2m", Duration::from_secs(120)),
            ("2min", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            ("1.5ns", Duration::from_nanos(2)),
            ("0.1ms", Duration::from_micros(100)),
            (" 30 ms ", Duration::from_millis(30)),
            ("0s", Duration::ZERO),
            ("0.000000001s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
            assert_eq!(text.parse::<DurationArg>(), Ok(DurationArg(want)), "{text}");
        }
    }

    #[test]
    fn a_bare_number_is_refused_naming_the_units() {
        let err = parse_duration("30").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`30`: a duration needs a unit: ns, us, ms, s, m, h (for example 30s or 30ms)"
        );
        let err = parse_size("4096").unwrap_err();
        assert!(matches!(err, UnitError::MissingUnit { .. }), "{err:?}");
        assert!(
            err.to_string().contains("a size needs a unit: B, K (KiB)"),
            "{err}"
        );
        assert!(err.to_string().contains("4096B or 4096MiB"), "{err}");
        let err = parse_rate("125").unwrap_err();
        assert!(err.to_string().contains("a rate needs a unit"), "{err}");
        assert!(parse_duration("0").is_err());
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "", " ", "ms", "-1s", "+1s", "1..2s", "1.2.3s", "5x", "5 s s", "s5", "1e3s", "5S", "1_000ms",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.to_string().contains("ns, us, ms, s, m, h"), "{bad}: {err}");
        }
        for bad in ["", "M", "5X", "5Mb", "5MIB", "5KIB", "-1M", "1.5.1M", "5 /s"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for bad in ["", "M/s", "5X/s", "5M/h", "5/s"] {
            let err = parse_rate(bad).expect_err(bad);
            assert!(err.to_string().starts_with(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_are_binary_in_every_spelling() {
        for (text, want) in [
            ("4096B", 4096),
            ("256M", 256 * MIB),
            ("256m", 256 * MIB),
            ("32MiB", 32 * MIB),
            ("32MB", 32 * MIB),
            ("500KiB", 500 << 10),
            ("500k", 500 << 10),
            ("500kB", 500 << 10),
            ("1G", 1 << 30),
            ("1GiB", 1 << 30),
            ("1g", 1 << 30),
            ("2T", 2 << 40),
            ("1.5G", 3 << 29),
            ("0.1K", 102),
            ("1.5B", 1),
            ("0B", 0),
            ("32 MiB", 32 * MIB),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
            assert_eq!(text.parse::<Size>(), Ok(Size(want)), "{text}");
        }
    }

    #[test]
    fn rates_take_an_optional_per_second() {
        for (text, want) in [
            ("125MiB/s", 125 * MIB),
            ("125M/s", 125 * MIB),
            ("125M", 125 * MIB),
            ("1GiB/s", 1 << 30),
            ("1000B/s", 1000),
            ("1000B", 1000),
            ("0.5K/s", 512),
        ] {
            assert_eq!(parse_rate(text), Ok(want), "{text}");
            assert_eq!(text.parse::<Rate>(), Ok(Rate(want)), "{text}");
        }
        for zero in ["0B/s", "0M", "0.1B/s"] {
            assert_eq!(
                parse_rate(zero),
                Err(UnitError::ZeroRate {
                    input: zero.to_owned()
                }),
                "{zero}"
            );
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        assert!(matches!(parse_size("16384P"), Err(UnitError::UnknownUnit { .. })));
        for big in [
            "16777216T",
            "18446744073709551616B",
            "99999999999999999999999999999999999999999B",
        ] {
            assert!(
                matches!(parse_size(big), Err(UnitError::TooLarge { .. })),
                "{big}"
            );
        }
        assert_eq!(parse_size("18446744073709551615B"), Ok(u64::MAX));
        assert_eq!(parse_size("16777215.999T"), Ok(u64::MAX - (1 << 40) / 1000));
        for big in [
            "18446744073709551616s",
            "5124095576030432h",
            "1000000000000000000000000000000000000000000000000ns",
        ] {
            assert!(
                matches!(parse_duration(big), Err(UnitError::TooLarge { .. })),
                "{big}"
            );
        }
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
        let long_fraction = format!("1.{}s", "0".repeat(60));
        assert!(matches!(
            parse_duration(&long_fraction),
            Err(UnitError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_rate("16777216T/s"),
            Err(UnitError::TooLarge { .. })
        ));
    }

    #[test]
    fn display_round_trips() {
        for (d, text) in [
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_nanos(1_000_001), "1000001ns"),
            (Duration::from_micros(3), "3us"),
            (Duration::ZERO, "0s"),
            (Duration::from_secs(u64::MAX), "18446744073709551615s"),
        ] {
            assert_eq!(DurationArg(d).to_string(), text);
            assert_eq!(text.parse::<DurationArg>(), Ok(DurationArg(d)), "{text}");
        }
        for (bytes, text) in [
            (32 * MIB, "32MiB"),
            (1536 << 10, "1536KiB"),
            (4097, "4097B"),
            (0, "0B"),
            (1 << 40, "1TiB"),
            (u64::MAX, "18446744073709551615B"),
        ] {
            assert_eq!(Size(bytes).to_string(), text);
            assert_eq!(text.parse::<Size>(), Ok(Size(bytes)), "{text}");
        }
        assert_eq!(Rate(125 * MIB).to_string(), "125MiB/s");
        assert_eq!("125MiB/s".parse::<Rate>(), Ok(Rate(125 * MIB)));
        assert_eq!(format!("{:>7}", DurationArg(Duration::from_secs(1))), "     1s");
    }
}
