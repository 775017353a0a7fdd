//! The first step: the file's text into the raw structs. TOML is parsed into a table,
//! `${NAME}` and `${NAME:-default}` in its string values are replaced from the
//! environment, then the table is deserialized; every error names the dotted key it is
//! about (`rails.timout: unknown key`), not only a line and column.
//!
//! Substitution works on parsed string values, never on the text: a value with a quote
//! or a newline in it cannot change the file's structure, and keys and comments are left
//! alone.

use std::ffi::OsString;
use std::fmt::Write as _;

use serde_path_to_error::Segment;
use toml::{Table, Value};

use super::raw::RawConfig;
use super::{invalid, ConfigError};

/// The environment as substitution sees it: a variable's value, `None` when unset.
pub(super) type Environment<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// Parses `text`, substitutes `env` into its string values, and reads the raw structs.
pub(super) fn raw(text: &str, env: Environment<'_>) -> Result<RawConfig, ConfigError> {
    let mut table: Table = toml::from_str(text)
        .map_err(|error| ConfigError::Parse(error.to_string().trim_end().into()))?;
    let mut key = String::new();
    for (name, value) in table.iter_mut() {
        push_key(&mut key, name);
        substitute(value, &mut key, env)?;
        key.clear();
    }
    serde_path_to_error::deserialize(Value::Table(table)).map_err(|error| {
        let mut key = String::new();
        let mut in_headers = false;
        // The path ends at the value refused: an unknown key names itself.
        for segment in error.path() {
            match segment {
                // A header name is always quoted, as the header checks write it.
                Segment::Map { key: name } if in_headers => {
                    let _ = write!(key, ".{name:?}");
                }
                Segment::Map { key: name } | Segment::Enum { variant: name } => {
                    push_key(&mut key, name);
                    in_headers = name == "headers";
                }
                Segment::Seq { index } => {
                    let _ = write!(key, "[{index}]");
                }
                Segment::Unknown => push_key(&mut key, "?"),
            }
        }
        invalid(key, readable(&error.into_inner().to_string()))
    })
}

/// Appends `name` to the dotted `key`, quoted as TOML quotes it unless it is a bare key.
fn push_key(key: &mut String, name: &str) {
    if !key.is_empty() {
        key.push('.');
    }
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        key.push_str(name);
    } else {
        let _ = write!(key, "{name:?}");
    }
}

/// Replaces references in every string inside `value`, which sits at `key`.
fn substitute(
    value: &mut Value,
    key: &mut String,
    env: Environment<'_>,
) -> Result<(), ConfigError> {
    match value {
        Value::String(text) if text.contains('$') => {
            *text = expand(text, env).map_err(|reason| invalid(key.clone(), reason))?;
        }
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                let len = key.len();
                let _ = write!(key, "[{index}]");
                substitute(item, key, env)?;
                key.truncate(len);
            }
        }
        Value::Table(table) => {
            for (name, item) in table.iter_mut() {
                let len = key.len();
                push_key(key, name);
                substitute(item, key, env)?;
                key.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// `${NAME}` becomes NAME's value; `${NAME:-default}` the value, or `default` when NAME is
/// unset or empty (as the shell reads it); `$$` a `$`. Any other `$` stays as it is, so a
/// password with a `$` in it needs no escaping unless a `{` or a `$` follows. What comes
/// from the environment is taken as it is, never expanded again.
fn expand(text: &str, env: Environment<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let Some(reference) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        // The value is not quoted back: it may hold a secret.
        let end = reference
            .find('}')
            .ok_or("\"${\" without a closing \"}\" (write \"$$\" for a literal \"$\")")?;
        let (name, default) = match reference[..end].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&reference[..end], None),
        };
        let valid = name.bytes().next().is_some_and(|b| !b.is_ascii_digit())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "{name:?} is not an environment variable name (letters, digits and _)"
            ));
        }
        let value = env(name)
            .map(|value| {
                value
                    .into_string()
                    .map_err(|_| format!("environment variable {name} is not valid UTF-8"))
            })
            .transpose()?;
        match (value, default) {
            (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (\"${{{name}:-default}}\" gives it a default)"
                ))
            }
        }
        rest = &reference[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// serde's message in the configuration's words: keys and tables rather than fields and
/// maps, "an integer" rather than "i64".
fn readable(message: &str) -> String {
    // toml adds "in `key`" on a line of its own; the key is in front already.
    let message = message.lines().next().unwrap_or_default().trim();
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // "`timout`, expected one of `url`, `timeout`" or "`x`, there are no fields".
        return match rest.split_once(", expected ") {
            Some((_, expected)) => format!("unknown key, expected {}", expected.replace('`', "")),
            None => "unknown key".to_owned(),
        };
    }
    let mut message = message
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number")
        .replace("expected a sequence", "expected an array")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: table");
    if let Some(at) = message.find("expected struct ") {
        message.replace_range(at.., "expected a table");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<OsString> {
        match name {
            "HOST" => Some("rails.internal".into()),
            "EMPTY" => Some("".into()),
            "QUOTED" => Some("a\"b\nc".into()),
            "NESTED" => Some("${HOST}".into()),
            _ => None,
        }
    }

    #[test]
    fn references_defaults_and_dollars_expand_as_documented() {
        for (text, want) in [
            ("http://${HOST}:8080", "http://rails.internal:8080"),
            ("${MISSING:-fallback}", "fallback"),
            ("${EMPTY:-fallback}", "fallback"),
            ("${HOST:-fallback}", "rails.internal"),
            ("${MISSING:-}", ""),
            ("$${HOST}", "${HOST}"),
            ("pa$word", "pa$word"),
            ("a$$b", "a$b"),
            ("end$", "end$"),
            ("${QUOTED}", "a\"b\nc"),
            ("${NESTED}", "${HOST}"),
            ("${HOST}${HOST}", "rails.internalrails.internal"),
        ] {
            assert_eq!(expand(text, &env).as_deref(), Ok(want), "{text}");
        }
    }

    #[test]
    fn unset_unterminated_and_invalid_references_are_refused() {
        assert_eq!(
            expand("x${MISSING}", &env),
            Err(
                "environment variable MISSING is not set (\"${MISSING:-default}\" gives it a default)"
                    .to_owned()
            )
        );
        assert!(expand("${HOST", &env).unwrap_err().contains("closing"));
        for bad in ["${}", "${1X}", "${A-B}", "${A B}"] {
            let reason = expand(bad, &env).unwrap_err();
            assert!(
                reason.contains("is not an environment variable name"),
                "{bad}: {reason}"
            );
        }
    }

    #[test]
    fn push_key_quotes_what_is_not_a_bare_key() {
        let mut key = String::from("iam.headers");
        push_key(&mut key, "X-Gitlab-Svc");
        assert_eq!(key, "iam.headers.X-Gitlab-Svc");
        let mut key = String::from("iam.headers");
        push_key(&mut key, "Bad Name");
        assert_eq!(key, r#"iam.headers."Bad Name""#);
    }

    #[test]
    fn serde_messages_read_in_the_configurations_words() {
        assert_eq!(
            readable("unknown field `timout`, expected one of `url`, `timeout`"),
            "unknown key, expected one of url, timeout"
        );
        assert_eq!(
            readable("unknown field `x`, there are no fields"),
            "unknown key"
        );
        assert_eq!(
            readable("invalid type: string \"10\", expected i64\nin `server.max_connections`\n"),
            "invalid type: string \"10\", expected an integer"
        );
        assert_eq!(
            readable("invalid type: string \"10\", expected i64"),
            "invalid type: string \"10\", expected an integer"
        );
        assert_eq!(
            readable("invalid type: integer `1`, expected struct RawRails"),
            "invalid type: integer `1`, expected a table"
        );
    }
}
