//! Tailing a live log for `greygate track --follow`, across both kinds of rotation:
//! - **rename** (logrotate's default, `postfix logrotate`, Exim's own): the path gets a new
//!   file. The old file is read to its end, and again for [`RENAME_GRACE`] after, since a
//!   writer may add lines to it until it reopens the path; then the new file is read from
//!   its start.
//! - **copytruncate**: the same file shrinks below what was read; it is read again from
//!   its start. Lines written between logrotate's copy and its truncation are in neither
//!   file, for any reader.
//!
//! Polling, not inotify: one `stat` and one `read` to its end per [`Follower::poll`], which
//! the caller does a few times a second. Lines are cut at [`MAX_LINE`] bytes like every
//! other reader of logs here, so a line without an end cannot grow memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::tools::maillog::MAX_LINE;

/// How long a renamed-away file is still read after the path got a new file.
pub const RENAME_GRACE: Duration = Duration::from_secs(5);

/// Most bytes one [`Follower::poll`] reads, so that a large file at the start does not
/// hold the caller for long.
pub const POLL_BUDGET: u64 = 8 << 20;

/// Splits bytes into lines, each cut at [`MAX_LINE`]; keeps an unfinished line.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
    /// The unfinished line passed [`MAX_LINE`]: its rest is dropped up to its newline.
    cut: bool,
}

impl Lines {
    fn push(&mut self, mut bytes: &[u8], f: &mut impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let nl = memchr::memchr(b'\n', bytes);
            let (piece, ends) = match nl {
                Some(i) => (&bytes[..=i], true),
                None => (bytes, false),
            };
            bytes = &bytes[piece.len()..];
            if !self.cut {
                let room = MAX_LINE - self.partial.len();
                self.partial
                    .extend_from_slice(&piece[..piece.len().min(room)]);
                if piece.len() > room {
                    self.cut = true;
                }
            }
            if ends {
                // A cut line was handed on already; its end only ends the skipping.
                if !(self.cut && self.partial.is_empty()) {
                    f(&self.partial);
                }
                self.partial.clear();
                self.cut = false;
            } else if self.cut && !self.partial.is_empty() {
                // Cut: hand the first MAX_LINE bytes on now, drop the rest.
                f(&self.partial);
                self.partial.clear();
            }
        }
    }

    /// Hands on an unfinished last line (the file is done with).
    fn flush(&mut self, f: &mut impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            f(&self.partial);
        }
        self.partial.clear();
        self.cut = false;
    }
}

/// An open file being read.
#[derive(Debug)]
struct Open {
    file: File,
    /// (device, inode): a rename gives the path another.
    id: (u64, u64),
    pos: u64,
    lines: Lines,
}

impl Open {
    fn at(path: &Path) -> std::io::Result<Option<Open>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let m = file.metadata()?;
        Ok(Some(Open {
            file,
            id: (m.dev(), m.ino()),
            pos: 0,
            lines: Lines::default(),
        }))
    }

    /// Reads to the end, or `budget` bytes at most; the number of bytes.
    fn drain(
        &mut self,
        buf: &mut [u8],
        budget: u64,
        f: &mut impl FnMut(&[u8]),
    ) -> std::io::Result<u64> {
        let mut total = 0;
        while total < budget {
            let n = match self.file.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(total);
            }
            self.pos += n as u64;
            total += n as u64;
            self.lines.push(&buf[..n], f);
        }
        Ok(total)
    }
}

/// Follows one log path.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    current: Option<Open>,
    /// The file renamed away, and until when it is still read.
    old: Option<(Open, Instant)>,
    buf: Box<[u8]>,
    /// Renames and truncations seen.
    pub rotations: u64,
    pub truncations: u64,
}

impl Follower {
    /// Follows `path` from its first byte (the file may not exist yet).
    pub fn new(path: &Path) -> std::io::Result<Follower> {
        Ok(Follower {
            path: path.to_path_buf(),
            current: Open::at(path)?,
            old: None,
            buf: vec![0u8; 1 << 16].into_boxed_slice(),
            rotations: 0,
            truncations: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what is new and hands on each complete line (with its newline); notices a
    /// rotation. Reads [`POLL_BUDGET`] bytes at most: a result that large means there is
    /// more to read at once. The number of bytes read.
    pub fn poll(&mut self, mut f: impl FnMut(&[u8])) -> std::io::Result<u64> {
        let mut read = 0;
        if let Some((old, until)) = &mut self.old {
            read += old.drain(&mut self.buf, POLL_BUDGET, &mut f)?;
            if read >= POLL_BUDGET {
                return Ok(read);
            }
            if Instant::now() >= *until {
                old.lines.flush(&mut f);
                self.old = None;
            }
        }
        if let Some(cur) = &mut self.current {
            read += cur.drain(&mut self.buf, POLL_BUDGET - read, &mut f)?;
            if read >= POLL_BUDGET {
                // Not at the end yet: rotation is looked for once it is.
                return Ok(read);
            }
        }
        let now = match std::fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let Some(now) = now else {
            // Renamed away and not created again yet: keep reading the old one.
            return Ok(read);
        };
        match &mut self.current {
            Some(cur) if cur.id == (now.dev(), now.ino()) => {
                if now.len() < cur.pos {
                    // copytruncate: the same file, shorter than what was read.
                    cur.file.seek(SeekFrom::Start(0))?;
                    cur.pos = 0;
                    cur.lines.flush(&mut f);
                    self.truncations += 1;
                    read += cur.drain(&mut self.buf, POLL_BUDGET - read, &mut f)?;
                }
            }
            _ => {
                // The path has a new file (or has one at last).
                if let Some(new) = Open::at(&self.path)? {
                    if let Some(prev) = self.current.take() {
                        if let Some((mut older, _)) = self.old.take() {
                            older.lines.flush(&mut f);
                        }
                        self.old = Some((prev, Instant::now() + RENAME_GRACE));
                        self.rotations += 1;
                    }
                    self.current = Some(new);
                    if let Some(cur) = &mut self.current {
                        read += cur.drain(&mut self.buf, POLL_BUDGET - read, &mut f)?;
                    }
                }
            }
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn collect(f: &mut Follower) -> Vec<String> {
        let mut got = Vec::new();
        f.poll(|l| got.push(String::from_utf8_lossy(l).into_owned()))
            .unwrap();
        got
    }

    #[test]
    fn follows_appends_partial_lines_and_both_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("maillog");
        let mut f = Follower::new(&log).unwrap();
        assert!(collect(&mut f).is_empty(), "no file yet");
        append(&log, "one\ntw");
        assert_eq!(collect(&mut f), ["one\n"]);
        append(&log, "o\n");
        assert_eq!(collect(&mut f), ["two\n"]);

        // Rename: the writer still adds to the old file a little after, then to the new.
        std::fs::rename(&log, dir.path().join("maillog.1")).unwrap();
        append(&dir.path().join("maillog.1"), "three\n");
        append(&log, "four\n");
        assert_eq!(collect(&mut f), ["three\n", "four\n"]);
        assert_eq!(f.rotations, 1);
        append(&dir.path().join("maillog.1"), "late\n");
        append(&log, "five\n");
        assert_eq!(collect(&mut f), ["late\n", "five\n"]);

        // copytruncate: copied away, truncated, written again.
        std::fs::copy(&log, dir.path().join("maillog.0")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&log, "six\n");
        assert_eq!(collect(&mut f), ["six\n"]);
        assert_eq!(f.truncations, 1);
    }

    #[test]
    fn a_line_without_end_is_cut_at_max_line() {
        let mut lines = Lines::default();
        let mut got: Vec<usize> = Vec::new();
        let big = vec![b'x'; MAX_LINE + 100];
        lines.push(&big, &mut |l| got.push(l.len()));
        lines.push(&big, &mut |l| got.push(l.len()));
        lines.push(b"tail\nnext\n", &mut |l| got.push(l.len()));
        assert_eq!(got, [MAX_LINE, 5]);
        assert!(lines.partial.is_empty());
        // Byte by byte, the same lines.
        let mut lines = Lines::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        for b in b"ab\ncd\n" {
            lines.push(&[*b], &mut |l| got.push(l.to_vec()));
        }
        assert_eq!(got, [b"ab\n".to_vec(), b"cd\n".to_vec()]);
    }
}
