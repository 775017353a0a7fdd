//! The rollout controls of `[routing]`: the kill switch, where Rails-issued tokens go, the
//! forced lists, and Flipper's percentage-of-actors gate. `proxy::decide::rules` applies
//! them, in order, with the rules that come before them.

use std::collections::HashSet;

/// Where `[routing]` sends requests before anything else is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The local lists and the percentage, then the cache and the pre-authorize backend.
    Preauthorize,
    /// Kill switch: every request to Rails (flows IAM started still finish at IAM).
    Rails,
    /// Isolates IAM, e.g. during an IAM security incident: every request to Rails,
    /// verifiers and IAM-issued codes and tokens included (those flows fail at Rails), and
    /// no pre-authorize call. Nothing the gateway forwards reaches IAM.
    RailsOnly,
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
}
