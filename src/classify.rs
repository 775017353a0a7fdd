//! Which OAuth endpoint a path is, and which server a request continues with because it
//! carries what that server issued (DESIGN §1, §3).

use crate::params::{Found, Parameters, Tokens};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Authorize,
    AuthorizeDevice,
    Token,
    Revoke,
    Introspect,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Authorize,
        Endpoint::AuthorizeDevice,
        Endpoint::Token,
        Endpoint::Revoke,
        Endpoint::Introspect,
    ];

    /// The canonical path, e.g. "/oauth/authorize_device".
    pub fn default_path(self) -> &'static str {
        match self {
            Endpoint::Authorize => "/oauth/authorize",
            Endpoint::AuthorizeDevice => "/oauth/authorize_device",
            Endpoint::Token => "/oauth/token",
            Endpoint::Revoke => "/oauth/revoke",
            Endpoint::Introspect => "/oauth/introspect",
        }
    }

    /// The endpoint a configured path ends in ("/gitlab/oauth/token" -> Token).
    pub fn from_path_suffix(path: &str) -> Option<Endpoint> {
        Endpoint::ALL
            .into_iter()
            .find(|e| path.ends_with(e.default_path()))
    }

    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Authorize => "authorize",
            Endpoint::AuthorizeDevice => "authorize_device",
            Endpoint::Token => "token",
            Endpoint::Revoke => "revoke",
            Endpoint::Introspect => "introspect",
        }
    }
}

/// The configured OAuth paths. Matching is exact and unnormalised on purpose: whatever is
/// not byte-for-byte an OAuth path stays with Rails, which owns every other route.
#[derive(Debug, Clone)]
pub struct RouteTable {
    // A handful of entries: a linear scan beats hashing the path.
    routes: Box<[(Box<str>, Endpoint)]>,
}

impl RouteTable {
    pub fn new(paths: &[(String, Endpoint)]) -> RouteTable {
        let routes = paths
            .iter()
            .map(|(path, endpoint)| (path.as_str().into(), *endpoint))
            .collect();
        RouteTable { routes }
    }

    /// `path` is `uri.path()`: the query never takes part in the match.
    pub fn classify(&self, path: &str) -> Option<Endpoint> {
        self.routes
            .iter()
            .find(|(route, _)| &**route == path)
            .map(|(_, endpoint)| *endpoint)
    }
}

impl Default for RouteTable {
    fn default() -> RouteTable {
        RouteTable::new(&Endpoint::ALL.map(|e| (e.default_path().to_owned(), e)))
    }
}

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
    use crate::identify::tests::Req;
    use crate::params::TOKEN_PARAMS;

    const VERIFIER_PARAMS: [&str; 2] = ["login_verifier", "consent_verifier"];

    fn prefixes() -> Vec<String> {
        vec!["giat_".to_owned(), "ory_".to_owned()]
    }

    fn continuity_of(endpoint: Endpoint, req: &Req) -> Option<Continuity> {
        continuity(endpoint, &Parameters::read(&req.view(), &prefixes()))
    }

    #[test]
    fn default_table_matches_the_canonical_paths_exactly() {
        let table = RouteTable::default();
        for endpoint in Endpoint::ALL {
            assert_eq!(table.classify(endpoint.default_path()), Some(endpoint));
        }
        for rails in [
            "/oauth/applications",
            "/oauth/device",
            "/oauth/userinfo",
            "/",
            "",
        ] {
            assert_eq!(table.classify(rails), None, "{rails}");
        }
    }

    #[test]
    fn trailing_slash_and_case_are_not_oauth() {
        let table = RouteTable::default();
        for path in [
            "/oauth/token/",
            "/OAUTH/token",
            "/oauth/Token",
            "//oauth/token",
        ] {
            assert_eq!(table.classify(path), None, "{path}");
        }
    }

    #[test]
    fn custom_prefixed_paths_replace_the_defaults() {
        let path = "/gitlab/oauth/token";
        let table = RouteTable::new(&[(path.to_owned(), Endpoint::Token)]);
        assert_eq!(table.classify(path), Some(Endpoint::Token));
        assert_eq!(table.classify("/oauth/token"), None);
        assert_eq!(Endpoint::from_path_suffix(path), Some(Endpoint::Token));
    }

    #[test]
    fn labels_name_the_endpoint() {
        let labels = Endpoint::ALL.map(Endpoint::as_str);
        let expected = [
            "authorize",
            "authorize_device",
            "token",
            "revoke",
            "introspect",
        ];
        assert_eq!(labels, expected);
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
