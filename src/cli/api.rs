//! The command line's side of HTTP: one request to the tracker, its
//! answer read as a success, a refusal or a decision, and the error (with
//! its exit code) a command ends with.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::Cli;

/// Why a command failed, and the exit code that says so.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the tracker at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Answered(Answer),
    /// A seat or usage call denied: its decision, already printed in a
    /// table; the problem's body for `-o json`.
    #[error("denied")]
    Denied { body: String },
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub(super) fn code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } | CliError::Other(_) => 1,
            CliError::Denied { .. } => 4,
            CliError::Answered(a) => match a.status.as_u16() {
                400 | 413 | 415 | 422 => 2,
                404 => 3,
                409 | 412 | 429 => 4,
                _ => 1,
            },
        }
    }
}

/// An answer that is not a success: its status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let problem: Option<Value> = serde_json::from_str(&self.body).ok();
        let field = |k: &str| {
            problem
                .as_ref()
                .and_then(|p| p.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        match (field("code"), field("detail")) {
            (Some(code), Some(detail)) => write!(f, "{} {code}: {detail}", self.status.as_u16()),
            (Some(code), None) => write!(f, "{} {code}", self.status.as_u16()),
            _ => write!(f, "{}", self.status),
        }
    }
}

pub(super) type Result<T> = std::result::Result<T, CliError>;

/// The tracker's API, as this command line calls it.
pub(super) struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// A success's status and body.
pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) body: String,
}

impl Reply {
    pub(super) fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .map_err(|e| CliError::Other(format!("the tracker's answer is not JSON: {e}")))
    }

    pub(super) fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        read(&self.body)
    }
}

impl Api {
    pub(super) fn new(cli: &Cli) -> Result<Api> {
        let base = cli.url.trim_end_matches('/').to_string();
        url::Url::parse(&base)
            .map_err(|e| CliError::Usage(format!("--url (HEADROOM_URL) = {base:?}: {e}")))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CliError::Other(format!("cannot make an HTTP client: {e}")))?;
        Ok(Api {
            http,
            base,
            token: cli.token.clone(),
        })
    }

    /// Sends one request; a success (2xx), or the answer as an error (a
    /// denial is a 429 whose problem carries the decision).
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        headers: &[(&str, String)],
    ) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let unreachable = |source| CliError::Unreachable {
            url: self.base.clone(),
            source,
        };
        let res = req.send().await.map_err(unreachable)?;
        let status = res.status();
        let body = res.text().await.map_err(unreachable)?;
        if status.is_success() {
            Ok(Reply { status, body })
        } else {
            Err(CliError::Answered(Answer { status, body }))
        }
    }

    /// A seat or usage call: the decision's body and whether it was a
    /// denial (a 429 problem carrying the decision; a 429 without one, a
    /// rate limit, stays an error).
    pub(super) async fn decide(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Decided> {
        match self.send(method, path, body, &[]).await {
            Ok(reply) => Ok(Decided {
                decision: reply.body,
                denied: None,
            }),
            Err(CliError::Answered(a)) if a.status == StatusCode::TOO_MANY_REQUESTS => {
                match serde_json::from_str::<Value>(&a.body)
                    .ok()
                    .and_then(|p| p.get("decision").filter(|d| d.is_object()).cloned())
                {
                    Some(decision) => Ok(Decided {
                        decision: decision.to_string(),
                        denied: Some(a.body),
                    }),
                    None => Err(CliError::Answered(a)),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn get(&self, path: &str) -> Result<Reply> {
        self.send(Method::GET, path, None, &[]).await
    }

    /// Every page of `path` (its query ends ready for `cursor=`), each
    /// handed to `page` as it arrives.
    pub(super) async fn pages(
        &self,
        path: &str,
        mut page: impl FnMut(&Reply) -> Result<()>,
    ) -> Result<()> {
        let mut cursor: Option<String> = None;
        loop {
            let url = match &cursor {
                Some(c) => format!("{path}&cursor={}", enc(c)),
                None => path.to_string(),
            };
            let reply = self.get(&url).await?;
            page(&reply)?;
            match reply.json()?.get("next_cursor").and_then(Value::as_str) {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(()),
            }
        }
    }
}

/// What a seat or usage call decided.
pub(super) struct Decided {
    /// The decision (the body of a grant, the `decision` of a denial).
    decision: String,
    /// A denial's whole body (the problem).
    denied: Option<String>,
}

impl Decided {
    /// Prints the decision (the API's body for `-o json`, else `table`
    /// given the decision read); a denial becomes exit code 4.
    pub(super) fn finish<T: serde::de::DeserializeOwned>(
        self,
        json: bool,
        table: impl FnOnce(&T),
    ) -> Result<()> {
        match (json, self.denied) {
            (true, Some(body)) => return Err(CliError::Denied { body }),
            (true, None) => println!("{}", self.decision),
            (false, denied) => {
                table(&read::<T>(&self.decision)?);
                if let Some(body) = denied {
                    return Err(CliError::Denied { body });
                }
            }
        }
        Ok(())
    }
}

/// An answer's body read into the type this version expects.
fn read<T: serde::de::DeserializeOwned>(body: &str) -> Result<T> {
    serde_json::from_str(body).map_err(|e| {
        CliError::Other(format!(
            "the tracker's answer is not what this version reads: {e}"
        ))
    })
}

/// A path segment or query value, percent-encoded.
pub(super) fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
