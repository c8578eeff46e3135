//! The signature a receiver checks: `Headroom-Signature: t=<unix seconds>,
//! v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with the endpoint's secret>`.
//! Signing the timestamp with the body lets a receiver refuse replays of
//! old deliveries (README: "Verifying a delivery").

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "Headroom-Signature";

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value for `body` sent at `timestamp` (unix seconds).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// Checks a header value against `body`, in constant time, and that its
/// timestamp is within `tolerance` seconds of `now`.
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64, tolerance: i64) -> bool {
    let mut timestamp = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => tags.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = timestamp else { return false };
    if (now - t).abs() > tolerance {
        return false;
    }
    tags.iter()
        .any(|tag| mac(secret, t, body).verify_slice(tag).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let body = br#"{"id":"acme:1:1"}"#;
        let h = sign("whsec_x", 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="));
        assert!(verify("whsec_x", &h, body, 1_700_000_100, 300));
        assert!(
            !verify("whsec_y", &h, body, 1_700_000_100, 300),
            "other secret"
        );
        assert!(
            !verify("whsec_x", &h, b"{}", 1_700_000_100, 300),
            "other body"
        );
        assert!(!verify("whsec_x", &h, body, 1_700_001_000, 300), "too old");
        let forged = h.replace("t=1700000000", "t=1700000900");
        assert!(
            !verify("whsec_x", &forged, body, 1_700_001_000, 300),
            "moved timestamp"
        );
        assert!(!verify("whsec_x", "garbage", body, 1_700_000_000, 300));
    }

    #[test]
    fn known_vector() {
        // printf '1700000000.hello' | openssl dgst -sha256 -hmac key
        assert_eq!(
            sign("key", 1_700_000_000, b"hello"),
            "t=1700000000,v1=4d583a269f4f276a3fa80ff31b5a01879a848096983222a17893d198418939aa"
        );
    }
}
