//! What `greygate probe` asks about: recipients from the command line and from a
//! destinations file (`--file`). Pure: bytes in, checked destinations or every bad line
//! (with its number) out, so a batch fails as a usage error before any connection.
//!
//! The file holds one destination a line:
//!
//! ```text
//! # comment lines and blank lines are skipped
//! dave@example.org                  # an address: its domain's MX hosts are asked
//! example.com                       # a bare domain: asked about postmaster@example.com
//! erin@example.net  mx2.example.net:25   # this server instead of the MX lookup
//! frank@example.net [2001:db8::25]:2525
//! ```
//!
//! A bare domain is probed as `LOCAL@domain`, LOCAL being `postmaster` unless
//! `--local-part` says otherwise: every domain that takes mail must take postmaster
//! (RFC 5321 section 4.5.1), so the answer is about the domain and not about one mailbox.
//! The optional second field names the server to ask, `HOST`, `HOST:PORT`, `IP:PORT` or
//! `[IPv6]:PORT` (the port defaults to `--port`). `#` starts a comment at the start of a
//! line or after white space. The same destination twice is asked once (the first line
//! counts).
//!
//! Bounded: at most [`MAX_FILE_BYTES`] read, [`MAX_DESTINATIONS`] destinations, lines of
//! at most [`MAX_LINE_BYTES`]; at most [`MAX_REPORTED_ERRORS`] bad lines are listed.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv6Addr};

/// Largest destinations file read (2 MiB: ten thousand lines of a hundred bytes, comments
/// included, fit twice over).
pub const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
/// Most destinations in one run, command line and file together.
pub const MAX_DESTINATIONS: usize = 10_000;
/// Longest line (an address is at most 254 bytes, a server name 253 plus a port).
pub const MAX_LINE_BYTES: usize = 1024;
/// Bad lines listed before the rest are only counted.
pub const MAX_REPORTED_ERRORS: usize = 20;
/// Local part used for bare-domain lines unless `--local-part` says otherwise.
pub const DEFAULT_LOCAL_PART: &str = "postmaster";

/// One thing to ask about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The recipient given to RCPT TO (`postmaster@domain` for a bare-domain line).
    pub recipient: String,
    /// `host:port` to connect to instead of the MX hosts (normalised, IPv6 in brackets).
    pub server: Option<String>,
    /// Line of the destinations file; `None` for command-line recipients.
    pub line: Option<usize>,
}

/// One bad line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// Why a destinations file cannot be used.
#[derive(Debug)]
pub enum FileError {
    Io(std::io::Error),
    TooBig,
    TooMany,
    /// The first [`MAX_REPORTED_ERRORS`] bad lines, and how many there were in all.
    Invalid {
        errors: Vec<LineError>,
        total: usize,
    },
}

impl FileError {
    /// The error for people, each line prefixed with `name` (the file's path or `stdin`).
    pub fn render(&self, name: &str) -> String {
        match self {
            FileError::Io(e) => format!("cannot read {name}: {e}"),
            FileError::TooBig => format!(
                "{name} is larger than {} MiB: split it into smaller batches",
                MAX_FILE_BYTES / (1024 * 1024)
            ),
            FileError::TooMany => format!(
                "{name}: more than {MAX_DESTINATIONS} destinations in one run: split the list"
            ),
            FileError::Invalid { errors, total } => {
                let mut s = String::new();
                for e in errors {
                    if !s.is_empty() {
                        s.push('\n');
                    }
                    s.push_str(&format!("{name}:{}: {}", e.line, e.message));
                }
                if *total > errors.len() {
                    s.push_str(&format!(
                        "\n{name}: {} more bad lines not shown",
                        total - errors.len()
                    ));
                }
                s
            }
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render("destinations file"))
    }
}

/// Reads at most [`MAX_FILE_BYTES`]; a longer input is refused without reading the rest.
pub fn read_bounded(input: impl Read) -> Result<Vec<u8>, FileError> {
    let mut buf = Vec::new();
    input
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(FileError::Io)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::TooBig);
    }
    Ok(buf)
}

/// How lines become targets.
#[derive(Debug, Clone)]
pub struct ParseOptions<'a> {
    /// Local part for bare-domain lines.
    pub local_part: &'a str,
    /// Port for a server field without one.
    pub default_port: u16,
}

/// Parses a destinations file. Never panics, whatever the bytes.
pub fn parse(bytes: &[u8], opts: &ParseOptions) -> Result<Vec<Target>, FileError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    let mut total = 0usize;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let mut fail = |message: String| {
            total += 1;
            if errors.len() < MAX_REPORTED_ERRORS {
                errors.push(LineError { line, message });
            }
        };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.len() > MAX_LINE_BYTES {
            fail(format!("line longer than {MAX_LINE_BYTES} bytes"));
            continue;
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            fail("not UTF-8 text".into());
            continue;
        };
        match parse_line(text, opts) {
            Ok(None) => {}
            Ok(Some((recipient, server))) => {
                if targets.len() >= MAX_DESTINATIONS {
                    return Err(FileError::TooMany);
                }
                targets.push(Target {
                    recipient,
                    server,
                    line: Some(line),
                });
            }
            Err(message) => fail(message),
        }
    }
    if total > 0 {
        return Err(FileError::Invalid { errors, total });
    }
    Ok(dedup(targets))
}

/// Drops repeated destinations (same recipient, case-insensitively, and same server),
/// keeping the first.
pub fn dedup(targets: Vec<Target>) -> Vec<Target> {
    let mut seen = std::collections::HashSet::new();
    targets
        .into_iter()
        .filter(|t| seen.insert((t.recipient.to_ascii_lowercase(), t.server.clone())))
        .collect()
}

/// One line: `None` for blank and comment lines.
fn parse_line(text: &str, opts: &ParseOptions) -> Result<Option<(String, Option<String>)>, String> {
    let mut fields = Vec::new();
    for token in text.split_whitespace() {
        if token.starts_with('#') {
            break;
        }
        fields.push(token);
    }
    if let Some(c) = text.chars().find(|c| c.is_control() && !c.is_whitespace()) {
        return Err(format!("control character {c:?}"));
    }
    let (dest, server) = match fields[..] {
        [] => return Ok(None),
        [dest] => (dest, None),
        [dest, server] => (dest, Some(server)),
        _ => {
            return Err(format!(
                "{} fields: want RECIPIENT or DOMAIN, optionally followed by HOST:PORT",
                fields.len()
            ));
        }
    };
    let recipient = if dest.contains('@') {
        check_address(dest).map_err(|e| format!("{dest:?}: {e}"))?;
        dest.to_string()
    } else {
        check_domain(dest).map_err(|e| format!("{dest:?}: {e}"))?;
        let recipient = format!("{}@{dest}", opts.local_part);
        // A domain near 253 bytes leaves no room for the local part in a 254-byte path.
        check_address(&recipient).map_err(|e| format!("{recipient:?}: {e}"))?;
        recipient
    };
    let server = server
        .map(|s| check_server(s, opts.default_port).map_err(|e| format!("server {s:?}: {e}")))
        .transpose()?;
    Ok(Some((recipient, server)))
}

/// Characters refused in a local part: SMTP path delimiters, quoting and white space.
/// Quoted local parts are not supported.
const BAD_LOCAL: &[char] = &['<', '>', '"', '(', ')', ',', ';', ':', '\\', '[', ']', '@'];

/// `local@domain` as RCPT TO takes it: an unquoted local part of at most 64 bytes and a
/// host name (no address literals).
pub fn check_address(addr: &str) -> Result<(), String> {
    if addr.len() > 254 {
        return Err("longer than 254 bytes".into());
    }
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return Err("not an email address (want local@domain)".into());
    };
    check_local_part(local)?;
    check_domain(domain)
}

/// A local part: 1 to 64 bytes, no white space, control characters or path delimiters.
pub fn check_local_part(local: &str) -> Result<(), String> {
    if local.is_empty() {
        return Err("empty local part".into());
    }
    if local.len() > 64 {
        return Err("local part longer than 64 bytes".into());
    }
    if let Some(c) = local
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || BAD_LOCAL.contains(c))
    {
        return Err(format!("{c:?} in the local part"));
    }
    Ok(())
}

/// A host name: labels of 1 to 63 bytes (letters, digits, `-`, `_` or non-ASCII for
/// internationalised names), not starting or ending with `-`, at most 253 bytes; one
/// trailing dot allowed.
pub fn check_domain(domain: &str) -> Result<(), String> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() {
        return Err("empty domain".into());
    }
    if d.len() > 253 {
        return Err("domain longer than 253 bytes".into());
    }
    for label in d.split('.') {
        if label.is_empty() {
            return Err("empty label in the domain".into());
        }
        if label.len() > 63 {
            return Err("domain label longer than 63 bytes".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("domain label {label:?} starts or ends with '-'"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("{c:?} in the domain"));
        }
        if label
            .chars()
            .any(|c| !c.is_ascii() && (c.is_control() || c.is_whitespace()))
        {
            return Err("white space or control character in the domain".into());
        }
    }
    Ok(())
}

/// `HOST`, `HOST:PORT`, `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT`, normalised to
/// `host:port` (`[v6]:port`).
pub fn check_server(s: &str, default_port: u16) -> Result<String, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("bad port {p:?}")),
            Ok(n) => Ok(n),
        }
    };
    if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err("missing ']'".into());
        };
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        let p = match after {
            "" => default_port,
            _ => port(after.strip_prefix(':').ok_or("want [IPv6]:PORT")?)?,
        };
        return Ok(format!("[{ip}]:{p}"));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(match ip {
            IpAddr::V4(v4) => format!("{v4}:{default_port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{default_port}"),
        });
    }
    let (host, p) = match s.rsplit_once(':') {
        Some((host, p)) => (host, port(p)?),
        None => (s, default_port),
    };
    if host.parse::<std::net::Ipv4Addr>().is_err() {
        check_domain(host)?;
    }
    Ok(format!("{host}:{p}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: ParseOptions = ParseOptions {
        local_part: DEFAULT_LOCAL_PART,
        default_port: 25,
    };

    fn ok(text: &str) -> Vec<(String, Option<String>, Option<usize>)> {
        parse(text.as_bytes(), &OPTS)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .into_iter()
            .map(|t| (t.recipient, t.server, t.line))
            .collect()
    }

    fn bad(text: &[u8]) -> Vec<LineError> {
        match parse(text, &OPTS) {
            Err(FileError::Invalid { errors, .. }) => errors,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn a_bare_domain_too_long_for_a_path_with_the_local_part_is_a_line_error() {
        let domain = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(59)
        );
        assert!(check_domain(&domain).is_ok(), "a valid host name");
        let opts = ParseOptions {
            local_part: DEFAULT_LOCAL_PART,
            default_port: 25,
        };
        assert!(parse(domain.as_bytes(), &opts).is_err());
        assert!(parse(format!("someone@{domain}").as_bytes(), &opts).is_err());
        assert!(
            parse(format!("x@{domain}").as_bytes(), &opts).is_ok(),
            "253 bytes fit"
        );
    }

    #[test]
    fn lines_comments_domains_and_servers() {
        let text = "\u{feff}# support ticket 4711\r\n\
                    \n\
                    dave@example.org\n\
                    example.com   # a bare domain\r\n\
                    erin@example.net mx2.example.net:2525\n\
                    frank@example.net [2001:db8::25]:26\n\
                    gina@example.net 192.0.2.7\n\
                    DAVE@example.org\n\
                    hugo#x@example.org\n";
        assert_eq!(
            ok(text),
            vec![
                ("dave@example.org".into(), None, Some(3)),
                ("postmaster@example.com".into(), None, Some(4)),
                (
                    "erin@example.net".into(),
                    Some("mx2.example.net:2525".into()),
                    Some(5)
                ),
                (
                    "frank@example.net".into(),
                    Some("[2001:db8::25]:26".into()),
                    Some(6)
                ),
                (
                    "gina@example.net".into(),
                    Some("192.0.2.7:25".into()),
                    Some(7)
                ),
                // DAVE@example.org repeats line 3: asked once.
                ("hugo#x@example.org".into(), None, Some(9)),
            ]
        );
        let custom = ParseOptions {
            local_part: "probe-test",
            default_port: 2525,
        };
        let t = parse(b"example.com mx.example.com", &custom).unwrap();
        assert_eq!(t[0].recipient, "probe-test@example.com");
        assert_eq!(t[0].server.as_deref(), Some("mx.example.com:2525"));
        assert!(parse(b"", &OPTS).unwrap().is_empty());
    }

    #[test]
    fn bad_lines_are_all_reported_with_numbers() {
        let errors = bad(b"ok@example.org\n\
                           a@b c:25 extra\n\
                           <dave@example.org>\n\
                           @example.org\n\
                           dave@\n\
                           dave@exa!mple.org\n\
                           x@-bad-.org\n\
                           x@[192.0.2.1]\n\
                           x@example.org host:0\n\
                           x@example.org host:99999\n\
                           x@example.org [::1\n\
                           x@example.org [nothost]:25\n\
                           x@a..b\n\
                           a\x00b@example.org\n\
                           \xff\xfe@example.org\n");
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, (2..=15).collect::<Vec<_>>(), "{errors:#?}");
        let e = FileError::Invalid {
            errors: errors.clone(),
            total: errors.len(),
        };
        let text = e.render("list.txt");
        assert!(text.starts_with("list.txt:2: 3 fields"), "{text}");
        assert!(text.contains("list.txt:15: not UTF-8"), "{text}");
    }

    #[test]
    fn bounds() {
        let many = "a@example.org\n".repeat(3) + &"x\n".repeat(MAX_REPORTED_ERRORS + 5);
        // "x" is a valid bare domain: make them bad.
        let many = many.replace("x\n", "x@\n");
        match parse(many.as_bytes(), &OPTS) {
            Err(FileError::Invalid { errors, total }) => {
                assert_eq!(errors.len(), MAX_REPORTED_ERRORS);
                assert_eq!(total, MAX_REPORTED_ERRORS + 5);
                let text = FileError::Invalid { errors, total }.render("f");
                assert!(text.ends_with("f: 5 more bad lines not shown"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let long = format!("a@{}.org\n", "b".repeat(MAX_LINE_BYTES));
        assert!(bad(long.as_bytes())[0].message.contains("longer than"));
        let too_many: String = (0..=MAX_DESTINATIONS)
            .map(|i| format!("u{i}@example.org\n"))
            .collect();
        assert!(matches!(
            parse(too_many.as_bytes(), &OPTS),
            Err(FileError::TooMany)
        ));
        let huge = std::io::repeat(b'a').take(MAX_FILE_BYTES * 4);
        assert!(matches!(read_bounded(huge), Err(FileError::TooBig)));
        let small = read_bounded(&b"a@b\n"[..]).unwrap();
        assert_eq!(small, b"a@b\n");
    }

    #[test]
    fn addresses() {
        assert!(check_address("a@example.org").is_ok());
        assert!(check_address("a.b+tag@sub.example.org.").is_ok());
        assert!(check_address("josé@exämple.org").is_ok());
        for bad in [
            "example.org",
            "@example.org",
            "a@",
            "a b@c",
            "<a@b>",
            "a@b@c",
            "\"a b\"@c",
            "a@b_c.-d",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
        assert_eq!(check_server("[::1]", 25).unwrap(), "[::1]:25");
        assert_eq!(check_server("::1", 25).unwrap(), "[::1]:25");
        assert_eq!(
            check_server("127.0.0.1:2525", 25).unwrap(),
            "127.0.0.1:2525"
        );
        assert!(check_server("127.0.0.1:", 25).is_err());
        assert!(check_server("[::1]x", 25).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(
            data in proptest::collection::vec(
                proptest::sample::select(vec![
                    b'a', b'@', b'.', b'-', b':', b'[', b']', b' ', b'\t', b'\r', b'\n',
                    b'#', b'1', b'<', 0u8, 0xc3, 0xa9, 0xff,
                ]),
                0..200,
            )
        ) {
            if let Ok(targets) = parse(&data, &OPTS) {
                for t in targets {
                    proptest::prop_assert!(check_address(&t.recipient).is_ok());
                }
            }
        }
    }
}
