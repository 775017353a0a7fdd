//! Reading the file: errors that name the file and the dotted key, serde's words made
//! readable, and `${NAME}` from the environment.

use super::*;
use std::ffi::OsString;

/// An environment of its own, so tests never touch the process's.
fn env(name: &str) -> Option<OsString> {
    match name {
        "RAILS_HOST" => Some("rails.internal".into()),
        "IAM_SVC" => Some("iam-auth-http".into()),
        "WEIRD" => Some("\" ]\n[evil]\nx = \"".into()),
        _ => None,
    }
}

fn with_env(text: &str) -> Result<Config, String> {
    Config::from_toml_in(text, &env).map_err(|e| e.to_string())
}

#[test]
fn unknown_keys_are_named_by_their_dotted_path() {
    let text = format!("{MINIMAL}timout = \"5s\"\n");
    let msg = err(&text);
    assert!(
        msg.starts_with("rails.timout: unknown key, expected one of url, "),
        "{msg}"
    );
    let nested = with_iam("/unused", "[iam.circuit_breaker]\nbogus_open = 1\n");
    assert!(
        err(&nested).starts_with("iam.circuit_breaker.bogus_open: unknown key"),
        "{}",
        err(&nested)
    );
    let top = err(&format!("{MINIMAL}[bogus_table]\n"));
    assert!(
        top.starts_with("bogus_table: unknown key, expected one of "),
        "{top}"
    );
}

#[test]
fn type_errors_name_the_key_and_say_integer_not_i64() {
    assert_eq!(
        err(&set(MINIMAL, "server", "max_connections", "\"10\"")),
        r#"server.max_connections: invalid type: string "10", expected an integer"#
    );
    assert_eq!(
        err(&set(MINIMAL, "routing", "force_iam", "[\"a\", 1]")),
        "routing.force_iam[1]: invalid type: integer `1`, expected a string"
    );
    assert_eq!(
        err("rails = 1\n"),
        "rails: invalid type: integer `1`, expected a table"
    );
    assert_eq!(
        err(&set(MINIMAL, "server", "trusted_cidrs", "\"10.0.0.0/8\"")),
        r#"server.trusted_cidrs: invalid type: string "10.0.0.0/8", expected an array"#
    );
}

#[test]
fn load_names_the_file_before_the_key() {
    let file = TempFile::with(format!("{MINIMAL}timout = \"5s\"\n").as_bytes());
    let msg = Config::load(file.0.as_path()).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}: rails.timout: unknown key", file.path())),
        "{msg}"
    );
    let syntax = TempFile::with(b"[rails]\nurl = \n");
    let msg = Config::load(syntax.0.as_path()).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}: TOML parse error at line 2", syntax.path())),
        "{msg}"
    );
}

#[test]
fn environment_references_are_replaced_in_string_values() {
    let text = r#"
        [rails]
        url = "http://${RAILS_HOST}:${RAILS_PORT:-3000}"
        [oauth]
        paths = ["${PREFIX:-}/oauth/token"]
        [log]
        level = "${LOG_LEVEL:-warn}"
    "#;
    let c = with_env(text).unwrap();
    assert_eq!(c.rails.url.host, "rails.internal:3000");
    assert_eq!(c.oauth.paths[0].0, "/oauth/token");
    assert_eq!(c.log.level, tracing::Level::WARN);
}

#[test]
fn an_unset_variable_without_a_default_names_the_key_and_the_variable() {
    let text = "[rails]\nurl = \"http://127.0.0.1\"\n[oauth]\npaths = [\"/oauth/token\", \"${ROOT}/oauth/revoke\"]\n";
    assert_eq!(
        with_env(text).unwrap_err(),
        "oauth.paths[1]: environment variable ROOT is not set (\"${ROOT:-default}\" gives it a default)"
    );
}

#[test]
fn a_value_from_the_environment_cannot_change_the_files_structure() {
    // Were the text substituted before parsing, this value would open an [evil] table.
    let text = format!("{MINIMAL}[routing]\nforce_iam = [\"${{WEIRD}}\"]\n");
    let msg = with_env(&text).unwrap_err();
    assert_eq!(
        msg,
        "routing.force_iam[0]: must be a non-empty client id without control characters"
    );
}

#[test]
fn double_dollar_is_a_literal_dollar_and_keys_and_comments_are_left_alone() {
    let text = format!(
        "# ${{NOT_SET}} in a comment\n{MINIMAL}[routing]\nforce_iam = [\"$${{IAM_SVC}}\", \"a$b\"]\n"
    );
    let ids = with_env(&text).unwrap().routing.force_iam;
    assert!(ids.contains("${IAM_SVC}") && ids.contains("a$b"), "{ids:?}");
    let key = with_env(&format!("{MINIMAL}\"${{IAM_SVC}}\" = 1\n")).unwrap_err();
    assert!(
        key.starts_with("rails.\"${IAM_SVC}\": unknown key"),
        "{key}"
    );
}
