//! A cheaper text log format for the decision line, which is written once per request.
//!
//! tracing-subscriber's default field formatter Debug-escapes every string character by
//! character and its timestamp is rebuilt from the calendar for every line; together that
//! cost as much as the decision itself (BENCHMARKS.md, "What limits what"). These two
//! replacements write the same line: `name="value"` with the escapes Rust's Debug uses for
//! quotes, backslashes and control characters (plain runs are copied at once), and the
//! RFC 3339 timestamp with its date and time part formatted once per second and thread.

use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Field formatter: `message k="v" n=1`, values escaped only where needed.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuickFields;

impl<'writer> FormatFields<'writer> for QuickFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            w: writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'a> {
    w: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn sep(&mut self) -> fmt::Result {
        if self.first {
            self.first = false;
            Ok(())
        } else {
            self.w.write_char(' ')
        }
    }

    fn name(&mut self, field: &Field) -> fmt::Result {
        self.sep()?;
        self.w.write_str(field.name())?;
        self.w.write_char('=')
    }
}

/// Writes `s` quoted, escaping `"`, `\` and control characters as Rust's Debug does.
pub fn write_quoted(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let esc = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            c if c.is_control() => None,
            _ => continue,
        };
        w.write_str(&s[plain..i])?;
        match esc {
            Some(e) => w.write_str(e)?,
            None => write!(w, "\\u{{{:x}}}", c as u32)?,
        }
        plain = i + c.len_utf8();
    }
    w.write_str(&s[plain..])?;
    w.write_char('"')
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            self.sep().and_then(|()| self.w.write_str(value))
        } else {
            self.name(field)
                .and_then(|()| write_quoted(&mut self.w, value))
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| write!(self.w, "{value}"));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| write!(self.w, "{value}"));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| write!(self.w, "{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        // `message` arrives as format arguments: Debug prints them as written.
        self.result = if field.name() == "message" {
            self.sep().and_then(|()| write!(self.w, "{value:?}"))
        } else {
            self.name(field).and_then(|()| write!(self.w, "{value:?}"))
        };
    }
}

/// RFC 3339 UTC timestamps with microseconds, `2026-11-28T21:55:03.794734Z`, the date and
/// time of day formatted once per second (per thread).
#[derive(Debug, Default, Clone, Copy)]
pub struct CachedTime;

thread_local! {
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `YYYY-MM-DDTHH:MM:SS` of Unix second `secs` (proleptic Gregorian, UTC).
pub fn format_second(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl FormatTime for CachedTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        SECOND.with(|cell| {
            let mut c = cell.borrow_mut();
            if c.0 != secs {
                *c = (secs, format_second(secs));
            }
            write!(w, "{}.{:06}Z", c.1, now.subsec_micros())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_matches_rust_debug() {
        for s in [
            "plain@example.org",
            "",
            "a\"b\\c",
            "tab\there\nnewline\rcr",
            "bell\u{7}esc\u{1b}del\u{7f}",
            "ünïcödé ✓",
        ] {
            let mut out = String::new();
            write_quoted(&mut out, s).unwrap();
            assert_eq!(out, format!("{s:?}"), "{s:?}");
        }
    }

    #[test]
    fn seconds_format_as_rfc3339_dates() {
        assert_eq!(format_second(0), "1970-01-01T00:00:00");
        assert_eq!(format_second(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(format_second(1_795_901_703), "2026-11-28T21:35:03");
        assert_eq!(format_second(4_102_444_799), "2099-12-31T23:59:59");
        for t in [1u64, 86_399, 1_700_000_000, 2_000_000_000] {
            let want = jiff::Timestamp::from_second(t as i64)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%S")
                .to_string();
            assert_eq!(format_second(t), want);
        }
    }
}
