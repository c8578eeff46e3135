//! Bearer tokens with two scopes: admin (everything) and client (metering),
//! and optionally scrape tokens that may read `/metrics` and nothing else.

use std::num::NonZeroU32;
use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use subtle::ConstantTimeEq;

use super::problem::{ApiError, Kind};

/// Who may call: the tokens of each scope, and the seat churn limit.
#[derive(clap::Args, Clone, Debug)]
pub struct AuthSettings {
    /// Comma-separated admin tokens; generated and printed once when none are given.
    #[arg(long, env = "HEADROOM_ADMIN_TOKENS", hide_env_values = true)]
    pub admin_tokens: Option<String>,
    /// Comma-separated client (metering) tokens; generated when none are given.
    #[arg(long, env = "HEADROOM_CLIENT_TOKENS", hide_env_values = true)]
    pub client_tokens: Option<String>,
    /// Accept every call without a token (logged loudly).
    #[arg(long, env = "HEADROOM_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub no_auth: bool,
    /// Comma-separated scrape tokens: when given, `/metrics` answers only to
    /// one of these or an admin token.
    #[arg(long, env = "HEADROOM_METRICS_TOKENS", hide_env_values = true)]
    pub metrics_tokens: Option<String>,
    /// Seat activations and releases allowed per second per token, in bursts
    /// of as many (429 `rate_limited` beyond); 0 = unlimited.
    #[arg(long, env = "HEADROOM_CHURN_LIMIT", default_value_t = 0)]
    pub churn_limit: u32,
}

fn generate_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

/// Tokens generated at start because none were configured: shown once.
#[derive(Default)]
pub struct Generated {
    pub admin: Option<String>,
    pub client: Option<String>,
}

impl AuthSettings {
    /// The tokens to accept, and those generated because none were given
    /// (the caller shows them once).
    pub fn auth(&self) -> (Auth, Generated) {
        if self.no_auth {
            tracing::warn!("--no-auth: every call is accepted without a token");
            let auth = Auth::disabled().with_churn_limit(self.churn_limit);
            return (auth, Generated::default());
        }
        let list = |s: &Option<String>| s.as_deref().map(crate::flags::list).unwrap_or_default();
        let mut admin = list(&self.admin_tokens);
        let mut client = list(&self.client_tokens);
        if client.iter().any(|c| admin.contains(c)) {
            tracing::warn!(
                "a token is listed in both --admin-tokens and --client-tokens: it has admin rights; \
                 give metering clients tokens of their own"
            );
        }
        let mut generated = Generated::default();
        if admin.is_empty() {
            let token = generate_token("adm");
            admin.push(token.clone());
            generated.admin = Some(token);
        }
        if client.is_empty() {
            let token = generate_token("cli");
            client.push(token.clone());
            generated.client = Some(token);
        }
        let auth = Auth::new(admin, client)
            .with_metrics_tokens(list(&self.metrics_tokens))
            .with_churn_limit(self.churn_limit);
        (auth, generated)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Client,
    /// `/metrics`: open unless scrape tokens are configured; then a scrape
    /// token or an admin token.
    Metrics,
}

#[derive(Clone, Default)]
pub struct Auth {
    admin: Vec<Vec<u8>>,
    client: Vec<Vec<u8>>,
    metrics: Vec<Vec<u8>>,
    disabled: bool,
    /// Seat activations and releases per second per token, when limited.
    churn: Option<(u32, Arc<DefaultKeyedRateLimiter<Vec<u8>>>)>,
}

impl std::fmt::Debug for Auth {
    /// Never prints a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("admin_tokens", &self.admin.len())
            .field("client_tokens", &self.client.len())
            .field("metrics_tokens", &self.metrics.len())
            .field("disabled", &self.disabled)
            .field("churn_per_second", &self.churn.as_ref().map(|c| c.0))
            .finish()
    }
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_of)
}

/// The token of an `Authorization` header's value: the scheme `Bearer` in
/// any case (RFC 9110 §11.1), then the token.
fn bearer_of(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A token's fingerprint: the first 16 bytes of its SHA-256, in hex.
fn fingerprint(token: &str) -> String {
    fingerprint_bytes(token.as_bytes())
}

fn fingerprint_bytes(token: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(token)[..16])
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
            churn: None,
        }
    }

    /// Protects `/metrics`: from now on only these tokens and admin tokens
    /// may read it.
    pub fn with_metrics_tokens(mut self, tokens: Vec<String>) -> Self {
        self.metrics = tokens.into_iter().map(String::into_bytes).collect();
        self
    }

    /// Limits seat activations and releases to `per_second` per token (in
    /// bursts of as many); 0 leaves them unlimited.
    pub fn with_churn_limit(mut self, per_second: u32) -> Self {
        self.churn = NonZeroU32::new(per_second).map(|n| {
            (
                per_second,
                Arc::new(DefaultKeyedRateLimiter::keyed(Quota::per_second(n))),
            )
        });
        self
    }

    /// Takes one seat call from the caller's allowance (after [`Auth::require`]).
    pub fn churn(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let Some((per_second, limiter)) = &self.churn else {
            return Ok(());
        };
        let key = bearer(req).unwrap_or_default().as_bytes().to_vec();
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            let mut e = ApiError::new(
                Kind::RateLimited,
                format!(
                    "more than {per_second} seat activations and releases per second with this token"
                ),
            );
            e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
            e
        })
    }

    /// Every call is allowed (the `--no-auth` opt-out).
    pub fn disabled() -> Self {
        Auth {
            disabled: true,
            ..Auth::default()
        }
    }

    /// The fingerprint of `token` if it is an admin token (with `--no-auth`,
    /// of any token): what a console session keeps instead of the token.
    pub fn admin_fingerprint(&self, token: &str) -> Option<String> {
        (self.disabled || matches_any(token.as_bytes(), &self.admin)).then(|| fingerprint(token))
    }

    /// The fingerprint of the admin token a request carries.
    pub fn admin_fingerprint_of(&self, req: &HttpRequest) -> Option<String> {
        self.admin_fingerprint(bearer(req).unwrap_or_default())
    }

    /// Whether a console session's fingerprint is of an admin token still
    /// configured (a session ends when its token is removed).
    pub fn knows_admin_fingerprint(&self, fp: &str) -> bool {
        self.disabled
            || self.admin.iter().fold(0u8, |acc, t| {
                let known = fingerprint_bytes(t);
                acc | known.as_bytes().ct_eq(fp.as_bytes()).unwrap_u8()
            }) == 1
    }

    pub fn require(&self, req: &HttpRequest, scope: Scope) -> Result<(), ApiError> {
        self.require_token(bearer(req), scope)
    }

    /// As [`Auth::require`], for the `Authorization` header's value of a
    /// call another node sent on in a batch of its own.
    pub fn require_authorization(
        &self,
        authorization: Option<&str>,
        scope: Scope,
    ) -> Result<(), ApiError> {
        self.require_token(authorization.and_then(bearer_of), scope)
    }

    fn require_token(&self, token: Option<&str>, scope: Scope) -> Result<(), ApiError> {
        if self.disabled || (scope == Scope::Metrics && self.metrics.is_empty()) {
            return Ok(());
        }
        let token = token.ok_or_else(|| {
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

#[cfg(test)]
mod tests {
    use super::bearer_of;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for ok in [
            "Bearer t1",
            "bearer t1",
            "BEARER t1",
            "bEaReR   t1 ",
            " Bearer t1",
        ] {
            assert_eq!(bearer_of(ok), Some("t1"), "{ok:?}");
        }
        for bad in ["Basic dTpw", "Bearer", "Bearer ", "Bearert1", "t1", ""] {
            assert_eq!(bearer_of(bad), None, "{bad:?}");
        }
    }
}
