//! The session towards the backend (the real mail server): opened when the engine passes
//! a session's first recipient, told the client's address (XCLIENT, PROXY protocol), and
//! fed the transaction a command at a time. Every reply is bounded in length and lines,
//! every wait has a timeout: a wedged backend costs the client a `451`, never a hang.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead as _, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BackendOptions, ProxyProtocol};
use crate::server::Io;

/// Longest backend reply line.
const MAX_LINE: usize = 4096;
/// Most lines in one backend reply (an EHLO reply has a dozen).
const MAX_LINES: usize = 100;
/// Bytes read from the backend at once, at most.
const READ_CHUNK: usize = 2048;

/// Why the backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    #[error("backend timed out")]
    Timeout,
    #[error("backend closed the connection")]
    Closed,
    #[error("backend I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed backend reply: {0}")]
    Malformed(String),
    /// The backend answered the session's opening with a refusal (its banner or EHLO).
    #[error("backend refused the session: {}", .0.text())]
    Refused(Reply),
    #[error("backend TLS failed: {0}")]
    Tls(String),
}

/// A backend reply: its code and lines of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// All lines joined, for logs.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }

    /// The reply as the client gets it: the backend's code and lines.
    pub fn write_to(&self, out: &mut String) {
        use std::fmt::Write as _;
        let last = self.lines.len().saturating_sub(1);
        for (i, l) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let _ = write!(out, "{}{sep}{l}\r\n", self.code);
        }
        if self.lines.is_empty() {
            let _ = write!(out, "{}\r\n", self.code);
        }
    }
}

/// What the backend said it can do in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub chunking: bool,
    /// RFC 2920: MAIL and RCPT go out in one write.
    pub pipelining: bool,
    pub starttls: bool,
    pub smtputf8: bool,
    /// `SIZE`'s limit; `Some(0)`: no limit said.
    pub size: Option<u64>,
    /// XCLIENT attribute names offered (upper case).
    pub xclient: Vec<String>,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "CHUNKING" => caps.chunking = true,
                "PIPELINING" => caps.pipelining = true,
                "STARTTLS" => caps.starttls = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "SIZE" => caps.size = Some(words.next().and_then(|s| s.parse().ok()).unwrap_or(0)),
                "XCLIENT" => caps.xclient = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// What the backend is told about the client.
#[derive(Debug, Clone)]
pub struct ClientFacts {
    pub addr: SocketAddr,
    /// Where the client connected to (PROXY protocol's destination).
    pub local: SocketAddr,
    /// The client's verified host name, if known.
    pub name: Option<String>,
    pub helo: String,
    /// ESMTP or SMTP, as the client greeted.
    pub esmtp: bool,
}

/// An open backend session, greeted and told who the client is.
pub struct Backend {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    pub caps: Capabilities,
    timeout: Duration,
    /// A client was named by XCLIENT: the backend no longer sees greygate's address.
    pub introduced: bool,
}

impl Backend {
    /// Connects, sends the PROXY header if configured, reads the banner, EHLOs as
    /// `hostname`, and passes the client's facts by XCLIENT when offered and wanted.
    pub async fn open(
        target: &str,
        opts: &BackendOptions,
        hostname: &str,
        client: &ClientFacts,
    ) -> Result<Backend, BackendError> {
        let stream =
            match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(target)).await {
                Err(_) => return Err(BackendError::Connect(target.to_string(), timed_out())),
                Ok(Err(e)) => return Err(BackendError::Connect(target.to_string(), e)),
                Ok(Ok(s)) => s,
            };
        let _ = stream.set_nodelay(true);
        let mut b = Backend {
            io: Box::new(stream),
            buf: Vec::with_capacity(1024),
            caps: Capabilities::default(),
            timeout: opts.reply_timeout,
            introduced: false,
        };
        // A connection of greygate's own (the start-up check) has no client: the header
        // says so (v1 UNKNOWN, v2 LOCAL), as a backend that expects one needs it.
        let own = client.addr.port() == 0;
        match (opts.proxy, own) {
            (ProxyProtocol::Off, _) => {}
            (ProxyProtocol::V1, false) => b.send(&proxy_v1(client.addr, client.local)).await?,
            (ProxyProtocol::V2, false) => b.send(&proxy_v2(client.addr, client.local)).await?,
            (ProxyProtocol::V1, true) => b.send(b"PROXY UNKNOWN\r\n").await?,
            (ProxyProtocol::V2, true) => b.send(&proxy_v2_local()).await?,
        }
        let banner = b.reply(opts.reply_timeout).await?;
        if banner.code != 220 {
            return Err(BackendError::Refused(banner));
        }
        b.ehlo(hostname).await?;
        if opts.starttls && b.caps.starttls {
            b.start_tls(hostname).await?;
        }
        if opts.xclient && !b.caps.xclient.is_empty() && !b.introduce(hostname, client).await? {
            tracing::warn!(
                backend = target,
                "backend refused XCLIENT (allow this host in smtpd_authorized_xclient_hosts); it sees greygate's address"
            );
        }
        Ok(b)
    }

    /// Tells the backend who the client is by XCLIENT (which it offers), and greets it
    /// again when it answers with a new greeting (Postfix: 220). `Ok(false)`: refused.
    pub async fn introduce(
        &mut self,
        hostname: &str,
        client: &ClientFacts,
    ) -> Result<bool, BackendError> {
        let line = xclient_line(&self.caps.xclient, client);
        let r = self.command(&line).await?;
        if r.code == 421 {
            return Err(BackendError::Refused(r));
        }
        // Postfix answers with a new greeting (220); some servers say 250.
        if !(r.is_positive() && r.code < 300) {
            tracing::debug!(reply = %r.text(), "backend refused XCLIENT");
            return Ok(false);
        }
        self.introduced = true;
        self.ehlo(&client.helo_or(hostname)).await?;
        Ok(true)
    }

    /// Whether the backend closed the connection or said something (a `421` on its idle
    /// timeout) while nobody asked: an idle session that is no use any more. Never waits.
    pub fn is_stale(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 64];
        let mut probe = tokio::io::ReadBuf::new(&mut probe);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Pending: nothing to read, still open.
        !std::pin::Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Ends the transaction in progress, if any: the session is then as good as new.
    pub async fn reset(&mut self) -> Result<(), BackendError> {
        let r = self.command("RSET").await?;
        if r.code == 250 {
            Ok(())
        } else {
            Err(BackendError::Refused(r))
        }
    }

    /// Connects, reads the banner and EHLOs, without telling the backend any client: what
    /// it offers. The daemon asks at start, to log it and to know whether to offer BDAT.
    pub async fn capabilities(
        target: &str,
        opts: &BackendOptions,
        hostname: &str,
    ) -> Result<Capabilities, BackendError> {
        let opts = BackendOptions {
            xclient: false,
            ..opts.clone()
        };
        let unknown = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 0);
        let facts = ClientFacts {
            addr: unknown,
            local: unknown,
            name: None,
            helo: String::new(),
            esmtp: true,
        };
        let b = Backend::open(target, &opts, hostname, &facts).await?;
        let caps = b.caps.clone();
        b.quit().await;
        Ok(caps)
    }

    async fn ehlo(&mut self, name: &str) -> Result<(), BackendError> {
        let r = self.command(&format!("EHLO {name}")).await?;
        if r.code == 250 {
            self.caps = Capabilities::from_ehlo(&r);
            return Ok(());
        }
        let r = self.command(&format!("HELO {name}")).await?;
        if r.code != 250 {
            return Err(BackendError::Refused(r));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    async fn start_tls(&mut self, hostname: &str) -> Result<(), BackendError> {
        let r = self.command("STARTTLS").await?;
        if r.code != 220 {
            return Err(BackendError::Tls(format!("STARTTLS refused: {}", r.text())));
        }
        let placeholder: Box<dyn Io> =
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()));
        let plain = std::mem::replace(&mut self.io, placeholder);
        self.buf.clear();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(hostname.to_string())
            .unwrap_or_else(|_| {
                tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")
                    .expect("a valid name")
            });
        let connector = crate::tls::unverified_connector().map_err(BackendError::Tls)?;
        let tls = tokio::time::timeout(self.timeout, connector.connect(name, plain))
            .await
            .map_err(|_| BackendError::Timeout)?
            .map_err(|e| BackendError::Tls(e.to_string()))?;
        self.io = Box::new(tls);
        self.ehlo(hostname).await
    }

    /// Sends one command line (without CRLF) and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, BackendError> {
        self.command_with_data(line, &[]).await
    }

    /// Sends command lines in one write and reads a reply to each, in order (RFC 2920;
    /// only for a backend that offers PIPELINING).
    pub async fn pipelined(&mut self, lines: &[&str]) -> Result<Vec<Reply>, BackendError> {
        let mut bytes = Vec::with_capacity(lines.iter().map(|l| l.len() + 2).sum());
        for l in lines {
            bytes.extend_from_slice(l.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        self.send(&bytes).await?;
        self.flush().await?;
        let mut replies = Vec::with_capacity(lines.len());
        for _ in lines {
            replies.push(self.reply(self.timeout).await?);
        }
        Ok(replies)
    }

    /// Sends a command line and data right after it (a BDAT chunk), and reads the reply.
    pub async fn command_with_data(
        &mut self,
        line: &str,
        data: &[u8],
    ) -> Result<Reply, BackendError> {
        let mut bytes = Vec::with_capacity(line.len() + 2 + data.len());
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(data);
        self.send(&bytes).await?;
        self.flush().await?;
        self.reply(self.timeout).await
    }

    /// Writes bytes as they are (message data, a BDAT chunk).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        match tokio::time::timeout(self.timeout, self.io.write_all(bytes)).await {
            Err(_) => Err(BackendError::Timeout),
            Ok(r) => Ok(r?),
        }
    }

    pub async fn flush(&mut self) -> Result<(), BackendError> {
        match tokio::time::timeout(self.timeout, self.io.flush()).await {
            Err(_) => Err(BackendError::Timeout),
            Ok(r) => Ok(r?),
        }
    }

    /// The reply to the end of a message: it may take twice the usual wait.
    pub async fn final_reply(&mut self) -> Result<Reply, BackendError> {
        self.flush().await?;
        self.reply(self.timeout * 2).await
    }

    /// Reads one (multi-line) reply.
    pub async fn reply(&mut self, limit: Duration) -> Result<Reply, BackendError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut lines = Vec::new();
        let mut code = 0;
        loop {
            let end = self.line(deadline).await?;
            let more = {
                let text = String::from_utf8_lossy(&self.buf[..end]);
                let text = text.trim_end_matches(['\r', '\n']);
                let (c, rest) = text.split_at_checked(3).unwrap_or((text, ""));
                let this: u16 = c
                    .parse()
                    .ok()
                    .filter(|c| (200..600).contains(c))
                    .ok_or_else(|| BackendError::Malformed(text.to_string()))?;
                if !lines.is_empty() && this != code {
                    return Err(BackendError::Malformed(text.to_string()));
                }
                code = this;
                let (more, body) = match rest.as_bytes().first() {
                    Some(b'-') => (true, &rest[1..]),
                    Some(b' ') => (false, &rest[1..]),
                    None => (false, ""),
                    Some(_) => return Err(BackendError::Malformed(text.to_string())),
                };
                lines.push(body.to_string());
                more
            };
            self.buf.drain(..end);
            if !more {
                return Ok(Reply { code, lines });
            }
            if lines.len() >= MAX_LINES {
                return Err(BackendError::Malformed("reply has too many lines".into()));
            }
        }
    }

    /// Reads until a whole line is buffered; returns where it ends (after its LF).
    ///
    /// Straight into the session's buffer: a read buffer on the stack would be carried
    /// (and copied) in every future that waits for a backend reply.
    async fn line(&mut self, deadline: tokio::time::Instant) -> Result<usize, BackendError> {
        let mut searched = 0;
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[searched..]) {
                return Ok(searched + i + 1);
            }
            searched = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Err(BackendError::Malformed("reply line too long".into()));
            }
            self.buf.reserve(READ_CHUNK);
            let n = match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                Err(_) => return Err(BackendError::Timeout),
                Ok(r) => r?,
            };
            if n == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// A session over any stream, as if greeted (for tests).
    #[cfg(test)]
    pub fn over(io: Box<dyn Io>) -> Backend {
        Backend {
            io,
            buf: Vec::new(),
            caps: Capabilities::default(),
            timeout: Duration::from_secs(1),
            introduced: false,
        }
    }

    /// Ends the session politely (errors ignored: the session is over either way).
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.io.write_all(b"QUIT\r\n").await;
            let _ = self.io.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

impl ClientFacts {
    fn helo_or<'a>(&'a self, fallback: &'a str) -> String {
        if self.helo.is_empty() {
            fallback.to_string()
        } else {
            self.helo.clone()
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
}

/// XCLIENT with the attributes the backend offers (values xtext-encoded, RFC 3461).
pub fn xclient_line(offered: &[String], c: &ClientFacts) -> String {
    let mut line = String::from("XCLIENT");
    let ip = match c.addr.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("IPV6:{a}"),
    };
    let name = c.name.clone().unwrap_or_else(|| "[UNAVAILABLE]".into());
    let attrs = [
        ("ADDR", ip),
        ("PORT", c.addr.port().to_string()),
        ("NAME", name),
        (
            "HELO",
            if c.helo.is_empty() {
                "[UNAVAILABLE]".into()
            } else {
                c.helo.clone()
            },
        ),
        ("PROTO", if c.esmtp { "ESMTP" } else { "SMTP" }.into()),
    ];
    for (k, v) in attrs {
        if offered.iter().any(|o| o == k) {
            line.push(' ');
            line.push_str(k);
            line.push('=');
            xtext(&v, &mut line);
        }
    }
    line
}

fn xtext(v: &str, out: &mut String) {
    use std::fmt::Write as _;
    for b in v.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
}

/// PROXY protocol version 1: one text line.
pub fn proxy_v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (fam, src, dst) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => ("TCP4", c.ip().to_string(), l.ip().to_string()),
        (c, l) => ("TCP6", v6(c.ip()).to_string(), v6(l.ip()).to_string()),
    };
    format!(
        "PROXY {fam} {src} {dst} {} {}\r\n",
        client.port(),
        local.port()
    )
    .into_bytes()
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// PROXY protocol version 2, LOCAL: a connection of the proxy's own, no addresses.
pub fn proxy_v2_local() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

/// PROXY protocol version 2: the binary header for a proxied TCP connection.
pub fn proxy_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            h.push(0x11); // TCP over IPv4
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
        }
        (c, l) => {
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(c.ip()).octets());
            h.extend_from_slice(&v6(l.ip()).octets());
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&local.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ClientFacts {
        ClientFacts {
            addr: "192.0.2.7:40000".parse().unwrap(),
            local: "198.51.100.1:25".parse().unwrap(),
            name: None,
            helo: "mail example".into(),
            esmtp: true,
        }
    }

    #[test]
    fn xclient_sends_only_offered_attributes_xtext_encoded() {
        let offered = ["NAME", "ADDR", "HELO"].map(String::from);
        assert_eq!(
            xclient_line(&offered, &facts()),
            "XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE] HELO=mail+20example"
        );
        let mut v6 = facts();
        v6.addr = "[2001:db8::1]:25".parse().unwrap();
        assert!(xclient_line(&offered, &v6).contains("ADDR=IPV6:2001:db8::1"));
    }

    #[test]
    fn proxy_headers_follow_the_spec() {
        let f = facts();
        assert_eq!(
            proxy_v1(f.addr, f.local),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n"
        );
        let v2 = proxy_v2(f.addr, f.local);
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(v2.len(), 16 + 12);
        assert_eq!(&v2[16..20], &[192, 0, 2, 7]);
        assert_eq!(&v2[24..26], &40000u16.to_be_bytes());
    }

    #[test]
    fn ehlo_capabilities_are_read_from_the_reply() {
        let r = Reply {
            code: 250,
            lines: vec![
                "mx.example".into(),
                "PIPELINING".into(),
                "SIZE 10240000".into(),
                "XCLIENT NAME ADDR PROTO HELO".into(),
                "chunking".into(),
            ],
        };
        let c = Capabilities::from_ehlo(&r);
        assert!(c.chunking);
        assert_eq!(c.size, Some(10_240_000));
        assert_eq!(c.xclient.len(), 4);
        let mut out = String::new();
        r.write_to(&mut out);
        assert!(out.starts_with("250-mx.example\r\n"));
        assert!(out.ends_with("250 chunking\r\n"));
    }

    #[tokio::test]
    async fn replies_are_bounded_and_checked() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut be = Backend {
            io: Box::new(a),
            buf: Vec::new(),
            caps: Capabilities::default(),
            timeout: Duration::from_secs(1),
            introduced: false,
        };
        b.write_all(b"250-first\r\n250 second\r\n550 5.1.1 unknown\r\nbad\r\n")
            .await
            .unwrap();
        let t = Duration::from_secs(1);
        let r = be.reply(t).await.unwrap();
        assert_eq!((r.code, r.lines.len()), (250, 2));
        let r = be.reply(t).await.unwrap();
        assert_eq!(r.text(), "550 5.1.1 unknown");
        assert!(matches!(be.reply(t).await, Err(BackendError::Malformed(_))));
        b.write_all(&vec![b'2'; 10_000]).await.unwrap();
        assert!(matches!(be.reply(t).await, Err(BackendError::Malformed(_))));
    }
}
