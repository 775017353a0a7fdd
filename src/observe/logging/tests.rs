//! The log formatting's tests: JSON lines, escaping, times, levels and static fields.

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
        fields: Vec::new(),
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
        fields: Vec::new(),
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

#[test]
fn every_character_that_needs_escaping_is_found_at_every_place_in_a_word() {
    for special in [b'"', b'\\', b'\n', 0x00, 0x1f, 0x7f, 0x80, 0xff] {
        for len in 1..20 {
            for at in 0..len {
                let mut bytes = vec![b'a'; len];
                bytes[at] = special;
                let expected = special < 0x20 || special == b'"' || special == b'\\';
                assert_eq!(
                    needs_escape(&bytes),
                    expected,
                    "{special:#x} at {at} of {len}"
                );
            }
        }
    }
    // Bytes just around the special ones.
    assert!(!needs_escape(b" !#[]^~\x7f aaaaaaaaaaaaaaaa"));
}

#[test]
fn times_are_rfc3339_utc_with_microseconds() {
    for (secs, text) in [
        (0, "1970-01-01T00:00:00"),
        (951_782_400, "2000-02-29T00:00:00"),
        (1_796_309_049, "2026-12-03T14:44:09"),
        (4_102_444_799, "2099-12-31T23:59:59"),
        (253_402_300_799, "9999-12-31T23:59:59"),
    ] {
        assert_eq!(
            std::str::from_utf8(&date_time(secs)).unwrap(),
            text,
            "{secs}"
        );
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_796_309_049, 7_000);
    let mut out = String::new();
    write_time(&mut out, at);
    // The second cached by the call before must not leak into the next one.
    write_time(&mut out, at + std::time::Duration::from_millis(1_500));
    assert_eq!(
        out,
        "2026-12-03T14:44:09.000007Z2026-12-03T14:44:10.500007Z"
    );
}

#[test]
fn times_are_written_as_tracing_subscriber_writes_them() {
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
    let mut theirs = String::new();
    SystemTime
        .format_time(&mut Writer::new(&mut theirs))
        .unwrap();
    let mut ours = String::new();
    write_time(&mut ours, std::time::SystemTime::now());
    assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
    // Up to the minute: the two clocks were read a moment apart.
    assert_eq!(ours[..16], theirs[..16], "{ours} / {theirs}");
}

proptest::proptest! {
    #[test]
    fn every_second_formats_as_the_date_it_is(secs in 0u64..253_402_300_800) {
        let text = date_time(secs);
        let text = std::str::from_utf8(&text).unwrap();
        let number = |range: std::ops::Range<usize>| text[range].parse::<i64>().unwrap();
        let (year, month, day) = (number(0..4), number(5..7), number(8..10));
        // Days from the civil date, the inverse of the conversion under test.
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let back = days * 86_400 + number(11..13) * 3600 + number(14..16) * 60 + number(17..19);
        proptest::prop_assert_eq!(back, secs as i64, "{}", text);
    }

    #[test]
    fn json_strings_read_back_as_written(text in ".*") {
        let literal = json(&text);
        let back: String = serde_json::from_str(&literal).unwrap();
        proptest::prop_assert_eq!(back, text);
    }
}

#[test]
fn static_fields_follow_msg_on_every_line_and_display_values_are_escaped_in_place() {
    let buffer = Buffer::default();
    let sink = buffer.clone();
    let config = LogConfig {
        format: LogFormat::Json,
        level: tracing::Level::INFO,
        fields: vec![
            ("subcomponent".into(), "workhorse".into()),
            ("note".into(), "say \"hi\"".into()),
        ],
    };
    let subscriber = subscriber(&config, move || sink.clone());
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!(uri = tracing::field::display("/a?b=\"c\"\n"), "access");
        tracing::warn!("no fields of its own");
    });
    let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0]
            .contains(r#""msg":"access","subcomponent":"workhorse","note":"say \"hi\"","uri":"#),
        "{}",
        lines[0]
    );
    for line in lines {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(line["subcomponent"], "workhorse");
        assert_eq!(line["note"], "say \"hi\"");
    }
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["uri"], "/a?b=\"c\"\n");
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

proptest::proptest! {
    #[test]
    fn milliseconds_with_microseconds_are_written_as_display_writes_them(
        micros in 0u64..10_000_000_000_000,
        negative: bool,
    ) {
        let value = if negative { -(micros as f64) } else { micros as f64 } / 1000.0;
        let mut ours = String::new();
        proptest::prop_assert!(write_thousandths(&mut ours, value) || value == 0.0 && negative);
        if !ours.is_empty() {
            proptest::prop_assert_eq!(ours, format!("{value}"));
        }
    }

    #[test]
    fn any_other_float_is_left_to_display_or_read_back_exactly(value: f64) {
        let mut ours = String::new();
        if write_thousandths(&mut ours, value) {
            proptest::prop_assert_eq!(ours.parse::<f64>().unwrap(), value);
            proptest::prop_assert_eq!(&ours, &format!("{value}"));
        } else {
            proptest::prop_assert!(ours.is_empty());
        }
    }

    #[test]
    fn integers_are_written_as_display_writes_them(value: i64, unsigned: u64) {
        let mut ours = String::new();
        write_u64(&mut ours, unsigned);
        proptest::prop_assert_eq!(ours, unsigned.to_string());
        let out = capture(LogFormat::Json, || tracing::info!(n = value, u = unsigned, "x"));
        let line: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        proptest::prop_assert_eq!(line["n"].as_i64(), Some(value));
        proptest::prop_assert_eq!(line["u"].as_u64(), Some(unsigned));
    }
}

#[test]
fn float_fields_read_back_whatever_their_form() {
    let out = capture(LogFormat::Json, || {
        tracing::info!(
            a = 1.5,
            b = 2.0,
            c = 0.001,
            d = 1e-7,
            e = -3.25,
            f = 1e300,
            "x"
        )
    });
    let line: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
    for (key, value) in [
        ("a", 1.5),
        ("b", 2.0),
        ("c", 0.001),
        ("d", 1e-7),
        ("e", -3.25),
        ("f", 1e300),
    ] {
        assert_eq!(line[key].as_f64(), Some(value), "{key} in {out}");
    }
    assert!(out.contains(r#""a":1.5,"b":2,"c":0.001,"#), "{out}");
}

/// The time is the one part two lines may not share: everything after it.
fn after_time(line: &str) -> &str {
    let at = line.find("\",\"level\"").expect("a JSON line with a level");
    &line[at..]
}

#[test]
fn an_encoded_line_reads_as_the_same_fields_logged_one_by_one() {
    let (value, host, elapsed) = ("quote \" back \\ tab \t é", "gitlab.example", 12_345);
    let one_by_one = capture(LogFormat::Json, || {
        tracing::info!(
            correlation_id = value,
            route = "token",
            status = 502u16,
            duration_ms = elapsed as f64 / 1000.0,
            host,
            "access"
        )
    });
    let encoded = capture(LogFormat::Json, || {
        Encoded::with(|line| {
            line.str(json_key!("correlation_id"), value)
                .name(json_key!("route"), "token")
                .u64(json_key!("status"), 502)
                .millis(json_key!("duration_ms"), Duration::from_micros(elapsed))
                .str(json_key!("host"), host);
            tracing::info!(fields = ?line.pairs(), "access");
        })
    });
    assert_eq!(after_time(&encoded), after_time(&one_by_one));
    let line: serde_json::Value = serde_json::from_str(encoded.trim_end()).unwrap();
    assert_eq!(line["correlation_id"], value);
    assert_eq!(line["duration_ms"], 12.345);
}

#[test]
fn a_line_encoded_while_another_is_keeps_both_apart() {
    let out = capture(LogFormat::Json, || {
        Encoded::with(|outer| {
            outer.name(json_key!("a"), "outer");
            Encoded::with(|inner| {
                inner.name(json_key!("b"), "inner");
                tracing::info!(fields = ?inner.pairs(), "inner");
            });
            tracing::info!(fields = ?outer.pairs(), "outer");
        })
    });
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!((&lines[0]["b"], lines[0].get("a")), (&"inner".into(), None));
    assert_eq!((&lines[1]["a"], lines[1].get("b")), (&"outer".into(), None));
}

#[test]
fn the_text_format_writes_encoded_fields_as_a_json_object() {
    let out = capture(LogFormat::Text, || {
        Encoded::with(|line| {
            line.u64(json_key!("status"), 502)
                .str(json_key!("path"), "/a");
            tracing::info!(fields = ?line.pairs(), "access");
        })
    });
    assert!(
        out.contains(r#"access fields={"status":502,"path":"/a"}"#),
        "{out}"
    );
}

proptest::proptest! {
    #[test]
    fn encoded_milliseconds_are_written_as_display_writes_the_float(
        micros in 0u64..10_000_000_000_000,
    ) {
        let mut ours = String::new();
        write_in_thousandths(&mut ours, micros);
        proptest::prop_assert_eq!(ours, format!("{}", micros as f64 / 1000.0));
    }
}
