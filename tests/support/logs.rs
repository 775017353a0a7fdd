//! The gateway's logs as a test sees them: JSON lines from the subscriber production uses,
//! written to memory.

use std::sync::{Arc, Mutex, OnceLock};

use iamproxy::config::LogFormat;
use serde_json::Value;

/// The `log.fields` every captured line carries: what GitLab's dashboards filter
/// Workhorse's lines by.
pub const LOG_FIELDS: &str = r#"fields = { subcomponent = "workhorse" }"#;

/// Every line logged while capturing.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The production subscriber (JSON, down to debug so debug lines are checked too, with
    /// the static fields of [`LOG_FIELDS`]) writing here.
    fn subscriber(&self) -> Box<dyn tracing::Subscriber + Send + Sync> {
        let sink = self.clone();
        let config = iamproxy::Config::from_toml(&format!(
            "[rails]\nurl = \"http://127.0.0.1:1\"\n[log]\nlevel = \"debug\"\n{LOG_FIELDS}\n"
        ))
        .expect("the capture's [log] table is valid")
        .log;
        assert_eq!(config.format, LogFormat::Json);
        iamproxy::observe::logging::subscriber(&config, move || sink.clone())
    }

    /// Installed once per test binary as the global subscriber, shared by all its tests.
    /// (Not a per-test `set_default`: tracing caches each callsite's interest across
    /// threads, so a scoped subscriber can miss events another test's thread registered.)
    pub fn global() -> &'static Captured {
        static CAPTURED: OnceLock<Captured> = OnceLock::new();
        CAPTURED.get_or_init(|| {
            let captured = Captured::default();
            tracing::subscriber::set_global_default(captured.subscriber())
                .expect("no other global subscriber");
            captured
        })
    }

    /// Some line holds every one of `parts`.
    pub fn has_line(&self, parts: &[&str]) -> bool {
        self.text()
            .lines()
            .any(|line| parts.iter().all(|part| line.contains(part)))
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("logs are UTF-8")
    }

    /// Every line, parsed; each must be a JSON object with `time`, `level` and `msg`.
    pub fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|line| {
                let parsed: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                for key in ["time", "level", "msg"] {
                    assert!(parsed.get(key).is_some(), "no {key:?} in log line: {line}");
                }
                parsed
            })
            .collect()
    }

    /// The lines of one request, once its access line is in. That line is written when the
    /// response body has been sent, which can be a moment after the client has read it.
    pub async fn request_lines(&self, correlation_id: &str) -> Vec<Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let lines = self.lines_of(correlation_id);
            if lines.iter().any(|line| line["msg"] == "access") {
                return lines;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no access line for {correlation_id} within 5 s: {lines:#?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// The lines of one request logged so far.
    pub fn lines_of(&self, correlation_id: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|line| line["correlation_id"] == correlation_id)
            .collect()
    }
}
