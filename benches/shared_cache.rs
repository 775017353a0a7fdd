//! What a routing decision costs from each level, all on loopback: a local (L1) hit; a
//! local miss answered by the fleet's shared cache (L2: a `redis-server` this bench
//! starts); a local miss refilled without Redis, to subtract; a local and shared miss,
//! whose lock costs one more round trip before the backend is asked; and a pre-authorize
//! call to a minimal HTTP backend (a fixed answer, so what is measured is the gateway's
//! client and the loopback hop: Rails itself takes milliseconds more).
//! `cargo bench --bench shared_cache` (needs Debian's `redis-server`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hyper::header::HeaderValue;
use iamproxy::config::Config;
use iamproxy::decision::cache::{DecisionCache, Lookup, SharedCache};
use iamproxy::decision::preauth::{Answer, PreauthClient};
use iamproxy::decision::Destination;
use iamproxy::observe::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// A `redis-server` on a free loopback port, killed on drop.
struct Redis(Child, u16);

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis(child, port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pre-authorize backend that answers every request on a connection with the same
/// 200 `{"destination":"iam"}`, as soon as the request's head is in.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = r#"{"destination":"iam"}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.gitlab-workhorse+json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 8192];
                let mut held = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    held.extend_from_slice(&buffer[..n]);
                    // The gateway's calls have no body (Content-Length: 0).
                    while let Some(end) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                        held.drain(..end + 4);
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The bench's config: pre-authorize at `backend`, the shared cache at `redis`. The
/// Workhorse secret is made here and removed once read.
fn config(backend: SocketAddr, redis: u16) -> Config {
    use base64::Engine as _;
    let secret = std::env::temp_dir().join(format!("iamproxy-bench-{}.secret", std::process::id()));
    let bytes: Vec<u8> = (0..32)
        .map(|i| (Instant::now().elapsed().subsec_nanos() as u8) ^ i)
        .collect();
    std::fs::write(
        &secret,
        base64::engine::general_purpose::STANDARD.encode(bytes),
    )
    .unwrap();
    let text = format!(
        "[rails]\nurl = \"http://127.0.0.1:1\"\n[iam]\nurl = \"http://127.0.0.1:1\"\n\
         [preauthorize]\nurl = \"http://{backend}/-/oauth/iam_routing\"\nsecret_file = \"{}\"\n\
         [redis]\nurl = \"redis://127.0.0.1:{redis}/\"\nshared_cache = true\n",
        secret.display()
    );
    let config = Config::from_toml(&text).unwrap();
    let _ = std::fs::remove_file(&secret);
    config
}

fn answer() -> Answer {
    Answer {
        destination: Destination::Iam,
        lifetime: Duration::from_secs(600),
        stale_if_error: Duration::ZERO,
    }
}

/// Times `iterations` runs of `one` (given the iteration's number) inside `runtime`.
fn timed<F, Fut>(runtime: &Runtime, iterations: u64, one: F) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    runtime.block_on(async {
        let started = Instant::now();
        for n in 0..iterations {
            one(n).await;
        }
        started.elapsed()
    })
}

fn levels(c: &mut Criterion) {
    // One thread: a multi-threaded runtime adds cross-thread wake-ups to every level alike
    // (measured: 0.56 / 5.8 / 78 / 125 / 69 µs), and more noise.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = Redis::start();
    let backend = runtime.block_on(backend());
    let config = config(backend, redis.1);
    let metrics = Metrics::new();
    let preauth = PreauthClient::new(
        config.preauthorize.as_ref().unwrap(),
        &config.cache,
        metrics.saturated(iamproxy::forward::client::Upstream::Preauthorize),
    );
    let shared = runtime.block_on(async {
        let shared = SharedCache::start(
            config.redis.as_ref().unwrap(),
            Duration::from_millis(500),
            metrics.shared_cache(),
        )
        .unwrap();
        // Connected in the background: wait until a local miss is answered from Redis.
        let probe = DecisionCache::new(&config.cache).with_shared(Some(shared.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            probe.lookup("probe", async { Ok(answer()) }).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            probe.invalidate("probe").await;
            let found = probe.lookup("probe", async { Ok(answer()) }).await;
            if matches!(found, Lookup::Hit(_)) {
                break;
            }
            assert!(Instant::now() < deadline, "redis never answered");
        }
        shared
    });
    let alone = DecisionCache::new(&config.cache);
    let fleet = DecisionCache::new(&config.cache).with_shared(Some(shared));
    let request_id = HeaderValue::from_static("bench");
    runtime.block_on(async {
        alone.lookup("hot", async { Ok(answer()) }).await;
        fleet.lookup("hot", async { Ok(answer()) }).await;
        // Written to Redis in the background: let it land.
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    let fresh = AtomicU64::new(0);

    let mut group = c.benchmark_group("decision");
    group.bench_function("local_hit", |b| {
        b.iter_custom(|n| {
            timed(&runtime, n, |_| async {
                let found = alone.lookup("hot", async { unreachable!() }).await;
                assert!(matches!(found, Lookup::Hit(_)));
            })
        })
    });
    group.bench_function("local_miss_refilled_without_redis", |b| {
        b.iter_custom(|n| {
            timed(&runtime, n, |_| async {
                alone.invalidate("hot").await;
                alone.lookup("hot", async { Ok(answer()) }).await;
            })
        })
    });
    group.bench_function("local_miss_shared_hit", |b| {
        b.iter_custom(|n| {
            timed(&runtime, n, |_| async {
                fleet.invalidate("hot").await;
                let found = fleet.lookup("hot", async { unreachable!() }).await;
                assert!(matches!(found, Lookup::Hit(_)));
            })
        })
    });
    group.bench_function("local_miss_shared_miss", |b| {
        b.iter_custom(|n| {
            timed(&runtime, n, |_| async {
                let id = format!("new-{}", fresh.fetch_add(1, Ordering::Relaxed));
                let found = fleet.lookup(&id, async { Ok(answer()) }).await;
                assert!(matches!(found, Lookup::Fetched(_)));
            })
        })
    });
    group.bench_function("local_miss_preauthorize_call", |b| {
        b.iter_custom(|n| {
            timed(&runtime, n, |_| async {
                alone.invalidate("hot").await;
                let found = alone
                    .lookup("hot", preauth.ask("hot", &request_id, None))
                    .await;
                assert!(matches!(found, Lookup::Fetched(_)));
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = levels
}
criterion_main!(benches);
