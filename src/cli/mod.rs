//! The command line's client side: `headroom <command>` talks to a running
//! tracker over its HTTP API (`--url` / `HEADROOM_URL`, `--token` /
//! `HEADROOM_TOKEN`). `headroom` alone, or `headroom serve`, runs the
//! tracker instead (see `main.rs`).
//!
//! What the API answers is read back into the server's own types where the
//! server has them (`EntitlementView`, `SeatDecision`, `UsageDecision`,
//! `EntitlementConfig` for what is sent): one definition, no second copy.
//! `-o json` prints the API's body unchanged, one body per line when a
//! command reads several pages.
//!
//! Exit codes: 0 done; 1 an error (the tracker unreachable, a 5xx, a
//! token refused); 2 a usage error (the command line, or a request the
//! tracker refused as invalid: 400, 413, 415); 3 not found (404); 4 denied
//! or refused (a seat or usage call denied, 409 conflict, 412 stale
//! `--if-match`).

mod api;
mod output;

use std::io::Read;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use self::api::{Api, CliError, Reply, Result, enc};
use crate::domain::{EntitlementConfig, EntitlementView};

/// The first arguments that make `headroom` a client rather than the server.
pub const COMMANDS: &[&str] = &[
    "entitlements",
    "seats",
    "usage",
    "reports",
    "history",
    "periods",
    "webhooks",
    "events",
    "openapi",
    "completions",
    "man",
    // clap's own: the command line's help, every command listed.
    "help",
];

/// Whether these arguments (the program's, name first) ask for a client
/// command.
pub fn is_client(args: &[std::ffi::OsString]) -> bool {
    let mut rest = args.iter().skip(1).filter_map(|a| a.to_str());
    while let Some(a) = rest.next() {
        match a {
            // The client's global options may come first.
            "--url" | "--token" | "-o" | "--output" => {
                rest.next();
            }
            _ if a.starts_with("--url=")
                || a.starts_with("--token=")
                || a.starts_with("--output=")
                || (a.starts_with("-o") && a.len() > 2) => {}
            _ => return COMMANDS.contains(&a),
        }
    }
    false
}

#[derive(Parser, Debug)]
#[command(
    name = "headroom",
    version,
    about = "Seat and metered-usage tracker with overdraft and hard caps",
    long_about = "Seat and metered-usage tracker with overdraft and hard caps.\n\n\
        `headroom` alone (or `headroom serve`) runs the tracker; `headroom serve --help` lists its \
        settings. Every other command talks to a running tracker.",
    after_help = "Exit codes: 0 done, 1 error, 2 usage (or a request refused as invalid), \
        3 not found, 4 denied or refused (a denied seat or usage call, a conflict, a stale --if-match)."
)]
pub struct Cli {
    /// The tracker's address.
    #[arg(
        long,
        global = true,
        env = "HEADROOM_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// An admin token (a client token is enough for seats, usage, history and periods).
    #[arg(long, global = true, env = "HEADROOM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How to print answers: a table for people, or the API's JSON body unchanged.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the tracker (the same as `headroom` alone).
    Serve,
    /// What customers bought.
    #[command(subcommand)]
    Entitlements(Entitlements),
    /// Seat activations.
    #[command(subcommand)]
    Seats(Seats),
    /// Metered usage.
    #[command(subcommand)]
    Usage(Usage),
    /// Reports for sales.
    #[command(subcommand)]
    Reports(Reports),
    /// An entitlement's usage history, hour by hour or day by day.
    History {
        entitlement: String,
        #[arg(long, value_enum, default_value_t = Bucket::Hour)]
        bucket: Bucket,
        /// Start (RFC 3339); default: 24 buckets back.
        #[arg(long)]
        from: Option<String>,
        /// End (RFC 3339, excluded); default: now.
        #[arg(long)]
        to: Option<String>,
    },
    /// An entitlement's closed usage periods (billing records), newest first.
    Periods {
        entitlement: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Endpoints that get the events.
    #[command(subcommand)]
    Webhooks(Webhooks),
    /// The event stream.
    #[command(subcommand)]
    Events(Events),
    /// Print the OpenAPI 3.1 document of this version's API.
    Openapi,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Subcommand, Debug)]
pub enum Entitlements {
    /// Show one entitlement's configuration and live state.
    Get { id: String },
    /// Create or replace an entitlement's configuration.
    Put {
        id: String,
        /// The configuration as JSON (as `PUT /v1/entitlements/{id}` takes it).
        #[arg(long, conflicts_with = "file")]
        config: Option<String>,
        /// A file holding the configuration; `-` reads standard input.
        #[arg(long)]
        file: Option<String>,
        /// Only if the configuration is still this one (the ETag `get -o json` shows).
        #[arg(long)]
        if_match: Option<String>,
    },
    /// Delete an entitlement and its live state.
    Delete { id: String },
    /// Every entitlement, in id order.
    List,
}

#[derive(Subcommand, Debug)]
pub enum Seats {
    /// Activate (or renew) a seat.
    Activate { entitlement: String, seat: String },
    /// Release a seat.
    Release { entitlement: String, seat: String },
    /// The active seats.
    List { entitlement: String },
}

#[derive(Subcommand, Debug)]
pub enum Usage {
    /// Record usage of a metered feature.
    Record {
        entitlement: String,
        feature: String,
        amount: u64,
        /// Makes a retry safe: the same key answers the first decision again.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum Reports {
    /// Entitlements in overdraft now (every page), or denied recently.
    Overdraft {
        /// Those with a denial in the last --hours instead.
        #[arg(long)]
        denied_recently: bool,
        #[arg(long, requires = "denied_recently")]
        hours: Option<u32>,
        /// Print CSV (one line per entitlement and pool) instead of a table.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum Webhooks {
    /// Register an endpoint; prints its signing secret (shown only now).
    Create {
        /// Where deliveries go.
        #[arg(value_name = "URL")]
        endpoint: String,
        /// Only these event types (repeat, or comma-separate); default: all.
        #[arg(long = "type", value_delimiter = ',')]
        types: Vec<String>,
    },
    /// Every endpoint.
    List,
    /// Remove an endpoint.
    Delete { id: String },
    /// An endpoint's latest delivery attempts.
    Deliveries {
        id: String,
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
pub enum Events {
    /// Follow the event stream (through the tracker) until interrupted.
    Tail {
        /// Only events of these types (repeat, or comma-separate).
        #[arg(long = "type", value_delimiter = ',')]
        types: Vec<String>,
        /// Only this entitlement's events.
        #[arg(long)]
        entitlement: Option<String>,
        /// Begin with the oldest event kept instead of the next one.
        #[arg(long)]
        from_start: bool,
        /// Stop once the events so far are printed instead of waiting for more.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Bucket {
    Hour,
    Day,
}

/// Runs a client command; the process's exit code.
pub fn main(args: Vec<std::ffi::OsString>) -> ExitCode {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`| head`) would
    // panic; a command line ends quietly instead, as other tools do.
    // SAFETY: setting a signal's disposition to its default, before any
    // thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // clap prints help and version to stdout with 0, errors with 2.
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("headroom: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.output == Format::Json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A refused call's body is what a script reads: printed as is.
            match (&e, json) {
                (CliError::Answered(a), true) => println!("{}", a.body),
                (CliError::Denied { body }, true) => println!("{body}"),
                _ => {}
            }
            // A denial's decision is its message, printed already.
            if !matches!(e, CliError::Denied { .. }) {
                eprintln!("headroom: {e}");
            }
            ExitCode::from(e.code())
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.output == Format::Json;
    let print_body = |r: &Reply| println!("{}", r.body);
    match &cli.command {
        Command::Serve => unreachable!("main.rs runs the server"),
        Command::Openapi => {
            let doc = crate::http::openapi::document_json()
                .map_err(|e| CliError::Other(format!("the document cannot be encoded: {e}")))?;
            println!("{doc}");
            return Ok(());
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "headroom", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .map_err(|e| CliError::Other(format!("cannot write the man page: {e}")))?;
            return Ok(());
        }
        _ => {}
    }
    let api = Api::new(&cli)?;
    match cli.command {
        Command::Serve | Command::Openapi | Command::Completions { .. } | Command::Man => Ok(()),
        Command::Entitlements(c) => entitlements(&api, c, json).await,
        Command::Seats(c) => seats(&api, c, json).await,
        Command::Usage(Usage::Record {
            entitlement,
            feature,
            amount,
            idempotency_key,
        }) => {
            let mut body = serde_json::json!({"feature": feature, "amount": amount});
            if let Some(k) = idempotency_key {
                body["idempotency_key"] = Value::String(k);
            }
            api.decide(
                Method::POST,
                &format!("/v1/entitlements/{}/usage", enc(&entitlement)),
                Some(body.to_string()),
            )
            .await?
            .finish(json, output::usage_decision)
        }
        Command::Reports(Reports::Overdraft {
            denied_recently,
            hours,
            csv,
        }) => {
            let mut path = "/v1/reports/overdraft?limit=1000".to_string();
            if denied_recently {
                path.push_str("&state=denied_recently");
            }
            if let Some(h) = hours {
                path.push_str(&format!("&hours={h}"));
            }
            let mut items = Vec::new();
            api.pages(&path, |r| {
                if json {
                    print_body(r);
                } else {
                    items.extend(r.json()?["items"].as_array().cloned().unwrap_or_default());
                }
                Ok(())
            })
            .await?;
            if csv {
                output::report_csv(&items)
            } else if !json {
                output::report(&items);
                Ok(())
            } else {
                Ok(())
            }
        }
        Command::History {
            entitlement,
            bucket,
            from,
            to,
        } => {
            let mut path = format!(
                "/v1/entitlements/{}/history?bucket={}",
                enc(&entitlement),
                match bucket {
                    Bucket::Hour => "hour",
                    Bucket::Day => "day",
                }
            );
            for (name, value) in [("from", from), ("to", to)] {
                if let Some(v) = value {
                    path.push_str(&format!("&{name}={}", enc(&v)));
                }
            }
            let reply = api.get(&path).await?;
            if json {
                print_body(&reply);
            } else {
                output::history(&reply.json()?);
            }
            Ok(())
        }
        Command::Periods { entitlement, limit } => {
            let mut path = format!("/v1/entitlements/{}/periods", enc(&entitlement));
            if let Some(l) = limit {
                path.push_str(&format!("?limit={l}"));
            }
            let reply = api.get(&path).await?;
            if json {
                print_body(&reply);
            } else {
                output::periods(&reply.json()?);
            }
            Ok(())
        }
        Command::Webhooks(c) => webhooks(&api, c, json).await,
        Command::Events(Events::Tail {
            types,
            entitlement,
            from_start,
            no_follow,
        }) => {
            tail(
                &api,
                &types,
                entitlement.as_deref(),
                from_start,
                no_follow,
                json,
            )
            .await
        }
    }
}

async fn entitlements(api: &Api, c: Entitlements, json: bool) -> Result<()> {
    match c {
        Entitlements::Get { id } => {
            let reply = api.get(&format!("/v1/entitlements/{}", enc(&id))).await?;
            if json {
                println!("{}", reply.body);
            } else {
                output::entitlement(&reply.parse::<EntitlementView>()?);
            }
            Ok(())
        }
        Entitlements::Put {
            id,
            config,
            file,
            if_match,
        } => {
            let text = match (config, file) {
                (Some(c), _) => c,
                (None, Some(f)) if f == "-" => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?;
                    s
                }
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| CliError::Usage(format!("--file {f:?}: {e}")))?,
                (None, None) => {
                    return Err(CliError::Usage(
                        "give the configuration with --config '<json>' or --file <path>".into(),
                    ));
                }
            };
            // Checked here by the server's own rules: a mistake is named
            // before anything is sent.
            EntitlementConfig::from_json(text.as_bytes())
                .map_err(|e| CliError::Usage(format!("the configuration: {e}")))?;
            let headers: Vec<(&str, String)> =
                if_match.map(|t| ("If-Match", t)).into_iter().collect();
            let reply = api
                .send(
                    Method::PUT,
                    &format!("/v1/entitlements/{}", enc(&id)),
                    Some(text),
                    &headers,
                )
                .await?;
            if json {
                println!("{}", reply.body);
            } else {
                let view: EntitlementView = reply.parse()?;
                let verb = if reply.status == StatusCode::CREATED {
                    "created"
                } else {
                    "replaced"
                };
                println!("{} {verb}", view.id);
                output::entitlement(&view);
            }
            Ok(())
        }
        Entitlements::Delete { id } => {
            api.send(
                Method::DELETE,
                &format!("/v1/entitlements/{}", enc(&id)),
                None,
                &[],
            )
            .await?;
            if !json {
                println!("{id} deleted");
            }
            Ok(())
        }
        Entitlements::List => {
            let mut views: Vec<EntitlementView> = Vec::new();
            api.pages("/v1/entitlements?limit=1000", |r| {
                if json {
                    println!("{}", r.body);
                } else {
                    #[derive(serde::Deserialize)]
                    struct Page {
                        items: Vec<EntitlementView>,
                    }
                    views.extend(r.parse::<Page>()?.items);
                }
                Ok(())
            })
            .await?;
            if !json {
                output::entitlement_list(&views);
            }
            Ok(())
        }
    }
}

async fn seats(api: &Api, c: Seats, json: bool) -> Result<()> {
    let activate = matches!(c, Seats::Activate { .. });
    match c {
        Seats::Activate { entitlement, seat } | Seats::Release { entitlement, seat } => {
            let method = if activate {
                Method::POST
            } else {
                Method::DELETE
            };
            let path = format!(
                "/v1/entitlements/{}/seats/{}",
                enc(&entitlement),
                enc(&seat)
            );
            if activate {
                return api
                    .decide(method, &path, None)
                    .await?
                    .finish(json, output::seat_decision);
            }
            let reply = api.send(method, &path, None, &[]).await?;
            if json {
                println!("{}", reply.body);
            } else {
                output::release(&reply.json()?);
            }
            Ok(())
        }
        Seats::List { entitlement } => {
            let reply = api
                .get(&format!("/v1/entitlements/{}/seats", enc(&entitlement)))
                .await?;
            if json {
                println!("{}", reply.body);
            } else {
                output::seat_list(&reply.json()?);
            }
            Ok(())
        }
    }
}

async fn webhooks(api: &Api, c: Webhooks, json: bool) -> Result<()> {
    let reply = match &c {
        Webhooks::Create { endpoint, types } => {
            let mut body = serde_json::json!({ "url": endpoint });
            if !types.is_empty() {
                body["types"] = serde_json::json!(types);
            }
            api.send(Method::POST, "/v1/webhooks", Some(body.to_string()), &[])
                .await?
        }
        Webhooks::List => api.get("/v1/webhooks").await?,
        Webhooks::Delete { id } => {
            api.send(
                Method::DELETE,
                &format!("/v1/webhooks/{}", enc(id)),
                None,
                &[],
            )
            .await?
        }
        Webhooks::Deliveries { id, limit } => {
            let mut path = format!("/v1/webhooks/{}/deliveries", enc(id));
            if let Some(l) = limit {
                path.push_str(&format!("?limit={l}"));
            }
            api.get(&path).await?
        }
    };
    if json {
        if !reply.body.is_empty() {
            println!("{}", reply.body);
        }
        return Ok(());
    }
    match c {
        Webhooks::Create { .. } => output::webhook_created(&reply.json()?),
        Webhooks::List => output::webhook_list(&reply.json()?),
        Webhooks::Delete { id } => println!("{id} deleted"),
        Webhooks::Deliveries { .. } => output::deliveries(&reply.json()?),
    }
    Ok(())
}

/// Follows `GET /v1/events` (waiting reads) and prints each event as it
/// comes.
async fn tail(
    api: &Api,
    types: &[String],
    entitlement: Option<&str>,
    from_start: bool,
    no_follow: bool,
    json: bool,
) -> Result<()> {
    let mut filters = String::new();
    if !types.is_empty() {
        filters.push_str(&format!("&type={}", enc(&types.join(","))));
    }
    if let Some(e) = entitlement {
        filters.push_str(&format!("&entitlement={}", enc(e)));
    }
    let wait = if no_follow { 0 } else { 20 };
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!(
                "/v1/events?limit=1000&wait={wait}&cursor={}{filters}",
                enc(c)
            ),
            None if from_start => format!("/v1/events?limit=1000&wait={wait}{filters}"),
            None => format!("/v1/events?limit=1000&from=now{filters}"),
        };
        let page = api.get(&path).await?.json()?;
        let events = page["events"]
            .as_array()
            .cloned()
            .ok_or_else(|| CliError::Other("the tracker's event page has no events list".into()))?;
        for e in &events {
            if json {
                println!("{e}");
            } else {
                output::event(e);
            }
        }
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            return Err(CliError::Other(
                "the tracker's event page has no next_cursor".into(),
            ));
        }
        if no_follow && events.is_empty() {
            return Ok(());
        }
    }
}
