//! The application state every request shares: configuration, upstream clients, the
//! decision cache and the breaker, in one `Arc` and nowhere else.

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
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
    pub metrics: Metrics,
    /// Readiness: false once shutdown has begun.
    pub ready: AtomicBool,
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
    pub breaker: Breaker,
    pub preauth: PreauthClient,
}

impl AppState {
    pub fn new(config: Config) -> AppState {
        let rails = RailsRoute {
            upstream: config.rails.url.clone(),
            timeout: config.rails.timeout,
            client: pooled_client(config.rails.connect_timeout),
        };
        // Config validation guarantees [preauthorize] whenever [iam] is present.
        let iam = config
            .iam
            .as_ref()
            .zip(config.preauthorize.as_ref())
            .map(|(iam, preauth)| IamRoute {
                upstream: iam.url.clone(),
                timeout: iam.timeout,
                fallback_statuses: iam.fallback_statuses.clone(),
                token_prefixes: iam.token_prefixes.clone(),
                client: pooled_client(iam.connect_timeout),
                breaker: Breaker::new(
                    iam.circuit_breaker.consecutive_failures,
                    iam.circuit_breaker.open_for,
                ),
                preauth: PreauthClient::new(preauth, config.cache.ttl),
            });
        AppState {
            routes: RouteTable::new(&config.oauth.paths),
            rails,
            iam,
            cache: DecisionCache::new(&config.cache),
            request_ids: RequestIds::new(),
            metrics: Metrics::new(),
            ready: AtomicBool::new(true),
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
