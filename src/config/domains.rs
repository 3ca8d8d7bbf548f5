//! `[[domains]]`: per-recipient-domain sections, their inline patterns and their domain
//! files, checked into the engine's `DomainPolicies`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{ConfigError, Problems};
use crate::dur::Dur;
use crate::engine::{
    DomainApplied, DomainMode, DomainPolicies, DomainSection, Policy, SharedStr, VerifiedTreatment,
};

/// `[[domains]]`: recipients that are greylisted their own way. Unset keys inherit the
/// global setting; the first section (or file line) that matches a recipient applies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDomain {
    /// What logs, explanations and the dashboard call the section; default: its first
    /// recipient pattern.
    pub name: Option<String>,
    /// `example.com` (its addresses), `*.example.com` (its subdomains' addresses),
    /// `user@example.com` (that address).
    pub recipients: Vec<String>,
    /// Files of one pattern per line, each optionally followed by its own settings
    /// (`customer.example learn delay=10m`); re-read on reload.
    pub files: Vec<PathBuf>,
    /// `off` (not greylisted), `learn` (recorded, never deferred) or `enforce`.
    pub mode: Option<DomainMode>,
    /// Replaces `[greylist] delay`.
    pub delay: Option<Dur>,
    /// Replaces `[identity] verified_delay`.
    pub verified_delay: Option<Dur>,
    /// Replaces `[identity] verified_skip`.
    pub verified_skip: Option<bool>,
}

/// A section's or a file line's own settings, before inheritance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Settings {
    mode: Option<DomainMode>,
    delay: Option<u64>,
    verified_delay: Option<u64>,
    verified_skip: Option<bool>,
}

impl Settings {
    /// `self` where set, else `parent`'s. A line's `verified_delay` or `verified_skip`
    /// replaces both of the section's (they exclude each other).
    fn over(self, parent: Settings) -> Settings {
        let own_verified = self.verified_delay.is_some() || self.verified_skip.is_some();
        Settings {
            mode: self.mode.or(parent.mode),
            delay: self.delay.or(parent.delay),
            verified_delay: if own_verified {
                self.verified_delay
            } else {
                parent.verified_delay
            },
            verified_skip: if own_verified {
                self.verified_skip
            } else {
                parent.verified_skip
            },
        }
    }

    /// Problems of the settings as written together: `(key, message)`.
    fn problems(&self, dns_enabled: bool) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.verified_skip == Some(true) && self.verified_delay.is_some() {
            out.push((
                "verified_delay",
                "verified_delay and verified_skip = true exclude each other".into(),
            ));
        }
        if self.mode == Some(DomainMode::Off) {
            for (key, set) in [
                ("delay", self.delay.is_some()),
                ("verified_delay", self.verified_delay.is_some()),
                ("verified_skip", self.verified_skip.is_some()),
            ] {
                if set {
                    out.push((key, format!("{key} has no effect with mode \"off\"")));
                }
            }
        }
        if !dns_enabled {
            for (key, set) in [
                ("verified_delay", self.verified_delay.is_some()),
                ("verified_skip", self.verified_skip.is_some()),
            ] {
                if set {
                    out.push((
                        key,
                        format!("{key} has no effect unless [dns] enabled = true"),
                    ));
                }
            }
        }
        out
    }

    fn section(self, name: &SharedStr, source: Option<SharedStr>) -> DomainSection {
        let verified = match (self.verified_skip, self.verified_delay) {
            (Some(true), _) => Some(VerifiedTreatment::Skip),
            (_, Some(d)) => Some(VerifiedTreatment::Delay(d)),
            (Some(false), None) => Some(VerifiedTreatment::Greylist),
            (None, None) => None,
        };
        DomainSection {
            applied: DomainApplied {
                name: name.clone(),
                source,
                mode: self.mode,
            },
            delay: self.delay,
            verified,
        }
    }
}

/// A delay in whole seconds that a retry can serve within `retry_window`.
fn check_delay(key: &str, d: Dur, policy: &Policy) -> Result<u64, String> {
    if d.0.subsec_nanos() != 0 {
        return Err(format!("{key} ({d}) must be whole seconds"));
    }
    let secs = d.0.as_secs();
    if secs > policy.retry_window {
        return Err(format!(
            "{key} ({d}) is longer than [greylist] retry_window ({}s): a retry could never pass",
            policy.retry_window
        ));
    }
    Ok(secs)
}

/// Checks every section and reads its files; a bad line of a file is reported at its
/// `file:line`, after every other problem.
pub(super) fn check(
    sections: &[RawDomain],
    policy: &Policy,
    dns_enabled: bool,
    p: &mut Problems<'_>,
) -> DomainPolicies {
    let mut out = DomainPolicies::default();
    let mut names: Vec<String> = Vec::new();
    let mut file_errors = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        let at = i.to_string();
        let path = |key: &'static str| ["domains", at.as_str(), key];
        let name = match (&s.name, s.recipients.first()) {
            (Some(n), _) if n.trim().is_empty() || n.contains(['\n', '\r']) => {
                p.at(&path("name"), format!("{n:?} is not a section name"));
                n.clone()
            }
            (Some(n), _) => n.trim().to_string(),
            (None, Some(first)) => first.trim().to_lowercase(),
            (None, None) => {
                let why = if s.files.is_empty() {
                    "a [[domains]] section needs recipients or files"
                } else {
                    "a [[domains]] section with only files needs a name"
                };
                p.at(&["domains", &at], why.into());
                String::new()
            }
        };
        if !name.is_empty() && names.contains(&name) {
            p.at(
                &path("name"),
                format!("section name {name:?} appears twice: logs could not tell them apart"),
            );
        }
        names.push(name.clone());
        let mut delay = |key: &'static str, d: Option<Dur>| {
            d.and_then(|d| {
                check_delay(key, d, policy)
                    .map_err(|m| p.at(&path(key), m))
                    .ok()
            })
        };
        let own = Settings {
            mode: s.mode,
            delay: delay("delay", s.delay),
            verified_delay: delay("verified_delay", s.verified_delay),
            verified_skip: s.verified_skip,
        };
        for (key, m) in own.problems(dns_enabled) {
            p.at(&path(key), m);
        }
        let name = SharedStr(Arc::from(name));
        let index = out.push(own.section(&name, None));
        for (j, r) in s.recipients.iter().enumerate() {
            if let Err(m) = out.add_pattern(index, r) {
                p.at(&["domains", &at, "recipients", &j.to_string()], m);
            }
        }
        for file in &s.files {
            match std::fs::read_to_string(file) {
                Ok(text) => add_file(
                    &mut out,
                    file,
                    &text,
                    &name,
                    own,
                    policy,
                    dns_enabled,
                    &mut file_errors,
                ),
                Err(e) => p.at(
                    &path("files"),
                    format!("cannot read {}: {e}", file.display()),
                ),
            }
        }
    }
    for e in file_errors {
        p.push(e);
    }
    out
}

/// The lines of one domain file, each a section of its own after the ones before it.
#[allow(clippy::too_many_arguments)]
fn add_file(
    out: &mut DomainPolicies,
    file: &Path,
    text: &str,
    name: &SharedStr,
    parent: Settings,
    policy: &Policy,
    dns_enabled: bool,
    errors: &mut Vec<ConfigError>,
) {
    let shown = file.display().to_string();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if line.is_empty() {
            continue;
        }
        let location = format!("{shown}:{}", n + 1);
        let mut fail = |message: String| {
            errors.push(ConfigError {
                location: location.clone(),
                message,
            });
        };
        let mut words = line.split_whitespace();
        let pattern = words.next().unwrap_or_default();
        let own = match parse_settings(words, policy) {
            Ok(own) => own,
            Err(m) => {
                fail(m);
                continue;
            }
        };
        let problems = own.problems(dns_enabled);
        if !problems.is_empty() {
            for (_, m) in problems {
                fail(m);
            }
            continue;
        }
        if let Err(m) = DomainPolicies::parse_pattern(pattern) {
            fail(m);
            continue;
        }
        let index = out.push(
            own.over(parent)
                .section(name, Some(SharedStr(Arc::from(location.as_str())))),
        );
        if let Err(m) = out.add_pattern(index, pattern) {
            fail(m);
        }
    }
}

/// A file line's words after its pattern: a mode (`off`, `learn`, `enforce`) and
/// `key=value` settings (`mode`, `delay`, `verified_delay`, `verified_skip`).
fn parse_settings<'a>(
    words: impl Iterator<Item = &'a str>,
    policy: &Policy,
) -> Result<Settings, String> {
    let mut s = Settings::default();
    let set_mode = |s: &mut Settings, v: &str| -> Result<(), String> {
        let mode = DomainMode::parse(v)
            .ok_or_else(|| format!("{v:?} is not a mode (write off, learn or enforce)"))?;
        if s.mode.replace(mode).is_some() {
            return Err("the mode is given twice".into());
        }
        Ok(())
    };
    for w in words {
        let Some((key, value)) = w.split_once('=') else {
            set_mode(&mut s, w)?;
            continue;
        };
        let dur = |v: &str| -> Result<u64, String> {
            let d: Dur = v.parse()?;
            check_delay(key, d, policy)
        };
        match key {
            "mode" => set_mode(&mut s, value)?,
            "delay" => s.delay = Some(dur(value)?),
            "verified_delay" => s.verified_delay = Some(dur(value)?),
            "verified_skip" => {
                s.verified_skip = Some(match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(format!("verified_skip={value}: write true or false")),
                });
            }
            _ => {
                return Err(format!(
                    "unknown setting {key:?} (mode, delay, verified_delay, verified_skip)"
                ));
            }
        }
    }
    Ok(s)
}
