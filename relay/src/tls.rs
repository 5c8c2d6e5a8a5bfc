//! TLS to Redis (`rediss://`), with rustls on the `ring` provider: [`RedisTls`] is the client
//! configuration, built once from a CA bundle (or the system's trusted roots) and an optional
//! client certificate for mutual TLS, and shared by every pooled connection, each of which does
//! its own handshake. The server's name is the URL's host; a server whose certificate does not
//! verify is refused, and [`describe_tls_failure`] says why in words an operator can act on.
//!
//! ```no_run
//! use krowoc_relay::pool::{RedisEndpoint, RedisPool};
//! use krowoc_relay::tls::RedisTls;
//! use std::path::Path;
//! let tls = RedisTls::new(Some(Path::new("/etc/redis/ca.pem")), None).unwrap();
//! let endpoint = RedisEndpoint::from_url("rediss://redis.internal:6380").unwrap();
//! let pool = RedisPool::with_tls(endpoint, 2, tls);
//! ```
//!
//! Without a CA bundle the system's trust store is used (`rustls-native-certs`: the OS bundle,
//! or `SSL_CERT_FILE` / `SSL_CERT_DIR`), so a private CA installed on the host is trusted the
//! way every other client there trusts it; a managed Redis with a public certificate needs
//! nothing more. No secret (key content, password) ever reaches an error or a log.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The client side of TLS to one Redis: whom to trust and which certificate to show. Cheap to
/// clone (the rustls configuration is shared).
#[derive(Clone)]
pub struct RedisTls {
    connector: TlsConnector,
    trust: Arc<str>,
    client_certificate: bool,
    /// The name to ask for and verify instead of the endpoint's host (Envoy's `sni`).
    server_name: Option<Arc<str>>,
}

/// A TLS setting that cannot be used: which file, and what is wrong with it (never its content).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct TlsConfigError {
    /// The setting and file, e.g. `CA bundle /etc/redis/ca.pem`.
    pub what: String,
    pub reason: String,
}

impl RedisTls {
    /// Trusts the certificates in `ca_file` (PEM, one or more) or, without one, the system's
    /// trusted roots; shows `client` (certificate chain file, private key file, both PEM) to a
    /// server that asks for one (`tls-auth-clients yes`).
    pub fn new(
        ca_file: Option<&Path>,
        client: Option<(&Path, &Path)>,
    ) -> Result<RedisTls, TlsConfigError> {
        let (roots, trust) = match ca_file {
            Some(path) => (
                ca_bundle(path)?,
                format!("the CA bundle {}", path.display()),
            ),
            None => (system_roots()?, "the system's trusted roots".to_string()),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError {
                what: "TLS".into(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert_file, key_file)) => {
                let chain = certificates(cert_file, "client certificate")?;
                let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsConfigError {
                    what: format!("client key {}", key_file.display()),
                    reason: pem_reason(&e, "a PEM private key (PKCS#8, PKCS#1 or SEC1)"),
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsConfigError {
                        what: format!(
                            "client certificate {} with key {}",
                            cert_file.display(),
                            key_file.display()
                        ),
                        reason: e.to_string(),
                    })?
            }
        };
        Ok(RedisTls {
            connector: TlsConnector::from(Arc::new(config)),
            trust: trust.into(),
            client_certificate: client.is_some(),
            server_name: None,
        })
    }

    /// Asks for and verifies `name` rather than the host connected to (an address that is
    /// not the certificate's name, such as an IP or a local port forward).
    pub fn with_server_name(mut self, name: impl Into<String>) -> RedisTls {
        self.server_name = Some(name.into().into());
        self
    }

    /// Whom this configuration trusts, for logs: `the CA bundle PATH` or `the system's trusted
    /// roots`.
    pub fn trust(&self) -> &str {
        &self.trust
    }

    /// Whether a client certificate is shown (mutual TLS).
    pub fn has_client_certificate(&self) -> bool {
        self.client_certificate
    }

    /// The TLS handshake on a connected socket, verifying the certificate against `host`.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
    ) -> Result<RedisStream, String> {
        let host = self.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| format!("{host:?} is not a host name TLS can verify"))?;
        self.connector
            .connect(name, tcp)
            .await
            .map(|s| RedisStream::Tls(Box::new(s)))
            .map_err(|e| describe_tls_failure(&e, host, self).unwrap_or_else(|| e.to_string()))
    }
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("trust", &self.trust)
            .field("client_certificate", &self.client_certificate)
            .field("server_name", &self.server_name)
            .finish()
    }
}

fn ca_bundle(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, "CA bundle")? {
        roots.add(cert).map_err(|e| TlsConfigError {
            what: format!("CA bundle {}", path.display()),
            reason: format!("a certificate cannot be used as a CA: {e}"),
        })?;
    }
    Ok(roots)
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let fail = |reason: String| TlsConfigError {
        what: format!("{what} {}", path.display()),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(pem_reason(&e, "PEM certificates")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(pem_reason(&e, "PEM certificates")))?;
    if certs.is_empty() {
        return Err(fail(
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// A PEM failure in words, without the file's content.
fn pem_reason(e: &rustls::pki_types::pem::Error, expected: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read it: {io}"),
        Error::NoItemsFound => format!("no {expected} in it"),
        _ => format!("not valid {expected}"),
    }
}

fn system_roots() -> Result<RootCertStore, TlsConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(TlsConfigError {
            what: "the system's trusted roots".into(),
            reason: format!(
                "none found{why}: install the CA certificates package, or name a CA bundle (--tls-ca)"
            ),
        });
    }
    Ok(roots)
}

/// What a failed TLS handshake or TLS read means, when the error is TLS's: an untrusted or
/// misnamed certificate, a server that speaks no TLS, or one that wants a client certificate.
/// `None` for errors that are not about TLS (a reset, a timeout).
pub fn describe_tls_failure(e: &io::Error, host: &str, tls: &RedisTls) -> Option<String> {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(error) = rustls_error else {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Some(
                "the connection closed during the TLS handshake: is this a plain-TCP Redis on a rediss:// URL?"
                    .into(),
            );
        }
        return None;
    };
    let trust = &tls.trust;
    Some(match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!("the server's certificate is not signed by {trust} ({error})")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for the host {host:?} ({error})")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the server's certificate has expired ({error})")
            }
            _ => format!("the server's certificate was refused ({error})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!(
                "the server did not answer in TLS ({error}): is this a plain-TCP Redis on a rediss:// URL?"
            )
        }
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::HandshakeFailure
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA,
        ) if !tls.client_certificate => format!(
            "the server refused the connection ({error}): it wants a client certificate (mutual TLS); give one (--tls-cert, --tls-key)"
        ),
        rustls::Error::AlertReceived(_) => {
            format!("the server refused the connection ({error})")
        }
        other => other.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// The stream a pooled connection owns

/// A connection's socket: plain TCP (`redis://`) or TLS over TCP (`rediss://`).
pub(crate) enum RedisStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for RedisStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RedisStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_flush(cx),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The files of a TLS setup, as flags name them; [`TlsFiles::build`] reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any file is named.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    pub fn build(&self) -> Result<RedisTls, TlsConfigError> {
        let client = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(TlsConfigError {
                    what: "client certificate".into(),
                    reason: "a client certificate needs both its certificate file and its key file"
                        .into(),
                })
            }
        };
        RedisTls::new(self.ca.as_deref(), client)
    }
}
