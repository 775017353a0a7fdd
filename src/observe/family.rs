//! Registry plumbing shared by the metrics: registering a collector, and labelled families
//! whose children are resolved once and then found by index.

use std::sync::OnceLock;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::Registry;

/// Looks a family's child up by its label values (`MetricVec::with_label_values`).
type Resolve<M> = Box<dyn Fn(&[&str]) -> M + Send + Sync>;

/// A labelled metric family whose children are resolved once per label combination and
/// then found by index.
pub(super) struct Family<M, const LABELS: usize> {
    resolve: Resolve<M>,
    children: Box<[OnceLock<M>]>,
}

impl<M, const LABELS: usize> Family<M, LABELS> {
    pub(super) fn new<B>(vec: MetricVec<B>, combinations: usize) -> Family<M, LABELS>
    where
        B: MetricVecBuilder<M = M> + 'static,
        M: Send + Sync,
    {
        Family {
            resolve: Box::new(move |labels| vec.with_label_values(labels)),
            children: (0..combinations).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The child at `index`, created with `labels()` the first time it is asked for.
    pub(super) fn get(&self, index: usize, labels: impl FnOnce() -> [&'static str; LABELS]) -> &M {
        self.children[index].get_or_init(|| (self.resolve)(&labels()))
    }
}

pub(super) fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: prometheus::Result<C>,
) -> C {
    // Names, help texts and label names are constants, unique in this module: neither
    // building nor registering can fail.
    let collector = collector.expect("metric definitions are valid");
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique");
    collector
}
