//! What the SMTP front remembers about clients between sessions: groups caught
//! pregreeting (suspect for a while), addresses that passed the pregreet test (not made to
//! wait again), the greytrap addresses, and the tarpit's budget of slow sessions. Every
//! table is bounded: an attacker with many addresses evicts entries, it cannot grow them.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::lock;

use super::TrapConfig;
use crate::engine::normalize::strip_envelope;

/// Most entries in each table.
pub const MAX_REMEMBERED: usize = 100_000;

/// A bounded map of keys to the unix second they stop applying at.
struct Expiring<K> {
    until: HashMap<K, u64>,
    cap: usize,
}

impl<K: Hash + Eq + Clone> Expiring<K> {
    fn new(cap: usize) -> Self {
        Expiring {
            until: HashMap::new(),
            cap,
        }
    }

    fn insert(&mut self, key: K, until: u64, now: u64) {
        if self.until.len() >= self.cap && !self.until.contains_key(&key) {
            self.until.retain(|_, t| *t > now);
            if self.until.len() >= self.cap {
                // Still full of live entries: a sixteenth goes at once (whichever the map
                // yields first), so a flood pays for one scan per cap/16 inserts, not one
                // per insert.
                let drop: Vec<K> = self
                    .until
                    .keys()
                    .take((self.cap / 16).max(1))
                    .cloned()
                    .collect();
                for k in drop {
                    self.until.remove(&k);
                }
            }
        }
        self.until.insert(key, until);
    }

    fn contains(&self, key: &K, now: u64) -> bool {
        self.until.get(key).is_some_and(|t| *t > now)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

/// Greytrap addresses: whole addresses, and `@domain` for every address of a domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traps {
    addresses: std::collections::HashSet<String>,
}

impl Traps {
    /// The configured addresses plus the file's (one per line, `#` comments).
    pub fn load(cfg: &TrapConfig) -> Result<Traps, String> {
        let mut addresses: std::collections::HashSet<String> =
            cfg.addresses.iter().map(|a| normalise(a)).collect();
        if let Some(path) = &cfg.file {
            addresses.extend(read_file(path)?);
        }
        addresses.remove("");
        Ok(Traps { addresses })
    }

    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }

    /// Whether `recipient` (as given in RCPT TO) is a trap.
    pub fn catches(&self, recipient: &str) -> bool {
        if self.addresses.is_empty() {
            return false;
        }
        let r = normalise(recipient);
        if self.addresses.contains(&r) {
            return true;
        }
        r.rfind('@')
            .is_some_and(|at| self.addresses.contains(&r[at..]))
    }
}

fn normalise(address: &str) -> String {
    strip_envelope(address.trim()).to_ascii_lowercase()
}

fn read_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read trap file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.contains(char::is_whitespace) || !line.contains('@') {
            return Err(format!(
                "{}:{}: {line:?} is not an address or @domain",
                path.display(),
                n + 1
            ));
        }
        out.push(normalise(line));
    }
    Ok(out)
}

/// The SMTP front's memory of clients, shared by its listeners.
pub struct Guard {
    /// Client groups caught pregreeting.
    suspects: Mutex<Expiring<String>>,
    /// Addresses that waited for the whole banner.
    passed: Mutex<Expiring<IpAddr>>,
    /// Addresses denied for a trap hit, until their entry ends.
    trapped: Mutex<Expiring<IpAddr>>,
    traps: ArcSwap<Traps>,
    /// One permit per session being tarpitted.
    pub tarpit: Arc<Semaphore>,
    /// The backend offered CHUNKING when last asked: BDAT is offered to clients.
    pub backend_chunking: std::sync::atomic::AtomicBool,
    /// The backend offered SMTPUTF8 when last asked: so is it to clients.
    pub backend_smtputf8: std::sync::atomic::AtomicBool,
}

impl Guard {
    pub fn new(traps: Traps, tarpit_sessions: usize) -> Self {
        Guard {
            suspects: Mutex::new(Expiring::new(MAX_REMEMBERED)),
            passed: Mutex::new(Expiring::new(MAX_REMEMBERED)),
            trapped: Mutex::new(Expiring::new(MAX_REMEMBERED)),
            traps: ArcSwap::from_pointee(traps),
            tarpit: Arc::new(Semaphore::new(tarpit_sessions)),
            backend_chunking: std::sync::atomic::AtomicBool::new(false),
            backend_smtputf8: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn suspect(&self, group: &str, until: u64, now: u64) {
        lock(&self.suspects).insert(group.to_string(), until, now);
    }

    pub fn is_suspect(&self, group: &str, now: u64) -> bool {
        lock(&self.suspects).contains(&group.to_string(), now)
    }

    pub fn passed(&self, ip: IpAddr, until: u64, now: u64) {
        lock(&self.passed).insert(ip, until, now);
    }

    pub fn has_passed(&self, ip: IpAddr, now: u64) -> bool {
        lock(&self.passed).contains(&ip, now)
    }

    /// Whether `ip` hit a trap for the first time since `until` was last set for it: only
    /// then is its deny entry written.
    pub fn first_trap(&self, ip: IpAddr, until: u64, now: u64) -> bool {
        let mut t = lock(&self.trapped);
        if t.contains(&ip, now) {
            return false;
        }
        t.insert(ip, until, now);
        true
    }

    pub fn traps(&self) -> Arc<Traps> {
        self.traps.load_full()
    }

    /// What the backend offered at its last session, for the EHLO reply.
    pub fn learn_backend(&self, caps: &super::backend::Capabilities) {
        use std::sync::atomic::Ordering::Relaxed;
        self.backend_chunking.store(caps.chunking, Relaxed);
        self.backend_smtputf8.store(caps.smtputf8, Relaxed);
    }

    /// A reload's new trap list.
    pub fn set_traps(&self, traps: Traps) {
        self.traps.store(Arc::new(traps));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traps_match_addresses_and_domains_without_case_or_brackets() {
        let cfg = TrapConfig {
            addresses: vec!["Trap@Example.org".into(), "@spamtrap.example".into()],
            file: None,
            deny_for: std::time::Duration::from_secs(60),
        };
        let t = Traps::load(&cfg).unwrap();
        assert!(t.catches("<trap@example.org>"));
        assert!(t.catches("TRAP@EXAMPLE.ORG"));
        assert!(t.catches("anyone@spamtrap.example"));
        assert!(!t.catches("trap@example.com"));
        assert!(!t.catches("user@example.org"));
        assert!(!t.catches("spamtrap.example"));
    }

    #[test]
    fn a_trap_file_with_a_bad_line_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("traps");
        std::fs::write(&path, "# traps\nbad one\n").unwrap();
        let cfg = TrapConfig {
            addresses: vec![],
            file: Some(path),
            deny_for: std::time::Duration::from_secs(60),
        };
        let e = Traps::load(&cfg).unwrap_err();
        assert!(e.contains(":2:"), "{e}");
    }

    #[test]
    fn a_client_is_trapped_once_per_deny_period() {
        let g = Guard::new(Traps::default(), 1);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        assert!(g.first_trap(ip, 200, 100));
        assert!(
            !g.first_trap(ip, 250, 150),
            "still denied: not written again"
        );
        assert!(
            g.first_trap(ip, 400, 300),
            "after the entry ended it is written anew"
        );
    }

    #[test]
    fn tables_stay_bounded_and_forget_expired_entries() {
        let mut t = Expiring::new(3);
        for i in 0..10u64 {
            t.insert(i, 100 + i, 50);
        }
        assert_eq!(t.len(), 3);
        assert!(t.contains(&9, 50));
        assert!(!t.contains(&9, 109));
        t.insert(20, 500, 200);
        assert!(t.contains(&20, 300));
        assert!(t.len() <= 3);
    }
}
