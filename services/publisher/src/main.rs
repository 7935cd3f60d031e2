//! The publisher service on its own (distributed deployments).

use clap::Parser;
use rt_core::config::Settings;

/// Accepts events over HTTP and writes them durably, then to NATS.
#[derive(Parser)]
#[command(name = "publisher", version)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rt_core::server::run_service("publisher", args.settings, rt_publisher::routes()).await
}
