//! TLS towards mail servers whose certificates are not checked: `probe` diagnoses delivery
//! to MX hosts with self-signed or mismatched certificates, and the SMTP front's backend
//! is the operator's own server. Signatures are still checked, so the handshake is real.
//! The one certificate verifier, which the PostgreSQL store's connector also uses with
//! its CA. Also how a session's version and cipher are named in logs and headers.

use std::sync::Arc;

use tokio_rustls::rustls;

/// Checks a server's certificate against `roots` (and its name, with `check_name`), or
/// accepts any certificate without roots: a probe diagnoses delivery, MX hosts with
/// self-signed or mismatched certificates still take mail from opportunistic-TLS senders,
/// and PostgreSQL's `sslmode=require` encrypts without verifying. Signatures of the
/// handshake are always checked, so the session is real whatever the mode.
#[derive(Debug)]
pub(crate) struct Verifier {
    pub(crate) roots: Option<Arc<rustls::RootCertStore>>,
    pub(crate) check_name: bool,
    pub(crate) provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
            if self.check_name {
                rustls::client::verify_server_name(&cert, server_name)?;
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn unverified_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            roots: None,
            check_name: false,
            provider,
        }))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The protocol version and cipher suite of an established session, for logs and headers.
pub fn summary(conn: &rustls::CommonState) -> (&'static str, &'static str) {
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("TLS");
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .unwrap_or("?");
    (version, cipher)
}
