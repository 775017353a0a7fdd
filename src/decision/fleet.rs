//! Fleet-wide invalidation through Redis pub/sub. Each instance subscribes to
//! `redis.channel`; a message `{"client_id": "…"}` forgets that client's cached decision,
//! `{"all": true}` every one. Redis is never on the request path: while it is down the
//! gateway serves as usual, logs, and reconnects with backoff; on reconnecting it drops its
//! whole cache, since it may have missed messages.
//!
//! With the shared cache in Redis, the admin API forgets there itself and says so in its
//! message (`"redis_done": true`); a message without it, e.g. Rails' after a flag change,
//! is applied to Redis by each instance that gets it (a `DEL`, or an `INCR` of the
//! generation for `{"all": true}`), so the fleet does not read the old answer back.

use std::time::Duration;

use serde::Deserialize;

use crate::config::RedisConfig;
use crate::decision::cache::DecisionCache;
use crate::decision::connect::{ConnectError, Connector};

/// A message on the channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Invalidation {
    One {
        client_id: String,
        /// The sender forgot it in the shared cache already.
        #[serde(default)]
        redis_done: bool,
    },
    All {
        all: bool,
        #[serde(default)]
        redis_done: bool,
    },
}

impl Invalidation {
    /// Reads a message from the channel: `{"client_id": "…"}` or `{"all": true}`; anything
    /// else is not an invalidation.
    pub fn parse(payload: &[u8]) -> Option<Invalidation> {
        match serde_json::from_slice(payload).ok()? {
            Invalidation::All { all: false, .. } => None,
            invalidation => Some(invalidation),
        }
    }

    pub fn to_json(&self) -> String {
        let (mut json, redis_done) = match self {
            Invalidation::One {
                client_id,
                redis_done,
            } => (serde_json::json!({ "client_id": client_id }), *redis_done),
            Invalidation::All { redis_done, .. } => {
                (serde_json::json!({ "all": true }), *redis_done)
            }
        };
        if redis_done {
            json["redis_done"] = serde_json::Value::Bool(true);
        }
        json.to_string()
    }
}

/// Backoff between reconnects: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// Subscribing and publishing each get this long (connecting: its own as long).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Why talking to Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("no answer within {REDIS_TIMEOUT:?}")]
    Timeout,
}

/// Subscribes for as long as the returned task runs (abort it at shutdown). Each message
/// applies to the cache `current` gives at that moment: a reload may have replaced it.
pub fn subscribe<C>(config: RedisConfig, current: C) -> tokio::task::JoinHandle<()>
where
    C: Fn() -> DecisionCache + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut backoff = BACKOFF.0;
        let mut connected_before = false;
        let connector = match Connector::new(&config) {
            Ok(connector) => connector,
            Err(error) => {
                tracing::warn!(%error, "redis: fleet invalidation not started");
                return;
            }
        };
        loop {
            match listen(
                &current,
                &config,
                &connector,
                &mut connected_before,
                &mut backoff,
            )
            .await
            {
                Ok(()) => tracing::warn!("redis closed the subscription, reconnecting"),
                Err(error) => tracing::warn!(
                    error = %error,
                    retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "redis unavailable, fleet invalidation paused"
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    })
}

/// One subscription, until the connection ends.
async fn listen(
    current: &impl Fn() -> DecisionCache,
    config: &RedisConfig,
    connector: &Connector,
    connected_before: &mut bool,
    backoff: &mut Duration,
) -> Result<(), FleetError> {
    let mut pubsub = connector.pubsub().await?;
    tokio::time::timeout(REDIS_TIMEOUT, pubsub.subscribe(&config.channel))
        .await
        .map_err(|_| FleetError::Timeout)??;
    *backoff = BACKOFF.0;
    if std::mem::replace(connected_before, true) {
        let dropped = current().invalidate_all().await;
        tracing::info!(dropped, "redis reconnected: cached decisions dropped");
    } else {
        tracing::info!(channel = config.channel.as_str(), "redis subscribed");
    }
    let mut messages = std::pin::pin!(pubsub.on_message());
    while let Some(message) =
        std::future::poll_fn(|cx| futures_core::Stream::poll_next(messages.as_mut(), cx)).await
    {
        let payload: Vec<u8> = message.get_payload_bytes().to_vec();
        apply(&current(), &payload).await;
    }
    Ok(())
}

async fn apply(cache: &DecisionCache, payload: &[u8]) {
    let shared = cache.shared();
    match Invalidation::parse(payload) {
        Some(Invalidation::One {
            client_id,
            redis_done,
        }) => {
            // Redis first: a miss in between would read the old answer back.
            if let (Some(shared), false) = (shared, redis_done) {
                if let Err(error) = shared.forget(&client_id).await {
                    tracing::warn!(%error, "redis: could not forget the shared decision");
                }
            }
            let invalidated = cache.invalidate(&client_id).await;
            tracing::info!(
                client_id = client_id.as_str(),
                invalidated,
                "redis: decision invalidated"
            );
        }
        Some(Invalidation::All { redis_done, .. }) => {
            // Each instance that gets a bare message bumps the generation once: a few
            // bumps in a row forget nothing more than one.
            if let (Some(shared), false) = (shared, redis_done) {
                if let Err(error) = shared.forget_all().await {
                    tracing::warn!(%error, "redis: could not forget the shared decisions");
                }
            }
            let invalidated = cache.invalidate_all().await;
            tracing::info!(invalidated, "redis: every decision invalidated");
        }
        None => tracing::warn!(
            bytes = payload.len(),
            "redis: ignored a message that is neither {{\"client_id\": …}} nor {{\"all\": true}}"
        ),
    }
}

/// Publishes `invalidation` to the fleet; whether Redis took it.
pub async fn publish(config: &RedisConfig, invalidation: &Invalidation) -> Result<(), FleetError> {
    let connector = Connector::new(config)?;
    let mut connection = connector.multiplexed().await?;
    tokio::time::timeout(
        REDIS_TIMEOUT,
        redis::cmd("PUBLISH")
            .arg(&config.channel)
            .arg(invalidation.to_json())
            .query_async::<i64>(&mut connection),
    )
    .await
    .map_err(|_| FleetError::Timeout)??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_round_trip() {
        let one = Invalidation::parse(br#"{"client_id": "app"}"#).unwrap();
        assert_eq!(
            one,
            Invalidation::One {
                client_id: "app".into(),
                redis_done: false,
            }
        );
        let all = Invalidation::parse(br#"{"all": true}"#).unwrap();
        assert_eq!(
            all,
            Invalidation::All {
                all: true,
                redis_done: false
            }
        );
        let done = Invalidation::parse(br#"{"all": true, "redis_done": true}"#).unwrap();
        assert_eq!(
            done,
            Invalidation::All {
                all: true,
                redis_done: true
            }
        );
        let one_done = Invalidation::One {
            client_id: "app".into(),
            redis_done: true,
        };
        assert_eq!(
            one_done.to_json(),
            r#"{"client_id":"app","redis_done":true}"#
        );
        for message in [one, all, done, one_done] {
            let back = Invalidation::parse(message.to_json().as_bytes()).unwrap();
            assert_eq!(back, message);
        }
        for other in [
            &br#"{"client": "x"}"#[..],
            br#"{"all": false}"#,
            b"[]",
            b"\xff",
        ] {
            assert_eq!(Invalidation::parse(other), None, "{other:?}");
        }
    }
}
