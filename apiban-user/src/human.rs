//! Durations and rate limits written the way operators write them: `90s`, `5m`, `24h`, `7d`,
//! `11/120s`.

use std::{fmt, str::FromStr, time::Duration};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("`{0}` is not a duration; write a number and a unit, e.g. 90s, 5m, 24h, 7d")]
    Duration(String),
    #[error("`{0}` is not a rate limit; write requests/window, e.g. 11/120s")]
    RateLimit(String),
}

/// Parses `500ms`, `90s`, `5m`, `24h`, `7d`, `1w`, or combinations such as `1h30m`, with
/// humantime; a bare number is seconds, as in the config files operators already have.
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    let s = text.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|_| ParseError::Duration(text.to_owned()))
}

/// The shortest exact human form: `7d`, `90s`, `1h30m`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let mut out = String::new();
    let mut secs = d.as_secs();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    let ms = d.subsec_millis();
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

/// A clap/serde-friendly wrapper around [`Duration`] that parses and prints the human form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(Self)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

/// At most `requests` requests in any window of `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub window: Duration,
}

impl RateLimit {
    /// APIBAN's documented limit: 11 requests per 2 minutes per key.
    pub const APIBAN: Self = Self {
        requests: 11,
        window: Duration::from_secs(120),
    };
}

impl FromStr for RateLimit {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::RateLimit(s.to_owned());
        let (n, window) = s.trim().split_once('/').ok_or_else(err)?;
        let requests: u32 = n.trim().parse().map_err(|_| err())?;
        let window = parse_duration(window).map_err(|_| err())?;
        if requests == 0 || window.is_zero() {
            return Err(err());
        }
        Ok(Self { requests, window })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.requests, format_duration(self.window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_people_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        for bad in ["", "s", "7x", "-5s", "h5", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn durations_round_trip_through_their_display() {
        for text in ["7d", "1m30s", "1h30m", "250ms", "1d2h3m4s"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(format_duration(d), text);
        }
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn rate_limits() {
        assert_eq!("11/120s".parse::<RateLimit>(), Ok(RateLimit::APIBAN));
        assert_eq!(
            "5/2m".parse::<RateLimit>(),
            Ok(RateLimit {
                requests: 5,
                window: Duration::from_secs(120)
            })
        );
        for bad in ["11", "0/120s", "11/0s", "x/1m", "11/forever"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad} should not parse");
        }
        assert_eq!(RateLimit::APIBAN.to_string(), "11/2m");
    }
}
