//! The tests' OTLP/HTTP receiver (tests/support/otlp.rs) itself: hand-built exports are
//! decoded into the spans they carry, and what an OTLP/HTTP exporter must not send is
//! refused, so the `[tracing]` tests can trust what it reports.
#[path = "support/otlp.rs"]
mod otlp;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

use otlp::{Collector, ReceivedSpan};

const TRACE: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];
const SERVER: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
const CLIENT: [u8; 8] = [0x53, 0x99, 0x5c, 0x3f, 0x42, 0xcd, 0x8a, 0xd8];
const REMOTE: [u8; 8] = [0xde, 0xad, 0xbe, 0xef, 0x00, 0x00, 0x00, 0x01];

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn span(name: &str, kind: SpanKind, id: [u8; 8], parent: &[u8], attributes: Vec<KeyValue>) -> Span {
    Span {
        trace_id: TRACE.to_vec(),
        span_id: id.to_vec(),
        parent_span_id: parent.to_vec(),
        name: name.to_owned(),
        kind: kind as i32,
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_000_100_000_000,
        attributes,
        ..Default::default()
    }
}

fn resource_spans(service: &str, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(Resource {
            attributes: vec![kv("service.name", Value::StringValue(service.to_owned()))],
            ..Default::default()
        }),
        scope_spans: vec![ScopeSpans {
            spans,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The shape the gateway exports: a server span whose parent is the client's (remote) span,
/// and an `iam` client span under it; a second resource for the upstream's own server span.
fn export() -> ExportTraceServiceRequest {
    let mut server = span(
        "GET authorize",
        SpanKind::Server,
        SERVER,
        &REMOTE,
        vec![
            kv("http.request.method", Value::StringValue("GET".into())),
            kv("http.response.status_code", Value::IntValue(303)),
            kv("iamproxy.fallback", Value::BoolValue(false)),
            kv("iamproxy.ratio", Value::DoubleValue(0.5)),
        ],
    );
    server.trace_state = "e2e=1".into();
    server.status = Some(Status {
        code: SpanStatusCode::Error as i32,
        message: "upstream failed".into(),
    });
    let client = span(
        "iam",
        SpanKind::Client,
        CLIENT,
        &SERVER,
        vec![kv("iamproxy.upstream", Value::StringValue("iam".into()))],
    );
    let upstream = span(
        "GET /oauth/authorize",
        SpanKind::Server,
        [9; 8],
        &CLIENT,
        Vec::new(),
    );
    ExportTraceServiceRequest {
        resource_spans: vec![
            resource_spans("iamproxy", vec![server, client]),
            resource_spans("iam-oidc-provider", vec![upstream]),
        ],
    }
}

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request; returns the status, the content type and the body.
async fn send(
    client: &TestClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Option<String>, Bytes) {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, body)
}

/// Posts [`export`] as protobuf; the receiver's status.
async fn post_export(client: &TestClient, collector: &Collector) -> StatusCode {
    post_protobuf(client, collector, export().encode_to_vec())
        .await
        .0
}

async fn post_protobuf(
    client: &TestClient,
    collector: &Collector,
    body: Vec<u8>,
) -> (StatusCode, Option<String>, Bytes) {
    send(
        client,
        Method::POST,
        &collector.endpoint(),
        &[("content-type", "application/x-protobuf")],
        body,
    )
    .await
}

#[tokio::test]
async fn an_export_is_decoded_into_its_spans_with_their_service() {
    let collector = Collector::start().await;
    assert!(collector.endpoint().starts_with("http://127.0.0.1:"));
    assert!(collector.endpoint().ends_with("/v1/traces"));
    let client = client();

    let (status, content_type, body) =
        post_protobuf(&client, &collector, export().encode_to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("application/x-protobuf"));
    assert_eq!(
        ExportTraceServiceResponse::decode(body).unwrap(),
        ExportTraceServiceResponse::default()
    );
    assert_eq!((collector.requests(), collector.rejected()), (1, 0));

    let spans = collector
        .wait_for(Duration::from_secs(5), "the three spans", |s| s.len() == 3)
        .await;
    let by_name =
        |name: &str| -> &ReceivedSpan { spans.iter().find(|s| s.name() == name).unwrap() };
    let server = by_name("GET authorize");
    let client_span = by_name("iam");
    let upstream = by_name("GET /oauth/authorize");

    assert_eq!(server.service_name, "iamproxy");
    assert_eq!(upstream.service_name, "iam-oidc-provider");
    assert_eq!(server.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(server.span_id(), "00f067aa0ba902b7");
    assert_eq!(server.parent_span_id(), "deadbeef00000001");
    assert_eq!(server.kind(), SpanKind::Server);
    assert_eq!(client_span.kind(), SpanKind::Client);
    assert_eq!(client_span.parent_span_id(), server.span_id());
    assert!(client_span.is_child_of(server));
    assert!(upstream.is_child_of(client_span));
    assert!(!upstream.is_child_of(server));
    assert!(!server.is_child_of(client_span));

    // Attributes of each type, as text.
    assert_eq!(server.attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        server.attr("http.response.status_code").as_deref(),
        Some("303")
    );
    assert_eq!(server.attr("iamproxy.fallback").as_deref(), Some("false"));
    assert_eq!(server.attr("iamproxy.ratio").as_deref(), Some("0.5"));
    assert_eq!(server.attr("absent"), None);
    assert_eq!(
        client_span.attr("iamproxy.upstream").as_deref(),
        Some("iam")
    );
    assert_eq!(server.status_code(), SpanStatusCode::Error);
    assert_eq!(server.status_message(), "upstream failed");
    assert_eq!(client_span.status_code(), SpanStatusCode::Unset);

    // A root span has an empty parent.
    let root = span("root", SpanKind::Internal, [7; 8], &[], Vec::new());
    let export = ExportTraceServiceRequest {
        resource_spans: vec![resource_spans("other", vec![root])],
    };
    assert_eq!(
        post_protobuf(&client, &collector, export.encode_to_vec())
            .await
            .0,
        StatusCode::OK
    );
    let spans = collector
        .wait_for(Duration::from_secs(5), "the root span", |s| s.len() == 4)
        .await;
    assert_eq!(spans[3].parent_span_id(), "");
    assert_eq!(spans[3].service_name, "other");
    assert!(otlp::describe(&spans).contains("other SPAN_KIND_INTERNAL \"root\""));
}

#[tokio::test]
async fn get_spans_lists_them_as_json() {
    let collector = Collector::start().await;
    let client = client();
    assert_eq!(post_export(&client, &collector).await, StatusCode::OK);

    let url = collector.endpoint().replace("/v1/traces", "/spans");
    let (status, content_type, body) = send(&client, Method::GET, &url, &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let spans: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let spans = spans.as_array().unwrap();
    assert_eq!(spans.len(), 3);
    assert_eq!(
        spans[0],
        serde_json::json!({
            "service_name": "iamproxy",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "span_id": "00f067aa0ba902b7",
            "parent_span_id": "deadbeef00000001",
            "trace_state": "e2e=1",
            "name": "GET authorize",
            "kind": "SPAN_KIND_SERVER",
            "attributes": {
                "http.request.method": "GET",
                "http.response.status_code": "303",
                "iamproxy.fallback": "false",
                "iamproxy.ratio": "0.5",
            },
            "status": { "code": "STATUS_CODE_ERROR", "message": "upstream failed" },
        })
    );
    assert_eq!(spans[1]["parent_span_id"], spans[0]["span_id"]);
    assert_eq!(spans[1]["status"]["code"], "STATUS_CODE_UNSET");
    assert_eq!(spans[1]["trace_state"], "");
    assert_eq!(spans[2]["service_name"], "iam-oidc-provider");
    // Reading the spans is not an export.
    assert_eq!((collector.requests(), collector.rejected()), (1, 0));
}

#[tokio::test]
async fn what_an_otlp_http_exporter_must_not_send_is_refused_and_not_kept() {
    let collector = Collector::start().await;
    let client = client();
    let endpoint = collector.endpoint();
    let good = export().encode_to_vec();
    let protobuf = [("content-type", "application/x-protobuf")];

    // Another path, another method.
    let logs = endpoint.replace("/v1/traces", "/v1/logs");
    assert_eq!(
        send(&client, Method::POST, &logs, &protobuf, good.clone())
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&client, Method::GET, &endpoint, &[], Vec::new())
            .await
            .0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // OTLP/HTTP JSON, no content type, a compressed body: 415.
    for headers in [
        &[("content-type", "application/json")][..],
        &[][..],
        &[
            ("content-type", "application/x-protobuf"),
            ("content-encoding", "gzip"),
        ][..],
    ] {
        let (status, _, _) = send(&client, Method::POST, &endpoint, headers, good.clone()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{headers:?}");
    }
    // Not an ExportTraceServiceRequest: 400.
    let (status, _, body) =
        post_protobuf(&client, &collector, b"\xff\xff\xff not protobuf".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("not an ExportTraceServiceRequest"));

    assert_eq!(collector.spans(), Vec::new());
    assert_eq!(collector.rejected(), 6);
    assert_eq!(collector.requests(), 4, "the POSTs to /v1/traces");

    // A media type parameter is fine.
    let (status, _, _) = send(
        &client,
        Method::POST,
        &endpoint,
        &[("content-type", "application/x-protobuf; charset=binary")],
        good,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(collector.spans().len(), 3);
    assert_eq!(collector.rejected(), 6);
}

#[tokio::test]
async fn set_status_makes_a_failing_collector_that_keeps_nothing() {
    let collector = Collector::start().await;
    let client = client();

    collector.set_status(Some(503));
    let status = post_export(&client, &collector).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(collector.spans(), Vec::new());
    assert_eq!((collector.requests(), collector.rejected()), (1, 0));

    collector.set_status(None);
    let status = post_export(&client, &collector).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(collector.spans().len(), 3);
    assert_eq!(collector.requests(), 2);

    collector.clear();
    assert_eq!(collector.spans(), Vec::new());
    assert_eq!(collector.requests(), 2, "clear keeps the counters");
}

#[tokio::test]
#[should_panic(expected = "a span named nowhere: not within")]
async fn wait_for_fails_with_what_it_waited_for_and_what_it_had() {
    let collector = Collector::start().await;
    let client = client();
    assert_eq!(post_export(&client, &collector).await, StatusCode::OK);
    collector
        .wait_for(Duration::from_millis(100), "a span named nowhere", |s| {
            s.iter().any(|span| span.name() == "nowhere")
        })
        .await;
}

#[tokio::test]
async fn dropping_the_collector_closes_its_port() {
    let collector = Collector::start().await;
    let addr = collector.addr();
    tokio::net::TcpStream::connect(addr).await.unwrap();
    drop(collector);
    // The accept loop ends at its next poll.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "{addr} still accepts connections");
}
