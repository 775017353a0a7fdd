//! Local rollout rules from `[routing]`, evaluated before the decision cache and the
//! pre-authorize backend: the kill switch, the forced lists and Flipper's
//! percentage-of-actors gate.

use std::collections::HashSet;

use crate::decision::{Decision, Destination, Reason};

/// Where `[routing]` sends requests before anything else is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The local lists and the percentage, then the cache and the pre-authorize backend.
    Preauthorize,
    /// Kill switch: every request to Rails (flows IAM started still finish at IAM).
    Rails,
    /// Kill switch the other way: every identified client to IAM.
    Iam,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    pub mode: Mode,
    pub force_iam: HashSet<String>,
    pub force_rails: HashSet<String>,
    pub percentage: Option<PercentageOfActors>,
}

impl Default for RoutingConfig {
    fn default() -> RoutingConfig {
        RoutingConfig {
            mode: Mode::Preauthorize,
            force_iam: HashSet::new(),
            force_rails: HashSet::new(),
            percentage: None,
        }
    }
}

impl RoutingConfig {
    /// The kill switch towards Rails, which applies even to requests with no client id.
    pub fn all_to_rails(&self) -> bool {
        self.mode == Mode::Rails
    }

    /// The rule that decides for `client_id` before the cache, if any (for the admin API:
    /// the request path checks continuity and unknown clients between the two).
    pub fn rule_for(&self, client_id: &str) -> Option<Decision> {
        if self.all_to_rails() {
            return Some(Decision::rails(Reason::KillSwitch));
        }
        self.decide(client_id)
    }

    /// The rules for an identified client, in precedence order: kill switch to IAM,
    /// `force_rails`, `force_iam`, then the percentage (which only ever adds clients to
    /// IAM; the others fall through to the cache and the pre-authorize backend).
    pub fn decide(&self, client_id: &str) -> Option<Decision> {
        let to = |destination, reason| {
            Some(Decision {
                destination,
                reason,
            })
        };
        if self.mode == Mode::Iam {
            return to(Destination::Iam, Reason::KillSwitch);
        }
        if self.force_rails.contains(client_id) {
            return to(Destination::Rails, Reason::ForceRails);
        }
        if self.force_iam.contains(client_id) {
            return to(Destination::Iam, Reason::ForceIam);
        }
        match &self.percentage {
            Some(gate) if gate.enabled(client_id) => to(Destination::Iam, Reason::Percentage),
            _ => None,
        }
    }
}

/// Flipper's percentage-of-actors gate, bit for bit, so the gateway and Rails agree on
/// which clients a percentage includes.
#[derive(Debug, Clone, PartialEq)]
pub struct PercentageOfActors {
    pub flag: String,
    /// The actor's Flipper id around the client id, e.g. `Authn::OauthApplication:` + id.
    pub actor_prefix: String,
    pub actor_suffix: String,
    /// 0 to 100; fractions allowed.
    pub percent: f64,
}

impl PercentageOfActors {
    /// The placeholder an `actor` template holds once.
    pub const PLACEHOLDER: &'static str = "{client_id}";

    /// `Zlib.crc32("#{flag}#{actor}") % (100 * 1_000) < percentage * 1_000`, in f64 as
    /// Ruby compares an Integer with a Float.
    pub fn enabled(&self, client_id: &str) -> bool {
        let bucket = self.bucket(client_id);
        f64::from(bucket) < self.percent * f64::from(SCALING)
    }

    /// Where the client falls in 0..100_000.
    pub fn bucket(&self, client_id: &str) -> u32 {
        let mut crc = crc32fast::Hasher::new();
        for part in [
            &self.flag,
            &self.actor_prefix,
            client_id,
            &self.actor_suffix,
        ] {
            crc.update(part.as_bytes());
        }
        crc.finalize() % (100 * SCALING)
    }
}

/// Flipper's `PercentageOfActors::SCALING_FACTOR`.
const SCALING: u32 = 1_000;

#[cfg(test)]
mod tests {
    use super::*;

    const FLAG: &str = "proxy_oauth_requests_to_iam_service";

    fn gate(percent: f64) -> PercentageOfActors {
        PercentageOfActors {
            flag: FLAG.to_string(),
            actor_prefix: "Authn::OauthApplication:".to_string(),
            actor_suffix: String::new(),
            percent,
        }
    }

    #[test]
    fn buckets_match_flippers_golden_vectors() {
        for (id, bucket) in [("1", 90536), ("2", 47698), ("3", 35172), ("42", 37976)] {
            assert_eq!(gate(0.0).bucket(id), bucket, "actor {id}");
        }
        // 35172 < 35.173 * 1000, but not < 35.172 * 1000: the comparison is strict, in f64.
        assert!(gate(35.173).enabled("3"));
        assert!(!gate(35.172).enabled("3"));
        assert!(!gate(0.0).enabled("3"));
        assert!(gate(100.0).enabled("1"));
    }

    #[test]
    fn raising_the_percentage_only_ever_adds_clients() {
        let ids: Vec<String> = (0..5_000).map(|n| format!("app-{n}")).collect();
        let steps = [0.0, 0.5, 1.0, 5.0, 12.5, 25.0, 50.0, 99.999, 100.0];
        let mut previous: HashSet<&str> = HashSet::new();
        for percent in steps {
            let enabled: HashSet<&str> = ids
                .iter()
                .map(String::as_str)
                .filter(|id| gate(percent).enabled(id))
                .collect();
            assert!(previous.is_subset(&enabled), "{percent}% dropped a client");
            previous = enabled;
        }
        assert_eq!(previous.len(), ids.len(), "100% is everyone");
        let half = ids.iter().filter(|id| gate(50.0).enabled(id)).count();
        assert!((2_250..2_750).contains(&half), "50% is about half: {half}");
    }

    fn routing(mode: Mode) -> RoutingConfig {
        RoutingConfig {
            mode,
            force_iam: HashSet::from(["forced-iam".to_string()]),
            force_rails: HashSet::from(["forced-rails".to_string()]),
            percentage: Some(gate(100.0)),
        }
    }

    fn decided(routing: &RoutingConfig, id: &str) -> Option<(Destination, Reason)> {
        routing.decide(id).map(|d| (d.destination, d.reason))
    }

    #[test]
    fn rules_apply_in_precedence_order() {
        let preauthorize = routing(Mode::Preauthorize);
        assert!(!preauthorize.all_to_rails());
        assert_eq!(
            decided(&preauthorize, "forced-rails"),
            Some((Destination::Rails, Reason::ForceRails)),
            "force_rails beats a 100% gate"
        );
        assert_eq!(
            decided(&preauthorize, "forced-iam"),
            Some((Destination::Iam, Reason::ForceIam))
        );
        assert_eq!(
            decided(&preauthorize, "anyone"),
            Some((Destination::Iam, Reason::Percentage))
        );

        let iam = routing(Mode::Iam);
        assert_eq!(
            decided(&iam, "forced-rails"),
            Some((Destination::Iam, Reason::KillSwitch)),
            "the kill switch beats the lists"
        );
        assert!(routing(Mode::Rails).all_to_rails());
        assert_eq!(
            routing(Mode::Rails).rule_for("forced-iam"),
            Some(Decision::rails(Reason::KillSwitch))
        );
        assert_eq!(
            preauthorize.rule_for("forced-iam"),
            preauthorize.decide("forced-iam")
        );
    }

    #[test]
    fn without_rules_the_decision_falls_through_to_pre_authorize() {
        let plain = RoutingConfig::default();
        assert!(!plain.all_to_rails());
        assert_eq!(plain.decide("anyone"), None);
        let low = RoutingConfig {
            percentage: Some(gate(0.0)),
            ..RoutingConfig::default()
        };
        assert_eq!(low.decide("1"), None, "outside the percentage: ask Rails");
    }
}
