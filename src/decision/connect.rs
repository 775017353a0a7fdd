//! The one place Redis connections are made, for the invalidation subscriber, the
//! publisher and the shared decision cache alike: `redis://` or `rediss://` (rustls,
//! verified against `redis.ca_file` or the system's roots), `AUTH` from the URL or
//! `redis.password_file`, and Redis Sentinel, whose sentinels are asked for the master
//! on every connect so that a failover is followed by the next reconnect.

use std::time::Duration;

use redis::aio::{MultiplexedConnection, PubSub};
use redis::{
    Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, TlsCertificates,
};

use crate::config::RedisConfig;

/// Connecting (the sentinels asked, TLS and `AUTH` included) gets this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("no answer within {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("no sentinel named a master {0:?} that answers as master")]
    NoMaster(String),
}

/// Makes connections to the Redis that `[redis]` names.
#[derive(Clone)]
pub struct Connector {
    /// The node to connect to; with Sentinel, its address is replaced by the master's.
    node: ConnectionInfo,
    /// `rediss://` with `redis.ca_file`: what the server's certificate must chain to.
    certificates: Option<TlsCertificates>,
    sentinels: Vec<ConnectionInfo>,
    master: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info holds the password.
        f.debug_struct("Connector")
            .field("sentinels", &self.sentinels.len())
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Config validation has parsed every URL already, so this fails only on a config
    /// built by hand.
    pub fn new(config: &RedisConfig) -> Result<Connector, RedisError> {
        let mut node = config.url.as_str().into_connection_info()?;
        if let Some(password) = &config.password {
            node.redis.password = Some(password.0.clone());
        }
        let sentinels = config
            .sentinels
            .iter()
            .map(|url| url.as_str().into_connection_info())
            .collect::<Result<_, _>>()?;
        Ok(Connector {
            node,
            certificates: config.ca_pem.clone().map(|root_cert| TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            }),
            sentinels,
            master: config.sentinel_master.clone(),
        })
    }

    /// A multiplexed connection to the master, within [`CONNECT_TIMEOUT`].
    pub async fn multiplexed(&self) -> Result<MultiplexedConnection, ConnectError> {
        bounded(async {
            let (_, connection) = self.master().await?;
            Ok(connection)
        })
        .await
    }

    /// A connection for pub/sub, within [`CONNECT_TIMEOUT`].
    pub async fn pubsub(&self) -> Result<PubSub, ConnectError> {
        bounded(async {
            let (client, _) = self.master().await?;
            Ok(client.get_async_pubsub().await?)
        })
        .await
    }

    /// The master's client and a connection to it: the URL's node, or the one the first
    /// sentinel that knows `sentinel_master` names, provided it answers `ROLE` as master
    /// (right after a failover a sentinel may still name the old one).
    async fn master(&self) -> Result<(Client, MultiplexedConnection), ConnectError> {
        if self.sentinels.is_empty() {
            let client = self.client(self.node.addr.clone())?;
            let connection = client.get_multiplexed_async_connection().await?;
            return Ok((client, connection));
        }
        let mut last_error = None;
        for sentinel in &self.sentinels {
            match self.master_from(sentinel).await {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| ConnectError::NoMaster(self.master.clone())))
    }

    async fn master_from(
        &self,
        sentinel: &ConnectionInfo,
    ) -> Result<Option<(Client, MultiplexedConnection)>, ConnectError> {
        let mut asked = Client::open(sentinel.clone())?
            .get_multiplexed_async_connection()
            .await?;
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query_async(&mut asked)
            .await?;
        let Some((host, port)) = named else {
            return Ok(None);
        };
        let addr = match &self.node.addr {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        let client = self.client(addr)?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut connection).await?;
        let is_master =
            matches!(role.first(), Some(redis::Value::BulkString(role)) if role == b"master");
        Ok(is_master.then_some((client, connection)))
    }

    /// A client for the node at `addr`, with the URL's credentials and database.
    fn client(&self, addr: ConnectionAddr) -> Result<Client, RedisError> {
        let info = ConnectionInfo {
            addr,
            redis: self.node.redis.clone(),
        };
        match (&info.addr, &self.certificates) {
            (ConnectionAddr::TcpTls { .. }, Some(certificates)) => {
                Client::build_with_tls(info, certificates.clone())
            }
            _ => Client::open(info),
        }
    }
}

async fn bounded<T>(
    connect: impl std::future::Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| ConnectError::Timeout)?
}
