//! Protocol upgrades (WebSocket: ActionCable, web terminals) on non-OAuth paths, tunnelled
//! to Rails as Workhorse does. `Upgrade` is hop-by-hop, so the generic header cleanup
//! removes it; this module puts it back for the one hop that carries it and, once Rails
//! answers 101, splices the two connections together. OAuth paths never upgrade.

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use super::client::UpstreamBody;
use super::headers::connection_tokens;
use super::{downstream_response, ResponseBody};
use crate::server::connection::{Conn, Drain};

/// A client's request to switch protocols.
#[derive(Debug)]
pub struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
    /// Shutdown waits for the tunnel as it does for a connection.
    drain: Drain,
}

/// The upgrade the client asks for, if any: HTTP/1.1 with `Connection: upgrade` and an
/// `Upgrade` header. Must run before the request is taken apart.
pub fn requested(request: &mut Request<Incoming>, conn: &Conn) -> Option<Upgrade> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let protocol = request.headers().get(header::UPGRADE)?.clone();
    let asks =
        connection_tokens(request.headers()).any(|token| token.eq_ignore_ascii_case("upgrade"));
    asks.then(|| Upgrade {
        protocol,
        client: hyper::upgrade::on(request),
        drain: conn.drain(),
    })
}

impl Upgrade {
    /// Restores, on the request to Rails, the upgrade headers the cleanup removed.
    pub fn restore_request_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// Relays Rails' answer. On 101 the connections are spliced in a task of their own,
    /// which ends when either side closes, or when shutdown begins: a tunnel has no
    /// request boundary to finish at, and WebSocket clients reconnect.
    pub fn relay(self, mut response: Response<UpstreamBody>) -> Response<ResponseBody> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return downstream_response(response);
        }
        let upstream = hyper::upgrade::on(&mut response);
        let protocol = response.headers().get(header::UPGRADE).cloned();
        let mut response = downstream_response(response);
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = protocol {
            headers.insert(header::UPGRADE, protocol);
        }
        let mut drain = self.drain;
        tokio::spawn(async move {
            match tokio::try_join!(self.client, upstream) {
                Ok((client, upstream)) => {
                    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        () = drain.started() => {}
                    }
                }
                Err(error) => tracing::debug!(error = %error, "upgrade did not complete"),
            }
            drop(drain);
        });
        response
    }
}
