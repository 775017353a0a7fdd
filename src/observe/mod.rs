//! What the gateway tells its operators: Prometheus metrics, structured logs and the
//! thread that writes them, and distributed traces.

mod family;
pub mod log_writer;
pub mod logging;
pub mod metrics;
mod process;
pub mod trace;
