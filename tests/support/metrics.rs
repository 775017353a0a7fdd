//! Scraping the gateway's admin `/metrics` and reading the Prometheus text exposition
//! format (0.0.4): one value per series, a series being its name and sorted labels.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::TestClient;

/// A series: a metric name and its labels (kept sorted by name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Series {
    pub fn new(name: &str, labels: &[(&str, &str)]) -> Series {
        Series {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// Whether this series carries every one of `labels` (it may have more).
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|value| value == v))
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        Ok(())
    }
}

/// One scrape: the raw text, every sample, and the `# TYPE` of every metric family.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: BTreeMap<Series, f64>,
    /// Metric family name → type (`counter`, `gauge`, `histogram`, …).
    pub types: BTreeMap<String, String>,
}

/// GETs `http://{admin}/metrics`, asserts a 200 in the text format, and parses it.
pub async fn scrape(admin: SocketAddr) -> Scrape {
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        TestClient::new().get(&format!("http://{admin}/metrics")),
    )
    .await
    .expect("/metrics answered in time");
    assert_eq!(answer.status, 200, "/metrics: {}", answer.text());
    let content_type = answer
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "/metrics content type: {content_type:?}"
    );
    Scrape::parse(&answer.text())
}

impl Scrape {
    /// Parses the text format. Panics, quoting the line, on anything it cannot read.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        panic!("bad TYPE line: {line:?}");
                    };
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            let (series, value) = parse_sample(line);
            if let Some(previous) = samples.insert(series.clone(), value) {
                panic!("{series} appears twice ({previous} and {value})");
            }
        }
        Scrape {
            text: text.to_owned(),
            samples,
            types,
        }
    }

    /// The value of one series, if exported.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&Series::new(name, labels)).copied()
    }

    /// The value of one series; panics, listing the series of that name, when it is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let exported: Vec<String> = self.named(name).map(|(s, _)| s.to_string()).collect();
            panic!(
                "{} is not exported; series named {name}: {exported:#?}",
                Series::new(name, labels)
            )
        })
    }

    /// Every series whose name is exactly `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a Series, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(series, _)| series.name == name)
            .map(|(series, value)| (series, *value))
    }

    /// The sum over every series of `name` that carries all of `labels` (others free);
    /// 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.named(name)
            .filter(|(series, _)| series.has(labels))
            .map(|(_, value)| value)
            .sum()
    }
}

/// `name{label="value",…} value [timestamp]` → (series, value).
fn parse_sample(line: &str) -> (Series, f64) {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
    let mut series = Series::new(&line[..name_end], &[]);
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = after_brace;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest
                .find('=')
                .unwrap_or_else(|| panic!("label without '=': {line:?}"));
            let label = rest[..eq].trim().to_owned();
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("unquoted label value: {line:?}"));
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, escaped)) => value.push(escaped),
                        None => panic!("dangling escape: {line:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value: {line:?}"),
                }
            };
            rest = &rest[end + 1..];
            if series.labels.insert(label, value).is_some() {
                panic!("repeated label: {line:?}");
            }
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("unreadable value {value:?}: {line:?}"));
    (series, value)
}
