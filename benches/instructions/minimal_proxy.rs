//! hyper's own floor, for `benches/instructions/run.sh`: the least a reverse proxy built on
//! hyper 1 can do per request. One current-thread runtime; `server::conn::http1` towards
//! the client, `client::conn::http1` towards one upstream, a stack of idle upstream
//! connections, origin-form URIs; no header work, no timeouts, no logging, no metrics.
//! Not a gateway: a yardstick for what iamproxy adds around hyper.
//!
//!     minimal_proxy LISTEN_ADDR UPSTREAM_ADDR

use std::cell::RefCell;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Idle = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

/// The upstream's response body; puts its connection back on the stack at end of stream.
struct Returning {
    inner: Incoming,
    back: Option<(SendRequest<Incoming>, Idle)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((sender, idle)) = self.back.take() {
            idle.borrow_mut().push(sender);
        }
    }
}

impl Body for Returning {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn forward(
    upstream: &'static str,
    idle: Idle,
    mut request: Request<Incoming>,
) -> Result<Response<Returning>, hyper::Error> {
    let popped = idle.borrow_mut().pop();
    let mut sender = match popped {
        Some(sender) => sender,
        None => {
            let stream = TcpStream::connect(upstream).await.expect("upstream");
            let _ = stream.set_nodelay(true);
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::task::spawn_local(connection);
            sender
        }
    };
    sender.ready().await?;
    *request.uri_mut() = request
        .uri()
        .path_and_query()
        .map_or(Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    let response = sender.send_request(request).await?;
    Ok(response.map(|inner| {
        let mut body = Returning {
            back: Some((sender, idle)),
            inner,
        };
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: minimal_proxy LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let upstream: &'static str = Box::leak(upstream.into_boxed_str());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(&listen).await.expect("listen");
        let idle: Idle = Rc::default();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let idle = idle.clone();
            tokio::task::spawn_local(async move {
                let service = service_fn(move |request| {
                    let idle = idle.clone();
                    async move {
                        Ok::<_, Infallible>(match forward(upstream, idle, request).await {
                            Ok(response) => response.map(http_body_util::Either::Left),
                            Err(_) => {
                                let mut response = Response::new(http_body_util::Either::Right(
                                    http_body_util::Empty::new(),
                                ));
                                *response.status_mut() = StatusCode::BAD_GATEWAY;
                                response
                            }
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
