//! TLS to PostgreSQL over rustls: the `sslmode` of the URL (libpq's names), and the CA
//! that verifies the server (`[store] tls_ca_file`, or libpq's `sslrootcert=` in the URL).
//!
//! tokio-postgres knows `disable`, `prefer` and `require`; `verify-ca` and `verify-full`
//! (and `sslrootcert`) are taken out of the URL here, the connection made with `require`,
//! and the server's certificate checked by this module's verifier:
//! - `disable`: no TLS;
//! - `prefer` (the default) and `require` without a CA: encrypted when (`prefer`) or
//!   because (`require`) the server offers TLS, the certificate not checked — as libpq;
//! - `require` with a CA, and `verify-ca`: the chain must lead to the CA;
//! - `verify-full`: and the certificate must name the host of the URL.
//!
//! Certificate errors name the CA file or the host, so that a refused server says why.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing (encryption only).
    Nothing,
    /// The chain, up to the CA.
    Chain,
    /// The chain and the host name.
    ChainAndName,
}

/// The TLS settings of a URL, taken out of it.
#[derive(Debug, Default)]
pub(crate) struct UrlTls {
    /// `verify-ca` (`Some(false)`) or `verify-full` (`Some(true)`).
    pub verify: Option<bool>,
    pub rootcert: Option<PathBuf>,
}

/// Takes `sslmode=verify-ca|verify-full` and `sslrootcert=...` out of a `postgres://` URL
/// or a `key=value` string; returns what tokio-postgres can parse (`sslmode=require` in
/// place of a verify mode) and what was taken.
pub(crate) fn split_url(url: &str) -> Result<(String, UrlTls), String> {
    let mut tls = UrlTls::default();
    let mut take = |key: &str, value: &str| -> Result<Option<String>, String> {
        match (key, value) {
            ("sslmode", "verify-ca") => tls.verify = Some(false),
            ("sslmode", "verify-full") => tls.verify = Some(true),
            ("sslrootcert", "") => return Err("sslrootcert= needs a file".into()),
            ("sslrootcert", path) => {
                tls.rootcert = Some(PathBuf::from(path));
                return Ok(None);
            }
            _ => return Ok(Some(format!("{key}={value}"))),
        }
        Ok(Some("sslmode=require".into()))
    };
    let out = if url.contains("://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let v = percent_decode(v);
                    if let Some(p) = take(k, &v)? {
                        // Kept pairs go back as written.
                        kept.push(if k == "sslmode" && p == "sslmode=require" {
                            p
                        } else {
                            pair.to_string()
                        });
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for part in url.split_whitespace() {
            match part.split_once('=') {
                Some((k, v)) if k == "sslmode" || k == "sslrootcert" => {
                    if let Some(p) = take(k, v.trim_matches('\''))? {
                        kept.push(p);
                    }
                }
                _ => kept.push(part.to_string()),
            }
        }
        kept.join(" ")
    };
    Ok((out, tls))
}

/// `%XX` escapes of a URL query value (a path may hold `%2F`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(h, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the connector does, checked: the mode tokio-postgres will use and the verifier.
/// `tls_ca_file` and the URL's `sslrootcert` name the same thing: give one.
pub(crate) fn connector(
    mode: SslMode,
    url: UrlTls,
    tls_ca_file: Option<&Path>,
) -> Result<MakeRustls, String> {
    let ca = match (tls_ca_file, url.rootcert) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "the CA is given twice: tls_ca_file {} and sslrootcert={} in the url; give one",
                a.display(),
                b.display()
            ));
        }
        (Some(a), _) => Some(a.to_path_buf()),
        (None, b) => b,
    };
    let verify = match (url.verify, &ca, mode) {
        (Some(full), None, _) => {
            let m = if full { "verify-full" } else { "verify-ca" };
            return Err(format!(
                "sslmode={m} needs the CA that signed the server's certificate: set \
                 tls_ca_file (or sslrootcert= in the url)"
            ));
        }
        (Some(true), Some(_), _) => Verify::ChainAndName,
        (Some(false), Some(_), _) => Verify::Chain,
        (None, Some(ca), SslMode::Require) => {
            let _ = ca;
            Verify::Chain
        }
        (None, Some(ca), _) => {
            return Err(format!(
                "a CA ({}) is set but the url's sslmode is not require, verify-ca or \
                 verify-full, so the server's certificate would not be checked; add \
                 sslmode=verify-full to the url",
                ca.display()
            ));
        }
        (None, None, _) => Verify::Nothing,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &ca {
        Some(path) => Some(Arc::new(load_roots(path)?)),
        None => None,
    };
    let verifier = Arc::new(crate::tls::Verifier {
        roots,
        check_name: verify == Verify::ChainAndName,
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustls {
        config: Arc::new(config),
        ca: ca.map(|p| Arc::from(p.display().to_string())),
        verify,
    })
}

/// The certificates of a PEM file, as trust anchors.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let what = || format!("tls_ca_file {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", what()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| format!("{} is not PEM: {e}", what()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{} holds a certificate that is not a CA: {e}", what()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{} holds no certificate (-----BEGIN CERTIFICATE-----)",
            what()
        ));
    }
    Ok(roots)
}

/// tokio-postgres's TLS connector over rustls.
#[derive(Clone)]
pub(crate) struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
    /// The CA file, for error messages.
    ca: Option<Arc<str>>,
    verify: Verify,
}

impl MakeRustls {
    /// The TLS of connections under `mode`, for the log.
    pub(crate) fn describe(&self, mode: SslMode) -> &'static str {
        match (mode, self.verify) {
            (SslMode::Disable, _) => "off",
            (SslMode::Prefer, Verify::Nothing) => "prefer (certificate not checked)",
            (_, Verify::Nothing) => "require (certificate not checked)",
            (_, Verify::Chain) => "verify-ca",
            (_, Verify::ChainAndName) => "verify-full",
        }
    }
}

impl MakeTlsConnect<tokio_postgres::Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        // A Unix socket has no host name; tokio-postgres never starts TLS on one.
        Ok(RustlsConnect {
            make: self.clone(),
            host: domain.to_string(),
        })
    }
}

/// One connection's TLS handshake.
pub(crate) struct RustlsConnect {
    make: MakeRustls,
    host: String,
}

impl TlsConnect<tokio_postgres::Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let name = ServerName::try_from(self.host.clone()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{:?} is not a host name for TLS: {e}", self.host),
                )
            })?;
            let connector = tokio_rustls::TlsConnector::from(self.make.config.clone());
            match connector.connect(name, stream).await {
                Ok(s) => Ok(RustlsStream(s)),
                Err(e) => Err(explain(e, &self.make, &self.host)),
            }
        })
    }
}

/// A certificate error of the handshake, said in the operator's terms.
fn explain(e: io::Error, make: &MakeRustls, host: &str) -> io::Error {
    let Some(rustls::Error::InvalidCertificate(cert)) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return e;
    };
    let ca = make.ca.as_deref().unwrap_or("?");
    use rustls::CertificateError as C;
    let why = match cert {
        C::NotValidForName | C::NotValidForNameContext { .. } => format!(
            "PostgreSQL server certificate is not valid for host {host} (sslmode=verify-full \
             checks the name; the certificate must name the host of the url)"
        ),
        C::Expired | C::ExpiredContext { .. } => {
            "PostgreSQL server certificate has expired".to_string()
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "PostgreSQL server certificate is not valid yet".to_string()
        }
        _ => format!("PostgreSQL server certificate not trusted by tls_ca_file {ca}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, format!("{why} ({cert:?})"))
}

/// An encrypted connection to the server.
pub(crate) struct RustlsStream(tokio_rustls::client::TlsStream<tokio_postgres::Socket>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // tls-server-end-point needs the hash of the certificate's own signature
        // algorithm; without it SCRAM authenticates without channel binding.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_and_rootcert_are_taken_out_of_urls() {
        let (u, t) =
            split_url("postgres://u@h/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem").unwrap();
        assert_eq!(u, "postgres://u@h/d?sslmode=require");
        assert_eq!(t.verify, Some(true));
        assert_eq!(t.rootcert.as_deref(), Some(Path::new("/etc/ca.pem")));
        let (u, t) = split_url("postgres://u@h/d?application_name=x&sslmode=verify-ca").unwrap();
        assert_eq!(u, "postgres://u@h/d?application_name=x&sslmode=require");
        assert_eq!(t.verify, Some(false));
        let (u, t) = split_url("postgres://u@h/d?sslmode=require").unwrap();
        assert_eq!(u, "postgres://u@h/d?sslmode=require");
        assert_eq!(t.verify, None);
        let (u, t) = split_url("host=h user=u sslmode=verify-full sslrootcert=/ca.pem").unwrap();
        assert_eq!(u, "host=h user=u sslmode=require");
        assert_eq!(t.verify, Some(true));
        assert_eq!(t.rootcert.as_deref(), Some(Path::new("/ca.pem")));
        assert!(split_url("postgres://u@h/d?sslrootcert=").is_err());
    }

    #[test]
    fn a_verify_mode_needs_a_ca_and_a_ca_needs_a_checking_mode() {
        let url = |verify| UrlTls {
            verify,
            rootcert: None,
        };
        let e = connector(SslMode::Require, url(Some(true)), None)
            .err()
            .unwrap();
        assert!(e.contains("sslmode=verify-full needs the CA"), "{e}");
        let ca = Path::new("/nonexistent/ca.pem");
        let e = connector(SslMode::Prefer, url(None), Some(ca))
            .err()
            .unwrap();
        assert!(e.contains("add sslmode=verify-full"), "{e}");
        let e = connector(SslMode::Require, url(Some(true)), Some(ca))
            .err()
            .unwrap();
        assert!(
            e.contains("cannot read tls_ca_file /nonexistent/ca.pem"),
            "{e}"
        );
        let twice = UrlTls {
            verify: Some(true),
            rootcert: Some("/other.pem".into()),
        };
        let e = connector(SslMode::Require, twice, Some(ca)).err().unwrap();
        assert!(e.contains("the CA is given twice"), "{e}");
        let plain = connector(SslMode::Prefer, url(None), None).unwrap();
        assert_eq!(
            plain.describe(SslMode::Prefer),
            "prefer (certificate not checked)"
        );
        assert_eq!(plain.describe(SslMode::Disable), "off");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = load_roots(&path).err().unwrap();
        assert!(e.contains("holds no certificate"), "{e}");
    }
}
