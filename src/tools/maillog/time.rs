//! The timestamp at the start of a log line: classic syslog (`Nov 28 19:31:46`, no year,
//! no zone) or ISO 8601 / RFC 5424 (`2026-11-28T19:31:46.123456+00:00`), and the [`Clock`]
//! that gives year-less timestamps their year. Pure arithmetic: no time-zone database.

/// Milliseconds since the Unix epoch (UTC for ISO timestamps; classic syslog timestamps
/// carry no zone and are taken as UTC, which keeps differences between them right).
pub type Ts = i64;

/// Turns classic timestamps (no year) into absolute ones: starts from a given year and
/// moves to the next year when the month goes from December back to January.
#[derive(Debug, Clone)]
pub struct Clock {
    year: i64,
    last_month: u8,
    /// The current month when reading live logs: a first line from a later month must be
    /// from last year (a December log read in January).
    now_month: Option<u8>,
}

impl Clock {
    /// The clock for `--year`, or for today (UTC year and month) when none is given.
    pub fn for_year_or_today(year: Option<i64>) -> Self {
        match year {
            Some(y) => Clock::new(y),
            None => {
                // Today's year and month from the formatted timestamp: no time-zone
                // database needed.
                let now = jiff::Timestamp::now().strftime("%Y %m").to_string();
                let mut it = now.split(' ').filter_map(|v| v.parse::<i64>().ok());
                let (year, month) = (it.next().unwrap_or(2026), it.next().unwrap_or(1));
                Clock::for_now(year, u8::try_from(month).unwrap_or(1))
            }
        }
    }

    /// `year`: the year the first classic line belongs to.
    pub fn new(year: i64) -> Self {
        Clock {
            year,
            last_month: 0,
            now_month: None,
        }
    }

    /// For logs read now: `year` and `month` are today's.
    pub fn for_now(year: i64, month: u8) -> Self {
        Clock {
            now_month: Some(month),
            ..Clock::new(year)
        }
    }

    fn classic(&mut self, month: u8, day: u8, secs_of_day: i64) -> Ts {
        if self.last_month == 0 && self.now_month.is_some_and(|now| month > now) {
            self.year -= 1;
        }
        if self.last_month == 12 && month == 1 {
            self.year += 1;
        }
        self.last_month = month;
        (days_from_civil(self.year, month, day) * 86_400 + secs_of_day) * 1000
    }
}

/// The timestamp at the start of a line (classic syslog or ISO 8601) and the rest after it.
pub fn timestamp<'a>(line: &'a [u8], clock: &mut Clock) -> Option<(Ts, &'a [u8])> {
    if line.first().is_some_and(u8::is_ascii_digit) {
        iso(line)
    } else {
        classic(line, clock)
    }
}

/// `Nov 28 19:31:46` (day space-padded: `Nov  8`).
fn classic<'a>(line: &'a [u8], clock: &mut Clock) -> Option<(Ts, &'a [u8])> {
    let head = line.get(..15)?;
    let month = match &head[..3] {
        b"Jan" => 1,
        b"Feb" => 2,
        b"Mar" => 3,
        b"Apr" => 4,
        b"May" => 5,
        b"Jun" => 6,
        b"Jul" => 7,
        b"Aug" => 8,
        b"Sep" => 9,
        b"Oct" => 10,
        b"Nov" => 11,
        b"Dec" => 12,
        _ => return None,
    };
    if head[3] != b' ' || head[6] != b' ' {
        return None;
    }
    let day = match head[4] {
        b' ' => digits(&head[5..6])?,
        _ => digits(&head[4..6])?,
    };
    if !(1..=31).contains(&day) {
        return None;
    }
    let secs = hms(&head[7..15])?;
    Some((clock.classic(month as u8, day as u8, secs), &line[15..]))
}

/// `2026-11-28T19:31:46[.ffffff](Z|+hh:mm|-hh:mm)`.
fn iso(line: &[u8]) -> Option<(Ts, &[u8])> {
    let (local, mut rest) = date_time(line, b"T ")?;
    let (millis, r) = fraction(rest);
    rest = r;
    let mut offset = 0i64;
    if let Some(r) = rest.strip_prefix(b"Z") {
        rest = r;
    } else if let Some(sign) = rest.first().filter(|b| matches!(b, b'+' | b'-')) {
        let z = rest.get(1..6)?;
        if z[2] != b':' {
            return None;
        }
        offset =
            (digits(&z[..2])? * 3600 + digits(&z[3..5])? * 60) * if *sign == b'-' { -1 } else { 1 };
        rest = &rest[6..];
    }
    Some(((local - offset) * 1000 + millis, rest))
}

/// Exim's mainlog timestamp: `2026-11-28 19:31:46`, with `.123` when `log_selector` has
/// `+millisec` and ` +0100` when `log_timezone` is set. Without a zone the time is local
/// and taken as UTC, like a classic syslog time: differences between lines stay right.
pub fn exim_timestamp(line: &[u8]) -> Option<(Ts, &[u8])> {
    let (local, rest) = date_time(line, b" ")?;
    if let Some(frac) = rest.strip_prefix(b".") {
        // `+millisec`: exactly three digits.
        if frac.iter().take_while(|b| b.is_ascii_digit()).count() != 3 {
            return None;
        }
    }
    let (millis, mut rest) = fraction(rest);
    let mut offset = 0i64;
    // ` +hhmm` / ` -hhmm`, then a space or the end: message ids and `[pid]` never start
    // with a sign.
    if let Some(z) = rest
        .get(1..6)
        .filter(|z| rest[0] == b' ' && matches!(z[0], b'+' | b'-'))
        && rest.get(6).is_none_or(|&b| b == b' ')
    {
        let (h, m) = (digits(&z[1..3])?, digits(&z[3..5])?);
        if h > 23 || m > 59 {
            return None;
        }
        offset = (h * 3600 + m * 60) * if z[0] == b'-' { -1 } else { 1 };
        rest = &rest[6..];
    }
    Some(((local - offset) * 1000 + millis, rest))
}

/// `2026-11-28?19:31:46` where `?` is one of `seps`: seconds since the epoch (the time
/// read as UTC) and the rest of the line.
fn date_time<'a>(line: &'a [u8], seps: &[u8]) -> Option<(i64, &'a [u8])> {
    let head = line.get(..19)?;
    if head[4] != b'-' || head[7] != b'-' || !seps.contains(&head[10]) {
        return None;
    }
    let year = digits(&head[..4])?;
    let month = digits(&head[5..7])?;
    let day = digits(&head[8..10])?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let secs = hms(&head[11..19])?;
    let days = days_from_civil(year, month as u8, day as u8);
    Some((days * 86_400 + secs, &line[19..]))
}

/// An optional `.fff...` fraction of a second: milliseconds (the first three digits) and
/// the rest after all its digits.
fn fraction(rest: &[u8]) -> (i64, &[u8]) {
    let Some(frac) = rest.strip_prefix(b".") else {
        return (0, rest);
    };
    let n = frac.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut millis = 0i64;
    let mut scale = 100;
    for &b in frac.iter().take(n.min(3)) {
        millis += i64::from(b - b'0') * scale;
        scale /= 10;
    }
    (millis, &frac[n..])
}

/// `19:31:46` as seconds of the day.
fn hms(b: &[u8]) -> Option<i64> {
    if b[2] != b':' || b[5] != b':' {
        return None;
    }
    let (h, m, s) = (digits(&b[..2])?, digits(&b[3..5])?, digits(&b[6..8])?);
    (h < 24 && m < 60 && s < 61).then_some(h * 3600 + m * 60 + s)
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }
}
