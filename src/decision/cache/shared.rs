//! The fleet's decision cache in Redis (`redis.shared_cache`), consulted only when this
//! instance's own cache misses: L1 moka, L2 Redis, then pre-authorize. A local hit never
//! reaches this module.
//!
//! Keys, under `redis.key_prefix`:
//! - `generation`: a counter; "forget everything" is one `INCR`, no key scan. Every
//!   lookup reads it inside the same Lua script as the decision, so a bump is seen by the
//!   very next lookup anywhere in the fleet, at no extra round trip.
//! - `decision:<generation>:<client_id>`: `"<destination> <stale-if-error ms>"`, written
//!   with `PX` its lifetime, so Redis expires it; a reader's lifetime is its `PTTL`.
//!   Stale serving stays local: the window travels with the value, but an expired entry
//!   is gone from Redis and each instance serves its own last good answer.
//! - `lock:<generation>:<client_id>`: `"p <token>"` while one instance asks the backend
//!   (`SET NX PX`, taken by the same script that found the miss); `"r <token> <outcome>"`
//!   once it has an answer that may not be kept (`no-store`: `a <destination> <stale
//!   ms>`) or an error (`e`), so the instances waiting on that token share it, as local
//!   waiters share a single flight's, instead of each calling the backend.
//!
//! Redis is never on the failure path: every command gets `redis.timeout`; an error or a
//! timeout is counted, logged once per episode, and the lookup goes on as without a
//! shared cache. After a failure the connection is dropped and remade in the background
//! (tried every 100 ms doubling to 1 s), and until it is, or for a backoff of 250 ms
//! doubling to 4 s while it is up, Redis is skipped (counted as `error`): a hung or dead
//! Redis costs one request a timeout per backoff, not every request.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus::IntCounter;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};
use tokio::time::Instant;

use crate::config::RedisConfig;
use crate::decision::connect::{ConnectError, Connector};
use crate::decision::preauth::{Answer, PreauthError};
use crate::decision::Destination;

/// How a lookup in Redis ended: the `outcome` label of
/// `iamproxy_shared_cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedOutcome {
    Hit,
    Miss,
    /// Redis answered with an error, the connection failed, or Redis was skipped after
    /// an earlier failure.
    Error,
    Timeout,
}

impl SharedOutcome {
    pub const ALL: [SharedOutcome; 4] = [
        SharedOutcome::Hit,
        SharedOutcome::Miss,
        SharedOutcome::Error,
        SharedOutcome::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SharedOutcome::Hit => "hit",
            SharedOutcome::Miss => "miss",
            SharedOutcome::Error => "error",
            SharedOutcome::Timeout => "timeout",
        }
    }
}

/// The counters this module increments, owned by the metrics.
#[derive(Clone)]
pub struct SharedCounters {
    /// By [`SharedOutcome`], in `ALL` order.
    pub lookups: [IntCounter; 4],
    /// Answers written to Redis.
    pub fills: IntCounter,
}

/// What the shared cache made of a local miss.
pub(super) enum Through {
    /// Another instance's answer, from Redis or handed over through the lock; its
    /// lifetime is what Redis has left of it, not yet capped by `cache.ttl`.
    Shared(Answer),
    /// This instance called the backend (as winner of the lock, after waiting in vain, or
    /// because Redis failed).
    Fetched(Result<Answer, PreauthError>),
}

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
enum SharedError {
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply {0:?}")]
    BadReply(Vec<String>),
    /// Skipped: an earlier failure's backoff, or no connection yet.
    #[error("skipped after an earlier failure")]
    Skipped,
}

/// What the lookup script found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Hit(Answer),
    /// This instance holds the lock: it asks the backend.
    Won {
        generation: String,
    },
    /// Another instance holds it.
    Wait {
        holder: String,
    },
    /// The holder we waited for is done, with an answer that may not be kept, or failed.
    Done(Option<Answer>),
}

/// Reads the generation, then the decision; on a miss, takes the lock unless another
/// instance holds it (or reports what the holder we wait for got). One round trip; all
/// keys derive from the generation read inside, which a single Redis (not a cluster)
/// allows. ARGV: prefix, client id, our token, lock lifetime ms, the token we wait for.
const LOOKUP: &str = r"
local gen = redis.call('GET', ARGV[1] .. 'generation') or '0'
local key = ARGV[1] .. 'decision:' .. gen .. ':' .. ARGV[2]
local value = redis.call('GET', key)
if value then
  return {'hit', gen, value, tostring(redis.call('PTTL', key))}
end
local lock = ARGV[1] .. 'lock:' .. gen .. ':' .. ARGV[2]
local held = redis.call('GET', lock)
if held then
  local kind, holder, rest = string.match(held, '^(%a) (%S+) ?(.*)$')
  if kind == 'p' then
    return {'wait', gen, holder}
  end
  if kind == 'r' and holder == ARGV[5] then
    return {'done', gen, rest}
  end
end
redis.call('SET', lock, 'p ' .. ARGV[3], 'PX', ARGV[4])
return {'won', gen}
";

/// The lock holder's answer: written with its lifetime (and the lock released), or, for
/// one that may not be kept, handed to the waiters through the lock. Only while the lock
/// is still ours: an invalidation that landed during the call deleted it, and then the
/// answer is not kept, as in the local cache. ARGV: prefix, client id, generation, token,
/// value, lifetime ms (0: not kept), what the waiters get. Returns 1 when written.
const FILL: &str = r"
local lock = ARGV[1] .. 'lock:' .. ARGV[3] .. ':' .. ARGV[2]
if redis.call('GET', lock) ~= 'p ' .. ARGV[4] then
  return 0
end
if tonumber(ARGV[6]) > 0 then
  redis.call('SET', ARGV[1] .. 'decision:' .. ARGV[3] .. ':' .. ARGV[2], ARGV[5], 'PX', ARGV[6])
  redis.call('DEL', lock)
  return 1
end
redis.call('SET', lock, 'r ' .. ARGV[4] .. ' ' .. ARGV[7], 'KEEPTTL')
return 0
";

/// Deletes one client's decision and lock in the current generation. ARGV: prefix, id.
const FORGET: &str = r"
local gen = redis.call('GET', ARGV[1] .. 'generation') or '0'
return redis.call('DEL', ARGV[1] .. 'decision:' .. gen .. ':' .. ARGV[2])
  + 0 * redis.call('DEL', ARGV[1] .. 'lock:' .. gen .. ':' .. ARGV[2])
";

/// Backoff after a failure: Redis is skipped for this long, doubling to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(4));
/// Between attempts to remake the connection: doubling to the second. A refused connect
/// costs nothing, so Redis coming back is noticed within a second.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));
/// How often a waiter looks for the holder's answer: doubling from the first to the last.
const POLL: (Duration, Duration) = (Duration::from_millis(2), Duration::from_millis(20));

pub struct SharedCache {
    link: Arc<Link>,
    prefix: String,
    timeout: Duration,
    /// How long a waiter waits for the lock holder: `preauthorize.timeout`, which bounds
    /// the holder's call (reloadable, so kept here rather than in the immutable config).
    lock_wait_ms: AtomicU64,
    counters: SharedCounters,
    /// Makes each lock token unique in the fleet.
    token_seed: u64,
    tokens: AtomicU64,
    scripts: [Script; 3],
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The connection, and whether Redis is usable now; shared with the reconnect task,
/// which ends once the cache is dropped.
struct Link {
    connector: Connector,
    connection: ArcSwapOption<MultiplexedConnection>,
    /// Process clock origin for the atomics below.
    origin: Instant,
    /// Milliseconds after `origin` before which Redis is skipped.
    skip_until_ms: AtomicU64,
    backoff_ms: AtomicU64,
    /// In a failure episode: logged at its start, and at its end.
    failing: AtomicBool,
    /// A reconnect task is running.
    connecting: AtomicBool,
}

impl SharedCache {
    /// The shared cache for `config`; connects in the background (lookups meanwhile go
    /// straight to the backend, counted as `error`).
    pub fn start(
        config: &RedisConfig,
        lock_wait: Duration,
        counters: SharedCounters,
    ) -> Result<Arc<SharedCache>, RedisError> {
        let shared = Arc::new(SharedCache {
            link: Arc::new(Link {
                connector: Connector::new(config)?,
                connection: ArcSwapOption::empty(),
                origin: Instant::now(),
                skip_until_ms: AtomicU64::new(0),
                backoff_ms: AtomicU64::new(millis(BACKOFF.0)),
                failing: AtomicBool::new(false),
                connecting: AtomicBool::new(false),
            }),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            lock_wait_ms: AtomicU64::new(millis(lock_wait)),
            counters,
            token_seed: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
            tokens: AtomicU64::new(0),
            scripts: [Script::new(LOOKUP), Script::new(FILL), Script::new(FORGET)],
        });
        // Outside a runtime (a config check), the first lookup connects.
        reconnect(&shared.link);
        Ok(shared)
    }

    /// `preauthorize.timeout` after a reload.
    pub fn set_lock_wait(&self, lock_wait: Duration) {
        self.lock_wait_ms
            .store(millis(lock_wait), Ordering::Relaxed);
    }

    fn lock_wait(&self) -> Duration {
        Duration::from_millis(self.lock_wait_ms.load(Ordering::Relaxed))
    }

    /// L2 and the lock around `fetch`: a Redis hit answers; on a miss, the instance that
    /// takes the lock calls `fetch` and shares the answer, the others wait for it for up
    /// to `preauthorize.timeout`, then call `fetch` themselves. Any Redis failure: `fetch`.
    pub(super) async fn through<F>(self: &Arc<Self>, client_id: &str, fetch: F) -> Through
    where
        F: Future<Output = Result<Answer, PreauthError>>,
    {
        let token = self.token();
        let first = self.lookup(client_id, &token, "").await;
        self.count(match &first {
            Ok(Found::Hit(_)) => SharedOutcome::Hit,
            Ok(_) => SharedOutcome::Miss,
            Err(SharedError::Timeout(_)) => SharedOutcome::Timeout,
            Err(_) => SharedOutcome::Error,
        });
        let found = match first {
            Ok(Found::Wait { holder }) => self.wait(client_id, &token, holder).await,
            other => other.ok(),
        };
        match found {
            Some(Found::Hit(answer) | Found::Done(Some(answer))) => Through::Shared(answer),
            Some(Found::Won { generation }) => {
                let answer = fetch.await;
                self.fill(client_id, generation, token, &answer);
                Through::Fetched(answer)
            }
            // A failed holder, no answer in time, or Redis failed: ask ourselves.
            Some(Found::Done(None) | Found::Wait { .. }) | None => Through::Fetched(fetch.await),
        }
    }

    /// Polls for the holder's answer until `preauthorize.timeout` has passed; `None` when
    /// none came or Redis failed meanwhile. Taking over a lock its holder left also ends
    /// the wait.
    async fn wait(&self, client_id: &str, token: &str, mut holder: String) -> Option<Found> {
        let polls = async {
            let mut every = POLL.0;
            loop {
                tokio::time::sleep(every).await;
                every = (every * 2).min(POLL.1);
                match self.lookup(client_id, token, &holder).await.ok()? {
                    Found::Wait { holder: next } => holder = next,
                    found => return Some(found),
                }
            }
        };
        tokio::time::timeout(self.lock_wait(), polls)
            .await
            .ok()
            .flatten()
    }

    async fn lookup(
        &self,
        client_id: &str,
        token: &str,
        waited: &str,
    ) -> Result<Found, SharedError> {
        let lock_ms = millis(self.lock_wait() + self.timeout);
        let reply: Vec<String> = self
            .run(|mut connection, scripts| async move {
                scripts[0]
                    .arg(&self.prefix)
                    .arg(client_id)
                    .arg(token)
                    .arg(lock_ms)
                    .arg(waited)
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        parse_found(&reply).ok_or(SharedError::BadReply(reply))
    }

    /// Hands the lock holder's answer on, in the background: the request that made the
    /// call does not wait for Redis a second time.
    fn fill(
        self: &Arc<Self>,
        client_id: &str,
        generation: String,
        token: String,
        answer: &Result<Answer, PreauthError>,
    ) {
        let (value, lifetime_ms, handed) = match answer {
            Ok(answer) if !answer.lifetime.is_zero() => {
                (encode(answer), millis(answer.lifetime), String::new())
            }
            Ok(answer) => (String::new(), 0, format!("a {}", encode(answer))),
            Err(_) => (String::new(), 0, "e".to_owned()),
        };
        let (shared, client_id) = (self.clone(), client_id.to_owned());
        tokio::spawn(async move {
            let cache: &SharedCache = &shared;
            let written: Result<i64, _> = cache
                .run(|mut connection, scripts| async move {
                    scripts[1]
                        .arg(&cache.prefix)
                        .arg(&client_id)
                        .arg(&generation)
                        .arg(&token)
                        .arg(&value)
                        .arg(lifetime_ms)
                        .arg(&handed)
                        .invoke_async(&mut connection)
                        .await
                })
                .await;
            if written.is_ok_and(|written| written == 1) {
                shared.counters.fills.inc();
            }
        });
    }

    /// Deletes `client_id`'s shared decision (and a lock in flight, so that call's answer
    /// is not kept); whether there was one.
    pub async fn forget(&self, client_id: &str) -> Result<bool, String> {
        let deleted: i64 = self
            .run(|mut connection, scripts| async move {
                scripts[2]
                    .arg(&self.prefix)
                    .arg(client_id)
                    .invoke_async(&mut connection)
                    .await
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(deleted > 0)
    }

    /// Forgets every shared decision: one `INCR` of the generation. Returns the new one.
    pub async fn forget_all(&self) -> Result<i64, String> {
        let key = format!("{}generation", self.prefix);
        self.run(|mut connection, _| async move {
            redis::cmd("INCR")
                .arg(&key)
                .query_async(&mut connection)
                .await
        })
        .await
        .map_err(|e| e.to_string())
    }

    /// Runs `command` on the connection within `redis.timeout`, minding the health.
    async fn run<'a, T, C, F>(&'a self, command: C) -> Result<T, SharedError>
    where
        C: FnOnce(MultiplexedConnection, &'a [Script; 3]) -> F,
        F: Future<Output = Result<T, RedisError>>,
    {
        let connection = self.link.connection()?;
        let result =
            match tokio::time::timeout(self.timeout, command(connection, &self.scripts)).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => Err(SharedError::Redis(error)),
                Err(_) => Err(SharedError::Timeout(self.timeout)),
            };
        match &result {
            Ok(_) => self.link.succeeded(),
            Err(error) => failed(&self.link, error),
        }
        result
    }

    fn token(&self) -> String {
        let n = self.tokens.fetch_add(1, Ordering::Relaxed);
        format!("{:x}.{n:x}", self.token_seed)
    }

    fn count(&self, outcome: SharedOutcome) {
        self.counters.lookups[outcome as usize].inc();
    }
}

impl Link {
    fn now_ms(&self) -> u64 {
        millis(Instant::now().saturating_duration_since(self.origin))
    }

    /// The connection, unless Redis is being skipped or none is made yet.
    fn connection(self: &Arc<Self>) -> Result<MultiplexedConnection, SharedError> {
        if self.now_ms() < self.skip_until_ms.load(Ordering::Acquire) {
            return Err(SharedError::Skipped);
        }
        match self.connection.load_full() {
            Some(connection) => Ok((*connection).clone()),
            None => {
                reconnect(self);
                Err(SharedError::Skipped)
            }
        }
    }

    fn succeeded(&self) {
        self.backoff_ms.store(millis(BACKOFF.0), Ordering::Relaxed);
        if self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("redis answers again: shared decision cache resumed");
        }
    }

    /// Logs the start of a failure episode, once.
    fn episode(&self, error: &dyn std::fmt::Display) {
        if !self.failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error = %error,
                "redis unavailable: shared decision cache bypassed, decisions come from the local cache and the pre-authorize backend"
            );
        }
    }
}

/// Skips Redis for the backoff, and remakes the connection in the background: a dead one
/// would fail every command, a hung one time out on each, and after a Sentinel failover
/// the master is elsewhere.
fn failed(link: &Arc<Link>, error: &SharedError) {
    let backoff = link.backoff_ms.load(Ordering::Relaxed);
    link.backoff_ms
        .store((backoff * 2).min(millis(BACKOFF.1)), Ordering::Relaxed);
    link.skip_until_ms
        .store(link.now_ms() + backoff, Ordering::Release);
    link.episode(error);
    link.connection.store(None);
    reconnect(link);
}

/// Makes a new connection in the background, unless that is under way, retrying with the
/// backoff until one is made; Redis is used again from then on.
fn reconnect(link: &Arc<Link>) {
    if link.connecting.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Outside a runtime (a config check): the first lookup in one connects.
        link.connecting.store(false, Ordering::Release);
        return;
    };
    let weak = Arc::downgrade(link);
    runtime.spawn(async move {
        let mut backoff = RECONNECT.0;
        loop {
            let Some(link) = weak.upgrade() else { return };
            match link.connector.multiplexed().await {
                Ok(connection) => {
                    link.connection.store(Some(Arc::new(connection)));
                    link.skip_until_ms.store(0, Ordering::Release);
                    link.connecting.store(false, Ordering::Release);
                    return;
                }
                Err(error) => link.episode(&error),
            }
            drop(link);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT.1);
        }
    });
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `"<destination> <stale-if-error ms>"`.
fn encode(answer: &Answer) -> String {
    format!(
        "{} {}",
        answer.destination.as_str(),
        millis(answer.stale_if_error)
    )
}

/// An answer from [`encode`]'s text and the lifetime Redis has left of it.
fn decode(value: &str, lifetime: Duration) -> Option<Answer> {
    let (destination, stale) = value.split_once(' ')?;
    let destination = match destination {
        "iam" => Destination::Iam,
        "rails" => Destination::Rails,
        _ => return None,
    };
    Some(Answer {
        destination,
        lifetime,
        stale_if_error: Duration::from_millis(stale.parse().ok()?),
    })
}

/// Reads the lookup script's reply.
fn parse_found(reply: &[String]) -> Option<Found> {
    match reply {
        [kind, _, value, pttl] if kind == "hit" => {
            // -1: written without a lifetime by someone else; `cache.ttl` caps it.
            let pttl: i64 = pttl.parse().ok()?;
            let lifetime = u64::try_from(pttl).map_or(Duration::MAX, Duration::from_millis);
            decode(value, lifetime).map(Found::Hit)
        }
        [kind, generation] if kind == "won" => Some(Found::Won {
            generation: generation.clone(),
        }),
        [kind, _, holder] if kind == "wait" => Some(Found::Wait {
            holder: holder.clone(),
        }),
        [kind, _, handed] if kind == "done" => Some(Found::Done(match handed.strip_prefix("a ") {
            Some(value) => Some(decode(value, Duration::ZERO)?),
            None => None,
        })),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
