//! A client's `traceparent`: what is accepted is a valid context, and what the gateway
//! writes for it names the same trace, span and sampled flag.
#![no_main]

use hyper::header::HeaderValue;
use iamproxy::observe::trace::context::parse_traceparent;
use iamproxy::observe::trace::TraceContext;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let Some((trace_id, span_id, sampled)) = parse_traceparent(&value) else {
        return;
    };
    assert_ne!(trace_id, [0; 16]);
    assert_ne!(span_id, [0; 8]);
    let context = TraceContext {
        trace_id,
        span_id,
        parent: None,
        sampled,
    };
    let written = context.traceparent(&span_id);
    assert_eq!(
        parse_traceparent(&written),
        Some((trace_id, span_id, sampled))
    );
    // The ids as the client sent them: lower-case hex is the only form accepted.
    assert_eq!(&written.as_bytes()[3..52], &data[3..52]);
});
