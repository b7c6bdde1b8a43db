//! Wall-clock time as a civil UTC date, for file names and log lines (no time-zone data needed).

use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Utc {
    pub fn now() -> Utc {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Utc::from_unix(secs)
    }

    pub fn from_unix(secs: u64) -> Utc {
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        Utc {
            year: yoe + era * 400 + i64::from(m <= 2),
            month: m as u32,
            day: d as u32,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Utc;

    #[test]
    fn known_dates() {
        let t = |y, mo, d, h, mi, s| Utc {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
            second: s,
        };
        assert_eq!(Utc::from_unix(0), t(1970, 1, 1, 0, 0, 0));
        // 2000-02-29 (a leap day of a century year divisible by 400), `date -d @951782400`.
        assert_eq!(Utc::from_unix(951_782_400), t(2000, 2, 29, 0, 0, 0));
        // 2026-12-05 06:10:11, `date -u -d @1796451011`.
        assert_eq!(Utc::from_unix(1_796_451_011), t(2026, 12, 5, 6, 10, 11));
    }
}
