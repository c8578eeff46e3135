//! The command line: every flag, with its `HEADROOM_*` environment
//! fallback, grouped by the layer it configures. Each group (and each of
//! its defaults) is declared once, in its layer; this only puts them
//! together.

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};

use crate::engine::EngineSettings;
use crate::http::HttpSettings;
use crate::nodes::NodeSettings;
use crate::store::StoreSettings;
use crate::webhooks::WebhookSettings;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "headroom",
    version,
    about = "Seat and metered-usage tracker with overdraft and hard caps",
    after_help = "Runs the tracker (also `headroom serve`). The other commands talk to a running \
        tracker: headroom entitlements|seats|usage|reports|history|periods|webhooks|events|\
        openapi|completions|man (`headroom help` describes them, `man headroom`)."
)]
pub struct Settings {
    #[command(flatten)]
    pub http: HttpSettings,
    #[command(flatten)]
    pub store: StoreSettings,
    #[command(flatten)]
    pub engine: EngineSettings,
    #[command(flatten)]
    pub webhooks: WebhookSettings,
    #[command(flatten)]
    pub nodes: NodeSettings,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "HEADROOM_LOG_JSON", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub log_json: bool,
}

impl Default for Settings {
    /// Every default, nothing from the environment (tests and benches).
    fn default() -> Self {
        crate::flags::defaults()
    }
}

impl Settings {
    /// This process's settings from its arguments and environment. A bad
    /// one is reported in one line that names the flag, its environment
    /// variable, the value (a password masked) and what to write instead,
    /// and the process exits with status 2; `--help` and `--version` print
    /// and exit as usual.
    pub fn from_env_or_exit() -> Settings {
        Settings::from_args_or_exit(std::env::args_os())
    }

    /// [`Settings::from_env_or_exit`] from these arguments (program name
    /// first).
    pub fn from_args_or_exit(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Settings {
        use clap::error::ErrorKind;
        let parsed = Settings::try_parse_from(args).map_err(|e| match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => one_line(&e),
        });
        match parsed.and_then(|s| s.check().map(|()| s)) {
            Ok(s) => s,
            Err(line) => {
                eprintln!("headroom: {line}");
                std::process::exit(2);
            }
        }
    }

    /// What no single flag can check.
    pub fn check(&self) -> Result<(), String> {
        let w = &self.webhooks;
        if w.backoff_max < w.backoff {
            return Err(format!(
                "--webhook-backoff-max (HEADROOM_WEBHOOK_BACKOFF_MAX) = {:?} is shorter than \
                 --webhook-backoff (HEADROOM_WEBHOOK_BACKOFF) = {:?}; make it at least as long",
                humantime::format_duration(w.backoff_max).to_string(),
                humantime::format_duration(w.backoff).to_string(),
            ));
        }
        let redis = self.store.redis_url.is_some() || self.store.redis_cluster.is_some();
        if self.nodes.cluster_secret.is_some() && !redis {
            return Err(
                "--cluster-secret (HEADROOM_CLUSTER_SECRET) is set but there is no Redis: \
                 several nodes find each other and share their entitlements in Redis; set \
                 --redis-url (HEADROOM_REDIS_URL) or --redis-cluster (HEADROOM_REDIS_CLUSTER)"
                    .into(),
            );
        }
        if self.nodes.cluster_secret.is_some()
            && self.nodes.advertise.is_none()
            && self.http.listen.ip().is_unspecified()
        {
            return Err(format!(
                "--listen (HEADROOM_LISTEN) = \"{}\" is no address other nodes can reach; set \
                 --advertise (HEADROOM_ADVERTISE) to the host:port they use",
                self.http.listen
            ));
        }
        Ok(())
    }
}

/// A clap error as one line: `--flag (HEADROOM_FLAG) = "value": reason`.
fn one_line(e: &clap::Error) -> String {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let first_line = || {
        let rendered = e.to_string();
        let line = rendered.lines().next().unwrap_or_default();
        line.trim_start_matches("error: ").to_string()
    };
    let Some(arg) = text(ContextKind::InvalidArg) else {
        return first_line();
    };
    let flag = arg.split_whitespace().next().unwrap_or(&arg).to_string();
    let long = flag.trim_start_matches('-');
    let command = Settings::command();
    let env = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| format!(" ({})", v.to_string_lossy()))
        .unwrap_or_default();
    let reason = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_else(first_line);
    match text(ContextKind::InvalidValue) {
        Some(value) => {
            let shown = match long {
                "redis-url" => masked_url(&value),
                "cluster-secret" | "portal-secrets" => "***".to_string(),
                _ => value,
            };
            format!("{flag}{env} = {shown:?}: {reason}")
        }
        None => format!("{flag}{env}: {reason}"),
    }
}

/// A URL with its password, if any, replaced by `***`.
fn masked_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        // Not a URL: it may still hold a secret, so show only its scheme.
        Err(_) => raw
            .split("://")
            .next()
            .map_or_else(String::new, |s| format!("{s}://…")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_watch(list: &str) -> Result<usize, clap::Error> {
        Settings::try_parse_from(["headroom", "--watch-entitlements", list])
            .map(|s| s.engine.watched.len())
    }

    #[test]
    fn watched_entitlements_are_checked_and_bounded() {
        assert_eq!(with_watch("acme, globex").ok(), Some(2));
        let fifty: Vec<String> = (0..50).map(|i| format!("e{i}")).collect();
        assert!(with_watch(&fifty.join(",")).is_ok());
        let fifty_one: Vec<String> = (0..51).map(|i| format!("e{i}")).collect();
        assert!(with_watch(&fifty_one.join(",")).is_err(), "at most 50");
        assert!(with_watch("not an id").is_err());
    }

    #[test]
    fn every_group_has_its_defaults_without_the_environment() {
        let s = Settings::default();
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.store.redis_prefix, "headroom");
        assert_eq!(s.store.redis_timeout, std::time::Duration::from_secs(2));
        assert_eq!(s.engine.idle_timeout, std::time::Duration::from_secs(300));
        assert_eq!(s.engine.cached_keys, 1024);
        assert_eq!(s.webhooks.per_endpoint, 4);
        assert_eq!(s.http.limits.max_connections, 25_000);
        assert!(s.store.redis_url.is_none() && s.engine.watched.is_empty());
    }
}
