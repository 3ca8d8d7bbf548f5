//! `[allow]`: static allow lists, inline and in files, checked into the engine's
//! `AllowLists`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Problems};
use crate::engine::{AllowLists, Origin};

/// `[allow]`: static allow lists, inline and in files (one entry per line, `#` comments).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAllow {
    /// Client IPs, CIDR networks, host names, `.suffix`es and `/regex/`es.
    pub clients: Vec<String>,
    pub client_files: Vec<PathBuf>,
    /// Recipients: `user@domain`, `@domain`, `user@`.
    pub recipients: Vec<String>,
    pub recipient_files: Vec<PathBuf>,
    /// Senders, same forms as recipients. Empty by default: senders are easily forged.
    pub senders: Vec<String>,
    pub sender_files: Vec<PathBuf>,
}

impl Default for RawAllow {
    fn default() -> Self {
        RawAllow {
            clients: Vec::new(),
            client_files: Vec::new(),
            // RFC 5321 wants postmaster reachable; abuse reports must not wait either.
            recipients: vec!["postmaster@".into(), "abuse@".into()],
            recipient_files: Vec::new(),
            senders: Vec::new(),
            sender_files: Vec::new(),
        }
    }
}

impl RawAllow {
    /// The allow lists, files read; a bad line of a file is reported at its line, after
    /// every other problem. `lists_output` (`[lists] output`) is read as one more client
    /// file when it exists: until `greygate lists update` first writes it, it is none.
    pub(super) fn check(&self, lists_output: &Path, p: &mut Problems<'_>) -> AllowLists {
        let mut allow = AllowLists::default();
        let mut file_errors = Vec::new();
        type Add = fn(&mut AllowLists, &str, Origin) -> Result<(), String>;
        let inline: [(&str, &Vec<String>, Add); 3] = [
            ("clients", &self.clients, AllowLists::add_client),
            ("recipients", &self.recipients, AllowLists::add_recipient),
            ("senders", &self.senders, AllowLists::add_sender),
        ];
        for (name, entries, add) in inline {
            for (i, e) in entries.iter().enumerate() {
                let origin = Origin {
                    source: "config".into(),
                    line: 0,
                    entry: e.clone(),
                };
                if let Err(m) = add(&mut allow, e, origin) {
                    p.at(&["allow", name, &i.to_string()], m);
                }
            }
        }
        let files: [(&str, &Vec<PathBuf>, Add); 3] = [
            ("client_files", &self.client_files, AllowLists::add_client),
            (
                "recipient_files",
                &self.recipient_files,
                AllowLists::add_recipient,
            ),
            ("sender_files", &self.sender_files, AllowLists::add_sender),
        ];
        for (name, paths, add) in files {
            for path in paths {
                match std::fs::read_to_string(path) {
                    Ok(text) => {
                        if let Err(list) = allow.add_file(path, &text, add) {
                            file_errors.extend(list.into_iter().map(|e| ConfigError {
                                location: format!("{}:{}", e.source_name, e.line),
                                message: e.message,
                            }));
                        }
                    }
                    Err(e) => p.at(
                        &["allow", name],
                        format!("cannot read {}: {e}", path.display()),
                    ),
                }
            }
        }

        match std::fs::read_to_string(lists_output) {
            Ok(text) => {
                if let Err(list) = allow.add_file(lists_output, &text, AllowLists::add_client) {
                    file_errors.extend(list.into_iter().map(|e| ConfigError {
                        location: format!("{}:{}", e.source_name, e.line),
                        message: e.message,
                    }));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => p.at(
                &["lists", "output"],
                format!("cannot read {}: {e}", lists_output.display()),
            ),
        }

        for e in file_errors {
            p.push(e);
        }
        allow
    }
}
