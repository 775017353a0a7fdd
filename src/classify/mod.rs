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

/// The configured OAuth paths, matched the way Rails' router matches a request path, so
/// that whatever Rails routes to an OAuth endpoint is that endpoint here too and cannot
/// reach it as plain Rails traffic. Rails (`Journey::Router::Utils.normalize_path`, then
/// Doorkeeper's `(.:format)` routes) squeezes repeated slashes anywhere, drops a trailing
/// slash, and takes an optional `.format`: `//oauth//token`, `/oauth/token/`,
/// `/oauth/token.json` and `/oauth/token.json/` are all Doorkeeper's token endpoint (tried
/// against Debian's Doorkeeper 5.5 on Rails 6.1). Nothing else is: case, percent-encoding,
/// `/oauth/token/.json`, `/oauth/token.a.b` and a bare `/oauth/token.` are not routed by
/// Rails either, so they stay plain Rails traffic. The path is only read: the request is
/// forwarded with the path it came with.
#[derive(Debug, Clone)]
pub struct Endpoints {
    // A handful of entries: a linear scan beats hashing the path.
    routes: Box<[(Box<[u8]>, Endpoint)]>,
    /// The first byte after the leading slashes of every route (`o` for the defaults): a
    /// path that starts with none of them, like `/api/v4/…` and nearly every other request
    /// of the app server, is rejected after reading two bytes.
    leads: Box<[u8]>,
}

impl Endpoints {
    pub fn new(paths: &[(String, Endpoint)]) -> Endpoints {
        let routes: Box<[(Box<[u8]>, Endpoint)]> = paths
            .iter()
            .map(|(path, endpoint)| (normalize(path).into(), *endpoint))
            .collect();
        let mut leads: Vec<u8> = routes
            .iter()
            .filter_map(|(route, _)| route.get(1).copied())
            .collect();
        leads.sort_unstable();
        leads.dedup();
        Endpoints {
            routes,
            leads: leads.into(),
        }
    }

    /// `path` is `uri.path()`: the query never takes part in the match. Allocates nothing.
    pub fn classify(&self, path: &str) -> Option<Endpoint> {
        let path = path.as_bytes();
        let lead = path.iter().find(|&&b| b != b'/')?;
        if !self.leads.contains(lead) {
            return None;
        }
        // The canonical spelling first: what nearly every OAuth request uses.
        let exact = self.routes.iter().find(|(route, _)| **route == *path);
        exact
            .or_else(|| self.routes.iter().find(|(route, _)| routes_to(route, path)))
            .map(|(_, endpoint)| *endpoint)
    }
}

/// A configured path as Rails' router would normalize it: one leading slash, no repeated
/// or trailing slash.
fn normalize(path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + 1);
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        out.push(b'/');
        out.extend_from_slice(segment.as_bytes());
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// Whether Rails' router sends `path` to `route` (normalized): each of the route's slashes
/// may be any run of slashes, then the path may end with a `.format` (one or more bytes,
/// neither `/` nor `.`, Rails' default format requirement) and slashes. One pass over the
/// bytes, stopping at the first that cannot match.
fn routes_to(route: &[u8], path: &[u8]) -> bool {
    // Squeezing only removes bytes, so a shorter path cannot be the route.
    if path.len() < route.len() {
        return false;
    }
    let mut p = 0;
    for &r in route {
        if path.get(p) != Some(&r) {
            return false;
        }
        p += 1;
        if r == b'/' {
            while path.get(p) == Some(&b'/') {
                p += 1;
            }
        }
    }
    let rest = &path[p..];
    let rest = &rest[..rest.len() - rest.iter().rev().take_while(|&&b| b == b'/').count()];
    match rest {
        [] => true,
        [b'.', format @ ..] => {
            !format.is_empty() && !format.iter().any(|&b| b == b'/' || b == b'.')
        }
        _ => false,
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
    fn paths_rails_routes_to_an_endpoint_are_that_endpoint() {
        let table = Endpoints::default();
        for endpoint in Endpoint::ALL {
            let canonical = endpoint.default_path();
            let inner = canonical.replacen("/oauth/", "/oauth//", 1);
            let variants = [
                format!("{canonical}/"),
                format!("{canonical}//"),
                format!("/{canonical}"),
                format!("///{canonical}"),
                inner.clone(),
                format!("/{inner}/"),
                format!("{canonical}.json"),
                format!("{canonical}.json/"),
                format!("{canonical}.xml"),
                format!("{canonical}.%6Ason"),
                format!("/{inner}.json//"),
            ];
            for path in variants {
                assert_eq!(table.classify(&path), Some(endpoint), "{path}");
            }
        }
    }

    #[test]
    fn paths_rails_does_not_route_stay_rails_traffic() {
        let table = Endpoints::default();
        for path in [
            "/OAUTH/token",
            "/oauth/Token",
            "/oauth/%74oken",
            "/oauth%2Ftoken",
            "/oauth/token.",
            "/oauth/token./",
            "/oauth/token..json",
            "/oauth/token.json.json",
            "/oauth/token/.json",
            "/oauth/token/json",
            "/oauth/tokens",
            "/oauth/token/info",
            "/oauth/tokenjson",
            "/oauthtoken",
            "/x/oauth/token",
            "/oauth/token/../token",
            "/api/v4/oauth/token",
            "/",
            "//",
            "",
        ] {
            assert_eq!(table.classify(path), None, "{path}");
        }
    }

    /// Rails' router, as `ActionDispatch::Routing::RouteSet#call` and Journey read a path:
    /// `normalize_path` (prepend `/`, squeeze slashes, strip the trailing one), then the
    /// route's regexp `\A/oauth/token(?:\.([^/.?]+))?\Z`. Written the slow, allocating way
    /// on purpose, to check the byte walker against.
    fn rails_routes(route: &str, path: &str) -> bool {
        let mut normalized = String::from("/");
        for c in path.chars() {
            if !(c == '/' && normalized.ends_with('/')) {
                normalized.push(c);
            }
        }
        if normalized.len() > 1 && normalized.ends_with('/') {
            normalized.pop();
        }
        match normalized.strip_prefix(route) {
            Some("") => true,
            Some(rest) => rest
                .strip_prefix('.')
                .is_some_and(|format| !format.is_empty() && !format.contains(['/', '.', '?'])),
            None => false,
        }
    }

    /// A path near an OAuth route: its segments, each behind a run of zero to three
    /// slashes (or swapped for a near miss), then a suffix and trailing slashes.
    fn near_route() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let segment = prop_oneof![
            4 => proptest::sample::select(vec!["oauth", "token", "revoke", "gitlab"]),
            1 => proptest::sample::select(vec!["Token", "%74oken", "authorize_device", "tok", ""]),
        ];
        (
            proptest::collection::vec((0..4usize, segment), 1..4),
            proptest::sample::select(vec![
                "", "", ".json", ".xml", ".", ".a.b", "/.json", "x", "..json", ".%6A", "/info",
            ]),
            0..3usize,
        )
            .prop_map(|(segments, suffix, trailing)| {
                let mut path = String::new();
                for (slashes, segment) in segments {
                    path.push_str(&"/".repeat(slashes));
                    path.push_str(segment);
                }
                path.push_str(suffix);
                path.push_str(&"/".repeat(trailing));
                // hyper's `uri.path()` always starts with one.
                format!("/{path}")
            })
    }

    proptest::proptest! {
        /// On paths near the routes and on arbitrary ones, the gateway finds exactly the
        /// endpoint Rails' router would.
        #[test]
        fn classification_agrees_with_rails_router(
            path in proptest::prop_oneof![
                4 => near_route(),
                1 => "/[/a-z._%]{0,24}",
            ],
            custom in proptest::bool::ANY,
        ) {
            let table = if custom {
                Endpoints::new(&[
                    ("/gitlab/oauth/token".to_owned(), Endpoint::Token),
                    ("/oauth/revoke".to_owned(), Endpoint::Revoke),
                ])
            } else {
                Endpoints::default()
            };
            let expected = table
                .routes
                .iter()
                .find(|(route, _)| rails_routes(std::str::from_utf8(route).unwrap(), &path))
                .map(|(_, endpoint)| *endpoint);
            proptest::prop_assert_eq!(table.classify(&path), expected, "{}", path);
        }
    }

    #[test]
    fn custom_prefixed_paths_replace_the_defaults() {
        let path = "/gitlab/oauth/token";
        let table = Endpoints::new(&[(path.to_owned(), Endpoint::Token)]);
        assert_eq!(table.classify(path), Some(Endpoint::Token));
        assert_eq!(
            table.classify("//gitlab//oauth/token.json/"),
            Some(Endpoint::Token)
        );
        assert_eq!(table.classify("/oauth/token"), None);
        assert_eq!(table.classify("/gitlab/oauth/token/x"), None);
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
