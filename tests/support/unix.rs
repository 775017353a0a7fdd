//! Unix sockets: a directory to put them in, fake upstreams listening on one, and a client
//! that sends over one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use super::{Answer, FakeUpstream, ANSWER_PATIENCE};

/// A fresh directory under the temp dir, removed with everything in it when dropped.
pub struct SocketDir(PathBuf);

impl SocketDir {
    pub fn new() -> SocketDir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "iamproxy-sockets-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        SocketDir(dir)
    }

    /// A path in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl FakeUpstream {
    /// Starts a fake, as [`FakeUpstream::start`] does, listening on the Unix socket `path`;
    /// its [`FakeUpstream::url`] is `unix:<path>`.
    pub async fn start_unix(name: &'static str, path: &Path) -> FakeUpstream {
        let listener = UnixListener::bind(path).unwrap();
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        FakeUpstream::serve_on(name, unspecified, Some(path.to_owned()), listener)
    }
}

/// Sends `request` (origin-form, with its own `Host`) on a new HTTP/1.1 connection to the
/// Unix socket `path`, failing the test unless it is answered within [`ANSWER_PATIENCE`].
pub async fn send_unix(path: &Path, request: Request<Full<Bytes>>) -> Answer {
    let exchange = async {
        let stream = UnixStream::connect(path)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 connection");
        tokio::spawn(connection);
        let response = sender.send_request(request).await.expect("an answer");
        Answer::read(response).await
    };
    tokio::time::timeout(ANSWER_PATIENCE, exchange)
        .await
        .expect("the gateway answered in time")
}
