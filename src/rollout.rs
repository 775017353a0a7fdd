//! Every routing rule that decides before the decision cache and the pre-authorize backend,
//! in one ordered function ([`RoutingConfig::decide`]): IAM configured at all, flow
//! continuity and the issuer of a code or token, then `[routing]`'s kill switch, forced
//! lists and Flipper's percentage-of-actors gate.

use std::collections::HashSet;

use crate::classify::Continuity;
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

/// Where `routing.rails_issued` sends a code or token without an IAM prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RailsIssued {
    /// To Rails, which issued it (`reason="rails_issued"`), without a pre-authorize call.
    Rails,
    /// Wherever the application's decision says: for the day IAM has imported Rails' tokens.
    Decision,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    pub mode: Mode,
    pub rails_issued: RailsIssued,
    pub force_iam: HashSet<String>,
    pub force_rails: HashSet<String>,
    pub percentage: Option<PercentageOfActors>,
}

impl Default for RoutingConfig {
    fn default() -> RoutingConfig {
        RoutingConfig {
            mode: Mode::Preauthorize,
            rails_issued: RailsIssued::Rails,
            force_iam: HashSet::new(),
            force_rails: HashSet::new(),
            percentage: None,
        }
    }
}

/// What the rules before the cache make of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule<'a> {
    Decided(Decision),
    /// No rule applies: the decision cache (and behind it the backend) decides for this client.
    AskCache(&'a str),
}

impl RoutingConfig {
    /// Every rule before the decision cache, in order; the request path and the admin API
    /// both ask this, so they cannot disagree.
    ///
    /// 1. no `[iam]`: Rails (`iam_disabled`);
    /// 2. a verifier or an IAM-issued code or token: IAM (`continuity`), even under the
    ///    kill switch, since Rails cannot redeem it;
    /// 3. a code or token Rails issued: Rails (`rails_issued`), unless
    ///    `rails_issued = "decision"`, which lets it fall through;
    /// 4. `mode = "rails"`: Rails (`kill_switch`);
    /// 5. no single client id: Rails (`unknown_client`);
    /// 6. `mode = "iam"`: IAM (`kill_switch`);
    /// 7. `force_rails`, then `force_iam`;
    /// 8. inside `percentage_of_actors`: IAM (`percentage`); the others fall through, so
    ///    raising it only ever adds clients;
    /// 9. otherwise the cache decides.
    pub fn decide<'a>(
        &self,
        iam_enabled: bool,
        continuity: Option<Continuity>,
        client_id: Option<&'a str>,
    ) -> Rule<'a> {
        let to = |destination, reason| {
            Rule::Decided(Decision {
                destination,
                reason,
            })
        };
        if !iam_enabled {
            return to(Destination::Rails, Reason::IamDisabled);
        }
        match continuity {
            Some(Continuity::Verifier | Continuity::IamToken) => {
                return to(Destination::Iam, Reason::Continuity)
            }
            Some(Continuity::RailsToken) if self.rails_issued == RailsIssued::Rails => {
                return to(Destination::Rails, Reason::RailsIssued)
            }
            Some(Continuity::RailsToken) | None => {}
        }
        if self.mode == Mode::Rails {
            return to(Destination::Rails, Reason::KillSwitch);
        }
        let Some(client_id) = client_id else {
            return to(Destination::Rails, Reason::UnknownClient);
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
            _ => Rule::AskCache(client_id),
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
            ..RoutingConfig::default()
        }
    }

    fn decided(
        routing: &RoutingConfig,
        continuity: Option<Continuity>,
        id: Option<&str>,
    ) -> Option<(Destination, Reason)> {
        match routing.decide(true, continuity, id) {
            Rule::Decided(d) => Some((d.destination, d.reason)),
            Rule::AskCache(asked) => {
                assert_eq!(Some(asked), id, "the cache is asked about this client");
                None
            }
        }
    }

    #[test]
    fn rules_apply_in_precedence_order() {
        let preauthorize = routing(Mode::Preauthorize);
        assert_eq!(
            decided(&preauthorize, None, Some("forced-rails")),
            Some((Destination::Rails, Reason::ForceRails)),
            "force_rails beats a 100% gate"
        );
        assert_eq!(
            decided(&preauthorize, None, Some("forced-iam")),
            Some((Destination::Iam, Reason::ForceIam))
        );
        assert_eq!(
            decided(&preauthorize, None, Some("anyone")),
            Some((Destination::Iam, Reason::Percentage))
        );
        assert_eq!(
            decided(&preauthorize, None, None),
            Some((Destination::Rails, Reason::UnknownClient))
        );

        let iam = routing(Mode::Iam);
        assert_eq!(
            decided(&iam, None, Some("forced-rails")),
            Some((Destination::Iam, Reason::KillSwitch)),
            "the kill switch beats the lists"
        );
        assert_eq!(
            decided(&iam, None, None),
            Some((Destination::Rails, Reason::UnknownClient)),
            "an unknown client is Rails' even with every identified one at IAM"
        );
        let rails = routing(Mode::Rails);
        for id in [Some("forced-iam"), None] {
            assert_eq!(
                decided(&rails, None, id),
                Some((Destination::Rails, Reason::KillSwitch))
            );
        }
    }

    #[test]
    fn without_iam_everything_is_rails_whatever_it_carries() {
        for continuity in [None, Some(Continuity::IamToken), Some(Continuity::Verifier)] {
            let decision = routing(Mode::Iam).decide(false, continuity, Some("forced-iam"));
            assert_eq!(
                decision,
                Rule::Decided(Decision::rails(Reason::IamDisabled))
            );
        }
    }

    #[test]
    fn codes_and_tokens_go_to_their_issuer_before_any_other_rule() {
        for mode in [Mode::Preauthorize, Mode::Rails, Mode::Iam] {
            let routing = routing(mode);
            for id in [
                Some("forced-iam"),
                Some("forced-rails"),
                Some("anyone"),
                None,
            ] {
                for iam_issued in [Continuity::Verifier, Continuity::IamToken] {
                    assert_eq!(
                        decided(&routing, Some(iam_issued), id),
                        Some((Destination::Iam, Reason::Continuity)),
                        "{mode:?} {id:?} {iam_issued:?}"
                    );
                }
                assert_eq!(
                    decided(&routing, Some(Continuity::RailsToken), id),
                    Some((Destination::Rails, Reason::RailsIssued)),
                    "{mode:?} {id:?}"
                );
            }
        }
    }

    #[test]
    fn rails_issued_decision_lets_rails_tokens_follow_the_application() {
        let follow = |mode| RoutingConfig {
            rails_issued: RailsIssued::Decision,
            ..routing(mode)
        };
        let token = Some(Continuity::RailsToken);
        let preauthorize = follow(Mode::Preauthorize);
        assert_eq!(
            decided(&preauthorize, token, Some("forced-rails")),
            decided(&preauthorize, None, Some("forced-rails"))
        );
        assert_eq!(
            decided(&preauthorize, token, Some("anyone")),
            Some((Destination::Iam, Reason::Percentage))
        );
        assert_eq!(
            decided(&follow(Mode::Iam), token, Some("forced-rails")),
            Some((Destination::Iam, Reason::KillSwitch))
        );
        assert_eq!(
            decided(&follow(Mode::Rails), token, Some("forced-iam")),
            Some((Destination::Rails, Reason::KillSwitch))
        );
        assert_eq!(
            decided(
                &follow(Mode::Preauthorize),
                Some(Continuity::IamToken),
                Some("forced-rails")
            ),
            Some((Destination::Iam, Reason::Continuity)),
            "IAM's own values still go to IAM"
        );
    }

    #[test]
    fn without_rules_the_decision_falls_through_to_the_cache() {
        let plain = RoutingConfig::default();
        assert_eq!(decided(&plain, None, Some("anyone")), None);
        let low = RoutingConfig {
            percentage: Some(gate(0.0)),
            ..RoutingConfig::default()
        };
        assert_eq!(
            decided(&low, None, Some("1")),
            None,
            "outside the percentage"
        );
    }
}
