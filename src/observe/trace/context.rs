//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): a request's trace and span
//! ids, read from the client's `traceparent` or made here, and the `traceparent` each
//! upstream gets.

use std::cell::Cell;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::forward::headers::write_hex;

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// `00-<32 hex>-<16 hex>-<2 hex>`.
const TRACEPARENT_LEN: usize = 55;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// One request's place in its trace: the trace, the gateway's server span, the client's
/// span it continues (if it sent one that was kept) and whether the trace is recorded.
/// Small and `Copy`: it rides in the request head to every upstream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The gateway's server span for this request.
    pub span_id: SpanId,
    /// The client's span, from its `traceparent`.
    pub parent: Option<SpanId>,
    pub sampled: bool,
}

/// A client's `traceparent`, parsed: version `00` as the spec writes it; a later version
/// is read by its first four fields, as the spec asks. Anything else (an all-zero id,
/// upper-case hex, version `ff`) is refused, and the request starts a trace of its own.
pub fn parse_traceparent(value: &HeaderValue) -> Option<(TraceId, SpanId, bool)> {
    let bytes = value.as_bytes();
    if bytes.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = hex::<1>(&bytes[0..2])?[0];
    let exact = bytes.len() == TRACEPARENT_LEN;
    if version == 0xff || (version == 0 && !exact) || (!exact && bytes[TRACEPARENT_LEN] != b'-') {
        return None;
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let trace_id = hex::<16>(&bytes[3..35])?;
    let span_id = hex::<8>(&bytes[36..52])?;
    let flags = hex::<1>(&bytes[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags & 1 == 1))
}

/// Lower-case hex only, as the spec requires.
fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex of a trace id, for log lines.
pub fn trace_id_hex(trace_id: &TraceId) -> [u8; 32] {
    let mut out = [0; 32];
    write_hex(&mut out, trace_id);
    out
}

impl TraceContext {
    /// The `traceparent` naming `span_id` (the gateway's server span, or the client span
    /// of one upstream call) as the parent of what the upstream does.
    pub fn traceparent(&self, span_id: &SpanId) -> HeaderValue {
        let mut out = [0; TRACEPARENT_LEN];
        out[..3].copy_from_slice(b"00-");
        write_hex(&mut out[3..35], &self.trace_id);
        out[35] = b'-';
        write_hex(&mut out[36..52], span_id);
        out[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        // Hex digits and dashes are always a valid header value.
        HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(""))
    }

    /// Puts this request's context in the headers every upstream request is built from:
    /// `traceparent` naming the server span, and the client's `tracestate` (`sent_state`:
    /// it sent one) only when its `traceparent` was kept, as it belongs to that trace.
    pub fn propagate(&self, headers: &mut HeaderMap, sent_state: bool) {
        if sent_state && self.parent.is_none() {
            headers.remove(&TRACESTATE);
        }
        headers.insert(TRACEPARENT.clone(), self.traceparent(&self.span_id));
    }
}

/// A random, non-zero span id.
pub fn new_span_id() -> SpanId {
    loop {
        let id = next_random().to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// A random, non-zero trace id.
pub fn new_trace_id() -> TraceId {
    loop {
        let mut id = [0; 16];
        id[..8].copy_from_slice(&next_random().to_be_bytes());
        id[8..].copy_from_slice(&next_random().to_be_bytes());
        if id != [0; 16] {
            return id;
        }
    }
}

/// splitmix64 on a per-thread state seeded from the OS (through `RandomState`): ids must
/// not collide, not be unguessable, and a request must not pay for a syscall or a lock.
fn next_random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x5eed);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_is_read_and_written_back_unchanged() {
        let (trace_id, span_id, sampled) =
            parse_traceparent(&HeaderValue::from_static(EXAMPLE)).unwrap();
        assert!(sampled);
        let context = TraceContext {
            trace_id,
            span_id,
            parent: None,
            sampled,
        };
        assert_eq!(context.traceparent(&span_id), EXAMPLE);
        assert_eq!(
            &trace_id_hex(&trace_id),
            b"4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn malformed_or_invalid_traceparents_are_refused() {
        let refused = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for text in refused {
            let value = HeaderValue::from_str(text).unwrap();
            assert_eq!(parse_traceparent(&value), None, "{text:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let value = HeaderValue::from_static(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes-next",
        );
        let (_, span_id, sampled) = parse_traceparent(&value).unwrap();
        assert_eq!(span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(!sampled);
    }

    #[test]
    fn propagate_drops_a_tracestate_that_came_with_another_trace() {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACESTATE, HeaderValue::from_static("vendor=1"));
        let mut context = TraceContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent: Some(new_span_id()),
            sampled: false,
        };
        context.propagate(&mut headers, true);
        assert_eq!(headers[&TRACESTATE], "vendor=1", "kept with its trace");
        let sent = parse_traceparent(&headers[&TRACEPARENT]).unwrap();
        assert_eq!(sent, (context.trace_id, context.span_id, false));
        context.parent = None;
        context.propagate(&mut headers, true);
        assert!(
            headers.get(&TRACESTATE).is_none(),
            "a new trace has no state"
        );
    }

    #[test]
    fn ids_are_not_repeated() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| new_span_id()).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
