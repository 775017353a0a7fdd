//! `log.fields` (static fields on every JSON line) and
//! `server.trusted_cidrs_for_propagation` (whose correlation id is kept).

use super::*;

#[test]
fn log_fields_are_read_sorted_and_default_to_none() {
    assert!(Config::from_toml(MINIMAL).unwrap().log.fields.is_empty());
    let config = Config::from_toml(&format!(
        "{MINIMAL}[log]\nfields = {{ subcomponent = \"workhorse\", env = \"gprd\" }}\n"
    ))
    .unwrap();
    let fields: Vec<(&str, &str)> = config
        .log
        .fields
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    assert_eq!(fields, [("env", "gprd"), ("subcomponent", "workhorse")]);
}

#[test]
fn log_fields_refuse_the_gateways_own_names_and_odd_ones_naming_the_key() {
    let with = |fields: &str| err(&format!("{MINIMAL}[log]\nfields = {{ {fields} }}\n"));
    assert_eq!(
        with(r#"msg = "x""#),
        "log.fields.msg: the gateway's own lines use this field"
    );
    assert_eq!(
        with(r#"correlation_id = "x""#),
        "log.fields.correlation_id: the gateway's own lines use this field"
    );
    assert_eq!(
        with(r#""a b" = "x""#),
        "log.fields.a b: a field name is letters, digits, '_', '-' or '.'"
    );
    let not_a_string = with("subcomponent = 1");
    assert!(not_a_string.contains("string"), "{not_a_string}");
}

#[test]
fn propagation_follows_trusted_cidrs_unless_set_and_names_its_key() {
    let server = |keys: &str| {
        Config::from_toml(&format!("[server]\n{keys}\n{MINIMAL}"))
            .unwrap()
            .server
    };
    let lb = Cidr::parse("10.0.0.0/8").unwrap();
    let both = server(r#"trusted_cidrs = ["10.0.0.0/8"]"#);
    assert_eq!(both.trusted_cidrs_for_propagation, [lb]);
    let neither = server(
        r#"trusted_cidrs = ["10.0.0.0/8"]
trusted_cidrs_for_propagation = []"#,
    );
    assert_eq!(neither.trusted_cidrs, [lb]);
    assert!(neither.trusted_cidrs_for_propagation.is_empty());
    let only_ids = server(r#"trusted_cidrs_for_propagation = ["10.0.0.0/8"]"#);
    assert!(only_ids.trusted_cidrs.is_empty());
    assert_eq!(only_ids.trusted_cidrs_for_propagation, [lb]);
    let msg = err(&set(
        MINIMAL,
        "server",
        "trusted_cidrs_for_propagation",
        r#"["::1", "x"]"#,
    ));
    assert_eq!(
        msg,
        r#"server.trusted_cidrs_for_propagation[1]: invalid CIDR "x""#
    );
}
