//! The sockets the gateway listens on: an IP address and port, or a Unix socket file
//! (`unix:/path`). A socket file left by a crashed run is replaced, one a running process
//! still accepts on is not, and anything else at the path is refused; the file gets
//! `server.socket_mode` and is removed when the listener closes.
//!
//! A Unix-socket peer has no IP address. As Workhorse does (its `@` remote address becomes
//! `127.0.0.1:0`), the gateway takes it for [`UNIX_PEER`]: that is what goes in
//! `X-Forwarded-For` and the logs, and its forwarding headers are trusted exactly when
//! `server.trusted_cidrs` holds 127.0.0.1.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::StartError;
use crate::config::ListenAddr;

/// The address a Unix-socket peer counts as.
pub const UNIX_PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// How long a socket file found at start-up may take to answer before it is taken for a
/// live one: a process that accepts connections answers at once, a dead one refuses.
const LIVE_SOCKET_PROBE: Duration = Duration::from_secs(1);

/// A listener the accept loop ([`super::accept::Accept::until`]) can take connections
/// from.
pub trait Listen {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection, and the address its peer counts as.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl Listen for TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Responses go out as soon as they are written, not when Nagle lets them.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// A listening Unix socket and its file, removed when this is dropped.
#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    file: SocketFile,
}

impl Listen for UnixSocket {
    type Stream = UnixStream;

    async fn accept(&self) -> io::Result<(UnixStream, SocketAddr)> {
        let (stream, _) = self.listener.accept().await?;
        Ok((stream, UNIX_PEER))
    }
}

/// One of the gateway's listeners.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

impl Listener {
    /// Binds `addr` for the listener configured at `key`; a socket file gets `mode`.
    pub async fn bind(
        key: &'static str,
        addr: &ListenAddr,
        mode: u32,
    ) -> Result<Listener, StartError> {
        let bound = match addr {
            ListenAddr::Tcp(addr) => TcpListener::bind(addr).await.map(Listener::Tcp),
            ListenAddr::Unix(path) => bind_unix(path, mode).await.map(Listener::Unix),
        };
        bound.map_err(|source| StartError::Bind {
            key,
            addr: addr.clone(),
            source,
        })
    }

    /// Where it listens, with the port the OS chose for port 0.
    pub fn local_addr(&self) -> Option<ListenAddr> {
        match self {
            Listener::Tcp(tcp) => tcp.local_addr().ok().map(ListenAddr::Tcp),
            Listener::Unix(unix) => Some(ListenAddr::Unix(unix.file.path.clone())),
        }
    }
}

async fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixSocket> {
    match std::fs::symlink_metadata(path) {
        Ok(found) if found.file_type().is_socket() => {
            let probe = tokio::time::timeout(LIVE_SOCKET_PROBE, UnixStream::connect(path)).await;
            match probe {
                // Nobody accepts on it: a crashed run's.
                Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                }
                Ok(Err(error)) => return Err(error),
                Ok(Ok(_)) | Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process is accepting connections on this socket",
                    ))
                }
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket (only a socket left by a crashed run \
                 is replaced)",
            ))
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    let file = SocketFile::bound(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(UnixSocket { listener, file })
}

/// A socket file this process bound: removed on drop, unless another file has taken its
/// place since (a newer process binding the same path).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// Device and inode, to know the file is still ours.
    id: (u64, u64),
}

impl SocketFile {
    fn bound(path: &Path) -> io::Result<SocketFile> {
        let metadata = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_owned(),
            id: (metadata.dev(), metadata.ino()),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
