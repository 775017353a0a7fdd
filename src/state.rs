//! The application state every request shares: configuration, upstream clients, the
//! decision cache and the breaker, in one `Arc` and nowhere else.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;

use crate::cache::DecisionCache;
use crate::classify::RouteTable;
use crate::config::{Config, Upstream};
use crate::fallback::Breaker;
use crate::forward::{pooled_client, HttpClient};
use crate::headers::RequestIds;
use crate::metrics::Metrics;
use crate::preauth::PreauthClient;

#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub routes: RouteTable,
    pub rails: RailsRoute,
    /// `None` when no `[iam]` table is configured: every request goes to Rails.
    pub iam: Option<IamRoute>,
    pub cache: DecisionCache,
    pub request_ids: RequestIds,
    /// Outlives reloads: counters keep counting across them.
    pub metrics: Arc<Metrics>,
}

#[derive(Debug)]
pub struct RailsRoute {
    pub upstream: Upstream,
    pub timeout: Duration,
    pub client: HttpClient,
}

#[derive(Debug)]
pub struct IamRoute {
    pub upstream: Upstream,
    pub timeout: Duration,
    pub fallback_statuses: Vec<StatusCode>,
    pub token_prefixes: Vec<String>,
    pub client: HttpClient,
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
        let rails = RailsRoute {
            upstream: config.rails.url.clone(),
            timeout: config.rails.timeout,
            client: pooled_client(config.rails.connect_timeout, &config.rails.url.tls),
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
                        old.url.uri == iam.url.uri && old.circuit_breaker == iam.circuit_breaker
                    })
                    .map(|(_, route)| route.breaker.clone());
                IamRoute {
                    upstream: iam.url.clone(),
                    timeout: iam.timeout,
                    fallback_statuses: iam.fallback_statuses.clone(),
                    token_prefixes: iam.token_prefixes.clone(),
                    client: pooled_client(iam.connect_timeout, &iam.url.tls),
                    breaker: same_breaker.unwrap_or_else(|| {
                        Arc::new(Breaker::new(
                            iam.circuit_breaker.consecutive_failures,
                            iam.circuit_breaker.open_for,
                        ))
                    }),
                    preauth: PreauthClient::new(preauth, &config.cache),
                }
            });
        let cache = previous
            .filter(|previous| previous.config.cache == config.cache)
            .map_or_else(
                || DecisionCache::new(&config.cache),
                |previous| previous.cache.clone(),
            );
        AppState {
            routes: RouteTable::new(&config.oauth.paths),
            rails,
            iam,
            cache,
            request_ids: RequestIds::new(),
            metrics: previous.map_or_else(Arc::default, |previous| previous.metrics.clone()),
            config,
        }
    }

    /// The `/metrics` exposition, with the cache and breaker gauges read now.
    pub async fn render_metrics(&self) -> Vec<u8> {
        let entries = self.cache.settled_entry_count().await;
        let breaker = self.iam.as_ref().map(|iam| iam.breaker.state());
        self.metrics.render(entries, breaker)
    }

    /// Whether a peer's `X-Forwarded-For` and `X-Request-Id` are believed.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.config
            .server
            .trusted_cidrs
            .iter()
            .any(|cidr| cidr.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Lookup;
    use crate::decision::Destination;
    use crate::preauth::Answer;

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
}
