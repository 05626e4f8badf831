//! Time conversions and the two renderings Hubble uses: protojson's RFC 3339 (`-o json`)
//! and Go's `time.StampMilli` (compact and dict output). No time-zone database: the
//! human-readable forms are printed in UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

/// A wall-clock time as a protobuf timestamp (times before 1970 are clamped to the epoch).
pub fn timestamp(time: SystemTime) -> Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        // Always < 1e9, so it fits.
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// Nanoseconds since the epoch, or `None` for a timestamp protobuf calls invalid (nanos out
/// of range, before year 1 or after year 9999), which Hubble rejects.
pub fn nanos(ts: &Timestamp) -> Option<i128> {
    const MIN_SECONDS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(0..1_000_000_000).contains(&ts.nanos) || !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds)
    {
        return None;
    }
    Some(i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos))
}

/// Nanoseconds since the epoch for a wall-clock time.
pub fn system_nanos(time: SystemTime) -> i128 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    }
}

struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

fn civil(seconds: i64) -> Civil {
    let days = seconds.div_euclid(86_400);
    let secs_of_day = seconds.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let narrow = |v: i64| u32::try_from(v).unwrap_or(0);
    Civil {
        year,
        month: narrow(month),
        day: narrow(day),
        hour: narrow(secs_of_day / 3600),
        minute: narrow(secs_of_day % 3600 / 60),
        second: narrow(secs_of_day % 60),
    }
}

/// protojson's rendering of a `Timestamp`: `2024-05-01T10:20:30.123456789Z`, with 0, 3, 6 or
/// 9 fractional digits.
pub fn rfc3339(ts: &Timestamp) -> String {
    let c = civil(ts.seconds);
    let mut out = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    );
    let nanos = ts.nanos.clamp(0, 999_999_999);
    if nanos != 0 {
        if nanos % 1_000_000 == 0 {
            out.push_str(&format!(".{:03}", nanos / 1_000_000));
        } else if nanos % 1_000 == 0 {
            out.push_str(&format!(".{:06}", nanos / 1_000));
        } else {
            out.push_str(&format!(".{nanos:09}"));
        }
    }
    out.push('Z');
    out
}

/// Go's `time.StampMilli` (`Jan _2 15:04:05.000`), in UTC; `N/A` for an invalid timestamp,
/// as the CLI prints.
pub fn stamp_milli(ts: Option<&Timestamp>) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let Some(ts) = ts.filter(|ts| nanos(ts).is_some()) else {
        return "N/A".to_owned();
    };
    let c = civil(ts.seconds);
    let month = MONTHS[usize::try_from(c.month.saturating_sub(1)).unwrap_or(0) % 12];
    format!(
        "{month} {:>2} {:02}:{:02}:{:02}.{:03}",
        c.day,
        c.hour,
        c.minute,
        c.second,
        ts.nanos / 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_protojson() {
        let ts = |seconds, nanos| Timestamp { seconds, nanos };
        assert_eq!(rfc3339(&ts(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(&ts(1_717_243_200, 435_000_000)),
            "2024-06-01T12:00:00.435Z"
        );
        assert_eq!(
            rfc3339(&ts(1_717_243_200, 435_393_000)),
            "2024-06-01T12:00:00.435393Z"
        );
        assert_eq!(
            rfc3339(&ts(1_717_243_200, 435_393_153)),
            "2024-06-01T12:00:00.435393153Z"
        );
        assert_eq!(rfc3339(&ts(951_782_400, 0)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn stamp_milli_matches_go_layout() {
        let ts = Timestamp {
            seconds: 1_717_243_200 + 5 * 86_400,
            nanos: 7_000_000,
        };
        assert_eq!(stamp_milli(Some(&ts)), "Jun  6 12:00:00.007");
        assert_eq!(stamp_milli(None), "N/A");
        let bad = Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(stamp_milli(Some(&bad)), "N/A");
    }
}
