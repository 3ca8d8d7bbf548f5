//! Stored records (triplets and client groups) and their compact, versioned byte encoding.
//!
//! Every record carries its own `expires_at`, computed by the engine when it writes the
//! record, so a store can expire entries (sweeps, Redis TTLs, an indexed column) without
//! knowing the greylisting configuration.

/// What the store knows about one (client group, sender, recipient) triplet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Triplet {
    /// Unix seconds of the first attempt of the current greylisting round.
    pub first_seen: u64,
    /// Unix seconds of the latest attempt.
    pub last_seen: u64,
    /// Unix seconds after which the record is dead and may be removed.
    pub expires_at: u64,
    /// Attempts deferred in this round (the first one included).
    pub attempts: u32,
    /// Attempts accepted since the delay ended. A passed record with 0 was released by an
    /// operator and not retried since (the engine's own passes start at 1): its next retry
    /// passes with rule `released`.
    pub passes: u32,
    /// The delay has been served: later attempts pass while the record lives.
    pub passed: bool,
}

/// What the store knows about one client group for auto-allowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientRecord {
    /// Passes counted towards the auto-allow threshold (at most one per hour).
    pub passes: u32,
    /// Unix seconds of the latest counted pass.
    pub last_counted: u64,
    /// Unix seconds this group was last seen passing.
    pub last_seen: u64,
    /// Unix seconds after which the record is dead and may be removed.
    pub expires_at: u64,
}

/// Why a stored value could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("stored record has {len} bytes or unknown version {version}")]
pub struct DecodeRecordError {
    pub len: usize,
    pub version: u8,
}

const VERSION: u8 = 1;
const TRIPLET_LEN: usize = 1 + 8 * 3 + 4 * 2 + 1;
const CLIENT_LEN: usize = 1 + 4 + 8 * 3;

/// A little-endian cursor over a record; lengths are checked before reading.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> u64 {
        let (head, rest) = self.0.split_at(8);
        self.0 = rest;
        u64::from_le_bytes(head.try_into().expect("split_at(8) yields 8 bytes"))
    }
    fn u32(&mut self) -> u32 {
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        u32::from_le_bytes(head.try_into().expect("split_at(4) yields 4 bytes"))
    }
}

fn check(bytes: &[u8], len: usize) -> Result<Reader<'_>, DecodeRecordError> {
    match bytes.first() {
        Some(&VERSION) if bytes.len() == len => Ok(Reader(&bytes[1..])),
        other => Err(DecodeRecordError {
            len: bytes.len(),
            version: other.copied().unwrap_or(0),
        }),
    }
}

/// Records the stores hold; lets one generic store implementation serve both kinds.
pub trait Record: Copy + PartialEq + Send + Sync + 'static {
    /// The length of `to_bytes`, the same for every record of a kind (stores that keep
    /// something after the record in one value split there).
    const ENCODED_LEN: usize;
    fn expires_at(&self) -> u64;
    fn to_bytes(&self) -> Vec<u8>;
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeRecordError>;
}

impl Record for Triplet {
    const ENCODED_LEN: usize = TRIPLET_LEN;

    fn expires_at(&self) -> u64 {
        self.expires_at
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TRIPLET_LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.first_seen.to_le_bytes());
        out.extend_from_slice(&self.last_seen.to_le_bytes());
        out.extend_from_slice(&self.expires_at.to_le_bytes());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.passes.to_le_bytes());
        out.push(u8::from(self.passed));
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeRecordError> {
        let mut r = check(bytes, TRIPLET_LEN)?;
        Ok(Triplet {
            first_seen: r.u64(),
            last_seen: r.u64(),
            expires_at: r.u64(),
            attempts: r.u32(),
            passes: r.u32(),
            passed: r.0[0] != 0,
        })
    }
}

impl Record for ClientRecord {
    const ENCODED_LEN: usize = CLIENT_LEN;

    fn expires_at(&self) -> u64 {
        self.expires_at
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CLIENT_LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.passes.to_le_bytes());
        out.extend_from_slice(&self.last_counted.to_le_bytes());
        out.extend_from_slice(&self.last_seen.to_le_bytes());
        out.extend_from_slice(&self.expires_at.to_le_bytes());
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeRecordError> {
        let mut r = check(bytes, CLIENT_LEN)?;
        Ok(ClientRecord {
            passes: r.u32(),
            last_counted: r.u64(),
            last_seen: r.u64(),
            expires_at: r.u64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let t = Triplet {
            first_seen: 1,
            last_seen: u64::MAX,
            expires_at: 3,
            attempts: 4,
            passes: u32::MAX,
            passed: true,
        };
        assert_eq!(Triplet::from_bytes(&t.to_bytes()), Ok(t));
        assert_eq!(t.to_bytes().len(), Triplet::ENCODED_LEN);
        let c = ClientRecord {
            passes: 5,
            last_counted: 6,
            last_seen: 7,
            expires_at: 8,
        };
        assert_eq!(ClientRecord::from_bytes(&c.to_bytes()), Ok(c));
        assert_eq!(c.to_bytes().len(), ClientRecord::ENCODED_LEN);
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        for bad in [
            &[][..],
            &[1][..],
            &[2; TRIPLET_LEN][..],
            &[1; CLIENT_LEN][..],
        ] {
            assert!(Triplet::from_bytes(bad).is_err(), "{bad:?}");
        }
        assert!(ClientRecord::from_bytes(&[1; TRIPLET_LEN]).is_err());
    }
}
