//! Signatures as the Standard Webhooks specification defines them, so that
//! receivers use its maintained libraries unchanged: headers `webhook-id`,
//! `webhook-timestamp` (unix seconds) and `webhook-signature`, which holds
//! `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with the
//! base64-decoded part of the `whsec_…` secret, one per secret during a
//! rotation's overlap (space-separated). Signing the id and timestamp with
//! the body lets a receiver refuse replays.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

const PREFIX: &str = "whsec_";

/// A new secret: `whsec_` and the standard base64 of 24 random bytes.
pub fn new_secret() -> String {
    let mut raw = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
    format!("{PREFIX}{}", STANDARD.encode(raw))
}

/// The HMAC key of a secret: the base64 after `whsec_` decoded. Secrets
/// registered before headroom followed the specification are URL-safe
/// base64; they still sign (a receiver using a Standard Webhooks library
/// needs a secret in its format: rotate the endpoint's secret once).
fn key(secret: &str) -> Vec<u8> {
    let encoded = secret.strip_prefix(PREFIX).unwrap_or(secret);
    STANDARD
        .decode(encoded)
        .or_else(|_| URL_SAFE_NO_PAD.decode(encoded))
        .unwrap_or_else(|_| secret.as_bytes().to_vec())
}

fn mac(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(&key(secret)).expect("any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` value for message `id` sent at `timestamp`:
/// one `v1,<base64>` per secret, space-separated.
pub fn sign<'a>(
    secrets: impl IntoIterator<Item = &'a str>,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .into_iter()
        .map(|s| {
            let tag = mac(s, id, timestamp, body).finalize().into_bytes();
            format!("v1,{}", STANDARD.encode(tag))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a delivery as a receiver does: one of the signatures is of
/// `secret` (constant-time), and the timestamp is within `tolerance`
/// seconds of `now`.
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
    tolerance: i64,
) -> bool {
    let Ok(t) = timestamp.parse::<i64>() else {
        return false;
    };
    if (now - t).abs() > tolerance {
        return false;
    }
    signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b| STANDARD.decode(b).ok())
        .any(|tag| mac(secret, id, t, body).verify_slice(&tag).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specifications_example_signs_alike() {
        // The example of the Standard Webhooks libraries' own tests.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sig = sign(
            [secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let secret = new_secret();
        assert!(secret.starts_with("whsec_") && STANDARD.decode(&secret[6..]).is_ok());
        let body = br#"{"id":"acme:1:1"}"#;
        let h = sign([secret.as_str()], "d1", 1_700_000_000, body);
        let ok = |s: &str, id: &str, t: &str, h: &str, b: &[u8], now: i64| {
            verify(s, id, t, h, b, now, 300)
        };
        assert!(ok(&secret, "d1", "1700000000", &h, body, 1_700_000_100));
        assert!(
            !ok("whsec_AAAA", "d1", "1700000000", &h, body, 1_700_000_100),
            "other secret"
        );
        assert!(
            !ok(&secret, "d2", "1700000000", &h, body, 1_700_000_100),
            "other id"
        );
        assert!(
            !ok(&secret, "d1", "1700000000", &h, b"{}", 1_700_000_100),
            "other body"
        );
        assert!(
            !ok(&secret, "d1", "1700000900", &h, body, 1_700_001_000),
            "moved timestamp"
        );
        assert!(
            !ok(&secret, "d1", "1700000000", &h, body, 1_700_001_000),
            "too old"
        );
        assert!(!ok(&secret, "d1", "soon", &h, body, 1_700_000_000));
        assert!(!ok(
            &secret,
            "d1",
            "1700000000",
            "garbage",
            body,
            1_700_000_000
        ));
    }

    #[test]
    fn during_a_rotation_either_secret_verifies() {
        let (old, new) = (new_secret(), new_secret());
        let h = sign([new.as_str(), old.as_str()], "d1", 1_700_000_000, b"{}");
        assert_eq!(h.split(' ').count(), 2);
        for s in [&old, &new] {
            assert!(verify(s, "d1", "1700000000", &h, b"{}", 1_700_000_000, 300));
        }
    }
}
