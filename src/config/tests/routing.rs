//! `[routing]`: the modes, where Rails-issued tokens go, the forced lists and the percentage.

use super::*;
use crate::decision::rules::Mode;

#[test]
fn routing_defaults_to_asking_the_pre_authorize_backend() {
    let routing = Config::from_toml(MINIMAL).unwrap().routing;
    assert_eq!(routing, RoutingConfig::default());
    assert_eq!(routing.mode, Mode::Preauthorize);
}

#[test]
fn routing_reads_mode_lists_and_percentage() {
    let text = format!(
        "{MINIMAL}[routing]\nmode = \"iam\"\nforce_iam = [\"a\", \"b\"]\nforce_rails = [\"c\"]\n\
         percentage_of_actors = {{ flag = \"f\", actor = \"App:{{client_id}}!\", percent = 12 }}\n"
    );
    let routing = Config::from_toml(&text).unwrap().routing;
    assert_eq!(routing.mode, Mode::Iam);
    assert!(routing.force_iam.contains("b") && routing.force_rails.contains("c"));
    let gate = routing.percentage.unwrap();
    assert_eq!(
        (gate.actor_prefix.as_str(), gate.actor_suffix.as_str()),
        ("App:", "!")
    );
    assert_eq!(gate.percent, 12.0, "an integer percent is accepted");
}

#[test]
fn routing_mode_names_every_mode() {
    for (text, mode) in [
        ("preauthorize", Mode::Preauthorize),
        ("rails", Mode::Rails),
        ("rails_only", Mode::RailsOnly),
        ("iam", Mode::Iam),
    ] {
        let toml = format!("{MINIMAL}[routing]\nmode = \"{text}\"\n");
        assert_eq!(
            Config::from_toml(&toml).unwrap().routing.mode,
            mode,
            "{text}"
        );
    }
    for near_miss in ["Rails_Only", "rails-only", "railsonly", "rails_only "] {
        assert_eq!(
            err(&format!("{MINIMAL}[routing]\nmode = \"{near_miss}\"\n")),
            r#"routing.mode: must be "preauthorize", "rails", "rails_only" or "iam""#,
            "{near_miss}"
        );
    }
}

#[test]
fn routing_rejects_bad_modes_lists_and_percentages() {
    let routing = |body: &str| err(&format!("{MINIMAL}[routing]\n{body}\n"));
    assert_eq!(
        routing("rails_issued = \"iam\""),
        r#"routing.rails_issued: must be "rails" or "decision""#
    );
    assert_eq!(
        routing("mode = \"off\""),
        r#"routing.mode: must be "preauthorize", "rails", "rails_only" or "iam""#
    );
    assert_eq!(
        routing("force_iam = [\"a\", \"b\", \"a\"]"),
        r#"routing.force_iam[2]: duplicate "a""#
    );
    assert_eq!(
        routing("force_iam = [\"a\"]\nforce_rails = [\"b\", \"a\"]"),
        r#"routing.force_rails: "a" is also in routing.force_iam"#
    );
    assert_eq!(
        routing("force_rails = [\"\"]"),
        "routing.force_rails[0]: must be a non-empty client id without control characters"
    );
    let three = "force_iam = [\"a\", \"b\", \"c\"]\nmax_forced_clients = 2";
    assert_eq!(
        routing(three),
        "routing.force_iam: 3 client ids, more than routing.max_forced_clients (2)"
    );
    let many: Vec<String> = (0..201).map(|n| format!("\"app-{n}\"")).collect();
    assert_eq!(
        routing(&format!("force_rails = [{}]", many.join(", "))),
        "routing.force_rails: 201 client ids, more than routing.max_forced_clients (200)"
    );
    let gate = |inner: &str| routing(&format!("percentage_of_actors = {{ {inner} }}"));
    assert_eq!(
        gate("flag = \"f\", percent = 100.5"),
        "routing.percentage_of_actors.percent: must be from 0 to 100, found 100.5"
    );
    assert_eq!(
        gate("flag = \"f\", actor = \"App\", percent = 1"),
        "routing.percentage_of_actors.actor: must contain {client_id} exactly once"
    );
    assert_eq!(
        gate("percent = 1"),
        "routing.percentage_of_actors.flag: required key is missing"
    );
    assert_eq!(
        gate("flag = \"f\""),
        "routing.percentage_of_actors.percent: required key is missing"
    );
}
