//! Civil dates as day numbers since 1970-01-01 (proleptic Gregorian, H.
//! Hinnant's algorithms): the data generator's visit dates and the
//! administrator's `--since` and audit times share them.

/// Days since 1970-01-01 of a civil date.
pub fn day_of(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of a day number.
pub fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_numbers_round_trip() {
        assert_eq!(day_of(1970, 1, 1), 0);
        assert_eq!(civil(0), (1970, 1, 1));
        for d in [-800_000, -1, 59, 60, 11_016, 20_423, 2_000_000] {
            let (y, m, dd) = civil(d);
            assert_eq!(day_of(y, m, dd), d);
        }
        assert_eq!(civil(day_of(2024, 2, 29) + 1), (2024, 3, 1));
    }
}
