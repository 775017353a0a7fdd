//! The shipped Grafana dashboard and Prometheus rules (`dashboards/`): promtool accepts the
//! rules and passes their unit tests, the dashboard has the structure Grafana and operators
//! rely on, and every query names only metrics the gateway exports.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The gateway's metrics, as the observability brief lists them (`GET /metrics`).
const METRICS: &[&str] = &[
    "iamproxy_build_info",
    "iamproxy_requests_total",
    "iamproxy_requests_in_flight",
    "iamproxy_routing_decisions_total",
    "iamproxy_decision_cache_hits_total",
    "iamproxy_decision_cache_misses_total",
    "iamproxy_decision_cache_entries",
    "iamproxy_preauthorize_calls_total",
    "iamproxy_fallbacks_total",
    "iamproxy_iam_breaker_state",
    "iamproxy_iam_breaker_opens_total",
    "iamproxy_upstream_connection_errors_total",
    "iamproxy_upstream_saturated_total",
    "iamproxy_config_last_reload_successful",
    "iamproxy_config_last_reload_success_timestamp_seconds",
    "iamproxy_config_reloads_total",
    "iamproxy_shared_cache_lookups_total",
    "iamproxy_shared_cache_fills_total",
    "iamproxy_tracing_spans_exported_total",
    "iamproxy_tracing_spans_dropped_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_cpu_seconds_total",
];

/// Histograms are queried through their `_bucket`, `_count` and `_sum` series.
const HISTOGRAMS: &[&str] = &[
    "iamproxy_request_duration_seconds",
    "iamproxy_preauthorize_duration_seconds",
];

/// The dashboard variables a query may use; the Prometheus integration test substitutes
/// exactly these.
const VARIABLES: &[&str] = &["job", "instance", "__rate_interval"];

const UNITS: &[&str] = &["reqps", "percentunit", "s", "short", "bytes"];

const ALERTS: &[&str] = &[
    "IamproxyIamFallbackRateHigh",
    "IamproxyIamBreakerOpen",
    "IamproxyPreauthorizeErrorRatioHigh",
    "IamproxyStaleDecisionsServed",
    "IamproxyPreauthorizeLatencyHigh",
    "IamproxyOauthErrorRatioHigh",
    "IamproxyOauthLatencyRegression",
    "IamproxyConfigReloadFailed",
    "IamproxySharedCacheErrors",
];

const RUNBOOK: &str = "https://gitlab.com/gitlab-org/iamproxy/-/blob/main/README.md#";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dashboards(file: &str) -> PathBuf {
    root().join("dashboards").join(file)
}

fn known_metrics() -> HashSet<String> {
    let mut names: HashSet<String> = METRICS.iter().map(|name| name.to_string()).collect();
    for histogram in HISTOGRAMS {
        for suffix in ["_bucket", "_count", "_sum"] {
            names.insert(format!("{histogram}{suffix}"));
        }
    }
    names
}

/// Runs promtool from the crate root and fails with its output unless it succeeds.
fn promtool(args: &[&str]) -> Output {
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not on PATH ({error}); run scripts/test.sh, which installs \
             Debian's prometheus package"
        ),
        Err(error) => panic!("cannot run promtool {args:?}: {error}"),
    };
    assert!(
        output.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    output
}

// ---- A small PromQL scanner: enough to find selectors and variables. ----

fn is_name_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || byte == b':'
}

fn is_name(byte: u8) -> bool {
    is_name_start(byte) || byte.is_ascii_digit()
}

/// Index just past the string literal that starts at `start` (quotes or backticks).
fn skip_string(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() && bytes[i] != quote {
        if bytes[i] == b'\\' && quote != b'`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// Whether a name is a series name this repository owns (as opposed to a function, a
/// keyword or a label).
fn is_metric_name(name: &str) -> bool {
    name.starts_with("iamproxy_") || name.starts_with("iamproxy:") || name.starts_with("process_")
}

/// Every series selector in `expr`: the metric name and the text between its braces (empty
/// when it has none). Names inside string literals, such as label values, are skipped.
fn selectors(expr: &str) -> Vec<(String, String)> {
    let bytes = expr.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if matches!(byte, b'"' | b'\'' | b'`') {
            i = skip_string(bytes, i);
        } else if byte == b'$' {
            // A variable is not a name: skip it whole.
            i += 1;
            while i < bytes.len() && is_name(bytes[i]) {
                i += 1;
            }
        } else if is_name_start(byte) {
            let start = i;
            while i < bytes.len() && is_name(bytes[i]) {
                i += 1;
            }
            let name = &expr[start..i];
            if !is_metric_name(name) {
                continue;
            }
            let mut j = i;
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            let mut matchers = String::new();
            if j < bytes.len() && bytes[j] == b'{' {
                let mut end = j + 1;
                while end < bytes.len() && bytes[end] != b'}' {
                    end = if matches!(bytes[end], b'"' | b'\'' | b'`') {
                        skip_string(bytes, end)
                    } else {
                        end + 1
                    };
                }
                matchers = expr[j + 1..end.min(bytes.len())].to_owned();
                i = end + 1;
            }
            found.push((name.to_owned(), matchers));
        } else {
            i += 1;
        }
    }
    found
}

/// Every `$` reference in `expr`, as written after the `$` (`job`, `{job}`, …).
fn variables(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let end = if rest.starts_with('{') {
            rest.find('}').map_or(rest.len(), |close| close + 1)
        } else {
            rest.bytes().take_while(|&byte| is_name(byte)).count()
        };
        found.push(rest[..end].to_owned());
        rest = &rest[end..];
    }
    found
}

// ---- The dashboard. ----

fn dashboard() -> Value {
    let path = dashboards("iamproxy.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()))
}

/// Every panel, including those nested in (collapsed) rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn collect<'a>(list: &'a Value, into: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            into.push(panel);
            if let Some(nested) = panel.get("panels") {
                collect(nested, into);
            }
        }
    }
    let mut all = Vec::new();
    collect(&dashboard["panels"], &mut all);
    assert!(!all.is_empty(), "the dashboard has no panels");
    all
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

fn title(panel: &Value) -> &str {
    panel["title"].as_str().unwrap_or("<untitled>")
}

/// Every target expression of every panel, with the panel's title.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in panels(dashboard).into_iter().filter(|panel| !is_row(panel)) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((title(panel).to_owned(), expr.to_owned()));
            }
        }
    }
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    exprs
}

fn datasource_variable() -> Value {
    serde_json::json!({"type": "prometheus", "uid": "${datasource}"})
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|variable| variable["name"] == name)
        .unwrap_or_else(|| panic!("the dashboard has no `{name}` variable"))
}

/// A query variable's query: Grafana 10 stores an object, older versions a string.
fn variable_query(variable: &Value) -> &str {
    variable["query"]
        .as_str()
        .or_else(|| variable["query"]["query"].as_str())
        .unwrap_or_default()
}

#[test]
fn dashboard_defines_datasource_job_and_instance_variables() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "iamproxy");
    assert_eq!(dashboard["title"], "iamproxy");

    let datasource = variable(&dashboard, "datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    for (name, query) in [
        ("job", "label_values(iamproxy_build_info, job)"),
        (
            "instance",
            r#"label_values(iamproxy_build_info{job=~"$job"}, instance)"#,
        ),
    ] {
        let variable = variable(&dashboard, name);
        assert_eq!(variable["type"], "query", "variable {name}");
        assert_eq!(variable_query(variable), query, "variable {name}");
        assert_eq!(
            variable["datasource"],
            datasource_variable(),
            "variable {name}"
        );
        assert_eq!(variable["includeAll"], true, "variable {name}");
        assert_eq!(variable["multi"], true, "variable {name}");
        // "All" as `.*` keeps matching instances that appear after the page loaded.
        assert_eq!(variable["allValue"], ".*", "variable {name}");
    }
}

#[test]
fn every_panel_has_a_unique_id_a_position_and_a_described_prometheus_query() {
    let dashboard = dashboard();
    let mut ids = HashSet::new();
    for panel in panels(&dashboard) {
        let title = title(panel);
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no numeric id"));
        assert!(ids.insert(id), "panel {title:?} reuses id {id}");
        for key in ["h", "w", "x", "y"] {
            assert!(
                panel["gridPos"][key].is_u64(),
                "panel {title:?} has no gridPos.{key}"
            );
        }
        if is_row(panel) {
            continue;
        }
        assert_eq!(
            panel["datasource"],
            datasource_variable(),
            "panel {title:?}"
        );
        let description = panel["description"].as_str().unwrap_or_default();
        assert!(
            !description.trim().is_empty(),
            "panel {title:?} has no description"
        );
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or_default();
        assert!(
            UNITS.contains(&unit),
            "panel {title:?} has unit {unit:?}, not one of {UNITS:?}"
        );
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for target in &targets {
            assert_eq!(
                target["datasource"],
                datasource_variable(),
                "a target of panel {title:?}"
            );
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "a target of panel {title:?} has no expr"
            );
        }
    }
}

#[test]
fn dashboard_queries_use_only_job_instance_and_rate_interval_variables() {
    for (title, expr) in dashboard_exprs(&dashboard()) {
        for used in variables(&expr) {
            assert!(
                VARIABLES.contains(&used.as_str()),
                "panel {title:?} uses ${used}, not one of {VARIABLES:?}: {expr}"
            );
        }
    }
}

#[test]
fn every_dashboard_selector_is_scoped_to_the_job_and_instance_variables() {
    for (title, expr) in dashboard_exprs(&dashboard()) {
        let found = selectors(&expr);
        assert!(!found.is_empty(), "panel {title:?} selects nothing: {expr}");
        for (name, matchers) in found {
            let matchers: String = matchers.split_whitespace().collect();
            for required in [r#"job=~"$job""#, r#"instance=~"$instance""#] {
                assert!(
                    matchers.split(',').any(|matcher| matcher == required),
                    "panel {title:?}: selector {name}{{{matchers}}} lacks {required}"
                );
            }
        }
    }
}

#[test]
fn dashboard_queries_name_only_metrics_the_gateway_exports() {
    let known = known_metrics();
    for (title, expr) in dashboard_exprs(&dashboard()) {
        for (name, _) in selectors(&expr) {
            assert!(
                known.contains(&name),
                "panel {title:?} queries {name}, which the gateway does not export"
            );
        }
    }
}

// ---- The rules. ----

fn rules_text() -> String {
    let path = dashboards("alerts.yml");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// The value of a `key: value` line, if `line` is one (a leading `- ` is allowed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let line = line.trim_start();
    let line = line.strip_prefix("- ").unwrap_or(line);
    line.strip_prefix(key)?.strip_prefix(':').map(str::trim)
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// One rule of alerts.yml.
struct Rule {
    /// `record` or `alert`.
    kind: &'static str,
    name: String,
    expr: String,
    /// The rule's lines, from its `- record:`/`- alert:` line on.
    lines: Vec<String>,
}

impl Rule {
    /// The value of the first `key: value` line in the rule.
    fn value(&self, key: &str) -> Option<&str> {
        self.lines.iter().find_map(|line| field(line, key))
    }
}

/// The rules of alerts.yml, in order. Line-based: alerts.yml keeps one rule per
/// `- record:`/`- alert:` item and writes each expr on its line or as a `|` block indented
/// under it.
fn rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let item = line.trim_start().starts_with("- ");
        let Some(kind) = ["record", "alert"]
            .into_iter()
            .find(|kind| item && field(line, kind).is_some())
        else {
            i += 1;
            continue;
        };
        let name = field(line, kind).unwrap_or_default().to_owned();
        let body_indent = indent(line) + 2;
        let mut body = vec![line.to_owned()];
        i += 1;
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) >= body_indent) {
            body.push(lines[i].to_owned());
            i += 1;
        }
        found.push(Rule {
            kind,
            name,
            expr: rule_expr(&body),
            lines: body,
        });
    }
    found
}

fn rule_expr(body: &[String]) -> String {
    let Some(at) = body.iter().position(|line| field(line, "expr").is_some()) else {
        return String::new();
    };
    let value = field(&body[at], "expr").unwrap_or_default();
    if value != "|" && value != ">" {
        return value.to_owned();
    }
    let key_indent = indent(&body[at]);
    body[at + 1..]
        .iter()
        .take_while(|line| line.trim().is_empty() || indent(line) > key_indent)
        .map(|line| line.trim())
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

#[test]
fn alert_rules_pass_promtool_check() {
    promtool(&["check", "rules", "dashboards/alerts.yml"]);
}

#[test]
fn alert_rules_fire_and_stay_quiet_as_their_promtool_unit_tests_expect() {
    let output = promtool(&["test", "rules", "dashboards/alerts_test.yml"]);
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("SUCCESS"), "promtool printed:\n{printed}");
}

#[test]
fn alert_rules_name_only_exported_metrics_and_series_recorded_in_the_same_file() {
    let text = rules_text();
    let rules = rules(&text);
    let recorded: HashSet<&str> = rules
        .iter()
        .filter(|rule| rule.kind == "record")
        .map(|rule| rule.name.as_str())
        .collect();
    assert!(
        recorded.iter().all(|name| name.starts_with("iamproxy:")),
        "recording rules are named iamproxy:…, got {recorded:?}"
    );
    let known = known_metrics();
    for rule in &rules {
        let (kind, name, expr) = (rule.kind, &rule.name, &rule.expr);
        assert!(!expr.is_empty(), "{kind} {name} has no expr");
        let found = selectors(expr);
        assert!(!found.is_empty(), "{kind} {name} selects nothing: {expr}");
        for (metric, _) in found {
            assert!(
                known.contains(&metric) || recorded.contains(metric.as_str()),
                "{kind} {name} queries {metric}, which the gateway does not export \
                 and no rule records"
            );
        }
    }
}

#[test]
fn each_alert_is_defined_once_with_severity_component_and_its_runbook_anchor() {
    let text = rules_text();
    let alerts: Vec<Rule> = rules(&text)
        .into_iter()
        .filter(|rule| rule.kind == "alert")
        .collect();
    let names: Vec<&str> = alerts.iter().map(|rule| rule.name.as_str()).collect();
    assert_eq!(names, ALERTS);
    for alert in &alerts {
        let name = &alert.name;
        let value = |key: &str| alert.value(key);
        assert!(
            matches!(value("severity"), Some("page" | "warn")),
            "{name}: severity is {:?}",
            value("severity")
        );
        assert_eq!(value("component"), Some("iamproxy"), "{name}");
        for key in ["summary", "description"] {
            assert!(value(key).is_some(), "{name} has no {key} annotation");
        }
        let runbook = format!("{RUNBOOK}runbook-{}", name.to_lowercase());
        assert_eq!(value("runbook_url"), Some(runbook.as_str()), "{name}");
    }
}

#[test]
fn every_runbook_anchor_is_a_readme_heading() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    // GitHub and GitLab slugs: lowercase, spaces to '-', punctuation dropped.
    let slugs: HashSet<String> = readme
        .lines()
        .filter(|line| line.starts_with('#'))
        .filter_map(|line| line.trim_start_matches('#').strip_prefix(' '))
        .map(|heading| {
            heading
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();
    for name in ALERTS {
        let anchor = format!("runbook-{}", name.to_lowercase());
        assert!(
            slugs.contains(&anchor),
            "README.md has no heading for the runbook anchor #{anchor}"
        );
    }
}

// ---- The scanner itself. ----

#[test]
fn selector_scanner_skips_label_values_variables_and_functions() {
    let expr = r#"sum by (le) (rate(iamproxy_x_bucket{job=~"$job", route!="iamproxy_fake"}[$__rate_interval]))
        / on (job) iamproxy:recorded and process_open_fds"#;
    assert_eq!(
        selectors(expr),
        vec![
            (
                "iamproxy_x_bucket".to_owned(),
                r#"job=~"$job", route!="iamproxy_fake""#.to_owned()
            ),
            ("iamproxy:recorded".to_owned(), String::new()),
            ("process_open_fds".to_owned(), String::new()),
        ]
    );
    assert_eq!(
        variables(r#"x{a=~"$job",b="${instance}"}[$__rate_interval] $jobs"#),
        ["job", "{instance}", "__rate_interval", "jobs"]
    );
}
