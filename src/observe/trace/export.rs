//! Spans to the collector: a bounded queue the request path never waits on, and one task
//! that sends what it holds in batches over OTLP/HTTP (protobuf), one batch at a time, and
//! everything it holds when the gateway shuts down ([`Exporter::flush`]).
//!
//! A full queue drops the span and counts it (`reason="queue_full"`); a batch the collector
//! does not take (down, slow, an error status) is dropped and counted too
//! (`reason="export_failed"`). A collector going down is logged once, and once more when it
//! takes spans again: one warning per episode, not one per batch.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Uri};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prometheus::IntCounter;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Collector, StaticHeaders, TracingConfig};
use crate::forward::client::{Pool, PoolLimits};
use crate::forward::error_chain;

/// Spans waiting at most: about a second of a busy gateway's sampled traffic.
const QUEUE_SPANS: usize = 4096;
/// Spans in one export request at most.
const BATCH_SPANS: usize = 512;
/// How long the first span of a batch waits for others: the longer, the fewer export
/// requests a sampled span shares (OpenTelemetry's SDKs wait 5 s).
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Connections to the collector: batches go one at a time.
const CONNECTIONS: usize = 2;
/// The collector's answer is an `ExportTraceServiceResponse`: a few bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the exporter counts, registered by [`crate::observe::metrics::Metrics`].
#[derive(Debug, Clone)]
pub struct ExportCounters {
    pub exported: IntCounter,
    pub dropped_queue_full: IntCounter,
    pub dropped_export_failed: IntCounter,
}

/// The sending end; cheap to share. The task ends once every `Exporter` is gone and the
/// queue is empty.
#[derive(Debug)]
pub struct Exporter {
    spans: mpsc::Sender<Span>,
    flushes: mpsc::Sender<oneshot::Sender<()>>,
    dropped: IntCounter,
    /// Replaced by a reload; the task reads it for each batch.
    target: Arc<Mutex<Arc<Target>>>,
}

/// Where batches go and what they say about the process.
#[derive(Debug)]
struct Target {
    pool: Pool,
    path: Uri,
    host: HeaderValue,
    headers: StaticHeaders,
    resource: Resource,
    timeout: Duration,
}

impl Target {
    fn new(config: &TracingConfig, collector: &Collector) -> Option<Target> {
        let upstream = &collector.upstream;
        let limits = PoolLimits {
            connect_timeout: config.timeout,
            max_connections: CONNECTIONS,
            // Batches go one at a time: the pool is never saturated.
            saturated: IntCounter::new("unused", "unused").ok()?,
        };
        Some(Target {
            pool: Pool::new(&upstream.address, &upstream.tls, limits),
            path: collector.path.parse().ok()?,
            host: upstream.host.clone(),
            headers: upstream.headers.clone(),
            resource: Resource {
                attributes: vec![
                    string_attribute("service.name", &config.service_name),
                    string_attribute("service.version", crate::VERSION),
                ],
                ..Resource::default()
            },
            timeout: config.timeout,
        })
    }
}

fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    }
}

impl Exporter {
    /// Starts the task on the current runtime; `None` outside one, or when the collector's
    /// path is not a request path (the configuration checks it is).
    pub fn start(
        config: &TracingConfig,
        collector: &Collector,
        counters: ExportCounters,
    ) -> Option<Exporter> {
        Exporter::with_queue(config, collector, counters, QUEUE_SPANS)
    }

    fn with_queue(
        config: &TracingConfig,
        collector: &Collector,
        counters: ExportCounters,
        queue: usize,
    ) -> Option<Exporter> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let target = Arc::new(Mutex::new(Arc::new(Target::new(config, collector)?)));
        let (spans, queue) = mpsc::channel(queue);
        let (flushes, flush_requests) = mpsc::channel(1);
        let dropped = counters.dropped_queue_full.clone();
        let task = Task {
            queue,
            flushes: flush_requests,
            target: target.clone(),
            counters,
            failing: None,
        };
        runtime.spawn(task.run());
        Some(Exporter {
            spans,
            flushes,
            dropped,
            target,
        })
    }

    /// A reloaded `[tracing]`: the next batch goes there, with the new service name.
    pub fn retarget(&self, config: &TracingConfig, collector: &Collector) {
        if let Some(target) = Target::new(config, collector) {
            *self.target.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(target);
        }
    }

    /// Sends what is queued now, without the batch delay: at shutdown, so the last
    /// requests' spans are not lost. Waits at most the export timeout.
    pub async fn flush(&self) {
        let timeout = self
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .timeout;
        let flushed = async {
            let (done, flushed) = oneshot::channel();
            if self.flushes.send(done).await.is_ok() {
                let _ = flushed.await;
            }
        };
        let _ = tokio::time::timeout(timeout, flushed).await;
    }

    /// Queues a finished span; never waits. A full queue drops it.
    pub fn push(&self, span: Span) {
        if self.spans.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// The export task: takes spans off the queue a batch at a time and sends them, until
/// every [`Exporter`] is gone and the queue is empty.
struct Task {
    queue: mpsc::Receiver<Span>,
    /// [`Exporter::flush`]: send everything queued now, then answer.
    flushes: mpsc::Receiver<oneshot::Sender<()>>,
    target: Arc<Mutex<Arc<Target>>>,
    counters: ExportCounters,
    /// Spans lost since the collector last took a batch; `Some` while it fails.
    failing: Option<u64>,
}

impl Task {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH_SPANS);
        loop {
            let mut flush = tokio::select! {
                received = self.queue.recv_many(&mut batch, BATCH_SPANS) => {
                    if received == 0 {
                        return;
                    }
                    None
                }
                Some(done) = self.flushes.recv() => Some(done),
            };
            if flush.is_none() && batch.len() < BATCH_SPANS {
                // A moment for the rest of the request's spans, unless told to hurry.
                tokio::select! {
                    () = tokio::time::sleep(BATCH_DELAY) => {}
                    Some(done) = self.flushes.recv() => flush = Some(done),
                }
            }
            loop {
                self.top_up(&mut batch);
                if batch.is_empty() {
                    break;
                }
                self.export(std::mem::take(&mut batch)).await;
                // A flush sends everything queued; otherwise the next batch waits its turn.
                if flush.is_none() {
                    break;
                }
            }
            if let Some(done) = flush {
                let _ = done.send(());
            }
        }
    }

    /// Whatever is queued, up to a batch.
    fn top_up(&mut self, batch: &mut Vec<Span>) {
        while batch.len() < BATCH_SPANS {
            match self.queue.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
    }

    async fn export(&mut self, batch: Vec<Span>) {
        let target = self
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let spans = batch.len() as u64;
        match send(&target, batch).await {
            Ok(()) => {
                self.counters.exported.inc_by(spans);
                if let Some(lost) = self.failing.take() {
                    tracing::info!(
                        dropped_spans = lost,
                        "tracing: the collector takes spans again"
                    );
                }
            }
            Err(error) => {
                self.counters.dropped_export_failed.inc_by(spans);
                match &mut self.failing {
                    Some(lost) => *lost += spans,
                    None => {
                        tracing::warn!(
                            error = %error,
                            "tracing: cannot export spans, dropping them until the collector \
                             takes them again"
                        );
                        self.failing = Some(spans);
                    }
                }
            }
        }
    }
}

/// One export request, its answer read, within the target's timeout.
async fn send(target: &Target, spans: Vec<Span>) -> Result<(), String> {
    let body = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(target.resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "iamproxy".to_owned(),
                    version: crate::VERSION.to_owned(),
                    ..InstrumentationScope::default()
                }),
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
    .encode_to_vec();
    let mut request = Request::new(Either::Right(Full::new(Bytes::from(body))));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = target.path.clone();
    let headers = request.headers_mut();
    target.headers.apply(headers);
    headers.insert(header::HOST, target.host.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    let exchange = async {
        let response = target
            .pool
            .send(request)
            .await
            .map_err(|error| error_chain(&error))?;
        let status = response.status();
        // Read to the end, so the connection is kept.
        let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await;
        match status.is_success() {
            true => Ok(()),
            false => Err(format!("the collector answered {status}")),
        }
    };
    tokio::time::timeout(target.timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", target.timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn counters() -> ExportCounters {
        let counter = |name: &str| IntCounter::new(name, "test").unwrap();
        ExportCounters {
            exported: counter("exported"),
            dropped_queue_full: counter("queue_full"),
            dropped_export_failed: counter("export_failed"),
        }
    }

    /// A queue that is full drops the span at once, counted, rather than wait for room.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_and_never_waits() {
        let config = Config::from_toml(concat!(
            "[rails]\nurl = \"http://127.0.0.1:1\"\n",
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:1/v1/traces\"\nsample_ratio = 1.0\n",
        ))
        .unwrap();
        let tracing = config.tracing.unwrap();
        let collector = tracing.collector.clone().unwrap();
        let counters = counters();
        let exporter = Exporter::with_queue(&tracing, &collector, counters.clone(), 4).unwrap();
        // On this one thread the export task cannot run until the test yields: the first
        // four spans fill the queue and the other six find it full.
        for _ in 0..10 {
            exporter.push(Span::default());
        }
        assert_eq!(counters.dropped_queue_full.get(), 6);
        assert_eq!(counters.exported.get(), 0);
    }
}
