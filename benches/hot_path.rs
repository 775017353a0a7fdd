//! Micro-benchmarks of what every request pays to be classified (is its path an OAuth
//! endpoint?), and of what every OAuth request pays before it is forwarded: reading its
//! query and form body, the issuer rule and client identification from each source, and
//! the routing decision answered from the cache (and from the rules before it).
//! `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::Method;
use iamproxy::classify::identify::identify;
use iamproxy::classify::issuer::continuity;
use iamproxy::classify::params::{Parameters, RequestView};
use iamproxy::classify::{Endpoint, Endpoints};
use iamproxy::config::CacheConfig;
use iamproxy::decision::cache::{DecisionCache, Lookup};
use iamproxy::decision::preauth::Answer;
use iamproxy::decision::rules::{PercentageOfActors, RoutingConfig};
use iamproxy::decision::Destination;
use iamproxy::proxy::decide::rules;

fn form_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers
}

/// A client assertion JWT (RFC 7523): the signature is not checked, only `iss`/`sub` read.
fn assertion() -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        br#"{"iss":"bench-app","sub":"bench-app","aud":"https://gitlab.example.com/oauth/token","exp":4102444800}"#,
    );
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

fn identification(c: &mut Criterion) {
    let mut group = c.benchmark_group("identify");
    let get = Method::GET;
    let post = Method::POST;
    let none = HeaderMap::new();
    let form = form_headers();
    let mut basic = form_headers();
    let credentials = STANDARD.encode("bench-app:0123456789abcdef");
    basic.insert(
        "authorization",
        HeaderValue::from_str(&format!("Basic {credentials}")).unwrap(),
    );
    let assertion_body = format!(
        "grant_type=client_credentials&client_assertion_type=\
         urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={}",
        assertion()
    );
    let cases: [(&str, RequestView<'_>); 6] = [
        (
            "query",
            RequestView {
                method: &get,
                query: Some("response_type=code&client_id=bench-app&redirect_uri=https%3A%2F%2Fapp.example.com%2Fcb&state=xyz"),
                headers: &none,
                body: b"",
            },
        ),
        (
            "form_body",
            RequestView {
                method: &post,
                query: None,
                headers: &form,
                body: b"grant_type=client_credentials&client_id=bench-app&client_secret=0123456789abcdef",
            },
        ),
        (
            "basic",
            RequestView {
                method: &post,
                query: None,
                headers: &basic,
                body: b"grant_type=client_credentials",
            },
        ),
        (
            "client_assertion",
            RequestView {
                method: &post,
                query: None,
                headers: &form,
                body: assertion_body.as_bytes(),
            },
        ),
        (
            "refresh_token",
            RequestView {
                method: &post,
                query: None,
                headers: &basic,
                body: b"grant_type=refresh_token&refresh_token=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            },
        ),
        (
            "unknown",
            RequestView {
                method: &post,
                query: None,
                headers: &form,
                body: b"grant_type=client_credentials",
            },
        ),
    ];
    let prefixes = ["giat_".to_owned(), "ory_".to_owned()];
    // What `proxy::decide` does before the rules: one read, the issuer rule, identification.
    let classify = |view: &RequestView<'_>| {
        let params = Parameters::read(view, &prefixes);
        let issuer = continuity(Endpoint::Token, &params);
        let known = identify(view.headers, &params).client_id().is_some();
        (issuer, known)
    };
    for (name, view) in &cases {
        // Each case must read as intended, or the benchmark measures the wrong path.
        let (issuer, known) = classify(view);
        assert_eq!(known, *name != "unknown", "{name}");
        assert_eq!(issuer.is_some(), *name == "refresh_token", "{name}");
        group.bench_function(*name, |b| b.iter(|| black_box(classify(black_box(view)))));
    }
    group.finish();
}

fn decision(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let cache = DecisionCache::new(&CacheConfig {
        ttl: Duration::from_secs(3600),
        max_entries: 100_000,
        stale_if_error: Duration::from_secs(300),
    });
    runtime.block_on(async {
        for n in 0..100_000 {
            let id = format!("app-{n}");
            let answer = Answer {
                destination: Destination::Iam,
                lifetime: Duration::from_secs(3600),
                stale_if_error: Duration::from_secs(300),
            };
            cache.lookup(&id, async { Ok(answer) }).await;
        }
    });
    let mut group = c.benchmark_group("decision");
    group.bench_function("cache_hit_of_100k", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let found = cache
                    .lookup(black_box("app-4242"), async { unreachable!("a hit") })
                    .await;
                assert!(matches!(found, Lookup::Hit(Destination::Iam)));
            })
        })
    });
    let routing = RoutingConfig {
        force_iam: (0..200).map(|n| format!("pilot-{n}")).collect(),
        force_rails: (0..200).map(|n| format!("legacy-{n}")).collect(),
        percentage: Some(PercentageOfActors {
            flag: "proxy_oauth_requests_to_iam_service".to_string(),
            actor_prefix: "Authn::OauthApplication:".to_string(),
            actor_suffix: String::new(),
            percent: 12.5,
        }),
        ..RoutingConfig::default()
    };
    group.bench_function("routing_rules_fall_through", |b| {
        b.iter(|| {
            black_box(rules(
                &routing,
                true,
                None,
                Some(black_box("bench-app-not-listed")),
            ))
        })
    });
    group.finish();
}

/// Every request of the app server goes through this, OAuth or not: the pass-through case
/// is the one that must stay cheapest.
fn classification(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    let endpoints = Endpoints::default();
    for (name, path) in [
        ("pass_through", "/api/v4/projects/42/merge_requests"),
        ("oauth_canonical", "/oauth/token"),
        ("oauth_variant", "//oauth//token.json/"),
        ("oauth_miss", "/oauth/applications"),
    ] {
        group.bench_function(name, |b| b.iter(|| endpoints.classify(black_box(path))));
    }
    group.finish();
}

criterion_group!(benches, classification, identification, decision);
criterion_main!(benches);
