//! TLS to PostgreSQL, read from the URL as libpq reads it:
//! `sslmode=disable|prefer|require|verify-ca|verify-full` and
//! `sslrootcert=PATH` (or `system`, the system's CAs). tokio-postgres knows
//! only the first three modes and no root file, so these two parameters are
//! taken out of the URL here; tokio-postgres gets the mode it knows and a
//! rustls connector (tokio-postgres-rustls; rustls with ring, the crate's
//! one TLS stack) whose certificate check is the one the mode asks for:
//!
//! | sslmode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default, as libpq's) | when the server offers it | not checked, unless `sslrootcert` is given (then as `verify-ca`) |
//! | `require` | always | not checked, unless `sslrootcert` is given (then as `verify-ca`) |
//! | `verify-ca` | always | signed by the CA in `sslrootcert` |
//! | `verify-full` | always | signed by that CA, and for the URL's host name |
//!
//! Without `sslrootcert`, the two `verify-` modes use libpq's default file,
//! `~/.postgresql/root.crt`, and refuse to start when it is missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::runtime::remote::{pem_roots, system_roots};

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode, String> {
        Ok(match text {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not a mode: use disable, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }

    /// The mode tokio-postgres negotiates with.
    fn negotiation(self) -> SslMode {
        match self {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }
}

/// Where the trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    File(PathBuf),
    System,
}

/// The TLS parameters of a store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: Mode,
    pub root: Option<Roots>,
}

/// The URL without `sslmode` and `sslrootcert`, and what they ask for.
pub fn split(url: &str) -> Result<(String, TlsSettings), String> {
    let mut settings = TlsSettings {
        mode: Mode::Prefer,
        root: None,
    };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), settings));
    };
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let value = percent_decode(value);
        match key {
            "sslmode" => settings.mode = Mode::parse(&value)?,
            "sslrootcert" if value == "system" => settings.root = Some(Roots::System),
            "sslrootcert" => settings.root = Some(Roots::File(PathBuf::from(value))),
            _ => kept.push(param),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, settings))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TlsSettings {
    /// Sets the negotiated mode on `config` and makes the connector whose
    /// certificate check the mode asks for; an unusable root file is an
    /// error that names it.
    pub fn apply(&self, config: &mut tokio_postgres::Config) -> Result<MakeRustlsConnect, String> {
        config.ssl_mode(self.mode.negotiation());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.check()? {
            None => Arc::new(Unchecked(provider.clone())),
            Some((roots, names)) => {
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
                if names {
                    webpki
                } else {
                    Arc::new(AnyName(webpki))
                }
            }
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(tls))
    }

    /// The CAs the server's certificate must chain to and whether its name
    /// is checked too; None when the certificate is not checked.
    fn check(&self) -> Result<Option<(Arc<rustls::RootCertStore>, bool)>, String> {
        let verifying = matches!(self.mode, Mode::VerifyCa | Mode::VerifyFull);
        let root = match (&self.root, verifying) {
            (Some(root), _) => root.clone(),
            (None, false) => return Ok(None),
            (None, true) => Roots::File(default_root().ok_or_else(|| {
                format!(
                    "sslmode={} needs the CA that signed the server's certificate: add sslrootcert=PATH to the URL (a PEM file), or sslrootcert=system for the system's CAs",
                    self.mode_name()
                )
            })?),
        };
        let roots = match &root {
            Roots::File(path) => pem_roots(path, "sslrootcert")?,
            Roots::System => {
                system_roots().ok_or("sslrootcert=system: no system CA certificates were found")?
            }
        };
        Ok(Some((Arc::new(roots), self.mode == Mode::VerifyFull)))
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// libpq's default root file, when it exists.
fn default_root() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql/root.crt");
    path.exists().then_some(path)
}

/// `verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root file: encrypted, the certificate
/// not checked (libpq's behaviour); the handshake's signatures still are.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_are_taken_out_of_the_url() {
        let (url, s) = split("postgres://u@h:5/db").unwrap();
        assert_eq!(url, "postgres://u@h:5/db");
        assert_eq!((s.mode, s.root), (Mode::Prefer, None), "libpq's default");
        let (url, s) = split(
            "postgres://u@h/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca%20dir%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@h/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(s.mode, Mode::VerifyFull);
        assert_eq!(s.root, Some(Roots::File("/tmp/ca dir/ca.pem".into())));
        let (url, s) = split("postgres://u@h/db?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!((s.mode, s.root), (Mode::Require, Some(Roots::System)));
        let e = split("postgres://u@h/db?sslmode=verify").unwrap_err();
        assert!(
            e.contains("sslmode=verify is not a mode") && e.contains("verify-full"),
            "{e}"
        );
    }

    #[test]
    fn each_mode_negotiates_and_checks_what_libpq_does() {
        let settings = |mode, root: Option<&str>| TlsSettings {
            mode,
            root: root.map(|r| Roots::File(r.into())),
        };
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls/ca.pem");
        let checks = |s: TlsSettings| s.check().map(|c| c.map(|(_, names)| names));
        assert_eq!(checks(settings(Mode::Prefer, None)), Ok(None));
        assert_eq!(checks(settings(Mode::Require, None)), Ok(None));
        assert_eq!(checks(settings(Mode::Require, Some(ca))), Ok(Some(false)));
        assert_eq!(checks(settings(Mode::VerifyCa, Some(ca))), Ok(Some(false)));
        assert_eq!(checks(settings(Mode::VerifyFull, Some(ca))), Ok(Some(true)));
        let mut config = tokio_postgres::Config::new();
        settings(Mode::VerifyCa, Some(ca))
            .apply(&mut config)
            .unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        settings(Mode::Disable, None).apply(&mut config).unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
        let e = settings(Mode::VerifyFull, Some("/nonexistent/ca.pem"))
            .apply(&mut config)
            .err()
            .unwrap();
        assert!(e.starts_with("sslrootcert /nonexistent/ca.pem:"), "{e}");
        let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let e = checks(settings(Mode::VerifyCa, Some(not_pem))).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }
}
