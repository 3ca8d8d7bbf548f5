//! Keyed hashing of stored addresses (`[store] hash_addresses`).
//!
//! With a secret, the sender and recipient of every triplet key are replaced, after
//! normalisation, by `h:` and the first 128 bits of their HMAC-SHA256 under the secret (32
//! hex digits). Stores then only ever receive digests: the same address always gives the
//! same digest (so greylisting works as before), and a query by address (list, purge,
//! release, explain) is hashed the same way to find its records. The client part of a key
//! (an IP prefix, `spf:` or `org:` domain) is not an address and stays readable.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The prefix of a hashed address in a key.
pub const DIGEST_PREFIX: &str = "h:";

/// The store mode of a store whose keys hold addresses as text.
pub const PLAIN_MODE: &str = "plain";

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// How addresses go into keys: as text (the default) or as keyed digests.
#[derive(Clone, Default)]
pub struct AddressKeys {
    keyed: Option<Arc<Keyed>>,
}

/// The HMAC keyed once (each digest clones it: about 40% cheaper than keying it again)
/// and the store mode it makes.
struct Keyed {
    mac: Hmac<Sha256>,
    mode: String,
}

impl AddressKeys {
    /// Addresses as text.
    pub fn plain() -> Self {
        AddressKeys::default()
    }

    /// Addresses as HMAC-SHA256 digests under `secret` (which the caller checked for
    /// length: see [`MIN_SECRET_LEN`]).
    pub fn hashed(secret: &[u8]) -> Self {
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .expect("HMAC takes a key of any length");
        let fp = digest(&mac, b"greygate store fingerprint");
        AddressKeys {
            keyed: Some(Arc::new(Keyed {
                mac,
                mode: format!("hmac-sha256:{}", hex(&fp[..8])),
            })),
        }
    }

    pub fn is_hashed(&self) -> bool {
        self.keyed.is_some()
    }

    /// A normalised address as it goes into a key: itself, or its digest.
    pub fn address(&self, normalized: &str) -> String {
        match &self.keyed {
            None => normalized.to_string(),
            Some(k) => {
                let d = digest(&k.mac, normalized.as_bytes());
                let mut out = String::with_capacity(DIGEST_PREFIX.len() + 32);
                out.push_str(DIGEST_PREFIX);
                out.push_str(&hex(&d));
                out
            }
        }
    }

    /// What a store records about the keys it is given: `plain`, or `hmac-sha256:` and a
    /// fingerprint of the secret (an HMAC of a constant, which tells secrets apart without
    /// revealing them), so that a store never mixes keys of two modes or two secrets.
    pub fn store_mode(&self) -> String {
        match &self.keyed {
            None => PLAIN_MODE.to_string(),
            Some(k) => k.mode.clone(),
        }
    }
}

/// The first 128 bits of the HMAC of `data`.
fn digest(mac: &Hmac<Sha256>, data: &[u8]) -> [u8; 16] {
    let mut mac = mac.clone();
    mac.update(data);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// Two key makings are the same when their modes are: plain, or one secret's fingerprint.
impl PartialEq for AddressKeys {
    fn eq(&self, other: &Self) -> bool {
        self.store_mode() == other.store_mode()
    }
}

impl Eq for AddressKeys {}

// Configurations get printed: never the secret.
impl fmt::Debug for AddressKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.keyed {
            None => f.write_str("AddressKeys::Plain"),
            Some(_) => write!(f, "AddressKeys::Hashed({})", self.store_mode()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keeps_addresses_and_hashed_replaces_them() {
        assert_eq!(
            AddressKeys::plain().address("a@example.org"),
            "a@example.org"
        );
        let keys = AddressKeys::hashed(b"0123456789abcdef-secret");
        let d = keys.address("a@example.org");
        assert!(d.starts_with("h:"), "{d}");
        assert_eq!(d.len(), 2 + 32);
        assert!(!d.contains("example"));
        assert_eq!(d, keys.address("a@example.org"), "stable");
        assert_ne!(d, keys.address("b@example.org"));
        assert_ne!(
            d,
            AddressKeys::hashed(b"another-secret-of-16+").address("a@example.org"),
            "keyed"
        );
    }

    #[test]
    fn digest_is_hmac_sha256_truncated() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let keys = AddressKeys::hashed(b"Jefe");
        assert_eq!(
            keys.address("what do ya want for nothing?"),
            "h:5bdcc146bf60754e6a042426089575c7"
        );
    }

    #[test]
    fn store_modes_tell_secrets_apart_without_showing_them() {
        assert_eq!(AddressKeys::plain().store_mode(), "plain");
        let a = AddressKeys::hashed(b"0123456789abcdef-a").store_mode();
        let b = AddressKeys::hashed(b"0123456789abcdef-b").store_mode();
        assert!(a.starts_with("hmac-sha256:"), "{a}");
        assert_ne!(a, b);
        let shown = format!("{:?}", AddressKeys::hashed(b"0123456789abcdef-a"));
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
    }
}
