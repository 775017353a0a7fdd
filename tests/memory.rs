//! Memory under a burst of large OAuth bodies, on the real binary: two HTTP/2 connections
//! each opening 200 streams that POST a 1 MB token body. `server.max_buffered_bytes` caps
//! what the gateway holds at once (the rest get 503), so its resident memory stays bounded
//! during the burst, and most of it is given back afterwards.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use support::process::{free_addr, rss_of, Iamproxy, TempFile};
use support::FakeUpstream;

const CONNECTIONS: usize = 2;
const STREAMS: usize = 200;
const BODY: usize = 1_000_000;
const MIB: u64 = 1024 * 1024;
/// Most the burst may add to the gateway's resident memory at its peak: the 64 MiB budget
/// for bodies, each connection's HTTP/2 windows, and the copies a body makes on its way to
/// Rails; without the budget the same burst took it past 400 MiB.
const PEAK_GROWTH_BOUND: u64 = 160 * MIB;
/// Most that may stay resident a few seconds after the burst.
const AFTER_GROWTH_BOUND: u64 = 48 * MIB;

#[tokio::test]
async fn a_burst_of_large_oauth_bodies_over_http2_is_bounded_and_given_back() {
    let rails = FakeUpstream::start("rails").await;
    rails.count_only();
    let (addr, admin) = (free_addr(), free_addr());
    let config = TempFile::new(&format!(
        "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n\
         max_body_bytes = {BODY}\n\
         [rails]\nurl = \"{}\"\n[log]\nlevel = \"error\"\n",
        rails.url()
    ));
    let gateway = Iamproxy::start(&["--config", config.path()]);
    let client: Client<HttpConnector, Full<Bytes>> = support::h2c_client();
    let ready = Instant::now();
    while client
        .request(
            Request::get(format!("http://{addr}/-/x"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .is_err()
    {
        assert!(ready.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = rss_of(gateway.pid);

    let body = Bytes::from(format!(
        "grant_type=client_credentials&client_id=app-1&pad={}",
        "x".repeat(BODY - 50)
    ));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = tokio::spawn({
        let (peak, pid) = (peak.clone(), gateway.pid);
        async move {
            loop {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        // A client of its own: one HTTP/2 connection each.
        let client: Client<HttpConnector, Full<Bytes>> = support::h2c_client();
        for _ in 0..STREAMS {
            let request = Request::post(format!("http://{addr}/oauth/token"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(body.clone()))
                .unwrap();
            let client = client.clone();
            streams.push(tokio::spawn(async move {
                client.request(request).await.map(|r| r.status().as_u16())
            }));
        }
    }
    let (mut served, mut refused) = (0, 0);
    for stream in streams {
        match tokio::time::timeout(Duration::from_secs(60), stream).await {
            Ok(Ok(Ok(200))) => served += 1,
            Ok(Ok(Ok(503))) => refused += 1,
            other => panic!("a stream ended {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    sampler.abort();
    let (peak, after) = (peak.load(Ordering::Relaxed), rss_of(gateway.pid));
    println!(
        "{served} served, {refused} refused (503); RSS {} MiB before, {} MiB at the peak, {} MiB 3 s after",
        before / MIB,
        peak / MIB,
        after / MIB
    );
    assert_eq!(served + refused, CONNECTIONS * STREAMS);
    assert!(served > 0, "some bodies fit the budget");
    assert!(
        peak - before < PEAK_GROWTH_BOUND,
        "peak {} MiB over {} MiB",
        peak / MIB,
        before / MIB
    );
    assert!(
        after.saturating_sub(before) < AFTER_GROWTH_BOUND,
        "{} MiB resident after the burst, {} MiB before",
        after / MIB,
        before / MIB
    );
}
