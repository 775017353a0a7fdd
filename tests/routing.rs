//! Routing: each OAuth endpoint by the pre-authorize answer, for each identification source;
//! unknown clients, non-OAuth paths, flow continuity, no `[iam]`, custom paths and HTTP/2.
//! The issuer rule for Rails' codes and tokens has its own file, `issuer.rs`.

mod support;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use support::{gateway, Reply, TestClient, TestGateway};

const ENDPOINTS: [&str; 5] = [
    "/oauth/authorize",
    "/oauth/authorize_device",
    "/oauth/token",
    "/oauth/revoke",
    "/oauth/introspect",
];

/// Where a request carries its client id (DESIGN §2).
#[derive(Debug, Clone, Copy)]
enum Source {
    Basic,
    FormBody,
    Query,
    Assertion,
}

const SOURCES: [Source; 4] = [
    Source::Basic,
    Source::FormBody,
    Source::Query,
    Source::Assertion,
];

const FORM: &str = "application/x-www-form-urlencoded";

/// What RFC 6749 §2.3.1 asks a client to encode in the Basic user part, as far as the
/// ids used here need it (they contain spaces: "my app" is sent as "my%20app").
const BASIC_USER: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'+').add(b':');

fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

fn post_form(url: &str, form: &str) -> Request<Full<Bytes>> {
    request("POST", url, &[("content-type", FORM)], form)
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// An unsigned client assertion: only its payload matters for routing.
fn assertion(iss: &str, sub: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let payload = serde_json::json!({ "iss": iss, "sub": sub, "aud": "https://gitlab.example" });
    let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
    format!("{header}.{payload}.c2lnbmF0dXJl")
}

/// A request to `path` that names `client_id` through `source` only.
fn identified(
    gw: &TestGateway,
    path: &str,
    source: Source,
    client_id: &str,
) -> Request<Full<Bytes>> {
    let url = gw.url(path);
    match source {
        Source::Basic => {
            let user = utf8_percent_encode(client_id, BASIC_USER).to_string();
            let authorization = basic(&user, "secret");
            request(
                "POST",
                &url,
                &[("content-type", FORM), ("authorization", &authorization)],
                "grant_type=client_credentials",
            )
        }
        Source::FormBody => post_form(
            &url,
            &form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
            ]),
        ),
        Source::Query => {
            let query = form(&[("response_type", "code"), ("client_id", client_id)]);
            request("GET", &format!("{url}?{query}"), &[], "")
        }
        Source::Assertion => post_form(
            &url,
            &form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion(client_id, client_id)),
            ]),
        ),
    }
}

/// The pre-authorize fake sends clients whose id ends in " to iam" to IAM, others to Rails.
fn route_by_client_id_suffix(gw: &TestGateway) {
    gw.preauth.respond(|recorded| {
        let to_iam = recorded
            .query_values("client_id")
            .iter()
            .any(|id| id.ends_with(" to iam"));
        Reply::destination(if to_iam { "iam" } else { "rails" })
    });
}

/// Every endpoint × source × destination: one pre-authorize call for the identified id,
/// and the fake the answer named serves the request.
async fn assert_every_endpoint_and_source_routes_by_preauthorize(client: TestClient) {
    let gw = gateway().start().await;
    route_by_client_id_suffix(&gw);
    let mut n = 0;
    for destination in ["iam", "rails"] {
        for path in ENDPOINTS {
            for source in SOURCES {
                n += 1;
                // A fresh id per case, so every request misses the decision cache.
                let client_id = format!("my app {n} to {destination}");
                let case = format!("{path} via {source:?} for {client_id:?}");
                let (rails, iam, preauth) = gw.upstream_counts();

                let answer = client.send(identified(&gw, path, source, &client_id)).await;

                assert_eq!(answer.served_by(), destination, "{case}");
                let served = match destination {
                    "iam" => (rails, iam + 1, preauth + 1),
                    _ => (rails + 1, iam, preauth + 1),
                };
                assert_eq!(gw.upstream_counts(), served, "{case}");
                assert_eq!(
                    gw.preauth.last().query_values("client_id"),
                    [client_id],
                    "{case}"
                );
            }
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn token_request_for_an_iam_client_goes_to_iam() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let answer = TestClient::new()
        .post_form(
            &gw.url("/oauth/token"),
            "grant_type=client_credentials&client_id=app",
        )
        .await;
    assert_eq!(answer.served_by(), "iam");
    assert_eq!(gw.upstream_counts(), (0, 1, 1));
    gw.stop().await;
}

#[tokio::test]
async fn every_oauth_endpoint_routes_by_the_preauthorize_answer_for_every_identification_source() {
    assert_every_endpoint_and_source_routes_by_preauthorize(TestClient::new()).await;
}

#[tokio::test]
async fn http2_oauth_requests_route_by_the_preauthorize_answer() {
    assert_every_endpoint_and_source_routes_by_preauthorize(TestClient::http2()).await;
}

#[tokio::test]
async fn percent_encoded_basic_user_is_decoded_before_preauthorize() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let answer = TestClient::new()
        .send(request(
            "POST",
            &gw.url("/oauth/token"),
            &[
                ("content-type", FORM),
                ("authorization", &basic("my%20app", "secret")),
            ],
            "grant_type=client_credentials",
        ))
        .await;
    assert_eq!(answer.served_by(), "iam");
    assert_eq!(gw.preauth.last().query_values("client_id"), ["my app"]);
    gw.stop().await;
}

#[tokio::test]
async fn unidentifiable_clients_go_to_rails_without_preauthorize_call() {
    let gw = gateway().start().await;
    // Any pre-authorize call would send the request to IAM.
    gw.preauth.always(Reply::destination("iam"));
    let token = gw.url("/oauth/token");
    let oversized = "a".repeat(256);
    let cases = [
        (
            "none given",
            post_form(&token, "grant_type=client_credentials"),
        ),
        (
            "repeated",
            request("GET", &format!("{token}?client_id=a&client_id=a"), &[], ""),
        ),
        (
            "query and body disagree",
            post_form(&format!("{token}?client_id=a"), "client_id=b"),
        ),
        (
            "Basic and body disagree",
            request(
                "POST",
                &token,
                &[("content-type", FORM), ("authorization", &basic("a", "s"))],
                "client_id=b",
            ),
        ),
        (
            "256 bytes",
            request("GET", &format!("{token}?client_id={oversized}"), &[], ""),
        ),
        ("empty", post_form(&token, "client_id=")),
        ("control byte", post_form(&token, "client_id=a%01b")),
        ("non-ASCII", post_form(&token, "client_id=caf%C3%A9")),
        (
            "JSON body next to a query client_id",
            request(
                "POST",
                &format!("{token}?client_id=a"),
                &[("content-type", "application/json")],
                r#"{"client_id":"a"}"#,
            ),
        ),
        (
            "Basic not base64",
            request(
                "GET",
                &format!("{token}?client_id=a"),
                &[("authorization", "Basic !!!")],
                "",
            ),
        ),
        (
            "Basic without a colon",
            request(
                "GET",
                &format!("{token}?client_id=a"),
                &[("authorization", &format!("Basic {}", STANDARD.encode("a")))],
                "",
            ),
        ),
        (
            "assertion iss != sub",
            post_form(&token, &form(&[("client_assertion", &assertion("a", "b"))])),
        ),
        (
            "assertion not a JWT",
            post_form(&token, "client_assertion=not-a-jwt"),
        ),
    ];
    let client = TestClient::new();
    for (case, request) in cases {
        let rails = gw.rails.count();
        let answer = client.send(request).await;
        assert_eq!(answer.served_by(), "rails", "{case}");
        assert_eq!(gw.rails.count(), rails + 1, "{case}");
        assert_eq!(gw.preauth.count(), 0, "{case}: no pre-authorize call");
    }
    assert_eq!(gw.iam.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn other_paths_go_to_rails_without_preauthorize_call_even_for_an_iam_client() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let paths = [
        "/api/v4/projects",
        "/",
        "/assets/application.js",
        "/oauth/applications",
        "/oauth/device",
        "/oauth/userinfo",
        "/OAUTH/token",
        // Rails routes none of these to Doorkeeper either.
        "/oauth/token/.json",
        "/oauth/token.json.json",
        "/oauth/token/info",
    ];
    let client = TestClient::new();
    for path in paths {
        let with_query = format!("{path}?client_id=app");
        let requests = [
            request("GET", &gw.url(&with_query), &[], ""),
            post_form(&gw.url(path), "grant_type=client_credentials&client_id=app"),
        ];
        for request in requests {
            let method = request.method().clone();
            let answer = client.send(request).await;
            assert_eq!(answer.served_by(), "rails", "{method} {path}");
            let forwarded = gw.rails.last();
            assert_eq!(
                forwarded.uri.split('?').next(),
                Some(path),
                "{method} {path}"
            );
        }
    }
    assert_eq!(gw.rails.count(), paths.len() * 2);
    assert_eq!(gw.iam.count(), 0);
    assert_eq!(gw.preauth.count(), 0);
    gw.stop().await;
}

/// Rails' router sends all of these to Doorkeeper's token endpoint (it squeezes slashes,
/// drops a trailing one and takes a `.format`), so the gateway must see them as the token
/// endpoint too, or an IAM refresh token sent there would reach Rails and fail.
const TOKEN_VARIANTS: [&str; 6] = [
    "/oauth/token/",
    "//oauth/token",
    "/oauth//token",
    "/oauth/token.json",
    "/oauth/token.json/",
    "//oauth//token.json//",
];

#[tokio::test]
async fn tokens_sent_to_paths_rails_routes_to_the_token_endpoint_go_to_their_issuer_unchanged() {
    let gw = gateway().start().await;
    // The client's own decision says Rails: only continuity can send these to IAM.
    gw.preauth.always(Reply::destination("rails"));
    let client = TestClient::new();
    for path in TOKEN_VARIANTS {
        let body = "grant_type=refresh_token&client_id=app&refresh_token=giat_abc";
        let answer = client.post_form(&gw.url(path), body).await;
        assert_eq!(answer.served_by(), "iam", "{path}");
        assert_eq!(gw.iam.last().uri, path, "forwarded with its own path");
        assert_eq!(gw.iam.last().body, body.as_bytes(), "{path}");
    }
    assert_eq!(gw.upstream_counts(), (0, TOKEN_VARIANTS.len(), 0));

    // A Rails refresh token on the same paths is Rails' (the issuer rule), still without a
    // pre-authorize call: the gateway read the body, as it does only on OAuth paths.
    for path in TOKEN_VARIANTS {
        let body = "grant_type=refresh_token&client_id=app&refresh_token=rails-token";
        assert_eq!(
            client.post_form(&gw.url(path), body).await.served_by(),
            "rails"
        );
        assert_eq!(gw.rails.last().uri, path, "forwarded with its own path");
    }
    let scraped = support::metrics::scrape(gw.admin).await;
    let decided = |reason| {
        scraped.value(
            "iamproxy_routing_decisions_total",
            &[("destination", "rails"), ("reason", reason)],
        )
    };
    assert_eq!(decided("rails_issued"), TOKEN_VARIANTS.len() as f64);
    assert_eq!(gw.preauth.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn mid_flow_requests_continue_to_iam_without_preauthorize_call() {
    let gw = gateway().start().await;
    // The client's own decision says Rails: only continuity can send these to IAM.
    gw.preauth.always(Reply::destination("rails"));
    let mut cases = vec![
        request(
            "GET",
            &gw.url("/oauth/authorize?client_id=app&login_verifier=x"),
            &[],
            "",
        ),
        request(
            "GET",
            &gw.url("/oauth/authorize?client_id=app&consent_verifier=x"),
            &[],
            "",
        ),
    ];
    for param in ["code", "refresh_token", "device_code", "token"] {
        for prefix in ["giat_", "ory_"] {
            let query = format!("/oauth/token?client_id=app&{param}={prefix}abc");
            cases.push(request("GET", &gw.url(&query), &[], ""));
            let body = format!("client_id=app&{param}={prefix}abc");
            cases.push(post_form(&gw.url("/oauth/revoke"), &body));
        }
    }
    let client = TestClient::new();
    for request in cases {
        let case = format!("{} {}", request.method(), request.uri());
        let answer = client.send(request).await;
        assert_eq!(answer.served_by(), "iam", "{case}");
        assert_eq!(gw.preauth.count(), 0, "{case}: no pre-authorize call");
    }
    assert_eq!(gw.rails.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn code_without_an_iam_prefix_goes_to_rails_without_preauthorize_call() {
    let gw = gateway().start().await;
    // The client's own decision says IAM: only the issuer rule can send this to Rails.
    gw.preauth.always(Reply::destination("iam"));
    let answer = TestClient::new()
        .post_form(
            &gw.url("/oauth/token"),
            "grant_type=authorization_code&client_id=app&code=rails-code-giat_",
        )
        .await;
    assert_eq!(answer.served_by(), "rails");
    assert_eq!(gw.upstream_counts(), (1, 0, 0));
    gw.stop().await;
}

#[tokio::test]
async fn without_iam_table_every_oauth_request_goes_to_rails_without_preauthorize_call() {
    let gw = gateway().without_iam().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let client = TestClient::new();
    let mut requests = Vec::new();
    for path in ENDPOINTS {
        for source in SOURCES {
            requests.push(identified(&gw, path, source, "app"));
        }
    }
    requests.push(post_form(
        &gw.url("/oauth/token"),
        "client_id=app&refresh_token=giat_abc",
    ));
    requests.push(request(
        "GET",
        &gw.url("/oauth/authorize?login_verifier=x"),
        &[],
        "",
    ));
    let total = requests.len();
    for request in requests {
        let case = format!("{} {}", request.method(), request.uri());
        assert_eq!(client.send(request).await.served_by(), "rails", "{case}");
    }
    assert_eq!(gw.upstream_counts(), (total, 0, 0));
    gw.stop().await;
}

#[tokio::test]
async fn configured_oauth_paths_replace_the_defaults() {
    let gw = gateway()
        .set("oauth", "paths = [\"/gitlab/oauth/token\"]")
        .start()
        .await;
    gw.preauth.always(Reply::destination("iam"));
    let client = TestClient::new();
    let body = "grant_type=client_credentials&client_id=app";

    let custom = client.post_form(&gw.url("/gitlab/oauth/token"), body).await;
    assert_eq!(custom.served_by(), "iam");
    assert_eq!(gw.upstream_counts(), (0, 1, 1));
    assert_eq!(gw.iam.last().uri, "/gitlab/oauth/token");

    let default = client.post_form(&gw.url("/oauth/token"), body).await;
    assert_eq!(default.served_by(), "rails", "no longer an OAuth path");
    assert_eq!(gw.upstream_counts(), (1, 1, 1));
    gw.stop().await;
}
