//! The state every request shares — configuration, upstream clients, the decision cache,
//! the breaker, the metrics — in one `Arc` ([`AppState`]); the live holder a reload swaps
//! it in ([`Live`]); and the reload itself ([`Reloader`]).

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::StatusCode;

use crate::classify::Endpoints;
use crate::config::{Config, LogConfig, RedisConfig, ServerConfig, UpstreamUrl};
use crate::decision::cache::{DecisionCache, SharedCache};
use crate::decision::preauth::PreauthClient;
use crate::forward::breaker::Breaker;
use crate::forward::client::{Pool, PoolLimits, Upstream};
use crate::forward::headers::RequestIds;
use crate::observe::logging::LogLevel;
use crate::observe::metrics::{Metrics, ReloadResult};
use crate::observe::trace::Tracer;
use crate::proxy::buffer::Budget;

#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    /// The OAuth paths and their endpoints.
    pub endpoints: Endpoints,
    pub rails: RailsUpstream,
    /// `None` when no `[iam]` table is configured: every request goes to Rails.
    pub iam: Option<IamUpstream>,
    pub cache: DecisionCache,
    pub request_ids: RequestIds,
    /// Outlives reloads: counters keep counting across them.
    pub metrics: Arc<Metrics>,
    /// OAuth bodies buffered now; outlives reloads, as the bodies do.
    pub buffered: Arc<Budget>,
    /// `[tracing]`: trace contexts and spans; its exporter outlives reloads.
    pub tracer: Tracer,
}

/// Rails and how to reach it.
#[derive(Debug)]
pub struct RailsUpstream {
    pub url: UpstreamUrl,
    pub timeout: Duration,
    pub pool: Pool,
}

/// IAM, how to reach it, and the pre-authorize backend that decides who goes there.
#[derive(Debug)]
pub struct IamUpstream {
    pub url: UpstreamUrl,
    pub timeout: Duration,
    pub fallback_statuses: Vec<StatusCode>,
    pub token_prefixes: Vec<String>,
    pub pool: Pool,
    /// Kept across a reload that leaves IAM's URL and breaker settings alone.
    pub breaker: Arc<Breaker>,
    pub preauth: PreauthClient,
}

impl AppState {
    pub fn new(config: Config) -> AppState {
        AppState::build(config, None)
    }

    /// The state for a reloaded `config`. The metrics carry over; so do the cached
    /// decisions when the `[cache]` settings are unchanged, and the breaker (with its
    /// failure count) when IAM's URL and breaker settings are. Upstream connection pools
    /// are new: requests in flight finish on the old ones.
    pub fn reloaded(&self, config: Config) -> AppState {
        AppState::build(config, Some(self))
    }

    fn build(config: Config, previous: Option<&AppState>) -> AppState {
        let metrics = previous.map_or_else(Arc::default, |previous| previous.metrics.clone());
        let rails = RailsUpstream {
            url: config.rails.url.clone(),
            timeout: config.rails.timeout,
            pool: Pool::new(
                &config.rails.url.address,
                &config.rails.url.tls,
                PoolLimits {
                    connect_timeout: config.rails.connect_timeout,
                    max_connections: config.rails.max_connections,
                    saturated: metrics.saturated(Upstream::Rails),
                },
            ),
        };
        // Config validation guarantees [preauthorize] whenever [iam] is present.
        let iam = config
            .iam
            .as_ref()
            .zip(config.preauthorize.as_ref())
            .map(|(iam, preauth)| {
                let same_breaker = previous
                    .and_then(|previous| previous.config.iam.as_ref().zip(previous.iam.as_ref()))
                    .filter(|(old, _)| {
                        old.url.address == iam.url.address
                            && old.circuit_breaker == iam.circuit_breaker
                    })
                    .map(|(_, route)| route.breaker.clone());
                IamUpstream {
                    url: iam.url.clone(),
                    timeout: iam.timeout,
                    fallback_statuses: iam.fallback_statuses.clone(),
                    token_prefixes: iam.token_prefixes.clone(),
                    pool: Pool::new(
                        &iam.url.address,
                        &iam.url.tls,
                        PoolLimits {
                            connect_timeout: iam.connect_timeout,
                            max_connections: iam.max_connections,
                            saturated: metrics.saturated(Upstream::Iam),
                        },
                    ),
                    breaker: same_breaker.unwrap_or_else(|| {
                        Arc::new(Breaker::new(
                            iam.circuit_breaker.consecutive_failures,
                            iam.circuit_breaker.open_for,
                        ))
                    }),
                    preauth: PreauthClient::new(
                        preauth,
                        &config.cache,
                        metrics.saturated(Upstream::Preauthorize),
                    ),
                }
            });
        let shared = shared_cache(&config, previous, &metrics);
        let cache = previous
            .filter(|previous| previous.config.cache == config.cache)
            .map_or_else(
                || DecisionCache::new(&config.cache).with_shared(shared),
                |previous| previous.cache.clone(),
            );
        let tracer = Tracer::new(
            config.tracing.as_ref(),
            previous.map(|previous| &previous.tracer),
            || metrics.tracing(),
        );
        AppState {
            endpoints: Endpoints::new(&config.oauth.paths),
            rails,
            iam,
            cache,
            request_ids: RequestIds::new(),
            metrics,
            buffered: previous.map_or_else(Arc::default, |previous| previous.buffered.clone()),
            tracer,
            config,
        }
    }

    /// The `/metrics` exposition, with the cache and breaker gauges read now.
    pub async fn render_metrics(&self) -> Vec<u8> {
        let entries = self.cache.settled_entry_count().await;
        let breaker = self.iam.as_ref().map(|iam| iam.breaker.state());
        self.metrics.render(entries, breaker)
    }

    /// Whether a peer's `X-Forwarded-For` and other forwarding headers are believed.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.config
            .server
            .trusted_cidrs
            .iter()
            .any(|cidr| cidr.contains(ip))
    }

    /// Whether a peer's `X-Request-Id` is kept as the correlation id
    /// (`server.trusted_cidrs_for_propagation`).
    pub fn propagates_request_id(&self, ip: IpAddr) -> bool {
        self.config
            .server
            .trusted_cidrs_for_propagation
            .iter()
            .any(|cidr| cidr.contains(ip))
    }
}

/// The fleet's decision cache in Redis: started with the gateway when `redis.shared_cache`
/// is on (and IAM, without which nothing is decided), then kept, connection and all, as
/// `[redis]` needs a restart; a reload only passes on `preauthorize.timeout`, how long a
/// waiter waits for another instance's call.
fn shared_cache(
    config: &Config,
    previous: Option<&AppState>,
    metrics: &Metrics,
) -> Option<Arc<SharedCache>> {
    let lock_wait = config.preauthorize.as_ref()?.timeout;
    let shared = match previous {
        Some(previous) => previous.cache.shared().cloned()?,
        None => {
            let redis = config.redis.as_ref().filter(|redis| redis.shared_cache)?;
            config.iam.as_ref()?;
            match SharedCache::start(redis, lock_wait, metrics.shared_cache()) {
                Ok(shared) => shared,
                Err(error) => {
                    tracing::warn!(%error, "redis: shared decision cache not started");
                    return None;
                }
            }
        }
    };
    shared.set_lock_wait(lock_wait);
    Some(shared)
}

/// What every request reads first: the current state, swapped whole by a reload, so a
/// request sees one configuration from start to end.
pub struct Live {
    state: ArcSwap<AppState>,
    /// Readiness: false once shutdown has begun.
    ready: AtomicBool,
}

impl Live {
    pub fn new(state: AppState) -> Live {
        Live {
            state: ArcSwap::from_pointee(state),
            ready: AtomicBool::new(true),
        }
    }

    pub fn current(&self) -> Arc<AppState> {
        self.state.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Readiness turns 503 from now on.
    pub fn shutting_down(&self) {
        self.ready.store(false, Ordering::Release);
    }
}

/// Swaps a new configuration into a serving gateway.
#[derive(Clone)]
pub struct Reloader {
    live: Arc<Live>,
    /// What the listeners were started with.
    started: ServerConfig,
    /// What the Redis subscription was started with.
    redis: Option<RedisConfig>,
    /// The process's logs, when this gateway owns them: their level reloads, their format
    /// and static fields do not.
    log: Option<(LogLevel, LogConfig)>,
}

impl Reloader {
    pub fn new(live: Arc<Live>, started: ServerConfig, redis: Option<RedisConfig>) -> Reloader {
        Reloader {
            live,
            started,
            redis,
            log: None,
        }
    }

    /// Also applies `log.level` to the process's logs, started with `started`'s format and
    /// fields.
    pub fn with_logs(mut self, level: LogLevel, started: &LogConfig) -> Reloader {
        self.log = Some((level, started.clone()));
        self
    }

    /// Re-reads the configuration file at `path` and swaps it in (SIGHUP does this): an
    /// invalid file is logged with its key and reason, and the running configuration
    /// stays. Either way the reload is counted in the metrics.
    pub fn reload(&self, path: &Path) -> ReloadResult {
        let result = match Config::load(path) {
            Ok(config) => {
                for key in self.apply(config) {
                    tracing::warn!(
                        key,
                        "config reload: this key keeps its old value until a restart"
                    );
                }
                tracing::info!(path = %path.display(), "config reloaded");
                ReloadResult::Success
            }
            Err(error) => {
                tracing::error!(
                    path = %path.display(),
                    error = %error,
                    "config reload failed: the running configuration stays"
                );
                ReloadResult::Failure
            }
        };
        self.live.current().metrics.config_reload(result);
        result
    }

    /// Swaps `config` in: requests that start from now on use it, requests in flight
    /// finish with the one they started with, and no connection is dropped. Settings the
    /// listeners were built with cannot change without a restart; their keys are
    /// returned, and they keep their old values.
    pub fn apply(&self, config: Config) -> Vec<&'static str> {
        let mut needs_restart = listener_changes(&self.started, &config.server);
        if self.redis != config.redis {
            needs_restart.push("redis");
        }
        if let Some((level, started)) = &self.log {
            level.set(config.log.level);
            if started.format != config.log.format {
                needs_restart.push("log.format");
            }
            if started.fields != config.log.fields {
                needs_restart.push("log.fields");
            }
        }
        let next = self.live.current().reloaded(config);
        self.live.state.store(Arc::new(next));
        needs_restart
    }
}

/// The keys whose values the listeners were built with and so keep until a restart.
fn listener_changes(started: &ServerConfig, new: &ServerConfig) -> Vec<&'static str> {
    [
        ("server.listen", started.listen != new.listen),
        (
            "server.admin_listen",
            started.admin_listen != new.admin_listen,
        ),
        ("server.socket_mode", started.socket_mode != new.socket_mode),
        ("server.tls", started.tls.is_some() != new.tls.is_some()),
        (
            "server.max_connections",
            started.max_connections != new.max_connections,
        ),
        (
            "server.max_header_bytes",
            started.max_header_bytes != new.max_header_bytes,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::cache::Lookup;
    use crate::decision::preauth::Answer;
    use crate::decision::Destination;

    fn config(cache_ttl: &str) -> Config {
        Config::from_toml(&format!(
            "[rails]\nurl = \"http://127.0.0.1:1\"\n[cache]\nttl = \"{cache_ttl}\"\n"
        ))
        .unwrap()
    }

    async fn cached(state: &AppState) -> bool {
        let fetch = async {
            Ok(Answer {
                destination: Destination::Iam,
                lifetime: Duration::from_secs(60),
                stale_if_error: Duration::ZERO,
            })
        };
        matches!(state.cache.lookup("app", fetch).await, Lookup::Hit(_))
    }

    #[tokio::test]
    async fn a_reload_keeps_metrics_always_and_decisions_while_cache_settings_stay() {
        let state = AppState::new(config("60s"));
        assert!(!cached(&state).await, "first lookup fetches");

        let same = state.reloaded(config("60s"));
        assert!(Arc::ptr_eq(&state.metrics, &same.metrics));
        assert!(cached(&same).await, "unchanged [cache]: decisions kept");

        let changed = same.reloaded(config("30s"));
        assert!(Arc::ptr_eq(&state.metrics, &changed.metrics));
        assert!(!cached(&changed).await, "changed [cache]: a new cache");
    }

    fn server(extra: &str) -> ServerConfig {
        Config::from_toml(&format!(
            "[server]\n{extra}\n[rails]\nurl = \"http://127.0.0.1:1\"\n"
        ))
        .unwrap()
        .server
    }

    #[test]
    fn only_listener_bound_keys_are_reported_as_needing_a_restart() {
        let started = server("");
        assert!(listener_changes(&started, &server("max_body_bytes = 10")).is_empty());
        let changed = server("listen = \"127.0.0.1:1\"\nmax_connections = 5");
        assert_eq!(
            listener_changes(&started, &changed),
            ["server.listen", "server.max_connections"]
        );
        let socket = server("listen = \"unix:/run/iamproxy.sock\"\nsocket_mode = \"0600\"");
        assert_eq!(
            listener_changes(&started, &socket),
            ["server.listen", "server.socket_mode"]
        );
    }
}
