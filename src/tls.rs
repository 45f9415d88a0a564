//! Transport security for the gRPC listeners: TLS with rustls (the `ring` provider), optional
//! mutual TLS against a client CA, and certificates that reload without a restart.
//!
//! The current [`rustls::ServerConfig`] sits behind an [`ArcSwap`]: every new connection
//! takes the one current when it arrives, so a reload affects new connections only and
//! established ones keep their session. A reload that fails (unreadable file, no key, a key
//! that does not match the certificate) keeps the previous certificate and logs an error.
//!
//! [`crate::server::conn::incoming`] accepts the connections and runs the handshakes (with
//! the acceptor of the current settings), within the front door's connection limits.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::settings::Issues;

/// `[tls]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// `tls.cert`.
    pub cert: Option<String>,
    /// `tls.key`.
    pub key: Option<String>,
    /// `tls.client_ca`.
    pub client_ca: Option<String>,
    /// `tls.reload_interval`.
    pub reload_interval: Option<String>,
}

/// TLS settings of the gRPC listeners (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (PEM).
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

impl TlsConfig {
    /// Validates `[tls]`: `cert` and `key` are required together; the files are read when
    /// the server starts (and on every reload), so that a problem there names the file.
    pub fn from_raw(raw: RawTls, issues: &mut Issues) -> Option<Self> {
        let reload_interval = issues.duration(
            "tls.reload_interval",
            raw.reload_interval.as_deref(),
            Duration::from_secs(5),
        );
        let path = |field: &str, value: Option<String>, issues: &mut Issues| match value {
            Some(v) if !v.trim().is_empty() => Some(PathBuf::from(v)),
            Some(_) => {
                issues.push(field, "must not be empty");
                None
            }
            None => {
                issues.push(field, "is required in [tls]");
                None
            }
        };
        let cert = path("tls.cert", raw.cert, issues);
        let key = path("tls.key", raw.key, issues);
        let client_ca = match raw.client_ca {
            Some(ca) => Some(path("tls.client_ca", Some(ca), issues)?),
            None => None,
        };
        Some(Self {
            cert: cert?,
            key: key?,
            client_ca,
            reload_interval,
        })
    }
}

/// Why the TLS settings could not be loaded. Each names the config field.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{field}: cannot read `{path}`: {source}")]
    Read {
        /// The config field.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file holds nothing usable.
    #[error("{field}: `{path}` {problem}")]
    Content {
        /// The config field.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("{field}: {message}")]
    Rustls {
        /// The config field.
        field: &'static str,
        /// rustls' description.
        message: String,
    },
}

/// The live TLS settings of the listeners.
pub struct TlsState {
    paths: TlsConfig,
    current: ArcSwap<ServerConfig>,
    /// The files' modification times and sizes when last loaded (or tried).
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Content {
            field,
            path: path.to_owned(),
            problem: "is not valid PEM",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            field,
            path: path.to_owned(),
            problem: "holds no certificate",
        });
    }
    Ok(certs)
}

/// Builds a server config from the files: the certificate chain and key, and with a client
/// CA a verifier that requires a client certificate signed by it. ALPN offers `h2`.
pub fn server_config(paths: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("tls.cert", &paths.cert)?;
    let key_pem = read("tls.key", &paths.key)?;
    // Never echo the key file's content, not even in a parse error.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::Content {
        field: "tls.key",
        path: paths.key.clone(),
        problem: "holds no PEM private key",
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls {
            field: "tls",
            message: e.to_string(),
        })?;
    let builder = match &paths.client_ca {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("tls.client_ca", ca_path)? {
                roots.add(cert).map_err(|e| TlsError::Rustls {
                    field: "tls.client_ca",
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls {
                    field: "tls.client_ca",
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls {
            field: "tls.key",
            message: format!("does not fit the certificate: {e}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl TlsState {
    /// Loads the files; fails when they are not usable (the server does not start).
    pub fn load(paths: &TlsConfig) -> Result<Arc<TlsState>, TlsError> {
        let stamps = Self::stamps_of(paths);
        let current = server_config(paths)?;
        Ok(Arc::new(TlsState {
            paths: paths.clone(),
            current: ArcSwap::new(current),
            stamps: Mutex::new(stamps),
        }))
    }

    fn stamps_of(paths: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
        [
            Some(&paths.cert),
            Some(&paths.key),
            paths.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| stamp(p))
        .collect()
    }

    /// The file paths in use.
    pub fn paths(&self) -> &TlsConfig {
        &self.paths
    }

    /// Re-reads the files and swaps the new settings in; on error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = Self::stamps_of(&self.paths);
        if let Ok(mut s) = self.stamps.lock() {
            *s = stamps;
        }
        let config = server_config(&self.paths)?;
        self.current.store(config);
        tracing::info!(cert = %self.paths.cert.display(), "tls certificate reloaded");
        Ok(())
    }

    /// Reloads when a file's modification time or size changed since the last load. Logs
    /// the outcome; a bad new file keeps the old certificate (and is not retried until it
    /// changes again).
    pub fn reload_if_changed(&self) {
        let stamps = Self::stamps_of(&self.paths);
        let changed = self.stamps.lock().map_or(true, |s| *s != stamps);
        if changed && let Err(err) = self.reload() {
            tracing::error!(error = %err, "tls reload failed; keeping the previous certificate");
        }
    }

    /// Polls the files every `interval` until `stop`.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let state = self.clone();
            // File reads are blocking; keep them off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || state.reload_if_changed()).await;
        }
    }

    /// An acceptor with the current settings.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

/// A connection to a gRPC listener: plain TCP or TLS.
#[derive(Debug)]
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}
