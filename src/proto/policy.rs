//! Postfix policy delegation protocol (SMTPD_POLICY_README): a pure, bounded codec.

use std::fmt;

/// How much one request may make the decoder hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line in bytes, not counting its "\n" or "\r\n" terminator.
    pub max_line: usize,
    /// Most attributes in one request.
    pub max_attributes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: 4096,
            max_attributes: 100,
        }
    }
}

/// One request: attributes in arrival order (duplicate names: the last one wins in `get`).
///
/// Names and values are kept back to back in one string, with their ends beside it: a
/// request of some 30 attributes costs two buffers (whose sizes the decoder reuses), not
/// sixty strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRequest {
    text: String,
    /// Per attribute: where its name ends and where its value ends in `text` (the name
    /// starts where the previous value ended, the value where the name ended).
    ends: Vec<(usize, usize)>,
}

impl PolicyRequest {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty request with room for `text` bytes of names and values and `attributes`
    /// attributes.
    fn with_capacity(text: usize, attributes: usize) -> Self {
        PolicyRequest {
            text: String::with_capacity(text),
            ends: Vec::with_capacity(attributes),
        }
    }

    pub fn push(&mut self, name: impl AsRef<str>, value: impl AsRef<str>) {
        self.push_bytes(name.as_ref().as_bytes(), value.as_ref().as_bytes());
    }

    /// Appends an attribute as received: each invalid UTF-8 sequence becomes U+FFFD, valid
    /// text is copied as is.
    fn push_bytes(&mut self, name: &[u8], value: &[u8]) {
        push_lossy(&mut self.text, name);
        let name_end = self.text.len();
        push_lossy(&mut self.text, value);
        self.ends.push((name_end, self.text.len()));
    }

    /// The value of the last attribute called `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attributes()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// The attributes in the order received.
    pub fn attributes(&self) -> impl DoubleEndedIterator<Item = (&str, &str)> {
        self.ends.iter().enumerate().map(|(i, &(name_end, end))| {
            let start = if i == 0 { 0 } else { self.ends[i - 1].1 };
            (&self.text[start..name_end], &self.text[name_end..end])
        })
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Serialises back to protocol bytes (name=value lines + empty line); used by tests, load generators, fuzz round-trips.
    ///
    /// Every request the [`Decoder`] produces encodes to bytes that decode to an equal request,
    /// given a `max_line` three times the original: lossy UTF-8 decoding turns each invalid byte
    /// into a 3-byte U+FFFD, so a re-encoded line can be up to three times longer than it arrived.
    /// LF and NUL in values become spaces so a value can never split or corrupt the framing;
    /// names are written as given, so a name the decoder would reject still encodes but will not decode.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for (name, value) in self.attributes() {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            out.extend(value.bytes().map(|b| match b {
                b'\n' | 0 => b' ',
                b => b,
            }));
            // The decoder strips one '\r' before "\n", so a value ending in '\r' needs one more.
            if value.ends_with('\r') {
                out.push(b'\r');
            }
            out.push(b'\n');
        }
        out.push(b'\n');
    }
}

/// Why a connection's input cannot be decoded; all are fatal to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    LineTooLong {
        limit: usize,
    },
    TooManyAttributes {
        limit: usize,
    },
    /// `line` is 1-based within the current request.
    Malformed {
        line: usize,
        reason: String,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LineTooLong { limit } => write!(f, "line longer than {limit} bytes"),
            Self::TooManyAttributes { limit } => {
                write!(f, "more than {limit} attributes in one request")
            }
            Self::Malformed { line, reason } => write!(f, "malformed line {line}: {reason}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Incremental request decoder; the caller owns the byte buffer.
pub struct Decoder {
    limits: Limits,
    request: PolicyRequest,
    /// The last call left an unterminated line behind, i.e. the peer stopped mid-line.
    partial_line: bool,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            request: PolicyRequest::new(),
            partial_line: false,
        }
    }

    /// Decodes from the start of `buf`. Returns (bytes consumed, maybe a complete request).
    ///
    /// Consumes only complete lines and stops right after the empty line that completes a
    /// request, so pipelined requests come out one per call, in order. Without a complete
    /// request it consumes every complete line (keeping the partial request inside) and returns
    /// `(consumed, None)`; the caller keeps the unconsumed tail and calls again with more bytes.
    /// An unterminated tail already longer than `max_line` is an error at once, which bounds
    /// what the caller has to buffer.
    ///
    /// # Errors
    ///
    /// Any [`DecodeError`]; the decoder's state is then unspecified and the connection should be closed.
    pub fn decode(&mut self, buf: &[u8]) -> Result<(usize, Option<PolicyRequest>), DecodeError> {
        let mut consumed = 0;
        while let Some(pos) = buf[consumed..].iter().position(|&b| b == b'\n') {
            let line = strip_cr(&buf[consumed..consumed + pos]);
            consumed += pos + 1;
            if line.is_empty() {
                if self.request.is_empty() {
                    continue; // stray blank line between requests
                }
                self.partial_line = false;
                // The next request gets buffers the size of this one's: clients send the
                // same attributes every time.
                let next =
                    PolicyRequest::with_capacity(self.request.text.len(), self.request.len());
                return Ok((consumed, Some(std::mem::replace(&mut self.request, next))));
            }
            self.push_line(line)?;
        }
        let tail = &buf[consumed..];
        // A tail ending in '\r' may yet become a CRLF-terminated line of exactly max_line bytes.
        if strip_cr(tail).len() > self.limits.max_line {
            return Err(DecodeError::LineTooLong {
                limit: self.limits.max_line,
            });
        }
        self.partial_line = !tail.is_empty();
        Ok((consumed, None))
    }

    /// True while a request is partly received (used for the read timeout vs idle timeout distinction).
    pub fn in_request(&self) -> bool {
        !self.request.is_empty() || self.partial_line
    }

    fn push_line(&mut self, line: &[u8]) -> Result<(), DecodeError> {
        if line.len() > self.limits.max_line {
            return Err(DecodeError::LineTooLong {
                limit: self.limits.max_line,
            });
        }
        // Every non-blank line of a request is an attribute, so this is its line number.
        let malformed = |reason: String| DecodeError::Malformed {
            line: self.request.len() + 1,
            reason,
        };
        if line.contains(&0) {
            return Err(malformed(format!("NUL byte in {}", snippet(line))));
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            return Err(malformed(format!("no '=' in {}", snippet(line))));
        };
        let (name, value) = (&line[..eq], &line[eq + 1..]);
        if name.is_empty() {
            return Err(malformed(format!(
                "empty attribute name in {}",
                snippet(line)
            )));
        }
        if !name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(malformed(format!(
                "invalid attribute name {}",
                snippet(name)
            )));
        }
        if self.request.len() >= self.limits.max_attributes {
            return Err(DecodeError::TooManyAttributes {
                limit: self.limits.max_attributes,
            });
        }
        // The name is ASCII by now; values may be 8-bit (SMTPUTF8 addresses) and must not
        // cost the request.
        self.request.push_bytes(name, value);
        Ok(())
    }
}

/// Appends `bytes` to `text`, each invalid UTF-8 sequence as U+FFFD.
fn push_lossy(text: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(valid) => text.push_str(valid),
        Err(_) => text.push_str(&String::from_utf8_lossy(bytes)),
    }
}

/// Writes `action=<action>\n\n`. CR, LF and NUL in `action` are replaced by spaces so a reply can never be split or inject lines.
pub fn encode_response(action: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"action=");
    let start = out.len();
    out.extend_from_slice(action.as_bytes());
    for b in &mut out[start..] {
        if matches!(*b, b'\r' | b'\n' | 0) {
            *b = b' ';
        }
    }
    out.extend_from_slice(b"\n\n");
}

/// Telnet users send CRLF; exactly one '\r' belongs to the terminator.
fn strip_cr(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// A bounded, escaped quote of untrusted bytes, safe to put in a log line.
fn snippet(bytes: &[u8]) -> String {
    const MAX: usize = 60;
    let shown = &bytes[..bytes.len().min(MAX)];
    let more = if bytes.len() > MAX { "..." } else { "" };
    format!("\"{}\"{more}", shown.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/postfix-3.7-rcpt-request.txt");

    /// The captured request up to and including its terminating empty line.
    fn fixture() -> &'static [u8] {
        let end = FIXTURE.find("\n\n").expect("fixture has an empty line") + 2;
        &FIXTURE.as_bytes()[..end]
    }

    type Outcome = Result<Vec<Vec<(&'static str, &'static str)>>, DecodeError>;

    const SMALL: Limits = Limits {
        max_line: 8,
        max_attributes: 3,
    };

    /// Feeds `input` as one buffer, the way a connection loop would, and collects every request.
    fn decode_all(limits: Limits, input: &[u8]) -> Result<Vec<PolicyRequest>, DecodeError> {
        decode_chunked(limits, &[input])
    }

    fn decode_chunked(limits: Limits, chunks: &[&[u8]]) -> Result<Vec<PolicyRequest>, DecodeError> {
        let mut decoder = Decoder::new(limits);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                let (consumed, request) = decoder.decode(&buf)?;
                assert!(consumed <= buf.len());
                buf.drain(..consumed);
                match request {
                    Some(request) => out.push(request),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    fn request(attrs: &[(&str, &str)]) -> PolicyRequest {
        let mut req = PolicyRequest::new();
        for (n, v) in attrs {
            req.push(*n, *v);
        }
        req
    }

    fn malformed(line: usize, reason: &str) -> Outcome {
        Err(DecodeError::Malformed {
            line,
            reason: reason.to_owned(),
        })
    }

    fn cases() -> Vec<(&'static str, Limits, &'static [u8], Outcome)> {
        let d = Limits::default();
        vec![
            ("empty input", d, b"", Ok(vec![])),
            ("incomplete request", d, b"a=b\nc=d", Ok(vec![])),
            ("one request", d, b"a=b\n\n", Ok(vec![vec![("a", "b")]])),
            (
                "pipelined requests in order",
                d,
                b"a=1\n\nb=2\nc=3\n\nd=4\n\n",
                Ok(vec![
                    vec![("a", "1")],
                    vec![("b", "2"), ("c", "3")],
                    vec![("d", "4")],
                ]),
            ),
            (
                "CRLF",
                d,
                b"a=b\r\nc=\r\n\r\n",
                Ok(vec![vec![("a", "b"), ("c", "")]]),
            ),
            (
                "only one CR is stripped",
                d,
                b"a=b\r\r\n\n",
                Ok(vec![vec![("a", "b\r")]]),
            ),
            (
                "stray blank lines",
                d,
                b"\n\r\n\na=1\n\n\n\nb=2\n\n",
                Ok(vec![vec![("a", "1")], vec![("b", "2")]]),
            ),
            ("empty value", d, b"a=\n\n", Ok(vec![vec![("a", "")]])),
            (
                "value containing '='",
                d,
                b"a==b=c\n\n",
                Ok(vec![vec![("a", "=b=c")]]),
            ),
            (
                "duplicate names kept in order",
                d,
                b"a=1\na=2\n\n",
                Ok(vec![vec![("a", "1"), ("a", "2")]]),
            ),
            (
                "non-UTF-8 value decoded lossily",
                d,
                b"sender=j\xf6rg@example.org\n\n",
                Ok(vec![vec![("sender", "j\u{fffd}rg@example.org")]]),
            ),
            (
                "name charset",
                d,
                b"Ab_9-z=x\n\n",
                Ok(vec![vec![("Ab_9-z", "x")]]),
            ),
            (
                "line of max_line",
                SMALL,
                b"abc=5678\n\n",
                Ok(vec![vec![("abc", "5678")]]),
            ),
            (
                "line of max_line with CRLF",
                SMALL,
                b"abc=5678\r\n\r\n",
                Ok(vec![vec![("abc", "5678")]]),
            ),
            (
                "line of max_line + 1",
                SMALL,
                b"abc=56789\n\n",
                Err(DecodeError::LineTooLong { limit: 8 }),
            ),
            (
                "incomplete tail over the limit",
                SMALL,
                b"a=1\nabc=56789",
                Err(DecodeError::LineTooLong { limit: 8 }),
            ),
            (
                "max_attributes",
                SMALL,
                b"a=1\nb=2\nc=3\n\n",
                Ok(vec![vec![("a", "1"), ("b", "2"), ("c", "3")]]),
            ),
            (
                "max_attributes + 1",
                SMALL,
                b"a=1\nb=2\nc=3\nd=4\n\n",
                Err(DecodeError::TooManyAttributes { limit: 3 }),
            ),
            (
                "limits are per request",
                SMALL,
                b"a=1\nb=2\nc=3\n\nd=4\ne=5\nf=6\n\n",
                Ok(vec![
                    vec![("a", "1"), ("b", "2"), ("c", "3")],
                    vec![("d", "4"), ("e", "5"), ("f", "6")],
                ]),
            ),
            (
                "no '='",
                d,
                b"a=1\nb=2\ngarbage\n\n",
                malformed(3, "no '=' in \"garbage\""),
            ),
            (
                "empty name",
                d,
                b"=x\n\n",
                malformed(1, "empty attribute name in \"=x\""),
            ),
            (
                "bad name",
                d,
                b"a b=x\n\n",
                malformed(1, "invalid attribute name \"a b\""),
            ),
            (
                "non-ASCII name",
                d,
                b"\xc3\xa9=x\n\n",
                malformed(1, "invalid attribute name \"\\xc3\\xa9\""),
            ),
            (
                "NUL in value",
                d,
                b"a=\0\n\n",
                malformed(1, "NUL byte in \"a=\\x00\""),
            ),
            (
                "line numbers restart per request",
                d,
                b"a=1\nb=2\n\nc=3\nx\n\n",
                malformed(2, "no '=' in \"x\""),
            ),
        ]
    }

    fn expected(outcome: &Outcome) -> Result<Vec<PolicyRequest>, DecodeError> {
        outcome
            .as_ref()
            .map(|reqs| reqs.iter().map(|attrs| request(attrs)).collect())
            .map_err(Clone::clone)
    }

    #[test]
    fn table() {
        for (name, limits, input, outcome) in cases() {
            assert_eq!(
                decode_all(limits, input),
                expected(&outcome),
                "case {name:?}"
            );
        }
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let twice = [fixture(), fixture()].concat();
        let mut inputs: Vec<(&str, Limits, &[u8])> =
            cases().into_iter().map(|(n, l, i, _)| (n, l, i)).collect();
        inputs.push(("fixture twice", Limits::default(), &twice));
        for (name, limits, input) in inputs {
            let whole = decode_all(limits, input);
            for split in 0..=input.len() {
                let (a, b) = input.split_at(split);
                assert_eq!(
                    decode_chunked(limits, &[a, b]),
                    whole,
                    "case {name:?} split at {split}"
                );
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(
                decode_chunked(limits, &bytes),
                whole,
                "case {name:?} byte by byte"
            );
        }
    }

    #[test]
    fn fixture_request() {
        let reqs = decode_all(Limits::default(), fixture()).expect("fixture decodes");
        assert_eq!(reqs.len(), 1);
        let req = &reqs[0];
        assert_eq!(req.len(), 29);
        assert_eq!(
            req.attributes().next(),
            Some(("request", "smtpd_access_policy"))
        );
        for (name, value) in [
            ("client_address", "2001:db8::25"),
            ("sender", "bounce+x@example.net"),
            ("recipient", "root@localhost"),
            ("protocol_state", "RCPT"),
            ("instance", "2df3.6b0b235f.c99c2.0"),
            ("queue_id", ""),
            ("policy_context", ""),
        ] {
            assert_eq!(req.get(name), Some(value), "{name}");
        }
        assert_eq!(req.get("missing"), None);

        let mut encoded = Vec::new();
        req.encode(&mut encoded);
        assert_eq!(
            encoded,
            fixture(),
            "a well-formed request re-encodes byte for byte"
        );
    }

    #[test]
    fn get_returns_last_occurrence() {
        let req = request(&[("a", "1"), ("b", "2"), ("a", "3")]);
        assert_eq!(req.get("a"), Some("3"));
        assert_eq!(req.len(), 3);
        assert!(!req.is_empty() && PolicyRequest::new().is_empty());
    }

    #[test]
    fn in_request_tracks_partial_input() {
        let mut decoder = Decoder::new(Limits::default());
        assert!(!decoder.in_request());
        assert_eq!(decoder.decode(b"\n\n"), Ok((2, None)));
        assert!(!decoder.in_request(), "blank lines do not start a request");
        assert_eq!(decoder.decode(b"requ"), Ok((0, None)));
        assert!(decoder.in_request(), "half a line is part of a request");
        assert_eq!(decoder.decode(b"request=x\n"), Ok((10, None)));
        assert!(decoder.in_request());
        assert_eq!(
            decoder.decode(b"\n").map(|(n, r)| (n, r.is_some())),
            Ok((1, true))
        );
        assert!(!decoder.in_request());
    }

    #[test]
    fn encode_decode_round_trip() {
        let tricky = [
            request(&[("a", "b")]),
            request(&[("a", ""), ("a", "x=y"), ("b", " spaced ")]),
            request(&[("cr", "\r"), ("crcr", "a\r\r"), ("mid", "a\rb")]),
            request(&[("utf8", "jörg@exämple.org"), ("lossy", "\u{fffd}")]),
            decode_all(Limits::default(), fixture())
                .expect("fixture decodes")
                .remove(0),
        ];
        for req in tricky {
            let mut buf = Vec::new();
            req.encode(&mut buf);
            assert_eq!(
                decode_all(Limits::default(), &buf),
                Ok(vec![req.clone()]),
                "{req:?}"
            );
        }
    }

    #[test]
    fn encode_keeps_framing_for_hostile_values() {
        let mut buf = Vec::new();
        request(&[("a", "x\n\ninjected=1"), ("b", "nul\0")]).encode(&mut buf);
        assert_eq!(buf, b"a=x  injected=1\nb=nul \n\n");
    }

    #[test]
    fn encode_response_sanitises() {
        for (action, wire) in [
            ("DUNNO", &b"action=DUNNO\n\n"[..]),
            (
                "DEFER_IF_PERMIT Greylisted, try again later",
                b"action=DEFER_IF_PERMIT Greylisted, try again later\n\n",
            ),
            ("DUNNO\n\naction=OK", b"action=DUNNO  action=OK\n\n"),
            ("a\r\nb\0c", b"action=a  b c\n\n"),
            ("", b"action=\n\n"),
        ] {
            let mut out = Vec::new();
            encode_response(action, &mut out);
            assert_eq!(out, wire, "{action:?}");
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            DecodeError::LineTooLong { limit: 4096 }.to_string(),
            "line longer than 4096 bytes"
        );
        assert_eq!(
            DecodeError::TooManyAttributes { limit: 100 }.to_string(),
            "more than 100 attributes in one request"
        );
        let err = decode_all(Limits::default(), b"a=1\nb=2\ngarbage\n").expect_err("malformed");
        assert_eq!(err.to_string(), "malformed line 3: no '=' in \"garbage\"");

        let mut junk = vec![0xff_u8; 200];
        junk.push(b'\n');
        let message = decode_all(Limits::default(), &junk)
            .expect_err("malformed")
            .to_string();
        assert!(message.len() < 300 && message.is_ascii(), "{message}");
        assert!(message.ends_with("\\xff\"..."), "{message}");
    }

    #[test]
    fn random_input_never_panics() {
        // Fragments that drive the state machine, so that many requests complete and round-trip.
        const FRAGMENTS: &[&[u8]] = &[
            b"a=",
            b"b_-9=",
            b"x",
            b"=",
            b"\n",
            b"\n",
            b"\r\n",
            b"\r",
            b"\0",
            b"\xff",
            b"\xc3\xa9",
            b" ",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let limits = Limits {
            max_line: 16,
            max_attributes: 4,
        };
        for _ in 0..20_000 {
            let mut input = Vec::new();
            for _ in 0..next(40) {
                match next(FRAGMENTS.len() + 1) {
                    i if i < FRAGMENTS.len() => input.extend_from_slice(FRAGMENTS[i]),
                    _ => input.push(next(256) as u8),
                }
            }
            let mut decoder = Decoder::new(limits);
            let mut rest = &input[..];
            while let Ok((consumed, request)) = decoder.decode(rest) {
                assert!(consumed <= rest.len());
                rest = &rest[consumed..];
                let Some(request) = request else { break };
                assert!(!request.is_empty() && request.len() <= limits.max_attributes);
                let mut encoded = Vec::new();
                request.encode(&mut encoded);
                let relaxed = Limits {
                    max_line: limits.max_line * 3,
                    ..limits
                };
                assert_eq!(decode_all(relaxed, &encoded), Ok(vec![request]));
            }
        }
    }
}
