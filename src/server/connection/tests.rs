use super::*;

const TIMEOUTS: Timeouts = Timeouts {
    handshake_and_header_read: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    write: Duration::from_secs(30),
};

/// A connection from loopback whose clocks are `activity`'s.
fn conn_on(activity: &Arc<Activity>) -> Conn {
    Conn {
        peer: "127.0.0.1:1".parse().unwrap(),
        peer_ip: HeaderValue::from_static("127.0.0.1"),
        https: false,
        activity: activity.clone(),
        drain: Draining::default().token(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_connection_must_send_headers_within_the_header_read_timeout() {
    let activity = Activity::new(false);
    let (at, why) = activity.deadline(TIMEOUTS).unwrap();
    assert_eq!(why, Expiry::HeaderRead);
    assert_eq!(at, activity.accepted + Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn after_a_request_the_idle_clock_runs_until_the_next_byte() {
    let activity = Arc::new(Activity::new(false));
    activity.on_read(b"GET / HTTP/1.1\r\n");
    let conn = conn_on(&activity);
    let request = conn.request_started();
    assert_eq!(activity.deadline(TIMEOUTS), None, "nothing runs in flight");
    tokio::time::advance(Duration::from_secs(100)).await;
    drop(request);
    let (at, why) = activity.deadline(TIMEOUTS).unwrap();
    assert_eq!(why, Expiry::Idle);
    assert_eq!(at, Instant::now() + Duration::from_secs(60));

    tokio::time::advance(Duration::from_secs(5)).await;
    activity.on_read(b"G");
    let (at, why) = activity.deadline(TIMEOUTS).unwrap();
    assert_eq!(why, Expiry::HeaderRead);
    assert_eq!(at, Instant::now() + Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn http2_frames_between_requests_do_not_start_the_header_clock() {
    let activity = Activity::new(false);
    activity.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let (_, why) = activity.deadline(TIMEOUTS).unwrap();
    assert_eq!(why, Expiry::Idle);
    activity.on_read(b"ping frame");
    assert_eq!(activity.deadline(TIMEOUTS).unwrap().1, Expiry::Idle);
}

/// Polls `future` once; `None` if it is pending.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
    tokio::select! {
        biased;
        output = future => Some(output),
        () = std::future::ready(()) => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_head_that_starts_while_the_watchdog_sleeps_on_the_idle_clock_is_cut_in_time() {
    let activity = Arc::new(Activity::new(false));
    activity.on_read(b"GET / HTTP/1.1\r\n\r\n");
    let conn = conn_on(&activity);
    drop(conn.request_started());
    let started = Instant::now();
    let sleep = tokio::time::sleep_until(started + Duration::from_secs(3600));
    tokio::pin!(sleep);
    let mut look = LastLook::default();
    let mut watchdog =
        std::future::poll_fn(|cx| watch(cx, &activity, TIMEOUTS, sleep.as_mut(), &mut look));
    assert_eq!(poll_once(&mut watchdog).await, None, "idle for 0 s of 60");

    tokio::time::advance(Duration::from_secs(5)).await;
    activity.on_read(b"G");
    // The connection's task runs after a read: the watchdog looks again.
    assert_eq!(poll_once(&mut watchdog).await, None, "a head for 0 s of 10");
    assert_eq!(watchdog.await, Expiry::HeaderRead);
    assert_eq!(Instant::now(), started + Duration::from_secs(15));
}

#[tokio::test(start_paused = true)]
async fn a_busy_connection_is_not_cut_and_its_idle_clock_starts_when_the_request_ends() {
    let activity = Arc::new(Activity::new(false));
    activity.on_read(b"GET / HTTP/1.1\r\n\r\n");
    let conn = conn_on(&activity);
    let request = conn.request_started();
    let started = Instant::now();
    let sleep = tokio::time::sleep_until(started + Duration::from_secs(10));
    tokio::pin!(sleep);
    let mut look = LastLook::default();
    let mut watchdog =
        std::future::poll_fn(|cx| watch(cx, &activity, TIMEOUTS, sleep.as_mut(), &mut look));
    // Five minutes in flight: the watchdog wakes and sleeps on.
    tokio::time::advance(Duration::from_secs(300)).await;
    assert_eq!(poll_once(&mut watchdog).await, None);
    drop(request);
    assert_eq!(watchdog.await, Expiry::Idle);
    assert_eq!(Instant::now(), started + Duration::from_secs(360));
}

#[tokio::test]
async fn draining_waits_for_every_token() {
    let draining = Draining::default();
    let mut token = draining.token();
    assert_eq!(draining.count(), 1);
    let holder = tokio::spawn(async move {
        token.started().await;
        drop(token);
    });
    tokio::time::timeout(Duration::from_secs(5), draining.drain())
        .await
        .expect("drained once the token is dropped");
    holder.await.unwrap();
    assert_eq!(draining.count(), 0);
}

/// An in-memory connection served as the listener serves one, every request answered 200
/// with `body()`; the client's end, and the drain its connection holds a token of.
fn serve_in_memory<B>(
    timeouts: Timeouts,
    buffer: usize,
    body: fn() -> B,
) -> (
    tokio::io::DuplexStream,
    Draining,
    tokio::task::JoinHandle<()>,
)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (client, server) = tokio::io::duplex(buffer);
    let limits = super::super::accept::Limits {
        max_connections: 1,
        when_full: super::super::accept::WhenFull::Wait,
        max_header_bytes: 65_536,
        h2_max_concurrent_streams: 128,
    };
    let builder = super::super::accept::connection_builder(limits);
    let peer = Peer {
        addr: "127.0.0.1:1".parse().unwrap(),
        https: false,
        http2: false,
    };
    let make = move |conn: Arc<Conn>| {
        hyper::service::service_fn(move |_request| {
            let busy = conn.request_started();
            async move { Ok::<_, std::convert::Infallible>(Response::new(busy.until_sent(body(), ()))) }
        })
    };
    let draining = Draining::default();
    let serving = tokio::spawn(run(server, peer, builder, timeouts, draining.token(), make));
    (client, draining, serving)
}

/// A body of `FRAMES` frames of 16 KiB, each after `DELAY`.
struct Frames<const FRAMES: usize, const DELAY_SECS: u64> {
    sent: usize,
    next: Option<Pin<Box<Sleep>>>,
}

const FRAME: &[u8] = &[b'x'; 16_384];

impl<const FRAMES: usize, const DELAY_SECS: u64> Frames<FRAMES, DELAY_SECS> {
    fn new() -> Self {
        Frames {
            sent: 0,
            next: None,
        }
    }
}

impl<const FRAMES: usize, const DELAY_SECS: u64> Body for Frames<FRAMES, DELAY_SECS> {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
        if self.sent == FRAMES {
            return Poll::Ready(None);
        }
        let delay = Duration::from_secs(DELAY_SECS);
        let next = self
            .next
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
        std::task::ready!(next.as_mut().poll(cx));
        self.next = None;
        self.sent += 1;
        Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from_static(FRAME)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == FRAMES
    }
}

async fn request_over(
    io: tokio::io::DuplexStream,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

fn get() -> Request<http_body_util::Empty<bytes::Bytes>> {
    Request::get("/")
        .header("host", "gateway")
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_keep_alive_connection_idle_past_hypers_30s_header_timer_stays_open_until_idle_timeout() {
    let (client, _draining, serving) = serve_in_memory(TIMEOUTS, 65_536, || {
        http_body_util::Full::new(bytes::Bytes::new())
    });
    let mut sender = request_over(client).await;
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_secs(45)).await;
    sender
        .ready()
        .await
        .expect("open 45 s after the last request");
    let started = Instant::now();
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);
    serving.await.unwrap();
    let closed_after = started.elapsed();
    assert!(
        closed_after >= TIMEOUTS.idle && closed_after < TIMEOUTS.idle * 2,
        "closed {closed_after:?} after the last request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_response_streaming_for_longer_than_idle_timeout_is_sent_whole() {
    use http_body_util::BodyExt;
    // Twelve frames 20 s apart: four minutes, four idle timeouts, six write timeouts.
    let (client, _draining, _serving) = serve_in_memory(TIMEOUTS, 65_536, Frames::<12, 20>::new);
    let mut sender = request_over(client).await;
    let started = Instant::now();
    let response = sender.send_request(get()).await.unwrap();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the whole body")
        .to_bytes();
    assert_eq!(body.len(), 12 * FRAME.len());
    assert!(started.elapsed() >= Duration::from_secs(240));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_response_is_cut_after_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 64 MiB at once: far more than the 64 KiB pipe and hyper's buffer hold.
    let (mut client, _draining, serving) =
        serve_in_memory(TIMEOUTS, 65_536, Frames::<4096, 0>::new);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let _ = client.read(&mut head).await.unwrap();
    let stalled = Instant::now();
    serving.await.unwrap();
    let cut_after = stalled.elapsed();
    // The first look comes at the header deadline the connection had, then one per
    // write timeout: stalled at two looks in a row.
    assert!(
        cut_after >= TIMEOUTS.write
            && cut_after <= TIMEOUTS.handshake_and_header_read + TIMEOUTS.write,
        "cut {cut_after:?} after the client stopped reading"
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.len() < 4096 * FRAME.len() / 8,
        "{} bytes got through",
        rest.len()
    );
}

#[tokio::test(start_paused = true)]
async fn draining_closes_an_idle_keep_alive_connection_at_once_and_the_drain_ends() {
    let (client, draining, serving) = serve_in_memory(TIMEOUTS, 65_536, || {
        http_body_util::Full::new(bytes::Bytes::new())
    });
    let mut sender = request_over(client).await;
    // Served, so the connection's task has run and is now waiting, idle.
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);
    let began = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), draining.drain())
        .await
        .expect("the idle connection let go when shutdown began");
    serving.await.unwrap();
    assert_eq!(Instant::now(), began, "no clock had to run out");
    assert_eq!(draining.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_when_draining_begins_is_answered_then_the_connection_closes() {
    let (client, draining, serving) = serve_in_memory(TIMEOUTS, 65_536, Frames::<3, 1>::new);
    let mut sender = request_over(client).await;
    let response = sender.send_request(get()).await.unwrap();
    let drained = tokio::spawn(async move { draining.drain().await });
    use http_body_util::BodyExt;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 3 * FRAME.len(), "the whole response");
    tokio::time::timeout(Duration::from_secs(1), drained)
        .await
        .expect("drained once the response was sent")
        .unwrap();
    serving.await.unwrap();
}
