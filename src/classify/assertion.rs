//! The issuer of a `client_assertion` JWT (RFC 7523), read only to route: the signature is
//! never checked here, the upstream verifies it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// RFC 7523 §2.2: a client authenticating itself has `iss` = `sub` = its client_id.
pub fn issuer(jwt: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: Option<String>,
        sub: Option<String>,
    }
    let mut parts = jwt.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
    // JSON is UTF-8 (RFC 8259 §8.1); serde_json checks that only in the fields it reads,
    // so it would take invalid bytes in a skipped claim (found by the `assertion` fuzz
    // target).
    let payload = std::str::from_utf8(&payload).ok()?;
    // RFC 7519 §7.2: the claims are a JSON object. A derived struct would also accept an
    // array, reading `["app", "app"]` as iss = sub = "app".
    if payload.trim_start().as_bytes().first() != Some(&b'{') {
        return None;
    }
    match serde_json::from_str(payload).ok()? {
        Claims {
            iss: Some(iss),
            sub: Some(sub),
        } if iss == sub => Some(iss),
        _ => None,
    }
}
