//! Wall-clock timestamps for responses: RFC 3339 in UTC with milliseconds, and Unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// A moment as both forms the API shows: `2025-11-25T22:40:00.123Z` and Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub unix_ms: u64,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    /// RFC 3339, UTC, millisecond precision, e.g. `2025-11-25T22:40:00.123Z`.
    pub fn rfc3339(&self) -> String {
        let secs = self.unix_ms / 1000;
        let millis = self.unix_ms % 1000;
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Timestamp {
        // A clock before 1970 is a broken host; show the epoch rather than fail a request.
        let unix_ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp { unix_ms }
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_formats_as_1970() {
        assert_eq!(
            Timestamp { unix_ms: 0 }.rfc3339(),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn known_instants_format_exactly() {
        // 2000-02-29T12:34:56.789Z: a leap day in a century leap year.
        assert_eq!(
            Timestamp {
                unix_ms: 951_827_696_789
            }
            .rfc3339(),
            "2000-02-29T12:34:56.789Z"
        );
        // 2025-11-25T22:40:00.000Z
        assert_eq!(
            Timestamp {
                unix_ms: 1_764_110_400_000
            }
            .rfc3339(),
            "2025-11-25T22:40:00.000Z"
        );
        // 2100-03-01: 2100 is not a leap year.
        assert_eq!(
            Timestamp {
                unix_ms: 4_107_542_400_000
            }
            .rfc3339(),
            "2100-03-01T00:00:00.000Z"
        );
    }
}
