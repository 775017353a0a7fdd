//! Which server a request must reach because it carries what that server issued: IAM's
//! verifiers and prefixed codes and tokens go back to IAM, every other code or token to
//! Rails.

use crate::classify::params::{Found, Parameters, Tokens};
use crate::classify::Endpoint;

/// Why a request must reach the server that issued what it carries, whatever its client's
/// current routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// IAM redirected the browser back to `/oauth/authorize` mid-login.
    Verifier,
    /// A code or token IAM issued (an `iam.token_prefixes` prefix): only IAM can redeem it.
    IamToken,
    /// A code or token without an IAM prefix: Rails issued it, so only Rails can refresh,
    /// revoke or introspect it.
    RailsToken,
}

/// Runs before the per-client decision. The verifiers count on `/oauth/authorize`, in the
/// query, once and non-empty; codes and tokens count in the query and the form body,
/// every occurrence, and one IAM-issued value outweighs any other.
///
/// A query or body that could not be read carries nothing that counts.
pub fn continuity(endpoint: Endpoint, params: &Parameters<'_>) -> Option<Continuity> {
    let given = |found: &Found<&[u8]>| matches!(found, Found::One(value) if !value.is_empty());
    let verifier = params
        .query
        .params()
        .is_some_and(|query| given(&query.login_verifier) || given(&query.consent_verifier));
    if endpoint == Endpoint::Authorize && verifier {
        return Some(Continuity::Verifier);
    }
    match params.tokens() {
        Tokens::Iam => Some(Continuity::IamToken),
        Tokens::Rails => Some(Continuity::RailsToken),
        Tokens::None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::params::tests::Req;
    use crate::classify::params::TOKEN_PARAMS;

    const VERIFIER_PARAMS: [&str; 2] = ["login_verifier", "consent_verifier"];

    fn prefixes() -> Vec<String> {
        vec!["giat_".to_owned(), "ory_".to_owned()]
    }

    fn continuity_of(endpoint: Endpoint, req: &Req) -> Option<Continuity> {
        continuity(endpoint, &Parameters::read(&req.view(), &prefixes()))
    }

    #[test]
    fn verifier_in_authorize_query_continues_to_iam() {
        for param in VERIFIER_PARAMS {
            let req = Req::get(&format!("client_id=app&{param}=v123"));
            assert_eq!(
                continuity_of(Endpoint::Authorize, &req),
                Some(Continuity::Verifier),
                "{param}"
            );
        }
    }

    #[test]
    fn verifier_counts_only_on_authorize() {
        let req = Req::get("login_verifier=v123");
        for endpoint in Endpoint::ALL
            .into_iter()
            .filter(|e| *e != Endpoint::Authorize)
        {
            assert_eq!(continuity_of(endpoint, &req), None, "{endpoint:?}");
        }
    }

    #[test]
    fn verifier_counts_only_in_the_query() {
        let req = Req::post_form("login_verifier=v123&consent_verifier=v456");
        assert_eq!(continuity_of(Endpoint::Authorize, &req), None);
    }

    #[test]
    fn empty_verifier_is_ignored() {
        let req = Req::get("login_verifier=&consent_verifier=");
        assert_eq!(continuity_of(Endpoint::Authorize, &req), None);
    }

    #[test]
    fn iam_issued_token_in_query_continues_to_iam() {
        for param in TOKEN_PARAMS {
            for prefix in prefixes() {
                let req = Req::get(&format!("{param}={prefix}abc"));
                assert_eq!(
                    continuity_of(Endpoint::Token, &req),
                    Some(Continuity::IamToken),
                    "{param}={prefix}"
                );
            }
        }
    }

    #[test]
    fn iam_issued_token_in_form_body_continues_to_iam() {
        for param in TOKEN_PARAMS {
            for prefix in prefixes() {
                let req = Req::post_form(&format!("client_id=app&{param}={prefix}abc"));
                assert_eq!(
                    continuity_of(Endpoint::Revoke, &req),
                    Some(Continuity::IamToken),
                    "{param}={prefix}"
                );
            }
        }
    }

    #[test]
    fn token_without_an_iam_prefix_continues_to_rails() {
        for param in TOKEN_PARAMS {
            let req = Req::post_form(&format!("{param}=abc_giat_")).query(&format!("{param}=x"));
            assert_eq!(
                continuity_of(Endpoint::Token, &req),
                Some(Continuity::RailsToken),
                "{param}"
            );
            let req = Req::get(&format!("client_id=app&{param}=abc"));
            assert_eq!(
                continuity_of(Endpoint::Revoke, &req),
                Some(Continuity::RailsToken),
                "{param} in the query"
            );
        }
    }

    #[test]
    fn an_iam_value_and_a_plain_one_continue_to_iam() {
        let req = Req::post_form("refresh_token=plain").query("code=giat_x");
        assert_eq!(
            continuity_of(Endpoint::Token, &req),
            Some(Continuity::IamToken)
        );
        let req = Req::post_form("token=plain&token=ory_x");
        assert_eq!(
            continuity_of(Endpoint::Revoke, &req),
            Some(Continuity::IamToken)
        );
    }

    #[test]
    fn empty_tokens_and_requests_without_one_have_no_continuity() {
        for req in [
            Req::post_form("grant_type=client_credentials&client_id=app"),
            Req::post_form("grant_type=authorization_code&code="),
            Req::get("response_type=code&client_id=app"),
        ] {
            assert_eq!(continuity_of(Endpoint::Token, &req), None);
        }
    }

    #[test]
    fn tokens_in_a_malformed_part_are_not_seen() {
        let req = Req::post_form("refresh_token=giat_x&scope=%ZZ");
        assert_eq!(continuity_of(Endpoint::Token, &req), None);
        let req = Req::post_form("refresh_token=giat_x").query("code=plain&x=%");
        assert_eq!(
            continuity_of(Endpoint::Token, &req),
            Some(Continuity::IamToken),
            "the body is still read"
        );
        let req = Req::get("client_id=a&login_verifier=v&state=%Z");
        assert_eq!(continuity_of(Endpoint::Authorize, &req), None);
    }

    #[test]
    fn token_prefix_is_checked_on_the_decoded_value() {
        let req = Req::post_form("refresh_token=%67iat_abc");
        assert_eq!(
            continuity_of(Endpoint::Token, &req),
            Some(Continuity::IamToken)
        );
    }

    #[test]
    fn token_in_unparsable_body_is_not_seen() {
        let req = Req::post("application/json", "token=giat_abc");
        assert_eq!(continuity_of(Endpoint::Introspect, &req), None);
    }

    #[test]
    fn repeated_token_parameter_still_counts() {
        let req = Req::post_form("code=giat_a&code=giat_a");
        assert_eq!(
            continuity_of(Endpoint::Token, &req),
            Some(Continuity::IamToken)
        );
        let req = Req::post_form("code=a&code=b");
        assert_eq!(
            continuity_of(Endpoint::Token, &req),
            Some(Continuity::RailsToken)
        );
    }

    #[test]
    fn repeated_verifier_does_not_count() {
        let req = Req::get("login_verifier=v&login_verifier=v");
        assert_eq!(continuity_of(Endpoint::Authorize, &req), None);
    }
}
