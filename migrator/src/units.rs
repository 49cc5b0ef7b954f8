//! Parsing of the CLI's durations (`30ms`, `8s`), sizes (`256M`) and rates (`125M`, `1G/s`, `100MiB/s`).
//! Sizes and rates use binary units (K = 1024), as QEMU's `max-bandwidth` does.

use std::time::Duration;

/// A value the CLI could not read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {what} {input:?}: {hint}")]
pub struct UnitError {
    what: &'static str,
    input: String,
    hint: &'static str,
}

fn split_number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let n: f64 = s[..end].parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some((n, s[end..].trim()))
}

/// `500us`, `30ms`, `1.5s`, `2m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let err = || UnitError {
        what: "duration",
        input: s.to_owned(),
        hint: "use e.g. 30ms, 8s, 1.5s, 2m",
    };
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

fn binary_multiplier(unit: &str) -> Option<f64> {
    Some(match unit {
        "" | "B" => 1.0,
        "K" | "k" | "KiB" | "KB" => 1024.0,
        "M" | "MiB" | "MB" => 1024.0 * 1024.0,
        "G" | "GiB" | "GB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" | "TB" => 1024.0_f64.powi(4),
        _ => return None,
    })
}

/// `256M`, `1G`, `4096`: bytes.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError {
        what: "size",
        input: s.to_owned(),
        hint: "use e.g. 256M, 1G, 4096",
    };
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let m = binary_multiplier(unit).ok_or_else(err)?;
    Ok((n * m) as u64)
}

/// `125M`, `125M/s`, `1GiB/s`, `1000000`: bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError {
        what: "rate",
        input: s.to_owned(),
        hint: "use e.g. 125M (MiB/s), 1G, 100MiB/s",
    };
    let trimmed = s.trim();
    let number = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    let (value, unit) = split_number(number).ok_or_else(err)?;
    let multiplier = binary_multiplier(unit).ok_or_else(err)?;
    let rate = (value * multiplier) as u64;
    if rate == 0 { Err(err()) } else { Ok(rate) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30ms").unwrap(), Duration::from_millis(30));
        assert_eq!(parse_duration("8s").unwrap(), Duration::from_secs(8));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "ms", "-1s", "5h", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_rate("125M").unwrap(), 125 << 20);
        assert_eq!(parse_rate("1GiB/s").unwrap(), 1 << 30);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        for bad in ["", "0", "5X", "M/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
