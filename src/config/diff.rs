//! What a reload can change in a running daemon. The daemon built its sockets, its store
//! and its logging from some sections at start; a change to one of those waits for a
//! restart. Everything else (mode, host name, engine and allow lists, replies, failure
//! policy, DNS, the SMTP front's certificate and greytraps) is swapped in by the reload.

use super::Config;

impl Config {
    /// The sections that changed from `self` (the configuration the daemon started with)
    /// to `new` but only take effect after a restart, by their table names.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let sections = [
            ("policy", self.policy != new.policy),
            ("milter", self.milter != new.milter),
            ("smtp", !self.smtp.same_sockets_and_limits(&new.smtp)),
            ("store", self.store != new.store),
            ("admin", self.admin != new.admin),
            ("log", self.log != new.log),
        ];
        sections
            .into_iter()
            .filter_map(|(name, changed)| changed.then_some(name))
            .collect()
    }
}
