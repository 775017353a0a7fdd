//! Buffering an OAuth request body, which is read for the client id and may be replayed to
//! Rails: at most `server.max_body_bytes` of it, within `server.body_read_timeout`, and at
//! most `server.max_buffered_bytes` across every request at once ([`Budget`]), so a crowd
//! of large bodies gets 503s rather than the gateway's memory.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use crate::config::ServerConfig;
use crate::respond::ProxyError;

/// Bytes of OAuth bodies held at once, across connections and reloads.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicU64,
}

impl Budget {
    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// One request's share of the [`Budget`], given back when dropped: hold it as long as the
/// body it paid for.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Held<'_> {
    /// Holds `bytes` more, unless the budget's total would pass `limit`.
    fn grow(&mut self, bytes: u64, limit: u64) -> Result<(), ProxyError> {
        if bytes == 0 {
            return Ok(());
        }
        let before = self.budget.used.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > limit {
            self.budget.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(ProxyError::BufferFull);
        }
        self.bytes += bytes;
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// Reads a whole OAuth body. One over `max_body_bytes` is refused up front when the
/// length it is framed by says so, else as soon as it crosses the limit; the budget is
/// taken for that length at once, or frame by frame for a body of unknown length.
pub async fn read<'a>(
    body: Incoming,
    server: &ServerConfig,
    budget: &'a Budget,
) -> Result<(Bytes, Held<'a>), ProxyError> {
    // hyper's framing length, the one `Content-Length` is forwarded as.
    let declared = body.size_hint().exact();
    if declared.is_some_and(|length| length > server.max_body_bytes) {
        return Err(ProxyError::BodyTooLarge);
    }
    let mut held = Held { budget, bytes: 0 };
    held.grow(declared.unwrap_or(0), server.max_buffered_bytes)?;
    let collected =
        tokio::time::timeout(server.body_read_timeout, collect(body, &mut held, server))
            .await
            .map_err(|_| ProxyError::BodyTimeout)??;
    Ok((collected, held))
}

async fn collect(
    mut body: Incoming,
    held: &mut Held<'_>,
    server: &ServerConfig,
) -> Result<Bytes, ProxyError> {
    // Most bodies come in one frame, which is kept as it is; more are joined at the end.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ProxyError::BodyUnreadable)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len() as u64;
        if total > server.max_body_bytes {
            return Err(ProxyError::BodyTooLarge);
        }
        if total > held.bytes {
            held.grow(total - held.bytes, server.max_buffered_bytes)?;
        }
        match first {
            None => first = Some(data),
            Some(_) => more.push(data),
        }
    }
    let Some(first) = first else {
        return Ok(Bytes::new());
    };
    if more.is_empty() {
        return Ok(first);
    }
    let mut joined = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
    joined.extend_from_slice(&first);
    for data in more {
        joined.extend_from_slice(&data);
    }
    Ok(joined.freeze())
}
