//! `[log]`: level and format of the daemon's log.

use serde::Deserialize;

use super::Problems;
use crate::logfmt::LogConfig;

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    /// `error`, `warn`, `info` (one line per decision), `debug`; or a tracing filter.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

impl RawLog {
    pub(super) fn check(&self, p: &mut Problems<'_>) -> LogConfig {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err()
            || self.level.trim().is_empty()
        {
            p.at(
                &["log", "level"],
                format!(
                    "{:?} is not a log level (error, warn, info, debug, trace) or tracing filter",
                    self.level
                ),
            );
        }
        if !matches!(self.format.as_str(), "text" | "json") {
            p.at(
                &["log", "format"],
                format!("log format {:?} is not text or json", self.format),
            );
        }
        LogConfig {
            level: self.level.clone(),
            json: self.format == "json",
        }
    }
}
