//! Signed tokens for people without API tokens: portal links and their
//! sessions, console logins, and the forms' CSRF tokens.
//!
//! A token is `<claims>.<mac>`, both base64url: the claims as a small JSON
//! object, the MAC an HMAC-SHA256 over a purpose-separated string, keyed
//! with one of the configured keys. The first key signs; every key is
//! tried when checking, so keys can be rotated without ending the links
//! already sent.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// A link sent to a customer, exchanged once for a session.
    #[serde(rename = "pl")]
    PortalLink,
    /// A customer's session cookie, bound to one entitlement.
    #[serde(rename = "ps")]
    PortalSession,
    /// A console link minted through the API.
    #[serde(rename = "cl")]
    ConsoleLink,
    /// A vendor's console session cookie.
    #[serde(rename = "cs")]
    ConsoleSession,
}

/// What a customer may do on their page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LinkScope {
    /// See the page.
    View,
    /// Also set the customer cap.
    Manage,
}

impl LinkScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkScope::View => "view",
            LinkScope::Manage => "manage",
        }
    }
}

/// The signed content of a token. Short field names keep links short.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "p")]
    pub purpose: Purpose,
    /// The entitlement a portal token is bound to.
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub entitlement: Option<String>,
    /// Which life of the entitlement (its creation time, ms): a deleted and
    /// re-created entitlement does not accept the old links.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<i64>,
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<LinkScope>,
    /// For console tokens: which admin token signed in (a fingerprint);
    /// the session ends when that token is taken out of the configuration.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// When it was issued and when it expires (ms since the epoch).
    #[serde(rename = "i")]
    pub issued_at: i64,
    #[serde(rename = "x")]
    pub expires_at: i64,
    /// Random: two links minted in the same millisecond differ, and so do
    /// the sessions (and CSRF tokens) they open.
    #[serde(rename = "n")]
    pub nonce: String,
}

/// A fresh nonce for [`Claims::nonce`].
pub fn nonce() -> String {
    let mut bytes = [0u8; 9];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not match any key")]
    BadSignature,
}

/// The signing keys, first one signing.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("keys", &self.keys.len())
            .finish()
    }
}

const TOKEN_CONTEXT: &[u8] = b"headroom token v1\0";
const CSRF_CONTEXT: &[u8] = b"headroom csrf v1\0";

impl Signer {
    /// Signs with the first key and accepts any of them; `keys` must not
    /// be empty.
    pub fn new(keys: Vec<Vec<u8>>) -> Self {
        assert!(!keys.is_empty(), "a signer needs at least one key");
        Signer { keys }
    }

    fn mac(key: &[u8], context: &[u8], content: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(context);
        mac.update(content);
        mac
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let tag = Self::mac(&self.keys[0], TOKEN_CONTEXT, body.as_bytes()).finalize();
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.into_bytes()))
    }

    /// The claims of a token signed with any of the keys. The caller checks
    /// purpose, binding and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let (body, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        let signed = self.keys.iter().any(|k| {
            Self::mac(k, TOKEN_CONTEXT, body.as_bytes())
                .verify_slice(&tag)
                .is_ok()
        });
        if !signed {
            return Err(TokenError::BadSignature);
        }
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
    }

    /// The CSRF token of a session: what its forms carry back.
    pub fn csrf(&self, session: &str) -> String {
        let tag = Self::mac(&self.keys[0], CSRF_CONTEXT, session.as_bytes()).finalize();
        URL_SAFE_NO_PAD.encode(tag.into_bytes())
    }

    /// Whether `given` is the CSRF token of `session` under any key.
    pub fn check_csrf(&self, session: &str, given: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(given) else {
            return false;
        };
        self.keys.iter().any(|k| {
            Self::mac(k, CSRF_CONTEXT, session.as_bytes())
                .verify_slice(&tag)
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            purpose: Purpose::PortalLink,
            entitlement: Some("acme".into()),
            incarnation: Some(1),
            scope: Some(LinkScope::View),
            admin: None,
            issued_at: 10,
            expires_at: 20,
            nonce: "n".into(),
        }
    }

    #[test]
    fn tokens_round_trip_and_any_key_checks_them() {
        let old = Signer::new(vec![b"old key old key!".to_vec()]);
        let rotated = Signer::new(vec![
            b"new key new key!".to_vec(),
            b"old key old key!".to_vec(),
        ]);
        let token = old.sign(&claims());
        assert_eq!(old.verify(&token), Ok(claims()));
        assert_eq!(
            rotated.verify(&token),
            Ok(claims()),
            "the old key still checks"
        );
        let dropped = Signer::new(vec![b"new key new key!".to_vec()]);
        assert_eq!(dropped.verify(&token), Err(TokenError::BadSignature));
    }

    #[test]
    fn a_changed_token_is_refused() {
        let s = Signer::new(vec![b"0123456789abcdef".to_vec()]);
        let token = s.sign(&claims());
        let (body, tag) = token.split_once('.').expect("two parts");
        let mut other = claims();
        other.entitlement = Some("globex".into());
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).expect("json"));
        assert_eq!(
            s.verify(&format!("{forged_body}.{tag}")),
            Err(TokenError::BadSignature)
        );
        for bad in ["", "x", "a.b", &format!("{body}."), &format!("{body}.!!")] {
            assert!(s.verify(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let s = Signer::new(vec![b"0123456789abcdef".to_vec()]);
        let t = s.csrf("session-a");
        assert!(s.check_csrf("session-a", &t));
        assert!(!s.check_csrf("session-b", &t));
        assert!(!s.check_csrf("session-a", "not base64!"));
        assert!(!s.check_csrf("session-a", ""));
    }
}
