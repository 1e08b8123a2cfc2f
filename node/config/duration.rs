//! Human-readable durations in config files: "500ms", "30s", "5m", "1h".

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

/// A `Duration` that deserializes from strings such as `"30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(ConfigDuration)
            .map_err(de::Error::custom)
    }
}

/// The longest duration a config may hold. Every timeout and interval is
/// added to clock readings; a day keeps that arithmetic far from overflow
/// and is longer than any of them needs to be.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses `<integer><unit>` with unit one of ms, s, m, h; at most a day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let hint = || {
        format!("invalid duration {text:?}: write a number and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"1h\"")
    };
    let too_long = || format!("duration {text:?} is too long: at most 24h");
    let amount: u64 = match digits.parse() {
        Ok(amount) => amount,
        // All digits, and still no u64: far past a day.
        Err(_) if !digits.is_empty() && matches!(unit, "ms" | "s" | "m" | "h") => {
            return Err(too_long())
        }
        Err(_) => return Err(hint()),
    };
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(hint()),
    };
    let duration = amount
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(too_long)?;
    Ok(duration)
}

/// The inverse of `parse_duration`, for messages and `GetConfig`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis % 1000 != 0 {
        format!("{millis}ms")
    } else {
        format!("{}s", duration.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit_and_rejects_the_rest() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("30").unwrap_err().contains("unit"));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn refuses_more_than_a_day_without_overflowing() {
        assert_eq!(parse_duration("24h"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("86400s"), Ok(MAX_DURATION));
        for long in [
            "25h",
            "86401s",
            "18446744073709551615s",
            "18446744073709551615h",
            "99999999999999999999999ms",
        ] {
            assert!(
                parse_duration(long).unwrap_err().contains("at most 24h"),
                "{long}"
            );
        }
    }
}
