//! What the settings groups of every layer share: each layer declares its
//! own flags (a `clap::Args` struct with its defaults, written once), and
//! [`crate::settings::Settings`] flattens them into the command line.

use std::time::Duration;

/// A settings group with every default and no environment: what a test or
/// a bench gets from `Default`.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|a| a.env(None::<&str>));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<&str>())
        .unwrap_or_else(|e| unreachable!("every flag of a settings group has a default: {e}"));
    T::from_arg_matches(&matches)
        .unwrap_or_else(|e| unreachable!("the defaults of a settings group parse: {e}"))
}

/// A duration flag: `500ms`, `30s`, `24h`, `35days`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 24h, 35days)"))
}

/// A comma-separated list, blanks left out.
pub fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}
