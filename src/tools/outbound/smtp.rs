//! The client side of an SMTP conversation, up to RCPT and never further: banner, EHLO
//! (HELO if EHLO is refused), optional STARTTLS, MAIL FROM, RCPT TO for each recipient, QUIT. Generic over
//! any async stream; every reply is bounded in line length and line count, and every read
//! has a timeout, so a hostile or wedged server cannot hold the probe forever.

use std::time::Duration;

use tokio_rustls::rustls;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::classify::Reply;

/// Longest reply line accepted (RFC 5321 allows 512; servers exceed it in practice).
const MAX_LINE: usize = 4096;
/// Most lines in one (multi-line) reply; EHLO replies have a dozen.
const MAX_LINES: usize = 100;

/// Why a conversation ended without a reply to classify.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("timed out after {0:?} waiting for the server")]
    Timeout(Duration),
    #[error("connection closed by the server")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed reply: {0:?}")]
    Malformed(String),
    #[error("reply too long")]
    TooLong,
    #[error("STARTTLS failed: {0}")]
    Tls(String),
}

/// What a session runs over, before and after STARTTLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One line of the transcript: what we sent (`>`) or what the server answered (`<`).
#[derive(Debug, Clone)]
pub struct Line {
    pub dir: &'static str,
    pub text: String,
}

/// As one string, `> EHLO name` / `< 250 ok`: what people read in transcripts.
impl serde::Serialize for Line {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{} {}", self.dir, self.text))
    }
}

/// Where the conversation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Banner,
    Helo,
    MailFrom,
    RcptTo,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Banner => "banner",
            Stage::Helo => "EHLO/HELO",
            Stage::MailFrom => "MAIL FROM",
            Stage::RcptTo => "RCPT TO",
        }
    }
}

/// The outcome of a conversation: a reply per recipient (the RCPT reply, or the earlier
/// reply that ended the conversation for all of them) plus the transcript.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Per recipient, in the order given: the stage the reply answered and the reply.
    pub replies: Vec<(Stage, Reply)>,
    pub transcript: Vec<Line>,
}

/// A client session.
pub struct Session {
    io: BufReader<Box<dyn Stream>>,
    timeout: Duration,
    transcript: Vec<Line>,
    /// Server name for STARTTLS (SNI), when the probe asks for it.
    starttls: Option<String>,
}

impl Session {
    pub fn new<S: Stream + 'static>(stream: S, timeout: Duration) -> Self {
        Session {
            io: BufReader::new(Box::new(stream)),
            timeout,
            transcript: Vec::new(),
            starttls: None,
        }
    }

    /// Upgrades to TLS after EHLO, naming the server `server_name` (a host name or an IP).
    pub fn with_starttls(mut self, server_name: String) -> Self {
        self.starttls = Some(server_name);
        self
    }

    /// STARTTLS, the TLS handshake, and EHLO again (RFC 3207).
    async fn start_tls(&mut self, server_name: &str, helo: &str) -> Result<Reply, SmtpError> {
        let go = self.command("STARTTLS").await?;
        if go.code != 220 {
            return Err(SmtpError::Tls(format!("server answered {}", go.text)));
        }
        if !self.io.buffer().is_empty() {
            return Err(SmtpError::Tls(
                "server sent data after its 220 reply".into(),
            ));
        }
        let placeholder: Box<dyn Stream> =
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()));
        let plain = std::mem::replace(&mut self.io, BufReader::new(placeholder)).into_inner();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| SmtpError::Tls(format!("bad server name {server_name:?}: {e}")))?;
        let tls = tokio::time::timeout(
            self.timeout,
            crate::tls::unverified_connector()
                .map_err(SmtpError::Tls)?
                .connect(name, plain),
        )
        .await
        .map_err(|_| SmtpError::Timeout(self.timeout))?
        .map_err(|e| SmtpError::Tls(e.to_string()))?;
        let (version, cipher) = crate::tls::summary(tls.get_ref().1);
        self.transcript.push(Line {
            dir: "*",
            text: format!("TLS established: {version} {cipher} (certificate not verified)"),
        });
        self.io = BufReader::new(Box::new(tls));
        self.command(&format!("EHLO {helo}")).await
    }

    /// Runs the whole dialogue. `from` is the bare address (empty for the null sender).
    /// Never sends DATA.
    pub async fn probe(
        mut self,
        helo: &str,
        from: &str,
        recipients: &[String],
    ) -> Result<Outcome, (SmtpError, Vec<Line>)> {
        match self.dialogue(helo, from, recipients).await {
            Ok(replies) => Ok(Outcome {
                replies,
                transcript: self.transcript,
            }),
            Err(e) => Err((e, self.transcript)),
        }
    }

    async fn dialogue(
        &mut self,
        helo: &str,
        from: &str,
        recipients: &[String],
    ) -> Result<Vec<(Stage, Reply)>, SmtpError> {
        let all = |stage: Stage, r: Reply| vec![(stage, r); recipients.len()];
        let banner = self.read_reply().await?;
        if banner.code != 220 {
            self.quit().await;
            return Ok(all(Stage::Banner, banner));
        }
        let mut hello = self.command(&format!("EHLO {helo}")).await?;
        if hello.class_digit() == 5 {
            // Pre-ESMTP servers answer 500/502 to EHLO; HELO is the RFC 5321 fallback.
            hello = self.command(&format!("HELO {helo}")).await?;
        }
        if hello.class_digit() != 2 {
            self.quit().await;
            return Ok(all(Stage::Helo, hello));
        }
        if let Some(name) = self.starttls.clone() {
            let offered = self
                .transcript
                .iter()
                .rev()
                .take_while(|l| l.dir == "<")
                .any(|l| {
                    l.text
                        .get(4..)
                        .is_some_and(|cap| cap.trim().eq_ignore_ascii_case("STARTTLS"))
                });
            if !offered {
                return Err(SmtpError::Tls("the server does not offer STARTTLS".into()));
            }
            hello = self.start_tls(&name, helo).await?;
            if hello.class_digit() != 2 {
                self.quit().await;
                return Ok(all(Stage::Helo, hello));
            }
        }
        let mail = self.command(&format!("MAIL FROM:<{from}>")).await?;
        if mail.class_digit() != 2 {
            self.quit().await;
            return Ok(all(Stage::MailFrom, mail));
        }
        let mut replies = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            let r = self.command(&format!("RCPT TO:<{rcpt}>")).await?;
            replies.push((Stage::RcptTo, r));
        }
        self.quit().await;
        Ok(replies)
    }

    /// QUIT politely; the answer does not matter (some servers just close).
    async fn quit(&mut self) {
        let _ = self.command("QUIT").await;
    }

    async fn command(&mut self, line: &str) -> Result<Reply, SmtpError> {
        self.transcript.push(Line {
            dir: ">",
            text: line.to_string(),
        });
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        let w = async {
            self.io.get_mut().write_all(&bytes).await?;
            self.io.get_mut().flush().await
        };
        tokio::time::timeout(self.timeout, w)
            .await
            .map_err(|_| SmtpError::Timeout(self.timeout))??;
        self.read_reply().await
    }

    /// Reads one possibly multi-line reply, bounded by [`MAX_LINE`] and [`MAX_LINES`].
    async fn read_reply(&mut self) -> Result<Reply, SmtpError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.read_reply_inner())
            .await
            .map_err(|_| SmtpError::Timeout(timeout))?
    }

    async fn read_reply_inner(&mut self) -> Result<Reply, SmtpError> {
        let mut lines: Vec<String> = Vec::new();
        loop {
            let mut buf = Vec::new();
            // `take` bounds the read: a server sending an endless line cannot grow `buf`.
            let n = (&mut self.io)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .await?;
            if n == 0 {
                return Err(SmtpError::Closed);
            }
            if buf.len() > MAX_LINE {
                return Err(SmtpError::TooLong);
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            self.transcript.push(Line {
                dir: "<",
                text: line.clone(),
            });
            let b = line.as_bytes();
            if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
                return Err(SmtpError::Malformed(line));
            }
            let last = b.get(3) != Some(&b'-');
            lines.push(line);
            if last {
                break;
            }
            if lines.len() >= MAX_LINES {
                return Err(SmtpError::TooLong);
            }
        }
        let joined = lines.join("\n");
        Reply::parse(&joined).ok_or(SmtpError::Malformed(joined))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server on an in-memory pipe: answers each line it receives with the next
    /// canned reply and records what it got.
    async fn run(script: &'static [&'static str], rcpts: &[&str]) -> (Outcome, String) {
        let (client, mut server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            let mut got = String::new();
            let mut it = script.iter();
            server
                .write_all(it.next().unwrap().as_bytes())
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = server.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
                match it.next() {
                    Some(r) => server.write_all(r.as_bytes()).await.unwrap(),
                    None => break,
                }
            }
            got
        });
        let rcpts: Vec<String> = rcpts.iter().map(|s| s.to_string()).collect();
        let out = Session::new(client, Duration::from_secs(5))
            .probe("probe.example.net", "", &rcpts)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        (out, srv.await.unwrap())
    }

    #[tokio::test]
    async fn full_dialogue_never_sends_data() {
        let (out, got) = run(
            &[
                "220 mx ESMTP\r\n",
                "250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                "250 2.1.0 Ok\r\n",
                "450 4.7.1 <a@example.org>: Recipient address rejected: Greylisted\r\n",
                "250 2.1.5 Ok\r\n",
                "221 2.0.0 Bye\r\n",
            ],
            &["a@example.org", "b@example.org"],
        )
        .await;
        assert_eq!(
            got,
            "EHLO probe.example.net\r\nMAIL FROM:<>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n"
        );
        assert_eq!(out.replies[0].1.code, 450);
        assert_eq!(out.replies[1].1.code, 250);
        assert!(!got.contains("DATA"));
    }

    #[tokio::test]
    async fn helo_fallback_and_early_rejection() {
        let (out, got) = run(
            &[
                "220 old\r\n",
                "502 what\r\n",
                "250 hi\r\n",
                "553 5.7.1 no null senders\r\n",
                "221 bye\r\n",
            ],
            &["a@example.org"],
        )
        .await;
        assert!(got.contains("HELO probe.example.net"));
        assert_eq!(
            out.replies,
            vec![(
                Stage::MailFrom,
                Reply::parse("553 5.7.1 no null senders").unwrap()
            )]
        );
    }

    #[tokio::test]
    async fn endless_line_is_bounded() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let junk = vec![b'2'; 64 * 1024];
            let _ = server.write_all(&junk).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = Session::new(client, Duration::from_secs(2))
            .probe("h", "", &["a@b".into()])
            .await
            .unwrap_err()
            .0;
        assert!(matches!(err, SmtpError::TooLong), "{err}");
    }
}
