//! Sendmail/Postfix milter protocol (version 6): a pure, bounded codec for both directions.
//!
//! A frame is a 4-byte big-endian length (covering the command byte and the data), a
//! command byte, and the data. Strings are NUL-terminated. The decoder never buffers: it
//! looks at the caller's bytes and says `Incomplete`, or returns one frame and how many
//! bytes it used; a length over the limit is `TooLarge` at once, before any of it arrives.
//! No permissively licensed Rust milter crate exists, hence this module.

use std::fmt;

/// Protocol version greygate speaks.
pub const VERSION: u32 = 6;

/// Actions a filter may ask for (`SMFIF_*`).
pub mod action {
    pub const ADD_HEADERS: u32 = 0x01;
    pub const CHANGE_BODY: u32 = 0x02;
    pub const ADD_RCPT: u32 = 0x04;
    pub const DEL_RCPT: u32 = 0x08;
    pub const CHANGE_HEADERS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    pub const CHANGE_FROM: u32 = 0x40;
    pub const ADD_RCPT_PAR: u32 = 0x80;
    pub const SET_SYMLIST: u32 = 0x100;
}

/// Protocol steps a filter may skip or not answer (`SMFIP_*`).
pub mod protocol {
    pub const NO_CONNECT: u32 = 0x01;
    pub const NO_HELO: u32 = 0x02;
    pub const NO_MAIL: u32 = 0x04;
    pub const NO_RCPT: u32 = 0x08;
    pub const NO_BODY: u32 = 0x10;
    pub const NO_HEADERS: u32 = 0x20;
    pub const NO_EOH: u32 = 0x40;
    pub const NO_REPLY_HEADER: u32 = 0x80;
    pub const NO_UNKNOWN: u32 = 0x100;
    pub const NO_DATA: u32 = 0x200;
    pub const SKIP: u32 = 0x400;
    pub const RCPT_REJ: u32 = 0x800;
}

/// Macro stages for `SMFIF_SETSYMLIST` (`SMFIM_*`).
pub mod stage {
    pub const CONNECT: u32 = 0;
    pub const HELO: u32 = 1;
    pub const ENVFROM: u32 = 2;
    pub const ENVRCPT: u32 = 3;
    pub const DATA: u32 = 4;
    pub const EOM: u32 = 5;
    pub const EOH: u32 = 6;
}

/// Default bound of one frame: a 64 KiB body chunk and room to spare.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024;

/// Address family of the connecting client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Unknown,
    Unix,
    Inet,
    Inet6,
}

impl Family {
    fn byte(self) -> u8 {
        match self {
            Family::Unknown => b'U',
            Family::Unix => b'L',
            Family::Inet => b'4',
            Family::Inet6 => b'6',
        }
    }
}

/// What the MTA sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    OptNeg {
        version: u32,
        actions: u32,
        protocol: u32,
    },
    /// Macros for the command `for_cmd` (a command byte such as `b'M'`); names are kept as
    /// sent (`{auth_authen}`, `i`).
    Macros {
        for_cmd: u8,
        pairs: Vec<(String, String)>,
    },
    Connect {
        hostname: String,
        family: Family,
        port: u16,
        address: String,
    },
    Helo(String),
    /// `MAIL FROM`: the sender (with angle brackets, as sent) and ESMTP arguments.
    Mail(Vec<String>),
    /// `RCPT TO`: the recipient (with angle brackets) and ESMTP arguments.
    Rcpt(Vec<String>),
    Header {
        name: String,
        value: String,
    },
    EndOfHeaders,
    Data,
    Body(Vec<u8>),
    EndOfMessage(Vec<u8>),
    Abort,
    Quit,
    /// Quit this SMTP session; the milter connection carries on with a new one.
    QuitNewConnection,
    Unknown(String),
}

/// What greygate answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Option negotiation; `macros` asks for macro lists per stage (needs `SET_SYMLIST`).
    OptNeg {
        version: u32,
        actions: u32,
        protocol: u32,
        macros: Vec<(u32, String)>,
    },
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    /// A full SMTP reply, e.g. `451 4.7.1 Greylisted, please try again later`.
    ReplyCode(String),
    AddHeader {
        name: String,
        value: String,
    },
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    Progress,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge { len: usize, limit: usize },
    Malformed { command: u8, reason: &'static str },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, limit } => {
                write!(f, "frame of {len} bytes exceeds the limit of {limit}")
            }
            DecodeError::Malformed { command, reason } => {
                write!(f, "malformed {:?} frame: {reason}", char::from(*command))
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Outcome of looking at buffered bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// More bytes are needed.
    Incomplete,
    /// One frame, and the bytes it took.
    Frame(T, usize),
}

/// One frame split off a buffer: command byte, data, bytes used.
type RawFrame<'a> = (u8, &'a [u8], usize);

/// Splits off one frame.
fn frame(buf: &[u8], max: usize) -> Result<Option<RawFrame<'_>>, DecodeError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, limit: max });
    }
    if len == 0 {
        return Err(DecodeError::Malformed {
            command: 0,
            reason: "empty frame",
        });
    }
    match buf.get(4..4 + len) {
        None => Ok(None),
        Some(body) => Ok(Some((body[0], &body[1..], 4 + len))),
    }
}

/// A cursor over frame data.
struct Data<'a> {
    rest: &'a [u8],
    command: u8,
}

impl<'a> Data<'a> {
    fn bad(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            command: self.command,
            reason,
        }
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<4>()
            .ok_or_else(|| self.bad("truncated number"))?;
        self.rest = rest;
        Ok(u32::from_be_bytes(*head))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<2>()
            .ok_or_else(|| self.bad("truncated port"))?;
        self.rest = rest;
        Ok(u16::from_be_bytes(*head))
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self
            .rest
            .split_first()
            .ok_or_else(|| self.bad("truncated"))?;
        self.rest = rest;
        Ok(b)
    }

    /// One NUL-terminated string (lossy UTF-8: addresses may be 8-bit).
    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.bad("string without NUL"))?;
        let s = String::from_utf8_lossy(&self.rest[..end]).into_owned();
        self.rest = &self.rest[end + 1..];
        Ok(s)
    }

    /// Every remaining NUL-terminated string.
    fn strings(&mut self) -> Result<Vec<String>, DecodeError> {
        let mut out = Vec::new();
        while !self.rest.is_empty() {
            out.push(self.string()?);
        }
        Ok(out)
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
}

/// Decodes one MTA command from the start of `buf`.
pub fn decode_command(buf: &[u8], max_frame: usize) -> Result<Decoded<Command>, DecodeError> {
    let Some((command, data, used)) = frame(buf, max_frame)? else {
        return Ok(Decoded::Incomplete);
    };
    let mut d = Data {
        rest: data,
        command,
    };
    let cmd = match command {
        // Newer MTAs may append fields after these; they carry nothing greygate uses.
        b'O' => Command::OptNeg {
            version: d.u32()?,
            actions: d.u32()?,
            protocol: d.u32()?,
        },
        b'D' => {
            let for_cmd = d.byte()?;
            let mut strings = d.strings()?;
            if strings.len() % 2 == 1 {
                // A trailing name without value: keep it with an empty value.
                strings.push(String::new());
            }
            let mut pairs = Vec::with_capacity(strings.len() / 2);
            let mut it = strings.into_iter();
            while let (Some(n), Some(v)) = (it.next(), it.next()) {
                pairs.push((n, v));
            }
            Command::Macros { for_cmd, pairs }
        }
        b'C' => {
            let hostname = d.string()?;
            let family = match d.byte()? {
                b'U' => Family::Unknown,
                b'L' => Family::Unix,
                b'4' => Family::Inet,
                b'6' => Family::Inet6,
                _ => return Err(d.bad("unknown address family")),
            };
            let (port, address) = if family == Family::Unknown {
                (0, String::new())
            } else {
                (d.u16()?, d.string()?)
            };
            d.end()?;
            Command::Connect {
                hostname,
                family,
                port,
                address,
            }
        }
        b'H' => Command::Helo(d.string()?),
        b'M' | b'R' => {
            let args = d.strings()?;
            if args.is_empty() {
                return Err(d.bad("no address"));
            }
            if command == b'M' {
                Command::Mail(args)
            } else {
                Command::Rcpt(args)
            }
        }
        b'L' => {
            let name = d.string()?;
            let value = d.string()?;
            d.end()?;
            Command::Header { name, value }
        }
        b'N' => Command::EndOfHeaders,
        b'T' => Command::Data,
        b'B' => Command::Body(data.to_vec()),
        b'E' => Command::EndOfMessage(data.to_vec()),
        b'A' => Command::Abort,
        b'Q' => Command::Quit,
        b'K' => Command::QuitNewConnection,
        b'U' => Command::Unknown(d.string().unwrap_or_default()),
        _ => return Err(d.bad("unknown command")),
    };
    Ok(Decoded::Frame(cmd, used))
}

/// Decodes one filter reply from the start of `buf` (for tests and the load generator).
pub fn decode_reply(buf: &[u8], max_frame: usize) -> Result<Decoded<Reply>, DecodeError> {
    let Some((command, data, used)) = frame(buf, max_frame)? else {
        return Ok(Decoded::Incomplete);
    };
    let mut d = Data {
        rest: data,
        command,
    };
    let reply = match command {
        b'O' => {
            let (version, actions, protocol) = (d.u32()?, d.u32()?, d.u32()?);
            let mut macros = Vec::new();
            while !d.rest.is_empty() {
                macros.push((d.u32()?, d.string()?));
            }
            Reply::OptNeg {
                version,
                actions,
                protocol,
                macros,
            }
        }
        b'c' => Reply::Continue,
        b'a' => Reply::Accept,
        b'r' => Reply::Reject,
        b't' => Reply::Tempfail,
        b'd' => Reply::Discard,
        b'p' => Reply::Progress,
        b'y' => Reply::ReplyCode(d.string()?),
        b'h' => Reply::AddHeader {
            name: d.string()?,
            value: d.string()?,
        },
        b'i' => Reply::InsertHeader {
            index: d.u32()?,
            name: d.string()?,
            value: d.string()?,
        },
        _ => return Err(d.bad("unknown reply")),
    };
    if !matches!(reply, Reply::OptNeg { .. }) {
        d.end()?;
    }
    Ok(Decoded::Frame(reply, used))
}

/// Writes one frame: length, command byte, then whatever `body` appends.
fn put_frame(out: &mut Vec<u8>, command: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, command]);
    body(out);
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a string and its NUL; a NUL inside would split it, so it becomes a space.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().map(|b| if b == 0 { b' ' } else { b }));
    out.push(0);
}

impl Reply {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::OptNeg {
                version,
                actions,
                protocol,
                macros,
            } => put_frame(out, b'O', |o| {
                for n in [version, actions, protocol] {
                    o.extend_from_slice(&n.to_be_bytes());
                }
                for (stage, list) in macros {
                    o.extend_from_slice(&stage.to_be_bytes());
                    put_str(o, list);
                }
            }),
            Reply::Continue => put_frame(out, b'c', |_| {}),
            Reply::Accept => put_frame(out, b'a', |_| {}),
            Reply::Reject => put_frame(out, b'r', |_| {}),
            Reply::Tempfail => put_frame(out, b't', |_| {}),
            Reply::Discard => put_frame(out, b'd', |_| {}),
            Reply::Progress => put_frame(out, b'p', |_| {}),
            // A reply must be one line: CR/LF would let text forge further SMTP replies.
            Reply::ReplyCode(text) => {
                put_frame(out, b'y', |o| put_str(o, &text.replace(['\r', '\n'], " ")))
            }
            Reply::AddHeader { name, value } => put_frame(out, b'h', |o| {
                put_str(o, name);
                put_str(o, value);
            }),
            Reply::InsertHeader { index, name, value } => put_frame(out, b'i', |o| {
                o.extend_from_slice(&index.to_be_bytes());
                put_str(o, name);
                put_str(o, value);
            }),
        }
    }
}

impl Command {
    /// Encodes as an MTA would (tests, fuzz round-trips, the load generator).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Command::OptNeg {
                version,
                actions,
                protocol,
            } => put_frame(out, b'O', |o| {
                for n in [version, actions, protocol] {
                    o.extend_from_slice(&n.to_be_bytes());
                }
            }),
            Command::Macros { for_cmd, pairs } => put_frame(out, b'D', |o| {
                o.push(*for_cmd);
                for (n, v) in pairs {
                    put_str(o, n);
                    put_str(o, v);
                }
            }),
            Command::Connect {
                hostname,
                family,
                port,
                address,
            } => put_frame(out, b'C', |o| {
                put_str(o, hostname);
                o.push(family.byte());
                if *family != Family::Unknown {
                    o.extend_from_slice(&port.to_be_bytes());
                    put_str(o, address);
                }
            }),
            Command::Helo(h) => put_frame(out, b'H', |o| put_str(o, h)),
            Command::Mail(args) | Command::Rcpt(args) => {
                let c = if matches!(self, Command::Mail(_)) {
                    b'M'
                } else {
                    b'R'
                };
                put_frame(out, c, |o| args.iter().for_each(|a| put_str(o, a)))
            }
            Command::Header { name, value } => put_frame(out, b'L', |o| {
                put_str(o, name);
                put_str(o, value);
            }),
            Command::EndOfHeaders => put_frame(out, b'N', |_| {}),
            Command::Data => put_frame(out, b'T', |_| {}),
            Command::Body(b) => put_frame(out, b'B', |o| o.extend_from_slice(b)),
            Command::EndOfMessage(b) => put_frame(out, b'E', |o| o.extend_from_slice(b)),
            Command::Abort => put_frame(out, b'A', |_| {}),
            Command::Quit => put_frame(out, b'Q', |_| {}),
            Command::QuitNewConnection => put_frame(out, b'K', |_| {}),
            Command::Unknown(s) => put_frame(out, b'U', |o| put_str(o, s)),
        }
    }
}

/// A macro's name without braces: `{auth_authen}` and `auth_authen` are the same macro.
pub fn macro_name(name: &str) -> &str {
    name.strip_prefix('{')
        .and_then(|n| n.strip_suffix('}'))
        .unwrap_or(name)
}

#[cfg(test)]
mod tests;
