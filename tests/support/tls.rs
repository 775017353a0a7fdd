//! TLS made at test time: a fresh CA per test and the leaf certificates it signs, a TLS
//! front that terminates TLS before a plain fake upstream, and an HTTPS client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file in the temp dir, removed on drop.
pub struct PemFile(PathBuf);

impl PemFile {
    fn new(kind: &str, contents: &str) -> PemFile {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "iamproxy-test-{}-{n}.{kind}.pem",
            std::process::id()
        ));
        std::fs::write(&path, contents).unwrap();
        PemFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as it goes in a TOML string.
    pub fn toml(&self) -> String {
        self.0.display().to_string()
    }

    /// Replaces the contents, as a certificate renewal would.
    pub fn rewrite(&self, contents: &str) {
        std::fs::write(&self.0, contents).unwrap();
    }
}

impl Drop for PemFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A certificate authority made for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Its certificate, for `ca_file`.
    pub file: PemFile,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let file = PemFile::new("ca", &issuer.pem());
        Ca { issuer, file }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "iamproxy test");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    /// Both as files: (certificate, key).
    pub fn files(&self) -> (PemFile, PemFile) {
        (
            PemFile::new("cert", &self.cert_pem),
            PemFile::new("key", &self.key_pem),
        )
    }

    /// `[server.tls]` naming `files`.
    pub fn server_tls_keys((cert, key): &(PemFile, PemFile)) -> String {
        format!(
            "certificate_file = \"{}\"\nkey_file = \"{}\"",
            cert.toml(),
            key.toml()
        )
    }

    fn acceptor(&self) -> TlsAcceptor {
        let key = PrivateKeyDer::try_from(self.key_der.clone()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// Terminates TLS with a leaf certificate and pipes the plaintext to `target` (a fake
/// upstream), so HTTPS upstreams are fakes that record like any other.
pub struct TlsFront {
    pub addr: SocketAddr,
    /// Why each refused handshake failed, as the server saw it.
    pub refused: Arc<Mutex<Vec<String>>>,
    _stop: oneshot::Sender<()>,
}

impl TlsFront {
    pub async fn start(leaf: &Leaf, target: SocketAddr) -> TlsFront {
        TlsFront::start_slow(leaf, target, std::time::Duration::ZERO).await
    }

    /// A front whose every handshake starts `delay` after the connection was accepted: a
    /// connect that takes that long.
    pub async fn start_slow(
        leaf: &Leaf,
        target: SocketAddr,
        delay: std::time::Duration,
    ) -> TlsFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = leaf.acceptor();
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let failures = refused.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    _ = &mut stopped => return,
                };
                let (acceptor, failures) = (acceptor.clone(), failures.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut tls = match acceptor.accept(stream).await {
                        Ok(tls) => tls,
                        Err(error) => return failures.lock().unwrap().push(error.to_string()),
                    };
                    let Ok(mut plain) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            refused,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }
}

/// What an HTTPS client saw.
pub struct HttpsAnswer {
    pub status: StatusCode,
    pub version: Version,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    /// The certificate the server presented.
    pub certificate: CertificateDer<'static>,
}

impl HttpsAnswer {
    pub fn served_by(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["served_by"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Opens a TLS connection to `addr` as `localhost`, trusting only `ca`.
pub async fn connect(
    addr: SocketAddr,
    ca: &Ca,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(ca.client_config(alpn))
        .connect(name, tcp)
        .await
}

/// One request over a new TLS connection, by HTTP/2 when `http2`, else HTTP/1.1.
pub async fn https_request(
    addr: SocketAddr,
    ca: &Ca,
    http2: bool,
    request: Request<Full<Bytes>>,
) -> HttpsAnswer {
    let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = connect(addr, ca, alpn).await.expect("TLS handshake");
    let certificate = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let io = TokioIo::new(tls);
    let response = if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let (parts, body) = response.into_parts();
    HttpsAnswer {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
        certificate,
    }
}
