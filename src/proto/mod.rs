//! Pure protocol codecs: bytes in, typed items out, bounded. **Codecs never touch a socket.**

pub mod milter;
pub mod policy;
