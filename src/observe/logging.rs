//! Structured logs through `tracing`: JSON lines (`{"time", "level", "msg", fields…}`,
//! the shape Workhorse's logs have) or plain text.
//!
//! `log.fields` (static `name = value` pairs, e.g. `subcomponent = "workhorse"`) are
//! rendered once per subscriber and copied into every JSON line.
//!
//! Secrets stay out by construction: the request path logs the path and the query with
//! every value replaced ([`crate::proxy::access`]), the validated client id and the
//! gateway's own fields, never bodies, cookies or `Authorization`.

use std::fmt::{self, Write as _};
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::Writer;
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
            let format = JsonLines::new(&config.fields);
            Box::new(Registry::default().with(layer.event_format(format).with_filter(filter)))
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

/// One JSON object per line, with the configured static fields after `msg`.
struct JsonLines {
    /// `,"name":"value"` for each of `log.fields`, encoded once.
    fields: String,
}

impl JsonLines {
    fn new(fields: &[(String, String)]) -> JsonLines {
        let mut encoded = String::new();
        for (name, value) in fields {
            encoded.push(',');
            write_json_str(&mut encoded, name);
            encoded.push(':');
            write_json_str(&mut encoded, value);
        }
        JsonLines { fields: encoded }
    }
}

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
        // The fields' buffers are the thread's own, reused line after line: a line costs no
        // allocation once they have grown to fit. (An event logged while one is formatted,
        // from inside a field's `Debug`, gets buffers of its own.)
        let fixed = &self.fields;
        FIELDS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut fields) => json_line(&mut fields, fixed, event, &mut writer),
            Err(_) => json_line(&mut JsonFields::default(), fixed, event, &mut writer),
        })
    }
}

/// Formats `event` as one JSON line into `writer`, through `fields`' buffers; `fixed` is
/// the encoded `log.fields`.
fn json_line(
    fields: &mut JsonFields,
    fixed: &str,
    event: &Event<'_>,
    writer: &mut Writer<'_>,
) -> fmt::Result {
    fields.msg.clear();
    fields.has_msg = false;
    fields.rest.clear();
    event.record(fields);
    let line = &mut fields.line;
    line.clear();
    line.push_str("{\"time\":\"");
    write_time(line, std::time::SystemTime::now());
    line.push_str("\",\"level\":\"");
    line.push_str(match *event.metadata().level() {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    });
    line.push('"');
    if fields.has_msg {
        line.push_str(",\"msg\":");
        write_json_str(line, &fields.msg);
    }
    line.push_str(fixed);
    line.push_str(&fields.rest);
    line.push_str("}\n");
    writer.write_str(line)
}

thread_local! {
    static FIELDS: std::cell::RefCell<JsonFields> = std::cell::RefCell::default();
}

#[derive(Default)]
struct JsonFields {
    /// The `message` field, when the event has one (`has_msg`).
    msg: String,
    has_msg: bool,
    /// `,"name":value` pairs, already encoded.
    rest: String,
    /// The whole line, assembled.
    line: String,
}

impl JsonFields {
    /// Starts `,"name":` and returns the buffer to write the value into.
    fn key(&mut self, field: &Field) -> &mut String {
        self.rest.push_str(",\"");
        write_json_chars(&mut self.rest, field.name());
        self.rest.push_str("\":");
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
            self.msg.push_str(value);
            self.has_msg = true;
        } else {
            write_json_str(self.key(field), value);
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        write_u64(self.key(field), value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        let rest = self.key(field);
        if value < 0 {
            rest.push('-');
        }
        write_u64(rest, value.unsigned_abs());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; Rust prints finite floats without exponents.
        if !value.is_finite() {
            self.key(field).push_str("null");
        } else if !write_thousandths(self.key(field), value) {
            let _ = write!(self.rest, "{value}");
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == ENCODED {
            // `,"name":value` pairs already: spliced in as they are ([`Encoded`]).
            let _ = write!(self.rest, "{value:#?}");
        } else if field.name() == "message" {
            // The message's format arguments, written straight into its buffer.
            let _ = write!(self.msg, "{value:?}");
            self.has_msg = true;
        } else {
            // Straight into the line, escaped on the way: no string per field.
            let rest = self.key(field);
            rest.push('"');
            let _ = write!(Escaping(rest), "{value:?}");
            rest.push('"');
        }
    }
}

/// `,"name":`, the key of one of [`Encoded`]'s pairs, spelled when the program is built.
macro_rules! json_key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}
pub(crate) use json_key;

/// The name of the field that carries an [`Encoded`] line's pairs.
pub const ENCODED: &str = "fields";

/// A line's fields encoded as JSON by the code that logs them, for the lines written once
/// per request (the access and decision lines): each key is a literal and each value is
/// written by its type, where tracing's visitor would look at every field of every line
/// anew. The pairs travel as the one field [`ENCODED`]
/// (`tracing::info!(fields = ?encoded.pairs(), "access")`): the JSON format splices them in
/// where the fields go, so the line reads exactly as if each had been a field of its own;
/// the text format writes them as a JSON object.
pub struct Encoded {
    /// `,"name":value` for each field so far.
    pairs: String,
}

impl Encoded {
    /// Runs `log` with the thread's buffer, emptied (reused line after line, so a line
    /// costs no allocation once it has grown to fit).
    pub fn with<R>(log: impl FnOnce(&mut Encoded) -> R) -> R {
        thread_local! {
            static ENCODED: std::cell::RefCell<Encoded> =
                const { std::cell::RefCell::new(Encoded { pairs: String::new() }) };
        }
        ENCODED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut encoded) => {
                encoded.pairs.clear();
                log(&mut encoded)
            }
            // A line logged while another is encoded on this thread.
            Err(_) => log(&mut Encoded {
                pairs: String::new(),
            }),
        })
    }

    /// `value` as a JSON string, after `key` (`,"name":`, from [`json_key!`]).
    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Encoded {
        self.key(key);
        write_json_str(&mut self.pairs, value);
        self
    }

    /// A value that has no character to escape: one of the gateway's own identifiers (a
    /// route, a reason) or an HTTP token (a method). Written without looking.
    pub fn name(&mut self, key: &'static str, value: &str) -> &mut Encoded {
        debug_assert!(!needs_escape(value.as_bytes()), "{value:?} needs escaping");
        self.key(key);
        self.pairs.push('"');
        self.pairs.push_str(value);
        self.pairs.push('"');
        self
    }

    pub fn u64(&mut self, key: &'static str, value: u64) -> &mut Encoded {
        self.key(key);
        write_u64(&mut self.pairs, value);
        self
    }

    /// A duration in milliseconds with microsecond resolution (`12.5`), written as the
    /// `f64` `micros / 1000.0` displays.
    pub fn millis(&mut self, key: &'static str, elapsed: Duration) -> &mut Encoded {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.key(key);
        write_in_thousandths(&mut self.pairs, micros);
        self
    }

    /// One copy of the whole `,"name":`: no escaping, the key is spelled by [`json_key!`].
    fn key(&mut self, key: &'static str) {
        debug_assert!(
            key.starts_with(",\"")
                && key.ends_with("\":")
                && !needs_escape(&key.as_bytes()[2..key.len() - 2]),
            "{key:?} is not a key from json_key!"
        );
        self.pairs.push_str(key);
    }

    /// The value to log as the field [`ENCODED`].
    pub fn pairs(&self) -> EncodedPairs<'_> {
        EncodedPairs(&self.pairs)
    }
}

/// [`Encoded`]'s pairs as a field value: `{:#?}` writes them as they are (the JSON format),
/// `{:?}` as a JSON object (the text format).
pub struct EncodedPairs<'a>(&'a str);

impl fmt::Debug for EncodedPairs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            f.write_str(self.0)
        } else {
            f.write_char('{')?;
            f.write_str(self.0.strip_prefix(',').unwrap_or(self.0))?;
            f.write_char('}')
        }
    }
}

/// Formatted text written into a JSON string literal, escaped as it arrives.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        write_json_chars(self.0, text);
        Ok(())
    }
}

/// `value` in decimal, without going through `fmt` (a status, a byte count: every access
/// line has some).
fn write_u64(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    // A few digits: pushed one by one, cheaper than checking them as UTF-8 first.
    out.extend(digits[at..].iter().map(|&digit| char::from(digit)));
}

/// `value` as `Display` writes it, when it is a whole number of thousandths (the
/// millisecond durations, µs resolution, that access lines carry): integer arithmetic
/// instead of the shortest-float search. False, writing nothing, for any other value.
fn write_thousandths(out: &mut String, value: f64) -> bool {
    let scaled = (value * 1000.0).round();
    // Exactly m / 1000 as f64, with m small enough that no shorter decimal is that f64.
    if scaled.abs() >= 1e15 // NaN fails the next test
        || scaled / 1000.0 != value
        || value == 0.0 && value.is_sign_negative()
    {
        return false;
    }
    if scaled < 0.0 {
        out.push('-');
    }
    write_in_thousandths(out, scaled.abs() as u64);
    true
}

/// `thousandths / 1000` in decimal, without trailing zeros (`12500` is `12.5`).
fn write_in_thousandths(out: &mut String, thousandths: u64) {
    write_u64(out, thousandths / 1000);
    let mut fraction = thousandths % 1000;
    if fraction != 0 {
        let mut digits = 3;
        while fraction % 10 == 0 {
            fraction /= 10;
            digits -= 1;
        }
        out.push('.');
        for place in (0..digits).rev() {
            out.push(char::from(b'0' + (fraction / 10u64.pow(place) % 10) as u8));
        }
    }
}

/// `text` as a JSON string literal (RFC 8259 §7), appended to `out`.
fn write_json_str(out: &mut String, text: &str) {
    out.push('"');
    write_json_chars(out, text);
    out.push('"');
}

/// `text` escaped for the inside of a JSON string.
fn write_json_chars(out: &mut String, text: &str) {
    // The common case, a value with nothing to escape, is one copy.
    if !needs_escape(text.as_bytes()) {
        out.push_str(text);
        return;
    }
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
}

/// Whether `bytes` hold a `"`, a `\\` or a control character, eight bytes at a time
/// (the "has a zero byte" and "has a byte less than" word tricks).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGH != 0;
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
        if has_zero(word ^ (ONES * u64::from(b'"')))
            || has_zero(word ^ (ONES * u64::from(b'\\')))
            || word.wrapping_sub(ONES * 0x20) & !word & HIGH != 0
        {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&byte| byte < 0x20 || byte == b'"' || byte == b'\\')
}

#[cfg(test)]
fn json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    write_json_str(&mut out, text);
    out
}

/// `at` as RFC 3339 UTC with microseconds (`2026-12-03T14:44:09.123456Z`), the form
/// `tracing_subscriber`'s `SystemTime` writes. The date and time of day are formatted once
/// per second per thread; within the second only the microseconds are new.
fn write_time(out: &mut String, at: std::time::SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            text.clear();
            text.extend(date_time(secs).iter().map(|&byte| char::from(byte)));
            *cached = secs;
        }
        out.push_str(text);
    });
    out.push('.');
    let mut micros = [0u8; 6];
    let mut value = since_epoch.subsec_micros();
    for digit in micros.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
    out.extend(micros.iter().map(|&digit| char::from(digit)));
    out.push('Z');
}

/// `YYYY-MM-DDTHH:MM:SS` for `secs` after the Unix epoch (the civil calendar from days,
/// after Howard Hinnant's `civil_from_days`).
fn date_time(secs: u64) -> [u8; 19] {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let of_day = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let mut text = [0u8; 19];
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, u64::try_from(year).unwrap_or(0));
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    for (at, separator) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        text[at] = separator;
    }
    text
}

#[cfg(test)]
mod tests;
