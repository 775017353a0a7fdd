//! The pooled HTTP clients, one per upstream, and the upstreams' names.

use std::time::Duration;

use hyper::body::Body;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;

use super::RequestBody;

/// Plain TCP for `http` upstreams, TLS for `https` ones.
pub type Connector = HttpsConnector<HttpConnector>;
pub type HttpClient = Client<Connector, RequestBody>;

/// The upstreams the gateway talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Iam,
    Rails,
    Preauthorize,
}

impl Upstream {
    pub const ALL: [Upstream; 3] = [Upstream::Iam, Upstream::Rails, Upstream::Preauthorize];

    /// The `upstream` label of `iamproxy_upstream_connection_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::Iam => "iam",
            Upstream::Rails => "rails",
            Upstream::Preauthorize => "preauthorize",
        }
    }
}

/// How long an idle upstream connection stays pooled.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A keep-alive pool to one kind of upstream. Each upstream gets its own so that one slow
/// upstream cannot starve the others of connections. `tls` decides which certificates an
/// `https` upstream may present; `connect_timeout` bounds the TCP connect, and the TLS
/// handshake counts against the request's own timeout.
pub fn pooled_client<B>(connect_timeout: Duration, tls: &ClientConfig) -> Client<Connector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    // The https connector needs to see the scheme: http stays plain TCP.
    tcp.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}
