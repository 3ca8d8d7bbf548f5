//! The admin API's requests and answers as types: the handlers serialise them and the CLI
//! deserialises the same structs, so a field the CLI shows cannot go missing unnoticed.

use serde::{Deserialize, Serialize};

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Sections that changed in the file but only take effect after a restart.
    pub needs_restart: Vec<String>,
    /// Allow-list entries now in force: clients, recipients, senders.
    pub allow_entries: (usize, usize, usize),
}
