//! The poll-api service on its own (distributed deployments).

use clap::Parser;
use rt_core::config::Settings;

/// Serves events over short and long polling, with named cursors.
#[derive(Parser)]
#[command(name = "poll-api", version)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rt_core::server::run_service("poll-api", args.settings, rt_poll_api::routes()).await
}
