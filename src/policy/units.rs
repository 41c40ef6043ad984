//! The human units policies are written in: durations (`90d`, `1h30m`), transfer rates
//! (`20 MiB/s`) and percentages (`10%`).

use std::time::Duration;

/// What a duration looks like, for error messages.
pub const DURATION_FORMAT: &str =
    "a duration such as \"45s\", \"10m\", \"1h30m\", \"7d\" or \"2w\"";

/// What a rate looks like, for error messages.
pub const RATE_FORMAT: &str = "a rate such as \"500 KiB/s\", \"20 MiB/s\" or \"1 GiB/s\"";

/// Parses `1h30m`, `90d`, `2w`, `45s` (units s, m, h, d, w; parts in any order, summed).
///
/// # Errors
/// A message naming the part that is not understood.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("an empty string".into());
    }
    if !t.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("not a number followed by a unit".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut seen_part = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if c == ' ' {
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(format!("the unknown unit {c:?}")),
        };
        if digits.is_empty() {
            return Err(format!("the unit {c:?} without a number"));
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| "a number too large".to_string())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| "a duration too large".to_string())?;
        digits.clear();
        seen_part = true;
    }
    if !digits.is_empty() {
        return Err(format!("the number {digits} without a unit"));
    }
    if !seen_part {
        return Err("no duration".into());
    }
    Ok(Duration::from_secs(total))
}

/// Parses a rate into KiB/s: `<number> <unit>/s` with units B, KiB, MiB, GiB (and KB, MB,
/// GB as powers of 1000).
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_rate_kib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let Some(body) = t.strip_suffix("/s") else {
        return Err("no \"/s\" at the end".into());
    };
    let body = body.trim();
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("the number {num:?} does not parse"))?;
    let mult: f64 = match unit.trim() {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1000.0,
        "MB" => 1_000_000.0,
        "GB" => 1_000_000_000.0,
        other => return Err(format!("the unknown unit {other:?}")),
    };
    let kib = (n * mult / 1024.0).round();
    if !(1.0..=1e12).contains(&kib) {
        return Err("a rate below 1 KiB/s or absurdly large".into());
    }
    Ok(kib as u64)
}

/// Parses `10%` (0 < p <= 100) into a fraction.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let Some(n) = text.trim().strip_suffix('%') else {
        return Err("no \"%\" at the end".into());
    };
    let v: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("the number {n:?} does not parse"))?;
    if v <= 0.0 || v > 100.0 {
        return Err(format!("{v}% is not above 0% and at most 100%"));
    }
    Ok(v / 100.0)
}

/// Writes a duration the way it is parsed (`1d2h`).
pub fn format_duration(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        assert_eq!(
            parse_duration("1d 12h").unwrap(),
            Duration::from_secs(129_600)
        );
        assert!(parse_duration("10").unwrap_err().contains("without a unit"));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_secs(93_784)), "1d2h3m4s");
        for s in ["1d2h3m4s", "7d", "90m"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }

    #[test]
    fn rates_and_percents() {
        assert_eq!(parse_rate_kib("20 MiB/s").unwrap(), 20 * 1024);
        assert_eq!(parse_rate_kib("512KiB/s").unwrap(), 512);
        assert_eq!(parse_rate_kib("1 MB/s").unwrap(), 977);
        assert!(parse_rate_kib("20 MiB").is_err());
        assert!(parse_rate_kib("20 furlongs/s").is_err());
        assert!(parse_rate_kib("10 B/s").is_err());
        assert!((parse_percent("10%").unwrap() - 0.1).abs() < 1e-9);
        assert!(parse_percent("0%").is_err());
        assert!(parse_percent("150%").is_err());
        assert!(parse_percent("10").is_err());
    }
}
