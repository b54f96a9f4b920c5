//! TLS for the Postgres sink, with rustls, as libpq does it: the URL's `sslmode` (`disable`,
//! `prefer` (the default: TLS when the server offers it), `require`, and `verify-ca` /
//! `verify-full` with `sslrootcert`, which are taken out of the URL here because tokio-postgres
//! parses only the first three), or the sink's `tls_root_cert` and `tls_verify`. Verifying the
//! server's certificate makes TLS required. A server that refuses TLS when it is required, or a
//! certificate that fails verification, is a configuration error whose message names the field
//! to change; it is never retried.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use sluice_core::sink::SinkError;
use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// `tls_verify`: how much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsVerify {
    /// Encrypt, but accept any certificate (libpq's `require`).
    None,
    /// The certificate must chain to a trusted root; its names are not checked (libpq's `verify-ca`).
    Ca,
    /// The chain, and that the certificate names the host connected to (libpq's `verify-full`).
    Full,
}

impl fmt::Display for TlsVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVerify::None => "none",
            TlsVerify::Ca => "ca",
            TlsVerify::Full => "full",
        })
    }
}

impl TlsVerify {
    fn sslmode(self) -> &'static str {
        match self {
            TlsVerify::None => "require",
            TlsVerify::Ca => "verify-ca",
            TlsVerify::Full => "verify-full",
        }
    }
}

/// How the sink connects: the connection string as tokio-postgres reads it, its `sslmode`
/// settled, and the TLS client that verifies what was asked.
#[derive(Clone)]
pub struct PgConnect {
    /// The parsed connection string, without libpq's TLS settings tokio-postgres does not know.
    pub config: tokio_postgres::Config,
    /// The TLS client handed to tokio-postgres (unused under `sslmode=disable`).
    pub tls: MakeRustls,
    /// What makes TLS required, for the message when the server refuses it.
    required_by: Option<String>,
    /// The roots the certificate is verified against, for messages.
    roots: String,
}

/// libpq's TLS settings that tokio-postgres does not parse, taken out of a connection string.
#[derive(Debug, Default, PartialEq)]
struct LibpqTls {
    /// `sslmode=verify-ca` or `verify-full`.
    verify: Option<TlsVerify>,
    /// `sslrootcert=`.
    root_cert: Option<String>,
    /// Another `sslmode` (left in the URL for tokio-postgres).
    sslmode: Option<String>,
}

/// Settings that contradict each other or the URL: `(field, message, hint)`, as a topology's
/// check reports them.
pub type Conflict = (&'static str, String, String);

/// Refuses TLS settings that contradict each other or the URL `url` (environment expanded),
/// when the topology is read; reads no file.
pub fn check(url: &str, root_cert: Option<&Path>, verify: Option<TlsVerify>) -> Result<(), Conflict> {
    let (_, libpq) = take_libpq_tls(url);
    settle(&libpq, libpq.sslmode.as_deref() == Some("disable"), root_cert, verify).map(|_| ())
}

/// How the certificate is verified, and against which root file, once the URL (`libpq`, and
/// whether it says `sslmode=disable`) and the sink's fields agree.
fn settle(libpq: &LibpqTls, disabled: bool, root_cert: Option<&Path>, verify: Option<TlsVerify>) -> Result<(TlsVerify, Option<PathBuf>), Conflict> {
    let verify = match (verify, libpq.verify) {
        (Some(a), Some(b)) if a != b => {
            return Err((
                "tls_verify",
                format!("\"{a}\" contradicts sslmode={} in the url", b.sslmode()),
                "say it once: remove sslmode from the url, or remove tls_verify".into(),
            ))
        }
        (a, b) => a.or(b),
    };
    let root: Option<PathBuf> = match (root_cert, libpq.root_cert.as_deref()) {
        (Some(a), Some(b)) if a != Path::new(b) => {
            return Err((
                "tls_root_cert",
                format!("\"{}\" contradicts sslrootcert={b} in the url", a.display()),
                "say it once: remove sslrootcert from the url, or remove tls_root_cert".into(),
            ))
        }
        (a, b) => a.map(Path::to_path_buf).or(b.map(PathBuf::from)),
    };
    let verify = verify.unwrap_or(if root.is_some() { TlsVerify::Full } else { TlsVerify::None });
    if verify == TlsVerify::None && root.is_some() {
        return Err((
            "tls_verify",
            "\"none\" checks no certificate, but tls_root_cert names the roots to check it against".into(),
            "remove tls_verify (a root certificate means \"full\"), set it to \"ca\", or remove tls_root_cert".into(),
        ));
    }
    if verify != TlsVerify::None && disabled {
        return Err((
            "url",
            format!(
                "says sslmode=disable, but the server's certificate is to be verified (tls_verify = \"{verify}\"{})",
                if root.is_some() { ", tls_root_cert" } else { "" }
            ),
            "remove sslmode=disable from the url, or remove tls_verify and tls_root_cert".into(),
        ));
    }
    Ok((verify, root))
}

/// Reads the connection string `url` (environment already expanded) with the sink's
/// `tls_root_cert` and `tls_verify`, and prepares the TLS client; every error is a
/// configuration error naming the field.
pub fn prepare(url: &str, root_cert: Option<&Path>, verify: Option<TlsVerify>) -> Result<PgConnect, SinkError> {
    let (url, libpq) = take_libpq_tls(url);
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| SinkError::Config(format!("sinks.url is not a Postgres connection string: {e}")))?;
    let (verify, root) = settle(&libpq, config.get_ssl_mode() == SslMode::Disable, root_cert, verify)
        .map_err(|(field, message, hint)| SinkError::Config(format!("sinks.{field}: {message}\n  hint: {hint}")))?;
    let required_by = if verify != TlsVerify::None {
        config.ssl_mode(SslMode::Require);
        Some(format!("verifying its certificate (tls_verify = \"{verify}\")"))
    } else {
        (config.get_ssl_mode() == SslMode::Require).then(|| "sslmode=require in sinks.url".to_string())
    };
    let (roots, described) = match (verify, &root) {
        (TlsVerify::None, _) => (None, "no roots (tls_verify = \"none\")".to_string()),
        (_, Some(path)) => (Some(load_roots(path)?), format!("sinks.tls_root_cert ({})", path.display())),
        (_, None) => (Some(system_roots()?), "the system's root certificates (sinks.tls_root_cert is not set)".to_string()),
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let verifier = Verifier { roots, check_name: verify == TlsVerify::Full, algs: provider.signature_verification_algorithms };
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| SinkError::Config(format!("cannot set up TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // What libpq offers: needed by servers that take `sslnegotiation=direct`, ignored by the rest.
    client.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(PgConnect { config, tls: MakeRustls(Arc::new(client)), required_by, roots: described })
}

/// The certificates of the PEM file `path` (`tls_root_cert`) as trust roots.
fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, SinkError> {
    let bad = |why: String| {
        SinkError::Config(format!(
            "sinks.tls_root_cert: {why}\n  hint: point tls_root_cert at the PEM file of the CA that issued the server's certificate (for a self-signed one, the certificate itself)"
        ))
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| bad(format!("{} is not a PEM certificate bundle: {e}", path.display())))?;
        roots.add(cert).map_err(|e| bad(format!("{} holds a certificate that cannot be a root: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(bad(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())));
    }
    Ok(Arc::new(roots))
}

/// The system's trusted roots (`tls_verify` = "ca" or "full" without `tls_root_cert`).
fn system_roots() -> Result<Arc<RootCertStore>, SinkError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
        return Err(SinkError::Config(format!(
            "sinks.tls_verify asks to verify the server's certificate, but no system root certificate could be loaded{why}\n  hint: set sinks.tls_root_cert to the PEM file of the CA that issued the server's certificate (or install ca-certificates)"
        )));
    }
    Ok(Arc::new(roots))
}

/// Splits libpq's `sslmode=verify-ca` / `verify-full` and `sslrootcert=` out of a connection
/// string, URL (`postgres://...?sslmode=verify-full&sslrootcert=ca.pem`) or key-value
/// (`host=db sslmode=verify-full sslrootcert=ca.pem`) form, leaving the rest as it was.
fn take_libpq_tls(url: &str) -> (String, LibpqTls) {
    let mut found = LibpqTls::default();
    let mut take = |key: &str, value: &str| match (key, value) {
        ("sslmode", "verify-ca") => {
            found.verify = Some(TlsVerify::Ca);
            true
        }
        ("sslmode", "verify-full") => {
            found.verify = Some(TlsVerify::Full);
            true
        }
        ("sslrootcert", path) => {
            found.root_cert = Some(path.to_string());
            true
        }
        ("sslmode", mode) => {
            found.sslmode = Some(mode.to_string());
            false
        }
        _ => false,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|param| {
                        let (k, v) = param.split_once('=').unwrap_or((param, ""));
                        !take(&percent_decode(k), &percent_decode(v))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut rest = url.to_string();
        for (span, k, v) in key_values(url).into_iter().rev() {
            if take(&k, &v) {
                rest.replace_range(span, "");
            }
        }
        rest
    };
    (rest, found)
}

/// `%XX` escapes decoded (a malformed one is kept as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key=value` pairs of a key-value connection string, each with its span: values quoted
/// with `'...'` or bare, `\` escaping the next character, as libpq reads them.
fn key_values(s: &str) -> Vec<(std::ops::Range<usize>, String, String)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[start..i];
        skip_space(&mut i);
        if key.is_empty() || i >= b.len() || b[i] != b'=' {
            // The end, or a malformed string: tokio-postgres reports it.
            return out;
        }
        i += 1;
        skip_space(&mut i);
        let quoted = i < b.len() && b[i] == b'\'';
        if quoted {
            i += 1;
        }
        let mut value = Vec::new();
        while i < b.len() {
            match b[i] {
                b'\\' if i + 1 < b.len() => {
                    value.push(b[i + 1]);
                    i += 2;
                }
                b'\'' if quoted => {
                    i += 1;
                    break;
                }
                c if !quoted && c.is_ascii_whitespace() => break,
                c => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        out.push((start..i, key.to_string(), String::from_utf8_lossy(&value).into_owned()));
    }
}

impl PgConnect {
    /// The configuration error a failed connect is, when TLS is its cause: the server refused
    /// TLS that is required, or its certificate failed verification, or the handshake failed.
    /// None for the rest (an unreachable server, a closed connection), which is retried.
    pub fn refusal(&self, e: &tokio_postgres::Error) -> Option<String> {
        let mut cause = e.source();
        while let Some(err) = cause {
            if let Some(h) = err.downcast_ref::<HandshakeError>() {
                return self.explain(h);
            }
            // tokio-postgres's words (the cause of its "error performing TLS handshake") when
            // the server answers the SSLRequest with 'N' under `require`.
            if err.to_string() == "server does not support TLS" {
                let by = self.required_by.as_deref().unwrap_or("sslmode=require");
                return Some(format!(
                    "the Postgres server does not offer TLS, and {by} requires it\n  hint: turn TLS on in the server (ssl = on, with ssl_cert_file and ssl_key_file), or allow plain text with sslmode=prefer in sinks.url and no tls_verify or tls_root_cert"
                ));
            }
            cause = err.source();
        }
        None
    }

    fn explain(&self, h: &HandshakeError) -> Option<String> {
        let (name, cause) = match h {
            HandshakeError::BadName(name) => {
                return Some(format!(
                "cannot use TLS with the Postgres server at `{name}`: not a host name or IP address a certificate can name\n  hint: fix the host in sinks.url"
            ))
            }
            HandshakeError::Failed { name, cause } => (name, cause),
        };
        // A handshake cut short by the network (no TLS error) is transient.
        let tls = cause.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())?;
        Some(match tls {
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => format!(
                "the Postgres server's certificate does not match the host name `{name}` (tls_verify = \"full\" checks it): {tls}\n  hint: connect with a name the certificate holds (host=<that name> in sinks.url, with hostaddr=<ip> to skip resolving it), or set sinks.tls_verify = \"ca\" to check the chain only"
            ),
            rustls::Error::InvalidCertificate(problem) => format!(
                "the Postgres server's certificate at `{name}` failed verification against {}: {}\n  hint: set sinks.tls_root_cert to the PEM file of the CA that issued the server's certificate (for a self-signed one, the certificate itself), or sinks.tls_verify = \"none\" to encrypt without verifying",
                self.roots,
                in_words(problem)
            ),
            // No protocol version or cipher suite in common: the server's settings, not chance.
            rustls::Error::PeerIncompatible(_)
            | rustls::Error::AlertReceived(AlertDescription::HandshakeFailure | AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity) => {
                format!(
                    "the TLS handshake with the Postgres server at `{name}` failed: {tls}\n  hint: check the server's TLS settings (ssl_min_protocol_version, ssl_ciphers), or connect without TLS with sslmode=disable in sinks.url"
                )
            }
            // Anything else (a corrupt record, an unexpected close) may pass: retried.
            _ => return None,
        })
    }
}

/// `e` with its causes, which tokio-postgres leaves out of its own message
/// (`error connecting to server: Connection refused (os error 111)`).
pub fn with_causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// Why a certificate failed verification, in words where rustls prints only a variant's name
/// or its fields.
fn in_words(problem: &CertificateError) -> String {
    match problem {
        CertificateError::UnknownIssuer => "no certificate there issued it (UnknownIssuer)".to_string(),
        CertificateError::BadSignature | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "a certificate there has the name of its issuer but another key, which did not sign it (BadSignature)".to_string()
        }
        CertificateError::UnsupportedSignatureAlgorithmContext { .. } => {
            "it is signed with an algorithm rustls does not accept (such as SHA-1) (UnsupportedSignatureAlgorithm)".to_string()
        }
        CertificateError::Other(e) if e.to_string().contains("CaUsedAsEndEntity") => {
            "it is a CA certificate (basicConstraints CA:TRUE) serving as the server's own, which rustls refuses; give the server a certificate with CA:FALSE (CaUsedAsEndEntity)".to_string()
        }
        other => other.to_string(),
    }
}

/// A handshake that did not complete, as the connector reports it to tokio-postgres.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The host is no DNS name or IP address.
    #[error("`{0}` is not a host name TLS can verify")]
    BadName(String),
    /// rustls refused (its error inside the I/O error) or the connection broke.
    #[error("TLS handshake with {name} failed: {cause}")]
    Failed { name: String, cause: io::Error },
}

/// Checks the server's certificate as `tls_verify` says: nothing, the chain to `roots`, or the
/// chain and the host name. Handshake signatures are always checked.
#[derive(Debug)]
struct Verifier {
    /// None: any certificate is accepted.
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algs.all)?;
            if self.check_name {
                verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// tokio-postgres's TLS connector over rustls.
#[derive(Clone)]
pub struct MakeRustls(Arc<rustls::ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        // A Unix socket has no name (and never gets TLS): a bad name fails only a handshake.
        Ok(RustlsConnect { config: self.0.clone(), domain: domain.to_string() })
    }
}

/// One handshake, with the name the certificate is checked against.
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    domain: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = ServerName::try_from(self.domain.clone()).map_err(|_| HandshakeError::BadName(self.domain.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(self.config).connect(name, stream).await;
            tls.map(RustlsStream).map_err(|cause| HandshakeError::Failed { name: self.domain, cause })
        })
    }
}

/// A TLS session to the server. It offers no channel binding, so SCRAM authenticates without
/// `-PLUS` (`channel_binding=require` in the URL cannot be met).
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<PgConnect, SinkError>) -> String {
        match r {
            Err(SinkError::Config(m)) => m,
            Err(other) => panic!("not a configuration error: {other:?}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn libpq_tls_settings_come_out_of_a_url() {
        let (rest, got) = take_libpq_tls("postgres://u:p@db:5432/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20b.pem");
        assert_eq!(rest, "postgres://u:p@db:5432/x?application_name=a");
        assert_eq!(got, LibpqTls { verify: Some(TlsVerify::Full), root_cert: Some("/etc/ca b.pem".into()), sslmode: None });
        let (rest, got) = take_libpq_tls("postgresql://db/x?sslmode=verify-ca");
        assert_eq!((rest.as_str(), got.verify), ("postgresql://db/x", Some(TlsVerify::Ca)));
        let (rest, got) = take_libpq_tls("postgres://db/x?sslmode=require");
        assert_eq!((rest.as_str(), got), ("postgres://db/x?sslmode=require", LibpqTls { sslmode: Some("require".into()), ..LibpqTls::default() }));
    }

    #[test]
    fn libpq_tls_settings_come_out_of_key_values() {
        let (rest, got) = take_libpq_tls("host=db sslmode = verify-ca sslrootcert='/a b/c\\'s.pem' dbname=x");
        assert_eq!(rest.split_whitespace().collect::<Vec<_>>(), ["host=db", "dbname=x"]);
        assert_eq!(got, LibpqTls { verify: Some(TlsVerify::Ca), root_cert: Some("/a b/c's.pem".into()), sslmode: None });
        let (rest, got) = take_libpq_tls("host=db password='x sslmode=verify-full'");
        assert_eq!((rest.as_str(), got), ("host=db password='x sslmode=verify-full'", LibpqTls::default()));
    }

    #[test]
    fn the_sslmode_follows_verification() {
        let mode = |url: &str, verify: Option<TlsVerify>| prepare(url, None, verify).map(|c| c.config.get_ssl_mode()).ok();
        assert_eq!(mode("postgres://db/x", None), Some(SslMode::Prefer));
        assert_eq!(mode("postgres://db/x?sslmode=disable", None), Some(SslMode::Disable));
        assert_eq!(mode("postgres://db/x?sslmode=require", Some(TlsVerify::None)), Some(SslMode::Require));
        // Verifying the certificate makes TLS required, as verify-ca and verify-full do.
        assert_eq!(mode("postgres://db/x", Some(TlsVerify::Ca)), Some(SslMode::Require));
        assert_eq!(mode("postgres://db/x?sslmode=verify-full", None), Some(SslMode::Require));
        assert_eq!(mode("host=db sslmode=verify-ca", None), Some(SslMode::Require));
    }

    #[test]
    fn inconsistent_settings_are_refused_naming_the_field() {
        let m = err(prepare("postgres://db/x?sslmode=verify-ca", None, Some(TlsVerify::Full)));
        assert_eq!(
            m,
            "sinks.tls_verify: \"full\" contradicts sslmode=verify-ca in the url\n  hint: say it once: remove sslmode from the url, or remove tls_verify"
        );
        let m = err(prepare("postgres://db/x?sslrootcert=/a.pem", Some(Path::new("/b.pem")), None));
        assert!(m.starts_with("sinks.tls_root_cert: \"/b.pem\" contradicts sslrootcert=/a.pem in the url\n  hint: "), "{m}");
        let m = err(prepare("postgres://db/x?sslmode=disable", None, Some(TlsVerify::Ca)));
        assert!(m.starts_with("sinks.url: says sslmode=disable, but the server's certificate is to be verified (tls_verify = \"ca\")"), "{m}");
        let m = err(prepare("host=db sslmode=disable", Some(Path::new("/b.pem")), None));
        assert!(m.starts_with("sinks.url: says sslmode=disable") && m.contains("(tls_verify = \"full\", tls_root_cert)"), "{m}");
        let m = err(prepare("postgres://db/x", Some(Path::new("/b.pem")), Some(TlsVerify::None)));
        assert!(m.starts_with("sinks.tls_verify: \"none\" checks no certificate"), "{m}");
        // The same, when the topology is read (no file is read then).
        assert_eq!(check("postgres://db/x?sslmode=verify-ca", None, Some(TlsVerify::Full)).unwrap_err().0, "tls_verify");
        assert_eq!(check("postgres://db/x?sslmode=disable&sslrootcert=/nonexistent.pem", None, None).unwrap_err().0, "url");
        assert_eq!(check("postgres://db/x?sslmode=require", Some(Path::new("/nonexistent.pem")), Some(TlsVerify::Ca)), Ok(()));
    }

    #[test]
    fn a_missing_or_empty_root_file_is_named() {
        let m = err(prepare("postgres://db/x", Some(Path::new("/nonexistent/ca.pem")), None));
        assert!(m.starts_with("sinks.tls_root_cert: cannot read /nonexistent/ca.pem"), "{m}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let m = err(prepare("postgres://db/x", Some(&empty), Some(TlsVerify::Ca)));
        assert!(m.contains("sinks.tls_root_cert") && m.contains("holds no PEM certificate") && m.contains("empty.pem"), "{m}");
    }
}
