//! The command line: every flag, with its `HEADROOM_*` environment
//! fallback, grouped by the layer it configures. Each group (and each of
//! its defaults) is declared once, in its layer; this only puts them
//! together.

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};

use crate::engine::EngineSettings;
use crate::http::HttpSettings;
use crate::store::StoreSettings;
use crate::webhooks::WebhookSettings;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "headroom",
    version,
    about = "Seat and metered-usage tracker with overdraft and hard caps"
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
