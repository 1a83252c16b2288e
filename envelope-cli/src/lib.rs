//! The `envelope` command's library: the configuration and the migration engine over live
//! tables. The binary is a thin layer over these modules (its `kms-emulator` command runs the
//! envelope-kms-emulator crate); tests use them directly.
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod db;
pub mod engine;
pub mod job;
pub mod keys;
pub mod report;
pub mod values;

use std::time::Duration;

/// Parse a duration such as `500ms`, `0.5s`, `15s`, `10m`, `2h` or `30d`.
///
/// # Errors
/// A message naming the accepted units.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (for example 500ms, 0.5s, 10m, 2h, 30d)"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{s:?}: the unit is one of ms, s, m, h, d")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
