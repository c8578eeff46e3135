use clap::Parser;
use headroom::settings::Settings;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    headroom::telemetry::init_logging(settings.log_json);
    settings.run().await
}
