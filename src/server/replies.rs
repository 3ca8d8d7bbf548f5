//! How decisions are spelled to the MTA, for every front end: the deferral of a policy
//! reply (`DEFER_IF_PERMIT`, `DEFER` or an explicit code) and of a milter reply, the text
//! with `{remaining}` filled in, the store-failure deferral, and the `X-Greylist` header.
//! A reload swaps one `Replies` in whole.

use std::fmt::Write as _;
use std::str::FromStr;

use crate::engine::{Decision, Rule, Verdict};
use crate::service::Outcome;

/// Text of the deferral when the store failed and `fail_mode = closed`.
const STORE_FAILED: &str = "Greylisting is temporarily unavailable, please try again later";

/// The enhanced status code of a store-failure deferral.
const STORE_FAILED_DSN: &str = "4.3.0";

/// How a deferral is spelled in a policy reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeferAction {
    DeferIfPermit,
    Defer,
    /// An explicit reply code, e.g. `451 4.7.1`.
    Code(String),
}

impl DeferAction {
    /// The reply action for `text`, with `dsn` overriding the enhanced status code of an
    /// explicit code (used for 4.3.0 on store failure).
    pub fn reply(&self, text: &str, dsn: Option<&str>) -> String {
        let mut out = String::with_capacity(text.len() + 24);
        self.write_reply(&mut out, dsn, |out| out.push_str(text));
        out
    }

    /// [`DeferAction::reply`] into `out`, the text written by `text` (the policy front end
    /// fills in `{remaining}` while writing, without a copy of the text first).
    pub fn write_reply(&self, out: &mut String, dsn: Option<&str>, text: impl FnOnce(&mut String)) {
        let action = match (self, dsn) {
            (DeferAction::DeferIfPermit, _) => "DEFER_IF_PERMIT",
            (DeferAction::Defer, _) => "DEFER",
            (DeferAction::Code(c), None) => c,
            (DeferAction::Code(c), Some(_)) => c.split_whitespace().next().unwrap_or("451"),
        };
        out.push_str(action);
        if let Some(d) = dsn {
            out.push(' ');
            out.push_str(d);
        }
        out.push(' ');
        text(out);
    }
}

impl FromStr for DeferAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s.to_ascii_uppercase().as_str() {
            "DEFER_IF_PERMIT" => return Ok(DeferAction::DeferIfPermit),
            "DEFER" => return Ok(DeferAction::Defer),
            _ => {}
        }
        let mut parts = s.split_whitespace();
        let code = parts.next().unwrap_or("");
        let dsn = parts.next();
        let code_ok =
            // 421 would end the whole SMTP session; only these defer one recipient.
            matches!(code, "450" | "451" | "452");
        let dsn_ok = dsn.is_none_or(|d| {
            let f: Vec<&str> = d.split('.').collect();
            f.len() == 3
                && f[0] == "4"
                && f.iter()
                    .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
        });
        if code_ok && dsn_ok && parts.next().is_none() {
            Ok(DeferAction::Code(
                s.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        } else {
            Err(format!(
                "{s:?} is not DEFER_IF_PERMIT, DEFER or a 4xx code such as \"451 4.7.1\""
            ))
        }
    }
}

/// How decisions are spelled, by every front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replies {
    /// How the policy front end spells a deferral.
    pub defer_action: DeferAction,
    /// `451 4.7.1`-style code of milter deferrals.
    pub milter_code: String,
    /// Deferral text with `{remaining}` placeholder.
    pub defer_text: String,
    /// Host name for the `X-Greylist` header, or `None` when the header is off.
    pub header_host: Option<String>,
}

impl Replies {
    /// The policy `action=` value a borrowed decision would get (explanations).
    pub fn action_text(&self, decision: &Decision, enforced: bool, now: u64) -> String {
        let o = Outcome {
            decision: decision.clone(),
            enforced,
        };
        self.action(&o, now)
    }

    /// The policy `action=` value for an outcome decided at `now`.
    pub fn action(&self, o: &Outcome, now: u64) -> String {
        let mut out = String::new();
        self.write_action(o, now, &mut out);
        out
    }

    /// [`Replies::action`], appended to `out` (a buffer the connection reuses).
    pub fn write_action(&self, o: &Outcome, now: u64, out: &mut String) {
        let d = &o.decision;
        match o.effective() {
            Verdict::Defer if d.rule == Rule::StoreFailClosed => {
                self.defer_action
                    .write_reply(out, Some(STORE_FAILED_DSN), |out| {
                        out.push_str(STORE_FAILED)
                    })
            }
            Verdict::Defer => self
                .defer_action
                .write_reply(out, None, |out| self.write_defer_text(out, d)),
            Verdict::Pass if o.enforced => match (d.delayed, &self.header_host) {
                (Some(secs), Some(host)) => {
                    out.push_str("PREPEND ");
                    write_x_greylist(out, secs, host, now);
                }
                _ => out.push_str("DUNNO"),
            },
            _ => out.push_str("DUNNO"),
        }
    }

    /// The milter reply code and text of a deferral, or `None` when the outcome does not
    /// defer.
    pub fn milter_deferral(&self, o: &Outcome) -> Option<String> {
        let d = &o.decision;
        match o.effective() {
            Verdict::Defer if d.rule == Rule::StoreFailClosed => {
                Some(format!("451 {STORE_FAILED_DSN} {STORE_FAILED}"))
            }
            Verdict::Defer => {
                let mut out = self.milter_code.clone();
                out.push(' ');
                self.write_defer_text(&mut out, d);
                Some(out)
            }
            _ => None,
        }
    }

    /// The deferral text with `{remaining}` filled in, appended to `out` without a copy
    /// of the text first.
    fn write_defer_text(&self, out: &mut String, d: &Decision) {
        let mut parts = self.defer_text.split("{remaining}");
        out.push_str(parts.next().unwrap_or(""));
        for part in parts {
            let _ = write!(out, "{}", d.remaining.unwrap_or(0));
            out.push_str(part);
        }
    }
}

/// The `X-Greylist` header line of mail that passed after a delay of `delayed` seconds.
pub fn x_greylist(delayed: u64, host: &str, now: u64) -> String {
    let mut line = String::with_capacity(96 + host.len());
    write_x_greylist(&mut line, delayed, host, now);
    line
}

/// [`x_greylist`], appended to `out`.
fn write_x_greylist(out: &mut String, delayed: u64, host: &str, now: u64) {
    let _ = write!(
        out,
        "X-Greylist: delayed {delayed} seconds by greygate-{} at {host}; ",
        env!("CARGO_PKG_VERSION")
    );
    write_date(out, now);
}

/// The unix second `now` as a header date (RFC 5322, UTC), appended to `out`; formatted
/// once per second and thread (every `X-Greylist:` and `Received:` header takes one).
pub fn write_date(out: &mut String, now: u64) {
    thread_local! {
        static DATE: std::cell::RefCell<(Option<u64>, String)> =
            const { std::cell::RefCell::new((None, String::new())) };
    }
    DATE.with(|cell| {
        let mut date = cell.borrow_mut();
        if date.0 != Some(now) {
            let text = jiff::Timestamp::from_second(i64::try_from(now).unwrap_or(i64::MAX))
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
                .strftime("%a, %d %b %Y %H:%M:%S +0000")
                .to_string();
            *date = (Some(now), text);
        }
        out.push_str(&date.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defer_replies_read_as_reply_with_remaining_filled_in() {
        use crate::engine::Decision;
        let mut d = Decision::store_failure(true, String::new());
        d.verdict = Verdict::Defer;
        d.rule = Rule::New;
        d.remaining = Some(297);
        let o = Outcome {
            decision: d,
            enforced: true,
        };
        for action in [
            DeferAction::DeferIfPermit,
            DeferAction::Defer,
            "450 4.7.1".parse().unwrap(),
        ] {
            for text in [
                "Greylisted",
                "Greylisted, try again in {remaining} s",
                "{remaining}{remaining} {remaining",
                "",
            ] {
                let replies = Replies {
                    defer_action: action.clone(),
                    milter_code: "451 4.7.1".into(),
                    defer_text: text.into(),
                    header_host: None,
                };
                let want = action.reply(&text.replace("{remaining}", "297"), None);
                assert_eq!(replies.action(&o, 0), want, "{action:?} {text:?}");
            }
        }
    }
}
