//! TLS with rustls: the certificate the main listener presents, and which certificates an
//! HTTPS upstream may present. Files are read when the configuration is, so a bad file is
//! a configuration error naming its key, and a reload picks up a renewed certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The main listener's certificate chain and key.
#[derive(Clone)]
pub struct ServerTls {
    pub certificate_file: PathBuf,
    pub key_file: PathBuf,
    pub config: Arc<ServerConfig>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("certificate_file", &self.certificate_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// Why a TLS file was refused; `key` is the config key that named the file.
#[derive(Debug)]
pub struct TlsError {
    pub key: &'static str,
    pub reason: String,
}

fn refused(key: &'static str, reason: impl Into<String>) -> TlsError {
    TlsError {
        key,
        reason: reason.into(),
    }
}

/// One provider for every config, chosen here rather than by crate features, so no other
/// crate in the tree can change it.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Reads a PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1
    /// or SEC1). ALPN offers HTTP/2 and HTTP/1.1.
    pub fn load(
        (certificate_key, certificate_file): (&'static str, &Path),
        (key_key, key_file): (&'static str, &Path),
    ) -> Result<ServerTls, TlsError> {
        let chain = certificates(certificate_key, certificate_file)?;
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
            refused(
                key_key,
                format!("no usable PEM private key in {}: {e}", key_file.display()),
            )
        })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| refused(certificate_key, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                refused(
                    key_key,
                    format!(
                        "does not fit the certificate in {}: {e}",
                        certificate_file.display()
                    ),
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            certificate_file: certificate_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            config: Arc::new(config),
        })
    }
}

/// What an HTTPS upstream's certificate must chain to: the certificates in `ca_file`, or
/// the system's roots when there is none.
pub fn client_config(
    ca_key: &'static str,
    ca_file: Option<&Path>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for certificate in certificates(ca_key, path)? {
                roots.add(certificate).map_err(|e| {
                    refused(
                        ca_key,
                        format!("bad CA certificate in {}: {e}", path.display()),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(String::new, |e| format!(" ({e})"));
                return Err(refused(
                    ca_key,
                    format!("no system root certificates found{why}; set it to a CA file"),
                ));
            }
        }
    }
    Ok(Arc::new(
        plain_builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// For an `http` upstream: the connector needs a TLS config but never uses it. Trusting
/// nothing, it could not be talked into an unverified connection either.
pub fn unused_client_config() -> Arc<ClientConfig> {
    Arc::new(
        plain_builder()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    )
}

fn plain_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // ring supports every protocol version rustls does, so this cannot fail.
        .expect("the ring provider supports TLS 1.2 and 1.3")
}

/// Every PEM certificate in `path`; none at all is an error.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display();
    // Read first, so a missing file says so rather than "no certificate".
    let pem = std::fs::read(path).map_err(|e| refused(key, format!("cannot read {shown}: {e}")))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(key, format!("bad PEM in {shown}: {e}")))?;
    if certificates.is_empty() {
        return Err(refused(key, format!("no PEM certificate in {shown}")));
    }
    Ok(certificates)
}
