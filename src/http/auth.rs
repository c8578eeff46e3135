//! Bearer tokens with two scopes: admin (everything) and client (metering),
//! and optionally scrape tokens that may read `/metrics` and nothing else.

use actix_web::HttpRequest;
use actix_web::http::header;
use subtle::ConstantTimeEq;

use super::problem::{ApiError, Kind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Client,
    /// `/metrics`: open unless scrape tokens are configured; then a scrape
    /// token or an admin token.
    Metrics,
}

#[derive(Clone, Debug, Default)]
pub struct Auth {
    admin: Vec<Vec<u8>>,
    client: Vec<Vec<u8>>,
    metrics: Vec<Vec<u8>>,
    disabled: bool,
}

/// Compares against every token, so the time taken does not say which matched.
fn matches_any(token: &[u8], tokens: &[Vec<u8>]) -> bool {
    tokens
        .iter()
        .fold(0u8, |acc, t| acc | t.as_slice().ct_eq(token).unwrap_u8())
        == 1
}

impl Auth {
    pub fn new(admin: Vec<String>, client: Vec<String>) -> Self {
        Auth {
            admin: admin.into_iter().map(String::into_bytes).collect(),
            client: client.into_iter().map(String::into_bytes).collect(),
            metrics: Vec::new(),
            disabled: false,
        }
    }

    /// Protects `/metrics`: from now on only these tokens and admin tokens
    /// may read it.
    pub fn with_metrics_tokens(mut self, tokens: Vec<String>) -> Self {
        self.metrics = tokens.into_iter().map(String::into_bytes).collect();
        self
    }

    /// Every call is allowed (the `--no-auth` opt-out).
    pub fn disabled() -> Self {
        Auth {
            disabled: true,
            ..Auth::default()
        }
    }

    pub fn require(&self, req: &HttpRequest, scope: Scope) -> Result<(), ApiError> {
        if self.disabled || (scope == Scope::Metrics && self.metrics.is_empty()) {
            return Ok(());
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(Kind::Unauthorized, "send Authorization: Bearer <token>")
            })?;
        let token = token.as_bytes();
        let admin = matches_any(token, &self.admin);
        let client = matches_any(token, &self.client);
        let scrape = matches_any(token, &self.metrics);
        match (admin, client, scope) {
            (true, _, _) | (_, true, Scope::Client) => Ok(()),
            _ if scope == Scope::Metrics && scrape => Ok(()),
            (false, true, Scope::Metrics) => Err(ApiError::new(
                Kind::Forbidden,
                "/metrics needs a scrape token or an admin token",
            )),
            (false, true, Scope::Admin) => Err(ApiError::new(
                Kind::Forbidden,
                "this call needs an admin token; a client token may only meter",
            )),
            _ => Err(ApiError::new(
                Kind::Unauthorized,
                "the bearer token is not known",
            )),
        }
    }
}
