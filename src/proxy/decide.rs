//! Where an OAuth request goes: every rule before the decision cache in one ordered
//! function ([`rules`], which the admin API asks too), then the decision cache and behind
//! it the pre-authorize backend, and the decision logged.

use std::time::Instant;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};

use super::access::{is_logged, log_str, retain, trace_id};
use super::{spans, Exchange};
use crate::classify::identify::identify;
use crate::classify::issuer::{continuity, Continuity};
use crate::classify::params::{Parameters, RequestView};
use crate::classify::Endpoint;
use crate::decision::cache::Lookup;
use crate::decision::preauth::PreauthError;
use crate::decision::rules::{Mode, RailsIssued, RoutingConfig};
use crate::decision::{Decision, Destination, Reason};
use crate::forward::client::Upstream;
use crate::forward::Head;
use crate::observe::logging::{json_key, Encoded};
use crate::observe::trace::context::TRACEPARENT;
use crate::observe::trace::Hop;
use crate::state::{AppState, IamUpstream};

/// What the rules before the cache make of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule<'a> {
    Decided(Decision),
    /// No rule applies: the decision cache (and behind it the backend) decides for this client.
    AskCache(&'a str),
}

/// Every rule before the decision cache, in order; the request path and the admin API
/// both ask this, so they cannot disagree.
///
/// 1. no `[iam]`: Rails (`iam_disabled`);
/// 2. `mode = "rails_only"`: Rails (`kill_switch`), whatever the request carries: the
///    switch that isolates IAM, so it outranks continuity;
/// 3. a verifier or an IAM-issued code or token: IAM (`continuity`), even under the
///    kill switch `mode = "rails"`, since Rails cannot redeem it;
/// 4. a code or token Rails issued: Rails (`rails_issued`), unless
///    `rails_issued = "decision"`, which lets it fall through;
/// 5. `mode = "rails"`: Rails (`kill_switch`);
/// 6. no single client id: Rails (`unknown_client`);
/// 7. `mode = "iam"`: IAM (`kill_switch`);
/// 8. `force_rails`, then `force_iam`;
/// 9. inside `percentage_of_actors`: IAM (`percentage`); the others fall through, so
///    raising it only ever adds clients;
/// 10. otherwise the cache decides.
pub fn rules<'a>(
    routing: &RoutingConfig,
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
    if routing.mode == Mode::RailsOnly {
        return to(Destination::Rails, Reason::KillSwitch);
    }
    match continuity {
        Some(Continuity::Verifier | Continuity::IamToken) => {
            return to(Destination::Iam, Reason::Continuity)
        }
        Some(Continuity::RailsToken) if routing.rails_issued == RailsIssued::Rails => {
            return to(Destination::Rails, Reason::RailsIssued)
        }
        Some(Continuity::RailsToken) | None => {}
    }
    if routing.mode == Mode::Rails {
        return to(Destination::Rails, Reason::KillSwitch);
    }
    let Some(client_id) = client_id else {
        return to(Destination::Rails, Reason::UnknownClient);
    };
    if routing.mode == Mode::Iam {
        return to(Destination::Iam, Reason::KillSwitch);
    }
    if routing.force_rails.contains(client_id) {
        return to(Destination::Rails, Reason::ForceRails);
    }
    if routing.force_iam.contains(client_id) {
        return to(Destination::Iam, Reason::ForceIam);
    }
    match &routing.percentage {
        Some(gate) if gate.enabled(client_id) => to(Destination::Iam, Reason::Percentage),
        _ => Rule::AskCache(client_id),
    }
}

/// Decides where an OAuth request goes, and logs the decision.
pub(super) async fn decide(
    exchange: &mut Exchange<'_>,
    endpoint: Endpoint,
    head: &Head,
    body: &Bytes,
) -> Decision {
    let state = exchange.state;
    let view = RequestView {
        method: &head.method,
        query: head.uri.query(),
        headers: &head.headers,
        body,
    };
    let prefixes = state
        .iam
        .as_ref()
        .map_or(&[][..], |iam| &iam.token_prefixes[..]);
    let params = Parameters::read(&view, prefixes);
    let identity = identify(&head.headers, &params);
    let client_id = identity.client_id();
    let rule = rules(
        &state.config.routing,
        state.iam.is_some(),
        continuity(endpoint, &params),
        client_id,
    );
    let decision = match (rule, &state.iam) {
        (Rule::Decided(decision), _) => decision,
        (Rule::AskCache(client_id), Some(iam)) => ask_cache(state, iam, client_id, head).await,
        // The rules never defer to the cache without IAM.
        (Rule::AskCache(_), None) => Decision::rails(Reason::IamDisabled),
    };
    state.metrics.decision(decision);
    if is_logged() {
        Encoded::with(|line| {
            line.str(json_key!("correlation_id"), log_str(&head.request_id))
                .str(json_key!("client_id"), client_id.unwrap_or(""))
                .name(json_key!("identification"), identity.label())
                .name(json_key!("route"), endpoint.as_str())
                .name(json_key!("destination"), decision.destination.as_str())
                .name(json_key!("reason"), decision.reason.as_str());
            trace_id(line, head.trace.as_ref());
            tracing::info!(fields = ?line.pairs(), "iamproxy: routing decision");
        });
    }
    exchange.access.client_id = client_id.map(|id| retain(body, id));
    exchange.access.reason = Some(decision.reason);
    decision
}

/// The `traceparent` of the pre-authorize call: its own span's when the request is
/// recorded, else the server span's, as every upstream gets; none with tracing off.
fn traceparent<'a>(head: &'a Head, hop: Option<&'a Hop>) -> Option<&'a HeaderValue> {
    match hop {
        Some(hop) => Some(&hop.traceparent),
        None => head
            .trace
            .as_ref()
            .and_then(|_| head.headers.get(&TRACEPARENT)),
    }
}

async fn ask_cache(state: &AppState, iam: &IamUpstream, client_id: &str, head: &Head) -> Decision {
    let request_id = &head.request_id;
    // The call is made (and boxed) only on a miss: a hit should not carry its state.
    let fetch = async {
        Box::pin(async {
            let started = Instant::now();
            let hop = spans::hop(head);
            let answer = iam
                .preauth
                .ask(client_id, request_id, traceparent(head, hop.as_deref()))
                .await;
            state
                .metrics
                .preauthorize(answer.as_ref().err(), started.elapsed());
            let (address, path) = iam.preauth.address();
            let call = Some((&Method::POST, path));
            spans::record(
                state,
                head,
                hop,
                Upstream::Preauthorize,
                address,
                call,
                |span| match &answer {
                    Ok(answer) => span
                        .status(StatusCode::OK)
                        .str("iamproxy.destination", answer.destination.as_str()),
                    Err(error) => span.error(error.outcome().as_str(), error.to_string()),
                },
            );
            answer
        })
        .await
    };
    let lookup = state.cache.lookup(client_id, fetch).await;
    match &lookup {
        Lookup::Hit(_) => state.metrics.cache_hit(),
        Lookup::Fetched(_) | Lookup::Stale(..) | Lookup::Failed(_) => state.metrics.cache_miss(),
    }
    let failed = |error: &PreauthError, msg: &str| {
        tracing::warn!(
            correlation_id = log_str(request_id),
            client_id,
            outcome = error.outcome().as_str(),
            error = %error,
            "{msg}"
        );
    };
    match lookup {
        Lookup::Hit(destination) => Decision {
            destination,
            reason: Reason::Cache,
        },
        Lookup::Fetched(destination) => Decision {
            destination,
            reason: Reason::Preauthorize,
        },
        Lookup::Stale(destination, error) => {
            failed(
                &error,
                "iamproxy: pre-authorize failed, serving the last good decision",
            );
            Decision {
                destination,
                reason: Reason::Stale,
            }
        }
        Lookup::Failed(error) => {
            failed(&error, "iamproxy: pre-authorize failed, routing to rails");
            Decision::rails(Reason::PreauthorizeError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::rules::PercentageOfActors;
    use std::collections::HashSet;

    const FLAG: &str = "proxy_oauth_requests_to_iam_service";

    fn gate(percent: f64) -> PercentageOfActors {
        PercentageOfActors {
            flag: FLAG.to_string(),
            actor_prefix: "Authn::OauthApplication:".to_string(),
            actor_suffix: String::new(),
            percent,
        }
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
        match rules(routing, true, continuity, id) {
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
    fn rails_only_sends_everything_to_rails_continuity_included() {
        for rails_issued in [RailsIssued::Rails, RailsIssued::Decision] {
            let rails_only = RoutingConfig {
                rails_issued,
                ..routing(Mode::RailsOnly)
            };
            for continuity in [
                None,
                Some(Continuity::Verifier),
                Some(Continuity::IamToken),
                Some(Continuity::RailsToken),
            ] {
                for id in [Some("forced-iam"), Some("anyone"), None] {
                    assert_eq!(
                        decided(&rails_only, continuity, id),
                        Some((Destination::Rails, Reason::KillSwitch)),
                        "{rails_issued:?} {continuity:?} {id:?}"
                    );
                }
            }
        }
        assert_eq!(
            rules(&routing(Mode::RailsOnly), false, None, Some("anyone")),
            Rule::Decided(Decision::rails(Reason::IamDisabled)),
            "without [iam], the reason stays iam_disabled"
        );
    }

    #[test]
    fn without_iam_everything_is_rails_whatever_it_carries() {
        for continuity in [None, Some(Continuity::IamToken), Some(Continuity::Verifier)] {
            let decision = rules(&routing(Mode::Iam), false, continuity, Some("forced-iam"));
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
