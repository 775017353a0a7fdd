//! Structured logs through `tracing`: JSON lines (`{"time", "level", "msg", fields…}`,
//! the shape Workhorse's logs have) or plain text.
//!
//! Secrets stay out by construction: the request path logs the path (never the query),
//! the validated client id and the gateway's own fields, never headers or bodies.

use std::fmt::{self, Write as _};
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

use super::log_writer::{self, Flush};
use crate::config::{LogConfig, LogFormat};

/// Builds the subscriber for `config`, writing to `writer`. Tests pass a capturing writer
/// and so exercise the same formatting as production.
pub fn subscriber<W>(config: &LogConfig, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    subscriber_with_level(config, writer).0
}

/// [`subscriber`], and the handle that changes its level while it runs.
pub fn subscriber_with_level<W>(
    config: &LogConfig,
    writer: W,
) -> (Box<dyn Subscriber + Send + Sync>, LogLevel)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let level = LogLevel::new(config.level);
    let filter = level.clone();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false);
    let subscriber: Box<dyn Subscriber + Send + Sync> = match config.format {
        LogFormat::Json => {
            Box::new(Registry::default().with(layer.event_format(JsonLines).with_filter(filter)))
        }
        LogFormat::Text => {
            Box::new(Registry::default().with(layer.with_target(false).with_filter(filter)))
        }
    };
    (subscriber, level)
}

/// What [`init`] installed: the handle that changes the level (a config reload), and the
/// flush that writes buffered lines when dropped — keep it until the process exits.
pub struct Installed {
    pub level: LogLevel,
    pub flush: Flush<io::Stderr>,
}

/// Installs the process-wide subscriber, logging to stderr through the batching writer
/// ([`super::log_writer`]). `None` if a subscriber was installed already.
pub fn init(config: &LogConfig) -> Option<Installed> {
    let (writer, flush) = log_writer::batched(io::stderr());
    let (subscriber, level) = subscriber_with_level(config, writer);
    tracing::subscriber::set_global_default(subscriber)
        .ok()
        .map(|()| Installed { level, flush })
}

/// The most verbose level a subscriber writes, changeable while it runs.
#[derive(Debug, Clone)]
pub struct LogLevel(Arc<AtomicU8>);

impl LogLevel {
    fn new(level: Level) -> LogLevel {
        LogLevel(Arc::new(AtomicU8::new(rank(level))))
    }

    pub fn set(&self, level: Level) {
        self.0.store(rank(level), Ordering::Relaxed);
        // tracing keeps the most verbose level any subscriber wants in one global, read
        // before an event is even built: recompute it.
        tracing::callsite::rebuild_interest_cache();
    }

    fn enables(&self, level: Level) -> bool {
        rank(level) <= self.0.load(Ordering::Relaxed)
    }
}

/// Checked per event with one atomic load: no lock. Every callsite is "sometimes"
/// interesting, so tracing never caches an answer that a later reload would make wrong;
/// the level is also a hint, so tracing's global maximum turns away every event more
/// verbose than it (hyper's `trace!`s on the request path) before asking anyone.
impl<S> Filter<S> for LogLevel {
    fn enabled(&self, metadata: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.enables(*metadata.level())
    }

    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match self.0.load(Ordering::Relaxed) {
            0 => LevelFilter::ERROR,
            1 => LevelFilter::WARN,
            2 => LevelFilter::INFO,
            3 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }
}

/// ERROR 0 … TRACE 4: higher is more verbose.
fn rank(level: Level) -> u8 {
    match level {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        Level::TRACE => 4,
    }
}

/// One JSON object per line.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut time = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        write!(writer, "{{\"time\":{},\"level\":\"{level}\"", json(&time))?;
        if let Some(msg) = &fields.msg {
            write!(writer, ",\"msg\":{}", json(msg))?;
        }
        writeln!(writer, "{}}}", fields.rest)
    }
}

#[derive(Default)]
struct JsonFields {
    msg: Option<String>,
    /// `,"name":value` pairs, already encoded.
    rest: String,
}

impl JsonFields {
    /// Starts `,"name":` and returns the buffer to write the value into. Written in
    /// place: a line costs no allocation per field (the access line has ten).
    fn key(&mut self, field: &Field) -> &mut String {
        self.rest.push(',');
        write_json_str(&mut self.rest, field.name());
        self.rest.push(':');
        &mut self.rest
    }

    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        let rest = self.key(field);
        let _ = write!(rest, "{value}");
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg = Some(value.to_owned());
        } else {
            write_json_str(self.key(field), value);
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; Rust prints finite floats without exponents.
        if value.is_finite() {
            self.number(field, value);
        } else {
            self.key(field).push_str("null");
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// `text` as a JSON string literal (RFC 8259 §7), appended to `out`.
fn write_json_str(out: &mut String, text: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, byte) in text.bytes().enumerate() {
        let escaped = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[plain..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escaped);
        }
        plain = i + 1;
    }
    out.push_str(&text[plain..]);
    out.push('"');
}

fn json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    write_json_str(&mut out, text);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat, emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let config = LogConfig {
            format,
            level: tracing::Level::INFO,
        };
        let subscriber = subscriber(&config, move || sink.clone());
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_level_change_takes_effect_on_the_running_subscriber() {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let config = LogConfig {
            format: LogFormat::Json,
            level: tracing::Level::INFO,
        };
        let (subscriber, level) = subscriber_with_level(&config, move || sink.clone());
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..2 {
                tracing::debug!("debug before");
                level.set(tracing::Level::DEBUG);
                tracing::debug!("debug after");
                level.set(tracing::Level::WARN);
                tracing::info!("info at warn");
                tracing::warn!("warn at warn");
                level.set(tracing::Level::INFO);
            }
        });
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let messages: Vec<&str> = out
            .lines()
            .map(|line| {
                line.split("\"msg\":\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            messages,
            ["debug after", "warn at warn", "debug after", "warn at warn"]
        );
    }

    #[test]
    fn json_lines_have_time_level_msg_and_typed_fields() {
        let out = capture(LogFormat::Json, || {
            tracing::info!(
                status = 200u16,
                path = "/oauth/token",
                ok = true,
                duration_ms = 1.5,
                "access"
            );
            tracing::debug!("filtered out by level");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["msg"], "access");
        assert_eq!(line["level"], "info");
        assert_eq!(line["status"], 200);
        assert_eq!(line["path"], "/oauth/token");
        assert_eq!(line["ok"], true);
        assert_eq!(line["duration_ms"], 1.5);
        assert!(line["time"].as_str().unwrap().starts_with("20"));
    }

    proptest::proptest! {
        #[test]
        fn json_strings_read_back_as_written(text in ".*") {
            let literal = json(&text);
            let back: String = serde_json::from_str(&literal).unwrap();
            proptest::prop_assert_eq!(back, text);
        }
    }

    #[test]
    fn json_escapes_quotes_and_control_characters() {
        let out = capture(LogFormat::Json, || {
            tracing::warn!(error = "a \"b\"\n", "x");
        });
        let line: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(line["error"], "a \"b\"\n");
    }

    #[test]
    fn text_format_is_plain() {
        let out = capture(LogFormat::Text, || {
            tracing::info!(status = 502u16, "access")
        });
        assert!(out.contains("access status=502"), "{out}");
        assert!(!out.contains('\u{1b}'), "no ANSI colours");
    }
}
