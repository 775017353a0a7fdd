//! What a request is: which OAuth endpoint its path names, what its query and form body
//! say, which server issued the codes and tokens it carries, and which client application
//! it belongs to.

pub mod assertion;
pub mod identify;
pub mod issuer;
pub mod params;

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

/// The `route` label of a request: its endpoint's, or `other` for everything that is not
/// an OAuth endpoint.
pub fn route_label(endpoint: Option<Endpoint>) -> &'static str {
    endpoint.map_or("other", Endpoint::as_str)
}

/// The configured OAuth paths. Matching is exact and unnormalised on purpose: whatever is
/// not byte-for-byte an OAuth path stays with Rails, which owns every other route.
#[derive(Debug, Clone)]
pub struct Endpoints {
    // A handful of entries: a linear scan beats hashing the path.
    routes: Box<[(Box<str>, Endpoint)]>,
}

impl Endpoints {
    pub fn new(paths: &[(String, Endpoint)]) -> Endpoints {
        let routes = paths
            .iter()
            .map(|(path, endpoint)| (path.as_str().into(), *endpoint))
            .collect();
        Endpoints { routes }
    }

    /// `path` is `uri.path()`: the query never takes part in the match.
    pub fn classify(&self, path: &str) -> Option<Endpoint> {
        self.routes
            .iter()
            .find(|(route, _)| &**route == path)
            .map(|(_, endpoint)| *endpoint)
    }
}

impl Default for Endpoints {
    fn default() -> Endpoints {
        Endpoints::new(&Endpoint::ALL.map(|e| (e.default_path().to_owned(), e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_the_canonical_paths_exactly() {
        let table = Endpoints::default();
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
        let table = Endpoints::default();
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
        let table = Endpoints::new(&[(path.to_owned(), Endpoint::Token)]);
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
}
